"""Tetrahedral grids and differentiable marching tetrahedra (the DMTet surface, arXiv 2111.04276).

Grid: a cube of ``resolution``^3 cells, each split into the 6 tetrahedra around its main
diagonal (the Kuhn / Freudenthal triangulation). Every cell uses the same split, so neighbouring
cells share their face diagonals and the tetrahedra form a conforming mesh: marching tetrahedra
on it gives a closed surface wherever the zero level set stays inside the box.

Marching tetrahedra: a vertex is *inside* where its SDF is negative. Each tetrahedron with 1 to
3 inside vertices contributes one triangle (1 or 3 inside) or a quad split in two (2 inside),
whose corners sit on the sign-changing edges at the linear zero crossing
``p = (p_a s_b - p_b s_a) / (s_b - s_a)``: differentiable in the SDF values and in the (deformed)
vertex positions, as DMTet needs. Edges shared by several tetrahedra yield one shared surface
vertex, so the mesh is indexed (watertight). Faces are oriented counter-clockwise seen from
outside (normals point from the inside vertices to the outside ones), decided per face from the
geometry of its tetrahedron rather than from a lookup table.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from lift3d.kernels._backend import forced_tier, native_op, tier_available

# The 6 tetrahedra of a unit cell around the diagonal from corner 0 to corner 7; corner bits are
# (x, y, z) = (bit 0, bit 1, bit 2). Each is a monotone path 0 -> 7 through the cube's corners.
_KUHN_PATHS = tuple(itertools.permutations((1, 2, 4)))
KUHN_TETS = tuple((0, a, a | b, 7) for a, b, _ in _KUHN_PATHS)
"""Corner indices of the 6 tetrahedra of a cell (0 and 7 are the diagonal's ends)."""
_KUHN_TETS = torch.tensor(KUHN_TETS)  # [6, 4], for the cpu tier's crossing_cells

TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
"""The 6 edges of a tetrahedron as pairs of its local vertex indices."""


def _case_table() -> tuple[Tensor, Tensor]:
    """Per inside-mask (bit i = local vertex i inside): up to 2 triangles as local edge indices.

    Returns ``(triangles [16, 2, 3] long, count [16] long)``; unused slots hold 0. Built from the
    definition: 1 or 3 inside vertices cut 3 edges (one triangle), 2 cut 4 edges forming the quad
    (a, c), (a, d), (b, d), (b, c) for inside {a, b} and outside {c, d}.
    """
    edge_of = {frozenset(pair): index for index, pair in enumerate(TET_EDGES)}
    triangles = torch.zeros(16, 2, 3, dtype=torch.long)
    count = torch.zeros(16, dtype=torch.long)
    for mask in range(16):
        inside = [v for v in range(4) if mask >> v & 1]
        outside = [v for v in range(4) if not mask >> v & 1]
        if len(inside) in (1, 3):
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            triangles[mask, 0] = torch.tensor([edge_of[frozenset((lone, o))] for o in others])
            count[mask] = 1
        elif len(inside) == 2:
            (a, b), (c, d) = inside, outside
            quad = [edge_of[frozenset(p)] for p in ((a, c), (a, d), (b, d), (b, c))]
            triangles[mask, 0] = torch.tensor([quad[0], quad[1], quad[2]])
            triangles[mask, 1] = torch.tensor([quad[0], quad[2], quad[3]])
            count[mask] = 2
    return triangles, count


_CASE_TRIANGLES, _CASE_COUNT = _case_table()


def tetrahedral_grid(resolution: int, radius: float = 1.0) -> tuple[Tensor, Tensor]:
    """Vertices [(r+1)^3, 3] in [-radius, radius]^3 and tetrahedra [6 r^3, 4] (long) of a Kuhn grid."""
    if resolution < 1:
        raise ValueError(f"tetrahedral grid resolution must be >= 1, got {resolution}")
    n = resolution + 1
    axis = torch.linspace(-radius, radius, n)
    vertices = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    cells = torch.arange(resolution)
    i, j, k = (c.reshape(-1) for c in torch.meshgrid(cells, cells, cells, indexing="ij"))
    corner_offsets = torch.tensor([(c & 1) * n * n + (c >> 1 & 1) * n + (c >> 2 & 1) for c in range(8)])
    # Vertex index of (i, j, k) is i n^2 + j n + k, with x = i, y = j, z = k.
    base = i * n * n + j * n + k
    corners = base[:, None] + corner_offsets[None, :]  # [cells, 8]
    tets = corners[:, torch.tensor(KUHN_TETS)].reshape(-1, 4)
    return vertices, tets


def crossing_cell_tets(tets: Tensor, sdf: Tensor, resolution: int) -> Tensor:
    """The tetrahedra of ``tetrahedral_grid(resolution)`` (``tets`` [6 r^3, 4]) whose cell has
    corners on both sides of the zero level set of ``sdf`` [(r+1)^3]: in the grid's order, a
    superset of the tetrahedra ``marching_tetrahedra`` keeps, so it gives the same mesh from them.

    A tetrahedron's vertices are corners of its cell, so a cell whose 8 corners share a sign has
    no crossing tetrahedron; deciding that per cell (8 shifted views of the sign grid) instead of
    gathering 4 signs per tetrahedron keeps only the few cells around the surface.
    """
    n = resolution + 1
    _check_kuhn_grid(tets, sdf, resolution)
    with torch.no_grad():
        inside = (sdf < 0).view(n, n, n)
        corners = [inside[i : i + resolution, j : j + resolution, k : k + resolution]
                   for i, j, k in itertools.product((0, 1), repeat=3)]
        any_inside, all_inside = corners[0].clone(), corners[0].clone()
        for corner in corners[1:]:
            any_inside |= corner
            all_inside &= corner
        cells = torch.nonzero((any_inside & ~all_inside).reshape(-1)).squeeze(-1)
        return tets.view(-1, 6, 4)[cells].reshape(-1, 4)


def _check_kuhn_grid(tets: Tensor, sdf: Tensor, resolution: int) -> None:
    n = resolution + 1
    if tets.shape != (6 * resolution**3, 4) or sdf.shape != (n**3,):
        raise ValueError(
            f"crossing_cell_tets needs a resolution-{resolution} Kuhn grid: tets [{6 * resolution**3}, 4] and "
            f"sdf [{n**3}], got {tuple(tets.shape)} and {tuple(sdf.shape)}"
        )


def used_vertices(tets: Tensor, num_vertices: int) -> tuple[Tensor, Tensor]:
    """The vertices ``tets`` [T, 4] use, ascending, [U] long; and ``tets`` re-indexed into them.

    The order is kept, so ``marching_tetrahedra(vertices[used], local_tets, sdf[used])`` gives
    the same mesh as ``marching_tetrahedra(vertices, tets, sdf)`` while reading only U vertices.
    """
    with torch.no_grad():
        mark = torch.zeros(num_vertices, dtype=torch.bool, device=tets.device)
        mark[tets.reshape(-1)] = True
        used = torch.nonzero(mark).squeeze(-1)
        local = torch.empty(num_vertices, dtype=torch.long, device=tets.device)  # read only where marked
        local[used] = torch.arange(len(used), device=tets.device)
        return used, local[tets]


CROSSING_OP = "kuhn_crossing_cells"
"""The cpu tier's op for :func:`crossing_cells` (cuda/tetrahedra_cpu.cpp)."""


def crossing_cells(tets: Tensor, sdf: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    """``used_vertices(crossing_cell_tets(tets, sdf, resolution), len(sdf))``: the vertices [U]
    (ascending) of the cells the zero level set of ``sdf`` crosses, and those cells' tetrahedra
    [T, 4] re-indexed into them, ready for ``marching_tetrahedra(vertices[used], local, sdf[used])``.

    On the CPU with a float32 SDF, one pass of the cpu tier's op over the sign grid
    (cuda/tetrahedra_cpu.cpp; the same tensors: integer work), which neither reads ``tets``
    [6 r^3, 4] nor writes anything of the grid's size but a bitset; ``LIFT3D_KERNELS=reference``
    forces the torch code.
    """
    if not (sdf.device.type == "cpu" and sdf.dtype == torch.float32 and forced_tier() in (None, "cpu")
            and tier_available("cpu", CROSSING_OP, quiet=True)):
        return used_vertices(crossing_cell_tets(tets, sdf, resolution), len(sdf))
    _check_kuhn_grid(tets, sdf, resolution)
    with torch.no_grad():
        return native_op("cpu", CROSSING_OP, sdf.device)(sdf.detach().contiguous(), resolution, _KUHN_TETS)


TOPOLOGY_OP = "marching_tetrahedra_topology"
"""The cpu tier's op for the no-gradient part of ``marching_tetrahedra`` (cuda/tetrahedra_cpu.cpp)."""


def marching_tetrahedra(vertices: Tensor, tets: Tensor, sdf: Tensor) -> tuple[Tensor, Tensor]:
    """The zero level set of ``sdf`` [V] on tetrahedra [T, 4] over ``vertices`` [V, 3].

    Returns ``(surface_vertices [S, 3], faces [F, 3] long)``, differentiable in ``vertices`` and
    ``sdf``; empty tensors when the level set misses every tetrahedron. On the CPU with float32
    inputs the topology and orientation come from the cpu tier's native op (the same faces, bit
    for bit: see cuda/tetrahedra_cpu.cpp); ``LIFT3D_KERNELS=reference`` forces the torch code.
    """
    if sdf.shape != vertices.shape[:1]:
        raise ValueError(f"sdf must be [V] = [{vertices.shape[0]}], got {tuple(sdf.shape)}")
    if len(tets) and _native_topology(vertices, sdf):
        with torch.no_grad():
            edges, faces, undecided = native_op("cpu", TOPOLOGY_OP, vertices.device)(
                vertices.detach().contiguous(), tets.contiguous(), sdf.detach().contiguous(), _CASE_TRIANGLES,
                _CASE_COUNT,
            )
        if len(faces) == 0:
            return vertices.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long, device=vertices.device)
        a, b = edges[:, 0], edges[:, 1]
        if len(undecided):  # degenerate faces: the torch code's own float32 decision
            with torch.no_grad():
                rows, owner = undecided[:, 0], undecided[:, 1]
                owner_inside = sdf.detach()[tets[owner]] < 0
                flip = _flips(vertices.detach(), tets[owner], owner_inside, faces[rows], a, b)
                faces[rows] = torch.where(flip[:, None], faces[rows][:, [0, 2, 1]], faces[rows])
        return _surface(vertices, sdf, a, b), faces
    return _marching_tetrahedra_torch(vertices, tets, sdf)


def _native_topology(vertices: Tensor, sdf: Tensor) -> bool:
    """Whether the cpu tier's topology op runs here (CPU float32, not forced to the reference)."""
    return (
        vertices.device.type == "cpu"
        and vertices.dtype == sdf.dtype == torch.float32
        and forced_tier() in (None, "cpu")
        and tier_available("cpu", TOPOLOGY_OP, quiet=True)
    )


def _surface(vertices: Tensor, sdf: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """[E, 3] linear zero crossings of the edges (a, b): differentiable in ``vertices`` and ``sdf``."""
    s_a, s_b = sdf[a].unsqueeze(-1), sdf[b].unsqueeze(-1)
    return (vertices[a] * s_b - vertices[b] * s_a) / (s_b - s_a)


def _flips(vertices: Tensor, owner_tets: Tensor, owner_inside: Tensor, faces: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """[F] whether each face must be flipped so that its normal points from its tetrahedron's
    inside vertices outwards (``owner_tets`` [F, 4], ``owner_inside`` [F, 4] bool), in float32."""
    corner = vertices[owner_tets]  # [F, 4, 3]
    weight_in = owner_inside.float().unsqueeze(-1)
    centre_in = (corner * weight_in).sum(1) / weight_in.sum(1)
    centre_out = (corner * (1 - weight_in)).sum(1) / (1 - weight_in).sum(1)
    # Edge midpoints, not the crossings: a crossing at a vertex with sdf exactly 0 makes a
    # degenerate face with no normal, while the midpoint triangle always has the same orientation.
    midpoints = (vertices[a] + vertices[b]) * 0.5
    p0, p1, p2 = midpoints[faces[:, 0]], midpoints[faces[:, 1]], midpoints[faces[:, 2]]
    normal = torch.cross(p1 - p0, p2 - p0, dim=-1)
    return (normal * (centre_out - centre_in)).sum(-1) < 0


def _marching_tetrahedra_torch(vertices: Tensor, tets: Tensor, sdf: Tensor) -> tuple[Tensor, Tensor]:
    """``marching_tetrahedra`` in torch (the definition; any device and dtype)."""
    device = vertices.device
    with torch.no_grad():
        inside = sdf < 0
        tet_inside = inside[tets]  # [T, 4]
        count_inside = tet_inside.sum(-1)
        crossing = (count_inside > 0) & (count_inside < 4)
        tets = tets[crossing]
        tet_inside = tet_inside[crossing]
    if len(tets) == 0:
        return vertices.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long, device=device)
    with torch.no_grad():
        first, second = (list(ends) for ends in zip(*TET_EDGES))
        # Each edge's two vertex indices in ascending order (min/max: a sort of pairs, cheaper).
        ends_a, ends_b = tets[:, first], tets[:, second]  # [T, 6] each
        flat = torch.stack([torch.minimum(ends_a, ends_b), torch.maximum(ends_a, ends_b)], dim=-1).reshape(-1, 2)
        sign_change = (tet_inside[:, first] != tet_inside[:, second]).reshape(-1)
        # One surface vertex per distinct crossing edge, shared by every tetrahedron around it.
        # Deduplicated by the scalar key a * V + b (sorted like the pairs (a, b), since b < V):
        # torch.unique(dim=0) compares rows one by one on the CPU, 0.4 s at a 96^3 grid.
        V = vertices.shape[0]
        keys, inverse = torch.unique(flat[sign_change, 0] * V + flat[sign_change, 1], return_inverse=True)
        unique_edges = torch.stack([keys // V, keys % V], dim=-1)
        edge_to_vertex = torch.full((flat.shape[0],), -1, dtype=torch.long, device=device)
        edge_to_vertex[sign_change] = inverse
        edge_to_vertex = edge_to_vertex.view(-1, 6)
        mask = tet_inside[:, 0] + 2 * tet_inside[:, 1] + 4 * tet_inside[:, 2] + 8 * tet_inside[:, 3]
        triangles = _CASE_TRIANGLES.to(device)[mask]  # [T, 2, 3] local edges
        counts = _CASE_COUNT.to(device)[mask]
        faces = torch.gather(edge_to_vertex.unsqueeze(1).expand(-1, 2, -1), 2, triangles)  # [T, 2, 3]
        keep = torch.arange(2, device=device)[None, :] < counts[:, None]
        faces = faces[keep]  # [F, 3]
        owner = torch.arange(len(tets), device=device)[:, None].expand(-1, 2)[keep]
    a, b = unique_edges[:, 0], unique_edges[:, 1]
    surface = _surface(vertices, sdf, a, b)
    with torch.no_grad():
        # Orient each face so that its normal points from the tetrahedron's inside vertices outwards.
        flip = _flips(vertices, tets[owner], tet_inside[owner], faces, a, b)
        faces = torch.where(flip[:, None], faces[:, [0, 2, 1]], faces)
    return surface, faces
