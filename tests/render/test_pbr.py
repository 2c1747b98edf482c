"""Split-sum PBR: the BRDF LUT against quadrature, furnace tests of the environment, RGBE files."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lift3d.render.pbr import (
    EnvironmentLight,
    EnvironmentLightConfig,
    brdf_lut,
    equirect_directions,
    linear_to_srgb,
    lookup_brdf,
    perturb_normal,
    procedural_sky,
    read_hdr,
    sample_equirect,
    shade,
    srgb_to_linear,
    tangent_frame,
    vertex_normals,
    write_hdr,
)


def _quadrature(n_dot_v: float, roughness: float, n: int = 400) -> tuple[float, float]:
    """(A, B) by brute-force integration of the GGX / Smith-Schlick(k = alpha/2) BRDF over the hemisphere."""
    alpha = roughness**2
    theta = (torch.arange(n, dtype=torch.float64) + 0.5) / n * math.pi / 2
    phi = (torch.arange(2 * n, dtype=torch.float64) + 0.5) / (2 * n) * 2 * math.pi
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    light = torch.stack([torch.sin(t) * torch.cos(p), torch.sin(t) * torch.sin(p), torch.cos(t)], -1)
    view = torch.tensor([math.sqrt(1 - n_dot_v**2), 0.0, n_dot_v], dtype=torch.float64)
    half = F.normalize(light + view, dim=-1)
    n_dot_h, n_dot_l, v_dot_h = half[..., 2], light[..., 2], (view * half).sum(-1)
    d = alpha**2 / (math.pi * (n_dot_h**2 * (alpha**2 - 1) + 1) ** 2)
    k = alpha / 2
    g = (n_dot_v / (n_dot_v * (1 - k) + k)) * (n_dot_l / (n_dot_l * (1 - k) + k))
    solid_angle = torch.sin(t) * (math.pi / 2 / n) * (2 * math.pi / (2 * n))
    integrand = d * g / (4 * n_dot_v) * solid_angle
    fresnel = (1 - v_dot_h) ** 5
    return float(((1 - fresnel) * integrand).sum()), float((fresnel * integrand).sum())


@pytest.mark.parametrize("n_dot_v,roughness", [(0.5, 0.5), (0.1, 1.0), (0.9, 0.3), (0.3, 0.8)])
def test_brdf_lut_matches_quadrature(n_dot_v, roughness):
    expected = torch.tensor(_quadrature(n_dot_v, roughness), dtype=torch.float64)
    got = lookup_brdf(torch.tensor([n_dot_v]), torch.tensor([roughness]))[0].double()
    assert torch.allclose(got, expected, atol=4e-3), (got, expected)


def test_brdf_lut_is_energy_bounded_and_mirror_like_when_smooth():
    lut = brdf_lut()
    assert (lut >= 0).all() and (lut.sum(-1) <= 1.0 + 1e-3).all()
    smooth_head_on = lookup_brdf(torch.tensor([0.99]), torch.tensor([0.02]))[0]
    assert smooth_head_on[0] > 0.99 and smooth_head_on[1] < 1e-3


def test_constant_environment_is_a_furnace():
    """Radiance L everywhere: irradiance and every specular mip are L; a white diffuse surface shows L."""
    light = EnvironmentLight(torch.full((32, 64, 3), 0.7), EnvironmentLightConfig(base_resolution=32, min_resolution=4))
    normals = F.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert torch.allclose(light.irradiance(normals), torch.full((64, 3), 0.7), atol=2e-3)
    for roughness in (0.0, 0.3, 0.7, 1.0):
        assert torch.allclose(light.specular(normals, torch.full((64,), roughness)), torch.full((64, 3), 0.7), atol=1e-4)
    views = normals  # head-on
    metal = shade(torch.ones(64, 3), torch.full((64,), 0.3), torch.ones(64), normals, views, light)
    expected = 0.7 * lookup_brdf(torch.ones(64), torch.full((64,), 0.3)).sum(-1, keepdim=True)
    assert torch.allclose(metal, expected.expand(64, 3), atol=1e-4)
    dielectric = shade(torch.ones(64, 3), torch.full((64,), 0.3), torch.zeros(64), normals, views, light)
    assert (dielectric > 0.7).all() and (dielectric < 0.7 * 1.05).all()


def test_sky_mips_blur_the_sun_with_roughness():
    light = EnvironmentLight(procedural_sky(32), EnvironmentLightConfig(base_resolution=32, min_resolution=4))
    sun = F.normalize(torch.tensor([[0.4, 0.3, 0.85]]), dim=-1)
    sharp = light.specular(sun, torch.tensor([0.08]))[0].mean()
    rough = light.specular(sun, torch.tensor([1.0]))[0].mean()
    assert sharp > 2 * rough and rough > 0
    assert light.mip_roughness[0] == pytest.approx(0.08) and light.mip_roughness[-1] == 1.0
    up, down = light.irradiance(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]))
    assert up.mean() > down.mean()  # the sky is brighter than the ground


def test_equirect_lookup_hits_texel_centres_and_wraps():
    image = torch.arange(8 * 16 * 3, dtype=torch.float32).view(8, 16, 3)
    directions = equirect_directions(8, 16)
    assert torch.allclose(sample_equirect(image, directions), image, atol=1e-3)
    seam = torch.tensor([[-1.0, 1e-6, 0.0], [-1.0, -1e-6, 0.0]])
    across = sample_equirect(image, seam)
    assert torch.allclose(across[0], across[1], atol=1e-2)  # continuous across the -x seam


def test_hdr_files_round_trip_flat_and_rle(tmp_path):
    image = torch.rand(6, 12, 3, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 5.0, 80.0])
    back = read_hdr(write_hdr(tmp_path / "flat.hdr", image))
    # RGBE shares one exponent per pixel: each channel is exact to 1/256 of the pixel's brightest channel.
    assert ((back - image).abs() <= image.max(-1, keepdim=True).values / 128).all()
    # One new-style RLE scanline pair per row: each channel a single run of the width.
    width, value = 16, (100, 50, 25, 130)
    row = bytes([2, 2, 0, width]) + b"".join(bytes([128 + width, v]) for v in value)
    header = f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 2 +X {width}\n".encode()
    (tmp_path / "rle.hdr").write_bytes(header + row * 2)
    decoded = read_hdr(tmp_path / "rle.hdr")
    expected = (torch.tensor(value[:3], dtype=torch.float32) + 0.5) * 2.0 ** (value[3] - 136)
    assert decoded.shape == (2, width, 3) and torch.allclose(decoded, expected.expand(2, width, 3))
    (tmp_path / "bad.hdr").write_bytes(b"P6\n")
    with pytest.raises(ValueError, match="not a Radiance"):
        read_hdr(tmp_path / "bad.hdr")
    (tmp_path / "short.hdr").write_bytes(header + row[:5])
    with pytest.raises(ValueError, match="truncated"):
        read_hdr(tmp_path / "short.hdr")


def test_srgb_round_trip():
    values = torch.linspace(0, 1, 101)
    assert torch.allclose(srgb_to_linear(linear_to_srgb(values)), values, atol=1e-5)
    assert float(linear_to_srgb(torch.tensor(0.5))) == pytest.approx(0.7354, abs=1e-3)
    assert np.isclose(float(srgb_to_linear(torch.tensor(0.5))), 0.2140, atol=1e-3)


def test_tangent_frames_are_right_handed_orthonormal_and_bumps_tilt_along_them():
    normals = F.normalize(torch.randn(200, 3, generator=torch.Generator().manual_seed(2)), dim=-1)
    normals = torch.cat([normals, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])])
    tangent, bitangent = tangent_frame(normals)
    frame = torch.stack([tangent, bitangent, normals], dim=-1)  # columns T, B, N
    assert torch.allclose(frame.transpose(1, 2) @ frame, torch.eye(3).expand(len(normals), 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(frame), torch.ones(len(normals)), atol=1e-5)
    # Away from the poles T is horizontal (the reference axis is world up): B leans towards +z.
    side = normals[:, 2].abs() < 0.9
    assert tangent[side, 2].abs().max() < 1e-6 and (bitangent[side, 2] > 0).all()
    assert torch.allclose(perturb_normal(normals, torch.zeros(len(normals), 2)), normals, atol=1e-6)
    tilted = perturb_normal(normals, torch.tensor([0.3, 0.0]).expand(len(normals), 2))
    assert torch.allclose((tilted * tangent).sum(-1), torch.full((len(normals),), 0.3 / math.sqrt(1.09)), atol=1e-5)


def test_vertex_normals_of_a_sphere_point_outward():
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=2)
    vertices = torch.as_tensor(sphere.vertices, dtype=torch.float32)
    normals = vertex_normals(vertices, torch.as_tensor(sphere.faces))
    assert torch.allclose(normals.norm(dim=-1), torch.ones(len(vertices)), atol=1e-5)
    assert ((normals * F.normalize(vertices, dim=-1)).sum(-1) > 0.999).all()  # within 2.6 degrees of radial


def test_shading_gradients_are_finite_for_normals_straight_up():
    """Reflections straight up or down hit the poles of the equirect map, where atan2/acos have no derivative."""
    light = EnvironmentLight(procedural_sky(16), EnvironmentLightConfig(base_resolution=16, min_resolution=4, samples=8))
    normal = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]], requires_grad=True)
    roughness = torch.tensor([0.3, 0.6], requires_grad=True)
    out = shade(torch.full((2, 3), 0.5), roughness, torch.tensor([0.5, 0.5]), normal, normal.detach(), light)
    out.sum().backward()
    assert torch.isfinite(normal.grad).all() and torch.isfinite(roughness.grad).all() and roughness.grad.abs().sum() > 0
