import numpy as np
import torch

from lift3d.export.ply import gaussian_ply_attributes, read_ply, read_ply_vertices, write_gaussians_ply


def test_gaussian_ply_has_the_3dgs_layout_and_round_trips(tmp_path):
    n, rest = 5, 3
    g = torch.Generator().manual_seed(0)
    means, dc = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
    sh_rest = torch.randn(n, rest, 3, generator=g)
    opacity, scales, quats = torch.randn(n, generator=g), torch.randn(n, 3, generator=g), torch.randn(n, 4, generator=g)
    path = tmp_path / "g.ply"
    write_gaussians_ply(path, means, dc, sh_rest, opacity, scales, quats)
    header = path.read_bytes().split(b"end_header")[0].decode()
    assert "format binary_little_endian 1.0" in header and f"element vertex {n}" in header
    names = [line.split()[-1] for line in header.splitlines() if line.startswith("property")]
    assert names == gaussian_ply_attributes(rest)
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    columns = read_ply(path)
    assert np.allclose(columns["x"], means[:, 0].numpy())
    assert np.allclose(columns["opacity"], opacity.numpy())
    assert np.allclose(columns["rot_3"], quats[:, 3].numpy())
    # f_rest is channel-major: f_rest_0..K-1 are the red coefficients
    assert np.allclose(columns["f_rest_1"], sh_rest[:, 1, 0].numpy())
    assert np.allclose(columns[f"f_rest_{rest}"], sh_rest[:, 0, 1].numpy())
    assert not list(tmp_path.glob(".*.tmp"))


def test_ascii_point_cloud_with_colours(tmp_path):
    path = tmp_path / "p.ply"
    path.write_text("ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\n"
                    "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
                    "0 0 0 255 0 0\n1 2 3 0 0 255\n")
    vertices = read_ply_vertices(path)
    assert vertices["xyz"].tolist() == [[0, 0, 0], [1, 2, 3]]
    assert np.allclose(vertices["rgb"], [[1, 0, 0], [0, 0, 1]])
