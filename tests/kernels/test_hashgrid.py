"""Hash-grid encoding: the level layout against tiny-cuda-nn's numbers, the reference against hand
computations, the cpu tier against the reference (values and both gradients), level masking,
bit-for-bit determinism of the cpu tier (any thread count, AVX2 or baseline build), recycled
output memory, empty inputs and a float64 gradcheck of the reference; for 3-D (space) and 4-D
(space-time) inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from conftest import require_cpu_ops

from lift3d.kernels.hashgrid import (
    FORWARD_OP,
    HASH_PRIMES,
    HashGridConfig,
    HashGridEncoding,
    hashgrid_encode,
    level_is_hashed,
    level_offsets,
    level_resolutions,
)

TINY = HashGridConfig(n_levels=2, n_features_per_level=2, log2_hashmap_size=6, base_resolution=3, per_level_scale=3.0)
"""Scales 2 and 8 (exact in binary), resolutions 3 and 9: level 0 dense (27 <= 32 rows), level 1 hashed (729 > 64)."""

TINY4 = HashGridConfig(
    n_levels=2, n_features_per_level=2, log2_hashmap_size=7, base_resolution=3, per_level_scale=3.0, n_input_dims=4
)
"""Space-time twin of TINY: level 0 dense (3^4 = 81 -> 88 rows <= 128), level 1 hashed (9^4 = 6561 > 128)."""

CONFIGS = {
    "mixed": HashGridConfig(n_levels=8, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=1.6),
    "all-hashed-f1": HashGridConfig(n_levels=4, n_features_per_level=1, log2_hashmap_size=7, base_resolution=8, per_level_scale=2.0),
    "f4": HashGridConfig(n_levels=5, n_features_per_level=4, log2_hashmap_size=9, base_resolution=3, per_level_scale=1.8),
    "f3-runtime": HashGridConfig(n_levels=3, n_features_per_level=3, log2_hashmap_size=8, base_resolution=5, per_level_scale=1.5),
    "threestudio-small-T": HashGridConfig(log2_hashmap_size=12),
    # Space-time (n_input_dims = 4): resolutions 3, 5, 8, 13, 20, 32 -> two dense levels, then hashed.
    "4d-mixed": HashGridConfig(
        n_levels=6, n_features_per_level=2, log2_hashmap_size=11, base_resolution=3, per_level_scale=1.6, n_input_dims=4
    ),
    "4d-all-hashed-f1": HashGridConfig(
        n_levels=3, n_features_per_level=1, log2_hashmap_size=8, base_resolution=8, per_level_scale=1.5, n_input_dims=4
    ),
    "4d-f3-runtime": HashGridConfig(
        n_levels=3, n_features_per_level=3, log2_hashmap_size=9, base_resolution=4, per_level_scale=1.5, n_input_dims=4
    ),
}


@pytest.fixture(scope="module")
def cpu_tier() -> None:
    require_cpu_ops(FORWARD_OP)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are zero)."""
    scale = expected.double().norm().item()
    diff = (actual.double() - expected.double()).norm().item()
    return diff if scale == 0 else diff / scale


