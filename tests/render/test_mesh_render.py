"""Mesh rendering helpers (lift3d/render/mesh.py)."""

import torch
import trimesh

from lift3d.geometry.meshes import face_normals
from lift3d.render.mesh import shown_face_normals


def test_shown_face_normals_are_every_face_normal_gathered() -> None:
    """Normals of only the faces the pixels show: the values of ``face_normals(...)[ids]`` bit for
    bit, and on one thread its vertex gradients bit for bit (several threads may group torch's
    index backward sums differently: rounding only)."""
    sphere = trimesh.creation.icosphere(subdivisions=3)
    g = torch.Generator().manual_seed(0)
    vertices = torch.from_numpy(sphere.vertices).float() + 0.01 * torch.randn(len(sphere.vertices), 3, generator=g)
    faces = torch.from_numpy(sphere.faces).long()
    faces[:7] = faces[:7, :1]  # degenerate faces: zero normals, shown or not
    ids = torch.randint(0, len(faces) // 3, (900,), generator=g)  # a third of the faces, many twice
    ids[:5] = torch.arange(5)
    weights = torch.randn(len(ids), 3, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        leaves = [vertices.clone().requires_grad_() for _ in range(2)]
        expected = face_normals(leaves[0], faces)[ids]
        shown = shown_face_normals(leaves[1], faces, ids)
        assert torch.equal(shown, expected)
        (expected * weights).sum().backward()
        (shown * weights).sum().backward()
        assert torch.equal(leaves[1].grad, leaves[0].grad)
    finally:
        torch.set_num_threads(threads)
    leaf = vertices.clone().requires_grad_()
    (shown_face_normals(leaf, faces, ids) * weights).sum().backward()
    assert torch.allclose(leaf.grad, leaves[0].grad, rtol=1e-5, atol=1e-6)
    assert shown_face_normals(vertices, faces, ids[:0]).shape == (0, 3)
