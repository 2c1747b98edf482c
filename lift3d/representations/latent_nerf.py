"""Latent-NeRF (Metzer et al., arXiv 2211.07600): a hash-grid NeRF whose colour field is 4 Stable
Diffusion latent channels, the Sketch-Shape loss that holds its density to a user's coarse mesh,
and the RGB refinement stage (a linear latent -> RGB adapter in front of the same field).

From the official code (``eladrich/latent-nerf``, guidance.md §10):

- latent mode: the field's 4 channels have no activation and are composited as they are; the
  background network also outputs 4 channels. The render *is* the latent x0: the teachers take a
  4-channel render as latents (``encode_images``), so SDS runs with no VAE in the loop.
- refinement (``latent_tune``): ``rgb = (latent @ A + 1) / 2`` with ``A`` a trainable
  ``Linear(4 -> 3, bias=False)`` initialised with SD's linear latent -> RGB approximation
  (``LATENT_TO_RGB``); training continues in RGB through the VAE.
- Sketch-Shape (``shape_loss.py``): on points p,
  ``alpha_NeRF = 1 - exp(-delta sigma(p))``, ``alpha_GT = 1[winding number of the mesh at p > 0.5]``,
  ``w = 1 - exp(-d(p)^2 / (2 sigma_S^2))`` with d the distance to the mesh surface, and
  ``L = sum_p w CE(alpha_NeRF, alpha_GT)``, ``CE(a, q) = -[a log q + (1 - a) log(1 - q)]``, q clamped
  to [0.01, 0.99]; gradients flow through alpha_NeRF only.

Differences, deliberate and documented: the shape loss is evaluated on points drawn uniformly in
the scene box each step (the official code uses the ray-march samples) and is a *mean* over them
(the official *sum* with lambda 5e-6 over ~1e5 samples is a mean with lambda ~0.5); alpha_GT and w
are precomputed once on a grid (exact generalised winding numbers; the distance to dense surface
samples) and looked up trilinearly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lift3d.checkpoint import load_checkpoint, resolve_init_from
from lift3d.config import Schedule
from lift3d.geometry.meshes import load_normalized_mesh
from lift3d.registry import register
from lift3d.representations.base import RenderOutput
from lift3d.representations.nerf import NeRF, NeRFConfig

logger = logging.getLogger(__name__)

LATENT_TO_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
"""SD's linear latent -> RGB approximation [4, 3] (Latent-NeRF ``init_decoder_layer``); rgb = (z @ A + 1) / 2."""


def latent_to_rgb(latent: Tensor, adapter: Tensor) -> Tensor:
    """Latents [..., 4] -> RGB [..., 3] through an adapter matrix [4, 3]: (z @ A + 1) / 2 (not clamped)."""
    return (latent @ adapter.to(latent) + 1.0) * 0.5


def rgb_to_latent(rgb: Tensor, adapter: Tensor) -> Tensor:
    """The least-squares latent [..., 4] whose adapter image is ``rgb`` [..., 3] (exact: A has rank 3)."""
    return (2.0 * rgb - 1.0) @ torch.linalg.pinv(adapter.detach().double()).to(rgb)


