"""Kuhn tetrahedral grids and differentiable marching tetrahedra."""

import math

import pytest
import torch
import trimesh

from conftest import require_cpu_ops

from lift3d.geometry import tetrahedra
from lift3d.geometry.tetrahedra import (
    CROSSING_OP,
    TOPOLOGY_OP,
    crossing_cell_tets,
    crossing_cells,
    marching_tetrahedra,
    tetrahedral_grid,
    used_vertices,
)


def _signed_volumes(vertices, tets):
    a, b, c, d = (vertices[tets[:, i]] for i in range(4))
    return torch.einsum("ij,ij->i", b - a, torch.cross(c - a, d - a, dim=-1)) / 6.0


def test_grid_fills_the_box_with_positive_tetrahedra_that_share_faces():
    vertices, tets = tetrahedral_grid(3, radius=1.0)
    assert vertices.shape == (64, 3) and tets.shape == (6 * 27, 4)
    volumes = _signed_volumes(vertices, tets).abs()
    assert torch.allclose(volumes.sum(), torch.tensor(8.0)) and (volumes > 0).all()
    # Conforming: every interior triangle is shared by exactly two tetrahedra, boundary ones by one.
    faces = torch.cat([tets[:, [0, 1, 2]], tets[:, [0, 1, 3]], tets[:, [0, 2, 3]], tets[:, [1, 2, 3]]]).sort(-1).values
    _, counts = torch.unique(faces, dim=0, return_counts=True)
    assert set(counts.tolist()) == {1, 2}
    assert int((counts == 1).sum()) == 6 * 9 * 2  # 6 box sides, 9 cells each, 2 triangles per cell face


@pytest.mark.parametrize("radius", [0.5, 0.71])
def test_sphere_level_set_is_a_closed_outward_mesh_of_the_right_size(radius):
    vertices, tets = tetrahedral_grid(24)
    sdf = vertices.norm(dim=-1) - radius
    surface, faces = marching_tetrahedra(vertices, tets, sdf)
    mesh = trimesh.Trimesh(surface.numpy(), faces.numpy(), process=False)  # keep the topology as built
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # outward orientation
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.03)
    assert torch.allclose(surface.norm(dim=-1), torch.full((len(surface),), radius), atol=0.02)


def test_zero_crossing_is_linear_and_differentiable():
    vertices = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    tets = torch.tensor([[0, 1, 2, 3]])
    sdf = torch.tensor([-0.25, 0.75, 0.75, 0.75], requires_grad=True)  # only vertex 0 inside
    surface, faces = marching_tetrahedra(vertices, tets, sdf)
    assert faces.shape == (1, 3)
    assert torch.allclose(surface.sort(dim=0).values, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0],
                                                                     [0.25, 0.25, 0.25]]).sort(dim=0).values)
    p0, p1, p2 = surface[faces[0]]
    normal = torch.cross(p1 - p0, p2 - p0, dim=-1)
    assert (normal * torch.ones(3)).sum() > 0  # points away from the inside vertex 0
    surface.sum().backward()
    # d p / d s_0 along edge (0, j): p = (v0 s_j - v_j s_0) / (s_j - s_0); x, y, z each move with s_0.
    assert sdf.grad[0] != 0 and vertices.grad.abs().sum() > 0
    empty_surface, empty_faces = marching_tetrahedra(vertices, tets, torch.ones(4))
    assert empty_surface.shape == (0, 3) and empty_faces.shape == (0, 3)
    with pytest.raises(ValueError, match="sdf must be"):
        marching_tetrahedra(vertices, tets, torch.ones(3))


def test_surface_vertices_sit_on_the_sorted_unique_crossing_edges():
    """One surface vertex per sign-changing edge, in the lexicographic order of (a, b), a < b."""
    vertices, tets = tetrahedral_grid(5)
    sdf = vertices.norm(dim=-1) - 0.55 + 0.05 * torch.randn(len(vertices), generator=torch.Generator().manual_seed(0))
    surface, faces = marching_tetrahedra(vertices, tets, sdf)
    pairs = torch.cat([tets[:, [i, j]] for i, j in ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))]).sort(-1).values
    pairs = pairs[(sdf[pairs[:, 0]] < 0) != (sdf[pairs[:, 1]] < 0)]
    edges = torch.unique(pairs, dim=0)  # row-wise unique: sorted lexicographically
    a, b = edges[:, 0], edges[:, 1]
    expected = (vertices[a] * sdf[b, None] - vertices[b] * sdf[a, None]) / (sdf[b, None] - sdf[a, None])
    assert torch.equal(surface, expected)
    assert int(faces.max()) == len(surface) - 1


