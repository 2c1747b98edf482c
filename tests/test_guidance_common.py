import pytest
import torch

from lift3d.cameras import orbit_cameras
from lift3d.config import Schedule
from lift3d.guidance.common import TimestepConfig, TimestepSampler, sanitize_gradient, surrogate_loss, weighting
from lift3d.guidance.sds import SDSConfig, SDSGuidance
from lift3d.representations.base import RenderOutput
from lift3d.teachers.base import NoisePrediction


def _cams(batch):
    return orbit_cameras(torch.zeros(batch), torch.linspace(-90, 90, batch), torch.full((batch,), 3.0),
                         torch.full((batch,), 40.0), 4, 4)


def test_surrogate_loss_gradient_is_grad_over_batch():
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    g = torch.randn(3, 2, 4, 4)
    surrogate_loss(x, g).backward()
    assert torch.allclose(x.grad, g / 3, atol=1e-6)


def test_cfg_convention_is_diffusers():
    pred = NoisePrediction(cond=torch.full((1,), 2.0), uncond=torch.full((1,), 1.0))
    assert pred.cfg(1.0).item() == 2.0
    assert pred.cfg(0.0).item() == 1.0
    assert pred.cfg(7.5).item() == 1.0 + 7.5


def test_cfg_without_unconditional_branch_only_allows_scale_one():
    pred = NoisePrediction(cond=torch.full((1,), 2.0), uncond=None)
    assert pred.cfg(1.0).item() == 2.0
    with pytest.raises(ValueError, match="unconditional branch"):
        pred.cfg(3.0)


def test_weightings():
    abar = torch.tensor([0.25, 0.81])
    assert torch.allclose(weighting("sds", abar), 1 - abar)
    assert torch.allclose(weighting("uniform", abar), torch.ones(2))
    assert torch.allclose(weighting("fantasia3d", abar), abar.sqrt() * (1 - abar))
    with pytest.raises(ValueError, match="choose one of"):
        weighting("bogus", abar)


def test_timestep_sampler_bounds_and_annealing():
    cfg = TimestepConfig(min_step_percent=Schedule(0.02),
                         max_step_percent=Schedule(start=0.98, end=0.5, start_step=100, kind="step"))
    sampler = TimestepSampler(cfg, 1000)
    assert sampler.bounds(0) == (20, 980)
    assert sampler.bounds(100) == (20, 500)
    t = sampler.sample(4096, 0, torch.device("cpu"))
    assert int(t.min()) >= 20 and int(t.max()) <= 980
    assert int(t.max()) > 900 and int(t.min()) < 100
    linear = Schedule(start=0.98, end=0.5, start_step=0, end_step=100, kind="linear")
    assert linear(50) == pytest.approx(0.74)
    assert Schedule(start=0.0, end=1.0, end_step=100, kind="sqrt")(25) == pytest.approx(0.5)


def test_nan_guard_and_clip():
    g = torch.tensor([float("nan"), float("inf"), -5.0, 0.5])
    cleaned, count = sanitize_gradient(g, 1.0)
    assert count == 2
    assert cleaned.tolist() == [0.0, 0.0, -1.0, 0.5]


def test_sds_gradient_matches_hand_computation(stub_teacher):
    torch.manual_seed(0)
    guidance = SDSGuidance(SDSConfig(guidance_scale=3.0), stub_teacher)
    rgb = torch.rand(2, 4, 4, 3, requires_grad=True)
    cams = _cams(2)
    cond = stub_teacher.condition(None, cams)
    torch.manual_seed(1)
    out = guidance(RenderOutput(rgb=rgb, alpha=torch.ones(2, 4, 4, 1)), cond, cams, step=0)
    out.loss.backward()
    # Replay the same random draws by hand.
    torch.manual_seed(1)
    x0 = rgb.detach().permute(0, 3, 1, 2)
    t = guidance.timesteps.sample(2, 0, x0.device)
    noise = torch.randn_like(x0)
    abar = stub_teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    eps_c = stub_teacher.eps(x_t, t, stub_teacher.mu_cond)
    eps_u = stub_teacher.eps(x_t, t, stub_teacher.mu_uncond)
    expected = (1 - abar) * (eps_u + 3.0 * (eps_c - eps_u) - noise) / 2
    assert torch.allclose(rgb.grad.permute(0, 3, 1, 2), expected, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_sds_fixed_point_is_the_cfg_target(stub_teacher, scale):
    """Gaussian-prior oracle: SDS descends to mu_u + s (mu_c - mu_u) whatever the weighting."""
    torch.manual_seed(0)
    guidance = SDSGuidance(SDSConfig(guidance_scale=scale, weighting="uniform"), stub_teacher)
    theta = torch.zeros(1, 4, 4, 3, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.02)
    cams = _cams(8)
    cond = stub_teacher.condition(None, cams)
    for step in range(600):
        optimizer.zero_grad()
        out = guidance(RenderOutput(rgb=theta.expand(8, -1, -1, -1), alpha=torch.ones(8, 4, 4, 1)), cond, cams, step)
        out.loss.backward()
        optimizer.step()
    target = (stub_teacher.mu_uncond + scale * (stub_teacher.mu_cond - stub_teacher.mu_uncond)).permute(1, 2, 0)
    assert (theta.detach()[0] - target).abs().mean() < 0.03
