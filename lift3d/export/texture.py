"""UV unwrapping (xatlas) and texture baking from a colour field, on the CPU.

UV convention: OpenGL/OBJ, origin at the **lower-left** of the image (``v`` up). Baked images
are stored top row first, so texel ``(row, col)`` covers ``u = (col + 0.5) / W`` and
``v = 1 - (row + 0.5) / H``. trimesh flips ``v`` itself when writing glTF (whose origin is the
upper-left), so these UVs go to :func:`lift3d.export.gltf.write_glb` unchanged.

Colours are display values in [0, 1] as the renderers output them; they are written as-is,
which is what glTF's sRGB ``baseColorTexture`` expects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import trimesh

log = logging.getLogger(__name__)

ColorFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]
"""``points [N,3] float32 (world) -> rgb [N,3] in [0,1]``."""


def unwrap_uv(
    mesh: trimesh.Trimesh, texture_size: int = 1024, padding: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Chart and pack ``mesh`` with xatlas.

    Args:
        mesh: the mesh to unwrap (xatlas time grows quickly with the face count: decimate
            to ~1e5 faces first).
        texture_size: the atlas resolution xatlas packs for.
        padding: texels kept free between charts.

    Returns:
        ``(vertices [V',3] float32, faces [F,3] int64, uvs [V',2] float32, vmapping [V'] int64)``:
        vertices are duplicated along UV seams; ``vmapping[i]`` is the input vertex that new
        vertex ``i`` copies; faces keep their order and winding; UVs are in [0,1], origin
        lower-left (see the module docstring).
    """
    try:
        import xatlas
    except ImportError as error:  # a clear message instead of a bare ModuleNotFoundError
        raise ImportError("UV unwrapping needs xatlas: pip install xatlas") from error
    if len(mesh.faces) > 100_000:
        log.warning("unwrap_uv: %d faces; xatlas can take minutes on this many, decimate first "
                    "(clean_mesh(..., target_faces=...))", len(mesh.faces))
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(mesh.vertices, dtype=np.float32),
                   np.ascontiguousarray(mesh.faces, dtype=np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = int(padding)
    pack.bilinear = True  # keep charts a texel apart so bilinear taps stay inside their chart
    atlas.generate(xatlas.ChartOptions(), pack)
    if atlas.atlas_count > 1:
        log.warning("xatlas packed %d atlases; they overlap in one texture", atlas.atlas_count)
    vmapping, indices, uvs = atlas[0]
    vmapping = vmapping.astype(np.int64)
    vertices = np.asarray(mesh.vertices, dtype=np.float32)[vmapping]
    log.info("unwrap_uv: %d charts, %d -> %d vertices, atlas %dx%d, utilisation %.2f",
             atlas.chart_count, len(mesh.vertices), len(vertices), atlas.width, atlas.height,
             float(np.mean(atlas.utilization)))
    return vertices, indices.astype(np.int64), uvs.astype(np.float32), vmapping


def bake_texture(
    vertices: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray,
    color_fn: ColorFn,
    size: int = 1024,
    padding: int | None = 16,
    chunk: int = 1 << 18,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Bake ``color_fn`` over the surface into a ``[size,size,3]`` uint8 texture.

    Every texel whose centre falls inside a triangle in UV space gets the colour of the
    surface point with the same barycentric coordinates. Then the charts are grown outward:
    each empty texel within ``padding`` texels of a covered one copies its nearest covered
    texel, so bilinear filtering and mipmaps at chart borders read surface colour, not
    background. Texels further away get the mean surface colour (``padding=None``: all empty
    texels copy their nearest covered texel).

    Args:
        vertices: [V,3] world positions; faces: [F,3] indices; uvs: [V,2] in [0,1] (lower-left origin).
        color_fn: ``points [N,3] -> rgb [N,3]`` in [0,1]; called under no_grad in chunks.
        size: texture width and height.
        padding: dilation distance in texels (see above).
        chunk: points per ``color_fn`` call.
        device: device of the query points.
    """
    from scipy import ndimage

    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    uvs = np.asarray(uvs, dtype=np.float64)
    if uvs.shape != (len(vertices), 2):
        raise ValueError(f"uvs must be [V,2] with V={len(vertices)}, got {uvs.shape}")
    face_ids, bary, rows, cols = rasterize_uv(faces, uvs, size)
    image = np.zeros((size, size, 3), dtype=np.float32)
    covered = np.zeros((size, size), dtype=bool)
    if len(face_ids) == 0:
        log.warning("bake_texture: no texel centre falls inside any triangle; texture is blank")
        return image.astype(np.uint8)
    corners = vertices[faces[face_ids]]  # [T,3,3]
    points = np.einsum("tk,tkc->tc", bary, corners).astype(np.float32)
    image[rows, cols] = evaluate_colors(points, color_fn, chunk=chunk, device=device)
    covered[rows, cols] = True

    # Dilation: nearest covered texel for every empty one (one Euclidean distance transform).
    distance, (near_r, near_c) = ndimage.distance_transform_edt(~covered, return_indices=True)
    filled = image[near_r, near_c]
    if padding is not None:
        far = distance > padding
        filled[far] = image[covered].mean(axis=0)
    filled[covered] = image[covered]
    log.info("bake_texture: %d of %d texels covered (%.1f%%)", int(covered.sum()), size * size,
             100.0 * covered.mean())
    return np.clip(np.round(filled * 255.0), 0, 255).astype(np.uint8)


def rasterize_uv(
    faces: np.ndarray, uvs: np.ndarray, size: int, max_candidates: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Texels of a ``size x size`` image whose centres lie inside each UV triangle.

    Vectorised over triangles: each triangle enumerates the texel centres of its UV bounding
    box (in batches of at most ``max_candidates`` centres) and keeps those with non-negative
    barycentric coordinates. A texel covered by several triangles keeps the last one.

    Returns:
        ``(face_ids [T], barycentric [T,3], rows [T], cols [T])`` for the covered texels.
    """
    # Texel space: x = u*size (columns), y = (1-v)*size (rows, top first); centres at k + 0.5.
    xy = np.stack([uvs[:, 0] * size, (1.0 - uvs[:, 1]) * size], axis=-1)
    tri = xy[faces]  # [F,3,2]
    lo = np.clip(np.floor(tri.min(axis=1) - 0.5).astype(np.int64), 0, size - 1)
    hi = np.clip(np.ceil(tri.max(axis=1) - 0.5).astype(np.int64), 0, size - 1)
    width, height = hi[:, 0] - lo[:, 0] + 1, hi[:, 1] - lo[:, 1] + 1
    count = width * height
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    valid = np.abs(area) > 1e-12  # zero-area UV triangles cover nothing
    out_f, out_b, out_r, out_c = [], [], [], []
    order = np.flatnonzero(valid)
    start = 0
    cumulative = np.cumsum(count[order])
    while start < len(order):
        # Largest batch of triangles whose candidate texels fit in the budget (at least one).
        base = cumulative[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cumulative, base + max_candidates, side="right")))
        batch = order[start:stop]
        start = stop
        n = count[batch]
        face = np.repeat(batch, n)
        local = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        col = lo[face, 0] + local % width[face]
        row = lo[face, 1] + local // width[face]
        px, py = col + 0.5, row + 0.5
        fa, fb, fc = a[face], b[face], c[face]
        # Barycentrics by signed sub-areas; the sign of the full area handles either winding.
        w0 = (fb[:, 0] - px) * (fc[:, 1] - py) - (fb[:, 1] - py) * (fc[:, 0] - px)
        w1 = (fc[:, 0] - px) * (fa[:, 1] - py) - (fc[:, 1] - py) * (fa[:, 0] - px)
        w2 = (fa[:, 0] - px) * (fb[:, 1] - py) - (fa[:, 1] - py) * (fb[:, 0] - px)
        bary = np.stack([w0, w1, w2], axis=-1) / area[face, None]
        inside = np.all(bary >= -1e-9, axis=-1)  # shared edges: a texel on one goes to both
        out_f.append(face[inside])
        out_b.append(np.clip(bary[inside], 0.0, 1.0))
        out_r.append(row[inside])
        out_c.append(col[inside])
    if not out_f:
        empty = np.zeros(0, dtype=np.int64)
        return empty, np.zeros((0, 3)), empty, empty
    return np.concatenate(out_f), np.concatenate(out_b), np.concatenate(out_r), np.concatenate(out_c)


