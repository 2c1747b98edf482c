"""Metrics against ground truth (the analytic teacher provides it)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def psnr(prediction: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB per image of [B, H, W, C] images in [0, 1]."""
    mse = ((prediction.clamp(0, 1) - target.clamp(0, 1)) ** 2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-12))


def mean_psnr(prediction: Tensor, target: Tensor) -> float:
    """Mean over views of the per-view PSNR."""
    value = float(psnr(prediction, target).mean())
    return value if math.isfinite(value) else 120.0


def time_shifted(time: Tensor, clip_span: float = 1.0) -> Tensor:
    """``(t + span / 2) mod 1``: on the evaluation grid of times k / T this permutes the grid
    (when T span / 2 is a whole number), so a static render's margin is exactly 0."""
    return torch.remainder(time + 0.5 * clip_span, 1.0)


def time_margin_db(prediction: Tensor, target: Tensor, shifted_target: Tensor) -> float:
    """Mean over (view, time) of PSNR(render(t), truth(t)) - PSNR(render(t), truth(t + span / 2)).

    On a grid that the shift permutes, a static result scores exactly 0 (each truth appears once
    on either side); one that captured the motion matches its own time better (positive).
    Per-image PSNRs are capped at 120 dB (exact matches).
    """
    margin = psnr(prediction, target).clamp_max(120.0) - psnr(prediction, shifted_target).clamp_max(120.0)
    return float(margin.mean())
