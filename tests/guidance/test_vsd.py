"""VSD / ESD: hand computation, the optimal-student = SDS identity, ESD linearity, particles, oracle."""

import pytest
import torch
import torch.nn.functional as F

from guidance_stubs import (
    DiracStudent,
    GaussianStudent,
    StubStudent,
    cameras,
    cfg_target,
    hand_x_t,
    make_teacher,
    optimise,
    render_of,
)
from lift3d.config import ConfigError, load_config
from lift3d.guidance.sds import SDSConfig, SDSGuidance
from lift3d.guidance.student import drop_cameras, student_camera_embedding
from lift3d.guidance.vsd import ESDConfig, ESDGuidance, VSDConfig, VSDGuidance
from lift3d.teachers.analytic import spherical_camera_embedding


def _set_student(student, a=0.3, seed=5):
    with torch.no_grad():
        student.a.fill_(a)
        student.camera_weight.copy_(torch.randn(4, 3, generator=torch.Generator().manual_seed(seed)))


def _run(guidance, rgb, cams, conditioning, seed=1, step=0):
    torch.manual_seed(seed)
    out = guidance(render_of(rgb), conditioning, cams, step)
    out.loss.backward()
    return out


@pytest.mark.parametrize("lora_scale", [1.0, 2.0])
def test_vsd_gradient_and_student_loss_match_hand_computation(lora_scale):
    teacher = make_teacher(StubStudent)
    guidance = VSDGuidance(VSDConfig(guidance_scale=3.0, guidance_scale_lora=lora_scale, camera_dropout=0.5), teacher)
    _set_student(guidance.student)
    rgb = torch.rand(3, 4, 4, 3, requires_grad=True)
    cams = cameras(3)
    conditioning = teacher.condition(None, cams)
    out = _run(guidance, rgb, cams, conditioning)

    torch.manual_seed(1)
    x0 = rgb.detach().permute(0, 3, 1, 2)
    t = guidance.timesteps.sample(3, 0, x0.device)
    noise = torch.randn_like(x0)
    x_t = hand_x_t(teacher, x0, noise, t)
    eps_c, eps_u = teacher.eps(x_t, t, teacher.mu_cond), teacher.eps(x_t, t, teacher.mu_uncond)
    camera = spherical_camera_embedding(cams)
    W = guidance.student.camera_weight.detach()
    student_no_cam = eps_c + 0.3 * x_t
    student_cam = student_no_cam + (camera @ W)[:, :, None, None]
    eps_est = student_no_cam + lora_scale * (student_cam - student_no_cam)
    abar = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = (1 - abar) * (eps_u + 3.0 * (eps_c - eps_u) - eps_est) / 3
    assert torch.allclose(rgb.grad.permute(0, 3, 1, 2), expected, atol=1e-5)

    # the student's denoising loss: full-range t, fresh noise, camera rows dropped with p = 0.5
    t2 = torch.randint(0, 1000, (3,))
    noise2 = torch.randn_like(x0)
    keep = (torch.rand(3) >= 0.5).float()
    x_t2 = hand_x_t(teacher, x0, noise2, t2)
    a = torch.tensor(0.3, requires_grad=True)
    W2 = W.clone().requires_grad_(True)
    prediction = teacher.eps(x_t2, t2, teacher.mu_cond) + a * x_t2 + ((camera * keep[:, None]) @ W2)[:, :, None, None]
    hand_loss = F.mse_loss(prediction, noise2)
    hand_loss.backward()
    assert out.logs["guidance/student_loss"] == pytest.approx(float(hand_loss.detach()), rel=1e-5)
    assert torch.allclose(guidance.student.a.grad, a.grad, atol=1e-6)
    assert torch.allclose(guidance.student.camera_weight.grad, W2.grad, atol=1e-6)


