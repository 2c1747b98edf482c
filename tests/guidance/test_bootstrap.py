"""Bootstrapped score distillation: the alternation, the SDEdit cache, eps_B's loss and the gradient."""

import pytest
import torch
import torch.nn.functional as F

from guidance_stubs import StubStudent, cameras, hand_x_t, make_teacher, render_of
from lift3d.config import Schedule
from lift3d.guidance.bootstrap import BootstrapConfig, BootstrapGuidance
from lift3d.guidance.ddim import ddim_sample


def _set(student, a):
    with torch.no_grad():
        student.a.fill_(a)


def test_alternation_schedule():
    guidance = BootstrapGuidance(BootstrapConfig(period=10, pretrain_fraction=0.2), make_teacher())
    assert [guidance.is_pretrain_step(s) for s in range(12)] == [True, True] + [False] * 8 + [True, True]


def test_pretrain_step_augments_trains_only_the_copy_and_matches_hand_computation():
    teacher = make_teacher()
    config = BootstrapConfig(guidance_scale=2.0, period=10, augment_steps=10, text_dropout=0.0,
                             augment_noise_percent=Schedule(0.5))
    guidance = BootstrapGuidance(config, teacher)
    _set(guidance.student, 0.2)
    rgb = torch.rand(2, 4, 4, 3, requires_grad=True)
    cams = cameras(2)
    conditioning = teacher.condition(None, cams)
    torch.manual_seed(1)
    out = guidance(render_of(rgb), conditioning, cams, step=0)
    out.loss.backward()
    assert rgb.grad is None  # the scene is not touched in a pretrain step
    assert out.logs["guidance/pretrain"] == 1.0 and len(guidance.cache) == 1

    torch.manual_seed(1)
    x0 = rgb.detach().permute(0, 3, 1, 2)
    start = torch.full((2,), 500)
    noisy = hand_x_t(teacher, x0, torch.randn_like(x0), start)

    def eps_fn(x, t):
        e_c, e_u = teacher.eps(x, t, teacher.mu_cond), teacher.eps(x, t, teacher.mu_uncond)
        return e_u + 2.0 * (e_c - e_u)

    augmented = ddim_sample(eps_fn, noisy, start, 5, teacher.alphas_cumprod)  # ceil(10 * 500 / 1000) steps
    assert torch.allclose(guidance.cache[0][0], augmented, atol=1e-6)
    torch.randint(1, ())  # the cache pick
    torch.rand(())  # the dropout draw
    t = torch.randint(0, 1000, (2,))
    noise = torch.randn_like(x0)
    x_t = hand_x_t(teacher, augmented, noise, t)
    a = torch.tensor(0.2, requires_grad=True)
    hand = F.mse_loss(teacher.eps(x_t, t, teacher.mu_cond) + a * x_t, noise)
    hand.backward()
    assert out.logs["guidance/pretrain_loss"] == pytest.approx(float(hand.detach()), rel=1e-5)
    assert torch.allclose(guidance.student.a.grad, a.grad, atol=1e-6)


def test_distillation_step_matches_hand_computation():
    teacher = make_teacher()
    guidance = BootstrapGuidance(BootstrapConfig(guidance_scale=3.0, period=10, pretrain_fraction=0.1), teacher)
    _set(guidance.student, 0.25)
    rgb = torch.rand(2, 4, 4, 3, requires_grad=True)
    cams = cameras(2)
    torch.manual_seed(1)
    out = guidance(render_of(rgb), teacher.condition(None, cams), cams, step=5)
    out.loss.backward()
    assert out.logs["guidance/pretrain"] == 0.0
    torch.manual_seed(1)
    x0 = rgb.detach().permute(0, 3, 1, 2)
    t = guidance.timesteps.sample(2, 5, x0.device)
    noise = torch.randn_like(x0)
    x_t = hand_x_t(teacher, x0, noise, t)
    e_c = teacher.eps(x_t, t, teacher.mu_cond) + 0.25 * x_t  # eps_B(y)
    e_u = teacher.eps(x_t, t, teacher.mu_uncond) + 0.25 * x_t  # eps_B(0): the copy on the unconditional payload
    abar = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = (1 - abar) * (e_u + 3.0 * (e_c - e_u) - noise) / 2
    assert torch.allclose(rgb.grad.permute(0, 3, 1, 2), expected, atol=1e-5)


def test_cache_is_fifo_and_the_estimator_is_a_second_student():
    teacher = make_teacher()
    config = BootstrapConfig(guidance_scale=1.0, period=100, pretrain_fraction=0.5, augment_every=1, cache_size=2,
                             augment_steps=2, use_estimator=True)
    guidance = BootstrapGuidance(config, teacher)
    assert guidance.estimator is not None and guidance.estimator is not guidance.student
    assert [g["name"] for g in guidance.param_groups()] == ["bootstrap", "estimator"]
    assert not guidance.needs_unconditional
    cams = cameras(2)
    conditioning = teacher.condition(None, cams, with_unconditional=False)
    renders = [torch.full((2, 4, 4, 3), v) for v in (0.1, 0.5, 0.9)]
    for step, rgb in enumerate(renders):
        guidance(render_of(rgb), conditioning, cams, step)
    assert len(guidance.cache) == 2  # the oldest of three augmented batches is gone
    # a distillation step subtracts the estimator's score and adds its denoising loss
    rgb = torch.rand(2, 4, 4, 3, requires_grad=True)
    out = guidance(render_of(rgb), conditioning, cams, 60)
    out.loss.backward()
    assert "guidance/student_loss" in out.logs and rgb.grad is not None
    assert guidance.estimator.camera_weight.grad is not None


def test_estimator_needs_a_teacher_that_can_make_two_students():
    class OneStudentTeacher(type(make_teacher())):
        made = False

        def make_student(self):
            if self.made:
                raise RuntimeError("this teacher already has a student")
            self.made = True
            return StubStudent(self)

    base = make_teacher()
    teacher = OneStudentTeacher(base.mu_cond, base.mu_uncond)
    with pytest.raises(ValueError, match="second student"):
        BootstrapGuidance(BootstrapConfig(use_estimator=True), teacher)
