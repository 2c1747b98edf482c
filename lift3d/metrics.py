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
    """``t + span / 2``, reflected to ``t - span / 2`` where that would leave [0, 1]."""
    half = 0.5 * clip_span
    return torch.where(time + half <= 1.0 + 1e-6, time + half, time - half)


def time_margin_db(prediction: Tensor, target: Tensor, shifted_target: Tensor) -> float:
    """Mean over (view, time) of PSNR(render(t), truth(t)) - PSNR(render(t), truth(t + span / 2)).

    A static result is as far from both truths (≈ 0 dB); one that captured the motion matches
    its own time better (positive). Per-image PSNRs are capped at 120 dB (exact matches).
    """
    margin = psnr(prediction, target).clamp_max(120.0) - psnr(prediction, shifted_target).clamp_max(120.0)
    return float(margin.mean())
