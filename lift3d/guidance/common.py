"""Machinery shared by every guidance objective: the interface, timestep sampling, weightings,
gradient hygiene and the surrogate loss. No objective re-implements any of these.

Objectives work on any sample shape [B, ...]: images [B, C, h, w] of image teachers and clips
[B, C, F, h, w] of clip teachers (``Teacher.frames_per_clip > 1``); per-sample values broadcast
with :func:`expand_per_sample` and losses reduce over every non-batch dim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lift3d.cameras import Cameras
from lift3d.config import Schedule
from lift3d.representations.base import RenderOutput
from lift3d.teachers.base import Conditioning, Teacher

Weighting = Literal["sds", "uniform", "fantasia3d"]


@dataclass
class GuidanceOutput:
    """The loss to back-propagate and scalars to log."""

    loss: Tensor
    """Scalar surrogate loss; only its gradient is meaningful."""
    logs: dict[str, float] = field(default_factory=dict)
    """Named scalars for metrics.jsonl (e.g. ``guidance/t_mean``, ``guidance/grad_norm``)."""


@dataclass
class TimestepConfig:
    """Which diffusion timesteps are sampled, as fractions of the teacher's T."""

    min_step_percent: Schedule = field(default_factory=lambda: Schedule(start=0.02))
    """Lower bound of t / T (a number, or a schedule)."""
    max_step_percent: Schedule = field(default_factory=lambda: Schedule(start=0.98))
    """Upper bound of t / T (a number, or a schedule; e.g. ProlificDreamer's step 0.98 -> 0.5)."""


class TimestepSampler:
    """Uniform integer timesteps in ``[int(T min%), int(T max%)]`` per sample, as threestudio."""

    def __init__(self, config: TimestepConfig, num_train_timesteps: int):
        self.config = config
        self.num_train_timesteps = num_train_timesteps

    def bounds(self, step: int) -> tuple[int, int]:
        T = self.num_train_timesteps
        low = int(T * self.config.min_step_percent(step))
        high = int(T * self.config.max_step_percent(step))
        low = min(max(low, 0), T - 1)
        high = min(max(high, low), T - 1)
        return low, high

    def sample(self, batch_size: int, step: int, device: torch.device) -> Tensor:
        low, high = self.bounds(step)
        return torch.randint(low, high + 1, (batch_size,), device=device)


def weighting(kind: Weighting, alphas_cumprod_t: Tensor) -> Tensor:
    """w(t) per sample from abar_t [B]: sds = 1 - abar, uniform = 1, fantasia3d = sqrt(abar)(1 - abar)."""
    if kind == "sds":
        return 1.0 - alphas_cumprod_t
    if kind == "uniform":
        return torch.ones_like(alphas_cumprod_t)
    if kind == "fantasia3d":
        return alphas_cumprod_t.sqrt() * (1.0 - alphas_cumprod_t)
    raise ValueError(f"unknown weighting {kind!r}; choose one of sds, uniform, fantasia3d")


def sanitize_gradient(grad: Tensor, clip: float | None) -> tuple[Tensor, int]:
    """Replace non-finite entries by 0 (the NaN guard) and clamp to ±clip; returns (grad, #non-finite)."""
    nonfinite = int((~torch.isfinite(grad)).sum())
    if nonfinite:
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if clip is not None and clip > 0:
        grad = grad.clamp(-clip, clip)
    return grad, nonfinite


def surrogate_loss(x0: Tensor, grad: Tensor) -> Tensor:
    """A loss whose gradient w.r.t. ``x0`` is ``grad / B`` (the value itself means nothing)."""
    target = (x0 - grad).detach()
    return 0.5 * F.mse_loss(x0, target, reduction="sum") / x0.shape[0]


def expand_per_sample(values: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, ...] broadcastable against ``like``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


