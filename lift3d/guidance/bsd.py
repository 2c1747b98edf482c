"""BSD: balanced score distillation (PlacidDreamer, arXiv 2407.13976).

A two-objective (Pareto) combination of a classifier term and a smoothing term, from the
official code (``HansenHuang0823/PlacidDreamer``, ``guidance/sd_utils.py``):

``standard`` (``train_step_BSD``, L234)::

    g_c   = kappa (eps(x_t; y) - eps(x_t; 0))        # classifier term, kappa = 15 hard-coded there
    g_d   = eps(x_t; 0)                              # smoothing term (no "- eps")
    alpha = clip(<g_d - g_c, g_d> / (||g_d - g_c||^2 + epsilon), 0, 1)    # per sample, over C h w
    grad  = w(t) (alpha g_c + (1 - alpha) g_d),  w = sqrt(abar_t)

``auto`` (``train_step_BSD_auto``, L336; "standard BSD with an automatically increasing lambda")::

    g_c = eps(y) - eps(0),  g_d = 1.25 (eps(0) - eps),  same alpha,
    w   = ||eps(0) - eps||_2 sqrt(1 - abar_t) / 50    (norm over the whole batch)

alpha is the closed-form argmin over [0, 1] of ``||alpha g_c + (1 - alpha) g_d||^2``: the MGDA
min-norm element of the segment, a common descent direction of both objectives, so its norm is
at most ``min(||g_c||, ||g_d||)``. PlacidDreamer divides by ``||g_d - g_c||^2`` alone, which is
0/0 when the two terms agree (NaN, then ``nan_to_num`` zeroes the whole gradient); ``epsilon``
avoids that (alpha = 0 then, and the combination is the common value).

The paper's equations could not be read (guidance.md §5): the code forms above are what this
implements. ``kappa`` is exposed (the code ignores its own ``guidance_ratio`` argument).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lift3d.cameras import Cameras
from lift3d.guidance.common import Guidance, GuidanceBaseConfig, GuidanceOutput, expand_per_sample
from lift3d.guidance.weights import ExtendedWeighting, weight_like
from lift3d.registry import register
from lift3d.representations.base import RenderOutput
from lift3d.teachers.base import Conditioning

AUTO_SMOOTHING_SCALE = 1.25
"""PlacidDreamer's factor on the auto variant's smoothing term."""
AUTO_WEIGHT_DIVISOR = 50.0
"""PlacidDreamer's divisor of the auto variant's weight."""


@dataclass
class BSDConfig(GuidanceBaseConfig):
    """Balanced score distillation (PlacidDreamer). ``guidance_scale`` is not used: kappa plays its part."""

    variant: Literal["standard", "auto"] = "auto"
    """``auto`` (train_step_BSD_auto, the README's --auto_BSD) or ``standard`` (train_step_BSD). auto is the
    default: standard's smoothing term eps(x_t; 0) has no "- eps" and a nonzero mean, which leaves a bias
    (20 dB on the quickstart against 38 dB for auto, docs/benchmarks.md)."""
    classifier_scale: float = 15.0
    """kappa on the classifier term of the standard variant (hard-coded 15 in PlacidDreamer; sets saturation)."""
    weighting: ExtendedWeighting = "sqrt_abar"
    """w(t) of the standard variant: sqrt_abar = sqrt(abar_t) as PlacidDreamer (the auto variant has its own)."""
    min_norm_epsilon: float = 1e-12
    """Added to ||g_d - g_c||^2 so that equal terms give alpha = 0 instead of 0/0."""

    def __post_init__(self) -> None:
        if self.min_norm_epsilon <= 0:
            raise ValueError(f"guidance.min_norm_epsilon must be positive, got {self.min_norm_epsilon}")


def min_norm_coefficient(g_c: Tensor, g_d: Tensor, epsilon: float = 1e-12) -> Tensor:
    """alpha [B] in [0, 1] minimising ``||alpha g_c + (1 - alpha) g_d||`` per sample (MGDA, two objectives)."""
    difference = (g_d - g_c).flatten(1)
    numerator = (difference * g_d.flatten(1)).sum(1)
    return (numerator / (difference.square().sum(1) + epsilon)).clamp(0.0, 1.0)


def balanced_combination(g_c: Tensor, g_d: Tensor, epsilon: float = 1e-12) -> tuple[Tensor, Tensor]:
    """``alpha g_c + (1 - alpha) g_d`` and alpha [B]."""
    alpha = min_norm_coefficient(g_c, g_d, epsilon)
    a = expand_per_sample(alpha, g_c).to(g_c.dtype)
    return a * g_c + (1.0 - a) * g_d, alpha


@register("guidance", "bsd", BSDConfig)
class BSDGuidance(Guidance):
    """PlacidDreamer's min-norm balance of the classifier and smoothing scores."""

    config: BSDConfig

    @property
    def needs_unconditional(self) -> bool:
        return True  # both terms use eps(x_t; 0)

    def forward(self, render: RenderOutput, conditioning: Conditioning, cameras: Cameras, step: int) -> GuidanceOutput:
        cfg = self.config
        x0 = self.teacher.encode_images(render.rgb)
        t = self.timesteps.sample(x0.shape[0], step, x0.device)
        noise = torch.randn_like(x0)
        with torch.no_grad():
            x_t = self.teacher.add_noise(x0.detach(), noise, t)
            prediction = self.teacher.predict_noise(x_t, t, conditioning)
        if prediction.uncond is None:
            raise ValueError("BSD needs the teacher's unconditional branch")
        classifier = prediction.cond - prediction.uncond  # the implicit-classifier score direction
        abar = self.teacher.alphas_cumprod.to(x0.device)[t]
        if cfg.variant == "standard":
            g_c, g_d = cfg.classifier_scale * classifier, prediction.uncond
            w = weight_like(cfg.weighting, self.teacher.alphas_cumprod, t, x0)
        else:
            denoise = prediction.uncond - noise
            g_c, g_d = classifier, AUTO_SMOOTHING_SCALE * denoise
            w = expand_per_sample(denoise.norm() * (1.0 - abar).sqrt() / AUTO_WEIGHT_DIVISOR, x0)
        combined, alpha = balanced_combination(g_c, g_d, cfg.min_norm_epsilon)
        return self.finish(x0, w * combined, t, step, {"guidance/alpha_mean": float(alpha.mean())})
