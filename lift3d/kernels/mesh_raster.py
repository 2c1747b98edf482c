"""Differentiable triangle rasterization (nvdiffrast-like): rasterize, interpolate, antialias, texture.

The one semantics every tier implements (DESIGN §3; the reference tier below is the definition).

**Screen.** Pixel ``(x, y)`` of an ``H x W`` image has its centre at ``(x + 0.5, y + 0.5)``, i.e.
at normalised device coordinates ``q = ((2x + 1) / W - 1, (2y + 1) / H - 1)``. Row ``y = 0`` is the
*bottom* of the image (``ndc_y = -1``): OpenGL's convention, as in nvdiffrast. Flip the rows
(``image.flip(1)``) to show an image top-down.

**Coverage (homogeneous rasterization, no clipping step).** For triangle ``f`` with clip-space
vertices ``c_k = (x_k, y_k, z_k, w_k)`` let ``e_k = (x_k, y_k, w_k)``, ``n_i = e_{i+1} x e_{i+2}``
(indices mod 3), ``det = e_0 . n_0`` and, for the pixel's ``q = (q_x, q_y, 1)``, the edge values
``D_i = q_x n_i.x + (q_y n_i.y + n_i.w)``. The pixel is covered iff ``det != 0`` and every ``D_i``
has the sign of ``det`` or is zero (edges are inclusive, so shared edges leave no cracks), and the
depth ``z/w = (D_0 z_0 + D_1 z_1 + D_2 z_2) / det`` lies in ``[-1, 1]``. This is exactly "the ray
through the pixel centre hits the triangle at a point with ``w > 0`` and ``-w <= z <= w``", so
triangles crossing the near plane or with vertices behind the camera need no clipping. There is
no backface culling: both windings are drawn. Triangles with a non-finite coordinate, or wholly
outside the ``x``/``y`` planes of the frustum, or with all ``w <= 0``, are never drawn. When all
three ``w > 0``, only pixel centres within ``BOX_SLACK`` (1e-3) pixel of the projected bounding box
are tested: this changes nothing but where rounding puts a centre on an edge, and every tier uses
the same box, operation for operation (:func:`_pixel_boxes`).

**Visibility.** The nearest covering triangle wins: the smallest ``z/w``; ties go to the smallest
triangle index (deterministic). Coverage and depth decisions are taken in float64 whatever the
input dtype (products of two float32 are exact in float64, so the edge values of a shared edge
are exact negatives of each other and the tiers agree on every decision).

**Outputs** (:class:`RasterOutput`): ``triangle_id`` (-1 for empty pixels), perspective-correct
barycentrics ``(u, v) = (D_0, D_1) / (D_0 + D_1 + D_2)`` of vertices 0 and 1 of the triangle
(vertex 2 has ``1 - u - v``; nvdiffrast's ``rast[..., :2]``) and ``depth = z/w`` (nvdiffrast's
``rast[..., 2]``); both are 0 on empty pixels and differentiable w.r.t. the clip positions.

**interpolate** returns ``u a_0 + v a_1 + (1 - u - v) a_2`` of the winning triangle's vertex
attributes (0 on empty pixels); its gradient reaches the attributes and, through ``(u, v)``, the
clip positions.

**antialias** (nvdiffrast-style analytic antialiasing; simplified, same formula in every tier):
for every horizontally (``(x, y)``-``(x+1, y)``) and vertically (``(x, y)``-``(x, y+1)``) adjacent
pixel pair with different triangle ids, the *front* pixel ``f`` is the covered one if the other is
empty, else the one with the smaller depth (ties: smaller triangle id); ``b`` is the other pixel
and ``T`` the triangle at ``f``. Walking from ``f``'s centre to ``b``'s, the segment leaves ``T``
through the edge ``i`` whose line it crosses first: among the edges with ``D_i(b)`` of the sign
opposite to ``det``, the smallest ``t_i = D_i(f) / (D_i(f) - D_i(b))`` (ties: smallest ``i``; if
there is none, the pair is skipped). The pair is blended only if that edge is a *silhouette*: no
other triangle shares it (``topology``: exactly one neighbour per edge, else it counts as
open), or the neighbour's third vertex ``e_d`` lies on the same side of the edge as ``T``'s
(``e_d . n_i`` has the sign of ``det`` or is 0: the surface folds over there). With ``t`` the
crossing, the part of a pixel box on the wrong side of the edge takes the other pixel's colour::

    t < 0.5:   out[f] += (0.5 - t) * (color[b] - color[f])   # the edge is inside f's pixel
    t >= 0.5:  out[b] += (t - 0.5) * (color[f] - color[b])   # T reaches into b's pixel

All deltas use the input colours and add up (a pixel can take up to four, so a one-pixel sliver
can overshoot, as in nvdiffrast). The gradient w.r.t. the vertex positions flows through ``t``
(edge endpoints ``x, y, w``); which pixel pair blends and in which direction are discrete
decisions without gradient. Only the triangle visible at ``f`` is examined: where the true
silhouette belongs to a neighbour too thin to cover any pixel centre (finely tessellated meshes
seen edge-on), the exit edge is shared and that pair is not blended.

**texture**: bilinear sampling, ``uv`` in ``[0, 1]`` with texel centres at ``(i + 0.5) / size``
(``u`` along the width, ``v`` along the rows, ``v = 0`` at row 0), ``wrap`` or ``clamp``
boundary; differentiable w.r.t. texture and uv (``floor`` has no gradient). Tiers: ``reference``
(vectorised torch gathers) and ``cpu`` (``cuda/mesh_texture_cpu.cpp``: same float32 operations in
the same order; the texture gradient is scattered per fixed pixel chunk and summed in chunk order,
so it does not depend on the thread count).

Tiers: ``reference`` (pure torch, autograd; the definition), ``cpu`` (C++/OpenMP in
``cuda/mesh_raster_cpu.cpp``: tiled rasterizer, hand-written backwards, bit-for-bit deterministic
for any thread count; its tile loop takes 4 pixels per step with AVX2 where the CPU has it, and
``LIFT3D_KERNELS_NO_AVX2=1`` forces the 2-pixel baseline, which gives the same bits). There is no cuda tier yet: cuda tensors use the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lift3d.geometry.meshes import edge_adjacency
from lift3d.kernels._backend import native_op, select_tier

logger = logging.getLogger(__name__)

RASTERIZE_OP = "mesh_raster_rasterize_forward"
INTERPOLATE_OP = "mesh_raster_interpolate_forward"
ANTIALIAS_OP = "mesh_raster_antialias_forward"
TEXTURE_OP = "mesh_raster_texture_forward"

BOUNDARY_MODES = ("wrap", "clamp")

BOX_SLACK = 1e-3
"""Pixels: how far beyond the projected bounding box of a triangle pixel centres are still tested."""

REFERENCE_CHUNK_PAIRS = 1 << 19
"""The reference tests at most this many (triangle, pixel) pairs at once (bounds its memory)."""


@dataclass
class RasterOutput:
    """Per-pixel result of :func:`rasterize` for B images of H x W (row 0 at the bottom)."""

    triangle_id: Tensor
    """[B, H, W] int32 index of the visible triangle; -1 where no triangle covers the pixel."""
    barycentrics: Tensor
    """[B, H, W, 2] perspective-correct (u, v) of the triangle's vertices 0 and 1 (vertex 2 has
    1 - u - v); 0 on empty pixels. Differentiable w.r.t. the clip positions."""
    depth: Tensor
    """[B, H, W] z/w of the visible surface in [-1, 1]; 0 on empty pixels. Differentiable."""

    @property
    def resolution(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.triangle_id.shape[1]), int(self.triangle_id.shape[2])

    @property
    def batch(self) -> int:
        return int(self.triangle_id.shape[0])

    def coverage(self) -> Tensor:
        """[B, H, W, 1] 1 where a triangle is visible, 0 elsewhere (in the barycentrics' dtype)."""
        return (self.triangle_id >= 0).unsqueeze(-1).to(self.barycentrics.dtype)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def rasterize(
    clip_positions: Tensor, faces: Tensor, resolution: tuple[int, int], tier: str | None = None
) -> RasterOutput:
    """Rasterize triangles given in homogeneous clip space (see the module docstring).

    Args:
        clip_positions: [V, 4] or [B, V, 4] clip-space (x, y, z, w) vertex positions; [V, 4] renders
            one image.
        faces: [F, 3] int32/int64 vertex indices (no winding is culled).
        resolution: (H, W) of the output.
        tier: ``reference`` or ``cpu``; None picks the fastest live tier.

    Returns:
        The raster (ids, barycentrics, depth); barycentrics and depth carry gradients to
        ``clip_positions``.
    """
    positions = _check_positions(clip_positions, "clip_positions")
    faces = _check_faces(faces, positions)
    height, width = _check_resolution(resolution)
    chosen = select_tier(RASTERIZE_OP, positions.device, tier)
    if chosen == "reference":
        return _rasterize_reference(positions, faces, height, width)
    if chosen == "cpu":
        _require_float32(positions, "clip_positions")
        ids, bary, depth = _RasterizeNative.apply(positions.contiguous(), _native_faces(faces), height, width)
        return RasterOutput(ids, bary, depth)
    raise NotImplementedError(f"the {chosen!r} tier of the mesh rasterizer is not wired up yet")


def interpolate(attributes: Tensor, raster: RasterOutput, faces: Tensor, tier: str | None = None) -> Tensor:
    """Interpolate per-vertex attributes with the raster's barycentrics.

    Args:
        attributes: [V, C] (shared by every image) or [B, V, C] per-vertex attributes.
        raster: The output of :func:`rasterize` for the same ``faces``.
        faces: [F, 3] vertex indices.
        tier: ``reference`` or ``cpu``; None picks the fastest live tier.

    Returns:
        [B, H, W, C] ``u a_0 + v a_1 + (1 - u - v) a_2`` (0 on empty pixels), differentiable w.r.t.
        ``attributes`` and, through ``raster.barycentrics``, the clip positions.
    """
    attributes = _check_attributes(attributes, raster, "attributes")
    faces = _check_faces(faces, attributes)
    chosen = select_tier(INTERPOLATE_OP, attributes.device, tier)
    if chosen == "reference":
        return _interpolate_reference(attributes, raster, faces)
    if chosen == "cpu":
        _require_float32(attributes, "attributes")
        _require_float32(raster.barycentrics, "raster.barycentrics")
        return _InterpolateNative.apply(
            attributes.contiguous(),
            raster.barycentrics.contiguous(),
            raster.triangle_id.to(torch.int32).contiguous(),
            _native_faces(faces),
        )
    raise NotImplementedError(f"the {chosen!r} tier of interpolate is not wired up yet")


def antialias(
    color: Tensor,
    raster: RasterOutput,
    clip_positions: Tensor,
    faces: Tensor,
    topology: Tensor | None = None,
    tier: str | None = None,
) -> Tensor:
    """Analytic antialiasing of silhouette edges (see the module docstring for the exact rule).

    Args:
        color: [B, H, W, C] shaded image (e.g. from :func:`interpolate`).
        raster: The raster ``color`` was shaded from.
        clip_positions: The [V, 4] or [B, V, 4] clip positions that were rasterized.
        faces: [F, 3] vertex indices.
        topology: [F, 3] from :func:`edge_topology` (for a fixed mesh, compute it once and pass it:
            it costs a sort of 3F edges); None computes it here.
        tier: ``reference`` or ``cpu``; None picks the fastest live tier.

    Returns:
        [B, H, W, C] antialiased colours, differentiable w.r.t. ``color`` and ``clip_positions``.
    """
    positions = _check_positions(clip_positions, "clip_positions")
    faces = _check_faces(faces, positions)
    B, H, W = raster.triangle_id.shape
    if color.dim() != 4 or tuple(color.shape[:3]) != (B, H, W) or color.shape[-1] < 1:
        raise ValueError(f"color must be [B, H, W, C] = [{B}, {H}, {W}, C] like the raster, got {tuple(color.shape)}")
    if not color.is_floating_point():
        raise TypeError(f"color must be a floating-point tensor, got {color.dtype}")
    if positions.shape[0] not in (1, B):
        raise ValueError(f"clip_positions has batch {positions.shape[0]}, the raster has {B}")
    if topology is None:
        topology = edge_topology(faces)
    elif tuple(topology.shape) != tuple(faces.shape) or topology.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"topology must be an int [F, 3] tensor from edge_topology(faces), got {tuple(topology.shape)}"
        )
    chosen = select_tier(ANTIALIAS_OP, color.device, tier)
    if chosen == "reference":
        return _antialias_reference(color, raster, positions, faces, topology.long())
    if chosen == "cpu":
        _require_float32(color, "color")
        _require_float32(positions, "clip_positions")
        return _AntialiasNative.apply(
            color.contiguous(),
            positions.contiguous(),
            raster.triangle_id.to(torch.int32).contiguous(),
            raster.depth.detach().float().contiguous(),
            _native_faces(faces),
            topology.contiguous(),  # int32 or int64: the kernel reads either (no per-call conversion)
        )
    raise NotImplementedError(f"the {chosen!r} tier of antialias is not wired up yet")


