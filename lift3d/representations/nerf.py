"""Hash-grid NeRF (DreamFusion / Magic3D-coarse): a density + albedo field rendered by occupancy-grid
ray marching, with Magic3D's blob initialisation, optional Lambertian shading and the usual
regularisers (orientation, opacity sparsity, opaque/binary)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lift3d.cameras import Cameras
from lift3d.config import Schedule
from lift3d.kernels.hashgrid import HashGridConfig, HashGridEncoding
from lift3d.kernels.raymarch import OccupancyGrid, OccupancyGridConfig, render_rays
from lift3d.registry import register
from lift3d.representations.base import RenderOutput, Representation

logger = logging.getLogger(__name__)


@dataclass
class ShadingConfig:
    """How albedo becomes colour (DreamFusion's shading augmentations)."""

    mode: Literal["albedo", "diffuse"] = "albedo"
    """``albedo``: colour is the albedo (lighting baked in); ``diffuse``: albedo times a random point light + ambient."""
    ambient: float = 0.3
    """Ambient light of the diffuse mode."""
    diffuse: float = 0.7
    """Strength of the point light of the diffuse mode."""
    light_distance_range: tuple[float, float] = (0.8, 1.5)
    """Point light distance, as a multiple of the camera distance; placed near the camera (DreamFusion)."""
    textureless_probability: float = 0.0
    """Chance per step of rendering white albedo (geometry only) in diffuse mode."""
    ambient_only_steps: int = 0
    """Warm-up steps rendering albedo only before diffuse shading starts."""


@dataclass
class NeRFLearningRates:
    """Adam learning rates."""

    encoding: float = 0.01
    """Hash table."""
    network: float = 0.001
    """MLP weights."""
    background: float = 0.001
    """Neural background."""


@dataclass
class NeRFConfig:
    """An implicit volume: hash-grid encoding -> small MLP -> density and albedo."""

    radius: float = 1.0
    """The scene lives in the cube [-radius, radius]^3."""
    encoding: HashGridConfig = field(default_factory=lambda: HashGridConfig(log2_hashmap_size=17))
    """Hash-grid encoding (threestudio uses 16 levels, F=2, T=2^19, base 16, scale 1.447)."""
    hidden_dim: int = 64
    """Width of the MLP."""
    hidden_layers: int = 1
    """Hidden layers of the MLP."""
    density_activation: Literal["softplus", "exp"] = "softplus"
    """Activation of the raw density."""
    density_bias: Literal["blob_magic3d", "none"] = "blob_magic3d"
    """Magic3D's blob: adds blob_scale * (1 - |x| / blob_std) to the raw density."""
    blob_scale: float = 10.0
    """Height of the density blob."""
    blob_std: float = 0.5
    """Radius where the blob bias crosses zero."""
    normals: Literal["finite_difference", "none"] = "finite_difference"
    """Normals for shading, orientation loss and normal maps: -grad(sigma) by central differences."""
    finite_difference_eps: float = 0.01
    """Step of the finite differences."""
    shading: ShadingConfig = field(default_factory=ShadingConfig)
    """Albedo-only or diffuse shading."""
    background: Literal["solid", "random", "neural"] = "solid"
    """``solid``: the trainer's colour; ``random``: a random colour per training step; ``neural``: an MLP of the view direction."""
    occupancy: OccupancyGridConfig = field(default_factory=lambda: OccupancyGridConfig(resolution=32, warmup_steps=64, update_every=8))
    """Occupancy grid that lets the marcher skip empty space (its box follows ``radius``)."""
    num_samples_per_ray: int = 256
    """Samples along the box diagonal; the step size is sqrt(3) * 2 * radius / this."""
    max_samples_per_ray: int = 512
    """Cap on samples per ray."""
    render_chunk_rays: int = 4096
    """Rays marched and composited per call when rendering without gradients (validation, eval,
    videos): peak memory is bounded by this times ``max_samples_per_ray`` samples, however much of
    the occupancy grid is occupied (0 = all rays at once)."""
    render_chunk_samples: int = 1 << 17
    """Samples per field evaluation when rendering without gradients (0 = all at once)."""
    progressive_start_levels: int = 0
    """Coarse-to-fine hash levels: start with this many active (0 = all from the start)."""
    progressive_step_interval: int = 100
    """Unmask one more level every N steps."""
    lambda_orientation: Schedule = field(default_factory=Schedule)
    """Weight of Ref-NeRF's orientation loss sum(w * max(0, n.d)^2)."""
    lambda_sparsity: Schedule = field(default_factory=Schedule)
    """Weight of the mean-opacity sparsity loss."""
    lambda_opaque: Schedule = field(default_factory=Schedule)
    """Weight of the binary-opacity loss (pushes opacity to 0 or 1)."""
    mesh_resolution: int = 128
    """Grid resolution of mesh extraction."""
    mesh_threshold: float | None = None
    """Density iso-level of mesh extraction (unset = automatic)."""
    lr: NeRFLearningRates = field(default_factory=NeRFLearningRates)
    """Learning rates."""
    kernel_tier: str = ""
    """Force a kernel tier for hash grid and ray marching (reference, cpu, cuda); empty = fastest."""


def _mlp(in_dim: int, out_dim: int, hidden: int, layers: int) -> nn.Sequential:
    modules: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers):
        modules += [nn.Linear(dim, hidden), nn.ReLU(inplace=True)]
        dim = hidden
    modules.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*modules)