@pytest.mark.parametrize("resolution", [2, 7, 12])
def test_crossing_cells_and_used_vertices_give_the_same_mesh(resolution):
    """Marching only the tetrahedra of cells with corners of both signs, over only the vertices
    they use, is the full march: same surface (bit for bit), same faces, same gradients."""
    g = torch.Generator().manual_seed(resolution)
    grid_vertices, tets = tetrahedral_grid(resolution)
    vertices = grid_vertices + 0.3 / resolution * torch.rand(grid_vertices.shape, generator=g)
    sdf = grid_vertices.norm(dim=-1) - 0.6 + 0.1 * torch.randn(len(grid_vertices), generator=g)
    full = marching_tetrahedra(vertices, tets, sdf)
    candidates = crossing_cell_tets(tets, sdf, resolution)
    assert 0 < len(candidates) <= len(tets) and (resolution == 2 or len(candidates) < len(tets))
    used, local = used_vertices(candidates, len(vertices))
    assert torch.equal(used, used.sort().values) and torch.equal(used[local], candidates)
    leaves = [vertices[used].clone().requires_grad_(), sdf[used].clone().requires_grad_()]
    pruned = marching_tetrahedra(leaves[0], local, leaves[1])
    assert torch.equal(pruned[0], full[0]) and torch.equal(pruned[1], full[1])
    full_leaves = [vertices.clone().requires_grad_(), sdf.clone().requires_grad_()]
    surface = marching_tetrahedra(full_leaves[0], tets, full_leaves[1])[0]
    weights = torch.randn(surface.shape, generator=g)
    (surface * weights).sum().backward()
    (pruned[0] * weights).sum().backward()
    for leaf, full_leaf in zip(leaves, full_leaves):
        assert torch.equal(leaf.grad, full_leaf.grad[used])
        unused = torch.ones(len(vertices), dtype=torch.bool)
        unused[used] = False
        assert not full_leaf.grad[unused].any()  # nothing outside the crossing cells gets a gradient
    with pytest.raises(ValueError, match="Kuhn grid"):
        crossing_cell_tets(tets, sdf[:-1], resolution)


@pytest.mark.parametrize("resolution", [1, 2, 7, 12, 17])
def test_native_crossing_cells_are_the_torch_ones(resolution: int) -> None:
    """The cpu tier's crossing_cells (cuda/tetrahedra_cpu.cpp) against used_vertices(crossing_cell_tets(...)):
    the same vertices and re-indexed tetrahedra, with SDF zeros and NaNs on vertices, a level set
    reaching the box, and no crossing at all."""
    require_cpu_ops(CROSSING_OP)
    g = torch.Generator().manual_seed(resolution)
    vertices, tets = tetrahedral_grid(resolution)
    sdf = vertices.norm(dim=-1) - 0.9 + 0.2 * torch.randn(len(vertices), generator=g)
    sdf[:: 5 + resolution] = 0.0  # zero is outside
    sdf[1 :: 11] = -0.0
    sdf[2 :: 13] = float("nan")  # NaN < 0 is false: outside
    sdf[0] = -1.0  # a corner inside (resolution 1 has no other)
    cases = [sdf, torch.ones_like(sdf), -torch.ones_like(sdf), torch.zeros_like(sdf)]
    for values in cases:
        used, local = crossing_cells(tets, values, resolution)
        expected = used_vertices(crossing_cell_tets(tets, values, resolution), len(values))
        assert used.dtype == local.dtype == torch.int64
        assert torch.equal(used, expected[0]) and torch.equal(local, expected[1])
    assert len(crossing_cells(tets, sdf, resolution)[1]) > 0
    assert len(crossing_cells(tets, torch.ones_like(sdf), resolution)[1]) == 0
    with pytest.raises(ValueError, match="Kuhn grid"):
        crossing_cells(tets, sdf[:-1], resolution)