def edge_topology(faces: Tensor) -> Tensor:
    """[F, 3] int64: for edge ``i`` of face ``f`` (vertices ``i+1, i+2``), the vertex opposite it in
    the one other face sharing that edge, or -1 if no face or more than one other face shares it
    (``lift3d.geometry.meshes.edge_adjacency(faces)[0]``: a native op on the CPU)."""
    return edge_adjacency(faces)[0]


def texture(tex: Tensor, uv: Tensor, boundary_mode: str = "wrap", tier: str | None = None) -> Tensor:
    """Bilinear texture lookup, differentiable w.r.t. ``tex`` and ``uv``.

    Args:
        tex: [B, Ht, Wt, C] or [1, Ht, Wt, C] (shared) texture; row 0 is ``v`` near 0.
        uv: [B, H, W, 2] texture coordinates; texel ``(i, j)`` has its centre at
            ``((i + 0.5) / Wt, (j + 0.5) / Ht)``.
        boundary_mode: ``wrap`` (repeat: coordinates are taken modulo 1) or ``clamp`` (clamp to
            the border texels).
        tier: ``reference`` or ``cpu``; None picks the fastest live tier.

    Returns:
        [B, H, W, C] samples.
    """
    if boundary_mode not in BOUNDARY_MODES:
        raise ValueError(f"boundary_mode must be one of {BOUNDARY_MODES}, got {boundary_mode!r}")
    if tex.dim() != 4 or not tex.is_floating_point():
        raise ValueError(f"tex must be a floating [B, Ht, Wt, C] tensor, got {tuple(tex.shape)} {tex.dtype}")
    if uv.dim() != 4 or uv.shape[-1] != 2 or not uv.is_floating_point():
        raise ValueError(f"uv must be a floating [B, H, W, 2] tensor, got {tuple(uv.shape)} {uv.dtype}")
    if tex.shape[0] not in (1, uv.shape[0]):
        raise ValueError(f"tex has batch {tex.shape[0]}, uv has {uv.shape[0]}: they must match or tex must have batch 1")
    if min(tex.shape[1:]) < 1:
        raise ValueError(f"tex must be non-empty, got {tuple(tex.shape)}")
    chosen = select_tier(TEXTURE_OP, tex.device, tier)
    if chosen == "reference":
        return _texture_reference(tex, uv, boundary_mode)
    if chosen == "cpu":
        _require_float32(tex, "tex")
        _require_float32(uv, "uv")
        return _TextureNative.apply(tex.contiguous(), uv.contiguous(), boundary_mode == "wrap")
    raise NotImplementedError(f"the {chosen!r} tier of texture is not wired up yet")


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _check_positions(positions: Tensor, name: str) -> Tensor:
    """[B, V, 4] view of a [V, 4] or [B, V, 4] floating tensor."""
    if not isinstance(positions, Tensor) or not positions.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(positions, 'dtype', type(positions))}")
    if positions.dim() == 2:
        positions = positions.unsqueeze(0)
    if positions.dim() != 3 or positions.shape[-1] != 4:
        raise ValueError(
            f"{name} must be [V, 4] or [B, V, 4] homogeneous clip coordinates, got {tuple(positions.shape)}"
        )
    return positions


