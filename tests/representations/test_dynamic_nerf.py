"""Dynamic NeRF: both variants render at each camera's time, gradients reach both grids, the
occupancy grid covers every time, ``deform`` inverts the warp (identity at D = 0), and
``init_from`` starts from a static NeRF checkpoint exactly where it left off."""

import pytest
import torch

from lift3d.cameras import orbit_cameras
from lift3d.checkpoint import save_checkpoint
from lift3d.config import Schedule
from lift3d.kernels.hashgrid import HashGridConfig
from lift3d.representations.dynamic_nerf import DeformableNeRF, DynamicNeRF, DynamicNeRFConfig
from lift3d.representations.nerf import NeRF, NeRFConfig

ENCODING = HashGridConfig(n_levels=4, log2_hashmap_size=12)
SPACE_TIME = HashGridConfig(n_levels=4, log2_hashmap_size=12, base_resolution=4, per_level_scale=1.5, n_input_dims=4)
BACKGROUND = torch.tensor([0.0, 1.0, 0.0])


def _cams(time=None, batch=2, size=12):
    return orbit_cameras(torch.full((batch,), 15.0), torch.linspace(0, 180, batch), torch.full((batch,), 3.0),
                         torch.full((batch,), 40.0), size, size, time=time)


def _model(**kwargs) -> DynamicNeRF:
    options = {"encoding": ENCODING, "space_time_encoding": SPACE_TIME, "hidden_dim": 16, "num_samples_per_ray": 48}
    config = DynamicNeRFConfig(**{**options, **kwargs})
    return DynamicNeRF(config, generator=torch.Generator().manual_seed(0))


def _static(tmp_path, **kwargs):
    """A static NeRF with a non-trivial table, saved as a run checkpoint under tmp_path."""
    model = NeRF(NeRFConfig(encoding=ENCODING, hidden_dim=16, num_samples_per_ray=48, **kwargs),
                 generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.encoding.table.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    save_checkpoint(tmp_path / "ckpt" / "last.pt", {"representation": model.state_dict()})
    return model.eval()


def _randomise(module: torch.nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, scale, generator=g)


def test_space_time_renders_at_each_cameras_time_and_trains_both_grids():
    model = _model()
    assert model.is_dynamic and not hasattr(model, "deform")
    _randomise(model.space_time_encoding, 1.0, seed=3)
    early = model.render(_cams(time=torch.tensor([0.1, 0.1])), BACKGROUND)
    late = model.render(_cams(time=torch.tensor([0.9, 0.9])), BACKGROUND)
    assert early.rgb.shape == (2, 12, 12, 3) and early.alpha.shape == (2, 12, 12, 1)
    assert (early.rgb - late.rgb).abs().max() > 0.05  # time changes the render
    # A static batch renders at t = 0; a batch of mixed times equals its cameras rendered one by one.
    model.eval()
    static = model.render(_cams(), BACKGROUND)
    at_zero = model.render(_cams(time=torch.zeros(2)), BACKGROUND)
    torch.testing.assert_close(static.rgb, at_zero.rgb)
    mixed = model.render(_cams(time=torch.tensor([0.1, 0.9]), batch=2), BACKGROUND)
    cams = _cams(time=torch.tensor([0.1, 0.9]))
    for i in range(2):
        torch.testing.assert_close(mixed.rgb[i : i + 1], model.render(cams[i], BACKGROUND).rgb)
    model.train()
    out = model.render(_cams(time=torch.tensor([0.2, 0.7])), BACKGROUND)
    out.rgb.sum().backward()
    assert model.encoding.table.grad.abs().sum() > 0
    assert model.space_time_encoding.table.grad.abs().sum() > 0
    names = [group["name"] for group in model.param_groups()]
    assert "space_time" in names and "encoding" in names


def test_occupancy_grid_sees_the_density_maximum_over_stratified_times():
    model = _model(occupancy_times=4)
    _randomise(model.space_time_encoding, 1.0, seed=4)
    points = torch.rand(64, 3) * 2 - 1
    seen: list[tuple[float, torch.Tensor]] = []
    density = model.density

    def recording(p):
        sigma = density(p)
        seen.append((model._time, sigma))
        return sigma

    model.density = recording  # type: ignore[method-assign]
    union = model.occupancy_density(points)
    times = sorted(t for t, _ in seen)
    assert len(times) == 4 and all(k / 4 <= t < (k + 1) / 4 for k, t in enumerate(times))
    assert torch.equal(union, torch.stack([s for _, s in seen]).amax(0))
    assert any((s < union).any() for _, s in seen)  # the times disagree: the maximum matters
    del model.density
    out = model.render(_cams(time=torch.tensor([0.3, 0.6])), BACKGROUND)
    model.on_step(0, out, torch.optim.Adam(model.param_groups()))
    assert 0.0 < model.grid.occupancy.float().mean() < 1.0


def test_deformation_variant_is_identity_at_zero_and_deform_inverts_the_warp():
    model = _model(variant="deformation")
    assert isinstance(model, DeformableNeRF) and model.is_dynamic
    points = torch.rand(50, 3) * 1.6 - 0.8
    torch.testing.assert_close(model.deform(points, 0.4), points, rtol=0, atol=0)  # D = 0 at init
    _randomise(model.space_time_encoding, 0.5, seed=5)
    with torch.no_grad():
        model.deformation_network[-1].weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        x = model.deform(points, 0.7)
        offset = model.displacement(x, 0.7)
        assert offset.abs().max() > 1e-3  # a real motion
        torch.testing.assert_close(x + offset, points, rtol=0, atol=1e-4)  # the warp of deform(p) is p
        assert (model.deform(points, 0.1) - x).abs().max() > 1e-4
    out = model.render(_cams(time=torch.tensor([0.25, 0.75])), BACKGROUND)
    (out.rgb.sum()).backward()
    assert model.space_time_encoding.table.grad.abs().sum() > 0
    assert model.deformation_network[0].weight.grad.abs().sum() > 0
    assert model.encoding.table.grad.abs().sum() > 0


def test_deformation_smoothness_regulariser_and_frozen_canonical():
    model = _model(variant="deformation", freeze_canonical=True, lambda_deformation_smoothness=Schedule(1.0))
    _randomise(model.space_time_encoding, 0.5, seed=7)
    with torch.no_grad():
        model.deformation_network[-1].weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(8))
    out = model.render(_cams(time=torch.tensor([0.2, 0.8])), BACKGROUND)
    losses = model.regularization(out, step=0)
    assert set(losses) == {"deformation_smoothness"} and losses["deformation_smoothness"] > 0
    names = {group["name"] for group in model.param_groups()}
    assert names == {"space_time", "deformation"}  # the static grid and heads are frozen
    assert not any(p.requires_grad for p in [*model.encoding.parameters(), *model.network.parameters()])


