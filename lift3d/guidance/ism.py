"""ISM: interval score matching (LucidDreamer, arXiv 2311.11284) and TSM: trajectory score
matching (Dreamer XL, arXiv 2405.11252).

ISM, from the official code (``EnVision-Research/LucidDreamer``, ``guidance/sd_utils.py``:
``add_noise_with_cfg`` L159, ``train_step`` L346)::

    s    = max(t - delta_T, 0)
    x_s  = DDIM inversion of x0 with eps(.; 0): from s0 = max(s - delta_S n_S, 0), where
           x_s0 = add_noise(x0, eps, s0), up to s in <= n_S steps of delta_S
    e_s  = eps(x_s, s; 0)
    x_t  = DDIM inversion step s -> t with e_s
    grad = w(t) (eps_cfg(x_t, t, y) - e_s),   w = sqrt((1 - abar_t) / abar_t)

so the target is the very prediction that produced x_t (a deterministic path, not random noise).
``delta_T`` anneals linearly (LucidDreamer configs: 100 -> 50 over the 1500-step warm-up).
The inversion uses the unconditional branch (the negative prompt when one is given, where
LucidDreamer uses its ``inverse_text``, ""); with ``inversion_guidance_scale`` s_inv != 1 it uses
LucidDreamer's "reverse CFG" ``eps(y) + s_inv (eps(0) - eps(y))``.

TSM, from the official code (``xingy038/Dreamer-XL``, ``guidance/sd_utils.py::train_step`` L422,
mu at L465-466, ``grad_mu2t`` at L537): ISM up to x_s, then a second path from x_s::

    mu     = round(s + (t - s) sqrt(1 - gamma^2))
    x_mu   = DDIM inversion step s -> mu with e_s
    grad   = w(t) (eps_cfg(x_t, t, y) - eps(x_mu, mu; 0))

gamma = 1 gives mu = s, exactly ISM (same RNG, bit for bit); gamma = 0 gives mu = t and the
classifier score ``w s (eps(x_t; y) - eps(x_t; 0))`` on the inverted x_t. (Dreamer XL also takes
a DDIM step x_mu -> t whose result it discards; that wasted call is left out.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lift3d.cameras import Cameras
from lift3d.config import Schedule
from lift3d.guidance.common import Guidance, GuidanceBaseConfig, GuidanceOutput
from lift3d.guidance.ddim import ddim_invert, ddim_step
from lift3d.guidance.weights import ExtendedWeighting, weight_like
from lift3d.registry import register
from lift3d.representations.base import RenderOutput
from lift3d.teachers.base import Conditioning, NoisePrediction


@dataclass
class IntervalConfig(GuidanceBaseConfig):
    """Options of the objectives whose noisy latent comes from DDIM inversion (ISM, TSM, CSM)."""

    weighting: ExtendedWeighting = "ism"
    """w(t): ism = sqrt((1 - abar_t) / abar_t) as LucidDreamer / Dreamer XL; or sds, uniform, fantasia3d, sqrt_abar."""
    delta_t: Schedule = field(
        default_factory=lambda: Schedule(start=100.0, end=50.0, start_step=0, end_step=1500, kind="linear")
    )
    """Interval delta_T = t - s in timesteps (LucidDreamer configs: 100 -> 50 over the warm-up)."""
    xs_delta_t: int = 200
    """Step delta_S of the inversion chain that makes x_s (LucidDreamer ``xs_delta_t``)."""
    xs_inv_steps: int = 5
    """At most n_S inversion steps to reach x_s (LucidDreamer ``xs_inv_steps``)."""
    inversion_guidance_scale: float = 1.0
    """s_inv of the inversion predictions, eps(y) + s_inv (eps(0) - eps(y)): 1 = unconditional (LucidDreamer),
    0 = conditional (the inversion then follows the target distribution itself)."""
    noise_offset: float = 0.1
    """Offset noise: eps = randn + offset randn(1, C, 1, 1) (LucidDreamer; only x_s0 uses it)."""

    def __post_init__(self) -> None:
        if self.xs_delta_t < 1 or self.xs_inv_steps < 0:
            raise ValueError("guidance.xs_delta_t must be >= 1 and guidance.xs_inv_steps >= 0")


@dataclass
class ISMConfig(IntervalConfig):
    """Interval score matching (LucidDreamer)."""


@dataclass
class TSMConfig(IntervalConfig):
    """Trajectory score matching (Dreamer XL)."""

    gamma: float = 0.3
    """gamma in mu = s + (t - s) sqrt(1 - gamma^2): 1 = ISM, 0 = target at t (Dreamer XL default 0.3)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"guidance.gamma must be in [0, 1], got {self.gamma}")


@dataclass
class IntervalLatents:
    """The deterministic path of one step: x_s, x_t and the prediction that links them."""

    s: Tensor
    """[B] the earlier timestep s = max(t - delta_T, 0)."""
    t: Tensor
    """[B] the sampled timestep t."""
    x_s: Tensor
    """[B, C, h, w] x0 inverted to s."""
    eps_s: Tensor
    """[B, C, h, w] the inversion prediction at (x_s, s); x_t is one DDIM step from x_s with it."""
    x_t: Tensor
    """[B, C, h, w] the latent the teacher judges."""


