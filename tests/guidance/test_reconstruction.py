"""Explicit generation (``reconstruction``): targets sampled by the teacher's DDIM sampler, then fitted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lift3d.cameras import TurntableConfig
from lift3d.config import load_config
from lift3d.guidance.reconstruction import ReconstructionConfig, ReconstructionGuidance
from lift3d.metrics import mean_psnr
from lift3d.representations.base import RenderOutput
from lift3d.teachers.analytic import AnalyticTeacher, AnalyticTeacherConfig
from lift3d.train import Trainer

PROMPT = "a red sphere bouncing on a blue cube"
SIZE = 16


def objective(frames: int, **overrides) -> ReconstructionGuidance:
    teacher = AnalyticTeacher(AnalyticTeacherConfig(resolution=SIZE, frames_per_clip=frames))
    config = ReconstructionConfig(
        views=TurntableConfig(num_views=2, width=SIZE, height=SIZE), sampler_steps=20, guidance_scale=1.0, **overrides
    )
    return ReconstructionGuidance(config, teacher)


def fit_step(guidance: ReconstructionGuidance, state, step: int, rgb: torch.Tensor | None = None):
    cameras = guidance.own_cameras(step)
    conditioning = guidance.teacher.condition(state, cameras, with_unconditional=guidance.needs_unconditional)
    if rgb is None:
        rgb = torch.full((len(cameras), SIZE, SIZE, 3), 0.5, requires_grad=True)
    render = RenderOutput(rgb=rgb, alpha=torch.ones(len(cameras), SIZE, SIZE, 1))
    return cameras, guidance(render, conditioning, cameras, step), rgb


def test_the_first_steps_sample_every_target_clip_once_and_the_samples_match_the_truth():
    guidance = objective(frames=4, batch_size=1)
    teacher = guidance.teacher
    state = teacher.encode_prompt(PROMPT)
    assert guidance.num_samples == 2 and guidance.num_batches == 2
    for step in range(2):
        cameras, output, _ = fit_step(guidance, state, step)
        assert cameras.frames == 4 and len(cameras) == 4
        torch.testing.assert_close(cameras.times(), torch.linspace(0, 1, 4))  # a clip over the whole motion
        assert output.logs["recon/sampled"] == (step + 1) / 2
    assert bool(guidance.sampled.all()) and not guidance.needs_unconditional
    truth = teacher.ground_truth(state, guidance.target_cameras)
    assert mean_psnr(guidance.targets, truth) > 25.0  # DDIM on the exact clip score lands on the clip
    # the sampled clips move with the truth: each first frame matches t = 0 better than t = 2/3
    # (the bounce is periodic: t = 1 looks like t = 0)
    first, later = slice(0, None, 4), slice(2, None, 4)
    assert mean_psnr(guidance.targets[first], truth[first]) > mean_psnr(guidance.targets[first], truth[later]) + 1.0


def test_the_loss_is_the_pixel_error_to_the_targets_and_samples_are_kept():
    guidance = objective(frames=1, batch_size=2, loss="l2")
    state = guidance.teacher.encode_prompt(PROMPT)
    cameras, output, rgb = fit_step(guidance, state, 0)
    index = guidance.batch_indices(0)
    expected = (rgb.detach() - guidance.targets[index]).square().mean()
    torch.testing.assert_close(output.loss.detach(), expected)
    output.loss.backward()
    torch.testing.assert_close(rgb.grad, 2 * (rgb.detach() - guidance.targets[index]) / rgb.numel())
    before = guidance.targets.clone()
    fit_step(guidance, state, 5)  # a later step draws a batch; nothing is resampled
    torch.testing.assert_close(guidance.targets, before)
    _, exact, _ = fit_step(guidance, state, 0, rgb=guidance.targets[index].clone())
    assert float(exact.loss) == 0.0


def test_times_must_fill_whole_clips():
    with pytest.raises(ValueError, match="multiple of the teacher's frames_per_clip=4"):
        objective(frames=4, times=6)


def test_a_run_fits_the_samples_and_checkpoints_them(tmp_path):
    config = {
        "name": "eg4d-tiny", "prompt": PROMPT,
        "representation": {"type": "dynamic-gaussians", "num_points": 300, "init_radius": 0.9},
        "teacher": {"type": "analytic", "resolution": SIZE, "frames_per_clip": 2},
        "guidance": {"type": "reconstruction", "guidance_scale": 1.0, "sampler_steps": 10, "batch_size": 1,
                     "views": {"num_views": 2, "width": SIZE, "height": SIZE}},
        "trainer": {"steps": 3, "progress_bar": False, "log_every": 1, "eval": {"num_views": 2, "width": SIZE, "height": SIZE},
                    "eval_times": 2, "cameras": {"width": SIZE, "height": SIZE}},
        "export": {"formats": []},
    }
    path = tmp_path / "eg4d-tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    trainer = Trainer(load_config(str(path)), run_dir=tmp_path / "run")
    result = trainer.fit()
    assert bool(trainer.guidance.sampled.all()) and "eval/psnr" in result.metrics
    assert Path(tmp_path / "run" / "metrics.jsonl").read_text().count("recon/loss") == 3
    resumed = Trainer(load_config(str(path)), resume=tmp_path / "run")
    torch.testing.assert_close(resumed.guidance.targets, trainer.guidance.targets)
    assert bool(resumed.guidance.sampled.all())
