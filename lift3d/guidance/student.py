"""Helpers for objectives that own a trainable student (VSD, ESD, bootstrapped SD).

A student is what ``Teacher.make_student()`` returns: an ``nn.Module`` called as
``student(x_t, t, conditioning, camera=<embedding [B, D] or None>)`` that returns eps
[B, C, h, w] and starts equal to the teacher's conditional prediction (a zero-initialised LoRA
for Stable Diffusion, a zero-initialised conv residual for the analytic teacher).

The camera embedding is student specific, so guidance code asks the student for it
(:func:`student_camera_embedding`):

1. ``student.camera_embedding_of(cameras) -> [B, D]`` when the student defines it (the
   protocol we propose every student implements);
2. else ``student.camera_features(cameras)`` (``DiffusersStudent``: the flattened 4x4 c2w);
3. else :func:`lift3d.teachers.analytic.spherical_camera_embedding` (``AnalyticStudent``:
   ``[elevation_rad, sin azimuth, cos azimuth, distance]``).

The "no camera" input (threestudio's ``cam = 0`` branch, which camera dropout trains) is the
zero embedding; both built-in students treat a zero row exactly as ``camera=None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lift3d.cameras import Cameras
from lift3d.config import Schedule
from lift3d.guidance.common import TimestepConfig, TimestepSampler
from lift3d.teachers.analytic import spherical_camera_embedding
from lift3d.teachers.base import Conditioning, NoisePrediction, Teacher


def full_range_timesteps() -> TimestepConfig:
    """t ~ U{0, ..., T-1}: the student's denoising loss ignores the annealed range (threestudio ``train_lora``)."""
    return TimestepConfig(min_step_percent=Schedule(0.0), max_step_percent=Schedule(1.0))


@dataclass
class StudentConfig:
    """How the objective trains its student (threestudio's LoRA settings unless noted)."""

    student_lr: float = 1e-3
    """Learning rate of the student's parameters: 1e-3 suits the analytic student (measured on the quickstart);
    threestudio's ``prolificdreamer.yaml`` uses 1e-4 for the SD LoRA, as the SD presets here do."""
    student_weight_decay: float = 0.0
    """AdamW weight decay of the student (0 keeps a zero-initialised residual from being pulled anywhere)."""
    student_loss_weight: float = 1.0
    """Weight of the student's denoising loss in the returned loss (threestudio ``lambda_lora``)."""
    student_timesteps: TimestepConfig = field(default_factory=full_range_timesteps)
    """Timesteps of the student's denoising loss (the full range by default)."""
    student_samples: int = 1
    """Timestep samples per render in the denoising loss (threestudio ``lora_n_timestamp_samples``)."""

    def validate_student(self) -> None:
        """Raise ``ValueError`` naming the first bad student field."""
        if self.student_lr <= 0:
            raise ValueError(f"guidance.student_lr must be positive, got {self.student_lr}")
        if self.student_samples < 1:
            raise ValueError(f"guidance.student_samples must be >= 1, got {self.student_samples}")


def student_camera_embedding(student: nn.Module, cameras: Cameras) -> Tensor:
    """The camera input [B, D] this student expects (lookup order in the module docstring); for
    clips of F frames one row per clip, its first frame's camera (the clip's view label too)."""
    if cameras.frames > 1:
        cameras = cameras[:: cameras.frames]
    for name in ("camera_embedding_of", "camera_features"):
        method = getattr(student, name, None)
        if callable(method):
            return method(cameras)
    return spherical_camera_embedding(cameras)


def drop_cameras(camera: Tensor, probability: float) -> Tensor:
    """Zero each row of ``camera`` [B, D] with ``probability`` (CFG dropout over the camera condition)."""
    if probability <= 0:
        return camera
    keep = (torch.rand(camera.shape[0], device=camera.device) >= probability).to(camera.dtype)
    return camera * keep.unsqueeze(1)


def student_prediction(student: nn.Module, x_t: Tensor, t: Tensor, conditioning: Conditioning,
                       camera: Tensor | None, camera_scale: float) -> Tensor:
    """``eps_phi(cam=0) + s_c (eps_phi(cam=c) - eps_phi(cam=0))``, CFG over the camera condition.

    ``camera_scale`` is threestudio's ``guidance_scale_lora`` s_c; ESD's lambda is ``1 - s_c``.
    s_c = 1 (or no camera) makes one call; otherwise two, combined by ``NoisePrediction.cfg``.
    """
    with_camera = student(x_t, t, conditioning, camera=camera)
    if camera is None or camera_scale == 1.0:
        return with_camera
    without_camera = student(x_t, t, conditioning, camera=torch.zeros_like(camera))
    return NoisePrediction(cond=with_camera, uncond=without_camera).cfg(camera_scale)


def student_denoising_loss(student: nn.Module, teacher: Teacher, x0: Tensor, conditioning: Conditioning,
                           camera: Tensor | None, sampler: TimestepSampler, step: int,
                           camera_dropout: float = 0.0, samples: int = 1) -> Tensor:
    """Mean eps-MSE of the student on (detached) samples ``x0``: ``|| eps_phi(alpha x0 + sigma eps, t, c) - eps ||^2``.

    ProlificDreamer eq. (estimator update); threestudio ``train_lora``: t from ``sampler`` (the full
    range by default), camera rows zeroed with ``camera_dropout``. The gradient reaches only the
    student: ``x0`` is detached here.
    """
    x0 = x0.detach()
    losses = []
    for _ in range(samples):
        t = sampler.sample(x0.shape[0], step, x0.device)
        noise = torch.randn_like(x0)
        x_t = teacher.add_noise(x0, noise, t)
        cam = None if camera is None else drop_cameras(camera, camera_dropout)
        prediction = student(x_t, t, conditioning, camera=cam)
        losses.append(F.mse_loss(prediction.float(), noise.float()))
    return torch.stack(losses).mean()


def student_param_group(student: nn.Module, config: StudentConfig, name: str = "student") -> dict:
    """The optimizer group of the student's trainable parameters."""
    params = [p for p in student.parameters() if p.requires_grad]
    return {"params": params, "lr": config.student_lr, "weight_decay": config.student_weight_decay, "name": name}
