"""Dynamic 3D Gaussians: canonical 3DGS plus a deformation field over (x, t).

As DreamGaussian4D and 4DGen: a HexPlane / K-planes field (six feature planes xy, xz, yz, xt,
yt, zt, bilinearly sampled and multiplied, at one or more spatial resolutions) feeds a small MLP
whose heads give each Gaussian's Δposition, Δlog-scale and Δrotation (a quaternion offset) at
time t. The canonical Gaussians are :class:`lift3d.representations.gaussians.Gaussians` (their
density control included); the output heads start at zero, so at initialisation every time
renders the canonical scene. Regularisers: total variation of the spatial planes, smoothness
(second differences) of the time planes along t, and L1 of the time planes' deviation from 1.

``init_from`` a static Gaussians run (its checkpoint's canonical parameters; the deformation
starts at identity), optionally with the canonical part frozen (Dream-in-4D's stage 2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lift3d.cameras import Cameras
from lift3d.checkpoint import load_checkpoint, resolve_init_from
from lift3d.kernels.gaussian_raster import project_gaussians, rasterize_gaussians
from lift3d.registry import register
from lift3d.render.gaussian import sh_to_color
from lift3d.representations.base import RenderOutput
from lift3d.representations.gaussians import PARAMETER_NAMES, Gaussians, GaussiansConfig

logger = logging.getLogger(__name__)

SPATIAL_PLANES = ((0, 1), (0, 2), (1, 2))
"""Coordinate pairs of the space-only planes (xy, xz, yz)."""
TIME_PLANES = ((0, 3), (1, 3), (2, 3))
"""Coordinate pairs of the space-time planes (xt, yt, zt); coordinate 3 is t."""


@dataclass
class DeformationConfig:
    """The HexPlane deformation field and its MLP."""

    resolutions: tuple[int, ...] = (32,)
    """Spatial resolutions of the plane sets (features of each set are concatenated)."""
    time_resolution: int = 16
    """Cells along t of the space-time planes."""
    features: int = 8
    """Channels per plane."""
    bound: float = 1.5
    """Half side of the cube [-bound, bound]^3 the planes cover (points outside are clamped)."""
    hidden: int = 64
    """Width of the MLP."""
    layers: int = 2
    """Hidden layers of the MLP."""
    scale_deform: bool = True
    """Predict Δlog-scale (DreamGaussian4D); false keeps canonical scales."""
    rotation_deform: bool = True
    """Predict Δrotation; false keeps canonical rotations."""


@dataclass
class DynamicLearningRates:
    """Learning rates of the deformation field."""

    planes: float = 0.01
    """HexPlane features."""
    mlp: float = 0.001
    """The MLP and its heads."""


@dataclass
class DynamicGaussiansConfig(GaussiansConfig):
    """Canonical 3D Gaussians deformed over time by a HexPlane field (``dynamic-gaussians``)."""

    deformation: DeformationConfig = field(default_factory=DeformationConfig)
    """The deformation field."""
    deformation_lr: DynamicLearningRates = field(default_factory=DynamicLearningRates)
    """Learning rates of the deformation field."""
    init_from: str = ""
    """A static ``gaussians`` (or ``dynamic-gaussians``) run folder or checkpoint whose Gaussians
    become the canonical ones; empty = the ``init`` of ``GaussiansConfig``."""
    freeze_canonical: bool = False
    """Train only the deformation (the canonical Gaussians fixed, their density control off)."""
    plane_tv_weight: float = 1e-3
    """Weight of the total variation of the spatial planes."""
    time_smoothness_weight: float = 1e-2
    """Weight of the squared second difference of the space-time planes along t."""
    time_l1_weight: float = 1e-4
    """Weight of the L1 distance of the space-time planes from 1 (no motion)."""


class HexPlaneField(nn.Module):
    """Features [P, sum_res features] of points (x, t): product of the six planes' samples per resolution."""

    def __init__(self, config: DeformationConfig, generator: torch.Generator):
        super().__init__()
        self.config = config
        self.planes = nn.ParameterList()
        for resolution in config.resolutions:
            for axes in SPATIAL_PLANES + TIME_PLANES:
                size = [resolution if a < 3 else config.time_resolution for a in axes]
                if 3 in axes:  # space-time planes start at 1: multiplying by them changes nothing
                    values = torch.ones(1, config.features, size[1], size[0])
                else:  # K-planes' init: positive features that differ from place to place
                    values = 0.1 + 0.4 * torch.rand(1, config.features, size[1], size[0], generator=generator)
                self.planes.append(nn.Parameter(values))

    @property
    def output_dim(self) -> int:
        return self.config.features * len(self.config.resolutions)

    def _sample(self, plane: Tensor, coords: Tensor) -> Tensor:
        """Bilinear samples [P, C] of one plane at coordinates [P, 2] in [-1, 1]."""
        grid = coords.reshape(1, -1, 1, 2).to(plane.dtype)
        return F.grid_sample(plane, grid, mode="bilinear", align_corners=True).view(plane.shape[1], -1).t()

    def forward(self, points: Tensor, times: Tensor) -> Tensor:
        """Features [T, P, D] of world points [P, 3] at each of the times [T] in [0, 1].

        The spatial planes are sampled once for all times (they do not depend on t).
        """
        T, P = times.shape[0], points.shape[0]
        space = (points / self.config.bound).clamp(-1.0, 1.0)
        time = (2.0 * times - 1.0).to(space.dtype).view(T, 1, 1).expand(T, P, 1)
        spacetime = torch.cat([space.unsqueeze(0).expand(T, P, 3), time], dim=-1).reshape(T * P, 4)
        features, index = [], 0
        for _ in self.config.resolutions:
            spatial = None
            for axes in SPATIAL_PLANES:
                sample = self._sample(self.planes[index], space[:, list(axes)])
                spatial = sample if spatial is None else spatial * sample
                index += 1
            product = spatial.unsqueeze(0)
            for axes in TIME_PLANES:
                product = product * self._sample(self.planes[index], spacetime[:, list(axes)]).view(T, P, -1)
                index += 1
            features.append(product)
        return torch.cat(features, dim=-1)

    def spatial_planes(self) -> list[Tensor]:
        per_set = len(SPATIAL_PLANES) + len(TIME_PLANES)
        return [p for i, p in enumerate(self.planes) if i % per_set < len(SPATIAL_PLANES)]

    def time_planes(self) -> list[Tensor]:
        per_set = len(SPATIAL_PLANES) + len(TIME_PLANES)
        return [p for i, p in enumerate(self.planes) if i % per_set >= len(SPATIAL_PLANES)]


