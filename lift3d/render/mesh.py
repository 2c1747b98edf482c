"""Rendering a triangle mesh through the rasterizer kernel (``kernels.mesh_raster``): projection of
OpenCV cameras to clip space, deferred shading of interpolated vertex attributes, compositing over
the background and analytic silhouette antialiasing. Shared by every mesh representation.

Projection: OpenCV cameras (``lift3d.cameras``: x right, y down, z forward) map to clip space
with ``ndc_y`` growing *down* the image, so the rasterizer's row 0 is the image's top row and
nothing is flipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from lift3d.cameras import Cameras
from lift3d.geometry.meshes import face_normals
from lift3d.kernels import mesh_raster
from lift3d.representations.base import RenderOutput



@dataclass
class SurfacePixels:
    """What a shade function knows about the N covered pixels besides their interpolated attributes."""

    normals: Tensor
    """[N, 3] unit world-space normals of the faces seen (differentiable in the vertices)."""
    cameras: Cameras
    """The B cameras rendered."""
    covered: Tensor
    """[B, H, W] bool: the pixels a face covers, in the order of the N rows."""

    @cached_property
    def view_dirs(self) -> Tensor:
        """[N, 3] unit world-space directions from the surface towards the camera (computed on first
        use: most shade functions never ask)."""
        _, directions = self.cameras.rays()
        return -torch.nn.functional.normalize(directions.to(self.normals)[self.covered], dim=-1)


ShadeFn = Callable[[Tensor, SurfacePixels], Tensor]
"""(interpolated attributes of the covered pixels [N, A], their surface context) -> colours [N, C]."""


def clip_positions(vertices: Tensor, cameras: Cameras, near: float, far: float) -> Tensor:
    """[B, V, 4] homogeneous clip coordinates of world vertices [V, 3] for OpenCV pinhole cameras."""
    w2c = cameras.world_to_camera().to(vertices)
    homogeneous = torch.cat([vertices, torch.ones_like(vertices[:, :1])], dim=-1)
    camera = torch.einsum("bij,vj->bvi", w2c, homogeneous)[..., :3]  # x right, y down, z forward
    focal = cameras.focal().to(vertices).view(-1, 1)
    x = camera[..., 0] * (2.0 * focal / cameras.width)
    y = camera[..., 1] * (2.0 * focal / cameras.height)
    z = camera[..., 2] * ((far + near) / (far - near)) - 2.0 * far * near / (far - near)
    return torch.stack([x, y, z, camera[..., 2]], dim=-1)


def shown_face_normals(vertices: Tensor, faces: Tensor, ids: Tensor) -> Tensor:
    """[N, 3] ``face_normals(vertices, faces)[ids]`` (``ids`` [N] long), computed for the distinct
    faces in ``ids`` only: a fine mesh shows few of its faces at a low resolution. Each face's
    normal is computed by the same ops, and its gradient reaches the vertices in the same face
    order, so the values and gradients are the same as from every face's normal."""
    shown = torch.zeros(len(faces), dtype=torch.bool, device=faces.device)
    shown[ids] = True
    shown_faces = torch.nonzero(shown).squeeze(-1)
    row = torch.empty(len(faces), dtype=torch.long, device=faces.device)  # read only where shown
    row[shown_faces] = torch.arange(len(shown_faces), device=faces.device)
    return face_normals(vertices, faces[shown_faces])[row[ids]]


def render_mesh(
    vertices: Tensor,
    faces: Tensor,
    cameras: Cameras,
    background: Tensor,
    attributes: Tensor,
    shade: ShadeFn,
    near: float = 0.1,
    far: float = 100.0,
    antialias: bool = True,
    topology: Tensor | None = None,
    tier: str | None = None,
) -> RenderOutput:
    """Render B images of a mesh.

    Args:
        vertices: [V, 3] world positions (differentiable).
        faces: [F, 3] vertex indices.
        cameras: B cameras; the images are cameras.height x cameras.width.
        background: [C] colour behind the mesh, in the shade function's space.
        attributes: [V, A] per-vertex attributes interpolated for the shade function
            (world positions for a colour field, UVs for a texture).
        shade: (interpolated attributes of the covered pixels [N, A], ``SurfacePixels``) -> colours [N, C].
        near, far: clip planes.
        antialias: analytic silhouette antialiasing (the gradient path to the silhouette).
        topology: ``mesh_raster.edge_topology(faces)`` if precomputed (fixed meshes).
        tier: kernel tier (None = fastest live).

    Returns:
        rgb [B, H, W, C] (C from ``shade``), alpha [B, H, W, 1], world-space face normals per pixel.
    """
    B, H, W = len(cameras), cameras.height, cameras.width
    channels = background.numel()
    bg = background.to(vertices).view(1, 1, 1, channels).expand(B, H, W, channels)
    if len(faces) == 0:  # nothing to draw (and no gradient to give)
        empty = vertices.sum() * 0.0
        return RenderOutput(rgb=bg + empty, alpha=torch.zeros(B, H, W, 1, device=bg.device) + empty)
    clip = clip_positions(vertices, cameras, near, far)
    raster = mesh_raster.rasterize(clip, faces, (H, W), tier=tier)
    covered = raster.triangle_id >= 0
    interpolated = mesh_raster.interpolate(attributes, raster, faces, tier=tier)
    colour = torch.zeros(B, H, W, channels, dtype=vertices.dtype, device=vertices.device)
    pixel_normals = torch.zeros(B, H, W, 3, dtype=vertices.dtype, device=vertices.device)
    if bool(covered.any()):
        normals = shown_face_normals(vertices, faces, raster.triangle_id[covered].long())
        pixels = SurfacePixels(normals=normals, cameras=cameras, covered=covered)
        colour = colour.index_put((covered,), shade(interpolated[covered], pixels).to(colour.dtype))
        pixel_normals = pixel_normals.index_put((covered,), normals)
    mask = raster.coverage()
    image = torch.cat([colour * mask + bg * (1.0 - mask), mask], dim=-1)
    if antialias:
        image = mesh_raster.antialias(image, raster, clip, faces, topology=topology, tier=tier)
    return RenderOutput(rgb=image[..., :channels], alpha=image[..., channels:], normal=pixel_normals)
