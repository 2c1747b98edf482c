"""Multiresolution hash-grid encoding (Instant-NGP; tiny-cuda-nn's ``HashGrid``), 3-D or 4-D inputs.

The one semantics every tier implements (DESIGN §3), following tiny-cuda-nn's ``Grid/Hash``. It is
written here for D = 3 (space); ``n_input_dims = 4`` (space-time, 4D-fy's grid) is the same rule
with a fourth axis ``t`` everywhere: ``res_l**4`` rows, 16 corners (bit 3 is t), the dense stride
``res**3`` and the hash prime 3674653429 (tcnn's fourth), the quadrilinear blend.

* Level ``l`` has ``scale_l = base_resolution * per_level_scale**l - 1`` and resolution
  ``res_l = ceil(scale_l) + 1``. Its slice of the table holds
  ``size_l = min(next_multiple(res_l**3, 8), 2**log2_hashmap_size)`` entries of ``F`` features,
  the slices laid end to end (``level_offsets``). Scales are computed in float64 and rounded
  to float32 (tcnn chains float32 ``exp2f``/``log2f``; the resolutions agree for the usual
  per-level scales, 2, 1.5, 1.3819 and threestudio's 1.4473).
* A position ``x`` in [0, 1]^3 becomes ``p = x * scale_l + 0.5`` (the 0.5 staggers the levels,
  Instant-NGP appendix A), cell ``g = floor(p)`` and fraction ``t = p - g``. The 8 corners
  ``g + c`` (``c`` in {0, 1}^3; bit 0 is x, bit 1 y, bit 2 z) are looked up at
  ``index = dense % size_l`` when ``res_l**3 <= size_l`` (dense level, with
  ``dense = cx + cy * res + cz * res**2``) and otherwise at
  ``index = (cx * 1 ^ cy * 2654435761 ^ cz * 805459861) mod 2**32 % size_l`` (hashed level;
  tcnn's coherent prime hash, uint32 arithmetic). The 0.5 offset makes the top corner of a
  dense level reach ``res_l`` and wrap around, exactly as in tcnn.
* The level's output is the trilinear blend ``sum_c w_c * table[offset_l + index_c]`` with
  ``w_c = prod_d (t_d if c_d else 1 - t_d)``; the levels are concatenated level-major into
  ``[N, L * F]``.
* Positions outside [0, 1] are clamped to it (NaN is treated as 0), so their gradient is zero
  outside the cube (torch.clamp's convention: the bounds themselves pass the gradient).
* Only the first ``active_levels`` levels are evaluated (coarse-to-fine training); the others
  output zeros and receive no gradient.

Tiers: ``reference`` (torch, autograd to any order; the definition), ``cpu`` (C++/OpenMP in
``cuda/hashgrid_cpu.cpp``, float32, hand-written backward for the table and the positions,
bit-for-bit deterministic, AVX2 where the CPU has it; not twice differentiable; outputs of 2 MB and
more reuse the memory of freed ones, at most 256 MB kept, see ``cuda/cpu_output_pool.h``) and
``cuda`` (one thread per point and level; the table gradient uses float atomics, so it is not
bit-reproducible; not twice differentiable).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lift3d.kernels._backend import native_op, select_tier

logger = logging.getLogger(__name__)

FORWARD_OP = "hashgrid_forward"
BACKWARD_OP = "hashgrid_backward"

HASH_PRIMES = (1, 2654435761, 805459861, 3674653429)
"""tiny-cuda-nn's coherent prime hash factors for x, y, z, t (x's is 1 for cache coherence)."""
INPUT_DIMS = (3, 4)
"""Supported input dimensions: space, and space-time."""
INIT_RANGE = 1e-4
"""Table entries start uniform in [-1e-4, 1e-4], as in tiny-cuda-nn."""

_UINT32 = 0xFFFFFFFF


@dataclass(frozen=True)
class HashGridConfig:
    """Shape of a hash-grid encoding; the defaults are threestudio's (max resolution 4096)."""

    n_levels: int = 16
    """Number of resolution levels L; the encoding has L * n_features_per_level outputs."""
    n_features_per_level: int = 2
    """Features F stored per table entry (tcnn allows 1, 2, 4, 8; any F >= 1 works here)."""
    log2_hashmap_size: int = 19
    """log2 of the most entries T one level may hold; finer levels are hashed into T entries."""
    base_resolution: int = 16
    """Resolution of the coarsest level (its scale is base_resolution - 1)."""
    per_level_scale: float = 1.447269237440378
    """Growth factor of the scale from one level to the next (here: 16 -> 4096 over 16 levels)."""
    n_input_dims: int = 3
    """Input dimensions D: 3 (points in [0, 1]^3) or 4 (space-time points (x, y, z, t) in [0, 1]^4)."""

    def __post_init__(self) -> None:
        if self.n_levels < 1:
            raise ValueError(f"n_levels must be >= 1, got {self.n_levels}")
        if self.n_features_per_level < 1:
            raise ValueError(f"n_features_per_level must be >= 1, got {self.n_features_per_level}")
        # Dense indices are computed in uint32: res^D <= T <= 2^30 keeps them from overflowing.
        if not 3 <= self.log2_hashmap_size <= 30:
            raise ValueError(f"log2_hashmap_size must be in [3, 30], got {self.log2_hashmap_size}")
        if self.base_resolution < 1:
            raise ValueError(f"base_resolution must be >= 1, got {self.base_resolution}")
        if not self.per_level_scale >= 1.0:
            raise ValueError(f"per_level_scale must be >= 1, got {self.per_level_scale}")
        if self.n_input_dims not in INPUT_DIMS:
            raise ValueError(f"n_input_dims must be one of {INPUT_DIMS}, got {self.n_input_dims}")

    @property
    def output_dim(self) -> int:
        """Width of the encoding, L * F."""
        return self.n_levels * self.n_features_per_level

    @property
    def n_params(self) -> int:
        """Rows of the table (entries over all levels); the table is [n_params, F]."""
        return _levels(self).offsets[-1]