def random_inputs(config: HashGridConfig, N: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Points mostly in the cube, 5% up to 0.1 outside (clamped), a few exactly on its faces; a unit-scale table."""
    g = torch.Generator().manual_seed(seed)
    D = config.n_input_dims
    positions = torch.rand(N, D, generator=g, dtype=torch.float64)
    outside = torch.rand(N, D, generator=g, dtype=torch.float64) < 0.05
    positions = torch.where(outside, positions * 1.2 - 0.1, positions)
    positions[: N // 50, 0] = 0.0
    positions[N // 50 : N // 25, 1] = 1.0
    table = torch.randn(config.n_params, config.n_features_per_level, generator=g, dtype=torch.float64)
    return positions.to(dtype), table.to(dtype)


def run_with_grads(positions: Tensor, table: Tensor, config: HashGridConfig, tier: str, active_levels: int | None = None, seed: int = 7) -> list[Tensor]:
    """Output, grad_table and grad_positions of <output, fixed random cotangent>."""
    x = positions.clone().requires_grad_(True)
    t = table.clone().requires_grad_(True)
    y = hashgrid_encode(x, t, config, tier=tier, active_levels=active_levels)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * cotangent).sum().backward()
    return [y.detach(), t.grad, x.grad]


def hand_encode(point: list[float], table: Tensor, config: HashGridConfig) -> list[float]:
    """Scalar Python transcription of tcnn's rule (module docstring), float64, any input dimension."""
    D = config.n_input_dims
    features = []
    offsets, resolutions, hashed = level_offsets(config), level_resolutions(config), level_is_hashed(config)
    for level in range(config.n_levels):
        scale = config.base_resolution * config.per_level_scale**level - 1.0
        size = offsets[level + 1] - offsets[level]
        res = resolutions[level]
        p = [min(max(v, 0.0), 1.0) * scale + 0.5 for v in point]
        g = [math.floor(v) for v in p]
        t = [v - math.floor(v) for v in p]
        acc = [0.0] * config.n_features_per_level
        for c in range(2**D):
            corner = [g[d] + ((c >> d) & 1) for d in range(D)]
            weight = 1.0
            for d in range(D):
                weight *= t[d] if (c >> d) & 1 else 1.0 - t[d]
            if hashed[level]:
                index = 0
                for d in range(D):
                    index ^= (corner[d] * HASH_PRIMES[d]) % 2**32
            else:
                index = sum(corner[d] * res**d for d in range(D))
            row = table[offsets[level] + index % size].tolist()
            acc = [a + weight * r for a, r in zip(acc, row)]
        features.extend(acc)
    return features


# --------------------------------------------------------------------------------------------
# layout and reference
# --------------------------------------------------------------------------------------------


def test_level_layout_matches_tcnn() -> None:
    # Parameter counts derived from tcnn's grid.h for L=16, F=2, T=2^19 (anchors-kernels §1).
    assert round(2 * HashGridConfig(per_level_scale=2.0).n_params / 1e6, 2) == 14.23
    fine = HashGridConfig(per_level_scale=1.3819)
    assert round(2 * fine.n_params / 1e6, 2) == 12.20
    assert level_is_hashed(fine) == [False] * 5 + [True] * 11
    default = HashGridConfig()
    assert level_resolutions(default)[0] == 16 and level_resolutions(default)[-1] == 4096
    assert default.output_dim == 32
    offsets = level_offsets(default)
    assert offsets[1] == 16**3 and offsets[2] - offsets[1] == 24**3
    assert offsets[4] - offsets[3] == 117656  # 49^3 = 117649 padded to a multiple of 8
    assert all(b - a == 2**19 for a, b, h in zip(offsets, offsets[1:], level_is_hashed(default)) if h)


def test_tiny_layout() -> None:
    assert level_resolutions(TINY) == [3, 9]
    assert level_is_hashed(TINY) == [False, True]
    assert level_offsets(TINY) == [0, 32, 96]  # 27 rounded up to 32; the hashed level holds T = 64


def test_reference_returns_vertex_features() -> None:
    table = torch.arange(96 * 2, dtype=torch.float32).view(96, 2)
    # Level 0 (scale 2): x = (0.25, 0.75, 0.25) -> p = (1, 2, 1), a vertex; dense row 1 + 2*3 + 1*9 = 16.
    y = hashgrid_encode(torch.tensor([[0.25, 0.75, 0.25]]), table, TINY, tier="reference")
    assert y[0, :2].tolist() == table[16].tolist()
    # Level 1 (scale 8): x = (2.5, 4.5, 6.5) / 8 -> p = (3, 5, 7); hashed row (3 ^ 5*P1 ^ 7*P2) mod 2^32 mod 64.
    y = hashgrid_encode(torch.tensor([[2.5 / 8, 4.5 / 8, 6.5 / 8]]), table, TINY, tier="reference")
    row = (3 ^ (5 * 2654435761) % 2**32 ^ (7 * 805459861) % 2**32) % 64
    assert y[0, 2:].tolist() == table[32 + row].tolist()


def test_reference_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(TINY.n_params, 2, generator=g, dtype=torch.float64)
    points = torch.rand(20, 3, generator=g, dtype=torch.float64).tolist() + [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [-0.3, 0.5, 1.7]]
    y = hashgrid_encode(torch.tensor(points, dtype=torch.float64), table, TINY, tier="reference")
    expected = torch.tensor([hand_encode(p, table, TINY) for p in points], dtype=torch.float64)
    assert torch.allclose(y, expected, rtol=0, atol=1e-12)
    # x = 1 at level 0: p = 2.5, so the top corner is 3 = res and the dense index wraps (tcnn does too).
    top = table[[(a + 3 * b + 9 * c) % 32 for c in (2, 3) for b in (2, 3) for a in (2, 3)]].mean(0)
    assert torch.allclose(y[20, :2], top, atol=1e-12)


def test_positions_are_clamped() -> None:
    positions, table = random_inputs(CONFIGS["mixed"], 64, seed=1)
    outside = positions * 3 - 1
    y_out, _, grad_x = run_with_grads(outside, table, CONFIGS["mixed"], "reference")
    y_in = hashgrid_encode(outside.clamp(0, 1), table, CONFIGS["mixed"], tier="reference")
    assert torch.equal(y_out, y_in)
    beyond = (outside < 0) | (outside > 1)
    assert beyond.any() and torch.all(grad_x[beyond] == 0)


@pytest.mark.parametrize("config", [TINY, TINY4], ids=["3d", "4d"])
def test_reference_gradcheck(config: HashGridConfig) -> None:
    positions, table = random_inputs(config, 6, seed=2, dtype=torch.float64)
    positions = positions.clamp(0.01, 0.99).requires_grad_(True)  # away from the clamp's kinks
    table.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, t: hashgrid_encode(x, t, config, tier="reference"), (positions, table))