def _check_faces(faces: Tensor, vertices: Tensor) -> Tensor:
    """Validates [F, 3] integer faces against the vertex count of ``vertices`` ([B, V, *])."""
    if not isinstance(faces, Tensor) or faces.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"faces must be an int32 or int64 tensor, got {getattr(faces, 'dtype', type(faces))}")
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be [F, 3], got {tuple(faces.shape)}")
    if faces.device != vertices.device:
        raise ValueError(f"faces are on {faces.device} but the vertices on {vertices.device}")
    num_vertices = vertices.shape[1]
    if faces.numel() > 0 and any(not 0 <= int(v) < num_vertices for v in torch.aminmax(faces)):
        raise ValueError(f"faces index vertices outside [0, {num_vertices})")
    return faces


def _check_resolution(resolution: tuple[int, int]) -> tuple[int, int]:
    if len(resolution) != 2 or any(int(r) != r or r <= 0 for r in resolution):
        raise ValueError(f"resolution must be (H, W) with positive integers, got {resolution!r}")
    return int(resolution[0]), int(resolution[1])


def _check_attributes(attributes: Tensor, raster: RasterOutput, name: str) -> Tensor:
    if not isinstance(attributes, Tensor) or not attributes.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(attributes, 'dtype', type(attributes))}")
    if attributes.dim() == 2:
        attributes = attributes.unsqueeze(0)
    if attributes.dim() != 3 or attributes.shape[-1] < 1:
        raise ValueError(f"{name} must be [V, C] or [B, V, C], got {tuple(attributes.shape)}")
    if attributes.shape[0] not in (1, raster.batch):
        raise ValueError(f"{name} has batch {attributes.shape[0]}, the raster has {raster.batch}")
    return attributes


