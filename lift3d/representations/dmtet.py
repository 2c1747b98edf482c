"""DMTet (Shen et al., arXiv 2111.04276; Magic3D-refine / Fantasia3D geometry): an SDF and a bounded
vertex deformation on a tetrahedral grid, turned into a triangle mesh by differentiable marching
tetrahedra every step, rasterized (``kernels.mesh_raster``) and coloured by a hash-grid colour
field at the surface points of each pixel (deferred shading).

Gradients reach the SDF and the deformation through the surface vertices: inside the silhouette
through the interpolated surface points the colour field is queried at, on the silhouette through
the analytic antialiasing of the composited image (as nvdiffrast's ``antialias`` provides them).

Initialisation: a sphere SDF (``init_radius``), or a NeRF run's density field
(``init_from=RUN_DIR``, Magic3D's coarse-to-fine and Fantasia3D's shape init): the grid's SDF is
``level - density`` at each vertex, with the level from the same automatic rule as mesh export
(Otsu on log(1 + density)), scaled to one grid cell at the steepest vertex.

Rendering: ``lift3d.render.mesh.render_mesh`` (projection, deferred shading, antialiasing).

Shading: ``color`` (the colour field) or ``normal`` (Fantasia3D's geometry stage, guidance.md /
4d-pbr-amortized.md §B.2): the image is the world-space normal map (n + 1) / 2, so the teacher
judges the shape alone and every covered pixel moves the surface through its face normal, not only
the silhouettes. For its first ``normal_latent_steps`` steps Fantasia3D feeds the normal map and
the mask, downsampled, directly as the 4 latent channels of Stable Diffusion; so does this one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from lift3d.cameras import Cameras
from lift3d.config import Schedule
from lift3d.geometry.meshes import edge_adjacency, smoothness_losses
from lift3d.geometry.tetrahedra import crossing_cells, marching_tetrahedra, tetrahedral_grid
from lift3d.kernels.hashgrid import HashGridConfig, HashGridEncoding
from lift3d.registry import register
from lift3d.render.mesh import SurfacePixels, render_mesh
from lift3d.representations.base import RenderOutput, Representation

logger = logging.getLogger(__name__)


@dataclass
class DMTetLearningRates:
    """Adam learning rates."""

    sdf: float = 0.002
    """SDF values at the grid vertices (``sdf: grid``)."""
    sdf_encoding: float = 0.01
    """Hash table of the SDF field (``sdf: field``)."""
    sdf_network: float = 0.001
    """MLP of the SDF field (``sdf: field``)."""
    deformation: float = 0.002
    """Vertex deformations (before the tanh bound)."""
    encoding: float = 0.01
    """Hash table of the colour field."""
    network: float = 0.001
    """MLP of the colour field."""


@dataclass
class DMTetConfig:
    """A deformable tetrahedral grid with an SDF, and a colour field on its surface."""

    radius: float = 1.0
    """The grid fills the cube [-radius, radius]^3."""
    grid_resolution: int = 64
    """Cells per side of the tetrahedral grid (6 tetrahedra per cell; 32-256)."""
    init_radius: float = 0.6
    """Radius of the initial sphere SDF (unless ``init_from`` is given)."""
    init_from: str = ""
    """A NeRF run folder (or its checkpoint): the SDF starts from that run's density field."""
    sdf: Literal["grid", "field"] = "grid"
    """``grid``: a free SDF value per grid vertex (Magic3D / threestudio refine); ``field``: the initial
    SDF plus a hash-grid MLP residual whose last layer starts at zero (Fantasia3D's neural SDF): the
    field couples neighbouring vertices, so noisy per-pixel gradients (normal-map SDS from a sphere)
    move the surface coherently instead of roughening it."""
    sdf_encoding: HashGridConfig = field(default_factory=lambda: HashGridConfig(n_levels=8, log2_hashmap_size=16))
    """Hash-grid encoding of the SDF residual (``sdf: field``)."""
    sdf_hidden_dim: int = 32
    """Width of the SDF residual's MLP (``sdf: field``)."""
    deformation_scale: float = 0.5
    """Largest vertex displacement, in grid cells (tanh-bounded, so tetrahedra never invert)."""
    encoding: HashGridConfig = field(default_factory=lambda: HashGridConfig(n_levels=12, log2_hashmap_size=16))
    """Hash-grid encoding of the colour field."""
    hidden_dim: int = 32
    """Width of the colour MLP."""
    shading: Literal["color", "normal"] = "color"
    """``color``: the colour field; ``normal``: the world-space normal map (n + 1) / 2 (geometry stage)."""
    normal_latent_steps: int = 0
    """With ``shading: normal``, train this many first steps on [normal map, mask] as 4 latent
    channels (Fantasia3D's coarse phase; for latent teachers such as Stable Diffusion)."""
    lambda_normal_consistency: Schedule = field(default_factory=Schedule)
    """Weight of 1 - cos between the normals of faces sharing an edge (smooth surfaces)."""
    lambda_laplacian: Schedule = field(default_factory=Schedule)
    """Weight of the uniform Laplacian |v - mean(neighbours)|^2 of the surface vertices."""
    near: float = 0.1
    """Near plane of the rasterizer's projection."""
    far: float = 100.0
    """Far plane of the rasterizer's projection."""
    antialias: bool = True
    """Analytic silhouette antialiasing (the gradient path to the silhouette)."""
    lr: DMTetLearningRates = field(default_factory=DMTetLearningRates)
    """Learning rates."""
    kernel_tier: str = ""
    """Force a kernel tier for hash grid and rasterizer (reference, cpu); empty = fastest."""

    def __post_init__(self) -> None:
        if not 2 <= self.grid_resolution <= 512:
            raise ValueError(f"representation.grid_resolution must be in [2, 512], got {self.grid_resolution}")
        if not 0 < self.init_radius < self.radius:
            raise ValueError(f"representation.init_radius must be in (0, radius={self.radius}), got {self.init_radius}")
        if not 0 < self.near < self.far:
            raise ValueError("representation.near and far must satisfy 0 < near < far")
        if self.sdf not in ("grid", "field"):
            raise ValueError(f"representation.sdf must be one of grid, field; got {self.sdf!r}")
        if self.shading not in ("color", "normal"):
            raise ValueError(f"representation.shading must be one of color, normal; got {self.shading!r}")
        if self.normal_latent_steps < 0 or (self.normal_latent_steps and self.shading != "normal"):
            raise ValueError("representation.normal_latent_steps must be >= 0, and needs shading: normal")


