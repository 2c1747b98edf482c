"""3D Gaussian splatting as a representation (3DGS / DreamGaussian / LucidDreamer style).

Parameters are stored pre-activation: exp scales, sigmoid opacities, normalised quaternions
(wxyz), SH coefficients of configurable degree. Adaptive density control (clone / split /
prune / opacity reset) runs in ``on_step`` on a schedule and edits the optimizer state in place.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from lift3d.cameras import Cameras
from lift3d.config import Schedule
from lift3d.registry import register
from lift3d.render.gaussian import (
    ball_volume,
    inverse_sigmoid,
    num_sh_coefficients,
    render_gaussians,
    rgb_to_sh_dc,
)
from lift3d.representations.base import RenderOutput, Representation

logger = logging.getLogger(__name__)

PARAMETER_NAMES = ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest")


@dataclass
class DensifyConfig:
    """Adaptive density control of 3DGS."""

    enabled: bool = True
    """Clone, split and prune Gaussians during training."""
    start_step: int = 100
    """First step that densifies."""
    end_step: int = 600
    """Last step that densifies (pruning of transparent Gaussians continues)."""
    interval: int = 100
    """Densify every N steps."""
    grad_threshold: float = 0.002
    """Mean screen-space (NDC) gradient norm of a Gaussian's centre that triggers clone/split."""
    percent_dense: float = 0.01
    """Gaussians larger than this fraction of the scene extent are split, smaller ones cloned."""
    min_opacity: float = 0.01
    """Prune Gaussians whose opacity is below this."""
    max_scale: float = 0.5
    """Prune Gaussians whose largest axis exceeds this fraction of the scene extent."""
    opacity_reset_interval: int = 0
    """Reset all opacities to ``reset_opacity`` every N steps (0 = never)."""
    reset_opacity: float = 0.01
    """Opacity after a reset."""
    max_gaussians: int = 50_000
    """Never grow beyond this many Gaussians."""


@dataclass
class LearningRates:
    """Per-group learning rates (Adam)."""

    means: Schedule = field(default_factory=lambda: Schedule(start=0.005, end=0.0005, end_step=1000, kind="linear"))
    """Positions (a schedule: 3DGS decays it)."""
    scales: float = 0.005
    """Log-scales."""
    quats: float = 0.001
    """Rotations."""
    opacity: float = 0.05
    """Opacity logits."""
    sh_dc: float = 0.01
    """Degree-0 colour coefficients."""
    sh_rest: float = 0.0005
    """Higher SH coefficients."""


