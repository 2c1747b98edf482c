"""The ``Representation`` interface: a differentiable 3D scene that renders a batch of cameras."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lift3d.cameras import Cameras


@dataclass
class RenderOutput:
    """What every representation renders for B cameras of H×W pixels."""

    rgb: Tensor
    """[B, H, W, C] colour composited over the background."""
    alpha: Tensor
    """[B, H, W, 1] accumulated opacity."""
    depth: Tensor | None = None
    """[B, H, W, 1] expected camera-space depth (weights times depth, not normalised)."""
    normal: Tensor | None = None
    """[B, H, W, 3] world-space normals where the representation has them."""
    aux: dict[str, Tensor] = field(default_factory=dict)
    """Extras a representation's own regularisers or hooks need (e.g. screen-space means)."""


class Representation(nn.Module, ABC):
    """A 3D scene with trainable parameters.

    Dynamic representations (``is_dynamic = True``) render each camera at its ``Cameras.time``
    (static ones ignore it); a deformation-based one also exposes
    ``deform(points [P, 3], time: float) -> [P, 3]`` (canonical space to time t).
    """

    is_dynamic: bool = False
    """Whether renders depend on ``Cameras.time``."""

    @abstractmethod
    def render(self, cameras: Cameras, background: Tensor) -> RenderOutput:
        """Render ``cameras`` (at ``cameras.time`` when dynamic); ``background`` is an RGB [3] colour composited behind the scene."""

    @abstractmethod
    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups with their learning rates."""

    def regularization(self, render: RenderOutput, step: int) -> dict[str, Tensor]:
        """Named, already-weighted regularisation losses for this step (none by default)."""
        return {}

    def on_step(self, step: int, render: RenderOutput, optimizer: torch.optim.Optimizer) -> None:
        """Called after each optimizer step (densification, grid updates...)."""

    def export(self, directory: Path, formats: list[str]) -> list[Path]:
        """Write the representation in each of ``formats`` into ``directory``; return the files."""
        raise NotImplementedError(f"{type(self).__name__} cannot export {formats}")
