"""The ``Teacher`` interface: a frozen 2D diffusion model that judges renders.

Every teacher works in its own sample space ``x0`` of shape [B, C, h, w] (pixels in [-1, 1]
for pixel teachers, VAE latents for latent teachers) with the DDPM forward process
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` over ``num_train_timesteps`` steps.

Clip (video) teachers have ``frames_per_clip = F > 1``: they judge the cameras as B clips of F
frames (``Cameras.frames``, clip-major), ``encode_images`` maps renders [B*F, H, W, 3] to x0
[B, C, F, h, w], their noise predictions have that shape and ``decode`` inverts it to
[B*F, H, W, 3]. Image teachers (F = 1) keep [B, C, h, w].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lift3d.cameras import Cameras


@dataclass
class Conditioning:
    """Per-sample conditional and unconditional (negative-prompt) payloads for one batch.

    The payload types belong to the teacher that made them (text embeddings for diffusers,
    Gaussian-mixture components for the analytic teacher); guidance code only passes them on.
    """

    cond: Any
    """Conditional payload for the B samples."""
    uncond: Any | None
    """Unconditional / negative payload for the B samples (None when not asked for)."""
    view_labels: list[str]
    """The view label (front/side/back/overhead) each sample was conditioned on."""
    view_independent: Any | None = None
    """The conditional payload without view-dependent prompting (VSD's student uses it), if the teacher has one."""


@dataclass
class NoisePrediction:
    """Noise predicted by the teacher for both branches, each [B, C, h, w]."""

    cond: Tensor
    uncond: Tensor | None

    def cfg(self, guidance_scale: float) -> Tensor:
        """Classifier-free guidance, diffusers convention: ``uncond + s (cond - uncond)``.

        s = 1 gives the conditional prediction and s = 0 the unconditional one. (threestudio's
        SDS uses ``cond + s (cond - uncond)``, i.e. our ``s + 1``.)
        """
        if self.uncond is None:
            if guidance_scale != 1.0:
                raise ValueError(f"guidance scale {guidance_scale} needs the unconditional branch, which was not computed")
            return self.cond
        return self.uncond + guidance_scale * (self.cond - self.uncond)


class Teacher(nn.Module, ABC):
    """A frozen diffusion prior. Subclasses register ``alphas_cumprod`` as a buffer."""

    alphas_cumprod: Tensor
    """[T] cumulative product of (1 - beta_t)."""

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def frames_per_clip(self) -> int:
        """F: frames of one sample (1 = an image teacher; F > 1 = a clip teacher, x0 [B, C, F, h, w])."""
        return 1

    @property
    @abstractmethod
    def channels(self) -> int:
        """Channels C of the sample space x0."""

    @abstractmethod
    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> Any:
        """Parse/encode a prompt once per run; raise ``ValueError`` on an unusable prompt."""

    @abstractmethod
    def condition(
        self, prompt_state: Any, cameras: Cameras, view_dependent: bool = True, with_unconditional: bool = True
    ) -> Conditioning:
        """Per-step conditioning for a batch of cameras (view-dependent prompts pick per camera);
        ``with_unconditional=False`` skips the unconditional branch (CFG scale 1 needs none)."""

    @abstractmethod
    def encode_images(self, rgb: Tensor) -> Tensor:
        """Differentiable map from renders rgb [B, H, W, 3] in [0, 1] to x0 [B, C, h, w]
        (clip teachers: rgb [B*F, H, W, 3] to x0 [B, C, F, h, w])."""

    @abstractmethod
    def decode(self, x0: Tensor) -> Tensor:
        """Map x0 [B, C, h, w] back to rgb [B, H, W, 3] in [0, 1] (clip teachers: [B, C, F, h, w] to [B*F, H, W, 3])."""

    @abstractmethod
    def predict_noise(self, x_t: Tensor, t: Tensor, conditioning: Conditioning) -> NoisePrediction:
        """Noise prediction for both branches; ``t`` is [B] integer timesteps."""

    def text_embedding(self, prompts: list[str]) -> Tensor:
        """Frozen text embeddings [B, tokens, dim] of ``prompts`` (float32, on the teacher's device):
        what amortized generators (``lift3d.amortized``) are conditioned on. Every text teacher has
        one (CLIP/T5 hidden states for diffusers teachers, fixed token vectors for the analytic one)."""
        raise NotImplementedError(f"{type(self).__name__} has no text embedding")

    def text_embedding_identity(self) -> str:
        """A string that changes whenever ``text_embedding`` would (model, weights, settings):
        the key of on-disk embedding caches, together with the prompt."""
        return type(self).__qualname__

    def make_student(self) -> nn.Module:
        """A trainable copy-like model for VSD-type objectives, starting equal to the teacher."""
        raise NotImplementedError(f"{type(self).__name__} has no student model")

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The DDPM forward process at integer timesteps ``t`` [B]."""
        abar = self.alphas_cumprod.to(x0.device, x0.dtype)[t].view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def frames_to_clips(x: Tensor, frames: int) -> Tensor:
    """Per-frame samples [B*F, C, h, w] -> clips [B, C, F, h, w] (clip-major frames)."""
    if x.dim() != 4 or x.shape[0] % frames:
        raise ValueError(f"expected [B*{frames}, C, h, w], got {tuple(x.shape)}")
    return x.view(x.shape[0] // frames, frames, *x.shape[1:]).transpose(1, 2)


def clips_to_frames(x: Tensor) -> Tensor:
    """Clips [B, C, F, h, w] -> per-frame samples [B*F, C, h, w] (inverse of :func:`frames_to_clips`)."""
    if x.dim() != 5:
        raise ValueError(f"expected clips [B, C, F, h, w], got {tuple(x.shape)}")
    return x.transpose(1, 2).reshape(-1, x.shape[1], *x.shape[3:])


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Stable Diffusion's "scaled_linear" schedule, in float64 then cast to float32."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()
