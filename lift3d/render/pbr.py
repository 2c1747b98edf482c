"""Physically based shading with split-sum image-based lighting (the nvdiffrec / Fantasia3D /
threestudio ``pbr-material`` model, 4d-pbr-amortized.md §B.1), everything computed here:

- :func:`brdf_lut`: the split-sum GGX integral ``(A, B)`` over (n.v, roughness), so that the
  specular reflectance of a white furnace is ``F0 A + B`` (Karis 2013, importance-sampled
  with a Hammersley set; alpha = roughness^2 as glTF, Smith-Schlick k = alpha / 2 for IBL).
- :class:`EnvironmentLight`: an equirectangular HDR environment (a Radiance ``.hdr`` file read by
  :func:`read_hdr`, or :func:`procedural_sky`), its prefiltered specular mip chain (GGX lobes
  around n = v = r) and its diffuse irradiance (order-2 spherical harmonics, Ramamoorthi &
  Hanrahan 2001), normalised so that a constant environment of radiance L lights a white
  Lambertian surface to L.
- :func:`shade`: ``F0 = 0.04 (1 - m) + m albedo``, ``diffuse = irradiance(n) albedo (1 - m)``,
  ``specular = prefiltered(reflect(v, n), mip(roughness)) (F0 A + B)``.

Mip selection follows nvdiffrec's ``get_mip``: roughness in [0.08, 0.5] spans the first
``levels - 1`` mips linearly, (0.5, 1] the last step to the roughness-1 mip.

Directions are world space, z up (``lift3d.cameras``). The equirectangular map's row 0 looks
straight up (+z), its column u looks at azimuth ``2 pi (u + 0.5) / W - pi`` measured from +x
towards +y (the seam is at -x).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

MIN_ROUGHNESS = 0.08
"""Roughness of the sharpest specular mip (nvdiffrec / envlight)."""
MAX_ROUGHNESS = 0.5
"""Roughness reached by the second-to-last mip; the last mip is roughness 1."""
DIELECTRIC_F0 = 0.04
"""Normal-incidence reflectance of dielectrics (glTF: ior 1.5)."""


# ------------------------------------------------------------------------------ colour


def srgb_to_linear(srgb: Tensor) -> Tensor:
    """The sRGB transfer function inverted (IEC 61966-2-1), for values in [0, 1]."""
    return torch.where(srgb <= 0.04045, srgb / 12.92, ((srgb.clamp_min(0.0) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: Tensor) -> Tensor:
    """Linear values in [0, 1] to sRGB (glTF base colour textures are sRGB)."""
    linear = linear.clamp(0.0, 1.0)
    return torch.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear.clamp_min(1e-12) ** (1 / 2.4) - 0.055)


# ------------------------------------------------------------------------------ GGX sampling


def hammersley(count: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """The Hammersley point set: (i / n, radical inverse of i in base 2), each [count]."""
    index = torch.arange(count, dtype=torch.int64)
    bits = index.clone()
    inverse = torch.zeros(count, dtype=dtype)
    scale = 0.5
    for _ in range(max(1, int(math.ceil(math.log2(max(count, 2)))))):
        inverse += (bits & 1).to(dtype) * scale
        bits >>= 1
        scale *= 0.5
    return (index.to(dtype) + 0.5) / count, inverse


def ggx_half_vectors(u1: Tensor, u2: Tensor, roughness: Tensor) -> Tensor:
    """GGX-distributed half vectors [..., 3] in the frame where n = +z (alpha = roughness^2)."""
    alpha = roughness.square()
    cos_theta = torch.sqrt((1.0 - u2) / (1.0 + (alpha.square() - 1.0) * u2))
    sin_theta = torch.sqrt((1.0 - cos_theta.square()).clamp_min(0.0))
    phi = 2.0 * math.pi * u1
    return torch.stack([sin_theta * torch.cos(phi), sin_theta * torch.sin(phi), cos_theta], dim=-1)


@functools.lru_cache(maxsize=4)
def brdf_lut(size: int = 128, samples: int = 512) -> Tensor:
    """[size (n.v), size (roughness), 2] float32: split-sum scale A and bias B at texel centres."""
    n_dot_v = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    roughness = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    u1, u2 = hammersley(samples)
    h = ggx_half_vectors(u1.view(1, -1), u2.view(1, -1), roughness.unsqueeze(-1))  # [S (roughness), K, 3]
    # v = (sqrt(1 - nv^2), 0, nv) has no y: only h's x and z enter (a third of the work of 3-vectors).
    hx, hz = h[..., 0].unsqueeze(0), h[..., 2].unsqueeze(0)  # [1, S, K]
    n_dot_h = hz.clamp_min(1e-12)
    k = (roughness.square() / 2.0).view(1, -1, 1)  # Smith-Schlick for image-based lighting: k = alpha / 2
    rows = []
    for nv in n_dot_v.split(16):  # blocks of n.v rows keep the [rows, S, K] temporaries small
        nv_ = nv.view(-1, 1, 1)
        v_dot_h = torch.sqrt(1.0 - nv_.square()) * hx + nv_ * hz
        n_dot_l = (2.0 * v_dot_h * hz - nv_).clamp_min(0.0)
        g = (nv_ / (nv_ * (1 - k) + k)) * (n_dot_l / (n_dot_l * (1 - k) + k))
        visibility = torch.where(n_dot_l > 0, g * v_dot_h.clamp_min(0.0) / (n_dot_h * nv_), torch.zeros_like(g))
        fresnel = (1.0 - v_dot_h.clamp(0.0, 1.0)) ** 5
        rows.append(torch.stack([((1.0 - fresnel) * visibility).mean(-1), (fresnel * visibility).mean(-1)], dim=-1))
    return torch.cat(rows).float()


def lookup_brdf(n_dot_v: Tensor, roughness: Tensor, lut: Tensor | None = None) -> Tensor:
    """Bilinear ``(A, B)`` [..., 2] of the LUT at n.v and roughness (same shapes, values in [0, 1])."""
    lut = brdf_lut() if lut is None else lut
    table = lut.to(n_dot_v.device).permute(2, 0, 1).unsqueeze(0)  # [1, 2, nv, roughness]
    # grid_sample's x indexes the last axis (roughness), y the rows (n.v); corners at texel edges.
    grid = torch.stack([roughness * 2 - 1, n_dot_v * 2 - 1], dim=-1).reshape(1, -1, 1, 2).to(table)
    values = F.grid_sample(table, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return values.view(2, -1).T.reshape(*n_dot_v.shape, 2).to(n_dot_v.dtype)


# ------------------------------------------------------------------------------ environment maps


def direction_to_equirect(directions: Tensor) -> Tensor:
    """grid_sample coordinates [..., 2] in [-1, 1] of unit world directions [..., 3] (module docstring)."""
    x, y, z = directions.unbind(-1)
    # Straight up or down atan2 and acos have infinite or 0/0 gradients: nudge x and z off the poles
    # (the looked-up texel is the same; shading gradients through the normal stay finite).
    x = torch.where(x.square() + y.square() < 1e-12, torch.full_like(x, 1e-6), x)
    azimuth = torch.atan2(y, x)  # (-pi, pi]; -pi at the seam (-x)
    polar = torch.acos(z.clamp(-1.0 + 1e-6, 1.0 - 1e-6))  # 0 = up
    return torch.stack([azimuth / math.pi, polar / math.pi * 2.0 - 1.0], dim=-1)


def equirect_directions(height: int, width: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Unit directions [height, width, 3] of the texel centres of an equirectangular map."""
    polar = (torch.arange(height, dtype=torch.float64) + 0.5) / height * math.pi
    azimuth = (torch.arange(width, dtype=torch.float64) + 0.5) / width * 2.0 * math.pi - math.pi
    p, a = torch.meshgrid(polar, azimuth, indexing="ij")
    return torch.stack([torch.sin(p) * torch.cos(a), torch.sin(p) * torch.sin(a), torch.cos(p)], dim=-1).to(dtype)


