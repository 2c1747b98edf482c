"""Explicit generation without score distillation (EG4D, DreamGaussian4D's driving video).

Instead of distilling scores, ``reconstruction`` first *samples* target images from its teacher
with the teacher's own sampler, then fits the representation to them by plain reconstruction
(L1 or L2 on the rendered pixels). The targets are the teacher's samples at a fixed set of cameras:
``views`` cameras on a ring, each a clip of ``times`` frames evenly spaced over t in [0, 1]
(:func:`lift3d.cameras.view_time_grid`). A clip teacher (``frames_per_clip = F``) samples each
view's whole clip jointly, as SVD samples a driving video; an image teacher samples frames one by one.

Sampler: deterministic DDIM (eta = 0) from pure noise at t = T - 1 down to the clean sample in
``sampler_steps`` steps, with classifier-free guidance ``guidance_scale``. For the EDM teacher
(Stable Video Diffusion, whose timesteps map to sigmas as ``lift3d.teachers.video`` documents)
a DDIM step in the variance-preserving x_t is exactly an Euler step of the probability-flow ODE in
sigma, i.e. the pipeline's Euler sampler (first order, no churn).

When they are sampled: lazily, on the step a target batch is first rendered. ``own_cameras`` walks
through the target batches in order on the first steps (so each batch is sampled with the
conditioning the trainer computes for exactly those cameras), then draws random batches. The
samples are a buffer of this module, so checkpoints hold them and resuming does not resample.

The optional refinement stage (EG4D's diffusion refinement, DreamGaussian4D's SVD refinement) is
a second pipeline stage with a score-distillation objective starting from this stage's run
(``configs/eg4d.yaml``), or a ``hybrid`` of this objective and ``sds``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.cameras import Cameras, TurntableConfig, view_time_grid
from lift3d.guidance.common import Guidance, GuidanceBaseConfig, GuidanceOutput
from lift3d.guidance.ddim import ddim_sample
from lift3d.registry import register
from lift3d.representations.base import RenderOutput
from lift3d.teachers.base import Conditioning, Teacher

logger = logging.getLogger(__name__)


@dataclass
class ReconstructionConfig(GuidanceBaseConfig):
    """Sample targets from the teacher once, then fit them by reconstruction (no score distillation)."""

    guidance_scale: float = 3.0
    """CFG scale of the sampler (diffusers convention; SVD's pipeline ramps 1 -> 3 over frames)."""
    views: TurntableConfig = field(default_factory=lambda: TurntableConfig(num_views=4, width=64, height=64))
    """The ring of target cameras (and their render size)."""
    times: int = 0
    """Frames per view, evenly spaced over [0, 1]; 0 = the teacher's frames_per_clip (1 for image teachers)."""
    sampler_steps: int = 50
    """DDIM steps of the sampler."""
    batch_size: int = 1
    """Target samples (clips for a clip teacher, images otherwise) rendered per step."""
    loss: Literal["l1", "l2"] = "l2"
    """Pixel loss between render and target (mean over pixels and channels)."""
    seed: int = 0
    """Seed of the sampler's initial noise (sample j uses seed + j, so samples do not depend on order)."""

    def validate(self) -> None:
        if self.times < 0 or self.sampler_steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"guidance.times must be >= 0, sampler_steps and batch_size >= 1; got {self.times},"
                f" {self.sampler_steps}, {self.batch_size}"
            )
        if self.loss not in ("l1", "l2"):
            raise ValueError(f"guidance.loss must be l1 or l2, got {self.loss!r}")