def test_space_time_layout() -> None:
    assert level_resolutions(TINY4) == [3, 9]
    assert level_is_hashed(TINY4) == [False, True]
    assert level_offsets(TINY4) == [0, 88, 216]  # 81 rounded up to 88; the hashed level holds T = 128
    assert level_is_hashed(CONFIGS["4d-mixed"]) == [False] * 2 + [True] * 4
    assert HASH_PRIMES[3] == 3674653429  # tcnn's fourth coherent prime


def test_space_time_reference_vertex_features_and_hand_computation() -> None:
    table = torch.arange(216 * 2, dtype=torch.float64).view(216, 2)
    # Level 0 (scale 2): x = (0.25, 0.75, 0.25, 0.75) -> p = (1, 2, 1, 2), a vertex; dense row 1 + 2*3 + 1*9 + 2*27 = 70.
    y = hashgrid_encode(torch.tensor([[0.25, 0.75, 0.25, 0.75]], dtype=torch.float64), table, TINY4, tier="reference")
    assert y[0, :2].tolist() == table[70].tolist()
    # Level 1 (scale 8): p = (3, 5, 7, 2); hashed row (3 ^ 5*P1 ^ 7*P2 ^ 2*P3) mod 2^32 mod 128.
    y = hashgrid_encode(torch.tensor([[2.5 / 8, 4.5 / 8, 6.5 / 8, 1.5 / 8]], dtype=torch.float64), table, TINY4, tier="reference")
    row = (3 ^ (5 * 2654435761) % 2**32 ^ (7 * 805459861) % 2**32 ^ (2 * 3674653429) % 2**32) % 128
    assert y[0, 2:].tolist() == table[88 + row].tolist()
    g = torch.Generator().manual_seed(0)
    table = torch.randn(TINY4.n_params, 2, generator=g, dtype=torch.float64)
    points = torch.rand(20, 4, generator=g, dtype=torch.float64).tolist() + [[1.0] * 4, [0.0] * 4, [-0.3, 0.5, 1.7, 0.2]]
    y = hashgrid_encode(torch.tensor(points, dtype=torch.float64), table, TINY4, tier="reference")
    expected = torch.tensor([hand_encode(p, table, TINY4) for p in points], dtype=torch.float64)
    assert torch.allclose(y, expected, rtol=0, atol=1e-12)


def test_space_time_depends_on_time_and_reduces_to_space_at_fixed_time() -> None:
    """Moving t alone changes the encoding; along t the blend is linear between grid times."""
    config = CONFIGS["4d-mixed"]
    positions, table = random_inputs(config, 50, seed=9, dtype=torch.float64)
    positions = positions.clamp(0, 1)
    shifted = positions.clone()
    shifted[:, 3] = (shifted[:, 3] + 0.37) % 1.0
    a = hashgrid_encode(positions, table, config, tier="reference")
    b = hashgrid_encode(shifted, table, config, tier="reference")
    assert (a - b).abs().max() > 1e-3
    # Level 0 has scale 2: times 0.25 and 0.75 are grid times (p_t = 1, 2); t = 0.5 is their average.
    F = config.n_features_per_level
    at = []
    for v in (0.25, 0.5, 0.75):
        points = torch.cat([positions[:, :3], torch.full((50, 1), v, dtype=torch.float64)], 1)
        at.append(hashgrid_encode(points, table, config, tier="reference")[:, :F])
    assert torch.allclose(at[1], 0.5 * (at[0] + at[2]), atol=1e-12)


