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
    time: Tensor | None = None
    """[B] each camera's time in [0, 1] (dynamic scenes); None means static (every camera at t = 0)."""
    frames: int = 1
    """The B cameras are B / frames consecutive clips of ``frames`` cameras each, clip-major
    (camera b * frames + f is frame f of clip b); 1 for independent images."""

    def __post_init__(self) -> None:
        if self.frames < 1 or self.c2w.shape[0] % self.frames:
            raise ValueError(f"Cameras.frames={self.frames} must be >= 1 and divide the {self.c2w.shape[0]} cameras")
        if self.time is not None and self.time.shape != (self.c2w.shape[0],):
            raise ValueError(f"Cameras.time must be [{self.c2w.shape[0]}], got {tuple(self.time.shape)}")

    @property
    def num_clips(self) -> int:
        """B / frames: how many clips the cameras hold."""
        return len(self) // self.frames

    def times(self) -> Tensor:
        """[B] times, zeros where the cameras are static."""
        if self.time is not None:
            return self.time
        return torch.zeros(len(self), dtype=self.c2w.dtype, device=self.device)

    def with_time(self, time: Tensor | float | None) -> "Cameras":
        """The same cameras at another time ([B], a scalar for all, or None for static)."""
        if time is not None:
            time = torch.as_tensor(time, dtype=self.c2w.dtype, device=self.device).expand(len(self)).clone()
        return Cameras(self.c2w, self.fovy, self.width, self.height, self.elevation_deg, self.azimuth_deg,
                       self.distance, time, self.frames)

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    def to(self, device: torch.device | str) -> "Cameras":
        return Cameras(
            self.c2w.to(device), self.fovy.to(device), self.width, self.height,
            self.elevation_deg.to(device), self.azimuth_deg.to(device), self.distance.to(device),
            None if self.time is None else self.time.to(device), self.frames,
        )

    def __getitem__(self, index: int | slice | Tensor) -> "Cameras":
        """A subset of the cameras; it stays a batch of clips only when it keeps whole clips in order."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        c2w = self.c2w[index]
        frames = self.frames
        if frames > 1:
            whole_clips = (
                isinstance(index, slice) and index.step in (None, 1)
                and (index.start or 0) % frames == 0 and c2w.shape[0] % frames == 0
            )
            frames = frames if whole_clips else 1
        return Cameras(
            c2w, self.fovy[index], self.width, self.height,
            self.elevation_deg[index], self.azimuth_deg[index], self.distance[index],
            None if self.time is None else self.time[index], frames,
        )

    def with_resolution(self, width: int, height: int) -> "Cameras":
        """The same cameras rendering a different image size (field of view kept)."""
        return Cameras(self.c2w, self.fovy, width, height, self.elevation_deg, self.azimuth_deg, self.distance,
                       self.time, self.frames)

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
    elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor, fovy_deg: Tensor, width: int, height: int,
    time: Tensor | None = None, frames: int = 1,
) -> Cameras:
    """Cameras on the orbit from per-camera angles (degrees), distances and fields of view
    (optionally per-camera times and a clip length ``frames``)."""
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
        time=None if time is None else torch.as_tensor(time, dtype=torch.float32),
        frames=frames,
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
    time_range: tuple[float, float] = (0.0, 1.0)
    """Uniform range of the random time of each single frame (dynamic representations only)."""
    clips_per_batch: int = 1
    """Clips per step when a teacher judges clips (each of the teacher's ``frames_per_clip`` frames)."""
    clip_span: float = 0.75
    """Fraction of the time range [0, 1] one clip covers; its frames are evenly spaced over it and it
    starts at a uniform random time in [0, 1 - clip_span]. Keep it below 1: at 1 every clip's frames
    fall on the same F times k / (F - 1), and all other times are then shaped by the frame-level
    (motion-blind) terms alone (Adam takes full-size steps on parameters only one term reaches,
    whatever that term's weight). (F - 1) / F spaces the frames 1 / F apart and covers [0, 1]."""
    clip_orbit_deg: float = 0.0
    """Azimuth the camera sweeps during one clip, degrees (0 = a fixed camera per clip, as Dream-in-4D)."""

    def __post_init__(self) -> None:
        if self.clips_per_batch < 1:
            raise ValueError(f"clips_per_batch must be >= 1, got {self.clips_per_batch}")
        if not 0.0 < self.clip_span <= 1.0:
            raise ValueError(f"clip_span must be in (0, 1], got {self.clip_span}")
        low, high = self.time_range
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"time_range must satisfy 0 <= low <= high <= 1, got {self.time_range}")


