"""UV unwrapping (xatlas) and texture baking from a colour field or a PBR material, on the CPU.

UV convention: OpenGL/OBJ, origin at the **lower-left** of the image (``v`` up). Baked images
are stored top row first, so texel ``(row, col)`` covers ``u = (col + 0.5) / W`` and
``v = 1 - (row + 0.5) / H``. trimesh flips ``v`` itself when writing glTF (whose origin is the
upper-left), so these UVs go to :func:`lift3d.export.gltf.write_glb` unchanged.

Colours are display values in [0, 1] as the renderers output them; they are written as-is,
which is what glTF's sRGB ``baseColorTexture`` expects. A PBR material (:class:`PBRSurface`)
bakes its linear albedo through the sRGB transfer function, roughness and metallic linearly into
glTF's G and B channels, and its shading normal into a tangent-space normal map relative to the
UV tangents written as ``TANGENT`` (:func:`bake_pbr_textures`), all in one pass (:func:`bake_values`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

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
    def rgb(points: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        values = color_fn(points)
        values = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values, dtype=np.float32))
        if values.shape != (len(points), 3):
            raise ValueError(f"color_fn returned shape {tuple(values.shape)} for {len(points)} points; expected [N,3]")
        return values

    image = bake_values(vertices, faces, uvs, rgb, size=size, padding=padding, chunk=chunk, device=device)
    return to_uint8(image)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (NaN -> 0, clipped) as uint8."""
    return np.clip(np.round(np.nan_to_num(image, nan=0.0) * 255.0), 0, 255).astype(np.uint8)


ValueFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(points [N,3], interpolated vertex attributes [N,A]) -> values [N,C]`` (torch, float)."""


@torch.no_grad()
def bake_values(
    vertices: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray,
    value_fn: ValueFn,
    size: int = 1024,
    padding: int | None = 16,
    chunk: int = 1 << 18,
    device: torch.device | str = "cpu",
    attributes: np.ndarray | None = None,
) -> np.ndarray:
    """Bake any number of channels at once: float32 ``[size,size,C]`` (no clipping).

    One UV rasterization and one call of ``value_fn`` per chunk of covered texels, which receives
    the surface points and the barycentric interpolation of per-vertex ``attributes`` [V,A]
    (e.g. normals and tangents; an [N,0] tensor without them). Dilation as in :func:`bake_texture`.
    """
    from scipy import ndimage

    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    uvs = np.asarray(uvs, dtype=np.float64)
    if uvs.shape != (len(vertices), 2):
        raise ValueError(f"uvs must be [V,2] with V={len(vertices)}, got {uvs.shape}")
    attributes = np.zeros((len(vertices), 0)) if attributes is None else np.asarray(attributes, dtype=np.float64)
    if attributes.ndim != 2 or len(attributes) != len(vertices):
        raise ValueError(f"attributes must be [V,A] with V={len(vertices)}, got {attributes.shape}")
    face_ids, bary, rows, cols = rasterize_uv(faces, uvs, size)
    if len(face_ids) == 0:
        log.warning("bake: no texel centre falls inside any triangle; texture is blank")
        probe = value_fn(torch.zeros(1, 3, device=device), torch.zeros(1, attributes.shape[1], device=device))
        return np.zeros((size, size, probe.shape[-1]), dtype=np.float32)
    points = np.einsum("tk,tkc->tc", bary, vertices[faces[face_ids]]).astype(np.float32)
    interpolated = np.einsum("tk,tka->ta", bary, attributes[faces[face_ids]]).astype(np.float32)
    parts = []
    for start in range(0, len(points), chunk):
        part = torch.from_numpy(np.ascontiguousarray(points[start : start + chunk])).to(device)
        extra = torch.from_numpy(np.ascontiguousarray(interpolated[start : start + chunk])).to(device)
        values = value_fn(part, extra)
        if values.ndim != 2 or len(values) != len(part):
            raise ValueError(f"a bake function returned shape {tuple(values.shape)} for {len(part)} points; expected [N,C]")
        parts.append(values.detach().float().cpu().numpy())
    values = np.concatenate(parts)
    image = np.zeros((size, size, values.shape[1]), dtype=np.float32)
    covered = np.zeros((size, size), dtype=bool)
    image[rows, cols] = values
    covered[rows, cols] = True

    # Dilation: nearest covered texel for every empty one (one Euclidean distance transform).
    distance, (near_r, near_c) = ndimage.distance_transform_edt(~covered, return_indices=True)
    filled = image[near_r, near_c]
    if padding is not None:
        far = distance > padding
        filled[far] = image[covered].mean(axis=0)
    filled[covered] = image[covered]
    log.info("bake: %d channels, %d of %d texels covered (%.1f%%)", values.shape[1], int(covered.sum()),
             size * size, 100.0 * covered.mean())
    return filled


@dataclass
class PBRSurface:
    """A PBR material on a surface, for baking into glTF's metallic-roughness textures.

    ``sample(points [N,3], base_normals [N,3]) -> [N,8]``: linear albedo (3), perceptual roughness,
    metallic, and the unit world-space shading normal (3) at world points whose unperturbed unit
    normal is ``base_normals`` (the interpolated :func:`lift3d.render.pbr.vertex_normals` of the
    mesh handed to the exporter, which the exporter also writes as ``NORMAL``).
    """

    sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """The material at surface points (see the class docstring)."""
    normal_map: bool = False
    """Bake and write a tangent-space normal texture (the shading normal differs from the base)."""


@dataclass
class PBRTextures:
    """Baked glTF textures (uint8, top row first) and the vertex tangents the normal map is relative to."""

    base_color: np.ndarray
    """[R,R,3] sRGB-encoded albedo (glTF ``baseColorTexture``)."""
    metallic_roughness: np.ndarray
    """[R,R,3] linear: R = occlusion (255: none), G = roughness, B = metallic."""
    normal: np.ndarray | None
    """[R,R,3] tangent-space normals (n + 1) / 2, +Y along +v, or None without ``normal_map``."""
    tangents: np.ndarray | None
    """[V,4] unit tangents and handedness (glTF ``TANGENT``), with ``normal``."""


def uv_tangents(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Per-vertex tangents [V,4] along +u, orthonormal to ``normals`` [V,3], and the handedness w
    (+1 or -1) such that ``w (N x T)`` points along +v (UV origin lower-left): glTF's ``TANGENT``.

    Face tangents from the UV gradients (Lengyel's method), summed per vertex (xatlas splits
    vertices along seams, so a vertex belongs to one chart). A vertex with no usable UV triangle
    gets :func:`lift3d.render.pbr.tangent_frame`'s tangent.
    """
    from lift3d.render.pbr import tangent_frame

    vertices = np.asarray(vertices, dtype=np.float64)
    uvs = np.asarray(uvs, dtype=np.float64)
    normals = np.asarray(normals, dtype=np.float64)
    p0, p1, p2 = (vertices[faces[:, k]] for k in range(3))
    t0, t1, t2 = (uvs[faces[:, k]] for k in range(3))
    e1, e2 = p1 - p0, p2 - p0
    d1, d2 = t1 - t0, t2 - t0
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    usable = np.abs(det) > 1e-20
    inverse = np.where(usable, 1.0 / np.where(usable, det, 1.0), 0.0)[:, None]
    # Un-normalised dP/du and dP/dv: larger faces weigh more, as in area-weighted normals.
    du = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * inverse * np.abs(det)[:, None]
    dv = (e2 * d1[:, 0:1] - e1 * d2[:, 0:1]) * inverse * np.abs(det)[:, None]
    tangent = np.zeros_like(vertices)
    bitangent = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(tangent, faces[:, k], du)
        np.add.at(bitangent, faces[:, k], dv)
    tangent -= normals * np.sum(tangent * normals, axis=-1, keepdims=True)
    length = np.linalg.norm(tangent, axis=-1, keepdims=True)
    fallback = tangent_frame(torch.from_numpy(normals))[0].numpy()
    tangent = np.where(length > 1e-12, tangent / np.maximum(length, 1e-300), fallback)
    w = np.where(np.sum(np.cross(normals, tangent) * bitangent, axis=-1) < 0.0, -1.0, 1.0)
    return np.concatenate([tangent, w[:, None]], axis=-1)


