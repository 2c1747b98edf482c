"""Triangle-mesh helpers shared by the mesh representations and the Sketch-Shape loss: loading a
user mesh into the scene box, face normals and adjacency, and the smoothness regularisers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


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


def adjacent_face_pairs(faces: Tensor) -> Tensor:
    """[P, 2] indices of face pairs sharing an edge (edges with exactly two faces)."""
    if len(faces) == 0:
        return faces.new_zeros(0, 2)
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(dim=-1).values
    owner = torch.arange(len(faces), device=faces.device).repeat(3)
    key = edges[:, 0] * (int(faces.max()) + 1) + edges[:, 1]
    key, order = key.sort(stable=True)
    owner = owner[order]
    same = key[1:] == key[:-1]
    return torch.stack([owner[:-1][same], owner[1:][same]], dim=-1)


def smoothness_losses(vertices: Tensor, faces: Tensor, normal_consistency: float, laplacian: float) -> dict[str, Tensor]:
    """Weighted surface regularisers (each only when its weight is positive):
    ``normal_consistency``: mean 1 - cos between the normals of faces sharing an edge;
    ``laplacian``: mean |v - mean(neighbours)|^2 (uniform weights)."""
    losses: dict[str, Tensor] = {}
    if normal_consistency > 0:
        pairs = adjacent_face_pairs(faces)
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