def vertex_colors(
    mesh: trimesh.Trimesh, color_fn: ColorFn, chunk: int = 1 << 18, device: torch.device | str = "cpu"
) -> np.ndarray:
    """``color_fn`` at the mesh's vertices: float32 [V,3] in [0,1]."""
    return evaluate_colors(np.asarray(mesh.vertices, dtype=np.float32), color_fn, chunk=chunk, device=device)


@torch.no_grad()
def evaluate_colors(
    points: np.ndarray, color_fn: ColorFn, chunk: int = 1 << 18, device: torch.device | str = "cpu"
) -> np.ndarray:
    """``color_fn`` on ``points [N,3]`` in chunks: float32 [N,3] clipped to [0,1]."""
    out = np.empty((len(points), 3), dtype=np.float32)
    for start in range(0, len(points), chunk):
        part = torch.from_numpy(np.ascontiguousarray(points[start : start + chunk], dtype=np.float32)).to(device)
        rgb = color_fn(part)
        rgb = rgb.detach().float().cpu().numpy() if isinstance(rgb, torch.Tensor) else np.asarray(rgb, dtype=np.float32)
        if rgb.shape != (len(part), 3):
            raise ValueError(f"color_fn returned shape {rgb.shape} for {len(part)} points; expected [N,3]")
        out[start : start + len(part)] = rgb
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)
