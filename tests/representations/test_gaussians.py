import pytest
import torch

from lift3d.cameras import orbit_cameras
from lift3d.optim import adam
from lift3d.representations.gaussians import DensifyConfig, Gaussians, GaussiansConfig


def _cams(batch=2, size=24):
    return orbit_cameras(torch.full((batch,), 15.0), torch.linspace(0, 180, batch), torch.full((batch,), 3.0),
                         torch.full((batch,), 40.0), size, size)


def _model(**kwargs):
    return Gaussians(GaussiansConfig(num_points=300, **kwargs), generator=torch.Generator().manual_seed(0))


def test_activations_and_render_shapes():
    model = _model(sh_degree=2)
    assert torch.allclose(model.quats.norm(dim=-1), torch.ones(300))
    assert (model.scales > 0).all() and ((model.opacities > 0) & (model.opacities < 1)).all()
    assert model.sh_coefficients.shape == (300, 9, 3)
    out = model.render(_cams(), torch.tensor([1.0, 0.0, 0.0]))
    assert out.rgb.shape == (2, 24, 24, 3) and out.alpha.shape == (2, 24, 24, 1)
    # where nothing covers a pixel the background shows through
    empty = out.alpha[..., 0] < 1e-6
    assert empty.any()
    assert torch.allclose(out.rgb[empty], torch.tensor([1.0, 0.0, 0.0]).expand(int(empty.sum()), 3))


def test_render_is_differentiable_for_every_parameter_group():
    model = _model(sh_degree=1)
    with torch.no_grad():  # isotropic Gaussians have no rotation gradient: make them anisotropic
        model.log_scales += torch.tensor([0.5, 0.0, -0.5])
        model.quats.copy_(torch.nn.functional.normalize(model.quats + 0.3 * torch.randn(300, 4), dim=-1))
    out = model.render(_cams(), torch.ones(3))
    (out.rgb.square().sum() + out.depth.sum()).backward()
    for name in ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest"):
        grad = getattr(model, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def _step(model, optimizer, cams, step):
    optimizer.zero_grad()
    out = model.render(cams, torch.ones(3))
    (out.rgb - 0.2).square().sum().backward()
    optimizer.step()
    model.on_step(step, out, optimizer)


@pytest.mark.parametrize("fused", [False, True], ids=["for-loop", "fused"])  # the trainer's is fused on CPU
def test_densify_clone_split_prune_keep_optimizer_consistent(fused):
    model = _model(densify=DensifyConfig(start_step=1, end_step=100, interval=2, grad_threshold=1e-9, max_gaussians=2000))
    optimizer = adam(model.param_groups(), eps=1e-15, fused=fused)
    cams = _cams()
    before = model.num_gaussians
    for step in range(1, 5):
        _step(model, optimizer, cams, step)
    assert model.num_gaussians > before
    for group in optimizer.param_groups:
        param = group["params"][0]
        assert param is getattr(model, group["name"])
        state = optimizer.state[param]
        assert state["exp_avg"].shape == param.shape and state["exp_avg_sq"].shape == param.shape
    assert model.grad_accum.shape == (model.num_gaussians,)
    _step(model, optimizer, cams, 5)  # still trains after surgery


def test_cap_and_prune_of_transparent_gaussians():
    model = _model(densify=DensifyConfig(start_step=1, end_step=100, interval=1, grad_threshold=1e-9, max_gaussians=320))
    optimizer = torch.optim.Adam(model.param_groups())
    with torch.no_grad():
        model.opacity_logits[:50] = -10.0  # opacity ~ 4.5e-5 < min_opacity
    _step(model, optimizer, _cams(), 1)
    assert model.num_gaussians <= 320
    assert (model.opacities > 0.01).all()


def test_state_dict_loads_into_a_model_of_another_size():
    model = _model(densify=DensifyConfig(start_step=1, end_step=10, interval=1, grad_threshold=1e-9))
    optimizer = torch.optim.Adam(model.param_groups())
    _step(model, optimizer, _cams(), 1)
    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    assert fresh.num_gaussians == model.num_gaussians
    assert torch.equal(fresh.means, model.means)


def test_export_ply(tmp_path):
    from lift3d.export.ply import read_ply

    model = _model(sh_degree=1)
    (path,) = model.export(tmp_path, ["ply"])
    columns = read_ply(path)
    assert len(columns["x"]) == 300 and "f_rest_8" in columns and "f_rest_9" not in columns
    assert torch.allclose(torch.from_numpy(columns["opacity"].copy()), model.opacity_logits.detach())
