"""ISM, TSM and CSM: the inverted path by hand, ISM's target identity, TSM's gamma limits, oracle."""

import pytest
import torch

from guidance_stubs import cameras, cfg_target, make_teacher, optimise, render_of
from lift3d.config import Schedule
from lift3d.guidance.csm import CSMConfig, CSMGuidance
from lift3d.guidance.ddim import ddim_step
from lift3d.guidance.ism import ISMConfig, ISMGuidance, TSMConfig, TSMGuidance, trajectory_timesteps


def _grad(guidance, teacher, seed=1, batch=3, step=0):
    rgb = torch.rand(batch, 4, 4, 3, generator=torch.Generator().manual_seed(9)).requires_grad_(True)
    cams = cameras(batch)
    torch.manual_seed(seed)
    out = guidance(render_of(rgb), teacher.condition(None, cams), cams, step)
    out.loss.backward()
    return rgb, out


def test_ism_gradient_matches_hand_computation():
    teacher = make_teacher()
    config = ISMConfig(guidance_scale=2.0, delta_t=Schedule(100.0), xs_delta_t=200, xs_inv_steps=5, noise_offset=0.1)
    guidance = ISMGuidance(config, teacher)
    rgb, out = _grad(guidance, teacher)
    abar = teacher.alphas_cumprod
    torch.manual_seed(1)
    x0 = rgb.detach().permute(0, 3, 1, 2)
    t = guidance.timesteps.sample(3, 0, x0.device)
    noise = torch.randn_like(x0) + 0.1 * torch.randn(1, 3, 1, 1)
    expected = []
    for i in range(3):
        ti = int(t[i])
        s = max(ti - 100, 0)
        a = max(s - 1000, 0)
        x = abar[a].sqrt() * x0[i : i + 1] + (1 - abar[a]).sqrt() * noise[i : i + 1]
        for _ in range(5):  # inversion a -> s in steps of 200 with the unconditional eps
            if a == s:
                break
            b = min(a + 200, s)
            x = ddim_step(x, teacher.eps(x, torch.tensor([a]), teacher.mu_uncond), abar[[a]], abar[[b]])
            a = b
        e_s = teacher.eps(x, torch.tensor([s]), teacher.mu_uncond)
        x_t = ddim_step(x, e_s, abar[[s]], abar[[ti]])
        tt = torch.tensor([ti])
        eps_c, eps_u = teacher.eps(x_t, tt, teacher.mu_cond), teacher.eps(x_t, tt, teacher.mu_uncond)
        w = ((1 - abar[ti]) / abar[ti]).sqrt()
        expected.append(w * (eps_u + 2.0 * (eps_c - eps_u) - e_s))
    assert torch.allclose(rgb.grad.permute(0, 3, 1, 2), torch.cat(expected) / 3, atol=1e-4, rtol=1e-4)
    assert out.logs["guidance/delta_t"] == pytest.approx(float((t - (t - 100).clamp_min(0)).float().mean()))


