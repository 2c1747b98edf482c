"""Mesh extraction from any field, mesh clean-up, and the Chamfer metric.

Every representation exports through the same plain functions: it hands
:func:`extract_mesh` a callable ``field_fn(points [N,3]) -> values [N]`` (a NeRF's density,
an SDF, a Gaussian splat's summed opacity ...) and a world-space box, and gets back a
``trimesh.Trimesh`` in world coordinates (z up) with outward-facing winding.

Conventions:

- ``level_kind="density"``: the object is where ``value > threshold``. With ``threshold=None``
  the level is chosen automatically by Otsu's method on ``log(1 + max(value, 0))`` over the
  (coarse) grid: it splits the grid's values into "empty" and "occupied" so that the surface
  encloses the occupied region. The log tames the heavy tail of NeRF densities (values span
  0..1e3), which would otherwise drag a linear-domain Otsu level towards the densest core.
- ``level_kind="sdf"``: the object is where ``value < threshold`` (default 0), i.e. negative inside.
- Coarse-to-fine (threestudio's ``mc-cpu`` recipe): a coarse pass over the whole box finds the
  tight box of the occupied voxels; the fine pass spends all ``resolution`` samples on that box
  (padded by two coarse voxels). Features thinner than a coarse voxel can be missed by the
  coarse pass; pass ``coarse_to_fine=False`` for such fields.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import trimesh
from skimage import filters, measure

log = logging.getLogger(__name__)

FieldFn = Callable[[torch.Tensor], torch.Tensor]
"""``points [N,3] float32 -> values [N]`` (a trailing singleton dimension is accepted)."""

LEVEL_KINDS = ("density", "sdf")


def extract_mesh(
    field_fn: FieldFn,
    bbox_min: Sequence[float] | np.ndarray | torch.Tensor,
    bbox_max: Sequence[float] | np.ndarray | torch.Tensor,
    resolution: int = 256,
    threshold: float | None = None,
    level_kind: str = "density",
    coarse_to_fine: bool = True,
    chunk: int = 1 << 18,
    coarse_resolution: int = 64,
    device: torch.device | str | None = None,
) -> trimesh.Trimesh:
    """Marching cubes on ``field_fn`` sampled over the box ``[bbox_min, bbox_max]``.

    Args:
        field_fn: ``points [N,3] -> values [N]``; called under ``torch.no_grad`` in chunks.
        bbox_min, bbox_max: world-space corners of the sampled box.
        resolution: samples along the longest side of the (fine) box; the other sides get
            the same spacing, so voxels stay (nearly) cubic.
        threshold: iso-level. ``None``: automatic for ``density`` (see the module docstring),
            0 for ``sdf``.
        level_kind: ``"density"`` (inside where value > threshold) or ``"sdf"`` (inside where
            value < threshold).
        coarse_to_fine: first locate the surface on a ``coarse_resolution`` grid, then sample
            only its (padded) tight box at ``resolution``.
        chunk: points per ``field_fn`` call.
        coarse_resolution: samples along the longest side in the coarse pass.
        device: where the query points live; default: the device of ``field_fn``'s first
            parameter when it is a module, else CPU.

    Returns:
        The isosurface in world coordinates, faces wound counter-clockwise seen from outside
        (so ``mesh.vertex_normals`` point out of the object). ``mesh.metadata["iso_level"]``
        records the level in the field's own units.

    Raises:
        ValueError: on a bad argument, or when the field never crosses the level in the box.
    """
    if level_kind not in LEVEL_KINDS:
        raise ValueError(f"level_kind must be one of {LEVEL_KINDS}, got {level_kind!r}")
    if resolution < 2:
        raise ValueError(f"resolution must be at least 2, got {resolution}")
    lo = _as_vec3(bbox_min, "bbox_min")
    hi = _as_vec3(bbox_max, "bbox_max")
    if not np.all(hi > lo):
        raise ValueError(f"bbox_max {hi.tolist()} must exceed bbox_min {lo.tolist()} on every axis")
    device = _infer_device(field_fn, device)
    level = threshold if threshold is not None else (0.0 if level_kind == "sdf" else None)

    box_lo, box_hi = lo, hi
    if coarse_to_fine and resolution > coarse_resolution >= 2:
        coarse = _sample_grid(field_fn, lo, hi, coarse_resolution, chunk, device)
        if level is None:
            level = auto_density_level(coarse)
        inside = _inside(coarse, level, level_kind)
        if inside.any():
            spacing = (hi - lo) / (np.array(coarse.shape) - 1)
            index = np.argwhere(inside)
            # Two coarse voxels of padding: the surface lies within one voxel of the occupied
            # samples, the second absorbs the interpolation of the fine pass.
            box_lo = np.maximum(lo, lo + (index.min(0) - 2) * spacing)
            box_hi = np.minimum(hi, lo + (index.max(0) + 2) * spacing)
            log.debug("coarse pass: tight box %s .. %s", box_lo.tolist(), box_hi.tolist())
        else:
            log.info("coarse pass at %d found nothing inside; sampling the whole box", coarse_resolution)

    grid = _sample_grid(field_fn, box_lo, box_hi, resolution, chunk, device)
    if level is None:
        level = auto_density_level(grid)
    occupancy = grid - level if level_kind == "density" else level - grid  # > 0 inside
    occupancy = np.nan_to_num(occupancy, nan=-1.0, posinf=1.0, neginf=-1.0)
    if not (occupancy.max() > 0.0 and occupancy.min() < 0.0):
        raise ValueError(
            f"the {level_kind} field never crosses the level {level:.6g} in the box "
            f"(values in [{np.nanmin(grid):.6g}, {np.nanmax(grid):.6g}]); no surface to extract"
        )
    spacing = (box_hi - box_lo) / (np.array(grid.shape) - 1)
    # With "inside positive", skimage's 'ascent' gives faces wound outward (checked in tests).
    vertices, faces, _, _ = measure.marching_cubes(
        occupancy, level=0.0, spacing=tuple(spacing.tolist()), gradient_direction="ascent",
        allow_degenerate=False,
    )
    vertices = vertices + box_lo  # grid index (i,j,k) is world (x,y,z): 'ij' sampling below
    mesh = trimesh.Trimesh(vertices=vertices.astype(np.float64), faces=faces.astype(np.int64), process=False)
    mesh.metadata["iso_level"] = float(level)
    mesh.metadata["level_kind"] = level_kind
    log.info(
        "extracted mesh: %d vertices, %d faces (%s level %.4g, grid %s)",
        len(mesh.vertices), len(mesh.faces), level_kind, level, "x".join(map(str, grid.shape)),
    )
    return mesh


def clean_mesh(
    mesh: trimesh.Trimesh,
    min_component_fraction: float = 0.01,
    target_faces: int | None = None,
) -> trimesh.Trimesh:
    """A cleaned copy: merged vertices, no degenerate or duplicate faces, no small floaters.

    Args:
        mesh: input mesh (left untouched).
        min_component_fraction: connected components (sharing edges) with fewer faces than
            this fraction of all faces are dropped (threestudio's 1% rule); the largest
            component is always kept. 0 keeps everything.
        target_faces: decimate to about this many faces with quadric decimation, when a
            decimator (``fast_simplification``, used by trimesh) is importable; otherwise the
            mesh is returned undecimated with a log message.
    """
    mesh = mesh.copy()
    mesh.merge_vertices()
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.update_faces(mesh.unique_faces())
    mesh.remove_unreferenced_vertices()
    if min_component_fraction > 0 and len(mesh.faces) > 0:
        labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
        counts = np.bincount(labels)
        cut = min(min_component_fraction * len(mesh.faces), counts.max())
        keep = counts[labels] >= cut
        if not keep.all():
            log.info("clean_mesh: dropping %d of %d components (%d faces)",
                     int((counts < cut).sum()), len(counts), int((~keep).sum()))
            mesh.update_faces(keep)
            mesh.remove_unreferenced_vertices()
    if target_faces is not None and len(mesh.faces) > target_faces:
        mesh = _decimate(mesh, target_faces)
    return mesh


def chamfer_distance(
    mesh_a: trimesh.Trimesh,
    mesh_b: trimesh.Trimesh,
    num_samples: int = 30_000,
    seed: int = 0,
    reference_factor: int = 4,
) -> float:
    """Symmetric mean Chamfer distance, normalised by ``mesh_b``'s bounding-box diagonal.

    ``(mean_a min_b |a-b| + mean_b min_a |a-b|) / 2 / diag(bbox(mesh_b))`` over
    ``num_samples`` area-uniform query samples of each mesh, each matched against
    ``reference_factor * num_samples`` samples of the other (``mesh_b`` is the ground truth;
    DESIGN §6 ``eval/chamfer``). The denser reference set lowers the sampling floor (roughly
    ``0.25 * sqrt(area / (reference_factor * num_samples)) / diag`` for two triangulations of
    one surface) while keeping the k-d tree queries, which slow down badly between distant
    surfaces, few. Same seed, same samples: a mesh against itself gives exactly 0.
    """
    for name, mesh in (("mesh_a", mesh_a), ("mesh_b", mesh_b)):
        if len(mesh.faces) == 0 or mesh.area <= 0:
            raise ValueError(f"{name} has no surface to sample")
    dense = num_samples * reference_factor
    # The query set is the first num_samples of the dense set: a mesh against itself gives 0.
    dense_a = _sample_surface(mesh_a, dense, seed)
    dense_b = _sample_surface(mesh_b, dense, seed)
    a_to_b = _nearest_distances(dense_a[:num_samples], dense_b).mean()
    b_to_a = _nearest_distances(dense_b[:num_samples], dense_a).mean()
    bounds = np.asarray(mesh_b.bounds, dtype=np.float64)
    diagonal = float(np.linalg.norm(bounds[1] - bounds[0]))
    if diagonal <= 0:
        raise ValueError("mesh_b has a zero-size bounding box")
    return float(0.5 * (a_to_b + b_to_a) / diagonal)


# --------------------------------------------------------------------------- helpers


def _as_vec3(value: Sequence[float] | np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=np.float64).reshape(-1)
    if array.size == 1:
        array = np.repeat(array, 3)
    if array.shape != (3,) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be 3 finite numbers (or one), got {value!r}")
    return array


def _infer_device(field_fn: FieldFn, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(field_fn, torch.nn.Module):
        parameter = next(field_fn.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")


def _grid_shape(extent: np.ndarray, resolution: int) -> tuple[int, int, int]:
    """Samples per axis: ``resolution`` on the longest side, the same spacing on the others."""
    step = float(extent.max()) / (resolution - 1)
    return tuple(max(2, int(math.ceil(e / step - 1e-6)) + 1) for e in extent.tolist())  # type: ignore[return-value]


@torch.no_grad()
def _sample_grid(
    field_fn: FieldFn, lo: np.ndarray, hi: np.ndarray, resolution: int, chunk: int, device: torch.device
) -> np.ndarray:
    """``field_fn`` on a regular grid over [lo, hi] (corners included), as float32 [nx,ny,nz]."""
    shape = _grid_shape(hi - lo, resolution)
    axes = [torch.linspace(float(a), float(b), n, dtype=torch.float32, device=device) for a, b, n in zip(lo, hi, shape)]
    grid = np.empty(shape, dtype=np.float32)
    plane = shape[1] * shape[2]
    slab = max(1, chunk // plane)  # x-slabs of about `chunk` points each
    yz = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), dim=-1).reshape(-1, 2)
    for start in range(0, shape[0], slab):
        xs = axes[0][start : start + slab]
        points = torch.cat([xs.repeat_interleave(plane)[:, None], yz.repeat(len(xs), 1)], dim=1)
        values = []
        for begin in range(0, len(points), chunk):
            part = points[begin : begin + chunk]
            out = torch.as_tensor(field_fn(part))
            if out.numel() != len(part):
                raise ValueError(f"field_fn returned {tuple(out.shape)} values for {len(part)} points")
            values.append(out.reshape(-1).float().cpu())
        grid[start : start + len(xs)] = torch.cat(values).reshape(len(xs), shape[1], shape[2]).numpy()
    return grid


def _inside(grid: np.ndarray, level: float, level_kind: str) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return grid > level if level_kind == "density" else grid < level


def auto_density_level(grid: np.ndarray) -> float:
    """Otsu's level on log(1 + max(density, 0)), mapped back to density units."""
    values = np.log1p(np.clip(grid[np.isfinite(grid)], 0.0, None))
    if values.size == 0 or values.max() <= values.min():
        raise ValueError("the density field is constant over the box; no automatic threshold exists")
    level = float(np.expm1(filters.threshold_otsu(values)))
    log.info("automatic density threshold (Otsu on log1p): %.4g", level)
    return level


def _decimate(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
    try:
        import fast_simplification  # noqa: F401  (trimesh's quadric decimation backend)
    except ImportError:
        log.info(
            "clean_mesh: no decimator importable (pip install fast-simplification); "
            "keeping %d faces instead of %d", len(mesh.faces), target_faces,
        )
        return mesh
    decimated = mesh.simplify_quadric_decimation(face_count=int(target_faces))
    log.info("clean_mesh: decimated %d -> %d faces", len(mesh.faces), len(decimated.faces))
    return decimated


def _sample_surface(mesh: trimesh.Trimesh, count: int, seed: int) -> np.ndarray:
    points, _ = trimesh.sample.sample_surface(mesh, int(count), seed=seed)
    return np.asarray(points, dtype=np.float64)


def _nearest_distances(query: np.ndarray, reference: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Distance from each query point to its nearest reference point (k-d tree, else torch.cdist)."""
    try:
        from scipy.spatial import cKDTree
    except ImportError:
        ref = torch.from_numpy(reference)
        out = [torch.cdist(torch.from_numpy(query[i : i + chunk]), ref).min(dim=1).values
               for i in range(0, len(query), chunk)]
        return torch.cat(out).numpy()
    # An unbalanced tree queries far faster between distant surfaces (seen: 4x), same answers.
    distances, _ = cKDTree(reference, balanced_tree=False, compact_nodes=False).query(query, k=1, workers=-1)
    return np.asarray(distances)
