"""ASD, BSD and CSD: hand computations and their Gaussian-prior invariants."""

import pytest
import torch

from guidance_stubs import cameras, hand_x_t, make_teacher, render_of
from lift3d.config import Schedule
from lift3d.guidance.asd import ASDConfig, ASDGuidance, shifted_timesteps
from lift3d.guidance.bsd import BSDConfig, BSDGuidance, balanced_combination, min_norm_coefficient
from lift3d.guidance.csm import CSDConfig, CSDGuidance
from lift3d.guidance.sds import SDSConfig, SDSGuidance


def _grad(guidance, teacher, seed=1, batch=3, step=0, rgb=None):
    rgb = torch.rand(batch, 4, 4, 3, generator=torch.Generator().manual_seed(9)) if rgb is None else rgb
    rgb = rgb.clone().requires_grad_(True)
    cams = cameras(batch)
    torch.manual_seed(seed)
    out = guidance(render_of(rgb), teacher.condition(None, cams), cams, step)
    out.loss.backward()
    return rgb, out


def _abar(teacher, t):
    return teacher.alphas_cumprod[t].view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------------------- ASD


def test_asd_gradient_matches_hand_computation():
    teacher = make_teacher()
    guidance = ASDGuidance(ASDConfig(guidance_scale=3.0, plus_ratio=0.5), teacher)
    rgb, out = _grad(guidance, teacher)
    torch.manual_seed(1)
    x0 = rgb.detach().permute(0, 3, 1, 2)
    t = guidance.timesteps.sample(3, 0, x0.device)
    delta = torch.minimum(0.5 * (t - 20).float(), (999 - t).float()) * torch.rand(3)
    t_plus = (t + delta.long()).clamp(1, 999)
    noise = torch.randn_like(x0)
    x_t, x_plus = hand_x_t(teacher, x0, noise, t), hand_x_t(teacher, x0, noise, t_plus)  # the same noise
    eps_c, eps_u = teacher.eps(x_t, t, teacher.mu_cond), teacher.eps(x_t, t, teacher.mu_uncond)
    expected = (1 - _abar(teacher, t)) * (eps_u + 3.0 * (eps_c - eps_u) - teacher.eps(x_plus, t_plus, teacher.mu_cond))
    assert torch.allclose(rgb.grad.permute(0, 3, 1, 2), expected / 3, atol=1e-5)
    assert out.logs["guidance/t_plus_mean"] == pytest.approx(float(t_plus.float().mean()))


def test_asd_with_eta_zero_is_the_classifier_score():
    """guidance.md §14.6: eta = 0 gives w (s - 1)(eps(y) - eps(0))."""
    teacher = make_teacher()
    guidance = ASDGuidance(ASDConfig(guidance_scale=4.0, plus_ratio=0.0), teacher)
    rgb, _ = _grad(guidance, teacher)
    torch.manual_seed(1)
    x0 = rgb.detach().permute(0, 3, 1, 2)
    t = guidance.timesteps.sample(3, 0, x0.device)
    torch.rand(3)  # plus_random still draws
    x_t = hand_x_t(teacher, x0, torch.randn_like(x0), t)
    classifier = teacher.eps(x_t, t, teacher.mu_cond) - teacher.eps(x_t, t, teacher.mu_uncond)
    assert torch.allclose(rgb.grad.permute(0, 3, 1, 2), (1 - _abar(teacher, t)) * 3.0 * classifier / 3, atol=1e-5)


def test_asd_shift_rule():
    t = torch.tensor([20, 500, 990])
    assert shifted_timesteps(t, 20, 0.1, False, 1000).tolist() == [20, 548, 999]
    torch.manual_seed(0)
    t = torch.randint(20, 981, (1000,))
    t_plus = shifted_timesteps(t, 20, 0.1, True, 1000)
    assert bool((t_plus >= t).all()) and bool((t_plus <= 999).all())
    assert bool((t_plus <= t + 0.1 * (t - 20)).all()) and bool((t_plus > t).any())


