"""ASD: asynchronous score distillation (ScaleDreamer, arXiv 2407.02040).

From the official code (``theEricMa/ScaleDreamer``, ``stable_diffusion_asd_guidance.py``,
``SDTimestepShiftedScoreDistillationGuidance``; ``grad`` at L273)::

    x_t   = add_noise(x0, eps, t)
    x_t+  = add_noise(x0, eps, t + dt)          # the SAME eps
    grad  = w(t) (eps_cfg(x_t, t, y) - eps_phi(x_t+, t + dt, y))

The second term is the plain conditional prediction (no CFG, no negatives); w uses t, not t + dt.
The shift follows ``get_t_plus`` as *redefined* at L294 (it overrides the one at L136)::

    dt = clamp(eta (t - t_min), 0, T - 1 - t)      # eta = plus_ratio, t_min = current (annealed) min step
    dt = dt * U(0, 1)                             # when plus_random
    t+ = clamp(t + long(dt), 1, T - 1)

With eta = 0: ``grad = w (s - 1)(eps(y) - eps(0))``, a pure classifier-score term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lift3d.cameras import Cameras
from lift3d.guidance.common import Guidance, GuidanceBaseConfig, GuidanceOutput
from lift3d.guidance.weights import ExtendedWeighting, weight_like
from lift3d.registry import register
from lift3d.representations.base import RenderOutput
from lift3d.teachers.base import Conditioning


@dataclass
class ASDConfig(GuidanceBaseConfig):
    """Asynchronous score distillation (ScaleDreamer)."""

    weighting: ExtendedWeighting = "sds"
    """w(t), evaluated at t (not t + dt): sds = 1 - abar_t as ScaleDreamer's configs."""
    plus_ratio: float = 0.1
    """eta in ``dt = eta (t - t_min)`` (ScaleDreamer ``plus_ratio``)."""
    plus_random: bool = True
    """Multiply dt by U(0, 1) per sample (``plus_random``; true in every ScaleDreamer config)."""

    def __post_init__(self) -> None:
        if self.plus_ratio < 0:
            raise ValueError(f"guidance.plus_ratio must be >= 0, got {self.plus_ratio}")


def shifted_timesteps(t: Tensor, t_min: int, plus_ratio: float, plus_random: bool, num_train_timesteps: int) -> Tensor:
    """t + dt [B] by ScaleDreamer's (second) ``get_t_plus`` rule; see the module docstring."""
    T = num_train_timesteps
    delta = (plus_ratio * (t - t_min).float()).clamp_min(0.0)
    delta = torch.minimum(delta, (T - 1 - t).float())
    if plus_random:
        delta = delta * torch.rand(t.shape, device=t.device)
    return (t + delta.long()).clamp(1, T - 1)


@register("guidance", "asd", ASDConfig)
class ASDGuidance(Guidance):
    """ScaleDreamer's objective: CFG score at t minus the conditional score at t + dt, same noise."""

    config: ASDConfig

    def forward(self, render: RenderOutput, conditioning: Conditioning, cameras: Cameras, step: int) -> GuidanceOutput:
        cfg = self.config
        x0 = self.teacher.encode_images(render.rgb)
        t = self.timesteps.sample(x0.shape[0], step, x0.device)
        t_min, _ = self.timesteps.bounds(step)
        t_plus = shifted_timesteps(t, t_min, cfg.plus_ratio, cfg.plus_random, self.teacher.num_train_timesteps)
        noise = torch.randn_like(x0)
        with torch.no_grad():
            x_t = self.teacher.add_noise(x0.detach(), noise, t)
            x_plus = self.teacher.add_noise(x0.detach(), noise, t_plus)
            eps_cfg = self.teacher.predict_noise(x_t, t, conditioning).cfg(cfg.guidance_scale)
            conditional_only = Conditioning(cond=conditioning.cond, uncond=None, view_labels=conditioning.view_labels)
            eps_plus = self.teacher.predict_noise(x_plus, t_plus, conditional_only).cond
        grad = weight_like(cfg.weighting, self.teacher.alphas_cumprod, t, x0) * (eps_cfg - eps_plus)
        return self.finish(x0, grad, t, step, {"guidance/t_plus_mean": float(t_plus.float().mean())})