def bake_pbr_textures(
    vertices: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray,
    normals: np.ndarray,
    material: PBRSurface,
    size: int = 1024,
    padding: int | None = 16,
    device: torch.device | str = "cpu",
    chunk: int = 1 << 18,
) -> PBRTextures:
    """Bake base colour, metallic-roughness and (with ``material.normal_map``) normal textures in
    one pass over the texels.

    The normal texture is relative to the frame a glTF viewer builds from the file's ``NORMAL``
    (``normals``, unit [V,3]) and ``TANGENT`` (:func:`uv_tangents`) attributes: at each texel the
    interpolated, normalised N and T (T made orthogonal to N), B = w (N x T), and the texel stores
    ``(n.T, n.B, n.N)`` of the material's world shading normal n, encoded (c + 1) / 2. A viewer's
    ``normalize(T x + B y + N z)`` then gives back n.
    """
    from lift3d.render.pbr import linear_to_srgb

    normals = np.asarray(normals, dtype=np.float64)
    tangents = uv_tangents(vertices, faces, uvs, normals) if material.normal_map else None
    attributes = normals if tangents is None else np.concatenate([normals, tangents], axis=-1)

    def channels(points: torch.Tensor, interpolated: torch.Tensor) -> torch.Tensor:
        base = torch.nn.functional.normalize(interpolated[:, :3], dim=-1)
        sampled = material.sample(points, base).float()
        if sampled.shape != (len(points), 8):
            raise ValueError(f"PBRSurface.sample returned {tuple(sampled.shape)} for {len(points)} points; expected [N,8]")
        albedo = linear_to_srgb(sampled[:, :3])
        out = [albedo, torch.ones_like(sampled[:, 3:4]), sampled[:, 3:5].clamp(0.0, 1.0)]
        if tangents is not None:
            shading = sampled[:, 5:8]
            tangent = interpolated[:, 3:6]
            tangent = torch.nn.functional.normalize(tangent - base * (tangent * base).sum(-1, keepdim=True), dim=-1)
            sign = torch.where(interpolated[:, 6:7] < 0, -1.0, 1.0)
            bitangent = sign * torch.cross(base, tangent, dim=-1)
            local = torch.stack([(shading * axis).sum(-1) for axis in (tangent, bitangent, base)], dim=-1)
            out.append((local + 1.0) * 0.5)
        return torch.cat(out, dim=-1)

    image = bake_values(vertices, faces, uvs, channels, size=size, padding=padding, device=device,
                        attributes=attributes, chunk=chunk)
    normal = None
    if tangents is not None:
        normal = image[..., 6:9]
        # Dilated or averaged texels are not unit vectors: renormalise before encoding.
        decoded = normal * 2.0 - 1.0
        decoded /= np.maximum(np.linalg.norm(decoded, axis=-1, keepdims=True), 1e-12)
        normal = to_uint8((decoded + 1.0) * 0.5)
    return PBRTextures(base_color=to_uint8(image[..., 0:3]), metallic_roughness=to_uint8(image[..., 3:6]),
                       normal=normal, tangents=tangents)


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
