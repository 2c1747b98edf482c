"""Student-based objectives (VSD, ESD, bootstrapped SD) on a clip teacher: the analytic clip
student, its closed-form start, and the objectives through the one loop."""

import tempfile

import pytest
import torch

from lift3d.cameras import OrbitSampler, OrbitSamplerConfig
from lift3d.config import build_run_config
from lift3d.guidance.student import student_camera_embedding
from lift3d.guidance.vsd import VSDConfig, VSDGuidance
from lift3d.representations.base import RenderOutput
from lift3d.teachers.analytic import AnalyticTeacher, AnalyticTeacherConfig, spherical_camera_embedding
from lift3d.train import Trainer

MOVING = "a red sphere bouncing on a blue cube"
RES, FRAMES, CLIPS = 16, 4, 2


def _clip_setup():
    teacher = AnalyticTeacher(AnalyticTeacherConfig(resolution=RES, frames_per_clip=FRAMES, supersample=1))
    cameras = OrbitSampler(OrbitSamplerConfig(clips_per_batch=CLIPS, clip_orbit_deg=40.0, width=RES, height=RES)).sample_clips(
        torch.Generator().manual_seed(3), FRAMES)
    conditioning = teacher.condition(teacher.encode_prompt(MOVING), cameras)
    return teacher, cameras, conditioning


def test_clip_student_starts_at_the_clip_teacher_and_runs_its_residual_frame_by_frame():
    teacher, cameras, conditioning = _clip_setup()
    student = teacher.make_student()
    camera = student_camera_embedding(student, cameras)
    # One camera row per clip: its first frame's (the clip sweeps 40 degrees, so the frames differ).
    assert torch.equal(camera, spherical_camera_embedding(cameras[::FRAMES]))
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(CLIPS, 3, FRAMES, RES, RES, generator=generator)
    t = torch.tensor([300, 700])
    exact = teacher.predict_noise(x_t, t, conditioning).cond
    assert torch.equal(student(x_t, t, conditioning, camera=camera), exact)  # zero residual at the start

    with torch.no_grad():
        student.conv_out.weight.normal_(generator=generator)
    residual = student(x_t, t, conditioning, camera=camera) - student.analytic_eps(x_t, t, conditioning)
    assert residual.shape == x_t.shape and residual.abs().max() > 0.1
    # The clip's Gaussian couples nothing across frames element-wise, and the residual's convs run on
    # one frame at a time: editing frame 2 leaves the residual of every other frame as it was.
    edited = x_t.clone()
    edited[:, :, 2] += 1.0
    moved = student(edited, t, conditioning, camera=camera) - student.analytic_eps(edited, t, conditioning)
    unchanged = [0, 1, 3]
    assert torch.allclose(moved[:, :, unchanged], residual[:, :, unchanged], atol=1e-6)
    assert not torch.allclose(moved[:, :, 2], residual[:, :, 2], atol=1e-3)


def test_vsd_on_clips_starts_as_the_classifier_free_difference():
    """With the student at the clip teacher (zero residual), VSD's gradient on x0 is
    w(t) (s - 1) (eps_c - eps_u) / B, by hand from the same draws."""
    teacher, cameras, conditioning = _clip_setup()
    guidance = VSDGuidance(VSDConfig(guidance_scale=3.0, camera_dropout=0.0), teacher)
    rgb = torch.rand(CLIPS * FRAMES, RES, RES, 3, requires_grad=True)
    torch.manual_seed(7)
    out = guidance(RenderOutput(rgb=rgb, alpha=torch.ones_like(rgb[..., :1])), conditioning, cameras, 0)
    (surrogate_grad,) = torch.autograd.grad(out.loss, rgb)

    torch.manual_seed(7)
    x0 = teacher.encode_images(rgb)
    t = guidance.timesteps.sample(CLIPS, 0, x0.device)
    noise = torch.randn_like(x0)
    prediction = teacher.predict_noise(teacher.add_noise(x0.detach(), noise, t), t, conditioning)
    abar = teacher.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    expected = (1 - abar) * (3.0 - 1.0) * (prediction.cond - prediction.uncond)
    assert expected.abs().max() > 1e-3
    (by_hand,) = torch.autograd.grad((x0 * expected).sum() / CLIPS, rgb)
    assert torch.allclose(surrogate_grad, by_hand, atol=1e-6)


@pytest.mark.parametrize("objective", ["vsd", "esd", "bootstrap"])
def test_student_objectives_train_on_clips_through_the_loop(objective):
    data = {
        "name": "clip-students", "prompt": MOVING,
        "representation": {"type": "dynamic-gaussians", "num_points": 100, "densify": {"enabled": False}},
        "teacher": {"type": "analytic", "resolution": RES},
        "guidance": {"type": "hybrid", "entries": [
            {"name": "clip", "teacher": {"type": "analytic", "resolution": RES, "frames_per_clip": FRAMES},
             "guidance": {"type": objective}},
        ]},
        "trainer": {"steps": 2, "progress_bar": False, "cameras": {"width": RES, "height": RES},
                    "eval": {"num_views": 2, "width": RES, "height": RES}},
        "export": {"formats": []},
    }
    trainer = Trainer(build_run_config(data), run_dir=tempfile.mkdtemp())
    student = trainer.guidance.objectives[0].student
    before = [p.detach().clone() for p in student.parameters()]
    for step in range(2):
        logs = trainer.train_step(step)
        assert torch.isfinite(torch.tensor(logs["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