def sample_equirect(image: Tensor, directions: Tensor) -> Tensor:
    """Bilinear radiance [..., C] of an equirectangular image [H, W, C] in directions [..., 3]."""
    grid = direction_to_equirect(directions).reshape(1, -1, 1, 2).to(image)
    # Wrap around the seam by padding one column on each side (grid_sample has no wrap mode).
    H, W, C = image.shape
    padded = torch.cat([image[:, -1:], image, image[:, :1]], dim=1).permute(2, 0, 1).unsqueeze(0)
    grid = torch.stack([grid[..., 0] * W / (W + 2), grid[..., 1]], dim=-1)
    values = F.grid_sample(padded, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return values.view(C, -1).T.reshape(*directions.shape[:-1], C)


def tangent_frame(normal: Tensor) -> tuple[Tensor, Tensor]:
    """Tangent and bitangent [..., 3] completing unit ``normal`` to a right-handed orthonormal frame
    (T, B, N): ``T = normalize(a x N)``, ``B = N x T``, with the reference axis ``a = +z`` (world up),
    or ``+x`` where the normal is within 2.6 degrees of vertical. A function of the normal alone, so
    a bump field defined in it needs no UVs (:func:`perturb_normal`)."""
    helper = torch.where(normal[..., 2:3].abs() < 0.999, torch.tensor([0.0, 0.0, 1.0]).to(normal),
                         torch.tensor([1.0, 0.0, 0.0]).to(normal))
    tangent = F.normalize(torch.cross(helper.expand_as(normal), normal, dim=-1), dim=-1)
    return tangent, torch.cross(normal, tangent, dim=-1)


def perturb_normal(normal: Tensor, bump: Tensor) -> Tensor:
    """Unit shading normals [..., 3]: ``normalize(T x + B y + N)`` for a tangent-space perturbation
    ``bump = (x, y)`` [..., 2] in the :func:`tangent_frame` of unit ``normal`` (Paint-it's
    ``[0, 0, 1] + (x, y, 0)``; threestudio uses ``T x - (T x N) y + N z``, the same frame
    convention with a third channel)."""
    tangent, bitangent = tangent_frame(normal)
    return F.normalize(tangent * bump[..., 0:1] + bitangent * bump[..., 1:2] + normal, dim=-1)


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Unit area-weighted vertex normals [V, 3] (the sum of the unnormalised normals of the faces
    around each vertex). Training shades with these, interpolated, and exports write the same ones."""
    p0, p1, p2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    weighted = torch.cross(p1 - p0, p2 - p0, dim=-1)  # length = 2 x area
    summed = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), weighted.repeat_interleave(3, dim=0))
    fallback = torch.tensor([0.0, 0.0, 1.0]).to(vertices)  # isolated vertices: any unit vector
    length = summed.norm(dim=-1, keepdim=True)
    return torch.where(length > 1e-20, summed / length.clamp_min(1e-20), fallback)


def _downsample(image: Tensor) -> Tensor:
    return F.avg_pool2d(image.permute(2, 0, 1).unsqueeze(0), 2).squeeze(0).permute(1, 2, 0)


def _sh_basis(directions: Tensor) -> Tensor:
    """The 9 real spherical harmonics of order <= 2 [..., 9] at unit directions."""
    x, y, z = directions.unbind(-1)
    return torch.stack([
        0.282095 * torch.ones_like(x),
        0.488603 * y, 0.488603 * z, 0.488603 * x,
        1.092548 * x * y, 1.092548 * y * z, 0.315392 * (3 * z * z - 1), 1.092548 * x * z, 0.546274 * (x * x - y * y),
    ], dim=-1)


SH_LAMBERT = (math.pi, 2 * math.pi / 3, 2 * math.pi / 3, 2 * math.pi / 3, math.pi / 4, math.pi / 4, math.pi / 4,
              math.pi / 4, math.pi / 4)
"""Clamped-cosine convolution factors A_l per coefficient (Ramamoorthi & Hanrahan)."""


@dataclass
class EnvironmentLightConfig:
    """An HDR environment for image-based lighting."""

    path: str = ""
    """Radiance ``.hdr`` (RGBE) equirectangular map; empty = :func:`procedural_sky`."""
    scale: float = 1.0
    """Radiance multiplier (Fantasia3D / threestudio use 2.0 with mud_road_puresky)."""
    base_resolution: int = 128
    """Height of the sharpest specular mip (width is twice that)."""
    min_resolution: int = 8
    """Height of the coarsest mip."""
    samples: int = 64
    """GGX samples per texel when prefiltering."""


class EnvironmentLight:
    """Prefiltered specular mips and SH irradiance of an equirectangular environment."""

    def __init__(self, radiance: Tensor, config: EnvironmentLightConfig | None = None):
        config = config or EnvironmentLightConfig()
        if radiance.dim() != 3 or radiance.shape[-1] != 3 or radiance.shape[1] != 2 * radiance.shape[0]:
            raise ValueError(f"an environment map must be [H, 2H, 3], got {tuple(radiance.shape)}")
        if not torch.isfinite(radiance).all() or (radiance < 0).any():
            raise ValueError("an environment map must hold finite, non-negative radiance")
        self.config = config
        radiance = radiance.float() * config.scale
        base = config.base_resolution
        if radiance.shape[0] != base:
            radiance = F.interpolate(radiance.permute(2, 0, 1).unsqueeze(0), size=(base, 2 * base), mode="area"
                                     if radiance.shape[0] > base else "bilinear").squeeze(0).permute(1, 2, 0)
        self.radiance = radiance
        self.irradiance_sh = self._project_sh(radiance)
        self.mips = self._prefilter(radiance)

    @classmethod
    def from_config(cls, config: EnvironmentLightConfig) -> "EnvironmentLight":
        radiance = read_hdr(config.path) if config.path else procedural_sky(config.base_resolution)
        return cls(radiance, config)

    def to(self, device: torch.device | str) -> "EnvironmentLight":
        """Move the maps (in place) to ``device``; returns self."""
        self.radiance = self.radiance.to(device)
        self.irradiance_sh = self.irradiance_sh.to(device)
        self.mips = [mip.to(device) for mip in self.mips]
        return self

    @property
    def mip_roughness(self) -> list[float]:
        """The roughness each specular mip is filtered for."""
        n = len(self.mips)
        steps = [MIN_ROUGHNESS + (MAX_ROUGHNESS - MIN_ROUGHNESS) * i / max(n - 2, 1) for i in range(n - 1)]
        return steps + [1.0]

    def _project_sh(self, radiance: Tensor) -> Tensor:
        H, W, _ = radiance.shape
        directions = equirect_directions(H, W, torch.float64)
        polar = (torch.arange(H, dtype=torch.float64) + 0.5) / H * math.pi
        solid_angle = (torch.sin(polar) * (math.pi / H) * (2 * math.pi / W)).view(H, 1, 1)
        basis = _sh_basis(directions)  # [H, W, 9]
        return (basis.unsqueeze(-1) * radiance.double().unsqueeze(-2) * solid_angle.unsqueeze(-1)).sum((0, 1)).float()

    def _prefilter(self, radiance: Tensor) -> list[Tensor]:
        cfg = self.config
        chain = [radiance]
        while chain[-1].shape[0] // 2 >= cfg.min_resolution:
            chain.append(_downsample(chain[-1]))
        roughness = [MIN_ROUGHNESS + (MAX_ROUGHNESS - MIN_ROUGHNESS) * i / max(len(chain) - 2, 1)
                     for i in range(len(chain) - 1)] + [1.0]
        u1, u2 = hammersley(cfg.samples, torch.float32)
        mips = []
        for level, (source, rough) in enumerate(zip(chain, roughness)):
            H, W, _ = source.shape
            normal = equirect_directions(H, W)  # n = v = r (the split-sum assumption)
            tangent, bitangent = tangent_frame(normal)
            h_local = ggx_half_vectors(u1, u2, torch.tensor(rough))  # [K, 3]
            h = (tangent.unsqueeze(-2) * h_local[:, 0:1] + bitangent.unsqueeze(-2) * h_local[:, 1:2]
                 + normal.unsqueeze(-2) * h_local[:, 2:3])  # [H, W, K, 3]
            v_dot_h = (normal.unsqueeze(-2) * h).sum(-1, keepdim=True)
            light = 2.0 * v_dot_h * h - normal.unsqueeze(-2)
            n_dot_l = (normal.unsqueeze(-2) * light).sum(-1).clamp_min(0.0)  # [H, W, K]
            # Sample a blurrier level for rough lobes so K samples do not alias (one level coarser than the target).
            lookup = chain[min(level + 1, len(chain) - 1)] if rough > MIN_ROUGHNESS else source
            values = sample_equirect(lookup, F.normalize(light, dim=-1))  # [H, W, K, 3]
            weight = n_dot_l.unsqueeze(-1)
            mips.append((values * weight).sum(-2) / weight.sum(-2).clamp_min(1e-8))
        return mips

    def irradiance(self, normal: Tensor) -> Tensor:
        """Cosine-convolved radiance / pi [..., 3] at unit normals: white Lambertian outgoing radiance."""
        basis = _sh_basis(normal) * torch.tensor(SH_LAMBERT).to(normal)
        return (basis @ self.irradiance_sh.to(normal)).clamp_min(0.0) / math.pi

    def specular(self, direction: Tensor, roughness: Tensor) -> Tensor:
        """Prefiltered radiance [..., 3] along unit reflection directions, trilinear over the mips."""
        n = len(self.mips)
        r = roughness.clamp(MIN_ROUGHNESS, 1.0)
        level = torch.where(
            r < MAX_ROUGHNESS,
            (r - MIN_ROUGHNESS) / (MAX_ROUGHNESS - MIN_ROUGHNESS) * (n - 2),
            (r - MAX_ROUGHNESS) / (1.0 - MAX_ROUGHNESS) + (n - 2),
        ).clamp(0, n - 1)
        per_mip = torch.stack([sample_equirect(mip.to(direction), direction) for mip in self.mips], dim=0)
        low = level.floor().long().clamp(0, n - 1)
        high = (low + 1).clamp(max=n - 1)
        fraction = (level - low.to(level)).unsqueeze(-1)
        gather = lambda index: per_mip.gather(0, index.unsqueeze(0).unsqueeze(-1).expand(1, *direction.shape)).squeeze(0)  # noqa: E731
        return gather(low) * (1 - fraction) + gather(high) * fraction


# ------------------------------------------------------------------------------ shading


def shade(albedo: Tensor, roughness: Tensor, metallic: Tensor, normal: Tensor, view: Tensor,
          light: EnvironmentLight, occlusion: Tensor | None = None) -> Tensor:
    """Linear outgoing radiance [..., 3].

    Args:
        albedo: [..., 3] linear base colour in [0, 1].
        roughness, metallic: [...] perceptual roughness (alpha = roughness^2) and metalness.
        normal: [..., 3] unit shading normals.
        view: [..., 3] unit directions from the surface towards the camera.
        light: the environment.
        occlusion: optional [...] ambient occlusion in [0, 1] multiplying the result.
    """
    metal = metallic.unsqueeze(-1)
    f0 = DIELECTRIC_F0 * (1.0 - metal) + metal * albedo
    n_dot_v = (normal * view).sum(-1)
    reflected = F.normalize(2.0 * n_dot_v.unsqueeze(-1) * normal - view, dim=-1)
    fg = lookup_brdf(n_dot_v.clamp(1e-4, 1.0), roughness.clamp(0.0, 1.0))
    diffuse = light.irradiance(normal) * albedo * (1.0 - metal)
    specular = light.specular(reflected, roughness) * (f0 * fg[..., 0:1] + fg[..., 1:2])
    colour = diffuse + specular
    return colour if occlusion is None else colour * occlusion.unsqueeze(-1)


# ------------------------------------------------------------------------------ HDR files and the sky


def procedural_sky(height: int = 128, sun_direction: tuple[float, float, float] = (0.4, 0.3, 0.85),
                   sun_radiance: float = 30.0, sun_radius_deg: float = 3.0) -> Tensor:
    """A clear-sky HDR [height, 2 height, 3]: a blue gradient above the horizon, warm grey ground,
    and a small bright sun (deterministic; the default when no ``.hdr`` is given)."""
    directions = equirect_directions(height, 2 * height)
    z = directions[..., 2:3]
    zenith, horizon, ground = torch.tensor([0.25, 0.45, 0.9]), torch.tensor([0.85, 0.9, 1.0]), torch.tensor([0.35, 0.3, 0.25])
    up = z.clamp_min(0.0)
    sky = horizon + (zenith - horizon) * up.sqrt()
    radiance = torch.where(z >= 0, sky, ground * (1.0 + z).clamp_min(0.2))
    sun = F.normalize(torch.tensor(sun_direction, dtype=torch.float32), dim=0)
    cos_angle = (directions * sun).sum(-1, keepdim=True)
    disc = (cos_angle > math.cos(math.radians(sun_radius_deg))).float()
    return radiance + disc * sun_radiance


def read_hdr(path: str | Path) -> Tensor:
    """A Radiance RGBE (``.hdr``) image as linear float32 [H, W, 3] (flat or new-style RLE scanlines)."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as error:
        raise FileNotFoundError(f"environment map {path}: {error.strerror}") from None
    if not data.startswith((b"#?RADIANCE", b"#?RGBE")):
        raise ValueError(f"{path}: not a Radiance .hdr file (no #?RADIANCE header)")
    header_end = data.find(b"\n\n")
    if header_end < 0:
        raise ValueError(f"{path}: truncated header")
    header = data[:header_end].decode("ascii", "replace")
    if "FORMAT=" in header and "32-bit_rle_rgbe" not in header:
        raise ValueError(f"{path}: only 32-bit_rle_rgbe is supported")
    line_end = data.find(b"\n", header_end + 2)
    match = re.fullmatch(r"-Y (\d+) \+X (\d+)", data[header_end + 2 : line_end].decode("ascii", "replace").strip())
    if match is None:
        raise ValueError(f"{path}: only the standard -Y H +X W orientation is supported")
    height, width = int(match.group(1)), int(match.group(2))
    payload = np.frombuffer(data, dtype=np.uint8, offset=line_end + 1)
    rgbe = np.empty((height, width, 4), dtype=np.uint8)
    position = 0
    try:
        for row in range(height):
            if 8 <= width < 32768 and payload[position] == 2 and payload[position + 1] == 2 and not payload[position + 2] & 0x80:
                position += 4
                for channel in range(4):
                    column = 0
                    while column < width:
                        count = int(payload[position])
                        position += 1
                        if count > 128:  # a run
                            count -= 128
                            rgbe[row, column : column + count, channel] = payload[position]
                            position += 1
                        else:
                            rgbe[row, column : column + count, channel] = payload[position : position + count]
                            position += count
                        column += count
            else:  # flat scanline
                rgbe[row] = payload[position : position + 4 * width].reshape(width, 4)
                position += 4 * width
    except (IndexError, ValueError):
        raise ValueError(f"{path}: truncated or corrupt pixel data") from None
    exponent = rgbe[..., 3:4].astype(np.int32)
    scale = np.where(exponent > 0, np.ldexp(1.0, exponent - 136), 0.0)
    return torch.from_numpy(((rgbe[..., :3].astype(np.float64) + 0.5) * scale).astype(np.float32))


def write_hdr(path: str | Path, image: Tensor) -> Path:
    """Write linear [H, W, 3] radiance as a flat (uncompressed) Radiance RGBE file."""
    array = image.detach().cpu().double().numpy()
    brightest = array.max(axis=-1)
    mantissa, exponent = np.frexp(brightest)
    scale = np.where(brightest > 1e-32, mantissa * 256.0 / np.maximum(brightest, 1e-300), 0.0)
    rgbe = np.zeros((*array.shape[:2], 4), dtype=np.uint8)
    rgbe[..., :3] = np.clip(array * scale[..., None], 0, 255).astype(np.uint8)
    rgbe[..., 3] = np.where(brightest > 1e-32, exponent + 128, 0).astype(np.uint8)
    path = Path(path)
    header = f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {array.shape[0]} +X {array.shape[1]}\n".encode()
    path.write_bytes(header + rgbe.tobytes())
    return path
