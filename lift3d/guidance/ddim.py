"""Deterministic DDIM (eta = 0) steps in both directions: inversion (t up) and sampling (t down).

One step from timestep ``a`` to ``b`` with the noise prediction ``e = eps(x_a, a)``::

    x0_hat = (x_a - sqrt(1 - abar_a) e) / sqrt(abar_a)
    x_b    = sqrt(abar_b) x0_hat + sqrt(1 - abar_b) e

``b > a`` is an inversion step (LucidDreamer ``guidance/sd_step.py::ddim_step`` with a negative
``delta_timestep``), ``b < a`` a sampling step (Song et al., arXiv 2010.02502, eq. 12 with
sigma = 0). Timestep ``-1`` stands for the clean sample (``abar = 1``, diffusers'
``set_alpha_to_one``), so the last sampling step returns ``x0_hat``.

Every timestep argument is a per-sample integer tensor [B], so a batch may hold different t.
Used by ISM / TSM / CSM (inverted latents) and the bootstrapped objective (SDEdit augmentation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lift3d.guidance.common import expand_per_sample

EpsFn = Callable[[Tensor, Tensor], Tensor]
"""``eps_fn(x [B, ...], t [B] long) -> eps [B, ...]``: a noise predictor at fixed conditioning."""

CLEAN = -1
"""The timestep that stands for the clean sample (abar = 1)."""


def abar_at(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """abar_t [B] for integer timesteps [B]; ``t = -1`` (``CLEAN``) gives 1."""
    t = t.long()
    values = alphas_cumprod.to(t.device)[t.clamp_min(0)]
    return torch.where(t < 0, torch.ones_like(values), values)


def ddim_step(x_a: Tensor, eps: Tensor, abar_a: Tensor, abar_b: Tensor) -> Tensor:
    """One deterministic DDIM step from abar_a to abar_b (each [B]) with noise prediction ``eps``."""
    abar_a, abar_b = expand_per_sample(abar_a, x_a).to(x_a.dtype), expand_per_sample(abar_b, x_a).to(x_a.dtype)
    x0_hat = (x_a - (1.0 - abar_a).sqrt() * eps) / abar_a.sqrt()
    return abar_b.sqrt() * x0_hat + (1.0 - abar_b).sqrt() * eps


@dataclass
class DDIMPath:
    """The end of a DDIM walk and the prediction that made its last step."""

    x: Tensor
    """[B, ...] the sample at the end timestep."""
    last_eps: Tensor | None
    """[B, ...] ``eps(x_a, a)`` of each sample's last step; a sample that never moved holds the
    prediction at its start (None when no call was made)."""
    last_t: Tensor | None
    """[B] the timestep ``a`` at which ``last_eps`` was predicted (None when no call was made)."""
    evaluations: int
    """Calls of ``eps_fn`` made (each on the whole batch)."""


def ddim_walk(eps_fn: EpsFn, x: Tensor, start: Tensor, end: Tensor, step_size: int | Tensor,
              alphas_cumprod: Tensor, max_steps: int | None = None) -> DDIMPath:
    """Walk each sample from timestep ``start`` [B] towards ``end`` [B] in steps of ``step_size``.

    Steps go up when ``end > start`` (inversion) and down otherwise (sampling); the last step of a
    sample is shortened to land exactly on ``end``. Samples that have arrived keep their value
    bit for bit while the others go on. ``max_steps`` stops early (as LucidDreamer's
    ``inv_steps``), leaving samples short of ``end``.
    """
    start, end = start.long().to(x.device), end.long().to(x.device)
    step = torch.as_tensor(step_size, device=x.device).long().expand_as(start)
    if bool((step <= 0).any()):
        raise ValueError(f"DDIM step size must be positive, got {step_size}")
    direction = torch.sign(end - start)
    current = start.clone()
    last_eps: Tensor | None = None
    last_t: Tensor | None = None
    evaluations = 0
    while bool((current != end).any()) and (max_steps is None or evaluations < max_steps):
        moving = current != end
        eps = eps_fn(x, current.clamp_min(0))  # arrived samples may sit at CLEAN; their result is masked
        evaluations += 1
        target = current + direction * step
        target = torch.where(direction > 0, torch.minimum(target, end), torch.maximum(target, end))
        stepped = ddim_step(x, eps, abar_at(alphas_cumprod, current), abar_at(alphas_cumprod, target))
        mask = expand_per_sample(moving, x)
        x = torch.where(mask, stepped, x)
        last_eps = eps if last_eps is None else torch.where(mask, eps, last_eps)
        last_t = current.clone() if last_t is None else torch.where(moving, current, last_t)
        current = torch.where(moving, target, current)
    return DDIMPath(x, last_eps, last_t, evaluations)


def ddim_invert(eps_fn: EpsFn, x: Tensor, start: Tensor, end: Tensor, step_size: int | Tensor,
                alphas_cumprod: Tensor, max_steps: int | None = None) -> DDIMPath:
    """Deterministic DDIM inversion from ``start`` up to ``end`` (each [B], ``end >= start``)."""
    if bool((end < start).any()):
        raise ValueError("DDIM inversion needs end >= start for every sample")
    return ddim_walk(eps_fn, x, start, end, step_size, alphas_cumprod, max_steps)


def ddim_sample(eps_fn: EpsFn, x: Tensor, start: Tensor, num_steps: int, alphas_cumprod: Tensor,
                end: Tensor | None = None) -> Tensor:
    """Deterministic DDIM sampling from ``start`` [B] down to ``end`` [B] (default: clean) in ``num_steps``.

    The per-sample step is ``ceil((start - end) / num_steps)``, so every sample arrives within
    ``num_steps`` evaluations (an SDEdit from a noise level t* uses the same number of steps
    whatever t* is).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    start = start.long().to(x.device)
    end = torch.full_like(start, CLEAN) if end is None else end.long().to(x.device)
    if bool((end > start).any()):
        raise ValueError("DDIM sampling needs end <= start for every sample")
    step = torch.div(start - end + num_steps - 1, num_steps, rounding_mode="floor").clamp_min(1)
    return ddim_walk(eps_fn, x, start, end, step, alphas_cumprod).x
