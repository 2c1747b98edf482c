"""Weightings w(t) that some objectives need beyond ``common.weighting``.

``common.weighting`` knows ``sds``, ``uniform`` and ``fantasia3d``; this module delegates those to
it unchanged and adds the two that the interval and balanced objectives use:

- ``ism``: ``w = sqrt((1 - abar_t) / abar_t) = sigma_t / alpha_t`` (LucidDreamer ISM, Dreamer XL TSM).
- ``sqrt_abar``: ``w = sqrt(abar_t)`` (PlacidDreamer BSD, ``guidance/sd_utils.py::train_step_BSD``).

Kept apart only because ``common.py`` is shared; the two kinds belong in ``common.Weighting``.
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import Tensor

from lift3d.guidance.common import Weighting, expand_per_sample, weighting

ExtendedWeighting = Literal["sds", "uniform", "fantasia3d", "ism", "sqrt_abar"]
"""Every weighting an objective config may name."""

_COMMON = frozenset(get_args(Weighting))


def extended_weighting(kind: ExtendedWeighting, alphas_cumprod_t: Tensor) -> Tensor:
    """w(t) per sample from abar_t [B] (see the module docstring for the formulas)."""
    if kind in _COMMON:
        return weighting(kind, alphas_cumprod_t)  # type: ignore[arg-type]
    if kind == "ism":
        return ((1.0 - alphas_cumprod_t) / alphas_cumprod_t).sqrt()
    if kind == "sqrt_abar":
        return alphas_cumprod_t.sqrt()
    raise ValueError(f"unknown weighting {kind!r}; choose one of {', '.join(get_args(ExtendedWeighting))}")


def weight_like(kind: ExtendedWeighting, alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """w(t) for integer timesteps ``t`` [B], shaped [B, 1, 1, ...] to broadcast against ``like``."""
    abar = alphas_cumprod.to(like.device)[t]
    return expand_per_sample(extended_weighting(kind, abar), like).to(like.dtype)
