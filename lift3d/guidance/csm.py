"""CSD: classifier score distillation (Yu et al., arXiv 2310.19415) and CSM: classifier score
matching (TV-3DG, arXiv 2410.21299; formula UNCONFIRMED).

CSD, generalised as the official code (``CVMI-Lab/Classifier-Score-Distillation``,
``stable_diffusion_triple_guidance.py::compute_grad_sds`` L446)::

    grad = w(t) (a_c eps(x_t; y) + a_u eps(x_t; 0) + a_eps eps)

on the usual random-noise latent x_t = add_noise(x0, eps, t). Presets of ``(a_c, a_u, a_eps)``:
CSD ``(1, -1, 0)`` (the default); SDS with scale s ``(s, 1 - s, -1)``; "delta" ``(s, -s, 0)``.
The official code has a fourth branch (a negative prompt besides the empty one) and anneals
between them (``csd-if.yaml``); a ``Conditioning`` has one unconditional branch, which is the
negative prompt when the run has one, so that annealing is expressed by scheduling ``a_u``
against a run with a negative prompt. ``normalize`` divides by the whole tensor's norm as
``grad_normalize`` (``grad / (||grad||_2 + 1e-8)``).

CSM, our reading of TV-3DG (guidance.md §9, UNCONFIRMED: there is no public code and the paper's
equations were not read). The abstract decomposes ``eps_cfg - eps = (eps(0) - eps) + s (eps(y) - eps(0))``
and says CSM "removes the difference term" and "uses a deterministic noise addition process";
we read that as the classifier term on an ISM-style DDIM-inverted latent x~_t::

    grad = w(t) s (eps(x~_t; y) - eps(x~_t; 0)) = w(t) (eps_cfg(x~_t) - eps(x~_t; 0))

which is TSM with gamma = 0. To change the reading, override :meth:`CSMGuidance.target`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lift3d.cameras import Cameras
from lift3d.config import Schedule
from lift3d.guidance.common import Guidance, GuidanceBaseConfig, GuidanceOutput
from lift3d.guidance.ism import IntervalConfig, IntervalGuidance, IntervalLatents
from lift3d.guidance.weights import ExtendedWeighting, weight_like
from lift3d.registry import register
from lift3d.representations.base import RenderOutput
from lift3d.teachers.base import Conditioning, NoisePrediction

NORMALIZE_EPSILON = 1e-8
"""Added to the norm by ``normalize`` (CSD's ``grad_normalize``)."""


@dataclass
class CSDConfig(GuidanceBaseConfig):
    """Classifier score distillation. ``guidance_scale`` is not used: the coefficients say it all."""

    weighting: ExtendedWeighting = "uniform"
    """w(t): uniform as csd-if.yaml, CSD's main preset (measured on the quickstart: 28 dB where sds = 1 - abar_t,
    csd-sd-refine.yaml's choice, gives 25 dB); configs/csd.yaml (SD refinement) sets sds."""
    cond_coefficient: Schedule = field(default_factory=lambda: Schedule(1.0))
    """a_c on eps(x_t; y) (a number or a schedule)."""
    uncond_coefficient: Schedule = field(default_factory=lambda: Schedule(-1.0))
    """a_u on eps(x_t; 0), the negative prompt when the run has one (a number or a schedule)."""
    noise_coefficient: Schedule = field(default_factory=lambda: Schedule(0.0))
    """a_eps on the injected noise eps (-1 with (s, 1 - s) gives SDS)."""
    normalize: bool = False
    """Divide the gradient by its L2 norm over the whole batch (CSD ``grad_normalize``; true in csd-if.yaml)."""


def _always_zero(schedule: Schedule) -> bool:
    end = schedule.start if schedule.end is None else schedule.end
    return schedule.start == 0.0 and (schedule.kind == "constant" or end == 0.0)


@register("guidance", "csd", CSDConfig)
class CSDGuidance(Guidance):
    """The implicit-classifier score (and, through the coefficients, SDS and its relatives)."""

    config: CSDConfig

    @property
    def needs_unconditional(self) -> bool:
        return not _always_zero(self.config.uncond_coefficient)

    def coefficients(self, step: int) -> tuple[float, float, float]:
        """(a_c, a_u, a_eps) at ``step``."""
        cfg = self.config
        return cfg.cond_coefficient(step), cfg.uncond_coefficient(step), cfg.noise_coefficient(step)

    def forward(self, render: RenderOutput, conditioning: Conditioning, cameras: Cameras, step: int) -> GuidanceOutput:
        cfg = self.config
        a_c, a_u, a_eps = self.coefficients(step)
        x0 = self.teacher.encode_images(render.rgb)
        t = self.timesteps.sample(x0.shape[0], step, x0.device)
        noise = torch.randn_like(x0)
        with torch.no_grad():
            x_t = self.teacher.add_noise(x0.detach(), noise, t)
            prediction = self.teacher.predict_noise(x_t, t, conditioning)
        combination = a_c * prediction.cond + a_eps * noise
        if a_u != 0.0:
            if prediction.uncond is None:
                raise ValueError("CSD with uncond_coefficient != 0 needs the teacher's unconditional branch")
            combination = combination + a_u * prediction.uncond
        grad = weight_like(cfg.weighting, self.teacher.alphas_cumprod, t, x0) * combination
        if cfg.normalize:
            grad = grad / (grad.norm() + NORMALIZE_EPSILON)
        return self.finish(x0, grad, t, step, {})


@dataclass
class CSMConfig(IntervalConfig):
    """Classifier score matching, our reading of TV-3DG (UNCONFIRMED; see the module docstring)."""


@register("guidance", "csm", CSMConfig)
class CSMGuidance(IntervalGuidance):
    """The classifier term on the DDIM-inverted x~_t: target eps(x~_t; 0), so grad = w s (eps(y) - eps(0))."""

    @property
    def needs_unconditional(self) -> bool:
        return True  # the target is eps(x~_t; 0)

    def target(self, latents: IntervalLatents, prediction: NoisePrediction, conditioning: Conditioning) -> Tensor:
        if prediction.uncond is None:
            raise ValueError("CSM needs the teacher's unconditional branch")
        return prediction.uncond