@register("representation", "dmtet", DMTetConfig)
class DMTet(Representation):
    """SDF + deformation on a Kuhn tetrahedral grid, with a hash-grid colour field."""

    def __init__(self, config: DMTetConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        if generator is not None:  # the MLP init draws from torch's global RNG; seed it from the run
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        vertices, tets = tetrahedral_grid(config.grid_resolution, config.radius)
        self.register_buffer("grid_vertices", vertices, persistent=False)
        self.register_buffer("tets", tets, persistent=False)
        self.cell = 2.0 * config.radius / config.grid_resolution
        sdf = vertices.norm(dim=-1) - config.init_radius
        if config.init_from:
            sdf = self._sdf_from_nerf(config.init_from)
        if config.sdf == "field":
            # The initial SDF stays as a saved buffer (a NeRF's is not recomputable without its run).
            self.register_buffer("base_sdf", sdf)
            self.sdf = None
            self.sdf_encoding = HashGridEncoding(config.sdf_encoding, tier=config.kernel_tier or None)
            self.sdf_network = nn.Sequential(
                nn.Linear(self.sdf_encoding.output_dim, config.sdf_hidden_dim), nn.ReLU(inplace=True),
                nn.Linear(config.sdf_hidden_dim, 1),
            )
            nn.init.zeros_(self.sdf_network[-1].weight)  # start exactly at the initial SDF
            nn.init.zeros_(self.sdf_network[-1].bias)
        else:
            self.sdf = nn.Parameter(sdf)
        self.deformation = nn.Parameter(torch.zeros_like(vertices))
        self.encoding = HashGridEncoding(config.encoding, tier=config.kernel_tier or None)
        self.network = nn.Sequential(
            nn.Linear(self.encoding.output_dim, config.hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(config.hidden_dim, 3),
        )
        # Steps taken, for the latent phase of normal shading (saved, so a resumed run keeps its phase).
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------------------ geometry

    def _sdf_from_nerf(self, source: str) -> Tensor:
        from lift3d.checkpoint import load_run_representation
        from lift3d.export.mesh import auto_density_level

        nerf = load_run_representation(source)
        if not hasattr(nerf, "density"):
            raise ValueError(f"representation.init_from={source}: a {type(nerf).__name__} has no density field")
        with torch.no_grad():
            density = torch.cat([nerf.density(chunk) for chunk in self.grid_vertices.split(65536)])
        level = auto_density_level(density.numpy())
        sdf = level - density
        # SDF units: one cell at the steepest vertex keeps the zero crossings where the NeRF puts them.
        sdf = sdf / sdf.abs().max().clamp_min(1e-12) * self.cell * self.config.grid_resolution / 2
        logger.info("DMTet initialised from %s (density level %.3g)", source, level)
        return sdf.float()

    def deformed_vertices(self, indices: Tensor | None = None) -> Tensor:
        """[V, 3] grid vertices moved by at most ``deformation_scale`` cells (only ``indices`` [U] if given)."""
        if indices is None:
            return self.grid_vertices + torch.tanh(self.deformation) * self.config.deformation_scale * self.cell
        offsets = torch.tanh(self.deformation[indices]) * self.config.deformation_scale * self.cell
        return self.grid_vertices[indices] + offsets

    def sdf_values(self) -> Tensor:
        """[V] SDF at the grid vertices (negative inside)."""
        if self.sdf is not None:
            return self.sdf
        unit = (self.grid_vertices / self.config.radius + 1.0) * 0.5
        return self.base_sdf + self.sdf_network(self.sdf_encoding(unit)).squeeze(-1)

    def mesh(self) -> tuple[Tensor, Tensor]:
        """The current surface: vertices [S, 3] (differentiable) and faces [F, 3]."""
        sdf = self.sdf_values()
        # Only the cells the surface crosses, and only their corners deformed: the same mesh as
        # from all 6 r^3 tetrahedra and V vertices, at a few percent of the cost (and of the
        # backward's: the gradient reaches only those vertices).
        used, local_tets = crossing_cells(self.tets, sdf.detach(), self.config.grid_resolution)
        return marching_tetrahedra(self.deformed_vertices(used), local_tets, sdf[used])

    def color(self, points: Tensor) -> Tensor:
        """RGB [N, 3] in [0, 1] of the colour field at world points [N, 3]."""
        unit = (points / self.config.radius + 1.0) * 0.5
        return torch.sigmoid(self.network(self.encoding(unit)))

    # -------------------------------------------------------------------------------- render

    def _shade(self, points: Tensor, pixels: SurfacePixels) -> Tensor:
        if self.config.shading == "normal":
            return (pixels.normals + 1.0) * 0.5
        return self.color(points)

    def latent_phase(self) -> bool:
        """Whether training renders [normal map, mask] as latents now (never in eval mode)."""
        return self.training and int(self.steps_done) < self.config.normal_latent_steps

    def render(self, cameras: Cameras, background: Tensor) -> RenderOutput:
        cfg = self.config
        vertices, faces = self.mesh()
        # One sort of the edges gives both the antialiasing's topology and the normal-consistency
        # loss's face pairs (regularization reads them from aux).
        topology, face_pairs = edge_adjacency(faces) if len(faces) else (None, None)
        latent = self.latent_phase()
        # Fantasia3D composites the latent-phase normal map over black, with the mask as channel 4.
        background = torch.zeros_like(background) if latent else background
        out = render_mesh(
            vertices, faces, cameras, background.to(self.grid_vertices), attributes=vertices, shade=self._shade,
            near=cfg.near, far=cfg.far, antialias=cfg.antialias, topology=topology, tier=cfg.kernel_tier or None,
        )
        if latent:
            out.rgb = torch.cat([out.rgb, out.alpha], dim=-1)
        out.aux.update(vertices=vertices, faces=faces)
        if face_pairs is not None:
            out.aux["face_pairs"] = face_pairs
        return out

    # ------------------------------------------------------------------------------ training

    def param_groups(self) -> list[dict]:
        lr = self.config.lr
        if self.sdf is not None:
            geometry = [{"name": "sdf", "params": [self.sdf], "lr": lr.sdf}]
        else:
            geometry = [{"name": "sdf_encoding", "params": list(self.sdf_encoding.parameters()), "lr": lr.sdf_encoding},
                        {"name": "sdf_network", "params": list(self.sdf_network.parameters()), "lr": lr.sdf_network}]
        return geometry + [
            {"name": "deformation", "params": [self.deformation], "lr": lr.deformation},
            {"name": "encoding", "params": list(self.encoding.parameters()), "lr": lr.encoding},
            {"name": "network", "params": list(self.network.parameters()), "lr": lr.network},
        ]

    def regularization(self, render: RenderOutput, step: int) -> dict[str, Tensor]:
        cfg = self.config
        vertices, faces = render.aux.get("vertices"), render.aux.get("faces")
        if vertices is None or faces is None or len(faces) == 0:
            return {}
        return smoothness_losses(vertices, faces, cfg.lambda_normal_consistency(step), cfg.lambda_laplacian(step),
                                 pairs=render.aux.get("face_pairs"))

    def on_step(self, step: int, render: RenderOutput, optimizer: torch.optim.Optimizer) -> None:
        self.steps_done.fill_(step + 1)

    # ------------------------------------------------------------------------------ export

    @torch.no_grad()
    def surface(self, chunk: int = 1 << 18) -> tuple["trimesh.Trimesh", object]:  # noqa: F821
        """The current marching-tetrahedra mesh (cleaned) and the colour field for baking."""
        import trimesh

        from lift3d.export.mesh import clean_mesh

        vertices, faces = self.mesh()
        if len(faces) == 0:
            raise ValueError("the DMTet surface is empty (the SDF has no zero crossing in the grid)")
        mesh = trimesh.Trimesh(vertices.cpu().numpy(), faces.cpu().numpy(), process=True)
        return clean_mesh(mesh, target_faces=20_000), self.color

    def export(self, directory: Path, formats: list[str]) -> list[Path]:
        raise ValueError(f"DMTet exports meshes (glb, obj) through the trainer, not {formats}")
