"""Turntable videos (MP4 through imageio-ffmpeg) and PNG strips of rendered views."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch import Tensor

logger = logging.getLogger(__name__)


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, H, W, 3] floats in [0, 1] -> uint8 numpy."""
    return (images.detach().clamp(0.0, 1.0) * 255.0 + 0.5).to("cpu").numpy().astype(np.uint8)


def write_png(path: Path, image: np.ndarray) -> None:
    """Write one uint8 image [H, W, 3]."""
    import imageio.v3 as iio

    iio.imwrite(path, image)


def write_strip(path: Path, images: Tensor) -> None:
    """Views [B, H, W, 3] side by side in one PNG."""
    frames = to_uint8(images)
    write_png(path, np.concatenate(list(frames), axis=1))


def write_video(path: Path, frames: Tensor, fps: int) -> None:
    """Frames [F, H, W, 3] as an H.264 MP4 (yuv420p, readable by browsers and players)."""
    import imageio.v2 as imageio

    data = to_uint8(frames)
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, pixelformat="yuv420p", macro_block_size=1) as writer:
        for frame in data:
            writer.append_data(frame)
