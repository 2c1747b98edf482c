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