def _require_float32(tensor: Tensor, name: str) -> None:
    if tensor.dtype != torch.float32:
        raise TypeError(
            f"the cpu tier needs float32 {name}, got {tensor.dtype} (use tier='reference' for other dtypes)"
        )


def _native_faces(faces: Tensor) -> Tensor:
    if faces.shape[0] >= 2**31:
        raise ValueError("the cpu tier indexes faces with int32")
    return faces.to(torch.int32).contiguous()


# --------------------------------------------------------------------------------------------
# reference tier: the definition (pure torch, vectorised)
# --------------------------------------------------------------------------------------------


def _pixel_ndc(index: Tensor, size: int) -> Tensor:
    """NDC of pixel centres (2i + 1) / size - 1, in float64 (the same operations as the cpu tier)."""
    return (2 * index.double() + 1) / size - 1


def _cross(a: Tensor, b: Tensor) -> Tensor:
    """Cross product over the last dim (x, y, w), written out so every tier rounds alike."""
    ax, ay, aw = a.unbind(-1)
    bx, by, bw = b.unbind(-1)
    return torch.stack([ay * bw - aw * by, aw * bx - ax * bw, ax * by - ay * bx], dim=-1)


def _edge_value(n: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
    """D = qx n.x + (qy n.y + n.w): the edge function of n at the pixel q, bracketed so a native
    tier can hoist the row-constant part and still round identically."""
    return qx * n[..., 0] + (qy * n[..., 1] + n[..., 2])


def _triangle_setup(vertices: Tensor) -> tuple[Tensor, Tensor]:
    """[..., 3, 4] clip vertices -> ([..., 3, 3] edge normals n_i = e_{i+1} x e_{i+2}, [...] det)."""
    e = vertices[..., [0, 1, 3]]  # (x, y, w)
    n = torch.stack([_cross(e[..., 1, :], e[..., 2, :]), _cross(e[..., 2, :], e[..., 0, :]),
                     _cross(e[..., 0, :], e[..., 1, :])], dim=-2)
    e0, n0 = e[..., 0, :], n[..., 0, :]
    det = e0[..., 0] * n0[..., 0] + e0[..., 1] * n0[..., 1] + e0[..., 2] * n0[..., 2]
    return n, det


def _pixel_boxes(vertices: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Which triangles can be drawn and the inclusive pixel box tested for each.

    ``vertices`` is [N, 3, 4] float64. A triangle is dropped when a coordinate is non-finite, all
    w <= 0, or all its vertices lie beyond one x/y plane of the frustum (then no pixel centre can
    be covered). When all w > 0 the box holds the pixel centres within ``BOX_SLACK`` pixels of the
    projected vertices' bounding box (the slack absorbs rounding, so the box never drops a pixel
    the edge test covers); otherwise it is the whole image. Every tier uses these exact boxes.
    """
    x, y, w = vertices[..., 0], vertices[..., 1], vertices[..., 3]
    live = torch.isfinite(vertices).all(-1).all(-1) & (w > 0).any(-1)
    for coordinate in (x, y):
        live &= ~(coordinate > w).all(-1) & ~(coordinate < -w).all(-1)
    in_front = (w > 0).all(-1)
    inverse_w = 1 / torch.where(w > 0, w, torch.ones_like(w))
    sx = (x * inverse_w + 1) * (0.5 * width)
    sy = (y * inverse_w + 1) * (0.5 * height)

    def span(screen: Tensor, size: int) -> tuple[Tensor, Tensor]:
        low = torch.ceil(screen.min(-1).values - 0.5 - BOX_SLACK).clamp(0, size - 1)
        high = torch.floor(screen.max(-1).values - 0.5 + BOX_SLACK).clamp(0, size - 1)
        full_low, full_high = torch.zeros_like(low), torch.full_like(high, size - 1)
        return torch.where(in_front, low, full_low).long(), torch.where(in_front, high, full_high).long()

    x_low, x_high = span(sx, width)
    y_low, y_high = span(sy, height)
    return live, x_low, x_high, y_low, y_high


def _chunks(counts: Tensor, budget: int) -> Iterator[tuple[int, int]]:
    """[start, end) ranges of ``counts`` whose sums stay within ``budget`` (or hold one entry)."""
    start, total, values = 0, 0, counts.tolist()
    for index, count in enumerate(values):
        if index > start and total + count > budget:
            yield start, index
            start, total = index, 0
        total += count
    if start < len(values):
        yield start, len(values)


@torch.no_grad()
def _visible_triangles(positions: Tensor, faces: Tensor, height: int, width: int) -> Tensor:
    """[B, H, W] int64 id of the nearest covering triangle (-1 if none); float64 decisions."""
    B, F = positions.shape[0], faces.shape[0]
    device = positions.device
    best_depth = torch.full((B * height * width,), float("inf"), dtype=torch.float64, device=device)
    best_id = torch.full((B * height * width,), -1, dtype=torch.long, device=device)
    if F == 0:
        return best_id.view(B, height, width)
    vertices = positions.double()[:, faces.long()].reshape(B * F, 3, 4)
    live, x_low, x_high, y_low, y_high = _pixel_boxes(vertices, height, width)
    normals, det = _triangle_setup(vertices)
    live &= det != 0
    candidates = torch.nonzero(live).squeeze(-1)  # flat (b, f), increasing
    box_width = (x_high - x_low + 1).clamp(min=0)[candidates]
    counts = box_width * (y_high - y_low + 1).clamp(min=0)[candidates]
    for start, end in _chunks(counts, REFERENCE_CHUNK_PAIRS):
        tri = candidates[start:end]
        repeats = counts[start:end]
        owner = torch.repeat_interleave(torch.arange(end - start, device=device), repeats)
        first = torch.cumsum(repeats, 0) - repeats
        offset = torch.arange(int(repeats.sum()), device=device) - first[owner]
        flat_tri = tri[owner]
        px = x_low[flat_tri] + offset % box_width[start:end][owner]
        py = y_low[flat_tri] + offset // box_width[start:end][owner]
        qx, qy = _pixel_ndc(px, width), _pixel_ndc(py, height)
        d = _edge_value(normals[flat_tri], qx.unsqueeze(-1), qy.unsqueeze(-1))  # [P, 3]
        tri_det = det[flat_tri]
        inside = torch.where(tri_det.unsqueeze(-1) > 0, d >= 0, d <= 0).all(-1)
        z = vertices[flat_tri, :, 2]
        depth = (d[:, 0] * z[:, 0] + d[:, 1] * z[:, 1] + d[:, 2] * z[:, 2]) / tri_det
        ok = inside & (depth >= -1) & (depth <= 1)
        batch, face = flat_tri[ok] // F, flat_tri[ok] % F
        pixel = (batch * height + py[ok]) * width + px[ok]
        depth = depth[ok]
        chunk_depth = torch.full_like(best_depth, float("inf")).scatter_reduce(0, pixel, depth, "amin")
        at_min = depth == chunk_depth[pixel]
        sentinel = torch.iinfo(torch.long).max
        chunk_id = torch.full_like(best_id, sentinel).scatter_reduce(0, pixel[at_min], face[at_min], "amin")
        better = (chunk_depth < best_depth) | ((chunk_depth == best_depth) & (chunk_id < best_id))
        best_depth = torch.where(better, chunk_depth, best_depth)
        best_id = torch.where(better, chunk_id, best_id)
    return best_id.view(B, height, width)


def _rasterize_reference(positions: Tensor, faces: Tensor, height: int, width: int) -> RasterOutput:
    """Visibility without gradient, then the barycentrics and depth of the winners with autograd."""
    B = positions.shape[0]
    ids = _visible_triangles(positions, faces, height, width)
    covered = torch.nonzero(ids.reshape(-1) >= 0).squeeze(-1)
    face = ids.reshape(-1)[covered]
    batch = covered // (height * width)
    py = (covered // width) % height
    px = covered % width
    vertices = positions.double()[batch.unsqueeze(-1), faces.long()[face]]  # [K, 3, 4], with grad
    normals, det = _triangle_setup(vertices)
    qx, qy = _pixel_ndc(px, width).unsqueeze(-1), _pixel_ndc(py, height).unsqueeze(-1)
    d = _edge_value(normals, qx, qy)  # [K, 3]
    total = d[:, 0] + d[:, 1] + d[:, 2]
    z = vertices[..., 2]
    depth = (d[:, 0] * z[:, 0] + d[:, 1] * z[:, 1] + d[:, 2] * z[:, 2]) / det
    bary = torch.stack([d[:, 0] / total, d[:, 1] / total], dim=-1)
    dtype = positions.dtype
    flat_bary = torch.zeros(B * height * width, 2, dtype=dtype, device=positions.device)
    flat_depth = torch.zeros(B * height * width, dtype=dtype, device=positions.device)
    flat_bary = flat_bary.index_put((covered,), bary.to(dtype))
    flat_depth = flat_depth.index_put((covered,), depth.to(dtype))
    return RasterOutput(
        triangle_id=ids.to(torch.int32),
        barycentrics=flat_bary.view(B, height, width, 2),
        depth=flat_depth.view(B, height, width),
    )


def _interpolate_reference(attributes: Tensor, raster: RasterOutput, faces: Tensor) -> Tensor:
    B, H, W = raster.triangle_id.shape
    ids = raster.triangle_id.long()
    covered = (ids >= 0).unsqueeze(-1)
    corners = faces.long()[ids.clamp(min=0)]  # [B, H, W, 3]
    batch = torch.arange(B, device=ids.device).view(B, 1, 1, 1) if attributes.shape[0] > 1 else 0
    values = attributes[batch, corners]  # [B, H, W, 3, C]
    u = raster.barycentrics[..., 0:1].to(attributes.dtype)
    v = raster.barycentrics[..., 1:2].to(attributes.dtype)
    out = u * values[..., 0, :] + v * values[..., 1, :] + (1 - u - v) * values[..., 2, :]
    return torch.where(covered, out, torch.zeros_like(out))


def _texture_reference(tex: Tensor, uv: Tensor, boundary_mode: str) -> Tensor:
    """Bilinear lookup with torch gathers (the definition every tier follows, op for op)."""
    B, H, W, _ = uv.shape
    Bt, Ht, Wt, C = tex.shape
    x = uv[..., 0] * Wt - 0.5
    y = uv[..., 1] * Ht - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = (x - x0).unsqueeze(-1), (y - y0).unsqueeze(-1)  # floor has no gradient: d fx / d x = 1
    ix0, iy0 = x0.long(), y0.long()

    def wrap_or_clamp(index: Tensor, size: int) -> Tensor:
        return torch.remainder(index, size) if boundary_mode == "wrap" else index.clamp(0, size - 1)

    ix = [wrap_or_clamp(ix0, Wt), wrap_or_clamp(ix0 + 1, Wt)]
    iy = [wrap_or_clamp(iy0, Ht), wrap_or_clamp(iy0 + 1, Ht)]
    flat = tex.reshape(Bt, Ht * Wt, C).expand(B, Ht * Wt, C)

    def tap(row: Tensor, column: Tensor) -> Tensor:
        index = (row * Wt + column).reshape(B, H * W, 1).expand(B, H * W, C)
        return torch.gather(flat, 1, index).view(B, H, W, C)

    top = tap(iy[0], ix[0]) * (1 - fx) + tap(iy[0], ix[1]) * fx
    bottom = tap(iy[1], ix[0]) * (1 - fx) + tap(iy[1], ix[1]) * fx
    return top * (1 - fy) + bottom * fy


@dataclass
class _Crossings:
    """Pixel pairs that antialias blends: flat pixel indices, the front triangle and its exit edge."""

    batch: Tensor
    front: Tensor
    back: Tensor
    triangle: Tensor
    edge: Tensor


@torch.no_grad()
def _silhouette_crossings(raster: RasterOutput, positions: Tensor, faces: Tensor, topology: Tensor) -> _Crossings:
    """The discrete part of antialias (which pairs blend, across which edge), in float64."""
    ids = raster.triangle_id.long()
    depth = raster.depth.detach()
    B, H, W = ids.shape
    device = ids.device
    pixel = torch.arange(B * H * W, device=device).view(B, H, W)
    first_parts, second_parts = [], []
    for axis in (2, 1):  # horizontal pairs, then vertical ones
        n = ids.shape[axis] - 1
        first, second = pixel.narrow(axis, 0, n), pixel.narrow(axis, 1, n)
        differ = ids.reshape(-1)[first] != ids.reshape(-1)[second]
        first_parts.append(first[differ])
        second_parts.append(second[differ])
    first, second = torch.cat(first_parts), torch.cat(second_parts)
    id1, id2 = ids.reshape(-1)[first], ids.reshape(-1)[second]
    z1, z2 = depth.reshape(-1)[first], depth.reshape(-1)[second]
    first_front = (id2 < 0) | ((id1 >= 0) & ((z1 < z2) | ((z1 == z2) & (id1 < id2))))
    front = torch.where(first_front, first, second)
    back = torch.where(first_front, second, first)
    triangle = torch.where(first_front, id1, id2)
    batch = front // (H * W)
    position_batch = batch if positions.shape[0] > 1 else torch.zeros_like(batch)
    pos64 = positions.detach().double()
    corner_ids = faces.long()[triangle]
    vertices = pos64[position_batch.unsqueeze(-1), corner_ids]  # [K, 3, 4]
    normals, det = _triangle_setup(vertices)
    qfx, qfy = _pixel_ndc(front % W, W).unsqueeze(-1), _pixel_ndc((front // W) % H, H).unsqueeze(-1)
    qbx, qby = _pixel_ndc(back % W, W).unsqueeze(-1), _pixel_ndc((back // W) % H, H).unsqueeze(-1)
    d_front = _edge_value(normals, qfx, qfy)  # [K, 3]
    d_back = _edge_value(normals, qbx, qby)
    positive = det.unsqueeze(-1) > 0
    exits = torch.where(positive, d_back < 0, d_back > 0) & (det.unsqueeze(-1) != 0)
    crossing = torch.where(exits, d_front / (d_front - d_back), torch.full_like(d_front, float("inf")))
    edge = torch.argmin(crossing, dim=-1)  # the first minimum: ties go to the smaller edge index
    valid = exits.any(-1)
    opposite = topology[triangle, edge]
    far_vertex = pos64[position_batch, opposite.clamp(min=0)][:, [0, 1, 3]]
    edge_normal = normals[torch.arange(len(edge), device=device), edge]
    side = (
        far_vertex[:, 0] * edge_normal[:, 0] + far_vertex[:, 1] * edge_normal[:, 1] + far_vertex[:, 2] * edge_normal[:, 2]
    )
    folded = torch.where(det > 0, side >= 0, side <= 0)
    keep = valid & ((opposite < 0) | folded)
    return _Crossings(batch[keep], front[keep], back[keep], triangle[keep], edge[keep])


def _antialias_reference(
    color: Tensor, raster: RasterOutput, positions: Tensor, faces: Tensor, topology: Tensor
) -> Tensor:
    B, H, W, C = color.shape
    pairs = _silhouette_crossings(raster, positions, faces, topology)
    position_batch = pairs.batch if positions.shape[0] > 1 else torch.zeros_like(pairs.batch)
    corner_ids = faces.long()[pairs.triangle]  # [K, 3]
    start = corner_ids.gather(1, ((pairs.edge + 1) % 3).unsqueeze(-1)).squeeze(-1)
    end = corner_ids.gather(1, ((pairs.edge + 2) % 3).unsqueeze(-1)).squeeze(-1)
    pos64 = positions.double()
    normal = _cross(pos64[position_batch, start][:, [0, 1, 3]], pos64[position_batch, end][:, [0, 1, 3]])
    d_front = _edge_value(normal, _pixel_ndc(pairs.front % W, W), _pixel_ndc((pairs.front // W) % H, H))
    d_back = _edge_value(normal, _pixel_ndc(pairs.back % W, W), _pixel_ndc((pairs.back // W) % H, H))
    t = d_front / (d_front - d_back)
    to_front = t.detach() < 0.5
    weight = torch.where(to_front, 0.5 - t, t - 0.5).to(color.dtype).unsqueeze(-1)
    destination = torch.where(to_front, pairs.front, pairs.back)
    source = torch.where(to_front, pairs.back, pairs.front)
    flat = color.reshape(B * H * W, C)
    delta = weight * (flat[source] - flat[destination])
    return flat.index_add(0, destination, delta).view(B, H, W, C)


# --------------------------------------------------------------------------------------------
# cpu tier: C++/OpenMP (cuda/mesh_raster_cpu.cpp, cuda/mesh_texture_cpu.cpp), hand-written backwards
# --------------------------------------------------------------------------------------------


class _RasterizeNative(torch.autograd.Function):
    """``lift3d_cpu.mesh_raster_rasterize_{forward,backward}``: ids without gradient, barycentrics
    and depth with a gather-style (deterministic) gradient to the positions."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, positions: Tensor, faces: Tensor, height: int, width: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        forward = native_op("cpu", "mesh_raster_rasterize_forward", positions.device)
        ids, bary, depth = forward(positions, faces, height, width)
        ctx.mark_non_differentiable(ids)
        ctx.save_for_backward(positions, faces, ids)
        ctx.set_materialize_grads(False)  # an unused output (often depth) gets None, and costs nothing
        return ids, bary, depth

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_ids: Tensor | None,
        grad_bary: Tensor | None,
        grad_depth: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        if grad_bary is None and grad_depth is None:
            return None, None, None, None
        positions, faces, ids = ctx.saved_tensors
        backward = native_op("cpu", "mesh_raster_rasterize_backward", positions.device)
        grad = backward(
            positions,
            faces,
            ids,
            None if grad_bary is None else grad_bary.contiguous().float(),
            None if grad_depth is None else grad_depth.contiguous().float(),
        )
        return grad, None, None, None


class _InterpolateNative(torch.autograd.Function):
    """``lift3d_cpu.mesh_raster_interpolate_{forward,backward}``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, attributes: Tensor, bary: Tensor, ids: Tensor, faces: Tensor
    ) -> Tensor:
        forward = native_op("cpu", "mesh_raster_interpolate_forward", attributes.device)
        ctx.save_for_backward(attributes, bary, ids, faces)
        return forward(attributes, bary, ids, faces)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor
    ) -> tuple[Tensor | None, ...]:
        attributes, bary, ids, faces = ctx.saved_tensors
        need_attributes, need_bary = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        backward = native_op("cpu", "mesh_raster_interpolate_backward", attributes.device)
        grad_attributes, grad_bary = backward(
            attributes, bary, ids, faces, grad_output.contiguous().float(), need_attributes, need_bary
        )
        return (grad_attributes if need_attributes else None, grad_bary if need_bary else None, None, None)


class _AntialiasNative(torch.autograd.Function):
    """``lift3d_cpu.mesh_raster_antialias_{forward,backward}``; the forward's pair analysis (which
    pairs blend, across which edge) is saved and reused by the backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        color: Tensor,
        positions: Tensor,
        ids: Tensor,
        depth: Tensor,
        faces: Tensor,
        topology: Tensor,
    ) -> Tensor:
        forward = native_op("cpu", "mesh_raster_antialias_forward", color.device)
        output, pair_codes = forward(color, positions, ids, depth, faces, topology)
        ctx.save_for_backward(color, positions, ids, faces, pair_codes)
        return output

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor
    ) -> tuple[Tensor | None, ...]:
        color, positions, ids, faces, pair_codes = ctx.saved_tensors
        backward = native_op("cpu", "mesh_raster_antialias_backward", color.device)
        grad_color, grad_positions = backward(
            color, positions, ids, faces, pair_codes, grad_output.contiguous().float()
        )
        return grad_color, grad_positions, None, None, None, None


class _TextureNative(torch.autograd.Function):
    """``lift3d_cpu.mesh_raster_texture_{forward,backward}`` (cuda/mesh_texture_cpu.cpp)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, tex: Tensor, uv: Tensor, wrap: bool
    ) -> Tensor:
        forward = native_op("cpu", "mesh_raster_texture_forward", tex.device)
        ctx.save_for_backward(tex, uv)
        ctx.wrap = wrap
        return forward(tex, uv, wrap)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor
    ) -> tuple[Tensor | None, ...]:
        tex, uv = ctx.saved_tensors
        need_tex, need_uv = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        backward = native_op("cpu", "mesh_raster_texture_backward", tex.device)
        grad_tex, grad_uv = backward(tex, uv, grad_output.contiguous().float(), ctx.wrap, need_tex, need_uv)
        return (grad_tex if need_tex else None, grad_uv if need_uv else None, None)
