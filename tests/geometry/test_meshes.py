"""Triangle-mesh helpers: the edge adjacency (native op against its torch definition)."""

import pytest
import torch
import trimesh

from conftest import require_cpu_ops

from lift3d.geometry import meshes
from lift3d.geometry.meshes import ADJACENCY_OP, adjacent_face_pairs, edge_adjacency
from lift3d.kernels.mesh_raster import edge_topology


def _soup(faces: int, vertices: int, seed: int) -> torch.Tensor:
    """Random faces over few vertices: edges shared by 1, 2 or more faces, repeated vertices."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vertices, (faces, 3), generator=g)


def _cases() -> dict[str, torch.Tensor]:
    sphere = torch.from_numpy(trimesh.creation.icosphere(subdivisions=3).faces).long()
    fan = torch.stack([torch.zeros(60, dtype=torch.long), torch.arange(1, 61), torch.arange(2, 62)], dim=-1)
    return {
        "closed sphere": sphere,
        "shuffled sphere": sphere[torch.randperm(len(sphere), generator=torch.Generator().manual_seed(0))],
        "soup": _soup(500, 40, 1),  # many non-manifold edges
        "dense soup": _soup(200, 6, 2),  # every edge shared by many faces, degenerate faces
        "fan": torch.cat([fan, fan[:, [0, 2, 1]]]),  # 120 edges at vertex 0 (the op's std::sort branch)
        "sparse indices": torch.tensor([[0, 7, 2_000_000_000], [7, 0, 5], [2_000_000_000, 7, 5]]),
        "one face": torch.tensor([[3, 1, 2]]),
        "degenerate": torch.tensor([[0, 0, 1], [0, 1, 0], [1, 1, 1]]),
        "empty": torch.zeros(0, 3, dtype=torch.long),
    }


@pytest.mark.parametrize("name", list(_cases()))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_native_adjacency_is_the_torch_definition(name: str, dtype: torch.dtype) -> None:
    """The cpu tier's op (cuda/mesh_adjacency_cpu.cpp) against the torch code: the same opposite
    vertices and the same face pairs in the same order, for closed, open, non-manifold,
    degenerate, fan-shaped, sparsely indexed and empty meshes."""
    require_cpu_ops(ADJACENCY_OP)
    faces = _cases()[name].to(dtype)
    opposite, pairs = edge_adjacency(faces)
    expected_opposite, expected_pairs = meshes._edge_adjacency_torch(faces)
    assert opposite.dtype == pairs.dtype == torch.int64
    assert torch.equal(opposite, expected_opposite) and torch.equal(pairs, expected_pairs)
    if name == "closed sphere":  # every edge has exactly two faces
        assert (opposite >= 0).all() and len(pairs) == 3 * len(faces) // 2


def test_adjacency_definition_on_a_small_mesh() -> None:
    # Faces 0 and 1 share edge (1, 2); faces 2, 3 and 4 all share edge (3, 4).
    faces = torch.tensor([[0, 1, 2], [2, 1, 5], [3, 4, 6], [4, 3, 7], [3, 4, 8]])
    for opposite, pairs in (edge_adjacency(faces), meshes._edge_adjacency_torch(faces)):
        # Edge 0 of face 0 joins its vertices 1 and 2; the other face there has 5 opposite.
        assert opposite[0].tolist() == [5, -1, -1] and opposite[1].tolist() == [-1, -1, 0]
        assert (opposite[2:] == -1).all()  # three faces on (3, 4): no single neighbour
        assert pairs.tolist() == [[1, 0], [2, 3], [3, 4]]  # sorted by edge, then by k * F + f
    assert torch.equal(edge_topology(faces), edge_adjacency(faces)[0])
    assert torch.equal(adjacent_face_pairs(faces), edge_adjacency(faces)[1])
    with pytest.raises(ValueError, match=r"faces must be \[F, 3\]"):
        edge_adjacency(torch.zeros(4, 2, dtype=torch.long))


def test_native_adjacency_rejects_negative_indices() -> None:
    require_cpu_ops(ADJACENCY_OP)
    with pytest.raises(RuntimeError, match="negative vertex index"):
        edge_adjacency(torch.tensor([[0, -1, 2]]))


def test_forcing_the_reference_tier_runs_the_torch_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIFT3D_KERNELS", "reference")
    assert not meshes._native_adjacency()
    faces = _soup(50, 10, 3)
    assert torch.equal(edge_adjacency(faces)[1], meshes._edge_adjacency_torch(faces)[1])