def level_scales(config: HashGridConfig) -> list[float]:
    """Per-level ``scale_l = base_resolution * per_level_scale**l - 1`` (float64; kernels round to float32)."""
    return [config.base_resolution * config.per_level_scale**level - 1.0 for level in range(config.n_levels)]


def level_resolutions(config: HashGridConfig) -> list[int]:
    """Per-level grid resolution ``ceil(scale_l) + 1`` (vertices per axis)."""
    return [math.ceil(scale) + 1 for scale in level_scales(config)]


def level_offsets(config: HashGridConfig) -> list[int]:
    """L + 1 row offsets of the levels' table slices; the last one is the table's row count.

    A level holds ``min(next_multiple(res**D, 8), 2**log2_hashmap_size)`` entries (tcnn pads the
    dense size to a multiple of 8 for aligned access).
    """
    offsets = [0]
    cap = 1 << config.log2_hashmap_size
    for resolution in level_resolutions(config):
        dense = -(-(resolution**config.n_input_dims) // 8) * 8
        offsets.append(offsets[-1] + min(dense, cap))
    return offsets


def level_is_hashed(config: HashGridConfig) -> list[bool]:
    """Whether each level uses the spatial hash (its dense grid does not fit in its slice)."""
    offsets = level_offsets(config)
    return [
        resolution**config.n_input_dims > offsets[level + 1] - offsets[level]
        for level, resolution in enumerate(level_resolutions(config))
    ]


@dataclass(frozen=True)
class _Levels:
    """Per-level metadata in the form the kernels take."""

    scales: list[float]
    resolutions: list[int]
    offsets: list[int]
    hashed: list[int]


@functools.lru_cache(maxsize=64)
def _levels(config: HashGridConfig) -> _Levels:
    return _Levels(
        scales=level_scales(config),
        resolutions=level_resolutions(config),
        offsets=level_offsets(config),
        hashed=[int(h) for h in level_is_hashed(config)],
    )


def hashgrid_encode(
    positions: Tensor,
    table: Tensor,
    config: HashGridConfig,
    tier: str | None = None,
    active_levels: int | None = None,
) -> Tensor:
    """Encode points with a multiresolution hash grid (see the module docstring for the rule).

    Args:
        positions: [N, D] points (D = ``config.n_input_dims``), expected in [0, 1]^D; values outside
            are clamped (zero gradient there) and NaN counts as 0.
        table: [n_params, F] feature table (``config.n_params`` rows, ``F = n_features_per_level``),
            the same floating dtype as positions.
        config: The grid's shape.
        tier: ``reference``, ``cpu`` or ``cuda``; None picks the fastest live tier.
        active_levels: Evaluate only the first this many levels (None: all); the others output
            zeros and get no gradient.

    Returns:
        [N, L * F] features, level-major. Differentiable with respect to ``table`` and ``positions``
        (so analytic normals work). The cpu tier's backward is not itself differentiable: a loss
        on analytic normals (second derivatives) raises there and needs the reference tier.
    """
    n_levels = config.n_levels
    active = n_levels if active_levels is None else int(active_levels)
    if not 0 <= active <= n_levels:
        raise ValueError(f"active_levels must be in [0, {n_levels}], got {active_levels}")
    _check_shapes(positions, table, config)
    chosen = select_tier(FORWARD_OP, positions.device, tier)
    if chosen not in _TIERS:
        raise NotImplementedError(f"the {chosen!r} tier of the hash-grid encoding is not wired up yet")
    return _TIERS[chosen](positions, table, config, active)


def _check_shapes(positions: Tensor, table: Tensor, config: HashGridConfig) -> None:
    D = config.n_input_dims
    if positions.dim() != 2 or positions.shape[1] != D:
        raise ValueError(f"positions must be [N, {D}] for n_input_dims={D}, got {tuple(positions.shape)}")
    expected = (config.n_params, config.n_features_per_level)
    if tuple(table.shape) != expected:
        raise ValueError(f"table must be [n_params, F] = {expected} for this config, got {tuple(table.shape)}")
    if not positions.is_floating_point() or positions.dtype != table.dtype:
        raise TypeError(f"positions ({positions.dtype}) and table ({table.dtype}) must share a floating dtype")
    if positions.device != table.device:
        raise ValueError(f"positions ({positions.device}) and table ({table.device}) are on different devices")


# --------------------------------------------------------------------------------------------
# reference tier: the definition, vectorised over points, one level at a time
# --------------------------------------------------------------------------------------------


def _corner_bits(dims: int, device: torch.device) -> Tensor:
    """[2**D, D] int64: corner c's offset along axis d (x, y, z, t) is bit d of c."""
    c = torch.arange(1 << dims, device=device)
    return torch.stack([(c >> d) & 1 for d in range(dims)], dim=-1)


def _corner_index(cells: Tensor, resolution: int, size: int, hashed: bool) -> Tensor:
    """Row within the level's slice for integer corners ``cells`` [..., D] (int64, non-negative)."""
    axes = cells.unbind(-1)
    if hashed:
        # int64 holds the exact products; masking to 32 bits commutes with XOR, so this is tcnn's uint32 hash.
        h = axes[0]
        for d in range(1, len(axes)):
            h = h ^ ((axes[d] * HASH_PRIMES[d]) & _UINT32)
        return h % size
    index, stride = axes[0], resolution
    for d in range(1, len(axes)):
        index = index + axes[d] * stride
        stride *= resolution
    return index % size


def _encode_reference(positions: Tensor, table: Tensor, config: HashGridConfig, active_levels: int) -> Tensor:
    """Pure torch; autograd reaches table and positions (and differentiates again)."""
    levels = _levels(config)
    N, F = positions.shape[0], config.n_features_per_level
    x = torch.nan_to_num(positions, nan=0.0).clamp(0.0, 1.0)
    bits = _corner_bits(config.n_input_dims, positions.device)  # [2^D, D]
    upper = bits.bool()
    outputs = []
    for level in range(active_levels):
        offset, size = levels.offsets[level], levels.offsets[level + 1] - levels.offsets[level]
        scale = torch.tensor(levels.scales[level], dtype=positions.dtype, device=positions.device)
        p = x * scale + 0.5
        cell = torch.floor(p).detach()
        t = (p - cell).unsqueeze(1)  # [N, 1, D]; floor is piecewise constant, so t carries the gradient
        corners = cell.long().unsqueeze(1) + bits  # [N, 2^D, D]
        index = _corner_index(corners, levels.resolutions[level], size, bool(levels.hashed[level]))
        w_axes = torch.where(upper, t, 1.0 - t)  # [N, 2^D, D]
        weights = w_axes[..., 0]
        for d in range(1, config.n_input_dims):  # left to right, the order the native tiers multiply in
            weights = weights * w_axes[..., d]  # [N, 2^D]
        features = table[offset + index]  # [N, 2^D, F]
        outputs.append((weights.unsqueeze(-1) * features).sum(dim=1))
    if active_levels < config.n_levels:
        zeros = positions.new_zeros(N, (config.n_levels - active_levels) * F)
        if active_levels == 0:
            # Empty sums keep the output attached to both inputs, so backward yields zero gradients.
            zeros = zeros + (table[:0].sum() + positions[:, :0].sum())
        outputs.append(zeros)
    return torch.cat(outputs, dim=-1)


# --------------------------------------------------------------------------------------------
# native tiers: cpu (cuda/hashgrid_cpu.cpp, C++/OpenMP) and cuda (cuda/hashgrid.cu), one wrapper
# --------------------------------------------------------------------------------------------


class _HashGridNative(torch.autograd.Function):
    """Autograd wrapper of ``torch.ops.lift3d_<tier>.hashgrid_{forward,backward}`` (hand-written backward).

    The cpu tier's table gradient is summed in a fixed order (bit-identical for any thread count);
    the cuda tier scatters it with float atomics, so its last bits vary from run to run. The
    position gradient is deterministic in both.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        positions: Tensor,
        table: Tensor,
        config: HashGridConfig,
        active_levels: int,
        tier: str,
    ) -> Tensor:
        positions, table = positions.contiguous(), table.contiguous()
        levels = _levels(config)
        forward_op = native_op(tier, "hashgrid_forward", positions.device)
        features = forward_op(
            positions, table, levels.scales, levels.resolutions, levels.offsets, levels.hashed, active_levels
        )
        ctx.save_for_backward(positions, table)
        ctx.levels, ctx.active_levels, ctx.tier = levels, active_levels, tier
        return features

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_features: Tensor
    ) -> tuple[Tensor | None, ...]:
        positions, table = ctx.saved_tensors
        levels = ctx.levels
        need_positions, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        backward_op = native_op(ctx.tier, "hashgrid_backward", positions.device)
        grad_table, grad_positions = backward_op(
            grad_features.contiguous().float(),
            positions,
            table,
            levels.scales,
            levels.resolutions,
            levels.offsets,
            levels.hashed,
            ctx.active_levels,
            need_table,
            need_positions,
        )
        return (
            grad_positions if need_positions else None,
            grad_table if need_table else None,
            None,
            None,
            None,
        )


def _native_encoder(tier: str) -> "_Encoder":
    def encode(positions: Tensor, table: Tensor, config: HashGridConfig, active_levels: int) -> Tensor:
        if positions.dtype != torch.float32:
            raise TypeError(f"the native hash grid needs float32 positions and table, got {positions.dtype}")
        return _HashGridNative.apply(positions, table, config, active_levels, tier)

    return encode


_Encoder = Callable[[Tensor, Tensor, HashGridConfig, int], Tensor]

_TIERS: dict[str, _Encoder] = {
    "reference": _encode_reference,
    "cpu": _native_encoder("cpu"),
    "cuda": _native_encoder("cuda"),
}
"""Tier name -> implementation."""


# --------------------------------------------------------------------------------------------
# module
# --------------------------------------------------------------------------------------------


class HashGridEncoding(nn.Module):
    """A hash-grid encoding that owns its float32 table, with coarse-to-fine level masking.

    ``active_levels`` (alias ``max_level``) is the number of leading levels evaluated; the
    others output zeros and get no gradient. It starts at ``config.n_levels`` (all active).
    """

    def __init__(self, config: HashGridConfig | None = None, tier: str | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else HashGridConfig()
        self.tier = tier
        self.table = nn.Parameter(torch.empty(self.config.n_params, self.config.n_features_per_level))
        self._active_levels = self.config.n_levels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in [-1e-4, 1e-4], as tiny-cuda-nn initialises its grids."""
        with torch.no_grad():
            self.table.uniform_(-INIT_RANGE, INIT_RANGE)

    @property
    def output_dim(self) -> int:
        """Width of the encoding, L * F."""
        return self.config.output_dim

    @property
    def active_levels(self) -> int:
        """Number of leading (coarsest) levels that are evaluated."""
        return self._active_levels

    @active_levels.setter
    def active_levels(self, value: int) -> None:
        value = int(value)
        if not 0 <= value <= self.config.n_levels:
            raise ValueError(f"active_levels must be in [0, {self.config.n_levels}], got {value}")
        self._active_levels = value

    @property
    def max_level(self) -> int:
        """Alias of ``active_levels``."""
        return self._active_levels

    @max_level.setter
    def max_level(self, value: int) -> None:
        self.active_levels = value

    def forward(self, positions: Tensor) -> Tensor:
        """[..., D] points in [0, 1]^D (clamped) -> [..., L * F] features."""
        D = self.config.n_input_dims
        if positions.shape[-1] != D:
            raise ValueError(f"positions must be [..., {D}] for n_input_dims={D}, got {tuple(positions.shape)}")
        flat = positions.reshape(-1, D).to(self.table.dtype)
        features = hashgrid_encode(flat, self.table, self.config, tier=self.tier, active_levels=self._active_levels)
        return features.view(*positions.shape[:-1], self.output_dim)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dims={c.n_input_dims}, levels={c.n_levels}, features={c.n_features_per_level}, log2_T={c.log2_hashmap_size}, "
            f"base={c.base_resolution}, scale={c.per_level_scale:.4f}, params={c.n_params}, "
            f"active_levels={self._active_levels}"
        )