class OrbitSampler:
    """Samples batches of training cameras; reproducible from its generator."""

    def __init__(self, config: OrbitSamplerConfig):
        self.config = config

    def sample(
        self, generator: torch.Generator, width: int | None = None, height: int | None = None, with_time: bool = False
    ) -> Cameras:
        """``batch_size`` independent cameras; ``with_time`` gives each a random time in ``time_range``
        (drawn after the angles, so a static run's camera stream does not change)."""
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
        distance, fovy = uniform(cfg.distance_range), uniform(cfg.fovy_range_deg)
        time = uniform(cfg.time_range) if with_time else None
        return orbit_cameras(elevation, azimuth, distance, fovy, width or cfg.width, height or cfg.height, time)

    def sample_clips(
        self, generator: torch.Generator, frames: int, width: int | None = None, height: int | None = None
    ) -> Cameras:
        """``clips_per_batch`` clips of ``frames`` cameras (clip-major), as 4D-fy / Dream-in-4D render them.

        Each clip draws one camera (as :meth:`sample`) and a start time; its frames are evenly
        spaced over ``clip_span`` of [0, 1] and sweep ``clip_orbit_deg`` of azimuth centred on the
        drawn one (0: a fixed camera).
        """
        cfg = self.config
        B, F = cfg.clips_per_batch, frames
        if F < 1:
            raise ValueError(f"frames must be >= 1, got {F}")

        def uniform(bounds: tuple[float, float]) -> Tensor:
            low, high = bounds
            return low + (high - low) * torch.rand(B, generator=generator)

        if cfg.stratified_azimuth:
            low, high = cfg.azimuth_range_deg
            azimuth = low + (high - low) * (torch.arange(B) + torch.rand(B, generator=generator)) / B
        else:
            azimuth = uniform(cfg.azimuth_range_deg)
        elevation, distance, fovy = uniform(cfg.elevation_range_deg), uniform(cfg.distance_range), uniform(cfg.fovy_range_deg)
        start = (1.0 - cfg.clip_span) * torch.rand(B, generator=generator)
        phase = torch.linspace(0.0, 1.0, F) if F > 1 else torch.zeros(1)  # [F]
        time = start[:, None] + cfg.clip_span * phase[None, :]
        sweep = azimuth[:, None] + cfg.clip_orbit_deg * (phase[None, :] - 0.5)

        def per_frame(values: Tensor) -> Tensor:
            return values[:, None].expand(B, F).reshape(-1)

        return orbit_cameras(
            per_frame(elevation), sweep.reshape(-1), per_frame(distance), per_frame(fovy),
            width or cfg.width, height or cfg.height, time.reshape(-1).clamp(0.0, 1.0), F,
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


def view_time_grid(config: TurntableConfig, num_times: int, include_end: bool = False) -> Cameras:
    """The turntable's views at ``num_times`` evenly spaced times.

    Camera ``v * num_times + k`` is view v at time ``k / num_times``: a periodic grid over [0, 1),
    which the half-span shift of ``eval/time_margin_db`` permutes (held-out 4D evaluation). With
    ``include_end`` the times are ``k / (num_times - 1)``, covering the whole motion including
    t = 1 (reconstruction targets, where a non-periodic motion must be seen to its end). Each
    view is a fixed-camera clip of ``num_times`` frames.
    """
    if num_times < 1:
        raise ValueError(f"num_times must be >= 1, got {num_times}")
    ring = turntable(config)
    if include_end and num_times > 1:
        times = torch.linspace(0.0, 1.0, num_times)
    else:
        times = torch.arange(num_times, dtype=torch.float32) / num_times
    index = torch.arange(len(ring)).repeat_interleave(num_times)
    grid = ring[index]
    return Cameras(grid.c2w, grid.fovy, grid.width, grid.height, grid.elevation_deg, grid.azimuth_deg,
                   grid.distance, times.repeat(len(ring)), num_times)
