"""NeRF volume rendering: ray/box intersection, an occupancy grid, ray marching and compositing.

The one semantics every tier implements (DESIGN §3), in the packed layout of nerfacc (samples of
all rays flattened into one list, ``ray_indices`` naming each sample's ray):

**Marching** (``march_rays``; no gradient). Every quantity is float32 and every operation below is
one float32 rounding (no fused multiply-add), so all tiers produce *identical* sample sets::

    t_near, t_far, hit = ray_aabb(o, d, aabb)
    t_min = max(t_near, near);  t_max = min(t_far, far)     # no samples unless hit and t_min < t_max
    for k = 0, 1, 2, ...:
        s  = float32(k) + jitter                             # jitter in [0, 1), 0 when not stratified
        t0 = t_min + s * step;  t1 = t0 + step
        stop unless t1 <= t_max                              # samples lie wholly inside [t_min, t_max]
        tm = (t0 + t1) * 0.5;  x_c = o_c + tm * d_c
        i_c = floor((x_c - lo_c) * scale_c)                  # scale_c = float32(res) / (hi_c - lo_c)
        keep (t0, t1) if 0 <= i_c < res for c = x, y, z and occupancy[(i_x * res + i_y) * res + i_z]
        stop after max_samples kept samples

Output is packed in ray order, each ray's samples by increasing ``t``.

**Compositing** (``composite``; differentiable in ``sigmas`` and ``values``; ``t`` is a constant).
Within each ray (its samples contiguous and sorted by ``t``)::

    sd_i    = sigma_i * (t1_i - t0_i)
    excl_i  = sum_{j<i} sd_j               # accumulated in float64, rounded to the values' dtype
    T_i     = exp(-excl_i);  alpha_i = 1 - exp(-sd_i)      # = prod_{j<i} (1 - alpha_j)
    w_i     = T_i * alpha_i  if  excl_i <= -log(threshold)  (i.e. T_i >= threshold)  else 0
    accumulated = sum w_i v_i;  opacity = sum w_i;  depth = sum w_i (t0_i + t1_i) / 2

The early-termination test is made on ``excl`` in the log domain so that every tier decides it
identically; terminated samples have zero weight and pass no gradient (nerfacc's semantics).
Colours are not composited with a background: the caller does ``acc + (1 - opacity) * bg``.
Expected normals (or any other per-sample feature) are just another ``values`` tensor.

Tiers: ``reference`` (pure torch, autograd; the definition), ``cpu`` (``cuda/raymarch_cpu.cpp``,
C++/OpenMP, hand-written O(S) backward with per-ray suffix sums as in Instant-NGP/nerfacc,
bit-for-bit deterministic) and ``cuda`` (one thread per ray, the same float32 sample arithmetic, also
deterministic).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lift3d.kernels._backend import forced_tier, native_op, select_tier, tier_available

logger = logging.getLogger(__name__)

MARCH_OP = "march_rays"
SEGMENTS_OP = "ray_segments"
COMPOSITE_FORWARD_OP = "composite_forward"
COMPOSITE_BACKWARD_OP = "composite_backward"

TRANSMITTANCE_THRESHOLD = 1e-4
"""Default early-termination threshold: samples behind transmittance < 1e-4 get zero weight."""

_REFERENCE_MARCH_ELEMENTS = 1 << 21
"""The reference marcher evaluates rays in chunks of about this many (ray, step) candidates."""


# --------------------------------------------------------------------------------------------
# ray / box intersection
# --------------------------------------------------------------------------------------------


def ray_aabb(origins: Tensor, dirs: Tensor, aabb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Slab-method intersection of rays ``o + t d`` with an axis-aligned box.

    Args:
        origins: [R, 3] ray origins.
        dirs: [R, 3] ray directions (need not be unit; ``t`` is in units of ``|d|``).
        aabb: [6] box as (x_lo, y_lo, z_lo, x_hi, y_hi, z_hi).

    Returns:
        ``t_near`` [R], ``t_far`` [R] (the parameter interval inside the box; ``t_near`` is
        negative when the origin is inside) and ``hit`` [R] bool: ``t_near <= t_far`` and
        ``t_far >= 0`` (boxes wholly behind the origin are missed). ``t_near``/``t_far`` are
        meaningful only where ``hit``. A zero direction component makes that slab either the whole
        line (origin between its planes) or empty, with no NaN.
    """
    if origins.shape != dirs.shape or origins.dim() != 2 or origins.shape[-1] != 3:
        raise ValueError(f"origins and dirs must both be [R, 3], got {tuple(origins.shape)} and {tuple(dirs.shape)}")
    aabb = aabb.to(device=origins.device, dtype=origins.dtype).reshape(6)
    lo, hi = aabb[:3], aabb[3:]
    inverse = 1.0 / dirs
    t0 = (lo - origins) * inverse
    t1 = (hi - origins) * inverse
    parallel = dirs == 0
    inside = (origins >= lo) & (origins <= hi)
    inf = torch.full_like(t0, math.inf)
    t_lo = torch.where(parallel, torch.where(inside, -inf, inf), torch.minimum(t0, t1))
    t_hi = torch.where(parallel, torch.where(inside, inf, -inf), torch.maximum(t0, t1))
    t_near = t_lo.amax(dim=-1)
    t_far = t_hi.amin(dim=-1)
    hit = (t_near <= t_far) & (t_far >= 0)
    return t_near, t_far, hit


