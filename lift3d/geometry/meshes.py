"""Triangle-mesh helpers shared by the mesh representations and the Sketch-Shape loss: loading a
user mesh into the scene box, face normals and adjacency, and the smoothness regularisers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.kernels._backend import forced_tier, native_op, tier_available


def load_normalized_mesh(path: str | Path, scale: float, radius: float, key: str):
    """A mesh file (anything trimesh loads) as a ``trimesh.Trimesh``, centred on its bounding box and
    scaled so its farthest vertex is at ``scale * radius`` (``scale`` 0 keeps it as is). ``key`` names
    the config field in errors."""
    import trimesh

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no mesh file {path}")
    mesh = trimesh.load(path, force="mesh", process=False)
    if len(mesh.faces) == 0:
        raise ValueError(f"{key}: {path} has no faces")
    return normalize_mesh(mesh, scale, radius)


def normalize_mesh(mesh, scale: float, radius: float):
    """``mesh`` centred on its bounding box, its farthest vertex at ``scale * radius`` (0: unchanged)."""
    if scale > 0:
        low, high = mesh.bounds
        centred = mesh.vertices - (low + high) / 2
        mesh.vertices = centred * (scale * radius / max(float(np.linalg.norm(centred, axis=1).max()), 1e-12))
    return mesh


def face_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Unit normals [F, 3] (counter-clockwise = outward)."""
    p0, p1, p2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    return F.normalize(torch.cross(p1 - p0, p2 - p0, dim=-1), dim=-1, eps=1e-12)


ADJACENCY_OP = "mesh_edge_adjacency"
"""The cpu tier's op for :func:`edge_adjacency` (cuda/mesh_adjacency_cpu.cpp)."""


def edge_adjacency(faces: Tensor) -> tuple[Tensor, Tensor]:
    """Which faces of ``faces`` [F, 3] share their edges, from one sort of the 3F edges.

    Returns ``(opposite [F, 3], pairs [P, 2])``, both int64:

    - ``opposite[f, i]``: for edge ``i`` of face ``f`` (its vertices ``i+1, i+2``), the vertex
      opposite it in the one other face sharing that edge, or -1 if no face or more than one other
      face shares it (``mesh_raster.edge_topology``, antialiasing's silhouette test);
    - ``pairs``: the face pairs sharing an edge (every two consecutive faces around it in the
      sorted order; edges with exactly two faces give one pair), for the normal-consistency loss.

    On the CPU the cpu tier's native op computes both (the same tensors exactly: integer work);
    ``LIFT3D_KERNELS=reference`` forces the torch code, the definition.
    """
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be [F, 3], got {tuple(faces.shape)}")
    if faces.device.type == "cpu" and _native_adjacency():
        return native_op("cpu", ADJACENCY_OP, faces.device)(faces)
    return _edge_adjacency_torch(faces)


def _native_adjacency() -> bool:
    """Whether the cpu tier's adjacency op runs (not forced to the reference, and built)."""
    return forced_tier() in (None, "cpu") and tier_available("cpu", ADJACENCY_OP, quiet=True)


def _edge_adjacency_torch(faces: Tensor) -> tuple[Tensor, Tensor]:
    """``edge_adjacency`` in torch (the definition; any device)."""
    faces = faces.long()
    F = faces.shape[0]
    opposite = torch.full((F * 3,), -1, dtype=torch.long, device=faces.device)
    if F == 0:
        return opposite.view(F, 3), faces.new_zeros(0, 2)
    flat_faces = faces.reshape(-1)
    vertices = int(faces.max()) + 1
    # opposite: entry f*3+i is edge i of face f (vertices i+1, i+2), and flat_faces[f*3+i] the
    # vertex opposite it.
    first = faces[:, [1, 2, 0]].reshape(-1)
    second = faces[:, [2, 0, 1]].reshape(-1)
    key = torch.minimum(first, second) * vertices + torch.maximum(first, second)
    sorted_key, order = torch.sort(key, stable=True)
    same = sorted_key[1:] == sorted_key[:-1]  # [3F - 1]: entry j and j + 1 share an edge
    pad = torch.zeros(1, dtype=torch.bool, device=faces.device)
    before = torch.cat([pad, same[:-1]])  # j - 1 and j share it too
    after = torch.cat([same[1:], pad])  # j + 1 and j + 2 share it too
    pair_start = torch.nonzero(same & ~before & ~after).squeeze(-1)  # exactly two faces on the edge
    a, b = order[pair_start], order[pair_start + 1]
    opposite[a] = flat_faces[b]
    opposite[b] = flat_faces[a]
    # pairs: entry k*F+f is edge (k, k+1) of face f; neighbours in the stable sort of the keys.
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(dim=-1).values
    owner = torch.arange(F, device=faces.device).repeat(3)
    key, order = (edges[:, 0] * vertices + edges[:, 1]).sort(stable=True)
    owner = owner[order]
    same = key[1:] == key[:-1]
    pairs = torch.stack([owner[:-1][same], owner[1:][same]], dim=-1)
    return opposite.view(F, 3), pairs


def adjacent_face_pairs(faces: Tensor) -> Tensor:
    """[P, 2] indices of face pairs sharing an edge (``edge_adjacency(faces)[1]``)."""
    if len(faces) == 0:
        return faces.new_zeros(0, 2)
    return edge_adjacency(faces)[1]


def smoothness_losses(
    vertices: Tensor, faces: Tensor, normal_consistency: float, laplacian: float, pairs: Tensor | None = None
) -> dict[str, Tensor]:
    """Weighted surface regularisers (each only when its weight is positive):
    ``normal_consistency``: mean 1 - cos between the normals of faces sharing an edge (``pairs``:
    ``adjacent_face_pairs(faces)`` if already computed);
    ``laplacian``: mean |v - mean(neighbours)|^2 (uniform weights)."""
    losses: dict[str, Tensor] = {}
    if normal_consistency > 0:
        pairs = adjacent_face_pairs(faces) if pairs is None else pairs
        normals = face_normals(vertices, faces)
        losses["normal_consistency"] = normal_consistency * (1.0 - (normals[pairs[:, 0]] * normals[pairs[:, 1]]).sum(-1)).mean()
    if laplacian > 0:
        edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        edges = torch.cat([edges, edges.flip(-1)])
        total = torch.zeros_like(vertices).index_add(0, edges[:, 0], vertices[edges[:, 1]])
        degree = torch.zeros(len(vertices), device=vertices.device).index_add(
            0, edges[:, 0], torch.ones(len(edges), device=vertices.device))
        offsets = vertices - total / degree.clamp_min(1.0).unsqueeze(-1)
        losses["laplacian"] = laplacian * offsets.square().sum(-1).mean()
    return losses