def test_asd_expected_gradient_points_to_the_conditional_mean():
    """Gaussian prior, s = 1: E[grad] = (f(t) - f(t+))(theta - mu_c) with f = sigma alpha / v decreasing."""
    teacher = make_teacher()
    guidance = ASDGuidance(ASDConfig(guidance_scale=1.0, plus_ratio=0.5, weighting="uniform"), teacher)
    theta = torch.rand(1, 4, 4, 3, generator=torch.Generator().manual_seed(4))
    rgb, _ = _grad(guidance, teacher, batch=4000, rgb=theta.expand(4000, -1, -1, -1))
    mean_grad = rgb.grad.sum(0).permute(2, 0, 1)  # sum of grad/B: the Monte-Carlo mean
    offset = theta[0].permute(2, 0, 1) - teacher.mu_cond
    cosine = (mean_grad * offset).sum() / (mean_grad.norm() * offset.norm())
    assert cosine > 0.95


# ----------------------------------------------------------------------------------------- BSD


def test_bsd_standard_gradient_matches_hand_computation():
    teacher = make_teacher()
    guidance = BSDGuidance(BSDConfig(variant="standard", classifier_scale=15.0), teacher)
    assert guidance.needs_unconditional
    rgb, out = _grad(guidance, teacher)
    torch.manual_seed(1)
    x0 = rgb.detach().permute(0, 3, 1, 2)
    t = guidance.timesteps.sample(3, 0, x0.device)
    x_t = hand_x_t(teacher, x0, torch.randn_like(x0), t)
    eps_c, eps_u = teacher.eps(x_t, t, teacher.mu_cond), teacher.eps(x_t, t, teacher.mu_uncond)
    g_c, g_d = 15.0 * (eps_c - eps_u), eps_u
    alpha = torch.stack([
        (((g_d[i] - g_c[i]) * g_d[i]).sum() / ((g_d[i] - g_c[i]) ** 2).sum()).clamp(0, 1) for i in range(3)
    ]).view(-1, 1, 1, 1)
    expected = _abar(teacher, t).sqrt() * (alpha * g_c + (1 - alpha) * g_d)
    assert torch.allclose(rgb.grad.permute(0, 3, 1, 2), expected / 3, atol=1e-5)
    assert out.logs["guidance/alpha_mean"] == pytest.approx(float(alpha.mean()), abs=1e-6)


def test_bsd_auto_gradient_matches_hand_computation():
    teacher = make_teacher()
    guidance = BSDGuidance(BSDConfig(variant="auto"), teacher)
    rgb, _ = _grad(guidance, teacher)
    torch.manual_seed(1)
    x0 = rgb.detach().permute(0, 3, 1, 2)
    t = guidance.timesteps.sample(3, 0, x0.device)
    noise = torch.randn_like(x0)
    x_t = hand_x_t(teacher, x0, noise, t)
    eps_c, eps_u = teacher.eps(x_t, t, teacher.mu_cond), teacher.eps(x_t, t, teacher.mu_uncond)
    g_c, g_d = eps_c - eps_u, 1.25 * (eps_u - noise)
    alpha = min_norm_coefficient(g_c, g_d).view(-1, 1, 1, 1)
    w = (eps_u - noise).norm() * (1 - _abar(teacher, t)).sqrt() / 50
    assert torch.allclose(rgb.grad.permute(0, 3, 1, 2), w * (alpha * g_c + (1 - alpha) * g_d) / 3, atol=1e-5)


def test_min_norm_combination_properties():
    """guidance.md §14.7: alpha in [0, 1], the norm bound, the argmin, a common descent direction."""
    generator = torch.Generator().manual_seed(0)
    g_c = torch.randn(64, 3, 4, 4, generator=generator)
    g_d = torch.randn(64, 3, 4, 4, generator=generator) + 0.5 * g_c * torch.rand(64, 1, 1, 1, generator=generator)
    combined, alpha = balanced_combination(g_c, g_d)
    assert bool((alpha >= 0).all()) and bool((alpha <= 1).all())
    norms = combined.flatten(1).norm(dim=1)
    assert bool((norms <= torch.minimum(g_c.flatten(1).norm(dim=1), g_d.flatten(1).norm(dim=1)) + 1e-5).all())
    grid = torch.linspace(0, 1, 2001).view(1, -1, 1)
    brute = (grid * g_c.flatten(1)[:, None] + (1 - grid) * g_d.flatten(1)[:, None]).norm(dim=2).min(dim=1).values
    assert torch.allclose(norms, brute, atol=1e-3)
    for g in (g_c, g_d):  # <m, g_i> >= ||m||^2 >= 0 for the min-norm element m
        assert bool(((combined * g).flatten(1).sum(1) >= norms**2 - 1e-4).all())