# --------------------------------------------------------------------------------------------
# occupancy grid
# --------------------------------------------------------------------------------------------


def _cell_of(points: Tensor, lo: Tensor, scale: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    """Flat cell index ``(i_x * res + i_y) * res + i_z`` of float32 points [..., 3] and whether
    the point is inside the grid; the arithmetic of the module docstring."""
    cell_f = torch.floor((points - lo) * scale)
    inside = ((cell_f >= 0) & (cell_f < float(resolution))).all(dim=-1)
    ijk = torch.where(inside.unsqueeze(-1), cell_f, torch.zeros_like(cell_f)).long()
    return (ijk[..., 0] * resolution + ijk[..., 1]) * resolution + ijk[..., 2], inside


def _grid_scale(aabb: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    """(lo [3], scale [3]) in float32, ``scale = float32(res) / (hi - lo)``."""
    aabb = aabb.to(torch.float32).reshape(6)
    return aabb[:3], torch.tensor(float(resolution), dtype=torch.float32, device=aabb.device) / (aabb[3:] - aabb[:3])


@dataclass
class OccupancyGridConfig:
    """A single-level occupancy grid over a box, updated from the field's density (nerfacc's
    ``OccGridEstimator.update_every_n_steps``)."""

    resolution: int = 32
    """Cells per axis (threestudio uses 32; Instant-NGP 128)."""
    radius: float = 1.0
    """Half-size of the cube ``[-radius, radius]^3`` the grid covers (ignored when ``aabb`` is set)."""
    aabb: list[float] | None = None
    """Explicit box ``[x_lo, y_lo, z_lo, x_hi, y_hi, z_hi]``, overriding ``radius``."""
    ema_decay: float = 0.95
    """Each evaluated cell keeps ``max(ema * decay, new density)``."""
    threshold: float = 0.01
    """A cell is occupied when its opacity ``1 - exp(-ema * step_size)`` exceeds
    ``min(threshold, mean opacity of all cells)``."""
    warmup_steps: int = 256
    """Before this step every update evaluates every cell."""
    update_every: int = 16
    """``update`` does its work only on steps divisible by this."""
    eval_chunk: int = 65536
    """Points per ``density_fn`` call during an update (bounds its memory)."""

    def box(self) -> list[float]:
        """The grid's box as six floats."""
        if self.aabb is not None:
            if len(self.aabb) != 6:
                raise ValueError(f"occupancy grid aabb must have 6 numbers, got {self.aabb}")
            return [float(v) for v in self.aabb]
        r = float(self.radius)
        return [-r, -r, -r, r, r, r]


class OccupancyGrid(nn.Module):
    """A ``res^3`` grid of cells over a box marking where the density is worth sampling.

    Buffers: ``aabb`` [6] float32; ``density_ema`` [res^3] float32 (running max-decay of the
    sampled density); ``occupancy`` [res^3] bool, flat index ``(i_x * res + i_y) * res + i_z``.
    Unlike nerfacc, every cell starts occupied, so rendering before the first update samples the
    whole box instead of nothing.
    """

    density_ema: Tensor
    occupancy: Tensor
    aabb: Tensor

    def __init__(self, config: OccupancyGridConfig | None = None) -> None:
        super().__init__()
        self.config = config or OccupancyGridConfig()
        res = self.config.resolution
        if res <= 0:
            raise ValueError(f"occupancy grid resolution must be positive, got {res}")
        box = torch.tensor(self.config.box(), dtype=torch.float32)
        if not bool((box[3:] > box[:3]).all()):
            raise ValueError(f"occupancy grid box must have lo < hi on every axis, got {box.tolist()}")
        self.register_buffer("aabb", box)
        self.register_buffer("density_ema", torch.zeros(res**3))
        self.register_buffer("occupancy", torch.ones(res**3, dtype=torch.bool))

    @property
    def resolution(self) -> int:
        """Cells per axis."""
        return self.config.resolution

    def cell_coords(self, indices: Tensor) -> Tensor:
        """[N, 3] integer (i_x, i_y, i_z) of flat cell indices [N]."""
        res = self.resolution
        return torch.stack([indices // (res * res), (indices // res) % res, indices % res], dim=-1)

    @torch.no_grad()
    def occupied(self, points: Tensor) -> Tensor:
        """Bool [...] for points [..., 3]: inside the box and in an occupied cell."""
        lo, scale = _grid_scale(self.aabb, self.resolution)
        cell, inside = _cell_of(points.to(torch.float32), lo, scale, self.resolution)
        return inside & self.occupancy[cell]

    @torch.no_grad()
    def update(
        self,
        step: int,
        density_fn: Callable[[Tensor], Tensor],
        step_size: float,
        generator: torch.Generator | None = None,
    ) -> bool:
        """Refresh the grid from ``density_fn`` (nerfacc's ``update_every_n_steps``).

        Does nothing in eval mode or when ``step % update_every != 0``. Before ``warmup_steps``
        every cell is evaluated; afterwards ``res^3 / 4`` uniformly random cells plus up to as many
        randomly chosen occupied cells. Each evaluated cell is probed at one uniformly jittered
        point inside it; its EMA becomes ``max(ema * decay, sigma)`` (duplicates: the largest
        sigma). Then ``occupancy = 1 - exp(-ema * step_size) > min(threshold, mean of that)``.
        Deterministic given torch's RNG state (or ``generator``).

        Args:
            step: The training step.
            density_fn: Maps world points [N, 3] to densities [N] (or [N, 1]); called without
                gradient, in chunks of ``eval_chunk``.
            step_size: The render step size, converting density to opacity.
            generator: RNG for the cell choice and jitter (default: torch's global one).

        Returns:
            Whether the grid was updated.
        """
        cfg = self.config
        if not self.training or step % cfg.update_every != 0:
            return False
        device = self.density_ema.device
        cells = self.resolution**3
        if step < cfg.warmup_steps:
            indices = torch.arange(cells, device=device)
        else:
            count = max(cells // 4, 1)
            uniform = torch.randint(cells, (count,), device=device, generator=generator)
            occupied = torch.nonzero(self.occupancy).squeeze(-1)
            if occupied.numel() > count:
                occupied = occupied[torch.randint(occupied.numel(), (count,), device=device, generator=generator)]
            indices = torch.cat([uniform, occupied])

        jitter = torch.rand(indices.numel(), 3, device=device, generator=generator)
        unit = (self.cell_coords(indices).float() + jitter) / self.resolution
        points = self.aabb[:3] + unit * (self.aabb[3:] - self.aabb[:3])
        sigma = torch.cat(
            [density_fn(chunk).reshape(-1).float() for chunk in points.split(cfg.eval_chunk)]
        ) if points.numel() else points.new_zeros(0)
        sigma = torch.nan_to_num(sigma, nan=0.0)  # a NaN must not poison the EMA forever

        decayed = self.density_ema.clone()
        decayed[indices] = self.density_ema[indices] * cfg.ema_decay  # duplicates write equal values
        # amax is order-independent, so duplicate cells resolve deterministically.
        self.density_ema.copy_(decayed.scatter_reduce(0, indices, sigma, reduce="amax", include_self=True))
        opacity = -torch.expm1(-self.density_ema * step_size)
        threshold = torch.clamp(opacity.mean(), max=cfg.threshold)
        self.occupancy.copy_(opacity > threshold)
        logger.debug(
            "occupancy grid step %d: %.1f%% cells occupied", step, 100.0 * self.occupancy.float().mean().item()
        )
        return True


# --------------------------------------------------------------------------------------------
# marching
# --------------------------------------------------------------------------------------------


@dataclass
class RaySamples:
    """Packed samples: ray order, increasing ``t`` within a ray."""

    ray_indices: Tensor
    """[S] int64 ray of each sample (non-decreasing)."""
    t_starts: Tensor
    """[S] float32 start of each sample's interval along its ray."""
    t_ends: Tensor
    """[S] float32 end of the interval (``t_starts + step_size``)."""

    def midpoints(self) -> Tensor:
        """[S] interval midpoints ``(t_starts + t_ends) / 2``."""
        return (self.t_starts + self.t_ends) * 0.5


def _ray_segments(origins: Tensor, dirs: Tensor, aabb: Tensor, near: float, far: float) -> tuple[Tensor, Tensor]:
    """[R] float32 ``t_min``, ``t_max`` per ray; both 0 (no samples) where nothing is to be marched."""
    t_near, t_far, hit = ray_aabb(origins, dirs, aabb)
    t_min = torch.maximum(t_near, torch.tensor(near, dtype=torch.float32, device=origins.device))
    t_max = torch.minimum(t_far, torch.tensor(far, dtype=torch.float32, device=origins.device))
    # Zero directions would march forever in place; non-finite ends cannot be stepped.
    ok = hit & (t_min < t_max) & torch.isfinite(t_min) & torch.isfinite(t_max) & (dirs != 0).any(dim=-1)
    zero = torch.zeros_like(t_min)
    return torch.where(ok, t_min, zero), torch.where(ok, t_max, zero)


@torch.no_grad()
def march_rays(
    origins: Tensor,
    dirs: Tensor,
    aabb: Tensor,
    occupancy: Tensor,
    resolution: int,
    step_size: float,
    near: float = 0.0,
    far: float = 1e10,
    jitter: Tensor | None = None,
    max_samples_per_ray: int = 1024,
    tier: str | None = None,
) -> RaySamples:
    """Uniform samples along rays, skipping empty cells (see the module docstring for the rule).

    Args:
        origins: [R, 3] ray origins (cast to float32).
        dirs: [R, 3] directions; ``t`` and ``step_size`` are in units of ``|d|`` (world distance
            for unit directions).
        aabb: [6] the grid's box (x_lo, y_lo, z_lo, x_hi, y_hi, z_hi).
        occupancy: [res^3] (or [res, res, res]) bool, flat index ``(i_x * res + i_y) * res + i_z``.
        resolution: Cells per axis.
        step_size: Distance between consecutive samples (> 0).
        near: Samples start no earlier than this ``t``.
        far: Samples end no later than this ``t``.
        jitter: [R] offsets in [0, 1) (fractions of a step) for stratified sampling, or None.
        max_samples_per_ray: At most this many kept samples per ray (the first ones).
        tier: ``reference``, ``cpu`` or ``cuda``; None picks the fastest live tier.

    Returns:
        The packed samples (no gradient flows through them).
    """
    if origins.dim() != 2 or origins.shape[-1] != 3 or dirs.shape != origins.shape:
        raise ValueError(f"origins and dirs must both be [R, 3], got {tuple(origins.shape)} and {tuple(dirs.shape)}")
    R = origins.shape[0]
    occupancy = occupancy.reshape(-1)
    if occupancy.dtype != torch.bool or occupancy.numel() != resolution**3:
        raise ValueError(
            f"occupancy must be bool with resolution^3 = {resolution**3} cells, "
            f"got {occupancy.dtype} {tuple(occupancy.shape)}"
        )
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    if max_samples_per_ray < 0:
        raise ValueError(f"max_samples_per_ray must be >= 0, got {max_samples_per_ray}")
    device = origins.device
    origins = origins.to(torch.float32).contiguous()
    dirs = dirs.to(device=device, dtype=torch.float32).contiguous()
    aabb = aabb.to(device=device, dtype=torch.float32).reshape(6).contiguous()
    occupancy = occupancy.to(device).contiguous()
    if jitter is not None:
        if jitter.shape != (R,):
            raise ValueError(f"jitter must be [R] = [{R}], got {tuple(jitter.shape)}")
        jitter = jitter.to(device=device, dtype=torch.float32).contiguous()
    chosen = select_tier(MARCH_OP, device, tier)
    if chosen not in _MARCH_TIERS:
        raise NotImplementedError(f"the {chosen!r} tier of march_rays is not wired up yet")
    if chosen == "cpu" and tier_available("cpu", SEGMENTS_OP):
        # The same float32 operations in one pass: ~25 small torch ops cost more than the march at 64^2.
        t_min, t_max = native_op("cpu", SEGMENTS_OP, device)(origins, dirs, aabb, float(near), float(far))
    else:
        t_min, t_max = _ray_segments(origins, dirs, aabb, near, far)
    return _MARCH_TIERS[chosen](
        origins, dirs, t_min, t_max, aabb, occupancy, resolution, step_size, jitter, max_samples_per_ray
    )


def _march_reference(
    origins: Tensor,
    dirs: Tensor,
    t_min: Tensor,
    t_max: Tensor,
    aabb: Tensor,
    occupancy: Tensor,
    resolution: int,
    step_size: float,
    jitter: Tensor | None,
    max_samples: int,
) -> RaySamples:
    """Dense over [rays, candidate steps] in chunks of rays; memory O(chunk * steps)."""
    R, device = origins.shape[0], origins.device
    step = torch.tensor(step_size, dtype=torch.float32, device=device)
    lo, scale = _grid_scale(aabb, resolution)
    if jitter is None:
        jitter = torch.zeros(R, dtype=torch.float32, device=device)
    # Steps each ray needs (float64 estimate; the loop below verifies it, so rounding is harmless).
    span = (t_max.double() - t_min.double()) / step_size - jitter.double()
    steps = int(torch.floor(span).clamp(min=0).max().item()) + 3 if R else 1
    chunk = max(1, _REFERENCE_MARCH_ELEMENTS // steps)
    ray_indices, t_starts, t_ends = [], [], []
    begin = 0
    while begin < R:
        end = min(R, begin + chunk)
        while True:
            k = torch.arange(steps, dtype=torch.float32, device=device)
            offset = (k + jitter[begin:end, None]) * step
            t0 = t_min[begin:end, None] + offset
            t1 = t0 + step
            valid = t1 <= t_max[begin:end, None]
            if not bool(valid[:, -1].any()):
                break
            steps *= 2  # the estimate was short (cannot happen for sane inputs); retry longer
        tm = (t0 + t1) * 0.5
        points = origins[begin:end, None, :] + tm.unsqueeze(-1) * dirs[begin:end, None, :]
        cell, inside = _cell_of(points, lo, scale, resolution)
        keep = valid & inside & occupancy[cell]
        keep &= torch.cumsum(keep, dim=1) <= max_samples
        rows = torch.nonzero(keep)[:, 0]  # row-major: ray order, then increasing k
        ray_indices.append(rows + begin)
        t_starts.append(t0[keep])
        t_ends.append(t1[keep])
        begin = end
    if not ray_indices:
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        return RaySamples(torch.zeros(0, dtype=torch.long, device=device), empty, empty.clone())
    return RaySamples(torch.cat(ray_indices), torch.cat(t_starts), torch.cat(t_ends))


def _native_marcher(tier: str) -> "_Marcher":
    def march(origins: Tensor, dirs: Tensor, t_min: Tensor, t_max: Tensor, aabb: Tensor, occupancy: Tensor,
              resolution: int, step_size: float, jitter: Tensor | None, max_samples: int) -> RaySamples:
        march_op = native_op(tier, "march_rays", origins.device)
        ray_indices, t_starts, t_ends = march_op(
            origins, dirs, t_min, t_max, aabb, occupancy, resolution, step_size, jitter, max_samples
        )
        return RaySamples(ray_indices, t_starts, t_ends)

    return march


_Marcher = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, float, Tensor | None, int], RaySamples]

_MARCH_TIERS: dict[str, _Marcher] = {
    "reference": _march_reference,
    "cpu": _native_marcher("cpu"),
    "cuda": _native_marcher("cuda"),
}
"""Tier name -> marcher."""


# --------------------------------------------------------------------------------------------
# compositing
# --------------------------------------------------------------------------------------------


@dataclass
class Composite:
    """Volume-rendering result for R rays of packed samples."""

    weights: Tensor
    """[S] per-sample weight ``T_i * alpha_i`` (0 past early termination)."""
    accumulated: Tensor
    """[R, C] ``sum w_i v_i`` per ray (no background)."""
    opacity: Tensor
    """[R, 1] ``sum w_i`` per ray."""
    depth: Tensor
    """[R, 1] ``sum w_i (t0_i + t1_i) / 2`` per ray (not normalised by opacity)."""


def composite(
    sigmas: Tensor,
    values: Tensor,
    t_starts: Tensor,
    t_ends: Tensor,
    ray_indices: Tensor,
    num_rays: int,
    transmittance_threshold: float = TRANSMITTANCE_THRESHOLD,
    tier: str | None = None,
) -> Composite:
    """Alpha-composite packed samples front to back (see the module docstring for the rule).

    Args:
        sigmas: [S] (or [S, 1]) non-negative densities.
        values: [S, C] per-sample features (colour, normals, ...), any C >= 1.
        t_starts: [S] interval starts.
        t_ends: [S] interval ends.
        ray_indices: [S] int64 ray of each sample. Requirement: non-decreasing (a ray's samples
            contiguous, rays in order), each ray's samples sorted by increasing ``t`` — as
            ``march_rays`` returns them.
        num_rays: R.
        transmittance_threshold: Samples whose transmittance before them is below this get zero
            weight (early ray termination).
        tier: ``reference``, ``cpu`` or ``cuda``; None picks the fastest live tier (the
            reference for dtypes other than float32, which the native tiers do not take).

    Returns:
        Weights, accumulated values, opacity and depth; differentiable with respect to
        ``sigmas`` and ``values`` (``t`` is treated as a constant).
    """
    sigmas = sigmas.reshape(-1)
    S = sigmas.shape[0]
    if values.dim() != 2 or values.shape[0] != S:
        raise ValueError(f"values must be [S, C] with S = {S}, got {tuple(values.shape)}")
    for name, tensor in (("t_starts", t_starts), ("t_ends", t_ends), ("ray_indices", ray_indices)):
        if tensor.shape != (S,):
            raise ValueError(f"{name} must be [S] = [{S}], got {tuple(tensor.shape)}")
    if not transmittance_threshold > 0:
        raise ValueError(f"transmittance_threshold must be positive, got {transmittance_threshold}")
    ray_indices = ray_indices.long()
    if tier is None and forced_tier() is None and (sigmas.dtype != torch.float32 or values.dtype != torch.float32):
        tier = "reference"  # the native tiers are float32 only
    chosen = select_tier(COMPOSITE_FORWARD_OP, sigmas.device, tier)
    if chosen not in _COMPOSITE_TIERS:
        raise NotImplementedError(f"the {chosen!r} tier of composite is not wired up yet")
    return _COMPOSITE_TIERS[chosen](sigmas, values, t_starts, t_ends, ray_indices, num_rays, transmittance_threshold)


def _composite_reference(
    sigmas: Tensor,
    values: Tensor,
    t_starts: Tensor,
    t_ends: Tensor,
    ray_indices: Tensor,
    num_rays: int,
    threshold: float,
) -> Composite:
    """Dense per-ray layout [R, max samples per ray] for the exclusive sums; autograd does the rest."""
    S, C = values.shape
    dtype, device = torch.promote_types(sigmas.dtype, values.dtype), sigmas.device
    sigmas, values = sigmas.to(dtype), values.to(dtype)
    t0, t1 = t_starts.detach().to(dtype), t_ends.detach().to(dtype)
    if S and not bool((ray_indices[1:] >= ray_indices[:-1]).all()):
        raise ValueError("composite: ray_indices must be non-decreasing (each ray's samples contiguous, in order)")
    if S and not (0 <= int(ray_indices[0]) and int(ray_indices[-1]) < num_rays):
        raise ValueError(f"composite: ray_indices must lie in [0, {num_rays})")

    sd = sigmas * (t1 - t0)
    counts = torch.bincount(ray_indices, minlength=num_rays)
    first = torch.cumsum(counts, dim=0) - counts
    position = torch.arange(S, device=device) - first[ray_indices]
    width = int(counts.max().item()) if S else 0
    dense = sd.new_zeros(num_rays, width + 1).index_put((ray_indices, position + 1), sd)
    # torch.cumsum accumulates float32 in float64 on the CPU; the native tiers do the same.
    excl = torch.cumsum(dense, dim=1)[ray_indices, position]
    max_depth = torch.tensor(-math.log(threshold), dtype=dtype, device=device)
    kept = excl.detach() <= max_depth
    alpha = -torch.expm1(-sd)
    weights = torch.where(kept, torch.exp(-excl) * alpha, torch.zeros_like(alpha))

    mid = (t0 + t1) * 0.5
    w = weights.unsqueeze(-1)
    per_sample = torch.cat([w * values, w, w * mid.unsqueeze(-1)], dim=-1)
    per_ray = per_sample.new_zeros(num_rays, C + 2).index_add(0, ray_indices, per_sample)
    return Composite(
        weights=weights, accumulated=per_ray[:, :C], opacity=per_ray[:, C : C + 1], depth=per_ray[:, C + 1 :]
    )


class _CompositeNative(torch.autograd.Function):
    """Autograd wrapper of ``torch.ops.lift3d_<tier>.composite_{forward,backward}`` (cuda: one thread per ray)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        sigmas: Tensor,
        values: Tensor,
        t_starts: Tensor,
        t_ends: Tensor,
        ray_indices: Tensor,
        num_rays: int,
        threshold: float,
        tier: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sigmas, values, t_starts, t_ends = (t.contiguous() for t in (sigmas, values, t_starts, t_ends))
        forward_op = native_op(tier, "composite_forward", sigmas.device)
        weights, accumulated, opacity, depth, offsets, kept_ends, transmittance, survival = forward_op(
            sigmas, values, t_starts, t_ends, ray_indices.contiguous(), num_rays, threshold
        )
        # The backward reuses the forward's w, T and exp(-sigma delta): no transcendental there.
        ctx.save_for_backward(values, t_starts, t_ends, offsets, kept_ends, weights, transmittance, survival)
        ctx.tier = tier
        # An output without a gradient comes to backward as None, not as a tensor of zeros: the
        # [S] zeros of an unused `weights` would cost more than some of the backward itself.
        ctx.set_materialize_grads(False)
        return weights, accumulated, opacity, depth

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_weights: Tensor,
        grad_accumulated: Tensor,
        grad_opacity: Tensor,
        grad_depth: Tensor,
    ) -> tuple[Tensor | None, ...]:
        values, t_starts, t_ends, offsets, kept_ends, weights, transmittance, survival = ctx.saved_tensors
        R, C = offsets.shape[0] - 1, values.shape[1]

        def upstream(grad: Tensor | None, *shape: int) -> Tensor:
            return values.new_zeros(shape) if grad is None else grad.contiguous().float()

        backward_op = native_op(ctx.tier, "composite_backward", values.device)
        grad_sigmas, grad_values = backward_op(
            values,
            t_starts,
            t_ends,
            offsets,
            kept_ends,
            weights,
            transmittance,
            survival,
            upstream(grad_weights, 0),  # empty: zero
            upstream(grad_accumulated, R, C),
            upstream(grad_opacity, R, 1),
            upstream(grad_depth, R, 1),
        )
        return grad_sigmas, grad_values, None, None, None, None, None, None


def _native_compositor(tier: str) -> "_Compositor":
    def composite(sigmas: Tensor, values: Tensor, t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor,
                  num_rays: int, threshold: float) -> Composite:
        for name, tensor in (("sigmas", sigmas), ("values", values)):
            if tensor.dtype != torch.float32:
                raise TypeError(f"the native compositor needs float32 {name}, got {tensor.dtype}")
        weights, accumulated, opacity, depth = _CompositeNative.apply(
            sigmas, values, t_starts.detach().float(), t_ends.detach().float(), ray_indices, num_rays, threshold, tier
        )
        return Composite(weights=weights, accumulated=accumulated, opacity=opacity, depth=depth)

    return composite


_Compositor = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, float], Composite]

_COMPOSITE_TIERS: dict[str, _Compositor] = {
    "reference": _composite_reference,
    "cpu": _native_compositor("cpu"),
    "cuda": _native_compositor("cuda"),
}
"""Tier name -> compositor."""


# --------------------------------------------------------------------------------------------
# convenience: march + field + composite
# --------------------------------------------------------------------------------------------


FieldFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``field_fn(points [S, 3], dirs [S, 3]) -> (sigma [S], values [S, C])``."""


@dataclass
class RenderedRays:
    """``render_rays``'s result."""

    rgb: Tensor
    """[R, C] accumulated values (no background)."""
    opacity: Tensor
    """[R, 1] accumulated weight."""
    depth: Tensor
    """[R, 1] expected depth (not normalised by opacity)."""
    weights: Tensor | None
    """[S] per-sample weights; None when rendered in chunks (their size is what chunking bounds)."""
    samples: RaySamples | None
    """The packed samples the field was evaluated at; None when rendered in chunks."""


def render_rays(
    origins: Tensor,
    dirs: Tensor,
    field_fn: FieldFn,
    grid: OccupancyGrid,
    step_size: float,
    near: float = 0.0,
    far: float = 1e10,
    stratified: bool = False,
    max_samples_per_ray: int = 1024,
    transmittance_threshold: float = TRANSMITTANCE_THRESHOLD,
    generator: torch.Generator | None = None,
    tier: str | None = None,
    chunk_rays: int = 0,
    chunk_samples: int = 0,
) -> RenderedRays:
    """March ``grid``, evaluate ``field_fn`` at the sample midpoints and composite.

    Args:
        origins: [R, 3] ray origins.
        dirs: [R, 3] ray directions (unit, so that ``step_size`` is a world distance).
        field_fn: ``(points [S, 3], dirs [S, 3]) -> (sigma [S] or [S, 1], values [S, C])``.
        grid: The occupancy grid (its box, resolution and occupancy are used).
        step_size: Distance between samples (threestudio: ``sqrt(3) * 2 * radius / 512``).
        near: Earliest ``t``.
        far: Latest ``t``.
        stratified: Jitter each ray's samples by a uniform fraction of a step (training).
        max_samples_per_ray: Cap on samples per ray.
        transmittance_threshold: Early-termination threshold of ``composite``.
        generator: RNG for the jitter (default: torch's global one).
        tier: Forces a kernel tier for both the march and the compositing.
        chunk_rays: With gradients off, march and composite at most this many rays at a time
            (0 = all at once), so peak memory is bounded by ``chunk_rays * max_samples_per_ray``
            samples however much of the grid is occupied. Ignored while autograd records: the
            graph keeps every sample alive anyway.
        chunk_samples: With gradients off, call ``field_fn`` on at most this many samples at a
            time (0 = all at once); bounds the field's intermediate activations.

    Returns:
        The composited rays and the samples. Gradients flow to the field's outputs (and through
        the sample positions to ``origins``/``dirs``). A chunked render gives the same colours,
        opacities and depths as an unchunked one, but no per-sample ``weights``/``samples``.
    """
    R = origins.shape[0]
    # Drawn for all rays before any chunking, so chunked and unchunked renders sample alike.
    jitter = torch.rand(R, device=origins.device, generator=generator) if stratified else None
    chunked = not torch.is_grad_enabled() and (0 < chunk_rays < R or chunk_samples > 0)
    if not chunked:
        return _render_rays_once(origins, dirs, field_fn, grid, step_size, near, far, jitter,
                                 max_samples_per_ray, transmittance_threshold, tier, 0)
    chunk_rays = chunk_rays if chunk_rays > 0 else max(R, 1)
    parts = [
        _render_rays_once(
            origins[begin : begin + chunk_rays], dirs[begin : begin + chunk_rays], field_fn, grid, step_size,
            near, far, None if jitter is None else jitter[begin : begin + chunk_rays],
            max_samples_per_ray, transmittance_threshold, tier, chunk_samples,
        )
        for begin in range(0, R, chunk_rays)
    ]
    if not parts:  # no rays at all
        return _render_rays_once(origins, dirs, field_fn, grid, step_size, near, far, jitter,
                                 max_samples_per_ray, transmittance_threshold, tier, 0)
    return RenderedRays(
        rgb=torch.cat([part.rgb for part in parts]),
        opacity=torch.cat([part.opacity for part in parts]),
        depth=torch.cat([part.depth for part in parts]),
        weights=None,
        samples=None,
    )


def _render_rays_once(
    origins: Tensor,
    dirs: Tensor,
    field_fn: FieldFn,
    grid: OccupancyGrid,
    step_size: float,
    near: float,
    far: float,
    jitter: Tensor | None,
    max_samples_per_ray: int,
    transmittance_threshold: float,
    tier: str | None,
    chunk_samples: int,
) -> RenderedRays:
    """One march + field + composite over all of ``origins``; the field in ``chunk_samples`` pieces if > 0."""
    samples = march_rays(
        origins.detach(),
        dirs.detach(),
        grid.aabb,
        grid.occupancy,
        grid.resolution,
        step_size,
        near=near,
        far=far,
        jitter=jitter,
        max_samples_per_ray=max_samples_per_ray,
        tier=tier,
    )
    ray_dirs = dirs[samples.ray_indices]
    points = origins[samples.ray_indices] + samples.midpoints().unsqueeze(-1).to(dirs.dtype) * ray_dirs
    if 0 < chunk_samples < points.shape[0]:
        outputs = [field_fn(p, d) for p, d in zip(points.split(chunk_samples), ray_dirs.split(chunk_samples))]
        sigma = torch.cat([s.reshape(-1) for s, _ in outputs])
        values = torch.cat([v for _, v in outputs])
    else:
        sigma, values = field_fn(points, ray_dirs)
    del points, ray_dirs
    result = composite(
        sigma.reshape(-1),
        values,
        samples.t_starts,
        samples.t_ends,
        samples.ray_indices,
        origins.shape[0],
        transmittance_threshold=transmittance_threshold,
        tier=tier,
    )
    return RenderedRays(
        rgb=result.accumulated, opacity=result.opacity, depth=result.depth, weights=result.weights, samples=samples
    )


__all__ = [
    "Composite",
    "OccupancyGrid",
    "OccupancyGridConfig",
    "RaySamples",
    "RenderedRays",
    "composite",
    "march_rays",
    "ray_aabb",
    "render_rays",
]
