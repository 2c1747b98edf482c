"""Explicit triangle meshes: a given mesh (OBJ, GLB, PLY, STL; an icosphere; or the surface of another
run, ``init_from``) with a learnable appearance, and optionally learnable vertex offsets with
Laplacian and normal-consistency regularisers (Magic3D-refine-style geometry tuning).

Geometry: ``path`` (centred and scaled by ``scale``), or ``init_from`` a run folder or checkpoint of
any representation with ``surface()`` (DMTet, NeRF, Gaussians, another mesh): its exported surface,
kept in that run's world frame (``scale`` is not applied), as Fantasia3D's appearance stage starts
from the geometry stage's DMTet. The source run is read again when this run is resumed or exported.

Appearance:
- ``uv``: a UV texture image (the mesh's own UVs, else an xatlas unwrap), sampled bilinearly at the
  interpolated UVs. RGB through a sigmoid, or **Latent-Paint** (Latent-NeRF, guidance.md §10) with
  ``latent: true``: 4 Stable Diffusion latent channels with no activation, rendered at the latent
  resolution and judged by the teacher as latents (no VAE in the loop).
- ``field``: a hash-grid colour field at the interpolated world points (as DMTet's).

Material (``material``): ``rgb`` (the appearance is the image colour) or ``pbr`` (Fantasia3D's
appearance stage, 4d-pbr-amortized.md §B; ``appearance: field`` only, UV PBR textures are not
implemented). The hash-grid MLP predicts albedo (3), roughness (1), metallic (1) and with
``pbr.bump`` a tangent-space normal perturbation (x, y) (2), each a sigmoid remapped to its
configured [min, max] range (threestudio: metallic [0, 0.9], roughness [0.08, 0.9]; Fantasia3D's
``Gundam_appearance.json`` fixes metallic at 0 (range [0, 0]), roughness [0.08, 0.7], albedo
[0.03, 0.97]). Shading is split-sum image-based lighting (``lift3d.render.pbr.shade``) under one
environment built when the representation is (procedural sky or an HDR file, times ``scale``).
The linear radiance goes through the sRGB transfer function and is clamped to [0, 1] before the
teacher sees it: Stable Diffusion was trained on sRGB-encoded photographs and the analytic teacher's
palette is in display values, so a linear render would look too dark and too contrasty to either
(nvdiffrec's image losses likewise compare sRGB-tonemapped renders; not checked for Fantasia3D's
SDS input; threestudio's pbr-material clamps linear values instead).

Normals and the bump frame: the base shading normal N is the interpolated, renormalised
area-weighted vertex normal of the (welded) mesh (``pbr.vertex_normals``; smooth, as nvdiffrec
shades), and the perturbed normal is ``normalize(T x + B y + N)`` with (T, B) = ``pbr.tangent_frame(N)``:
T = normalize(+z x N), or +x instead of +z within 2.6 degrees of vertical; B = N x T. It needs no
UVs. The GLB export rewrites the same world-space shading normal relative to the UV tangent frame
of the exported atlas, and writes that frame as the ``TANGENT`` attribute with the same vertex
normals as ``NORMAL``, so a glTF viewer rebuilds the trained normal (``lift3d.export.texture.bake_pbr_textures``).
Bump offsets are bounded by ``bump_scale`` per axis before normalisation (tilts up to
atan(sqrt(2) bump_scale)); Paint-it bounds them by 0.1, nvdiffrec's defaults by 1 (x, y) and [0, 1] (z).

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
from lift3d.geometry.meshes import adjacent_face_pairs, load_normalized_mesh, normalize_mesh, smoothness_losses
from lift3d.kernels import mesh_raster
from lift3d.kernels.hashgrid import HashGridConfig, HashGridEncoding
from lift3d.registry import register
from lift3d.render import pbr
from lift3d.render.mesh import SurfacePixels, render_mesh
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
class PBRMaterialConfig:
    """A physically based material field (``material: pbr``) and the light it is seen under."""

    albedo_range: tuple[float, float] = (0.0, 1.0)
    """[min, max] of the linear base colour (Fantasia3D: [0.03, 0.97])."""
    roughness_range: tuple[float, float] = (0.08, 0.9)
    """[min, max] of the perceptual roughness (threestudio; Fantasia3D: [0.08, 0.7])."""
    metallic_range: tuple[float, float] = (0.0, 0.9)
    """[min, max] of the metalness (threestudio; Fantasia3D fixes it at 0: [0, 0])."""
    bump: bool = False
    """Also learn a tangent-space normal perturbation (exported as a glTF normal texture)."""
    bump_scale: float = 0.2
    """Bound of each tangent-space offset (x, y), added to (0, 0, 1) before normalising."""
    light: pbr.EnvironmentLightConfig = field(default_factory=pbr.EnvironmentLightConfig)
    """The environment: ``path`` to an equirectangular .hdr (empty: the procedural sky) and ``scale``
    (Fantasia3D: mud_road_puresky_4k.hdr with scale 2)."""

    def __post_init__(self) -> None:
        for name in ("albedo_range", "roughness_range", "metallic_range"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"representation.pbr.{name} must satisfy 0 <= min <= max <= 1, got {[low, high]}")
        if not 0.0 < self.bump_scale <= 1.0:
            raise ValueError(f"representation.pbr.bump_scale must be in (0, 1], got {self.bump_scale}")
        if self.light.scale <= 0:
            raise ValueError(f"representation.pbr.light.scale must be > 0, got {self.light.scale}")


@dataclass
class TexturedMeshConfig:
    """A given triangle mesh with a learnable texture (and optionally learnable vertex offsets)."""

    path: str = ""
    """Mesh file (anything trimesh loads); empty (and no ``init_from``) = an icosphere of radius ``scale * radius``."""
    init_from: str = ""
    """A run folder or checkpoint of a representation with a surface (DMTet, NeRF, Gaussians): its
    exported mesh, as is, is the geometry (Fantasia3D's appearance stage). Excludes ``path``."""
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
    material: Literal["rgb", "pbr"] = "rgb"
    """``rgb``: the appearance is the colour; ``pbr``: albedo/roughness/metallic(/bump) shaded under an
    environment light (needs ``appearance: field``)."""
    pbr: PBRMaterialConfig = field(default_factory=PBRMaterialConfig)
    """The PBR material and light (``material: pbr``)."""
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
        if self.path and self.init_from:
            raise ValueError("representation.path and representation.init_from are mutually exclusive; give one")
        if self.material not in ("rgb", "pbr"):
            raise ValueError(f"representation.material must be one of rgb, pbr; got {self.material!r}")
        if self.material == "pbr" and self.appearance != "field":
            raise ValueError("representation.material: pbr needs appearance: field (UV PBR textures are not implemented)")


def load_mesh(config: TexturedMeshConfig):
    """The configured mesh (a trimesh): a file centred and scaled, another run's surface as is, or an icosphere."""
    import trimesh

    if config.init_from:
        from lift3d.checkpoint import load_run_representation

        source = load_run_representation(config.init_from)
        if not hasattr(source, "surface"):
            raise ValueError(f"representation.init_from={config.init_from}: a {type(source).__name__} has no surface to export")
        mesh, _ = source.surface()
        logger.info("mesh from %s: %d vertices, %d faces", config.init_from, len(mesh.vertices), len(mesh.faces))
        return trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), process=False)
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
        # The welded surface's face pairs for the normal-consistency loss: fixed, like the faces.
        welded_faces = self.vmapping[self.faces]
        self.register_buffer("welded_face_pairs", adjacent_face_pairs(welded_faces), persistent=False)
        self.offsets = nn.Parameter(torch.zeros_like(welded), requires_grad=config.optimize_geometry)
        channels = 4 if config.latent else 3
        size = config.texture_resolution
        self.texture = nn.Parameter(torch.zeros(1, size, size, channels)) if config.appearance == "uv" else None
        self.light: pbr.EnvironmentLight | None = None
        if config.appearance == "field":
            self.encoding = HashGridEncoding(config.encoding, tier=config.kernel_tier or None)
            self.network = nn.Sequential(nn.Linear(self.encoding.output_dim, config.hidden_dim), nn.ReLU(inplace=True),
                                         nn.Linear(config.hidden_dim, self.field_channels))
        if config.material == "pbr":
            self.light = pbr.EnvironmentLight.from_config(config.pbr.light)  # built once: prefiltering costs ~1 s
        self.register_buffer("adapter", torch.tensor(LATENT_TO_RGB), persistent=False)

    @property
    def field_channels(self) -> int:
        """Outputs of the field's MLP: RGB, or albedo + roughness + metallic (+ 2 bump offsets)."""
        if self.config.material == "rgb":
            return 3
        return 7 if self.config.pbr.bump else 5

    # ------------------------------------------------------------------------------ appearance

    def vertices(self) -> Tensor:
        """[V', 3] render vertices (welded vertices + offsets, repeated along UV seams)."""
        return (self.base_vertices + self.offsets)[self.vmapping]

    def _texel_values(self, uv: Tensor) -> Tensor:
        values = mesh_raster.texture(self.texture, uv.view(1, -1, 1, 2), boundary_mode="clamp",
                                     tier=self.config.kernel_tier or None).view(-1, self.texture.shape[-1])
        return values if self.config.latent else torch.sigmoid(values)

    def _field(self, points: Tensor) -> Tensor:
        unit = (points / self.config.radius + 1.0) * 0.5
        return torch.sigmoid(self.network(self.encoding(unit)))

    def color(self, points: Tensor) -> Tensor:
        """Colour [N, 3] in [0, 1] at world points (``appearance: field``): with ``material: pbr`` the
        sRGB-encoded albedo (for consumers that want one colour per point)."""
        if self.config.material == "pbr":
            return pbr.linear_to_srgb(self.material(points)["albedo"])
        return self._field(points)

    def material(self, points: Tensor) -> dict[str, Tensor]:
        """The PBR material at world points [N, 3]: ``albedo`` [N, 3] (linear), ``roughness`` [N],
        ``metallic`` [N] and, with ``pbr.bump``, ``bump`` [N, 2] (tangent-space offsets)."""
        if self.config.material != "pbr":
            raise ValueError("material() needs representation.material: pbr")
        cfg = self.config.pbr
        raw = self._field(points)

        def remap(values: Tensor, bounds: tuple[float, float]) -> Tensor:
            return bounds[0] + (bounds[1] - bounds[0]) * values

        out = {"albedo": remap(raw[:, 0:3], cfg.albedo_range), "roughness": remap(raw[:, 3], cfg.roughness_range),
               "metallic": remap(raw[:, 4], cfg.metallic_range)}
        if cfg.bump:
            out["bump"] = remap(raw[:, 5:7], (-cfg.bump_scale, cfg.bump_scale))
        return out

    def shading_normals(self, points: Tensor, base_normals: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The material at ``points`` and the unit world shading normals [N, 3] (bump applied to the
        unit ``base_normals``; see the module docstring for the frame)."""
        material = self.material(points)
        normals = pbr.perturb_normal(base_normals, material["bump"]) if "bump" in material else base_normals
        return material, normals

    def _shade_pbr(self, attributes: Tensor, pixels: SurfacePixels) -> Tensor:
        points, base = attributes[:, :3], torch.nn.functional.normalize(attributes[:, 3:6], dim=-1)
        material, normals = self.shading_normals(points, base)
        light = self.light if self.light.radiance.device == points.device else self.light.to(points.device)
        radiance = pbr.shade(material["albedo"], material["roughness"], material["metallic"], normals,
                             pixels.view_dirs.to(points), light)
        return pbr.linear_to_srgb(radiance)  # display values in [0, 1] (module docstring)

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
        elif cfg.material == "pbr":
            welded = self.base_vertices + self.offsets
            normals = pbr.vertex_normals(welded, self.vmapping[self.faces])[self.vmapping]
            attributes, shade = torch.cat([vertices, normals], dim=-1), self._shade_pbr
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
        return smoothness_losses(welded, faces, cfg.lambda_normal_consistency(step), cfg.lambda_laplacian(step),
                                 pairs=self.welded_face_pairs)

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
    def surface(self, chunk: int = 1 << 18) -> tuple["trimesh.Trimesh", object]:  # noqa: F821
        """The (welded) mesh and, for baking (``appearance: field``), the colour field or, with
        ``material: pbr``, a ``PBRSurface`` (albedo, roughness, metallic and shading normals)."""
        import trimesh

        from lift3d.export.texture import PBRSurface

        welded = (self.base_vertices + self.offsets).cpu().numpy()
        mesh = trimesh.Trimesh(welded, self.vmapping[self.faces].cpu().numpy(), process=False)
        if self.texture is not None:
            # UV-textured meshes export through textured_surface(); give the geometry with a flat grey.
            return mesh, lambda points: torch.full((len(points), 3), 0.5)
        if self.config.material == "pbr":
            def sample(points: Tensor, base_normals: Tensor) -> Tensor:
                device = self.base_vertices.device  # the baker queries on its own device (CPU by default)
                with torch.no_grad():
                    material, normals = self.shading_normals(points.to(device), base_normals.to(device))
                    out = torch.cat([material["albedo"], material["roughness"][:, None],
                                     material["metallic"][:, None], normals], dim=-1)
                return out.to(points.device)

            return mesh, PBRSurface(sample=sample, normal_map=self.config.pbr.bump)
        return mesh, self.color

    def export(self, directory: Path, formats: list[str]) -> list[Path]:
        raise ValueError(f"a mesh exports glb or obj through the trainer, not {formats}")
