"""SDS: score distillation sampling (DreamFusion, arXiv 2209.14988).

grad = w(t) (eps_cfg(x_t, t, y) - eps), the teacher's Jacobian omitted, applied through the
surrogate loss so the representation receives ``grad / B`` times the render Jacobian.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lift3d.cameras import Cameras
from lift3d.guidance.common import Guidance, GuidanceBaseConfig, GuidanceOutput, expand_per_sample, weighting
from lift3d.registry import register
from lift3d.representations.base import RenderOutput
from lift3d.teachers.base import Conditioning


@dataclass
class SDSConfig(GuidanceBaseConfig):
    """Score distillation sampling."""


@register("guidance", "sds", SDSConfig)
class SDSGuidance(Guidance):
    """DreamFusion's objective; with the analytic teacher its fixed point is the CFG target."""

    def forward(self, render: RenderOutput, conditioning: Conditioning, cameras: Cameras, step: int) -> GuidanceOutput:
        x0 = self.teacher.encode_images(render.rgb)
        t = self.timesteps.sample(x0.shape[0], step, x0.device)
        noise = torch.randn_like(x0)
        with torch.no_grad():
            x_t = self.teacher.add_noise(x0.detach(), noise, t)
            eps = self.teacher.predict_noise(x_t, t, conditioning).cfg(self.config.guidance_scale)
        abar = self.teacher.alphas_cumprod.to(x0.device)[t]
        grad = expand_per_sample(weighting(self.config.weighting, abar), x0) * (eps - noise)
        return self.finish(x0, grad, t, step, {})