# --------------------------------------------------------------------------------------------
# cpu tier
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cpu_matches_reference(cpu_tier: None, name: str) -> None:
    config = CONFIGS[name]
    positions, table = random_inputs(config, 2000, seed=len(name))
    expected = run_with_grads(positions, table, config, "reference")
    actual = run_with_grads(positions, table, config, "cpu")
    for label, a, e in zip(("features", "grad_table", "grad_positions"), actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert relative_error(a, e) <= 1e-4, f"{label}: relative error {relative_error(a, e):.2e}"


@pytest.mark.parametrize("tier", ["reference", "cpu"])
def test_level_masking(request: pytest.FixtureRequest, tier: str) -> None:
    if tier == "cpu":
        request.getfixturevalue("cpu_tier")
    config = CONFIGS["mixed"]
    positions, table = random_inputs(config, 500, seed=3)
    F, active = config.n_features_per_level, 3
    full = run_with_grads(positions, table, config, tier)
    masked = run_with_grads(positions, table, config, tier, active_levels=active)
    y, grad_table, grad_x = masked
    assert torch.all(y[:, active * F :] == 0)
    assert torch.equal(y[:, : active * F], full[0][:, : active * F])
    cut = level_offsets(config)[active]
    assert torch.all(grad_table[cut:] == 0) and grad_table[:cut].abs().sum() > 0
    assert torch.equal(grad_table[:cut], full[1][:cut]) or relative_error(grad_table[:cut], full[1][:cut]) < 1e-6
    # The position gradient now only sees the active levels: compare with an encoder of just those.
    coarse = HashGridConfig(
        n_levels=active, n_features_per_level=F, log2_hashmap_size=config.log2_hashmap_size,
        base_resolution=config.base_resolution, per_level_scale=config.per_level_scale,
    )
    x = positions.clone().requires_grad_(True)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (hashgrid_encode(x, table[:cut], coarse, tier=tier) * cotangent[:, : active * F]).sum().backward()
    assert relative_error(grad_x, x.grad) < 1e-6
    assert run_with_grads(positions, table, config, tier, active_levels=0)[2].abs().sum() == 0


def test_module_masking_and_init() -> None:
    encoder = HashGridEncoding(CONFIGS["mixed"], tier="reference")
    assert encoder.table.shape == (CONFIGS["mixed"].n_params, 2)
    assert encoder.table.abs().max() <= 1e-4 and encoder.table.std() > 1e-5
    assert encoder.active_levels == 8
    encoder.max_level = 2
    assert encoder.active_levels == 2
    y = encoder(torch.rand(4, 5, 3))
    assert y.shape == (4, 5, 16) and torch.all(y[..., 4:] == 0) and torch.any(y[..., :4] != 0)
    y.sum().backward()
    assert torch.all(encoder.table.grad[level_offsets(CONFIGS["mixed"])[2] :] == 0)
    with pytest.raises(ValueError):
        encoder.active_levels = 9


@pytest.mark.parametrize("name", ["threestudio-small-T", "4d-mixed"])
def test_cpu_is_deterministic(cpu_tier: None, name: str) -> None:
    config = CONFIGS[name]  # 4096 / 2048 rows per level: many points share every entry
    positions, table = random_inputs(config, 20000, seed=4)
    first = run_with_grads(positions, table, config, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the summation order does not depend on the thread count either
        second = run_with_grads(positions, table, config, "cpu")
    finally:
        torch.set_num_threads(threads)
    third = run_with_grads(positions, table, config, "cpu")
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_cpu_baseline_build_matches_avx2_bit_for_bit(cpu_tier: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # The block loops are compiled for baseline x86-64 and for AVX2 (picked where the CPU has it):
    # the same IEEE operations in the same order, so not a single bit may differ. N = 1003 leaves
    # a partial block at the end of every chunk.
    for name in ("mixed", "f3-runtime", "4d-mixed", "4d-f3-runtime"):
        config = CONFIGS[name]
        positions, table = random_inputs(config, 1003, seed=11)
        default = run_with_grads(positions, table, config, "cpu")
        monkeypatch.setenv("LIFT3D_KERNELS_NO_AVX2", "1")
        baseline = run_with_grads(positions, table, config, "cpu")
        monkeypatch.delenv("LIFT3D_KERNELS_NO_AVX2")
        for label, a, b in zip(("features", "grad_table", "grad_positions"), default, baseline):
            assert torch.equal(a, b), f"{name}: {label}"


def test_cpu_recycled_outputs_are_exact(cpu_tier: None) -> None:
    """Outputs of 2 MB and more reuse the memory of freed ones (cpu_output_pool.h): a recycled,
    dirty table gradient must still be zero on the masked levels, and live outputs never share memory."""
    config = HashGridConfig(n_levels=6, n_features_per_level=2, log2_hashmap_size=17, base_resolution=32)
    N = 50000
    assert min(config.n_params, N * config.n_levels) * 2 * 4 >= 2 << 20  # table gradient and features come from the pool
    positions, table = random_inputs(config, N, seed=12)
    expected = run_with_grads(positions, table, config, "reference", active_levels=2)
    for _ in range(2):  # all levels first, so the memory handed out next holds gradients everywhere
        full = run_with_grads(positions, table, config, "cpu")
        del full
        masked = run_with_grads(positions, table, config, "cpu", active_levels=2)
        for label, a, e in zip(("features", "grad_table", "grad_positions"), masked, expected):
            assert relative_error(a, e) <= 1e-4, label
        assert torch.all(masked[1][level_offsets(config)[2] :] == 0)
    for count in (46000, 50000, 41000):  # a little smaller: served by the larger freed buffers
        subset = positions[:count]
        got = run_with_grads(subset, table, config, "cpu", active_levels=2)
        want = run_with_grads(subset, table, config, "reference", active_levels=2)
        for label, a, e in zip(("features", "grad_table", "grad_positions"), got, want):
            assert a.shape == e.shape and relative_error(a, e) <= 1e-4, f"{count}: {label}"
    first = hashgrid_encode(positions, table, config, tier="cpu")
    second = hashgrid_encode(positions, table, config, tier="cpu")
    assert first.data_ptr() != second.data_ptr() and torch.equal(first, second)
    first.fill_(0.0)
    assert torch.equal(second, hashgrid_encode(positions, table, config, tier="cpu"))


@pytest.mark.parametrize("name", ["mixed", "4d-mixed"])
@pytest.mark.parametrize("tier", ["reference", "cpu"])
def test_empty_input(request: pytest.FixtureRequest, tier: str, name: str) -> None:
    if tier == "cpu":
        request.getfixturevalue("cpu_tier")
    config = CONFIGS[name]
    D = config.n_input_dims
    _, table = random_inputs(config, 1, seed=5)
    y, grad_table, grad_x = run_with_grads(torch.zeros(0, D), table, config, tier)
    assert y.shape == (0, config.output_dim) and grad_x.shape == (0, D)
    assert torch.all(grad_table == 0)


def test_cpu_analytic_normals_and_nan(cpu_tier: None) -> None:
    """Gradient w.r.t. positions alone (no table grad), and NaN positions behave like 0 in both tiers."""
    config = CONFIGS["mixed"]
    positions, table = random_inputs(config, 200, seed=6)
    positions[0] = float("nan")
    normals = []
    for tier in ("reference", "cpu"):
        x = positions.clone().requires_grad_(True)
        density = hashgrid_encode(x, table, config, tier=tier).sum(-1)
        (grad,) = torch.autograd.grad(density.sum(), x)
        normals.append(grad)
        assert torch.all(grad[0] == 0) and torch.isfinite(density).all()
    assert relative_error(normals[1], normals[0]) <= 1e-4


def test_cpu_rejects_float64(cpu_tier: None) -> None:
    positions, table = random_inputs(TINY, 4, seed=0, dtype=torch.float64)
    with pytest.raises(TypeError):
        hashgrid_encode(positions, table, TINY, tier="cpu")


def test_default_tier_runs() -> None:
    config = CONFIGS["mixed"]
    positions, table = random_inputs(config, 100, seed=8)
    y = hashgrid_encode(positions, table, config)
    assert relative_error(y, hashgrid_encode(positions, table, config, tier="reference")) <= 1e-4


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        hashgrid_encode(torch.rand(4, 2), torch.zeros(TINY.n_params, 2), TINY, tier="reference")
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        hashgrid_encode(torch.rand(4, 3), torch.zeros(TINY4.n_params, 2), TINY4, tier="reference")
    with pytest.raises(ValueError, match="n_input_dims"):
        HashGridConfig(n_input_dims=2)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        HashGridEncoding(TINY4, tier="reference")(torch.rand(5, 3))
    with pytest.raises(ValueError):
        hashgrid_encode(torch.rand(4, 3), torch.zeros(7, 2), TINY, tier="reference")
    with pytest.raises(ValueError):
        hashgrid_encode(torch.rand(4, 3), torch.zeros(TINY.n_params, 2), TINY, tier="reference", active_levels=3)
    with pytest.raises(ValueError):
        HashGridConfig(log2_hashmap_size=31)
