"""Batched pinhole cameras on an orbit around the origin, and the samplers that make them.

Conventions (every module relies on them):
- World frame: right-handed, **z up**; the object sits at the origin.
- A camera at elevation ``e`` and azimuth ``a`` (degrees) and distance ``d`` sits at
  ``d * (cos e cos a, cos e sin a, sin e)`` and looks at the origin. Azimuth 0 is the
  object's **front** (camera on the +x axis), 180 its back.
- Camera frame: OpenCV (x right, y down, z forward). ``c2w`` maps camera to world
  coordinates; pixel centres are at ``(i + 0.5, j + 0.5)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

VIEW_LABELS = ("front", "side", "back", "overhead")


@dataclass
class Cameras:
    """A batch of B pinhole cameras sharing one image size."""

    c2w: Tensor
    """[B, 4, 4] camera-to-world transforms (OpenCV camera axes)."""
    fovy: Tensor
    """[B] vertical field of view in radians."""
    width: int
    """Image width in pixels."""
    height: int
    """Image height in pixels."""
    elevation_deg: Tensor
    """[B] elevation of the camera above the xy plane, degrees."""
    azimuth_deg: Tensor
    """[B] azimuth around +z, degrees in [-180, 180); 0 is the front."""
    distance: Tensor
    """[B] distance from the origin."""

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    def to(self, device: torch.device | str) -> "Cameras":
        return Cameras(
            self.c2w.to(device), self.fovy.to(device), self.width, self.height,
            self.elevation_deg.to(device), self.azimuth_deg.to(device), self.distance.to(device),
        )

    def __getitem__(self, index: int | slice | Tensor) -> "Cameras":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Cameras(
            self.c2w[index], self.fovy[index], self.width, self.height,
            self.elevation_deg[index], self.azimuth_deg[index], self.distance[index],
        )

    def with_resolution(self, width: int, height: int) -> "Cameras":
        """The same cameras rendering a different image size (field of view kept)."""
        return Cameras(self.c2w, self.fovy, width, height, self.elevation_deg, self.azimuth_deg, self.distance)

    @property
    def position(self) -> Tensor:
        """[B, 3] camera centres in world coordinates."""
        return self.c2w[:, :3, 3]

    def world_to_camera(self) -> Tensor:
        """[B, 4, 4] world-to-camera transforms (inverse of ``c2w``)."""
        rotation = self.c2w[:, :3, :3]
        w2c = torch.zeros_like(self.c2w)
        w2c[:, :3, :3] = rotation.transpose(1, 2)
        w2c[:, :3, 3] = -(rotation.transpose(1, 2) @ self.position.unsqueeze(-1)).squeeze(-1)
        w2c[:, 3, 3] = 1.0
        return w2c

    def focal(self) -> Tensor:
        """[B] focal length in pixels (square pixels)."""
        return 0.5 * self.height / torch.tan(0.5 * self.fovy)

    def intrinsics(self) -> Tensor:
        """[B, 3, 3] pinhole intrinsics K."""
        focal = self.focal()
        K = torch.zeros(len(self), 3, 3, dtype=self.c2w.dtype, device=self.device)
        K[:, 0, 0] = focal
        K[:, 1, 1] = focal
        K[:, 0, 2] = 0.5 * self.width
        K[:, 1, 2] = 0.5 * self.height
        K[:, 2, 2] = 1.0
        return K

    def rays(self) -> tuple[Tensor, Tensor]:
        """Ray origins and unit directions through pixel centres, each [B, H, W, 3]."""
        dtype, device = self.c2w.dtype, self.device
        j, i = torch.meshgrid(
            torch.arange(self.height, dtype=dtype, device=device) + 0.5,
            torch.arange(self.width, dtype=dtype, device=device) + 0.5,
            indexing="ij",
        )
        focal = self.focal().view(-1, 1, 1)
        dirs_cam = torch.stack(
            [(i - 0.5 * self.width) / focal, (j - 0.5 * self.height) / focal, torch.ones_like(i).expand_as(focal * i)],
            dim=-1,
        )
        dirs = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], dirs_cam)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        origins = self.position.view(-1, 1, 1, 3).expand_as(dirs)
        return origins, dirs

    def view_labels(
        self, front_threshold_deg: float = 45.0, back_threshold_deg: float = 45.0, overhead_threshold_deg: float = 60.0
    ) -> list[str]:
        """One of ``front/side/back/overhead`` per camera (threestudio's rule: later labels win)."""
        return view_labels(
            self.elevation_deg, self.azimuth_deg, front_threshold_deg, back_threshold_deg, overhead_threshold_deg
        )


def view_labels(
    elevation_deg: Tensor,
    azimuth_deg: Tensor,
    front_threshold_deg: float = 45.0,
    back_threshold_deg: float = 45.0,
    overhead_threshold_deg: float = 60.0,
) -> list[str]:
    """Label each view side, then front, back, overhead; a later rule overrides an earlier one."""
    azimuth = wrap_azimuth(azimuth_deg)
    labels = []
    for elevation, az in zip(elevation_deg.tolist(), azimuth.tolist()):
        label = "side"
        if abs(az) < front_threshold_deg:
            label = "front"
        if abs(az) > 180.0 - back_threshold_deg:
            label = "back"
        if elevation > overhead_threshold_deg:
            label = "overhead"
        labels.append(label)
    return labels


def wrap_azimuth(azimuth_deg: Tensor) -> Tensor:
    """Map azimuths to [-180, 180)."""
    return torch.remainder(azimuth_deg + 180.0, 360.0) - 180.0


def look_at_origin(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor) -> Tensor:
    """[B, 4, 4] OpenCV-axis ``c2w`` for cameras on the orbit looking at the origin, world z up."""
    elevation = torch.deg2rad(elevation_deg)
    azimuth = torch.deg2rad(azimuth_deg)
    position = torch.stack(
        [
            distance * torch.cos(elevation) * torch.cos(azimuth),
            distance * torch.cos(elevation) * torch.sin(azimuth),
            distance * torch.sin(elevation),
        ],
        dim=-1,
    )
    forward = -position / position.norm(dim=-1, keepdim=True)
    world_up = torch.tensor([0.0, 0.0, 1.0], dtype=position.dtype, device=position.device).expand_as(forward)
    right = torch.linalg.cross(forward, world_up, dim=-1)
    # Straight overhead the up vector is degenerate: fall back to a fixed right axis.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    fallback = torch.stack([-torch.sin(azimuth), torch.cos(azimuth), torch.zeros_like(azimuth)], dim=-1)
    right = torch.where(degenerate, fallback, right)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(forward, right, dim=-1)
    c2w = torch.zeros(position.shape[0], 4, 4, dtype=position.dtype, device=position.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = down
    c2w[:, :3, 2] = forward
    c2w[:, :3, 3] = position
    c2w[:, 3, 3] = 1.0
    return c2w


def orbit_cameras(
    elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor, fovy_deg: Tensor, width: int, height: int
) -> Cameras:
    """Cameras on the orbit from per-camera angles (degrees), distances and fields of view."""
    elevation_deg, azimuth_deg, distance, fovy_deg = (
        torch.as_tensor(v, dtype=torch.float32) for v in (elevation_deg, azimuth_deg, distance, fovy_deg)
    )
    return Cameras(
        c2w=look_at_origin(elevation_deg, azimuth_deg, distance),
        fovy=torch.deg2rad(fovy_deg),
        width=width,
        height=height,
        elevation_deg=elevation_deg,
        azimuth_deg=wrap_azimuth(azimuth_deg),
        distance=distance,
    )


@dataclass
class OrbitSamplerConfig:
    """Random cameras on a sphere around the object (training views)."""

    batch_size: int = 4
    """Cameras per step."""
    width: int = 64
    """Render width in pixels."""
    height: int = 64
    """Render height in pixels."""
    elevation_range_deg: tuple[float, float] = (-10.0, 60.0)
    """Uniform range of elevations, degrees."""
    azimuth_range_deg: tuple[float, float] = (-180.0, 180.0)
    """Uniform range of azimuths, degrees."""
    distance_range: tuple[float, float] = (3.0, 3.5)
    """Uniform range of camera distances from the origin."""
    fovy_range_deg: tuple[float, float] = (35.0, 45.0)
    """Uniform range of vertical fields of view, degrees."""
    stratified_azimuth: bool = True
    """Spread each batch's azimuths evenly (one random offset), as threestudio's batch_uniform_azimuth."""


class OrbitSampler:
    """Samples batches of training cameras; reproducible from its generator."""

    def __init__(self, config: OrbitSamplerConfig):
        self.config = config

    def sample(self, generator: torch.Generator, width: int | None = None, height: int | None = None) -> Cameras:
        cfg = self.config
        B = cfg.batch_size

        def uniform(bounds: tuple[float, float]) -> Tensor:
            low, high = bounds
            return low + (high - low) * torch.rand(B, generator=generator)

        if cfg.stratified_azimuth:
            low, high = cfg.azimuth_range_deg
            offsets = (torch.arange(B) + torch.rand(B, generator=generator)) / B
            azimuth = low + (high - low) * offsets
        else:
            azimuth = uniform(cfg.azimuth_range_deg)
        # Elevation uniform on the sphere's band is what threestudio does by default; keep it simple: uniform in angle.
        elevation = uniform(cfg.elevation_range_deg)
        return orbit_cameras(
            elevation, azimuth, uniform(cfg.distance_range), uniform(cfg.fovy_range_deg),
            width or cfg.width, height or cfg.height,
        )


@dataclass
class TurntableConfig:
    """A fixed ring of cameras (validation, evaluation and videos)."""

    num_views: int = 8
    """Views around the ring."""
    elevation_deg: float = 15.0
    """Elevation of the ring, degrees."""
    distance: float = 3.25
    """Camera distance."""
    fovy_deg: float = 40.0
    """Vertical field of view, degrees."""
    azimuth_offset_deg: float = 0.0
    """Azimuth of the first view; a non-zero offset keeps evaluation views off any training grid."""
    width: int = 64
    """Image width."""
    height: int = 64
    """Image height."""


def turntable(config: TurntableConfig) -> Cameras:
    """``num_views`` cameras evenly spaced in azimuth at a fixed elevation, distance and field of view."""
    n = config.num_views
    azimuth = config.azimuth_offset_deg + 360.0 * torch.arange(n, dtype=torch.float32) / n
    return orbit_cameras(
        torch.full((n,), config.elevation_deg),
        azimuth,
        torch.full((n,), config.distance),
        torch.full((n,), config.fovy_deg),
        config.width,
        config.height,
    )