@register("guidance", "reconstruction", ReconstructionConfig)
class ReconstructionGuidance(Guidance):
    """Fits teacher samples at fixed cameras (EG4D / DreamGaussian4D's explicit generation)."""

    config: ReconstructionConfig

    def __init__(self, config: ReconstructionConfig, teacher: Teacher):
        super().__init__(config, teacher)
        config.validate()
        frames = teacher.frames_per_clip
        times = config.times or frames
        if times % frames:
            raise ValueError(
                f"guidance.times={times} must be a multiple of the teacher's frames_per_clip={frames}"
            )
        self.target_cameras = view_time_grid(config.views, times, include_end=True)
        self.frames = frames  # cameras per teacher sample
        self.num_samples = len(self.target_cameras) // frames
        self.num_batches = -(-self.num_samples // config.batch_size)
        H, W = config.views.height, config.views.width
        self.register_buffer("targets", torch.zeros(len(self.target_cameras), H, W, 3))
        self.register_buffer("sampled", torch.zeros(self.num_batches, dtype=torch.bool))

    # ------------------------------------------------------------------ cameras

    def batch_indices(self, batch: int) -> Tensor:
        """Camera indices of target batch ``batch`` (whole teacher samples, clip-major)."""
        b = self.config.batch_size
        samples = torch.arange(batch * b, min((batch + 1) * b, self.num_samples))
        return (samples[:, None] * self.frames + torch.arange(self.frames)[None, :]).reshape(-1)

    def batch_at(self, step: int) -> int:
        """The first steps visit every batch once, in order (sampling it); later steps draw one."""
        if step < self.num_batches:
            return step
        # a function of the step alone, so a resumed run draws the same batches
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        return int(torch.randint(self.num_batches, (1,), generator=generator))

    def own_cameras(self, step: int) -> Cameras:
        self._batch = self.batch_at(step)
        cameras = self.target_cameras[self.batch_indices(self._batch)]
        # keep the clip structure for clip teachers ([] indexing with a tensor drops it)
        return Cameras(cameras.c2w, cameras.fovy, cameras.width, cameras.height, cameras.elevation_deg,
                       cameras.azimuth_deg, cameras.distance, cameras.time, self.frames)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, like: Tensor, conditioning: Conditioning, first_sample: int) -> Tensor:
        """DDIM samples decoded to frames [N, H, W, 3] for the samples of ``conditioning``.

        ``like`` is an x0 of the right shape [B, ...] (the encoded render of the same cameras).
        """
        teacher = self.teacher
        generator = torch.Generator()
        noise = []
        for j in range(like.shape[0]):
            generator.manual_seed(self.config.seed + first_sample + j)
            noise.append(torch.randn(like.shape[1:], generator=generator))
        x = torch.stack(noise).to(like.device, like.dtype)
        T = teacher.num_train_timesteps
        scale = self.config.guidance_scale

        def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return teacher.predict_noise(x_t, t, conditioning).cfg(scale)

        start = torch.full((x.shape[0],), T - 1, dtype=torch.long, device=x.device)
        x0 = ddim_sample(eps_fn, x, start, self.config.sampler_steps, teacher.alphas_cumprod)
        return teacher.decode(x0)

    # ------------------------------------------------------------------ loss

    def forward(self, render: RenderOutput, conditioning: Conditioning, cameras: Cameras, step: int) -> GuidanceOutput:
        batch = getattr(self, "_batch", None)
        if batch is None or len(cameras) != len(self.batch_indices(batch)):
            raise RuntimeError("reconstruction renders its own cameras: call own_cameras(step) first (the trainer does)")
        index = self.batch_indices(batch).to(self.targets.device)
        rgb = render.rgb
        if not bool(self.sampled[batch]):
            with torch.no_grad():
                like = self.teacher.encode_images(rgb.detach())
            frames = self.sample(like, conditioning, batch * self.config.batch_size)
            frames = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=tuple(self.targets.shape[1:3]),
                                   mode="bilinear", align_corners=False, antialias=True).permute(0, 2, 3, 1)
            self.targets[index] = frames.to(self.targets).clamp(0.0, 1.0)
            self.sampled[batch] = True
            logger.info("reconstruction: sampled target batch %d/%d", int(self.sampled.sum()), self.num_batches)
        target = self.targets[index].to(rgb)
        if target.shape[1:3] != rgb.shape[1:3]:
            target = F.interpolate(target.permute(0, 3, 1, 2), size=rgb.shape[1:3], mode="bilinear",
                                   align_corners=False).permute(0, 2, 3, 1)
        difference = rgb[..., :3] - target
        value = difference.abs().mean() if self.config.loss == "l1" else difference.square().mean()
        loss = self.config.loss_weight * value
        logs = {"recon/loss": float(value.detach()), "recon/sampled": float(self.sampled.float().mean())}
        return GuidanceOutput(loss=loss, logs=logs)

    @property
    def needs_unconditional(self) -> bool:
        # the unconditional branch is needed only while a batch is still to be sampled with CFG
        return self.config.guidance_scale != 1.0 and not bool(self.sampled.all())