@dataclass
class GuidanceBaseConfig:
    """Options every objective shares."""

    guidance_scale: float = 7.5
    """Classifier-free guidance scale s in the diffusers convention: eps_u + s (eps_c - eps_u)."""
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    """Timestep range and its annealing."""
    weighting: Weighting = "sds"
    """w(t): sds = 1 - abar_t, uniform = 1, fantasia3d = sqrt(abar_t)(1 - abar_t)."""
    grad_clip: Schedule | None = None
    """Clamp the per-element gradient to ±value (a number or a schedule; unset = off)."""
    loss_weight: float = 1.0
    """Multiplier on the guidance loss."""


@dataclass
class GuidanceTerm:
    """One (teacher, objective, weight, probability) entry that the training loop evaluates.

    A plain objective is one term; ``guidance.type: hybrid`` is several (4D-fy's image +
    3D-aware + video SDS, Dream-in-4D's stages). Each active term gets its own cameras: clips
    when its teacher's ``frames_per_clip > 1``, single frames otherwise.
    """

    name: str
    """Label of the term; hybrid runs log its scalars as ``<name>/<key>``."""
    teacher: Teacher
    """The frozen prior that judges this term's renders."""
    objective: "Guidance"
    """The objective that turns the judgement into a loss."""
    weight: float = 1.0
    """Multiplier on the objective's loss."""
    probability: float = 1.0
    """Chance that the term is active in a step (see ``HybridConfig.selection``)."""


class Guidance(nn.Module, ABC):
    """Turns the teacher's judgement of a render into a loss on the representation."""

    def __init__(self, config: GuidanceBaseConfig, teacher: Teacher):
        super().__init__()
        self.config = config
        # Kept out of the module tree: the frozen teacher must not land in checkpoints or in
        # guidance.parameters() (a Stable Diffusion teacher is gigabytes).
        object.__setattr__(self, "_teacher", teacher)
        self.timesteps = TimestepSampler(config.timesteps, teacher.num_train_timesteps)

    @abstractmethod
    def forward(self, render: RenderOutput, conditioning: Conditioning, cameras: Cameras, step: int) -> GuidanceOutput:
        """The loss for one batch of renders."""

    def param_groups(self) -> list[dict]:
        """Trainable state of the objective itself (LoRA, student); none by default."""
        return []

    def own_cameras(self, step: int) -> Cameras | None:
        """The cameras this objective must see at ``step`` (e.g. the views of reconstruction targets);
        None (every score-distillation objective): the trainer's camera sampler decides."""
        return None

    def terms(self) -> list[GuidanceTerm]:
        """Every term the loop may evaluate: one objective is one term of weight 1."""
        return [GuidanceTerm("guidance", self.teacher, self, 1.0, 1.0)]

    def active_terms(self, generator: torch.Generator, step: int) -> list[GuidanceTerm]:
        """The terms evaluated at ``step``; a single objective always is (and draws nothing)."""
        return self.terms()

    @property
    def teacher(self) -> Teacher:
        return self._teacher

    @property
    def needs_unconditional(self) -> bool:
        """Whether the teacher must compute the unconditional branch (CFG with s != 1)."""
        return self.config.guidance_scale != 1.0

    # Helpers for subclasses -----------------------------------------------------------------

    def clip_value(self, step: int) -> float | None:
        return None if self.config.grad_clip is None else self.config.grad_clip(step)

    def finish(self, x0: Tensor, grad: Tensor, t: Tensor, step: int, logs: dict[str, float]) -> GuidanceOutput:
        """NaN guard, clipping and the surrogate loss, with the logs every objective reports."""
        grad, nonfinite = sanitize_gradient(grad, self.clip_value(step))
        loss = self.config.loss_weight * surrogate_loss(x0, grad)
        logs = {
            "guidance/t_mean": float(t.float().mean()),
            "guidance/grad_norm": float(grad.norm() / x0.shape[0]),
            "guidance/nonfinite": float(nonfinite),
            **logs,
        }
        return GuidanceOutput(loss=loss, logs=logs)
