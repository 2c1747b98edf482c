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
    procedural_sky,
    read_hdr,
    sample_equirect,
    shade,
    srgb_to_linear,
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