def test_vsd_with_the_optimal_student_of_a_deterministic_render_is_sds():
    """eps_phi == the injected noise (guidance.md §14.4): VSD's render gradient equals SDS's."""
    teacher = make_teacher(DiracStudent)
    vsd = VSDGuidance(VSDConfig(guidance_scale=2.5, student_camera=False), teacher)
    sds = SDSGuidance(SDSConfig(guidance_scale=2.5), teacher)
    rgb_v = torch.rand(2, 4, 4, 3, requires_grad=True)
    rgb_s = rgb_v.detach().clone().requires_grad_(True)
    vsd.student.render = rgb_v.detach().permute(0, 3, 1, 2)
    cams = cameras(2)
    conditioning = teacher.condition(None, cams)
    _run(vsd, rgb_v, cams, conditioning)
    _run(sds, rgb_s, cams, conditioning)
    assert torch.allclose(rgb_v.grad, rgb_s.grad, atol=1e-5)


def test_esd_with_lambda_zero_is_vsd_bit_for_bit():
    grads = []
    for guidance_cls, config in ((VSDGuidance, VSDConfig(guidance_scale=2.0)),
                                 (ESDGuidance, ESDConfig(guidance_scale=2.0, entropy_weight=0.0))):
        teacher = make_teacher(StubStudent)
        guidance = guidance_cls(config, teacher)
        _set_student(guidance.student)
        rgb = torch.rand(2, 4, 4, 3, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        cams = cameras(2)
        out = _run(guidance, rgb, cams, teacher.condition(None, cams))
        grads.append((rgb.grad, guidance.student.camera_weight.grad, out.loss.detach()))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


def test_esd_gradient_is_linear_in_lambda():
    grads = {}
    for lam in (0.0, 0.5, 1.0):
        teacher = make_teacher(StubStudent)
        guidance = ESDGuidance(ESDConfig(guidance_scale=2.0, entropy_weight=lam), teacher)
        _set_student(guidance.student)
        rgb = torch.rand(2, 4, 4, 3, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        cams = cameras(2)
        _run(guidance, rgb, cams, teacher.condition(None, cams))
        grads[lam] = rgb.grad
    assert torch.allclose(grads[0.5], 0.5 * (grads[0.0] + grads[1.0]), atol=1e-6)
    assert not torch.allclose(grads[0.0], grads[1.0])
    # lambda = 1: the camera-free student score only
    teacher = make_teacher(StubStudent)
    camera_free = VSDGuidance(VSDConfig(guidance_scale=2.0, student_camera=False), teacher)
    _set_student(camera_free.student)
    rgb = torch.rand(2, 4, 4, 3, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    cams = cameras(2)
    _run(camera_free, rgb, cams, teacher.condition(None, cams))
    assert torch.allclose(rgb.grad, grads[1.0], atol=1e-6)


def test_particles_share_the_student_and_each_gets_its_own_gradient():
    teacher = make_teacher(StubStudent)
    guidance = VSDGuidance(VSDConfig(guidance_scale=2.0), teacher)
    _set_student(guidance.student)
    cams = [cameras(2), cameras(2)[[1, 0]]]
    conds = [teacher.condition(None, c) for c in cams]
    rgbs = [torch.rand(2, 4, 4, 3, requires_grad=True) for _ in range(2)]
    torch.manual_seed(7)
    out = guidance.forward_particles([render_of(r) for r in rgbs], conds, cams, step=0)
    out.loss.backward()
    # The same RNG stream through two single-particle calls.
    singles = [r.detach().clone().requires_grad_(True) for r in rgbs]
    torch.manual_seed(7)
    student_losses = []
    for rgb, cond, cam in zip(singles, conds, cams):
        single = guidance(render_of(rgb), cond, cam, 0)
        single.loss.backward()
        student_losses.append(single.logs["guidance/student_loss"])
    for joint, single in zip(rgbs, singles):
        assert torch.allclose(joint.grad, single.grad, atol=1e-6)
    assert out.logs["guidance/student_loss"] == pytest.approx(sum(student_losses) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="one conditioning"):
        guidance.forward_particles([render_of(rgbs[0])], conds, cams, 0)


def test_vsd_fixed_point_is_the_cfg_target_with_a_gaussian_student():
    """Gaussian-prior oracle: with a student that can fit the render distribution, VSD descends to
    mu_u + s (mu_c - mu_u) (the render gradient is w sigma alpha (m - target) / v, so the render
    moves only as the student's mean m follows it), and m ends at the render."""
    teacher = make_teacher(GaussianStudent)
    config = VSDConfig(guidance_scale=2.0, weighting="uniform", student_lr=0.05, student_samples=4)
    guidance = VSDGuidance(config, teacher)
    theta = optimise(guidance, teacher, steps=600, lr=0.01)
    assert (theta - cfg_target(teacher, 2.0)).abs().mean() < 0.03
    assert (guidance.student.mean.detach() - theta).abs().mean() < 0.04


def test_camera_embedding_lookup_order():
    cams = cameras(2)

    class WithProtocol(torch.nn.Module):
        def camera_embedding_of(self, cameras):
            return torch.ones(len(cameras), 7)

        def camera_features(self, cameras):
            raise AssertionError("camera_embedding_of comes first")

    class WithFeatures(torch.nn.Module):
        @staticmethod
        def camera_features(cameras):
            return cameras.c2w.reshape(len(cameras), 16)

    assert torch.equal(student_camera_embedding(WithProtocol(), cams), torch.ones(2, 7))
    assert torch.equal(student_camera_embedding(WithFeatures(), cams), cams.c2w.reshape(2, 16))
    assert torch.equal(student_camera_embedding(torch.nn.Linear(1, 1), cams), spherical_camera_embedding(cams))


def test_camera_dropout():
    camera = torch.ones(4000, 3)
    assert torch.equal(drop_cameras(camera, 0.0), camera)
    assert drop_cameras(camera, 1.0).abs().sum() == 0
    torch.manual_seed(0)
    dropped = drop_cameras(camera, 0.1)
    fraction = float((dropped.abs().sum(1) == 0).float().mean())
    assert 0.08 < fraction < 0.12
    assert set(dropped.unique().tolist()) == {0.0, 1.0}  # whole rows, unchanged otherwise


def test_param_groups_and_state_dict_hold_the_student():
    teacher = make_teacher(StubStudent)
    guidance = VSDGuidance(VSDConfig(student_lr=3e-3, student_weight_decay=0.0), teacher)
    (group,) = guidance.param_groups()
    assert group["lr"] == 3e-3 and group["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == {id(p) for p in guidance.student.parameters()}
    assert "student.a" in guidance.state_dict()


def test_bad_student_options_fail_in_config():
    with pytest.raises(ConfigError, match="camera_dropout"):
        load_config("configs/quickstart.yaml", ["guidance.type=vsd", "guidance.camera_dropout=2.0"])
    with pytest.raises(ConfigError, match="student_lr"):
        load_config("configs/quickstart.yaml", ["guidance.type=esd", "guidance.student_lr=0"])


def test_student_sees_the_view_independent_payload_when_there_is_one():
    teacher = make_teacher(StubStudent)
    guidance = VSDGuidance(VSDConfig(guidance_scale=1.0, camera_dropout=0.0), teacher)
    cams = cameras(2)
    plain = teacher.condition(None, cams)
    tagged = teacher.condition(None, cams)
    tagged.cond = teacher.mu_uncond  # the "view-dependent" payload the teacher judges with
    tagged.view_independent = teacher.mu_cond  # the plain prompt, for the student
    rgb = torch.rand(2, 4, 4, 3)
    grads = []
    for conditioning, target_mu in ((plain, teacher.mu_cond), (tagged, teacher.mu_uncond)):
        theta = rgb.clone().requires_grad_(True)
        torch.manual_seed(0)
        guidance(render_of(theta), conditioning, cams, 0).loss.backward()
        torch.manual_seed(0)
        x0 = rgb.permute(0, 3, 1, 2)
        t = guidance.timesteps.sample(2, 0, x0.device)
        x_t = hand_x_t(teacher, x0, torch.randn_like(x0), t)
        abar = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        expected = (1 - abar) * (teacher.eps(x_t, t, target_mu) - teacher.eps(x_t, t, teacher.mu_cond)) / 2
        assert torch.allclose(theta.grad.permute(0, 3, 1, 2), expected, atol=1e-6)
        grads.append(theta.grad)
    assert grads[0].abs().max() < 1e-6  # student == teacher at s = 1: no gradient (up to CFG rounding)
