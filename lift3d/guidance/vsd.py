"""VSD (ProlificDreamer, arXiv 2305.16213) and ESD (Entropic Score Distillation, arXiv 2401.00909).

VSD, particle update (paper eq. 9; threestudio ``stable_diffusion_vsd_guidance.py::compute_grad_vsd``)::

    grad = w(t) (eps_pretrain_cfg(x_t, t, y) - eps_est),
    eps_est = eps_phi(x_t, t, y, cam=0) + s_l (eps_phi(x_t, t, y, cam=c) - eps_phi(x_t, t, y, cam=0))

with ``s_l = guidance_scale_lora`` (default 1: the purely camera-conditioned student). The
estimator update (``train_lora``) is the denoising loss of the student on the *detached* renders,
``|| eps_phi(alpha_t x0 + sigma_t eps, t, y, c) - eps ||^2`` with t over the full range and the
camera zeroed with probability 0.1 (``lora_cfg_training``). That loss is added to the returned
loss, so the trainer's single backward trains the representation (through the surrogate) and the
student (through its own loss), and the trainer's ``guidance_optimizer`` steps the student.

ESD: ``eps_est = lambda eps_phi(cam=0) + (1 - lambda) eps_phi(cam=c)``, i.e. VSD with
``s_l = 1 - lambda`` (the official README: threestudio's ProlificDreamer with
``guidance_scale_lora = 0.5``). lambda = 0 is VSD.

Particles: ProlificDreamer optimises n particles sharing one student; :meth:`VSDGuidance.forward_particles`
takes one render (with its conditioning and cameras) per particle. The trainer drives one
representation, i.e. n = 1 (as threestudio does).

Student inputs: the camera embedding comes from :func:`lift3d.guidance.student.student_camera_embedding`;
the text is view-*independent* as threestudio's LoRA gets it: ``Conditioning.view_independent``
when the teacher provides it (the diffusers teachers do), else the teacher's own payload
(:func:`student_conditioning`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lift3d.cameras import Cameras
from lift3d.guidance.common import Guidance, GuidanceBaseConfig, GuidanceOutput, TimestepSampler
from lift3d.guidance.student import (
    StudentConfig,
    student_camera_embedding,
    student_denoising_loss,
    student_param_group,
    student_prediction,
)
from lift3d.guidance.weights import ExtendedWeighting, weight_like
from lift3d.registry import register
from lift3d.representations.base import RenderOutput
from lift3d.teachers.base import Conditioning

logger = logging.getLogger(__name__)


def student_conditioning(conditioning: Conditioning) -> Conditioning:
    """The conditioning a VSD-type student sees: ``view_independent`` as its conditional payload
    when the teacher provides one (the plain prompt, as threestudio's LoRA), else ``conditioning``."""
    if conditioning.view_independent is None:
        return conditioning
    return Conditioning(cond=conditioning.view_independent, uncond=conditioning.uncond,
                        view_labels=conditioning.view_labels)


@dataclass
class _StudentScoreConfig(GuidanceBaseConfig, StudentConfig):
    """Options shared by VSD and ESD."""

    weighting: ExtendedWeighting = "sds"
    """w(t): sds = 1 - abar_t (threestudio VSD), uniform, fantasia3d, ism = sigma/alpha, sqrt_abar."""
    camera_dropout: float = 0.1
    """Probability of zeroing the student's camera in its denoising loss (threestudio ``lora_cfg_training``)."""
    student_camera: bool = True
    """Condition the student on the camera (false: a camera-free estimator, as DreamCraft3D's)."""

    def __post_init__(self) -> None:
        self.validate_student()
        if not 0.0 <= self.camera_dropout <= 1.0:
            raise ValueError(f"guidance.camera_dropout must be in [0, 1], got {self.camera_dropout}")


@dataclass
class VSDConfig(_StudentScoreConfig):
    """Variational score distillation (ProlificDreamer)."""

    guidance_scale_lora: float = 1.0
    """CFG scale s_l over the student's camera condition: eps(cam=0) + s_l (eps(cam=c) - eps(cam=0))."""


@dataclass
class ESDConfig(_StudentScoreConfig):
    """Entropic score distillation: VSD with the camera-free student score mixed in."""

    entropy_weight: float = 0.5
    """lambda in ``lambda eps_phi(cam=0) + (1 - lambda) eps_phi(cam=c)`` (0 = VSD; the README suggests 0.5)."""


@register("guidance", "vsd", VSDConfig)
class VSDGuidance(Guidance):
    """ProlificDreamer's objective: the teacher's CFG score minus the student's score of the renders."""

    config: VSDConfig

    def __init__(self, config: VSDConfig, teacher) -> None:
        super().__init__(config, teacher)
        self.student = teacher.make_student()
        self.student_sampler = TimestepSampler(config.student_timesteps, teacher.num_train_timesteps)

    @property
    def camera_scale(self) -> float:
        """s_l of the student's camera CFG."""
        return self.config.guidance_scale_lora

    def param_groups(self) -> list[dict]:
        return [student_param_group(self.student, self.config)]

    def camera_input(self, cameras: Cameras, like: Tensor) -> Tensor | None:
        """The student's camera embedding [B, D] on ``like``'s device, or None when the student is camera-free."""
        if not self.config.student_camera:
            return None
        return student_camera_embedding(self.student, cameras).to(like.device, like.dtype)

    def forward(self, render: RenderOutput, conditioning: Conditioning, cameras: Cameras, step: int) -> GuidanceOutput:
        return self.forward_particles([render], [conditioning], [cameras], step)

    def forward_particles(self, renders: Sequence[RenderOutput], conditionings: Sequence[Conditioning],
                          cameras: Sequence[Cameras], step: int) -> GuidanceOutput:
        """The loss for n particles (one render batch each) that share the student.

        The returned loss sums each particle's surrogate loss (each particle gets its own VSD
        gradient) and adds the student's denoising loss averaged over all particles' renders.
        """
        if not (len(renders) == len(conditionings) == len(cameras)) or not renders:
            raise ValueError("forward_particles needs one conditioning and one camera batch per render")
        cfg = self.config
        surrogate = []
        student_losses = []
        logs: dict[str, float] = {}
        for render, conditioning, cams in zip(renders, conditionings, cameras):
            x0 = self.teacher.encode_images(render.rgb)
            camera = self.camera_input(cams, x0)
            grad, t = self.particle_gradient(x0, conditioning, camera, step)
            out = self.finish(x0, grad, t, step, {})
            surrogate.append(out.loss)
            for key, value in out.logs.items():
                logs[key] = logs.get(key, 0.0) + value / len(renders)
            student_losses.append(
                student_denoising_loss(
                    self.student, self.teacher, x0, student_conditioning(conditioning), camera,
                    self.student_sampler, step, cfg.camera_dropout, cfg.student_samples,
                )
            )
        student_loss = torch.stack(student_losses).mean()
        logs["guidance/student_loss"] = float(student_loss.detach())
        loss = torch.stack(surrogate).sum() + cfg.student_loss_weight * student_loss
        return GuidanceOutput(loss=loss, logs=logs)

    def particle_gradient(self, x0: Tensor, conditioning: Conditioning, camera: Tensor | None,
                          step: int) -> tuple[Tensor, Tensor]:
        """``w(t) (eps_pretrain_cfg - eps_est)`` [B, C, h, w] for one particle, and its timesteps [B]."""
        t = self.timesteps.sample(x0.shape[0], step, x0.device)
        noise = torch.randn_like(x0)
        with torch.no_grad():
            x_t = self.teacher.add_noise(x0.detach(), noise, t)
            eps_pretrain = self.teacher.predict_noise(x_t, t, conditioning).cfg(self.config.guidance_scale)
            eps_est = student_prediction(
                self.student, x_t, t, student_conditioning(conditioning), camera, self.camera_scale
            )
        w = weight_like(self.config.weighting, self.teacher.alphas_cumprod, t, x0)
        return w * (eps_pretrain - eps_est.to(eps_pretrain.dtype)), t


@register("guidance", "esd", ESDConfig)
class ESDGuidance(VSDGuidance):
    """ESD: VSD whose estimate mixes in the camera-free student score with weight lambda."""

    config: ESDConfig

    @property
    def camera_scale(self) -> float:
        # lambda eps(cam=0) + (1 - lambda) eps(cam=c) == eps(cam=0) + (1 - lambda)(eps(cam=c) - eps(cam=0))
        return 1.0 - self.config.entropy_weight