class IntervalGuidance(Guidance):
    """Shared machinery: inversion to x_s and x_t; subclasses choose the target."""

    config: IntervalConfig

    @property
    def needs_unconditional(self) -> bool:
        # The inversion uses eps(0) unless s_inv = 0; the teacher's CFG needs it unless s = 1.
        return self.config.inversion_guidance_scale != 0.0 or self.config.guidance_scale != 1.0

    def inversion_eps(self, x: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        """The prediction that drives the inversion: eps(x; 0), eps(x; y) (s_inv = 0), or reverse CFG."""
        scale = self.config.inversion_guidance_scale
        if scale in (0.0, 1.0):  # one branch only
            payload = conditioning.uncond if scale == 1.0 else conditioning.cond
            branch = Conditioning(cond=payload, uncond=None, view_labels=conditioning.view_labels)
            return self.teacher.predict_noise(x, t, branch).cond
        prediction = self.teacher.predict_noise(x, t, conditioning)
        # LucidDreamer's reverse CFG: cond + s (uncond - cond), i.e. the diffusers CFG with the branches swapped.
        return NoisePrediction(cond=prediction.uncond, uncond=prediction.cond).cfg(scale)

    def interval_latents(self, x0: Tensor, noise: Tensor, t: Tensor, step: int,
                         conditioning: Conditioning) -> IntervalLatents:
        """x_s by DDIM inversion of ``x0`` and x_t one inversion step further (module docstring)."""
        cfg = self.config
        if conditioning.uncond is None and self.needs_unconditional:
            raise ValueError(f"{type(self).__name__} needs the teacher's unconditional branch")
        s = (t - int(round(cfg.delta_t(step)))).clamp_min(0)
        start = (s - cfg.xs_delta_t * cfg.xs_inv_steps).clamp_min(0)
        abar = self.teacher.alphas_cumprod

        def eps_fn(x: Tensor, timesteps: Tensor) -> Tensor:
            return self.inversion_eps(x, timesteps, conditioning)

        x_start = self.teacher.add_noise(x0, noise, start)
        x_s = ddim_invert(eps_fn, x_start, start, s, cfg.xs_delta_t, abar, max_steps=cfg.xs_inv_steps).x
        eps_s = eps_fn(x_s, s)
        abar = abar.to(x0.device)
        x_t = ddim_step(x_s, eps_s, abar[s], abar[t])
        return IntervalLatents(s=s, t=t, x_s=x_s, eps_s=eps_s, x_t=x_t)

    def target(self, latents: IntervalLatents, prediction: NoisePrediction, conditioning: Conditioning) -> Tensor:
        """What the teacher's CFG prediction at x_t is compared with."""
        raise NotImplementedError

    def sample_noise(self, x0: Tensor) -> Tensor:
        """randn plus LucidDreamer's per-channel offset broadcast over the batch."""
        noise = torch.randn_like(x0)
        if self.config.noise_offset:
            noise = noise + self.config.noise_offset * torch.randn(1, x0.shape[1], *([1] * (x0.dim() - 2)),
                                                                   device=x0.device, dtype=x0.dtype)
        return noise

    def forward(self, render: RenderOutput, conditioning: Conditioning, cameras: Cameras, step: int) -> GuidanceOutput:
        x0 = self.teacher.encode_images(render.rgb)
        t = self.timesteps.sample(x0.shape[0], step, x0.device)
        noise = self.sample_noise(x0)
        with torch.no_grad():
            latents = self.interval_latents(x0.detach(), noise, t, step, conditioning)
            prediction = self.teacher.predict_noise(latents.x_t, t, conditioning)
            eps_cfg = prediction.cfg(self.config.guidance_scale)
            target = self.target(latents, prediction, conditioning)
        grad = weight_like(self.config.weighting, self.teacher.alphas_cumprod, t, x0) * (eps_cfg - target)
        return self.finish(x0, grad, t, step, {"guidance/delta_t": float((t - latents.s).float().mean())})


@register("guidance", "ism", ISMConfig)
class ISMGuidance(IntervalGuidance):
    """LucidDreamer: the target is the inversion prediction e_s that produced x_t."""

    def target(self, latents: IntervalLatents, prediction: NoisePrediction, conditioning: Conditioning) -> Tensor:
        return latents.eps_s


def trajectory_timesteps(s: Tensor, t: Tensor, gamma: float) -> Tensor:
    """mu = round(s + (t - s) sqrt(1 - gamma^2)) [B] (Dreamer XL L465-466)."""
    return torch.round(s.double() + (t - s).double() * math.sqrt(1.0 - gamma**2)).long()


@register("guidance", "tsm", TSMConfig)
class TSMGuidance(IntervalGuidance):
    """Dreamer XL: the target is the unconditional prediction at x_mu on a second path from x_s."""

    config: TSMConfig

    def target(self, latents: IntervalLatents, prediction: NoisePrediction, conditioning: Conditioning) -> Tensor:
        s, t = latents.s, latents.t
        mu = trajectory_timesteps(s, t, self.config.gamma)
        at_s = mu == s
        if bool(at_s.all()):
            return latents.eps_s  # gamma = 1: ISM exactly, no extra teacher call
        abar = self.teacher.alphas_cumprod.to(latents.x_s.device)
        x_mu = ddim_step(latents.x_s, latents.eps_s, abar[s], abar[mu])
        x_mu = torch.where((mu == t).view(-1, *([1] * (x_mu.dim() - 1))), latents.x_t, x_mu)
        target = self.inversion_eps(x_mu, mu, conditioning)
        return torch.where(at_s.view(-1, *([1] * (target.dim() - 1))), latents.eps_s, target)