def test_crossing_cells_fall_back_to_the_torch_code(monkeypatch: pytest.MonkeyPatch) -> None:
    vertices, tets = tetrahedral_grid(4)
    sdf = vertices.norm(dim=-1) - 0.5
    expected = used_vertices(crossing_cell_tets(tets, sdf, 4), len(sdf))
    for values in (sdf.double(), sdf):  # float64: the torch code; forced reference: the torch code
        if values.dtype == torch.float32:
            monkeypatch.setenv("LIFT3D_KERNELS", "reference")
        used, local = crossing_cells(tets, values, 4)
        assert torch.equal(used, expected[0]) and torch.equal(local, expected[1])


def _deformed_grid(resolution: int, seed: int, amount: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vertices, tets = tetrahedral_grid(resolution)
    sdf = vertices.norm(dim=-1) - 0.6 + 0.1 * torch.randn(len(vertices), generator=g)
    vertices = vertices + amount / resolution * (2 * torch.rand(vertices.shape, generator=g) - 1)
    return vertices, tets, sdf


@pytest.mark.parametrize("seed", range(4))
def test_native_topology_gives_the_torch_mesh_bit_for_bit(seed: int) -> None:
    """The cpu tier's topology and orientation (cuda/tetrahedra_cpu.cpp) against the torch code:
    the same surface and faces, deformed grids up to nearly flat tetrahedra, SDF zeros on vertices,
    and the same gradients."""
    require_cpu_ops(TOPOLOGY_OP)
    vertices, tets, sdf = _deformed_grid(10 + seed, seed, [0.2, 0.9, 0.99, 1.0][seed])
    sdf[:: 7 + seed] = 0.0  # crossings on vertices: degenerate faces
    leaves = [vertices.clone().requires_grad_(), sdf.clone().requires_grad_()]
    native = marching_tetrahedra(*leaves[:1], tets, leaves[1])
    torch_leaves = [vertices.clone().requires_grad_(), sdf.clone().requires_grad_()]
    expected = tetrahedra._marching_tetrahedra_torch(torch_leaves[0], tets, torch_leaves[1])
    assert len(expected[1]) > 100
    assert torch.equal(native[0], expected[0]) and torch.equal(native[1], expected[1])
    weights = torch.randn(native[0].shape, generator=torch.Generator().manual_seed(seed))
    (native[0] * weights).sum().backward()
    (expected[0] * weights).sum().backward()
    for leaf, torch_leaf in zip(leaves, torch_leaves):
        assert torch.equal(leaf.grad, torch_leaf.grad)


def test_native_topology_leaves_flat_tetrahedra_to_the_torch_decision() -> None:
    """A tetrahedron flattened into a plane has no orientation the double evaluation can vouch for:
    the op returns its faces undecided and the torch code's float32 decision is taken."""
    require_cpu_ops(TOPOLOGY_OP)
    vertices = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.0],
                             [0.0, 0.0, 1.0]])
    tets = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]])  # the first is flat, the second is not
    sdf = torch.tensor([-0.5, 0.5, 0.5, 0.25, 0.5])
    from lift3d.kernels._backend import native_op

    _, _, undecided = native_op("cpu", TOPOLOGY_OP, vertices.device)(
        vertices, tets, sdf, tetrahedra._CASE_TRIANGLES, tetrahedra._CASE_COUNT)
    assert undecided.tolist() == [[0, 0]]  # face 0, of tetrahedron 0
    native = marching_tetrahedra(vertices, tets, sdf)
    expected = tetrahedra._marching_tetrahedra_torch(vertices, tets, sdf)
    assert torch.equal(native[0], expected[0]) and torch.equal(native[1], expected[1])


def test_forcing_the_reference_tier_runs_the_torch_code(monkeypatch: pytest.MonkeyPatch) -> None:
    vertices, tets, sdf = _deformed_grid(6, 5, 0.3)
    monkeypatch.setenv("LIFT3D_KERNELS", "reference")
    assert not tetrahedra._native_topology(vertices, sdf)
    assert not tetrahedra._native_topology(vertices.double(), sdf.double())
