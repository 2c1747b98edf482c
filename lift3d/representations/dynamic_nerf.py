"""Dynamic hash-grid NeRF for text-to-4D: a NeRF (``nerf.py``: render path, occupancy grid,
chunked rendering, shading, regularisers) whose field also depends on time, in two variants
(``variant``):

* ``space_time`` (4D-fy's ``TCNNEncodingSpatialTime``): a static 3-D hash grid plus a space-time
  4-D hash grid over ``(x, y, z, t)``; their features are summed (4D-fy) or concatenated before
  the density and colour heads.
* ``deformation`` (Dream-in-4D; 4D-fy's ``HashGridSpatialTimeDeform``): a static NeRF queried at
  ``x' = x + D(x, t)``, where the displacement ``D`` is an MLP on the 4-D hash grid's features.
  Its last layer starts at zero, so a fresh model is the static one at every time.
  ``deform(points, t)`` maps canonical points to time t (the inverse warp, by fixed-point
  iteration), which the animated export uses.

Each camera renders at its ``Cameras.time`` (static cameras at t = 0). The occupancy grid must
hold matter at any time, so it is refreshed with the largest density over ``occupancy_times``
stratified random times. ``init_from`` starts from a static ``nerf`` run (the static grid and
heads are loaded, the time-dependent part starts neutral, so the first render equals the
static model's), optionally frozen (``freeze_canonical``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lift3d.cameras import Cameras
from lift3d.checkpoint import load_checkpoint, resolve_init_from
from lift3d.config import Schedule
from lift3d.kernels.hashgrid import HashGridConfig, HashGridEncoding
from lift3d.registry import register
from lift3d.representations.base import RenderOutput
from lift3d.representations.nerf import NeRF, NeRFConfig, NeRFLearningRates, _mlp

logger = logging.getLogger(__name__)

VARIANTS = ("space_time", "deformation")
COMBINES = ("sum", "concat")


@dataclass
class DynamicNeRFLearningRates(NeRFLearningRates):
    """Adam learning rates (4D-fy stage 3: static grid 1e-4 when fine-tuning, time grid 1e-2)."""

    space_time: float = 0.01
    """The 4-D hash table."""
    deformation: float = 0.001
    """The displacement MLP (deformation variant)."""


@dataclass
class DynamicNeRFConfig(NeRFConfig):
    """A NeRF whose field changes with time: a space-time grid (4D-fy) or a deformation (Dream-in-4D)."""

    variant: Literal["space_time", "deformation"] = "space_time"
    """``space_time``: static + space-time grid features into the heads; ``deformation``: a static field at ``x + D(x, t)``."""
    space_time_encoding: HashGridConfig = field(
        default_factory=lambda: HashGridConfig(
            n_levels=16, n_features_per_level=2, log2_hashmap_size=17, base_resolution=4, per_level_scale=1.26,
            n_input_dims=4,
        )
    )
    """The 4-D hash grid over (x, y, z, t) in [0, 1]^4 (``n_input_dims`` must be 4; resolutions 4 -> 128
    here, in space and time alike); it feeds the heads (space_time) or the displacement MLP (deformation)."""
    combine: Literal["sum", "concat"] = "sum"
    """space_time: how static and space-time features meet; ``sum`` (4D-fy) needs equal encoding widths."""
    deformation_hidden_dim: int = 32
    """Width of the displacement MLP."""
    deformation_hidden_layers: int = 1
    """Hidden layers of the displacement MLP."""
    deform_iterations: int = 8
    """Fixed-point iterations of ``deform`` (the inverse of x -> x + D(x, t)); enough while D is a contraction."""
    occupancy_times: int = 4
    """Times (one per stratum of [0, 1], jittered per update) whose largest density refreshes the occupancy grid."""
    init_from: str = ""
    """A static ``nerf`` run folder or checkpoint to start from (same radius, encoding and heads); empty = fresh."""
    freeze_canonical: bool = False
    """Keep the static part fixed: its hash grid (space_time), or its grid and heads (deformation)."""
    lambda_deformation_smoothness: Schedule = field(default_factory=Schedule)
    """Weight of mean |D(x + e, t) - D(x, t)|^2 / |e|^2 at the render's samples, e a random step of
    ``finite_difference_eps`` (Dream-in-4D's spatial displacement regulariser)."""
    lr: DynamicNeRFLearningRates = field(default_factory=DynamicNeRFLearningRates)
    """Learning rates."""


@register("representation", "dynamic-nerf", DynamicNeRFConfig)
class DynamicNeRF(NeRF):
    """A NeRF rendered at each camera's time; ``variant`` picks the class (``DeformableNeRF`` for deformation)."""

    is_dynamic = True

    def __new__(cls, config: DynamicNeRFConfig, generator: torch.Generator | None = None):
        # One registered name, two classes: only the deformation variant has ``deform``.
        if cls is DynamicNeRF and getattr(config, "variant", None) == "deformation":
            cls = DeformableNeRF
        return super().__new__(cls)

    def __init__(self, config: DynamicNeRFConfig, generator: torch.Generator | None = None):
        _validate(config)
        super().__init__(config, generator)
        self.config: DynamicNeRFConfig = config
        self.space_time_encoding = HashGridEncoding(config.space_time_encoding, tier=config.kernel_tier or None)
        self.deformation_network: nn.Sequential | None = None
        if config.variant == "space_time" and config.combine == "concat":
            width = self.encoding.output_dim + self.space_time_encoding.output_dim
            self.network = _mlp(width, 1 + self.field_channels, config.hidden_dim, config.hidden_layers)
        if config.variant == "deformation":
            self.deformation_network = _mlp(
                self.space_time_encoding.output_dim, 3, config.deformation_hidden_dim, config.deformation_hidden_layers
            )
            with torch.no_grad():  # D = 0 at the start: a fresh (or freshly loaded static) model is the static one
                self.deformation_network[-1].weight.zero_()
                self.deformation_network[-1].bias.zero_()
        self._time = 0.0  # the time the field is evaluated at (set per camera group while rendering)
        self._smoothness_terms: list[Tensor] = []
        if config.init_from:
            self._load(config.init_from)
        if config.freeze_canonical:
            for module in self._canonical_modules():
                module.requires_grad_(False)

    # ---------------------------------------------------------------------------------- field

    @contextlib.contextmanager
    def at_time(self, time: float) -> Iterator[None]:
        """Evaluate the field (``density``, ``albedo``, ...) at ``time`` inside the block."""
        previous, self._time = self._time, float(time)
        try:
            yield
        finally:
            self._time = previous

    def _with_time(self, unit: Tensor) -> Tensor:
        """Unit-cube points [N, 3] -> space-time points [N, 4] at the current time."""
        return torch.cat([unit, unit.new_full((unit.shape[0], 1), self._time)], dim=-1)

    def _features(self, unit: Tensor) -> Tensor:
        static = self.encoding(unit)
        dynamic = self.space_time_encoding(self._with_time(unit))
        if self.config.combine == "concat":
            return torch.cat([static, dynamic], dim=-1)
        return static + dynamic

    def occupancy_density(self, points: Tensor) -> Tensor:
        """The largest density [N] at world points [N, 3] over ``occupancy_times`` stratified random
        times: matter anywhere at any time must stay marchable."""
        count = self.config.occupancy_times
        times = (torch.arange(count, dtype=torch.float64) + torch.rand(count, dtype=torch.float64)) / count
        sigmas = []
        for time in times.tolist():
            with self.at_time(time):
                sigmas.append(self.density(points))
        return torch.stack(sigmas).amax(dim=0)

    # --------------------------------------------------------------------------------- render

    def render(self, cameras: Cameras, background: Tensor) -> RenderOutput:
        """Render each run of consecutive cameras that share a time at that time (a clip's frames
        render one by one; a static batch, all at t = 0, in one go)."""
        times = cameras.times().tolist()
        starts = [i for i in range(len(times)) if i == 0 or times[i] != times[i - 1]] + [len(times)]
        parts = []
        for first, last in zip(starts, starts[1:]):
            subset = cameras if (first, last) == (0, len(times)) else cameras[first:last]
            with self.at_time(times[first]):
                part = super().render(subset, background)
            if self._smoothness_terms:
                part.aux["deformation_smoothness"] = torch.stack(self._smoothness_terms).mean()
                self._smoothness_terms = []
            parts.append((last - first, part))
        return parts[0][1] if len(parts) == 1 else _concatenate(parts)

    # ---------------------------------------------------------------------------- training

    def _canonical_modules(self) -> list[nn.Module]:
        """What ``freeze_canonical`` freezes: the static hash grid (the heads also read the space-time features)."""
        return [self.encoding]

    def param_groups(self) -> list[dict]:
        frozen = set()
        if self.config.freeze_canonical:
            frozen = {id(p) for module in self._canonical_modules() for p in module.parameters()}
        groups = []
        for group in super().param_groups():
            params = [p for p in group["params"] if id(p) not in frozen]
            if params:
                groups.append({**group, "params": params})
        lr = self.config.lr
        groups.append({"name": "space_time", "params": list(self.space_time_encoding.parameters()), "lr": lr.space_time})
        if self.deformation_network is not None:
            groups.append({"name": "deformation", "params": list(self.deformation_network.parameters()), "lr": lr.deformation})
        return groups

    def regularization(self, render: RenderOutput, step: int) -> dict[str, Tensor]:
        losses = super().regularization(render, step)
        weight = self.config.lambda_deformation_smoothness(step)
        if weight > 0 and "deformation_smoothness" in render.aux:
            losses["deformation_smoothness"] = weight * render.aux["deformation_smoothness"]
        return losses

    def _load(self, source: str) -> None:
        """Load a static NeRF run (grid, heads, background, occupancy; the dynamic part stays neutral)
        or a dynamic-nerf run of the same shape (everything)."""
        state = load_checkpoint(resolve_init_from(source))["representation"]
        own = self.state_dict()
        dynamic = ("space_time_encoding.", "deformation_network.")
        bad = [k for k in state if k not in own or (own[k].shape != state[k].shape and not self._widened(k, state[k]))]
        missing = [k for k in own if k not in state and not k.startswith(dynamic)]
        if bad or missing:
            raise ValueError(
                f"representation.init_from={source}: not a NeRF checkpoint with this radius, encoding and heads "
                f"(mismatched: {bad[:4]}, missing: {missing[:4]})"
            )
        with torch.no_grad():
            for key, value in state.items():
                if own[key].shape != value.shape:
                    # concat: the static columns of the first head layer come from the static run and
                    # the space-time columns start at zero, so the model starts as the static one.
                    own[key].zero_()
                    own[key][:, : value.shape[1]].copy_(value)
                else:
                    own[key].copy_(value)
        logger.info("initialised from %s (%d tensors)", source, len(state))

    def _widened(self, key: str, value: Tensor) -> bool:
        """Whether ``value`` is a static NeRF's first head layer, narrower than this one's under concat."""
        own = self.network[0].weight
        return (
            key == "network.0.weight" and self.config.combine == "concat" and self.config.variant == "space_time"
            and value.dim() == 2 and value.shape[0] == own.shape[0] and value.shape[1] == self.encoding.output_dim
        )


class DeformableNeRF(DynamicNeRF):
    """The deformation variant: the static field at ``x + D(x, t)`` (``DynamicNeRF`` builds it for
    ``variant: deformation``)."""

    deformation_network: nn.Sequential
    _canonical = False
    """While set, the field is the canonical (static) one, with no displacement."""

    @contextlib.contextmanager
    def canonical(self) -> Iterator[None]:
        """Evaluate the canonical field (no displacement) inside the block."""
        previous, self._canonical = self._canonical, True
        try:
            yield
        finally:
            self._canonical = previous

    def _features(self, unit: Tensor) -> Tensor:
        return self.encoding(unit)

    def displacement(self, points: Tensor, time: float | None = None) -> Tensor:
        """D(x, t) [N, 3] (world units) at world points [N, 3], at ``time`` (default: the current one)."""
        with self.at_time(self._time if time is None else time):
            unit = (points / self.config.radius + 1.0) * 0.5
            return self.deformation_network(self.space_time_encoding(self._with_time(unit)))

    def _raw(self, points: Tensor) -> tuple[Tensor, Tensor]:
        if self._canonical:
            return super()._raw(points)
        offset = self.displacement(points)
        if self.training and _active(self.config.lambda_deformation_smoothness):
            eps = self.config.finite_difference_eps
            step = F.normalize(torch.randn_like(points), dim=-1) * eps
            self._smoothness_terms.append((self.displacement(points + step) - offset).square().sum(-1).mean() / eps**2)
        return super()._raw(points + offset)

    def deform(self, points: Tensor, time: float) -> Tensor:
        """Canonical points [P, 3] -> where they are at ``time`` [P, 3]: the x with x + D(x, t) = p,
        by ``deform_iterations`` fixed-point steps x <- p - D(x, t) (exact for D = 0)."""
        x = points
        for _ in range(self.config.deform_iterations):
            x = points - self.displacement(x, time)
        return x

    @torch.no_grad()
    def surface(self, chunk: int = 1 << 18) -> tuple["trimesh.Trimesh", object]:  # noqa: F821
        """The canonical mesh (the static field, no displacement; ``deform`` moves it to a time) and its colours."""
        with self.canonical():
            mesh, _ = super().surface(chunk)
        return mesh, self.canonical_albedo

    def canonical_albedo(self, points: Tensor) -> Tensor:
        """Albedo [N, 3] of the canonical (static) field at points [N, 3]."""
        with self.canonical():
            return self.albedo(points)

    def _canonical_modules(self) -> list[nn.Module]:
        """The static field: its hash grid and heads."""
        return [self.encoding, self.network]


def _active(schedule: Schedule) -> bool:
    """Whether a loss weight is ever non-zero."""
    return schedule.start > 0 or (schedule.end or 0) > 0


def _validate(config: DynamicNeRFConfig) -> None:
    if config.variant not in VARIANTS:
        raise ValueError(f"representation.variant={config.variant!r}; choose one of {', '.join(VARIANTS)}")
    if config.combine not in COMBINES:
        raise ValueError(f"representation.combine={config.combine!r}; choose one of {', '.join(COMBINES)}")
    space_time = config.space_time_encoding
    if space_time.n_input_dims != 4:
        raise ValueError(
            f"representation.space_time_encoding.n_input_dims must be 4 (x, y, z, t), got {space_time.n_input_dims}"
        )
    if config.variant == "space_time" and config.combine == "sum" and space_time.output_dim != config.encoding.output_dim:
        raise ValueError(
            "representation.combine=sum needs equal encoding widths: encoding has "
            f"{config.encoding.output_dim} = levels x features, space_time_encoding {space_time.output_dim}; "
            "match n_levels and n_features_per_level or use combine=concat"
        )
    if config.occupancy_times < 1:
        raise ValueError(f"representation.occupancy_times must be >= 1, got {config.occupancy_times}")
    if config.deform_iterations < 1:
        raise ValueError(f"representation.deform_iterations must be >= 1, got {config.deform_iterations}")


def _concatenate(parts: list[tuple[int, RenderOutput]]) -> RenderOutput:
    """One RenderOutput from per-time-group renders, cameras in order (scalar extras: camera-weighted means)."""
    outputs = [p for _, p in parts]
    counts = torch.tensor([float(n) for n, _ in parts])

    def cat(name: str) -> Tensor | None:
        values = [getattr(o, name) for o in outputs]
        return None if any(v is None for v in values) else torch.cat(values, dim=0)

    aux: dict[str, Tensor] = {}
    for key in outputs[0].aux:
        values = [o.aux[key] for o in outputs if key in o.aux]
        if len(values) != len(outputs):
            continue
        if values[0].dim() == 0:
            aux[key] = (torch.stack(values) * counts.to(values[0]) / counts.sum()).sum()
        else:  # per-sample values (e.g. weights), group after group
            aux[key] = torch.cat(values, dim=0)
    return RenderOutput(rgb=cat("rgb"), alpha=cat("alpha"), depth=cat("depth"), normal=cat("normal"), aux=aux)
