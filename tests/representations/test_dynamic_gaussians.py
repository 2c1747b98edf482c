"""dynamic-gaussians: canonical 3DGS + a HexPlane deformation field over (x, t)."""

import pytest
import torch

from lift3d.cameras import OrbitSampler, OrbitSamplerConfig, orbit_cameras
from lift3d.checkpoint import save_checkpoint
from lift3d.representations.dynamic import DeformationConfig, DynamicGaussians, DynamicGaussiansConfig
from lift3d.representations.gaussians import PARAMETER_NAMES, Gaussians, GaussiansConfig

TINY = dict(num_points=200, kernel_tier="reference",
            deformation=DeformationConfig(resolutions=(8,), time_resolution=4, features=4, hidden=16, layers=1))


def _model(**overrides) -> DynamicGaussians:
    return DynamicGaussians(DynamicGaussiansConfig(**{**TINY, **overrides}), torch.Generator().manual_seed(0))


def _cameras(times):
    n = len(times)
    return orbit_cameras(torch.full((n,), 20.0), torch.linspace(0, 270, n), torch.full((n,), 3.0),
                         torch.full((n,), 40.0), 12, 12, torch.tensor(times))


def _kick(model: DynamicGaussians) -> None:
    """Non-zero output heads, so the field moves the Gaussians."""
    with torch.no_grad():
        model.deformation.heads.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
        for plane in model.deformation.field.time_planes():
            plane.add_(0.5 * torch.rand(plane.shape, generator=torch.Generator().manual_seed(2)))


def test_at_initialisation_every_time_renders_the_canonical_gaussians():
    model = _model()
    assert model.is_dynamic and not Gaussians.is_dynamic
    static = Gaussians(GaussiansConfig(num_points=200, kernel_tier="reference"), torch.Generator().manual_seed(0))
    static.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("deformation.")})
    background = torch.ones(3)
    cameras = _cameras([0.0, 0.3, 1.0])
    assert torch.allclose(model.render(cameras, background).rgb, static.render(cameras, background).rgb, atol=1e-6)


def test_batch_of_mixed_times_equals_rendering_each_camera_alone():
    model = _model()
    _kick(model)
    cameras = _cameras([0.7, 0.0, 0.7, 0.2])
    batch = model.render(cameras, torch.ones(3)).rgb
    alone = torch.cat([model.render(cameras[i], torch.ones(3)).rgb for i in range(4)])
    assert torch.allclose(batch, alone, atol=1e-5)
    assert not torch.allclose(batch[0], model.render(cameras[0].with_time(0.2), torch.ones(3)).rgb[0], atol=1e-3)


def test_deform_of_the_centres_is_the_rendered_motion():
    model = _model()
    _kick(model)
    means, _, _ = model.deformed(0.6)
    assert torch.allclose(model.deform(model.means.detach(), 0.6), means, atol=1e-6)
    stacked, _, _ = model.deformed(torch.tensor([0.1, 0.6]))
    assert stacked.shape == (2, 200, 3) and torch.allclose(stacked[1], means, atol=1e-6)


def test_regularisers_vanish_on_still_smooth_fields_and_gradients_reach_the_planes():
    model = _model()
    zero = model.regularization(None, 0)
    assert float(zero["time_smoothness"]) == 0.0 and float(zero["time_l1"]) == 0.0
    with torch.no_grad():
        for plane in model.deformation.field.spatial_planes():
            plane.fill_(0.3)
        for plane in model.deformation.field.time_planes():  # linear in t (rows): no second difference
            rows = torch.linspace(0.5, 1.5, plane.shape[-2]).view(1, 1, -1, 1)
            plane.copy_(rows.expand_as(plane))
    losses = model.regularization(None, 0)
    assert float(losses["plane_tv"]) == 0.0 and float(losses["time_smoothness"]) < 1e-12
    assert float(losses["time_l1"]) > 0.0
    _kick(model)
    model.render(_cameras([0.4, 0.9]), torch.ones(3)).rgb.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.deformation.field.time_planes())


def test_init_from_a_static_run_and_frozen_canonical(tmp_path):
    static = Gaussians(GaussiansConfig(num_points=150, kernel_tier="reference"), torch.Generator().manual_seed(5))
    checkpoint = tmp_path / "static.pt"
    save_checkpoint(checkpoint, {"representation": static.state_dict()})
    model = _model(init_from=str(checkpoint), freeze_canonical=True)
    assert model.num_gaussians == 150
    for name in PARAMETER_NAMES:
        assert torch.equal(getattr(model, name), getattr(static, name)) and not getattr(model, name).requires_grad
    names = [group["name"] for group in model.param_groups()]
    assert names == ["deformation_planes", "deformation_mlp"]
    with pytest.raises(ValueError, match="not a Gaussians checkpoint"):
        save_checkpoint(tmp_path / "other.pt", {"representation": {"weights": torch.zeros(1)}})
        _model(init_from=str(tmp_path / "other.pt"))


def test_random_time_frames_and_clips_render():
    model = _model()
    sampler = OrbitSampler(OrbitSamplerConfig(batch_size=2, width=8, height=8, clips_per_batch=2))
    generator = torch.Generator().manual_seed(0)
    frames = sampler.sample(generator, with_time=True)
    clips = sampler.sample_clips(generator, 3)
    assert model.render(frames, torch.ones(3)).rgb.shape == (2, 8, 8, 3)
    assert model.render(clips, torch.ones(3)).rgb.shape == (6, 8, 8, 3)