def test_ism_target_is_the_prediction_that_produced_x_t():
    """guidance.md §14.8: x_t and x_s share x0_hat under the target; stepping back returns x_s."""
    teacher = make_teacher()
    teacher.alphas_cumprod = teacher.alphas_cumprod.double()
    guidance = ISMGuidance(ISMConfig(delta_t=Schedule(80.0)), teacher)
    x0 = torch.rand(4, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([30, 200, 500, 980])
    cams = cameras(4)
    latents = guidance.interval_latents(x0, torch.randn_like(x0), t, 0, teacher.condition(None, cams))
    assert latents.s.tolist() == [0, 120, 420, 900]
    abar = teacher.alphas_cumprod
    back = ddim_step(latents.x_t, latents.eps_s, abar[t], abar[latents.s])
    assert torch.allclose(back, latents.x_s, atol=1e-10)

    def x0_hat(x, timesteps):
        a = abar[timesteps].view(-1, 1, 1, 1)
        return (x - (1 - a).sqrt() * latents.eps_s) / a.sqrt()

    x0_from_t, x0_from_s = x0_hat(latents.x_t, t), x0_hat(latents.x_s, latents.s)
    assert torch.allclose(x0_from_t, x0_from_s, atol=1e-10)


def test_tsm_with_gamma_one_is_ism_bit_for_bit():
    teacher = make_teacher()
    rgb_ism, out_ism = _grad(ISMGuidance(ISMConfig(guidance_scale=2.0), teacher), teacher)
    rgb_tsm, out_tsm = _grad(TSMGuidance(TSMConfig(guidance_scale=2.0, gamma=1.0), teacher), teacher)
    assert torch.equal(rgb_ism.grad, rgb_tsm.grad)
    assert torch.equal(out_ism.loss, out_tsm.loss)


def test_tsm_with_gamma_zero_targets_the_unconditional_eps_at_x_t_and_equals_csm():
    teacher = make_teacher()
    guidance = TSMGuidance(TSMConfig(guidance_scale=2.0, gamma=0.0), teacher)
    x0 = torch.rand(3, 3, 4, 4)
    t = torch.tensor([50, 400, 900])
    conditioning = teacher.condition(None, cameras(3))
    latents = guidance.interval_latents(x0, torch.randn_like(x0), t, 0, conditioning)
    prediction = teacher.predict_noise(latents.x_t, t, conditioning)
    target = guidance.target(latents, prediction, conditioning)
    assert torch.allclose(target, teacher.eps(latents.x_t, t, teacher.mu_uncond), atol=1e-6)
    # CSM (our reading of TV-3DG) is TSM with gamma = 0: w s (eps(y) - eps(0)) on the inverted x_t
    rgb_tsm, _ = _grad(guidance, teacher)
    rgb_csm, _ = _grad(CSMGuidance(CSMConfig(guidance_scale=2.0), teacher), teacher)
    assert torch.allclose(rgb_tsm.grad, rgb_csm.grad, atol=1e-5)


def test_trajectory_timesteps():
    s, t = torch.tensor([0, 100, 400]), torch.tensor([80, 200, 500])
    assert trajectory_timesteps(s, t, 1.0).tolist() == s.tolist()
    assert trajectory_timesteps(s, t, 0.0).tolist() == t.tolist()
    assert trajectory_timesteps(s, t, 0.3).tolist() == [76, 195, 495]  # s + 0.9539 (t - s), rounded


def test_tsm_intermediate_gamma_uses_the_second_path():
    teacher = make_teacher()
    guidance = TSMGuidance(TSMConfig(gamma=0.6), teacher)
    x0 = torch.rand(2, 3, 4, 4)
    t = torch.tensor([300, 700])
    conditioning = teacher.condition(None, cameras(2))
    latents = guidance.interval_latents(x0, torch.randn_like(x0), t, 0, conditioning)
    mu = trajectory_timesteps(latents.s, t, 0.6)
    abar = teacher.alphas_cumprod
    x_mu = ddim_step(latents.x_s, latents.eps_s, abar[latents.s], abar[mu])
    target = guidance.target(latents, teacher.predict_noise(latents.x_t, t, conditioning), conditioning)
    assert torch.allclose(target, teacher.eps(x_mu, mu, teacher.mu_uncond), atol=1e-6)


@pytest.mark.parametrize("guidance_cls, config", [(ISMGuidance, ISMConfig(weighting="uniform")),
                                                  (TSMGuidance, TSMConfig(weighting="uniform"))])
def test_interval_objectives_descend_to_the_mean_when_the_inversion_branch_agrees(guidance_cls, config):
    """Gaussian-prior oracle: with eps(0) = eps(y) (the inversion runs on the target's own
    distribution) the deterministic path is unbiased and ISM / TSM descend to mu.

    sigma_d = 0.5: with a sharp prior (sigma_d = 0.1) TSM's expected gradient is *anti*-descent for
    t < delta_T (s clamps to 0 and both paths extrapolate from x_0), and that region outweighs the
    tiny positive signal elsewhere (mu is within 5% of t), so TSM drifts away; ISM converges either way.
    """
    teacher = make_teacher(sigma_data=0.5)
    teacher.mu_uncond = teacher.mu_cond.clone()
    theta = optimise(guidance_cls(config, teacher), teacher, steps=300, lr=0.02)
    assert (theta - cfg_target(teacher, 1.0)).abs().mean() < 0.03


def test_interval_objectives_always_need_the_unconditional_branch():
    teacher = make_teacher()
    for guidance in (ISMGuidance(ISMConfig(guidance_scale=1.0), teacher), CSMGuidance(CSMConfig(), teacher)):
        assert guidance.needs_unconditional
        cams = cameras(2)
        conditioning = teacher.condition(None, cams, with_unconditional=False)
        with pytest.raises(ValueError, match="unconditional"):
            guidance(render_of(torch.rand(2, 4, 4, 3)), conditioning, cams, 0)


def test_conditional_inversion_needs_no_unconditional_branch():
    """s_inv = 0 inverts with eps(y); with s = 1 ISM then runs on the conditional branch alone."""
    teacher = make_teacher()
    guidance = ISMGuidance(ISMConfig(guidance_scale=1.0, inversion_guidance_scale=0.0), teacher)
    assert not guidance.needs_unconditional
    x = torch.rand(2, 3, 4, 4)
    t = torch.tensor([100, 600])
    full = teacher.condition(None, cameras(2))
    assert torch.allclose(guidance.inversion_eps(x, t, full), teacher.eps(x, t, teacher.mu_cond))
    cams = cameras(2)
    out = guidance(render_of(torch.rand(2, 4, 4, 3)), teacher.condition(None, cams, with_unconditional=False), cams, 0)
    assert torch.isfinite(out.loss)
    # reverse CFG in between: eps(y) + s_inv (eps(0) - eps(y))
    half = ISMGuidance(ISMConfig(inversion_guidance_scale=0.5), teacher)
    e_c, e_u = teacher.eps(x, t, teacher.mu_cond), teacher.eps(x, t, teacher.mu_uncond)
    assert torch.allclose(half.inversion_eps(x, t, full), e_c + 0.5 * (e_u - e_c), atol=1e-6)
