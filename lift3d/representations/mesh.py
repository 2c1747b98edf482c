"""Explicit triangle meshes: a given mesh (OBJ, GLB, PLY, STL; or an icosphere) with a learnable
appearance, and optionally learnable vertex offsets with Laplacian and normal-consistency
regularisers (Magic3D-refine-style geometry tuning).

Appearance:
- ``uv``: a UV texture image (the mesh's own UVs, else an xatlas unwrap), sampled bilinearly at the
  interpolated UVs. RGB through a sigmoid, or **Latent-Paint** (Latent-NeRF, guidance.md §10) with
  ``latent: true``: 4 Stable Diffusion latent channels with no activation, rendered at the latent
  resolution and judged by the teacher as latents (no VAE in the loop).
- ``field``: a hash-grid colour field at the interpolated world points (as DMTet's).

Texture layout: row 0 of the texture image is its *top* (as written to PNG/GLB), UVs have their
origin at the lower left (OpenGL / OBJ / xatlas), so a UV ``(u, v)`` reads row ``(1 - v) R``.
Exports write the mesh's own UVs and texture (a latent texture through the linear latent -> RGB
adapter, ``latent_nerf.LATENT_TO_RGB``: an approximation of the VAE decoder, documented as such).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from lift3d.cameras import Cameras
from lift3d.config import Schedule
from lift3d.geometry.meshes import load_normalized_mesh, normalize_mesh, smoothness_losses
from lift3d.kernels import mesh_raster
from lift3d.kernels.hashgrid import HashGridConfig, HashGridEncoding
from lift3d.registry import register
from lift3d.render.mesh import render_mesh
from lift3d.representations.base import RenderOutput, Representation
from lift3d.representations.latent_nerf import LATENT_TO_RGB, latent_to_rgb, rgb_to_latent

logger = logging.getLogger(__name__)


@dataclass
class MeshLearningRates:
    """Adam learning rates."""

    texture: float = 0.01
    """UV texture texels (Latent-Paint: 1e-2)."""
    geometry: float = 0.0005
    """Vertex offsets (with ``optimize_geometry``)."""
    encoding: float = 0.01
    """Hash table of the colour field (``appearance: field``)."""
    network: float = 0.001
    """MLP of the colour field."""


@dataclass
class TexturedMeshConfig:
    """A given triangle mesh with a learnable texture (and optionally learnable vertex offsets)."""

    path: str = ""
    """Mesh file (anything trimesh loads); empty = an icosphere of radius ``scale * radius``."""
    scale: float = 0.7
    """The mesh is centred on its bounding box and scaled so its farthest vertex is at scale * radius; 0 keeps it as is."""
    radius: float = 1.0
    """Scene box half-size (the colour field's domain)."""
    icosphere_subdivisions: int = 3
    """Subdivisions of the default icosphere."""
    appearance: Literal["uv", "field"] = "uv"
    """``uv``: a UV texture image; ``field``: a hash-grid colour field at the surface points."""
    texture_resolution: int = 512
    """Side of the UV texture (Latent-Paint: 128 latent texels)."""
    latent: bool = False
    """Latent-Paint: the UV texture holds 4 SD latent channels (no activation), rendered as latents."""
    optimize_geometry: bool = False
    """Learn vertex offsets too (regularise them with the lambdas below)."""
    lambda_laplacian: Schedule = field(default_factory=Schedule)
    """Weight of the uniform Laplacian of the surface."""
    lambda_normal_consistency: Schedule = field(default_factory=Schedule)
    """Weight of 1 - cos between neighbouring face normals."""
    encoding: HashGridConfig = field(default_factory=lambda: HashGridConfig(n_levels=12, log2_hashmap_size=16))
    """Hash-grid encoding of the colour field (``appearance: field``)."""
    hidden_dim: int = 32
    """Width of the colour field's MLP."""
    near: float = 0.1
    """Near plane of the rasterizer's projection."""
    far: float = 100.0
    """Far plane of the rasterizer's projection."""
    antialias: bool = True
    """Analytic silhouette antialiasing."""
    lr: MeshLearningRates = field(default_factory=MeshLearningRates)
    """Learning rates."""
    kernel_tier: str = ""
    """Force a kernel tier for rasterizer and hash grid (reference, cpu); empty = fastest."""

    def __post_init__(self) -> None:
        if self.scale < 0 or self.radius <= 0:
            raise ValueError("representation.scale must be >= 0 and representation.radius > 0")
        if self.texture_resolution < 2:
            raise ValueError(f"representation.texture_resolution must be >= 2, got {self.texture_resolution}")
        if self.latent and self.appearance != "uv":
            raise ValueError("representation.latent (Latent-Paint) needs appearance: uv")


def load_mesh(config: TexturedMeshConfig):
    """The configured mesh (a trimesh), centred and scaled."""
    import trimesh

    if config.path:
        return load_normalized_mesh(config.path, config.scale, config.radius, "representation.path")
    sphere = trimesh.creation.icosphere(subdivisions=config.icosphere_subdivisions, radius=1.0)
    return normalize_mesh(sphere, config.scale, config.radius)


@register("representation", "mesh", TexturedMeshConfig)
class TexturedMesh(Representation):
    """A fixed-topology mesh with a UV texture or colour field (and optional vertex offsets)."""

    def __init__(self, config: TexturedMeshConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        if generator is not None:
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        mesh = load_mesh(config)
        welded = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)
        uv = getattr(mesh.visual, "uv", None)
        if config.appearance == "uv" and uv is None:
            from lift3d.export.texture import unwrap_uv

            vertices, faces, uvs, vmapping = unwrap_uv(mesh, texture_size=config.texture_resolution)
            logger.info("unwrapped %d faces into %d UV vertices", len(faces), len(vertices))
        else:
            faces = np.asarray(mesh.faces)
            uvs = np.zeros((len(welded), 2), np.float32) if uv is None else np.asarray(uv, np.float32)
            vmapping = np.arange(len(welded))
        self.register_buffer("base_vertices", welded, persistent=False)
        self.register_buffer("vmapping", torch.as_tensor(np.asarray(vmapping), dtype=torch.long), persistent=False)
        self.register_buffer("faces", torch.as_tensor(np.asarray(faces), dtype=torch.long), persistent=False)
        # Texture rows run top-down, UVs bottom-up: store v flipped once (see the module docstring).
        flipped = torch.as_tensor(np.asarray(uvs), dtype=torch.float32) * torch.tensor([1.0, -1.0]) + torch.tensor([0.0, 1.0])
        self.register_buffer("uvs", flipped, persistent=False)
        self.register_buffer("topology", mesh_raster.edge_topology(self.faces), persistent=False)
        self.offsets = nn.Parameter(torch.zeros_like(welded), requires_grad=config.optimize_geometry)
        channels = 4 if config.latent else 3
        size = config.texture_resolution
        self.texture = nn.Parameter(torch.zeros(1, size, size, channels)) if config.appearance == "uv" else None
        if config.appearance == "field":
            self.encoding = HashGridEncoding(config.encoding, tier=config.kernel_tier or None)
            self.network = nn.Sequential(nn.Linear(self.encoding.output_dim, config.hidden_dim), nn.ReLU(inplace=True),
                                         nn.Linear(config.hidden_dim, 3))
        self.register_buffer("adapter", torch.tensor(LATENT_TO_RGB), persistent=False)

    # ------------------------------------------------------------------------------ appearance

    def vertices(self) -> Tensor:
        """[V', 3] render vertices (welded vertices + offsets, repeated along UV seams)."""
        return (self.base_vertices + self.offsets)[self.vmapping]

    def _texel_values(self, uv: Tensor) -> Tensor:
        values = mesh_raster.texture(self.texture, uv.view(1, -1, 1, 2), boundary_mode="clamp").view(-1, self.texture.shape[-1])
        return values if self.config.latent else torch.sigmoid(values)

    def color(self, points: Tensor) -> Tensor:
        """Colour field [N, 3] at world points (``appearance: field``)."""
        unit = (points / self.config.radius + 1.0) * 0.5
        return torch.sigmoid(self.network(self.encoding(unit)))

    def _background(self, background: Tensor) -> Tensor:
        if not self.config.latent:
            return background
        return rgb_to_latent(background.to(self.adapter), self.adapter)

    # ---------------------------------------------------------------------------------- render

    def render(self, cameras: Cameras, background: Tensor) -> RenderOutput:
        cfg = self.config
        vertices = self.vertices()
        if cfg.appearance == "uv":
            attributes, shade = self.uvs, lambda uv, _: self._texel_values(uv)
        else:
            attributes, shade = vertices, lambda points, _: self.color(points)
        out = render_mesh(
            vertices, self.faces, cameras, self._background(background), attributes=attributes, shade=shade,
            near=cfg.near, far=cfg.far, antialias=cfg.antialias, topology=self.topology, tier=cfg.kernel_tier or None,
        )
        out.aux["vertices"] = vertices
        return out

    # -------------------------------------------------------------------------------- training

    def param_groups(self) -> list[dict]:
        lr = self.config.lr
        groups = []
        if self.texture is not None:
            groups.append({"name": "texture", "params": [self.texture], "lr": lr.texture})
        else:
            groups += [{"name": "encoding", "params": list(self.encoding.parameters()), "lr": lr.encoding},
                       {"name": "network", "params": list(self.network.parameters()), "lr": lr.network}]
        if self.config.optimize_geometry:
            groups.append({"name": "geometry", "params": [self.offsets], "lr": lr.geometry})
        return groups

    def regularization(self, render: RenderOutput, step: int) -> dict[str, Tensor]:
        cfg = self.config
        if not cfg.optimize_geometry:
            return {}
        welded = self.base_vertices + self.offsets
        faces = self.vmapping[self.faces]  # regularise the welded surface: seams are not edges
        return smoothness_losses(welded, faces, cfg.lambda_normal_consistency(step), cfg.lambda_laplacian(step))

    def on_step(self, step: int, render: RenderOutput, optimizer: torch.optim.Optimizer) -> None:
        pass

    # ---------------------------------------------------------------------------------- export

    @torch.no_grad()
    def textured_surface(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """(vertices [V', 3], faces, uvs [V', 2] lower-left origin, texture uint8 [R, R, 3] sRGB), or None
        for a colour field (the trainer bakes :meth:`surface` then)."""
        if self.texture is None:
            return None
        texture = self.texture[0]
        rgb = latent_to_rgb(texture, self.adapter) if self.config.latent else torch.sigmoid(texture)
        image = (rgb.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
        uvs = self.uvs * torch.tensor([1.0, -1.0]) + torch.tensor([0.0, 1.0])
        return (self.vertices().cpu().numpy(), self.faces.cpu().numpy(), uvs.cpu().numpy(), image)

    @torch.no_grad()
    def surface(self) -> tuple["trimesh.Trimesh", object]:  # noqa: F821
        """The (welded) mesh and the colour field, for baking (``appearance: field``)."""
        import trimesh

        welded = (self.base_vertices + self.offsets).cpu().numpy()
        mesh = trimesh.Trimesh(welded, self.vmapping[self.faces].cpu().numpy(), process=False)
        if self.texture is not None:
            raise ValueError("a UV-textured mesh exports its own texture (textured_surface), not a baked field")
        return mesh, self.color

    def export(self, directory: Path, formats: list[str]) -> list[Path]:
        raise ValueError(f"a mesh exports glb or obj through the trainer, not {formats}")