class Deformation(nn.Module):
    """(x, t) -> (Δx [P, 3], Δlog-scale [P, 3], Δquat [P, 4]); zero at initialisation."""

    def __init__(self, config: DeformationConfig, generator: torch.Generator):
        super().__init__()
        self.config = config
        self.field = HexPlaneField(config, generator)
        layers: list[nn.Module] = []
        width = self.field.output_dim
        for _ in range(config.layers):
            layers += [nn.Linear(width, config.hidden), nn.ReLU()]
            width = config.hidden
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.Linear(width, 10)
        nn.init.zeros_(self.heads.weight)
        nn.init.zeros_(self.heads.bias)

    def forward(self, points: Tensor, times: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Offsets [T, P, 3], [T, P, 3], [T, P, 4] of points [P, 3] at times [T]."""
        out = self.heads(self.trunk(self.field(points, times)))
        d_position, d_scale, d_quat = out[..., :3], out[..., 3:6], out[..., 6:]
        if not self.config.scale_deform:
            d_scale = torch.zeros_like(d_scale)
        if not self.config.rotation_deform:
            d_quat = torch.zeros_like(d_quat)
        return d_position, d_scale, d_quat


@register("representation", "dynamic-gaussians", DynamicGaussiansConfig)
class DynamicGaussians(Gaussians):
    """Canonical Gaussians rendered at each camera's time through the deformation field."""

    is_dynamic = True

    def __init__(self, config: DynamicGaussiansConfig, generator: torch.Generator | None = None):
        generator = generator or torch.Generator().manual_seed(0)
        super().__init__(config, generator)
        self.deformation = Deformation(config.deformation, generator)
        if config.init_from:
            self._load_canonical(config.init_from)
        if config.freeze_canonical:
            for name in PARAMETER_NAMES:
                getattr(self, name).requires_grad_(False)

    def _load_canonical(self, source: str) -> None:
        state = load_checkpoint(resolve_init_from(source))["representation"]
        missing = [name for name in PARAMETER_NAMES if name not in state]
        if missing:
            raise ValueError(f"representation.init_from={source}: not a Gaussians checkpoint (no {', '.join(missing)})")
        canonical = {k: v for k, v in state.items() if not k.startswith("deformation.")}
        Gaussians.load_state_dict(self, {**self.state_dict(), **canonical}, strict=True)
        logger.info("canonical Gaussians from %s: %d", source, self.num_gaussians)

    # --------------------------------------------------------------------------- deformation

    def deformed(self, times: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Means, activated scales and quaternions of the Gaussians at each of ``times`` [T] (or
        one time): [T, N, 3], [T, N, 3], [T, N, 4] ([N, ...] for a single float)."""
        single = not torch.is_tensor(times) or times.dim() == 0
        times = torch.as_tensor(times, dtype=self.means.dtype, device=self.means.device).reshape(-1)
        d_position, d_scale, d_quat = self.deformation(self.means, times)
        means, scales, quats = self.means + d_position, (self.log_scales + d_scale).exp(), self.quats + d_quat
        return (means[0], scales[0], quats[0]) if single else (means, scales, quats)

    def deform(self, points: Tensor, time: float) -> Tensor:
        """Canonical points [P, 3] (e.g. mesh vertices) moved to time ``time`` by the field's Δposition."""
        times = torch.tensor([float(time)], dtype=points.dtype, device=points.device)
        return points + self.deformation(points, times)[0][0]

    def render(self, cameras: Cameras, background: Tensor) -> RenderOutput:
        """Each camera sees the Gaussians deformed to its time; one projection per distinct time,
        one rasterization for the batch."""
        times = cameras.times()
        unique, inverse = torch.unique(times, return_inverse=True)
        projections, colors, order = [], [], []
        all_means, all_scales, all_quats = self.deformed(unique)  # one field query for every time
        for k in range(len(unique)):
            index = (inverse == k).nonzero().squeeze(1)
            group = cameras[index]
            means, scales, quats = all_means[k], all_scales[k], all_quats[k]
            projected = project_gaussians(
                means, scales, quats, group.world_to_camera(), group.intrinsics(), cameras.width, cameras.height
            )
            view_dirs = means.unsqueeze(0) - group.position.unsqueeze(1)
            view_dirs = view_dirs / view_dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            colors.append(sh_to_color(self.sh_coefficients, view_dirs, self.config.sh_degree))
            projections.append(projected)
            order.append(index)
        # Back to the cameras' order (groups are by time).
        restore = torch.argsort(torch.cat(order))
        means2d = torch.cat([p.means2d for p in projections])[restore]
        conics = torch.cat([p.conics for p in projections])[restore]
        depths = torch.cat([p.depths for p in projections])[restore]
        radii = torch.cat([p.radii for p in projections])[restore]
        color = torch.cat(colors)[restore]
        B = len(cameras)
        rgb, alpha, depth = rasterize_gaussians(
            means2d, conics, color.contiguous(), self.opacities.unsqueeze(0).expand(B, -1).contiguous(),
            depths, radii, cameras.width, cameras.height, tier=self.config.kernel_tier or None,
        )
        rgb = rgb + (1.0 - alpha) * background.to(rgb).view(1, 1, 1, -1)
        out = RenderOutput(rgb=rgb, alpha=alpha, depth=depth, aux={"means2d": means2d, "radii": radii})
        if self.training and means2d.requires_grad:
            means2d.retain_grad()
        return out

    # --------------------------------------------------------------------------- optimisation

    def param_groups(self) -> list[dict]:
        lr = self.config.deformation_lr
        groups = [] if self.config.freeze_canonical else super().param_groups()
        return groups + [
            {"name": "deformation_planes", "params": list(self.deformation.field.parameters()), "lr": lr.planes},
            {"name": "deformation_mlp", "params": list(self.deformation.trunk.parameters())
             + list(self.deformation.heads.parameters()), "lr": lr.mlp},
        ]

    def regularization(self, render: RenderOutput, step: int) -> dict[str, Tensor]:
        cfg = self.config
        losses: dict[str, Tensor] = {}
        if cfg.plane_tv_weight:
            tv = sum(
                (p[..., 1:, :] - p[..., :-1, :]).square().mean() + (p[..., :, 1:] - p[..., :, :-1]).square().mean()
                for p in self.deformation.field.spatial_planes()
            )
            losses["plane_tv"] = cfg.plane_tv_weight * tv
        time_planes = self.deformation.field.time_planes()
        if cfg.time_smoothness_weight:
            # Time is the planes' row axis (dim -2): the second difference along it.
            smooth = sum((p[..., 2:, :] - 2.0 * p[..., 1:-1, :] + p[..., :-2, :]).square().mean() for p in time_planes)
            losses["time_smoothness"] = cfg.time_smoothness_weight * smooth
        if cfg.time_l1_weight:
            losses["time_l1"] = cfg.time_l1_weight * sum((p - 1.0).abs().mean() for p in time_planes)
        return losses

    def on_step(self, step: int, render: RenderOutput, optimizer: torch.optim.Optimizer) -> None:
        if self.config.freeze_canonical:
            return  # frozen canonical Gaussians are not densified
        super().on_step(step, render, optimizer)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self.config.freeze_canonical:  # loading replaces the parameters; keep them frozen
            for name in PARAMETER_NAMES:
                getattr(self, name).requires_grad_(False)
        return result

    # --------------------------------------------------------------------------------- export

    def export(self, directory: Path, formats: list[str]) -> list[Path]:
        """``ply``: the Gaussians at t = 0 (the turntable's time); over-time exports live elsewhere."""
        with torch.no_grad():
            means, scales, quats = self.deformed(0.0)
        from lift3d.export.ply import write_gaussians_ply

        written = []
        for fmt in formats:
            if fmt != "ply":
                raise ValueError(f"dynamic Gaussians cannot export {fmt!r}; choose ply (png/mp4 are rendered by the trainer)")
            path = directory / "gaussians.ply"
            write_gaussians_ply(
                path, means=means, sh_dc=self.sh_dc.detach()[:, 0], sh_rest=self.sh_rest.detach(),
                opacity_logits=self.opacity_logits.detach(), log_scales=scales.log(),
                quats=quats / quats.norm(dim=-1, keepdim=True),
            )
            written.append(path)
        return written
