"""Bootstrapped score distillation (DreamCraft3D, arXiv 2310.16818).

The paper's equation could not be read (guidance.md §6, UNCONFIRMED); this follows the official
code (``deepseek-ai/DreamCraft3D``, ``stable_diffusion_bsd_guidance.py``):

- A fine-tunable copy of the prior, eps_B (DreamCraft3D's ``train_unet``, a DreamBooth UNet), is
  trained on *augmented renders* of the current scene: every ``augment_every`` steps the current
  render is noised to t* (the current annealed max step) and denoised by the frozen teacher
  (SDEdit; DreamCraft3D uses DPM-Solver, we use deterministic DDIM from :mod:`lift3d.guidance.ddim`),
  and the result joins a FIFO cache of ``cache_size`` batches. A pretrain step takes one cached
  batch at random and minimises ``|| eps_B(alpha_t x_aug + sigma_t eps, t, y) - eps ||^2``, t over
  the full range, replacing the text by the unconditional payload with probability 0.1
  (DreamCraft3D replaces it by a zero tensor; we drop the whole batch, since its batch is 1).
- Alternation (``forward`` L1079): in each ``period`` of steps, the first ``pretrain_fraction``
  update only eps_B (the returned loss does not touch the scene); the others distil::

      grad = w(t) (eps_B(0) + s (eps_B(y) - eps_B(0)) - eps_est)

  with eps_est the injected noise (default), or, with ``use_estimator``, a second student
  eps_phi trained VSD-style on the renders (DreamCraft3D's ``train_unet_lora``; view-independent
  text as there). eps_B gets the view-dependent payload, as DreamCraft3D's DreamBooth UNet.

Reading for our teachers: the "fine-tunable copy" is ``teacher.make_student()`` called without a
camera (a LoRA on Stable Diffusion, the residual student on the analytic teacher), not a full
UNet copy. ``use_estimator`` needs a second student, which the analytic teacher can make and the
Stable Diffusion teacher cannot (one LoRA per teacher).

The augmentation cache is transient (it holds teacher payloads, which checkpoints cannot store):
a resumed run keeps eps_B, eps_phi and their optimizer but refills the cache at its next pretrain
step, so bootstrap resumes are not bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from lift3d.cameras import Cameras
from lift3d.config import Schedule
from lift3d.guidance.common import Guidance, GuidanceBaseConfig, GuidanceOutput, TimestepSampler
from lift3d.guidance.ddim import ddim_sample
from lift3d.guidance.student import (
    StudentConfig,
    student_camera_embedding,
    student_denoising_loss,
    student_param_group,
)
from lift3d.guidance.vsd import student_conditioning
from lift3d.guidance.weights import ExtendedWeighting, weight_like
from lift3d.registry import register
from lift3d.representations.base import RenderOutput
from lift3d.teachers.base import Conditioning, NoisePrediction

logger = logging.getLogger(__name__)


@dataclass
class BootstrapConfig(GuidanceBaseConfig, StudentConfig):
    """Bootstrapped score distillation (DreamCraft3D stage 3)."""

    weighting: ExtendedWeighting = "sds"
    """w(t): sds = 1 - abar_t as DreamCraft3D."""
    period: int = 1000
    """Length of one pretrain/distil cycle in steps (DreamCraft3D ``only_pretrain_step``)."""
    pretrain_fraction: float = 0.2
    """Fraction of each period, at its start, that only fine-tunes eps_B (DreamCraft3D: 1/5)."""
    augment_every: int = 25
    """Make a new augmented batch every N pretrain steps (DreamCraft3D ``per_update_pretrain_step``)."""
    cache_size: int = 10
    """Augmented batches kept (FIFO)."""
    augment_steps: int = 25
    """DDIM steps of an SDEdit over the whole range; one from t* takes ceil(augment_steps t* / T)."""
    augment_noise_percent: Schedule | None = None
    """t* / T of the SDEdit (unset: the current max of ``timesteps``, as DreamCraft3D's ``self.max_step``)."""
    augment_guidance_scale: float | None = None
    """CFG scale of the SDEdit denoiser (unset: ``guidance_scale``; DreamCraft3D: 7.5)."""
    text_dropout: float = 0.1
    """Probability of training eps_B on the unconditional payload (only when the run computes it, CFG != 1)."""
    pretrain_loss_weight: float = 1.0
    """Weight of eps_B's denoising loss (DreamCraft3D ``lambda_pretrain`` 0.1 with ``lambda_sd`` 0.01)."""
    use_estimator: bool = False
    """Subtract a second, camera-conditioned student's score instead of the noise (VSD-style phi)."""
    camera_dropout: float = 0.1
    """Camera dropout of the estimator's denoising loss (with ``use_estimator``)."""

    def __post_init__(self) -> None:
        self.validate_student()
        if self.period < 1 or self.augment_every < 1 or self.cache_size < 1 or self.augment_steps < 1:
            raise ValueError("guidance.period, augment_every, cache_size and augment_steps must be >= 1")
        if not 0.0 <= self.pretrain_fraction < 1.0:
            raise ValueError(f"guidance.pretrain_fraction must be in [0, 1), got {self.pretrain_fraction}")
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ValueError(f"guidance.text_dropout must be in [0, 1], got {self.text_dropout}")


@register("guidance", "bootstrap", BootstrapConfig)
class BootstrapGuidance(Guidance):
    """Distil from a copy of the prior that is itself fine-tuned on augmented renders of the scene."""

    config: BootstrapConfig

    def __init__(self, config: BootstrapConfig, teacher) -> None:
        super().__init__(config, teacher)
        self.student = teacher.make_student()
        self.estimator = None
        if config.use_estimator:
            try:
                self.estimator = teacher.make_student()
            except RuntimeError as error:
                raise ValueError(
                    f"guidance.use_estimator needs a second student, which this teacher cannot make ({error})"
                ) from None
        self.student_sampler = TimestepSampler(config.student_timesteps, teacher.num_train_timesteps)
        self.cache: deque[tuple[Tensor, Conditioning]] = deque(maxlen=config.cache_size)

    @property
    def needs_unconditional(self) -> bool:
        return self.config.guidance_scale != 1.0 or self.augment_scale != 1.0

    @property
    def augment_scale(self) -> float:
        scale = self.config.augment_guidance_scale
        return self.config.guidance_scale if scale is None else scale

    def param_groups(self) -> list[dict]:
        groups = [student_param_group(self.student, self.config, "bootstrap")]
        if self.estimator is not None:
            groups.append(student_param_group(self.estimator, self.config, "estimator"))
        return groups

    def is_pretrain_step(self, step: int) -> bool:
        """Whether ``step`` only fine-tunes eps_B (the first fraction of each period)."""
        cfg = self.config
        return (step % cfg.period) < int(cfg.period * cfg.pretrain_fraction)

    # ------------------------------------------------------------------ fine-tuning eps_B

    @torch.no_grad()
    def augment(self, x0: Tensor, conditioning: Conditioning, step: int) -> Tensor:
        """SDEdit of ``x0`` with the frozen teacher: noise to t*, DDIM back to clean; cached and returned."""
        cfg, T = self.config, self.teacher.num_train_timesteps
        if cfg.augment_noise_percent is None:
            t_star = self.timesteps.bounds(step)[1]
        else:
            t_star = min(max(int(T * cfg.augment_noise_percent(step)), 0), T - 1)
        start = torch.full((x0.shape[0],), t_star, device=x0.device, dtype=torch.long)
        noisy = self.teacher.add_noise(x0, torch.randn_like(x0), start)
        scale = self.augment_scale

        def eps_fn(x: Tensor, t: Tensor) -> Tensor:
            return self.teacher.predict_noise(x, t, conditioning).cfg(scale)

        steps = max(1, math.ceil(cfg.augment_steps * t_star / T))
        augmented = ddim_sample(eps_fn, noisy, start, steps, self.teacher.alphas_cumprod)
        self.cache.append((augmented.detach(), conditioning))
        return augmented

    def pretrain_loss(self, step: int) -> Tensor:
        """eps_B's denoising loss on one cached augmented batch, with unconditional dropout."""
        cfg = self.config
        index = int(torch.randint(len(self.cache), ()))
        augmented, conditioning = self.cache[index]
        if conditioning.uncond is not None and float(torch.rand(())) < cfg.text_dropout:
            conditioning = Conditioning(cond=conditioning.uncond, uncond=None, view_labels=conditioning.view_labels)
        return student_denoising_loss(
            self.student, self.teacher, augmented, conditioning, None, self.student_sampler, step,
            samples=cfg.student_samples,
        )

    # ------------------------------------------------------------------ distillation

    def bootstrapped_eps(self, x_t: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        """eps_B(0) + s (eps_B(y) - eps_B(0)); one call when s = 1."""
        conditional = self.student(x_t, t, conditioning, camera=None)
        if self.config.guidance_scale == 1.0:
            return conditional
        unconditional = Conditioning(cond=conditioning.uncond, uncond=None, view_labels=conditioning.view_labels)
        return NoisePrediction(
            cond=conditional, uncond=self.student(x_t, t, unconditional, camera=None)
        ).cfg(self.config.guidance_scale)

    def forward(self, render: RenderOutput, conditioning: Conditioning, cameras: Cameras, step: int) -> GuidanceOutput:
        cfg = self.config
        x0 = self.teacher.encode_images(render.rgb)
        if self.is_pretrain_step(step):
            if not self.cache or step % cfg.augment_every == 0:
                self.augment(x0.detach(), conditioning, step)
            loss = self.pretrain_loss(step)
            return GuidanceOutput(
                loss=cfg.pretrain_loss_weight * loss,
                logs={"guidance/pretrain_loss": float(loss.detach()), "guidance/pretrain": 1.0},
            )
        t = self.timesteps.sample(x0.shape[0], step, x0.device)
        noise = torch.randn_like(x0)
        camera = None
        if self.estimator is not None:
            camera = student_camera_embedding(self.estimator, cameras).to(x0.device, x0.dtype)
        with torch.no_grad():
            x_t = self.teacher.add_noise(x0.detach(), noise, t)
            target = self.bootstrapped_eps(x_t, t, conditioning)
            estimate = noise
            if self.estimator is not None:
                estimate = self.estimator(x_t, t, student_conditioning(conditioning), camera=camera)
        grad = weight_like(cfg.weighting, self.teacher.alphas_cumprod, t, x0) * (target - estimate)
        out = self.finish(x0, grad, t, step, {"guidance/pretrain": 0.0})
        if self.estimator is not None:
            estimator_loss = student_denoising_loss(
                self.estimator, self.teacher, x0, student_conditioning(conditioning), camera, self.student_sampler,
                step, cfg.camera_dropout, cfg.student_samples,
            )
            out.loss = out.loss + cfg.student_loss_weight * estimator_loss
            out.logs["guidance/student_loss"] = float(estimator_loss.detach())
        return out