@dataclass
class GaussiansConfig:
    """A cloud of anisotropic 3D Gaussians."""

    num_points: int = 4096
    """Gaussians at initialisation (ball init; point-cloud/mesh init take this many samples)."""
    init: Literal["ball", "point_cloud", "mesh"] = "ball"
    """Random in a ball, the vertices of a PLY point cloud, or samples on a mesh surface."""
    init_path: str = ""
    """PLY (point_cloud) or OBJ/GLB/PLY mesh file for ``init``."""
    init_radius: float = 0.8
    """Radius of the ball init; also the scene extent used by densification."""
    init_opacity: float = 0.1
    """Opacity at initialisation."""
    init_color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Colour at initialisation (point clouds with colours keep theirs)."""
    init_color_jitter: float = 0.1
    """Uniform random jitter on the initial colour."""
    sh_degree: int = 0
    """Spherical-harmonics degree of the colour (0 = view-independent RGB)."""
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    """Clone / split / prune schedule."""
    lr: LearningRates = field(default_factory=LearningRates)
    """Learning rates per parameter group."""
    kernel_tier: str = ""
    """Force a rasterizer tier (reference, cpu, cuda); empty = fastest available."""
    mesh_resolution: int = 128
    """Voxels per side of the density grid that mesh export splats the Gaussians into."""
    mesh_threshold: float = 0.5
    """Iso-level of the splatted density (sum of opacity-weighted Gaussians) for mesh export."""

    def __post_init__(self) -> None:
        if not 0 <= self.sh_degree <= 3:
            raise ValueError(f"sh_degree must be 0..3, got {self.sh_degree}")


def _quat_identity(n: int) -> Tensor:
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    return quats


def _sample_ball(n: int, radius: float, generator: torch.Generator) -> Tensor:
    direction = torch.randn(n, 3, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r = radius * torch.rand(n, 1, generator=generator) ** (1.0 / 3.0)
    return direction * r


def _quat_to_rotation(quats: Tensor) -> Tensor:
    w, x, y, z = (quats / quats.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).view(-1, 3, 3)


@register("representation", "gaussians", GaussiansConfig)
class Gaussians(Representation):
    """3D Gaussians rendered by the tile rasterizer of ``lift3d.kernels.gaussian_raster``."""

    def __init__(self, config: GaussiansConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        generator = generator or torch.Generator().manual_seed(0)
        points, colors = self._initial_points(generator)
        n = points.shape[0]
        spacing = (ball_volume(config.init_radius) / max(n, 1)) ** (1.0 / 3.0)
        colors = colors + config.init_color_jitter * (2 * torch.rand(n, 3, generator=generator) - 1)
        rest = num_sh_coefficients(config.sh_degree) - 1
        self.means = nn.Parameter(points)
        self.log_scales = nn.Parameter(torch.full((n, 3), math.log(0.5 * spacing)))
        self.quats = nn.Parameter(_quat_identity(n))
        self.opacity_logits = nn.Parameter(inverse_sigmoid(torch.full((n,), config.init_opacity)))
        self.sh_dc = nn.Parameter(rgb_to_sh_dc(colors.clamp(0.0, 1.0)).unsqueeze(1))
        self.sh_rest = nn.Parameter(torch.zeros(n, rest, 3))
        self._reset_densify_stats()

    # ------------------------------------------------------------------------- initialisation

    def _initial_points(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        cfg = self.config
        base_color = torch.tensor(cfg.init_color, dtype=torch.float32)
        if cfg.init == "ball":
            points = _sample_ball(cfg.num_points, cfg.init_radius, generator)
            return points, base_color.expand(cfg.num_points, 3).clone()
        if not cfg.init_path:
            raise ValueError(f"representation.init={cfg.init!r} needs representation.init_path")
        path = Path(cfg.init_path)
        if not path.is_file():
            raise FileNotFoundError(f"representation.init_path {str(path)!r} does not exist")
        if cfg.init == "point_cloud":
            from lift3d.export.ply import read_ply_vertices

            vertices = read_ply_vertices(path)
            points = torch.from_numpy(vertices["xyz"]).float()
            colors = (
                torch.from_numpy(vertices["rgb"]).float()
                if "rgb" in vertices
                else base_color.expand(points.shape[0], 3).clone()
            )
            return points, colors
        import trimesh

        mesh = trimesh.load(path, force="mesh")
        samples, _ = trimesh.sample.sample_surface(mesh, cfg.num_points, seed=int(torch.randint(0, 2**31, (1,), generator=generator)))
        return torch.from_numpy(samples).float(), base_color.expand(cfg.num_points, 3).clone()

    # ------------------------------------------------------------------------------- activations

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[0]

    @property
    def scales(self) -> Tensor:
        return self.log_scales.exp()

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def sh_coefficients(self) -> Tensor:
        return torch.cat([self.sh_dc, self.sh_rest], dim=1)

    def render(self, cameras: Cameras, background: Tensor) -> RenderOutput:
        out = render_gaussians(
            self.means, self.scales, self.quats, self.opacities, self.sh_coefficients, self.config.sh_degree,
            cameras, background, kernel_tier=self.config.kernel_tier or None,
        )
        if self.training and out.aux["means2d"].requires_grad:
            out.aux["means2d"].retain_grad()
        return out

    # ------------------------------------------------------------------------------ optimisation

    def param_groups(self) -> list[dict]:
        lr = self.config.lr
        return [
            {"name": "means", "params": [self.means], "lr": lr.means(0)},
            {"name": "log_scales", "params": [self.log_scales], "lr": lr.scales},
            {"name": "quats", "params": [self.quats], "lr": lr.quats},
            {"name": "opacity_logits", "params": [self.opacity_logits], "lr": lr.opacity},
            {"name": "sh_dc", "params": [self.sh_dc], "lr": lr.sh_dc},
            {"name": "sh_rest", "params": [self.sh_rest], "lr": lr.sh_rest},
        ]

    def learning_rates(self, step: int) -> dict[str, float]:
        """Scheduled learning rates for this step, by group name."""
        return {"means": self.config.lr.means(step)}

    def on_step(self, step: int, render: RenderOutput, optimizer: torch.optim.Optimizer) -> None:
        cfg = self.config.densify
        if not cfg.enabled:
            return
        self._accumulate_densify_stats(render)
        if cfg.start_step <= step <= cfg.end_step and step % cfg.interval == 0 and step > 0:
            self.densify_and_prune(optimizer)
        elif step > cfg.end_step and step % cfg.interval == 0:
            self._prune(optimizer, self.opacities.detach() < cfg.min_opacity)
        if cfg.opacity_reset_interval and step > 0 and step % cfg.opacity_reset_interval == 0 and step <= cfg.end_step:
            self.reset_opacity(optimizer)

    # ----------------------------------------------------------------------- density control

    def _reset_densify_stats(self) -> None:
        n = self.num_gaussians
        self.register_buffer("grad_accum", torch.zeros(n), persistent=True)
        self.register_buffer("grad_count", torch.zeros(n), persistent=True)

    def _accumulate_densify_stats(self, render: RenderOutput) -> None:
        means2d = render.aux.get("means2d")
        if means2d is None or means2d.grad is None:
            return
        height, width = render.rgb.shape[1:3]
        # NDC-scaled gradient, as 3DGS, so the threshold does not depend on the image size.
        grad = means2d.grad * torch.tensor([0.5 * width, 0.5 * height], dtype=means2d.dtype)
        visible = render.aux["radii"] > 0
        norms = grad.norm(dim=-1) * visible
        self.grad_accum += norms.sum(0)
        self.grad_count += visible.sum(0)

    @torch.no_grad()
    def densify_and_prune(self, optimizer: torch.optim.Optimizer) -> None:
        cfg = self.config.densify
        extent = self.config.init_radius
        mean_grad = self.grad_accum / self.grad_count.clamp_min(1)
        candidates = mean_grad >= cfg.grad_threshold
        big = self.scales.max(dim=-1).values > cfg.percent_dense * extent
        room = max(cfg.max_gaussians - self.num_gaussians, 0)
        clone = candidates & ~big
        split = candidates & big
        # Respect the cap: keep the highest-gradient candidates.
        if int(clone.sum() + split.sum()) > room:
            order = torch.argsort(mean_grad * candidates, descending=True, stable=True)
            keep = torch.zeros_like(candidates)
            keep[order[:room]] = True
            clone &= keep
            split &= keep
        n_before = self.num_gaussians
        self._clone(optimizer, clone)
        split = torch.cat([split, torch.zeros(self.num_gaussians - n_before, dtype=torch.bool)])
        self._split(optimizer, split)
        prune = (self.opacities < cfg.min_opacity) | (self.scales.max(dim=-1).values > cfg.max_scale * extent)
        self._prune(optimizer, prune)
        logger.debug("densify: %d -> %d Gaussians", n_before, self.num_gaussians)
        self._reset_densify_stats()

    def _current_tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).detach() for name in PARAMETER_NAMES}

    def _clone(self, optimizer: torch.optim.Optimizer, mask: Tensor) -> None:
        if mask.any():
            self._append(optimizer, {name: value[mask] for name, value in self._current_tensors().items()})

    def _split(self, optimizer: torch.optim.Optimizer, mask: Tensor, copies: int = 2) -> None:
        if not mask.any():
            return
        current = self._current_tensors()
        scales = self.scales[mask].repeat(copies, 1)
        rotation = _quat_to_rotation(current["quats"][mask]).repeat(copies, 1, 1)
        offsets = torch.randn_like(scales) * scales
        new = {name: value[mask].repeat(copies, *([1] * (value.dim() - 1))) for name, value in current.items()}
        new["means"] = new["means"] + torch.einsum("nij,nj->ni", rotation, offsets)
        new["log_scales"] = torch.log(scales / (0.8 * copies))
        self._append(optimizer, new)
        self._prune(optimizer, torch.cat([mask, torch.zeros(copies * int(mask.sum()), dtype=torch.bool)]))

    def _prune(self, optimizer: torch.optim.Optimizer, mask: Tensor) -> None:
        if not mask.any():
            return
        keep = ~mask
        self._edit_parameters(optimizer, lambda tensor: tensor[keep], lambda state: state[keep])
        self.grad_accum = self.grad_accum[keep]
        self.grad_count = self.grad_count[keep]

    def _append(self, optimizer: torch.optim.Optimizer, new: dict[str, Tensor]) -> None:
        count = new["means"].shape[0]
        self._edit_parameters(
            optimizer,
            lambda tensor, name: torch.cat([tensor, new[name]]),
            lambda state: torch.cat([state, state.new_zeros(count, *state.shape[1:])]),
            with_name=True,
        )
        self.grad_accum = torch.cat([self.grad_accum, self.grad_accum.new_zeros(count)])
        self.grad_count = torch.cat([self.grad_count, self.grad_count.new_zeros(count)])

    def _edit_parameters(self, optimizer, edit_param, edit_state, with_name: bool = False) -> None:
        """Replace every parameter by ``edit_param(old)`` and apply ``edit_state`` to its Adam moments."""
        for name in PARAMETER_NAMES:
            old = getattr(self, name)
            data = edit_param(old.detach(), name) if with_name else edit_param(old.detach())
            new = nn.Parameter(data.contiguous())
            for group in optimizer.param_groups:
                if group["params"][0] is old:
                    group["params"][0] = new
                    state = optimizer.state.pop(old, None)
                    if state:
                        for key in ("exp_avg", "exp_avg_sq"):
                            if key in state:
                                state[key] = edit_state(state[key]).contiguous()
                        optimizer.state[new] = state
            setattr(self, name, new)

    @torch.no_grad()
    def reset_opacity(self, optimizer: torch.optim.Optimizer) -> None:
        target = inverse_sigmoid(torch.tensor(self.config.densify.reset_opacity))
        values = torch.minimum(self.opacity_logits.detach(), target)
        self._edit_parameters(
            optimizer,
            lambda tensor, name: values if name == "opacity_logits" else tensor,
            lambda state: state,
            with_name=True,
        )
        for group in optimizer.param_groups:
            if group["params"][0] is self.opacity_logits:
                state = optimizer.state.get(self.opacity_logits)
                if state:
                    state["exp_avg"].zero_()
                    state["exp_avg_sq"].zero_()

    # ------------------------------------------------------------------------- checkpoints

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Resize parameters to the checkpoint's Gaussian count before loading."""
        for name in PARAMETER_NAMES:
            if name in state_dict:
                setattr(self, name, nn.Parameter(torch.empty_like(state_dict[name])))
        for name in ("grad_accum", "grad_count"):
            if name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[name]))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------------------- export

    @torch.no_grad()
    def splat_to_grid(self, resolution: int, bound: float) -> tuple[Tensor, Tensor]:
        """Density sum_i o_i exp(-q_i/2) and its colour average on a resolution^3 grid over
        [-bound, bound]^3; each Gaussian touches only the voxels within 3 sigma of its centre."""
        voxel = 2.0 * bound / (resolution - 1)
        scales, means = self.scales, self.means.detach()
        radius = int(min(math.ceil(3.0 * float(scales.max()) / voxel), resolution // 4))
        offsets = torch.arange(-radius, radius + 1)
        neighbourhood = torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij"), -1).reshape(-1, 3)
        rotation = _quat_to_rotation(self.quats.detach())
        inverse_cov = rotation @ torch.diag_embed(scales.reciprocal().square()) @ rotation.transpose(1, 2)
        colors = torch.clamp_min(self.sh_dc[:, 0] * 0.28209479177387814 + 0.5, 0.0)
        density = torch.zeros(resolution**3)
        color_sum = torch.zeros(resolution**3, 3)
        centre = torch.round((means + bound) / voxel).long()
        for chunk in torch.arange(self.num_gaussians).split(max(1, 2_000_000 // neighbourhood.shape[0])):
            cells = centre[chunk, None, :] + neighbourhood[None]  # [n, K, 3]
            inside = ((cells >= 0) & (cells < resolution)).all(-1)
            delta = cells.float() * voxel - bound - means[chunk, None, :]
            q = torch.einsum("nki,nij,nkj->nk", delta, inverse_cov[chunk], delta)
            weight = self.opacities[chunk, None] * torch.exp(-0.5 * q) * inside
            flat = ((cells[..., 0] * resolution + cells[..., 1]) * resolution + cells[..., 2]).clamp(0, resolution**3 - 1)
            density.index_add_(0, flat.reshape(-1), weight.reshape(-1))
            color_sum.index_add_(0, flat.reshape(-1), (weight.unsqueeze(-1) * colors[chunk, None, :]).reshape(-1, 3))
        color = color_sum / density.clamp_min(1e-8).unsqueeze(-1)
        shape = (resolution, resolution, resolution)
        return density.view(shape), color.view(*shape, 3)

    @torch.no_grad()
    def surface(self, chunk: int = 1 << 18) -> tuple["trimesh.Trimesh", object]:  # noqa: F821
        """Mesh of the splatted density (marching cubes) and a colour function for texture baking."""
        from lift3d.export.mesh import clean_mesh, extract_mesh

        bound = float(self.means.detach().abs().max()) + 3.0 * float(self.scales.max()) + 1e-3
        resolution = self.config.mesh_resolution
        density, color = self.splat_to_grid(resolution, bound)

        def lookup(grid: Tensor, points: Tensor) -> Tensor:
            # grid_sample wants (x, y, z) -> (W, H, D) order: our grid is indexed [x, y, z].
            volume = grid.permute(*range(3, grid.dim()), 2, 1, 0).reshape(1, -1, resolution, resolution, resolution)
            coords = (points.cpu().float() / bound).view(1, -1, 1, 1, 3)
            sampled = torch.nn.functional.grid_sample(volume, coords, align_corners=True, padding_mode="border")
            return sampled.view(volume.shape[1], -1).t()

        mesh = extract_mesh(
            lambda p: lookup(density, p)[:, 0], [-bound] * 3, [bound] * 3, resolution=resolution,
            threshold=self.config.mesh_threshold, level_kind="density", coarse_to_fine=False, chunk=chunk,
        )
        return clean_mesh(mesh, target_faces=20_000), lambda p: lookup(color, p).clamp(0.0, 1.0)

    def export(self, directory: Path, formats: list[str]) -> list[Path]:
        from lift3d.export.ply import write_gaussians_ply

        written = []
        for fmt in formats:
            if fmt == "ply":
                path = directory / "gaussians.ply"
                write_gaussians_ply(
                    path,
                    means=self.means.detach(),
                    sh_dc=self.sh_dc.detach()[:, 0],
                    sh_rest=self.sh_rest.detach(),
                    opacity_logits=self.opacity_logits.detach(),
                    log_scales=self.log_scales.detach(),
                    quats=self.quats.detach() / self.quats.detach().norm(dim=-1, keepdim=True),
                )
                written.append(path)
            else:
                raise ValueError(f"Gaussians cannot export {fmt!r}; choose ply (png/mp4 are rendered by the trainer)")
        return written