def test_equal_terms_do_not_give_nan():
    g = torch.randn(2, 3, 4, 4)
    combined, alpha = balanced_combination(g, g.clone())
    assert torch.isfinite(alpha).all() and torch.equal(alpha, torch.zeros(2))
    assert torch.equal(combined, g)
    zero = torch.zeros(2, 3, 4, 4)
    combined, alpha = balanced_combination(zero, zero)
    assert torch.isfinite(combined).all() and torch.equal(combined, zero)
    # and through the objective: a teacher whose conditional equals its unconditional, kappa = 0
    teacher = make_teacher()
    teacher.mu_uncond = teacher.mu_cond.clone()
    rgb, out = _grad(BSDGuidance(BSDConfig(variant="standard", classifier_scale=0.0), teacher), teacher)
    assert torch.isfinite(rgb.grad).all() and out.logs["guidance/nonfinite"] == 0.0


# ----------------------------------------------------------------------------------------- CSD


def test_csd_gradient_matches_hand_computation():
    teacher = make_teacher()
    config = CSDConfig(weighting="sds", cond_coefficient=Schedule(2.0), uncond_coefficient=Schedule(-1.5),
                       noise_coefficient=Schedule(0.25))
    guidance = CSDGuidance(config, teacher)
    rgb, _ = _grad(guidance, teacher)
    torch.manual_seed(1)
    x0 = rgb.detach().permute(0, 3, 1, 2)
    t = guidance.timesteps.sample(3, 0, x0.device)
    noise = torch.randn_like(x0)
    x_t = hand_x_t(teacher, x0, noise, t)
    eps_c, eps_u = teacher.eps(x_t, t, teacher.mu_cond), teacher.eps(x_t, t, teacher.mu_uncond)
    combination = 2.0 * eps_c - 1.5 * eps_u + 0.25 * noise
    assert torch.allclose(rgb.grad.permute(0, 3, 1, 2), (1 - _abar(teacher, t)) * combination / 3, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_csd_coefficients_s_one_minus_s_minus_one_reproduce_sds(scale):
    """guidance.md §14.10."""
    teacher = make_teacher()
    config = CSDConfig(weighting="sds", cond_coefficient=Schedule(scale), uncond_coefficient=Schedule(1.0 - scale),
                       noise_coefficient=Schedule(-1.0))
    rgb_csd, _ = _grad(CSDGuidance(config, teacher), teacher)
    rgb_sds, _ = _grad(SDSGuidance(SDSConfig(guidance_scale=scale), teacher), teacher)
    assert torch.allclose(rgb_csd.grad, rgb_sds.grad, atol=1e-6)


def test_csd_normalize_schedules_and_unconditional_need():
    teacher = make_teacher()
    rgb, _ = _grad(CSDGuidance(CSDConfig(normalize=True), teacher), teacher)
    assert float(rgb.grad.norm()) * 3 == pytest.approx(1.0, rel=1e-4)
    ramp = Schedule(start=0.0, end=-1.0, end_step=100, kind="linear")
    annealed = CSDGuidance(CSDConfig(uncond_coefficient=ramp), teacher)
    assert annealed.coefficients(50) == (1.0, -0.5, 0.0) and annealed.needs_unconditional
    sds_like = CSDGuidance(CSDConfig(uncond_coefficient=Schedule(0.0), noise_coefficient=Schedule(-1.0)), teacher)
    assert not sds_like.needs_unconditional
    assert CSDGuidance(CSDConfig(), teacher).needs_unconditional