@pytest.mark.parametrize("variant,combine", [("space_time", "sum"), ("space_time", "concat"), ("deformation", "sum")])
def test_init_from_a_static_nerf_starts_as_that_nerf(tmp_path, variant, combine):
    static = _static(tmp_path)
    model = _model(variant=variant, combine=combine, init_from=str(tmp_path)).eval()
    torch.testing.assert_close(model.encoding.table, static.encoding.table)
    torch.testing.assert_close(model.grid.occupancy, static.grid.occupancy)
    cams = _cams(time=torch.tensor([0.3, 0.8]))
    expected = static.render(cams, BACKGROUND).rgb
    # sum: the fresh 4-D table is tiny (tcnn's 1e-4 init); concat and deformation start exactly static.
    tolerance = 2e-3 if combine == "sum" and variant == "space_time" else 1e-5
    torch.testing.assert_close(model.render(cams, BACKGROUND).rgb, expected, rtol=0, atol=tolerance)
    if variant == "deformation":
        mesh, colours = model.surface()
        assert len(mesh.vertices) > 0 and colours(torch.zeros(2, 3)).shape == (2, 3)


def test_init_from_rejects_a_different_nerf(tmp_path):
    other = NeRF(NeRFConfig(encoding=HashGridConfig(n_levels=3, log2_hashmap_size=12), hidden_dim=16))
    save_checkpoint(tmp_path / "ckpt" / "last.pt", {"representation": other.state_dict()})
    with pytest.raises(ValueError, match="init_from"):
        _model(init_from=str(tmp_path), combine="concat")


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="space_time_encoding.n_input_dims"):
        _model(space_time_encoding=HashGridConfig(n_levels=4, log2_hashmap_size=12))
    with pytest.raises(ValueError, match="combine=sum"):
        _model(space_time_encoding=HashGridConfig(n_levels=2, log2_hashmap_size=12, n_input_dims=4))
    with pytest.raises(ValueError, match="variant"):
        _model(variant="hexplane")


def test_quickstart_4d_nerf_pipeline_runs_static_then_dynamic(tmp_path):
    """The preset end to end at a toy size: the dynamic stage starts from the static one and is
    scored over (view x time) with the time margin."""
    import json

    import yaml

    from lift3d.cli import main

    out = tmp_path / "run"
    tiny = [
        "static.trainer.steps=2", "dynamic.trainer.steps=2", "trainer.cameras.width=16", "trainer.cameras.height=16",
        "trainer.eval.width=16", "trainer.eval.height=16", "trainer.eval.num_views=2", "teacher.resolution=16",
        "representation.num_samples_per_ray=32", "representation.encoding.n_levels=4",
        "representation.encoding.log2_hashmap_size=12", "dynamic.representation.space_time_encoding.n_levels=4",
        "dynamic.representation.space_time_encoding.log2_hashmap_size=10", "dynamic.trainer.eval_times=2",
    ]
    assert main(["run", "configs/quickstart-4d-nerf.yaml", "--out", str(out), *tiny]) == 0
    static, dynamic = out / "static", out / "dynamic"
    config = yaml.safe_load((dynamic / "config.yaml").read_text())
    assert config["representation"]["type"] == "dynamic-nerf" and config["representation"]["init_from"] == str(static)
    metrics = json.loads((dynamic / "done.json").read_text())
    assert {"eval/psnr", "eval/time_margin_db"} <= set(metrics)
