"""DDIM inversion/sampling utility: exact single-step inverse, round trips, per-sample timesteps."""

import pytest
import torch

from guidance_stubs import cameras, make_teacher
from lift3d.guidance.ddim import CLEAN, abar_at, ddim_invert, ddim_sample, ddim_step, ddim_walk
from lift3d.teachers.analytic import AnalyticTeacher, AnalyticTeacherConfig


def _eps_fn(teacher, mu):
    return lambda x, t: teacher.eps(x, t, mu)


def test_inversion_step_then_sampling_step_with_the_same_eps_is_exact():
    teacher = make_teacher()
    torch.manual_seed(0)
    x_a = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x_a)
    abar = teacher.alphas_cumprod.double()
    a, b = torch.tensor([10, 300, 700]), torch.tensor([200, 500, 990])
    x_b = ddim_step(x_a, eps, abar[a], abar[b])
    assert torch.allclose(ddim_step(x_b, eps, abar[b], abar[a]), x_a, atol=1e-10)
    # and it is the DDIM formula: x_b = sqrt(abar_b) x0_hat + sqrt(1 - abar_b) eps
    x0_hat = (x_a - (1 - abar[a]).sqrt().view(-1, 1, 1, 1) * eps) / abar[a].sqrt().view(-1, 1, 1, 1)
    expected = abar[b].sqrt().view(-1, 1, 1, 1) * x0_hat + (1 - abar[b]).sqrt().view(-1, 1, 1, 1) * eps
    assert torch.allclose(x_b, expected, atol=1e-12)


def test_clean_timestep_has_abar_one():
    abar = make_teacher().alphas_cumprod
    values = abar_at(abar, torch.tensor([CLEAN, 0, 999]))
    assert values[0] == 1.0 and values[1] == abar[0] and values[2] == abar[999]


def test_round_trip_on_the_gaussian_stub_teacher():
    """Invert x0 from t=20 to t=600, sample back on the same grid: the start comes back, with the
    first-order error of DDIM (halving the step halves the error)."""
    teacher = make_teacher(sigma_data=0.5)
    abar = teacher.alphas_cumprod.double()
    mu = teacher.mu_uncond.double()

    def eps_fn(x, t):
        a = abar[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * 0.25 + 1 - a)

    torch.manual_seed(0)
    x0 = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    start, end = torch.full((2,), 20), torch.full((2,), 600)
    errors = []
    for step in (4, 2):
        forward = ddim_invert(eps_fn, x0, start, end, step, abar)
        assert forward.evaluations == 580 // step
        assert (forward.x - x0).abs().max() > 0.5  # it did go somewhere
        back = ddim_sample(eps_fn, forward.x, end, forward.evaluations, abar, end=start)
        errors.append(float((back - x0).abs().max()))
    assert errors[1] < 0.01
    assert errors[1] < 0.6 * errors[0]


def test_round_trip_on_the_analytic_teacher():
    teacher = AnalyticTeacher(AnalyticTeacherConfig(resolution=8, supersample=1))
    state = teacher.encode_prompt("a red sphere")
    cams = cameras(2, 8)
    conditioning = teacher.condition(state, cams, with_unconditional=False)
    x0 = teacher.reference_images(state.scene, cams.with_resolution(8, 8)) + 0.05 * torch.randn(2, 3, 8, 8)

    def eps_fn(x, t):
        return teacher.predict_noise(x, t, conditioning).cond

    start, end = torch.full((2,), 20), torch.full((2,), 400)
    inverted = ddim_invert(eps_fn, x0, start, end, 4, teacher.alphas_cumprod).x
    back = ddim_sample(eps_fn, inverted, end, 95, teacher.alphas_cumprod, end=start)
    assert (back - x0).abs().mean() < 0.02


def test_walk_handles_per_sample_timesteps_and_keeps_arrived_samples():
    teacher = make_teacher()
    calls = []

    def eps_fn(x, t):
        calls.append(t.clone())
        return teacher.eps(x, t, teacher.mu_uncond)

    x = torch.rand(3, 3, 4, 4)
    start = torch.tensor([0, 100, 250])
    end = torch.tensor([250, 250, 250])
    path = ddim_walk(eps_fn, x, start, end, 100, teacher.alphas_cumprod)
    assert path.evaluations == 3
    assert calls[0].tolist() == [0, 100, 250] and calls[1].tolist() == [100, 200, 250]
    assert calls[2].tolist() == [200, 250, 250]
    assert torch.equal(path.x[2], x[2])  # already at its end: untouched bit for bit
    assert path.last_t.tolist() == [200, 200, 250]  # sample 2 never moved: the prediction at its start
    # sample 1 went 100 -> 200 -> 250: replay by hand
    abar = teacher.alphas_cumprod
    x1 = x[1:2]
    for a, b in ((100, 200), (200, 250)):
        x1 = ddim_step(x1, teacher.eps(x1, torch.tensor([a]), teacher.mu_uncond), abar[[a]], abar[[b]])
    assert torch.allclose(path.x[1:2], x1, atol=1e-6)


def test_max_steps_stops_early_and_sampling_reaches_clean():
    teacher = make_teacher()
    eps_fn = _eps_fn(teacher, teacher.mu_uncond)
    x = torch.rand(1, 3, 4, 4)
    path = ddim_invert(eps_fn, x, torch.tensor([0]), torch.tensor([1000 - 1]), 100, teacher.alphas_cumprod, max_steps=2)
    assert path.evaluations == 2
    # sampling to clean: the last step returns x0_hat = (x - sigma eps) / alpha
    t = torch.tensor([300])
    one_step = ddim_sample(eps_fn, x, t, 1, teacher.alphas_cumprod)
    abar = teacher.alphas_cumprod[300]
    assert torch.allclose(one_step, (x - (1 - abar).sqrt() * eps_fn(x, t)) / abar.sqrt(), atol=1e-6)


def test_bad_directions_are_errors():
    teacher = make_teacher()
    eps_fn = _eps_fn(teacher, teacher.mu_uncond)
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match="end >= start"):
        ddim_invert(eps_fn, x, torch.tensor([10]), torch.tensor([5]), 1, teacher.alphas_cumprod)
    with pytest.raises(ValueError, match="end <= start"):
        ddim_sample(eps_fn, x, torch.tensor([10]), 2, teacher.alphas_cumprod, end=torch.tensor([20]))
    with pytest.raises(ValueError, match="positive"):
        ddim_walk(eps_fn, x, torch.tensor([0]), torch.tensor([5]), 0, teacher.alphas_cumprod)