@dataclass
class SketchShapeConfig:
    """The Sketch-Shape loss: keep the density inside a user's coarse mesh, away from its surface."""

    mesh: str = ""
    """Path of the guiding mesh (OBJ, GLB, PLY, STL: anything trimesh loads); empty = no shape loss."""
    scale: float = 0.7
    """The mesh is centred on its bounding box and scaled so its farthest vertex is at scale * radius (mesh_scale)."""
    weight: Schedule = field(default_factory=lambda: Schedule(0.5))
    """lambda of the mean loss (the official sum with 5e-6 over ~1e5 ray samples is a mean with ~0.5)."""
    proximal_sigma: float = 0.3
    """sigma_S of w = 1 - exp(-d^2 / (2 sigma_S^2)): near the sketch surface the loss lets the shape move."""
    delta: float = 0.2
    """delta of alpha_NeRF = 1 - exp(-delta sigma)."""
    num_points: int = 4096
    """Points drawn uniformly in the scene box per step."""
    grid_resolution: int = 64
    """Resolution of the precomputed occupancy and proximity grids."""
    surface_samples: int = 20_000
    """Surface samples used for the distance to the mesh."""

    def validate(self) -> None:
        for name in ("scale", "proximal_sigma", "delta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"representation.sketch_shape.{name} must be positive, got {getattr(self, name)}")
        if self.num_points < 1 or self.grid_resolution < 2 or self.surface_samples < 1:
            raise ValueError("representation.sketch_shape: num_points, grid_resolution and surface_samples must be positive")


@dataclass
class LatentNeRFConfig(NeRFConfig):
    """A NeRF rendering Stable Diffusion latents (or, when refining, RGB through a linear adapter)."""

    background: Literal["solid", "random", "neural"] = "neural"
    """Latent-NeRF learns its background in latent space (a solid or random RGB is mapped through the adapter's pseudo-inverse)."""
    refinement: bool = False
    """RGB refinement: render (z @ A + 1) / 2 with a trainable adapter A (init ``LATENT_TO_RGB``); the teacher then VAE-encodes."""
    init_from: str = ""
    """A checkpoint (``.pt``) or run folder (its ``ckpt/last.pt``) whose representation initialises this one (latent stage -> refinement)."""
    sketch_shape: SketchShapeConfig = field(default_factory=SketchShapeConfig)
    """The Sketch-Shape loss (off unless ``sketch_shape.mesh`` is set)."""


# ------------------------------------------------------------------------------ mesh queries


def winding_numbers(points: Tensor, triangles: Tensor, chunk: int = 2048) -> Tensor:
    """Generalised winding numbers [P] of points [P, 3] w.r.t. a triangle soup [F, 3, 3].

    Sum of signed solid angles / 4 pi (Van Oosterom & Strackee); ~1 inside a closed outward-oriented
    mesh, ~0 outside, and a soft inside-ness for meshes with holes.
    """
    results = []
    for begin in range(0, len(points), chunk):
        p = points[begin : begin + chunk, None, None, :]  # [P, 1, 1, 3]
        abc = triangles[None] - p  # [P, F, 3, 3]
        a, b, c = abc.unbind(dim=2)
        la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
        numerator = (a * torch.cross(b, c, dim=-1)).sum(-1)
        denominator = (
            la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
        )
        results.append(torch.atan2(numerator, denominator).sum(-1) / (2.0 * math.pi))
    return torch.cat(results) if results else points.new_zeros(0)


def distance_to_samples(points: Tensor, samples: Tensor, chunk: int = 4096) -> Tensor:
    """Distance [P] from each point [P, 3] to the nearest of ``samples`` [S, 3]."""
    out = []
    for begin in range(0, len(points), chunk):
        out.append(torch.cdist(points[begin : begin + chunk], samples).min(dim=1).values)
    return torch.cat(out) if out else points.new_zeros(0)


class SketchShape(nn.Module):
    """Precomputed alpha_GT and w grids of a guiding mesh, and the loss on a density field."""

    def __init__(self, config: SketchShapeConfig, radius: float):
        super().__init__()
        import trimesh

        config.validate()
        self.config, self.radius = config, radius
        mesh = load_normalized_mesh(config.mesh, config.scale, radius, "representation.sketch_shape.mesh")
        vertices = torch.as_tensor(mesh.vertices, dtype=torch.float64)
        faces = torch.as_tensor(mesh.faces, dtype=torch.long)
        triangles = vertices[faces].float()
        samples, _ = trimesh.sample.sample_surface(mesh, config.surface_samples, seed=0)
        samples = torch.as_tensor(samples, dtype=torch.float32)

        n = config.grid_resolution
        axis = torch.linspace(-radius, radius, n)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
        inside = (winding_numbers(grid, triangles) > 0.5).float()
        distance = distance_to_samples(grid, samples)
        weight = 1.0 - torch.exp(-distance.square() / (2.0 * config.proximal_sigma**2))
        # [1, 2, D, H, W] for grid_sample: channel 0 = alpha_GT, 1 = w; grid_sample's (x, y, z) index (W, H, D).
        volume = torch.stack([inside, weight]).view(2, n, n, n).permute(0, 3, 2, 1)
        self.register_buffer("volume", volume.unsqueeze(0).contiguous(), persistent=False)
        self.register_buffer("vertices", vertices.float(), persistent=False)
        self.register_buffer("faces", faces, persistent=False)
        logger.info("sketch shape %s: %d faces, %.1f%% of the box inside", config.mesh, len(faces), 100 * float(inside.mean()))

    def lookup(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_GT, w) [P] at world points [P, 3], trilinear on the grids."""
        coords = (points / self.radius).view(1, -1, 1, 1, 3)
        values = F.grid_sample(self.volume.to(points), coords, mode="bilinear", align_corners=True, padding_mode="border")
        values = values.view(2, -1)
        return (values[0] > 0.5).float(), values[1]

    def loss(self, density_fn, generator: torch.Generator | None = None) -> Tensor:
        """Mean of w CE(alpha_NeRF, alpha_GT) over ``num_points`` uniform points in the box."""
        device = self.volume.device
        points = (torch.rand(self.config.num_points, 3, generator=generator).to(device) * 2.0 - 1.0) * self.radius
        target, weight = self.lookup(points)
        alpha = (1.0 - torch.exp(-self.config.delta * density_fn(points))).clamp(0.0, 1.0)
        q = target.clamp(0.01, 0.99)
        cross_entropy = -(alpha * torch.log(q) + (1.0 - alpha) * torch.log(1.0 - q))
        return (weight * cross_entropy).mean()


# ------------------------------------------------------------------------------ representation


@register("representation", "latent-nerf", LatentNeRFConfig)
class LatentNeRF(NeRF):
    """Hash-grid NeRF whose field is 4 SD latent channels (or RGB through the adapter when refining)."""

    field_channels = 4

    def __init__(self, config: LatentNeRFConfig, generator: torch.Generator | None = None):
        if config.shading.mode != "albedo":
            raise ValueError("representation.shading.mode must be 'albedo' for a latent NeRF (latents are not lit)")
        super().__init__(config, generator)
        self.config: LatentNeRFConfig = config
        self.adapter = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.adapter.weight.copy_(torch.tensor(LATENT_TO_RGB).T)
        self.adapter.requires_grad_(config.refinement)
        self.sketch = SketchShape(config.sketch_shape, config.radius) if config.sketch_shape.mesh else None
        if config.init_from:
            state = load_checkpoint(resolve_init_from(config.init_from))["representation"]
            missing, unexpected = self.load_state_dict(state, strict=False)
            # A NeRF checkpoint may lack the adapter (kept at its init); anything else must match.
            missing = [k for k in missing if not k.startswith("adapter.")]
            if missing or unexpected:
                raise ValueError(
                    f"representation.init_from={config.init_from}: not a latent-NeRF checkpoint "
                    f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
                )
            logger.info("initialised from %s", config.init_from)

    def activate_field(self, raw: Tensor) -> Tensor:
        return raw  # latents have no activation (Latent-NeRF)

    def to_rgb(self, composited: Tensor) -> Tensor:
        if not self.config.refinement:
            return composited
        return latent_to_rgb(composited, self.adapter.weight.T)

    def rgb_to_field(self, rgb: Tensor) -> Tensor:
        # A solid or random background in latent space, as the current adapter sees it.
        return rgb_to_latent(rgb, self.adapter.weight.T)

    def albedo(self, points: Tensor) -> Tensor:
        """RGB [N, 3] in [0, 1] through the adapter (mesh textures of a latent NeRF are this approximation)."""
        return latent_to_rgb(self._raw(points)[1], self.adapter.weight.T).clamp(0.0, 1.0)

    def param_groups(self) -> list[dict]:
        groups = super().param_groups()
        if self.config.refinement:
            groups.append({"name": "adapter", "params": list(self.adapter.parameters()), "lr": self.config.lr.network})
        return groups

    def regularization(self, render: RenderOutput, step: int) -> dict[str, Tensor]:
        losses = super().regularization(render, step)
        if self.sketch is not None:
            weight = self.config.sketch_shape.weight(step)
            if weight > 0:
                losses["sketch_shape"] = weight * self.sketch.loss(self.density)
        return losses
