"""DeepFloyd IF stage I as a teacher: a pixel-space UNet at 64x64 conditioned on T5 embeddings.

The UNet predicts eps and a learned variance (6 output channels); only the first 3 are used.
Everything else (model resolution, prompts, CFG batching, Perp-Neg, the student) is
``DiffusersTeacher``'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lift3d.registry import register
from lift3d.teachers.diffusers_sd import (
    DiffusersTeacher,
    DiffusersTeacherConfig,
    _load_component,
    _read_json,
    _resize,
    _TextModels,
    _transformers_dtype_kwarg,
    _warn_truncated,
)

logger = logging.getLogger(__name__)


@dataclass
class DeepFloydTeacherConfig(DiffusersTeacherConfig):
    """DeepFloyd IF stage I (pixel space, T5-XXL text encoder) from diffusers."""

    model: str = "DeepFloyd/IF-I-XL-v1.0"
    """Hub id (read from the local Hugging Face cache; gated: accept the licence first) or a local diffusers folder."""
    resolution: int = 64
    """Renders are resized (bilinear) to this square size; IF stage I works at 64."""
    text_max_length: int = 77
    """Tokens the T5 encoder sees (the IF pipeline uses 77)."""

    def validate(self) -> None:
        super().validate()
        if self.resolution < 8:
            raise ValueError(f"teacher.resolution must be at least 8, got {self.resolution}")
        if self.text_max_length < 2:
            raise ValueError(f"teacher.text_max_length must be at least 2, got {self.text_max_length}")


@register("teacher", "deepfloyd-if", DeepFloydTeacherConfig)
class DeepFloydTeacher(DiffusersTeacher):
    """DeepFloyd IF stage I: x0 are pixels in [-1, 1] at ``resolution``; T5 text embeddings."""

    FAMILY = "DeepFloyd IF"
    ACCESS_HINT = (
        "The IF weights are gated: accept the licence on huggingface.co and log in first (`hf auth login`)."
    )
    config: DeepFloydTeacherConfig

    def __init__(self, config: DeepFloydTeacherConfig | None = None):
        super().__init__(config or DeepFloydTeacherConfig())
        if self.unet.config.in_channels != 3:
            raise ValueError(
                f"{self.model_folder}: a pixel IF UNet takes 3 channels, this one {self.unet.config.in_channels}"
            )

    @property
    def channels(self) -> int:
        return 3

    def encode_images(self, rgb: Tensor) -> Tensor:
        """Renders [B, H, W, 3] in [0, 1] -> pixels [B, 3, resolution, resolution] in [-1, 1] (bilinear)."""
        if rgb.dim() != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"encode_images expects rgb [B, H, W, 3], got {tuple(rgb.shape)}")
        return 2.0 * _resize(rgb.permute(0, 3, 1, 2), self.config.resolution).float() - 1.0

    def decode(self, x0: Tensor) -> Tensor:
        """Pixels [B, 3, h, w] in [-1, 1] -> rgb [B, h, w, 3] in [0, 1]."""
        return ((x0 + 1.0) * 0.5).clamp(0.0, 1.0).permute(0, 2, 3, 1)

    # ------------------------------------------------------------------ text

    def _preprocess_text(self, text: str) -> str:
        return text.lower().strip()  # the IF pipeline's preprocessing without caption cleaning

    def _load_text_models(self, dtype: torch.dtype) -> tuple[Any, nn.Module]:
        from transformers import AutoTokenizer, T5EncoderModel

        tokenizer = _load_component(AutoTokenizer, self.model_folder, "tokenizer")
        encoder = _load_component(
            T5EncoderModel, self.model_folder, "text_encoder", variant=self.config.variant,
            **_transformers_dtype_kwarg(dtype),
        )
        return tokenizer, encoder

    def _encode_text(self, texts: list[str], models: _TextModels) -> Tensor:
        length = self.config.text_max_length
        tokens = models.tokenizer(
            texts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
            return_tensors="pt",
        )
        _warn_truncated(models.tokenizer, texts, length)
        device = models.device
        return models.encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0].float()

    def _embedding_shape(self) -> tuple[int, int] | None:
        config = _read_json(self.model_folder / "text_encoder" / "config.json")
        if not isinstance(config, dict) or "d_model" not in config:
            return None
        return self.config.text_max_length, int(config["d_model"])