@register("representation", "nerf", NeRFConfig)
class NeRF(Representation):
    """Density + albedo field on a hash grid, volume-rendered with an occupancy grid."""

    field_channels = 3
    """Channels of the colour field and the background network (Latent-NeRF: 4 latent channels)."""

    def __init__(self, config: NeRFConfig, generator: torch.Generator | None = None):
        super().__init__()
        if generator is not None:  # the MLP init draws from torch's global RNG; seed it from the run
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        tier = config.kernel_tier or None
        self.encoding = HashGridEncoding(config.encoding, tier=tier)
        self.network = _mlp(self.encoding.output_dim, 1 + self.field_channels, config.hidden_dim, config.hidden_layers)
        self.setup_rendering(config)
        if config.progressive_start_levels:
            self.encoding.active_levels = config.progressive_start_levels

    def setup_rendering(self, config: NeRFConfig) -> None:
        """What every NeRF renders with, whatever computes its field: the config, the background
        network, the occupancy grid and the step counter (a generated NeRF calls this with a field
        of its own instead of the hash grid and MLP)."""
        self.config = config
        self.background_network = (
            _mlp(3, self.field_channels, 32, 1) if config.background == "neural" else None
        )
        occupancy = OccupancyGridConfig(**{**config.occupancy.__dict__, "radius": config.radius, "aabb": None})
        self.grid = OccupancyGrid(occupancy)
        self.step = 0

    @property
    def step_size(self) -> float:
        return math.sqrt(3.0) * 2.0 * self.config.radius / self.config.num_samples_per_ray

    # ---------------------------------------------------------------------------------- field

    def _features(self, unit: Tensor) -> Tensor:
        """What the MLP heads read at unit-cube points [N, 3]: the hash-grid encoding (a dynamic
        NeRF adds its space-time features here)."""
        return self.encoding(unit)

    def _field_output(self, unit: Tensor) -> Tensor:
        """[N, 1 + field_channels] raw density and albedo at unit-cube points [N, 3]."""
        return self.network(self._features(unit))

    def _raw(self, points: Tensor) -> tuple[Tensor, Tensor]:
        out = self._field_output((points / self.config.radius + 1.0) * 0.5)
        raw_density, raw_albedo = out[..., 0], out[..., 1:]
        if self.config.density_bias == "blob_magic3d":
            raw_density = raw_density + self.config.blob_scale * (1.0 - points.norm(dim=-1) / self.config.blob_std)
        return raw_density, raw_albedo

    def _activate_density(self, raw: Tensor) -> Tensor:
        if self.config.density_activation == "exp":
            return torch.exp(raw.clamp(max=15.0))
        return F.softplus(raw)

    def density(self, points: Tensor) -> Tensor:
        """sigma [N] at world points [N, 3]."""
        return self._activate_density(self._raw(points)[0])

    def activate_field(self, raw: Tensor) -> Tensor:
        """Raw colour-field outputs [N, field_channels] -> what is composited (albedo in [0, 1] here)."""
        return torch.sigmoid(raw)

    def to_rgb(self, composited: Tensor) -> Tensor:
        """Composited field values [N, field_channels] -> the rendered channels (identity here)."""
        return composited

    def albedo(self, points: Tensor) -> Tensor:
        """Albedo [N, 3] in [0, 1] at world points [N, 3] (the colours a baked texture gets)."""
        return self.activate_field(self._raw(points)[1])

    def normals_at(self, points: Tensor) -> Tensor:
        """Unit normals -grad(sigma)/|grad(sigma)| [N, 3] by central differences (differentiable)."""
        eps = self.config.finite_difference_eps
        offsets = torch.eye(3, dtype=points.dtype, device=points.device) * eps
        shifted = torch.cat([points.unsqueeze(1) + offsets, points.unsqueeze(1) - offsets], dim=1)  # [N, 6, 3]
        sigma = self.density(shifted.reshape(-1, 3)).view(-1, 6)
        gradient = (sigma[:, :3] - sigma[:, 3:]) / (2.0 * eps)
        return -F.normalize(gradient, dim=-1, eps=1e-8)

    def _needs_normals(self) -> bool:
        if self.config.normals == "none":
            return False
        cfg = self.config
        # Only training reads them (diffuse shading, orientation loss); they cost six extra density
        # queries per sample, so renders outside training skip them.
        return self.training and (
            cfg.shading.mode == "diffuse"
            or cfg.lambda_orientation.start > 0
            or (cfg.lambda_orientation.end or 0) > 0
        )

    # --------------------------------------------------------------------------------- render

    def render(self, cameras: Cameras, background: Tensor) -> RenderOutput:
        cfg = self.config
        B, H, W = len(cameras), cameras.height, cameras.width
        origins, dirs = cameras.rays()
        origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        with_normals = self._needs_normals()

        def field_fn(points: Tensor, ray_dirs: Tensor) -> tuple[Tensor, Tensor]:
            raw_density, raw_albedo = self._raw(points)
            values = [self.activate_field(raw_albedo)]
            if with_normals:
                values.append(self.normals_at(points))
            return self._activate_density(raw_density), torch.cat(values, dim=-1)

        rays = render_rays(
            origins, dirs, field_fn, self.grid, self.step_size,
            stratified=self.training, max_samples_per_ray=cfg.max_samples_per_ray, tier=cfg.kernel_tier or None,
            chunk_rays=cfg.render_chunk_rays, chunk_samples=cfg.render_chunk_samples,
        )
        C = self.field_channels
        albedo = rays.rgb[:, :C]
        normal = F.normalize(rays.rgb[:, C : C + 3], dim=-1, eps=1e-8) if with_normals else None
        color = self._shade(cameras, origins, dirs, rays, albedo, normal)
        rgb = self.to_rgb(color + (1.0 - rays.opacity) * self._background(dirs, background, B, H, W))
        aux: dict[str, Tensor] = {} if rays.weights is None else {"weights": rays.weights}
        if normal is not None and self.training:
            # Ref-NeRF orientation loss on composited normals: visible surfaces must face the camera.
            facing = (normal * dirs).sum(-1).clamp_min(0.0)
            aux["orientation"] = (rays.opacity[:, 0].detach() * facing.square()).mean()
        return RenderOutput(
            rgb=rgb.view(B, H, W, -1),
            alpha=rays.opacity.view(B, H, W, 1),
            depth=rays.depth.view(B, H, W, 1),
            normal=None if normal is None else normal.view(B, H, W, 3),
            aux=aux,
        )

    def _shade(self, cameras: Cameras, origins: Tensor, dirs: Tensor, rays, albedo: Tensor, normal: Tensor | None) -> Tensor:
        """Deferred Lambertian shading per ray with a point light near each camera (DreamFusion)."""
        cfg = self.config.shading
        if cfg.mode == "albedo" or normal is None or not self.training or self.step < cfg.ambient_only_steps:
            return albedo
        B, rays_per_camera = len(cameras), cameras.height * cameras.width
        device = origins.device
        low, high = cfg.light_distance_range
        distance = cameras.distance.to(device) * (low + (high - low) * torch.rand(B, device=device))
        direction = F.normalize(cameras.position + 0.5 * torch.randn(B, 3, device=device), dim=-1)
        light = (direction * distance.unsqueeze(-1)).repeat_interleave(rays_per_camera, dim=0)
        surface = origins + dirs * (rays.depth / rays.opacity.clamp_min(1e-6)).detach()
        lambert = (normal * F.normalize(light - surface, dim=-1)).sum(-1, keepdim=True).clamp_min(0.0)
        if bool(torch.rand(()) < cfg.textureless_probability):
            albedo = rays.opacity.expand_as(albedo)  # white albedo where there is matter
        return albedo * (cfg.ambient + cfg.diffuse * lambert)

    def _background(self, dirs: Tensor, background: Tensor, B: int, H: int, W: int) -> Tensor:
        """[rays or 1, field_channels] background behind each ray, in the colour field's space."""
        if self.background_network is not None:
            return self.activate_field(self.background_network(dirs))
        if self.config.background == "random" and self.training:
            colour = torch.rand(B, 1, 3, device=dirs.device).expand(B, H * W, 3).reshape(-1, 3)
        else:
            colour = background.to(dirs).view(1, 3)
        return self.rgb_to_field(colour)

    def rgb_to_field(self, rgb: Tensor) -> Tensor:
        """An RGB colour [N, 3] in [0, 1] as a colour-field value [N, field_channels] (identity here)."""
        return rgb

    # ---------------------------------------------------------------------------- training

    def param_groups(self) -> list[dict]:
        lr = self.config.lr
        groups = [
            {"name": "encoding", "params": list(self.encoding.parameters()), "lr": lr.encoding},
            {"name": "network", "params": list(self.network.parameters()), "lr": lr.network},
        ]
        if self.background_network is not None:
            groups.append({"name": "background", "params": list(self.background_network.parameters()), "lr": lr.background})
        return groups

    def regularization(self, render: RenderOutput, step: int) -> dict[str, Tensor]:
        cfg = self.config
        losses: dict[str, Tensor] = {}
        weight = cfg.lambda_orientation(step)
        if weight > 0 and "orientation" in render.aux:
            losses["orientation"] = weight * render.aux["orientation"]
        weight = cfg.lambda_sparsity(step)
        if weight > 0:
            losses["sparsity"] = weight * render.alpha.mean()
        weight = cfg.lambda_opaque(step)
        if weight > 0:
            opacity = render.alpha.clamp(1e-4, 1.0 - 1e-4)
            losses["opaque"] = weight * F.binary_cross_entropy(opacity, (opacity > 0.5).float().detach())
        return losses

    def on_step(self, step: int, render: RenderOutput, optimizer: torch.optim.Optimizer) -> None:
        self.step = step + 1
        cfg = self.config
        if cfg.progressive_start_levels:
            levels = cfg.progressive_start_levels + (step + 1) // cfg.progressive_step_interval
            self.encoding.active_levels = min(levels, cfg.encoding.n_levels)
        self.grid.update(step, self.occupancy_density, self.step_size)

    def occupancy_density(self, points: Tensor) -> Tensor:
        """The density [N] the occupancy grid is refreshed from (a dynamic NeRF's is its maximum over time)."""
        return self.density(points)

    # ------------------------------------------------------------------------------ export

    @torch.no_grad()
    def surface(self, chunk: int = 1 << 18) -> tuple["trimesh.Trimesh", object]:  # noqa: F821
        """The mesh of the density field and a colour function for baking its texture."""
        from lift3d.export.mesh import clean_mesh, extract_mesh

        was_training = self.training
        self.eval()
        r = self.config.radius
        mesh = extract_mesh(
            self.density, [-r, -r, -r], [r, r, r], resolution=self.config.mesh_resolution,
            threshold=self.config.mesh_threshold, level_kind="density", chunk=chunk,
        )
        mesh = clean_mesh(mesh, target_faces=20_000)
        self.train(was_training)
        return mesh, self.albedo

    def export(self, directory: Path, formats: list[str]) -> list[Path]:
        raise ValueError(f"NeRF exports meshes (glb, obj) through the trainer, not {formats}")
