"""Ray marching and volume compositing: ray/box hand cases, the occupancy grid, the cpu tier against
the reference (identical samples; composite values and gradients), closed forms, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from conftest import require_cpu_ops

from lift3d.kernels.raymarch import (
    COMPOSITE_FORWARD_OP,
    MARCH_OP,
    OccupancyGrid,
    OccupancyGridConfig,
    RaySamples,
    composite,
    march_rays,
    ray_aabb,
    render_rays,
)

STEP = math.sqrt(3) * 2 / 256  # threestudio's rule for radius 1 and 256 samples per ray


@pytest.fixture(scope="module")
def cpu_tier() -> None:
    require_cpu_ops(MARCH_OP, COMPOSITE_FORWARD_OP)


@pytest.fixture(params=["default", "baseline"])
def march_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The cpu march runs 8 candidates per step with AVX2 where the CPU has it, and by cell
    skipping in the baseline build (``LIFT3D_KERNELS_NO_AVX2=1``): both must be the reference."""
    if request.param == "baseline":
        monkeypatch.setenv("LIFT3D_KERNELS_NO_AVX2", "1")
    return request.param


def random_rays(seed: int, R: int, miss_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """Unit rays from a sphere of radius 3 aimed near the origin; a fraction aimed away (misses),
    and a few starting inside the box."""
    g = torch.Generator().manual_seed(seed)
    origins = torch.randn(R, 3, generator=g)
    origins = 3 * origins / origins.norm(dim=-1, keepdim=True)
    origins[: R // 10] *= 0.2  # inside the box
    targets = 0.6 * torch.randn(R, 3, generator=g)
    dirs = targets - origins
    away = torch.rand(R, generator=g) < miss_fraction
    dirs[away] = origins[away]  # pointing outwards from |o| = 3: misses the box
    return origins, dirs / dirs.norm(dim=-1, keepdim=True)


def sphere_grid(resolution: int = 16, radius: float = 0.6) -> OccupancyGrid:
    """A grid whose occupied cells are those of a ball (about a quarter of the cells)."""
    grid = OccupancyGrid(OccupancyGridConfig(resolution=resolution))
    grid.update(0, lambda x: 50.0 * (x.norm(dim=-1) < radius).float(), STEP)
    return grid


def assert_same_samples(a: RaySamples, b: RaySamples) -> None:
    assert a.ray_indices.dtype == b.ray_indices.dtype == torch.int64
    assert torch.equal(a.ray_indices, b.ray_indices)
    assert torch.equal(a.t_starts, b.t_starts)
    assert torch.equal(a.t_ends, b.t_ends)


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------
# ray / box
# --------------------------------------------------------------------------------------------


def test_ray_aabb_hand_cases() -> None:
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    origins = torch.tensor(
        [
            [-3.0, 0.5, 0.0],  # hit along +x
            [-3.0, 2.0, 0.0],  # parallel to the y slab, outside it: miss
            [0.0, 0.0, 0.0],  # inside
            [3.0, 0.0, 0.0],  # box behind the origin: miss
            [-2.0, -2.0, 0.0],  # diagonal, non-unit direction
        ]
    )
    dirs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [2.0, 2.0, 0.0]])
    t_near, t_far, hit = ray_aabb(origins, dirs, aabb)
    assert hit.tolist() == [True, False, True, False, True]
    torch.testing.assert_close(t_near[[0, 2, 4]], torch.tensor([2.0, -1.0, 0.5]))
    torch.testing.assert_close(t_far[[0, 2, 4]], torch.tensor([4.0, 1.0, 1.5]))
    assert not torch.isnan(t_near[hit]).any() and not torch.isnan(t_far[hit]).any()


# --------------------------------------------------------------------------------------------
# marching
# --------------------------------------------------------------------------------------------


def test_march_reference_semantics() -> None:
    """Uniform steps from the entry, only occupied cells, none for misses, inside [near, far]."""
    grid = sphere_grid()
    origins, dirs = random_rays(0, 256)
    samples = march_rays(origins, dirs, grid.aabb, grid.occupancy, grid.resolution, STEP, tier="reference")
    assert samples.ray_indices.numel() > 1000
    assert bool((samples.ray_indices[1:] >= samples.ray_indices[:-1]).all())
    mids = samples.midpoints()
    points = origins[samples.ray_indices] + mids.unsqueeze(-1) * dirs[samples.ray_indices]
    assert bool(grid.occupied(points).all())
    assert bool((points.norm(dim=-1) < 0.6 + math.sqrt(3) * 2 / 16).all())  # within a cell of the ball

    t_near, _, hit = ray_aabb(origins, dirs, grid.aabb)
    assert not bool(torch.isin(torch.nonzero(~hit).squeeze(-1), samples.ray_indices).any())
    t_min = t_near.clamp(min=0)[samples.ray_indices]
    k = (samples.t_starts - t_min) / STEP
    torch.testing.assert_close(k, k.round(), atol=1e-3, rtol=0)  # on the lattice t_min + k * step
    torch.testing.assert_close(samples.t_ends - samples.t_starts, torch.full_like(k, STEP))

    near, far = 2.6, 3.2
    clipped = march_rays(origins, dirs, grid.aabb, grid.occupancy, grid.resolution, STEP, near, far, tier="reference")
    assert clipped.ray_indices.numel() > 0
    assert bool((clipped.t_starts >= near).all()) and bool((clipped.t_ends <= far).all())


def test_march_full_grid_counts_and_max_samples() -> None:
    """With every cell occupied a ray gets floor(L / step) samples; max_samples keeps the first ones."""
    occupancy = torch.ones(8**3, dtype=torch.bool)
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    origins = torch.tensor([[-2.0, 0.1, 0.2], [0.0, 0.0, 0.0]])
    dirs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    step = 1.0 / 32  # exact in binary: the sample count is exactly L / step
    samples = march_rays(origins, dirs, aabb, occupancy, 8, step, tier="reference")
    assert torch.bincount(samples.ray_indices).tolist() == [64, 32]
    capped = march_rays(origins, dirs, aabb, occupancy, 8, step, max_samples_per_ray=10, tier="reference")
    assert torch.bincount(capped.ray_indices).tolist() == [10, 10]
    torch.testing.assert_close(capped.t_starts[:10], samples.t_starts[:10], rtol=0, atol=0)
    jittered = march_rays(origins, dirs, aabb, occupancy, 8, step, jitter=torch.tensor([0.5, 0.5]), tier="reference")
    assert torch.bincount(jittered.ray_indices).tolist() == [63, 31]  # the last half step does not fit
    assert jittered.t_starts[0].item() == 1.0 + 0.5 * step


@pytest.mark.parametrize("stratified", [False, True])
def test_march_cpu_matches_reference_exactly(cpu_tier: None, march_build: str, stratified: bool) -> None:
    grid = sphere_grid()
    # A partly empty grid with holes inside the ball too.
    holes = torch.rand(grid.occupancy.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    occupancy = grid.occupancy & ~holes
    origins, dirs = random_rays(1, 512)
    jitter = torch.rand(512, generator=torch.Generator().manual_seed(4)) if stratified else None
    args = (origins, dirs, grid.aabb, occupancy, grid.resolution, STEP)
    reference = march_rays(*args, jitter=jitter, tier="reference")
    native = march_rays(*args, jitter=jitter, tier="cpu")
    assert reference.ray_indices.numel() > 1000
    assert_same_samples(native, reference)

    t_near, _, hit = ray_aabb(origins, dirs, grid.aabb)
    assert not bool(torch.isin(torch.nonzero(~hit).squeeze(-1), native.ray_indices).any())

    capped_ref = march_rays(*args, jitter=jitter, max_samples_per_ray=7, tier="reference")
    capped = march_rays(*args, jitter=jitter, max_samples_per_ray=7, tier="cpu")
    assert_same_samples(capped, capped_ref)
    assert int(torch.bincount(capped.ray_indices).max()) == 7

    clipped_ref = march_rays(*args, 2.7, 3.1, jitter=jitter, tier="reference")
    clipped = march_rays(*args, 2.7, 3.1, jitter=jitter, tier="cpu")
    assert_same_samples(clipped, clipped_ref)


@pytest.mark.parametrize("trial", range(6))
def test_march_cpu_cell_skipping_is_exact(cpu_tier: None, march_build: str, trial: int) -> None:
    """The cpu tier skips or keeps whole runs of candidates per cell (baseline build) or evaluates
    them 8 at a time (AVX2); the samples must still be the reference's bit for bit on awkward
    geometry: off-centre boxes, rays starting exactly on cell faces, axis-parallel and nearly
    plane-parallel rays, coarse and fine grids and steps."""
    g = torch.Generator().manual_seed(100 + trial)
    res = [4, 16, 64][trial % 3]
    occupancy = torch.rand(res**3, generator=g) < [0.1, 0.5][trial % 2]
    lo = -0.1 - 2 * torch.rand(3, generator=g)
    hi = lo + 0.1 + 3 * torch.rand(3, generator=g)
    R = 200
    origins = (torch.rand(R, 3, generator=g) - 0.5) * 8
    dirs = lo + (hi - lo) * torch.rand(R, 3, generator=g) - origins  # aimed into the box
    if trial % 3 == 1:  # on cell faces, one axis parallel, marching along x
        origins = lo + torch.randint(res, (R, 3), generator=g) * (hi - lo) / res
        origins[:, 0] -= 3.0
        dirs[:, 1] = 0.0
        dirs[:, 0] = dirs[:, 0].abs() + 1e-3
    elif trial % 3 == 2:  # nearly parallel to planes
        dirs[:, 1] *= 1e-6
        dirs[:, 2] *= 1e-3
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    step = [0.2, 0.01, 0.002][trial % 3] * float((hi - lo).max())
    jitter = torch.rand(R, generator=g) if trial % 2 else None
    args = (origins, dirs, torch.cat([lo, hi]), occupancy, res, step)
    reference = march_rays(*args, jitter=jitter, tier="reference")
    assert reference.ray_indices.numel() > 0
    assert_same_samples(march_rays(*args, jitter=jitter, tier="cpu"), reference)


def test_cpu_ray_segments_match_the_torch_definition(cpu_tier: None) -> None:
    """The cpu tier clips rays to the box and [near, far] in one native pass; t_min and t_max must
    be those of ``_ray_segments`` bit for bit (the march starts from them): random rays, rays from
    inside, on the box faces, axis-parallel, zero, NaN and infinite directions."""
    from lift3d.kernels._backend import native_op
    from lift3d.kernels.raymarch import SEGMENTS_OP, _ray_segments

    g = torch.Generator().manual_seed(9)
    aabb = torch.tensor([-1.0, -0.5, -2.0, 1.0, 1.5, 0.25])
    origins, dirs = random_rays(10, 400)
    origins[:40] = aabb[:3] + (aabb[3:] - aabb[:3]) * torch.randint(0, 2, (40, 3), generator=g)  # box corners
    dirs[40:80, torch.randint(0, 3, (40,), generator=g)] = 0.0  # parallel to a slab
    dirs[80:90] = 0.0
    dirs[90, 1] = float("nan")
    dirs[91, 0] = float("inf")
    dirs[92] = torch.tensor([1e-40, 1.0, 0.0])  # 1 / d overflows
    origins[93] = torch.tensor([1.0, 0.0, 0.0])  # on a face, moving along it
    dirs[93] = torch.tensor([0.0, 1.0, 0.0])
    op = native_op("cpu", SEGMENTS_OP, origins.device)
    for near, far in ((0.0, 1e10), (2.5, 3.0), (-1.0, 0.5)):
        native = op(origins, dirs, aabb, near, far)
        expected = _ray_segments(origins, dirs, aabb, near, far)
        for a, b in zip(native, expected):
            assert torch.equal(a, b)
        assert (native[1] > native[0]).sum() > (100 if near == 0.0 else 5)


def test_march_cpu_edge_cases(cpu_tier: None, march_build: str) -> None:
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    occupancy = torch.ones(4**3, dtype=torch.bool)
    for origins, dirs in [
        (torch.zeros(0, 3), torch.zeros(0, 3)),  # no rays
        # a miss and a zero direction
        (torch.tensor([[-3.0, 2.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])),
    ]:
        for tier in ("reference", "cpu"):
            samples = march_rays(origins, dirs, aabb, occupancy, 4, 0.1, tier=tier)
            assert samples.ray_indices.numel() == 0
    empty = march_rays(torch.tensor([[-3.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]), aabb,
                       torch.zeros(4**3, dtype=torch.bool), 4, 0.1, tier="cpu")
    assert empty.ray_indices.numel() == 0


# --------------------------------------------------------------------------------------------
# compositing
# --------------------------------------------------------------------------------------------


def test_composite_reference_by_hand() -> None:
    sigmas = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    t_starts = torch.tensor([0.0, 0.5, 1.5], dtype=torch.float64)
    t_ends = torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64)
    ray_indices = torch.tensor([1, 1, 1])
    out = composite(sigmas, values, t_starts, t_ends, ray_indices, 2, tier="reference")

    a = [1 - math.exp(-0.25), 1 - math.exp(-2.0), 1 - math.exp(-0.5)]
    T = [1.0, 1 - a[0], (1 - a[0]) * (1 - a[1])]
    w = [T[i] * a[i] for i in range(3)]
    torch.testing.assert_close(out.weights, torch.tensor(w, dtype=torch.float64))
    torch.testing.assert_close(out.opacity, torch.tensor([[0.0], [sum(w)]], dtype=torch.float64))
    rgb = [w[0] + w[2], w[1] + w[2]]
    torch.testing.assert_close(out.accumulated, torch.tensor([[0.0, 0.0], rgb], dtype=torch.float64))
    depth = w[0] * 0.25 + w[1] * 1.0 + w[2] * 1.75
    torch.testing.assert_close(out.depth, torch.tensor([[0.0], [depth]], dtype=torch.float64))
    # T_3 = exp(-2.25) ~ 0.105: a threshold of 0.2 terminates the third sample only.
    cut = composite(sigmas, values, t_starts, t_ends, ray_indices, 2, transmittance_threshold=0.2, tier="reference")
    torch.testing.assert_close(cut.weights, torch.tensor([w[0], w[1], 0.0], dtype=torch.float64))


@pytest.mark.parametrize("tier", ["reference", "cpu"])
def test_constant_slab_opacity(tier: str, request: pytest.FixtureRequest) -> None:
    if tier == "cpu":
        request.getfixturevalue("cpu_tier")
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    origins = torch.tensor([[-2.0, 0.1, 0.3], [-2.0, 5.0, 0.0]])  # the second misses
    dirs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    samples = march_rays(origins, dirs, aabb, torch.ones(8**3, dtype=torch.bool), 8, 1.0 / 64, tier=tier)
    sigma = 0.7
    sigmas = torch.full_like(samples.t_starts, sigma)
    values = torch.ones(samples.t_starts.numel(), 3)
    out = composite(sigmas, values, samples.t_starts, samples.t_ends, samples.ray_indices, 2, tier=tier)
    expected = 1 - math.exp(-sigma * 2.0)
    torch.testing.assert_close(out.opacity, torch.tensor([[expected], [0.0]]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.accumulated, out.opacity.expand(2, 3))
    # Expected depth of a homogeneous slab entered at t = 1: 1 + (1 - (1 + sL) e^{-sL}) / (s (1 - e^{-sL})) * opacity.
    s, L = sigma, 2.0
    mean_depth = 1.0 + (1 - (1 + s * L) * math.exp(-s * L)) / (s * (1 - math.exp(-s * L)))
    torch.testing.assert_close(out.depth[0, 0], torch.tensor(mean_depth * expected), rtol=1e-4, atol=0)


def composite_case(seed: int, R: int = 300) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Random packed samples (empty rays included) with densities high enough to terminate early."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 120, (R,), generator=g)
    counts[::7] = 0
    ray_indices = torch.repeat_interleave(torch.arange(R), counts)
    S = ray_indices.numel()
    deltas = 0.005 + 0.02 * torch.rand(S, generator=g)
    ends = torch.zeros(S)
    for start, count in zip((torch.cumsum(counts, 0) - counts).tolist(), counts.tolist()):
        ends[start : start + count] = 1.0 + torch.cumsum(deltas[start : start + count], 0)
    starts = ends - deltas
    sigmas = 60.0 * torch.rand(S, generator=g) ** 2
    values = torch.rand(S, 4, generator=g)
    return sigmas, values, starts, ends, ray_indices


def test_composite_cpu_matches_reference(cpu_tier: None) -> None:
    sigmas, values, starts, ends, ray_indices = composite_case(0)
    R = int(ray_indices.max()) + 2
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(shape, generator=g) for shape in ((sigmas.numel(),), (R, 4), (R, 1), (R, 1))]
    results = {}
    for tier in ("reference", "cpu"):
        s = sigmas.clone().requires_grad_()
        v = values.clone().requires_grad_()
        out = composite(s, v, starts, ends, ray_indices, R, tier=tier)
        outputs = [out.weights, out.accumulated, out.opacity, out.depth]
        loss = sum((o * c).sum() for o, c in zip(outputs, cotangents))
        loss.backward()
        results[tier] = [o.detach() for o in outputs] + [s.grad, v.grad]
    terminated = (results["reference"][0] == 0) & (sigmas > 0)
    assert terminated.float().mean() > 0.2, "the case must exercise early termination"
    names = ["weights", "accumulated", "opacity", "depth", "d_sigmas", "d_values"]
    for name, native, reference in zip(names, results["cpu"], results["reference"]):
        assert rel_err(native, reference) <= 1e-4, name
    # Identical termination decisions: zero weights in exactly the same places.
    assert torch.equal(results["cpu"][0] == 0, results["reference"][0] == 0)
    # Only some outputs in the loss: the others' gradients reach the native backward as None.
    grads = {}
    for tier in ("reference", "cpu"):
        s = sigmas.clone().requires_grad_()
        v = values.clone().requires_grad_()
        out = composite(s, v, starts, ends, ray_indices, R, tier=tier)
        grads[tier] = torch.autograd.grad((out.accumulated * cotangents[1]).sum() + out.depth.sum(), (s, v))
    for native, reference in zip(grads["cpu"], grads["reference"]):
        assert rel_err(native, reference) <= 1e-4


def test_composite_rejects_unsorted_rays(cpu_tier: None) -> None:
    sigmas, values = torch.ones(3), torch.ones(3, 1)
    t0, t1 = torch.tensor([0.0, 0.1, 0.2]), torch.tensor([0.1, 0.2, 0.3])
    for tier in ("reference", "cpu"):
        with pytest.raises((ValueError, RuntimeError)):
            composite(sigmas, values, t0, t1, torch.tensor([1, 0, 1]), 2, tier=tier)


def test_cpu_tier_is_deterministic(cpu_tier: None) -> None:
    """Bit-identical samples, outputs and gradients across runs and thread counts."""
    grid = sphere_grid()
    origins, dirs = random_rays(2, 256)
    jitter = torch.rand(256, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            samples = march_rays(
                origins, dirs, grid.aabb, grid.occupancy, grid.resolution, STEP, jitter=jitter, tier="cpu"
            )
            S = samples.t_starts.numel()
            sigmas = (30.0 * torch.rand(S, generator=torch.Generator().manual_seed(6))).requires_grad_()
            values = torch.rand(S, 3, generator=torch.Generator().manual_seed(7)).requires_grad_()
            out = composite(sigmas, values, samples.t_starts, samples.t_ends, samples.ray_indices, 256, tier="cpu")
            (out.accumulated.sum() + out.depth.square().sum() + out.weights.square().sum()).backward()
            outputs = [out.weights, out.accumulated, out.depth, sigmas.grad, values.grad]
            runs.append([samples.ray_indices, samples.t_starts, *outputs])
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# occupancy grid and the convenience renderer
# --------------------------------------------------------------------------------------------


def test_occupancy_grid_marks_a_sphere() -> None:
    res, radius = 16, 0.5
    grid = OccupancyGrid(OccupancyGridConfig(resolution=res))
    assert bool(grid.occupancy.all())  # everything counts as occupied before the first update

    def density(x: Tensor) -> Tensor:
        return 100.0 * (x.norm(dim=-1) < radius).float()

    torch.manual_seed(0)
    assert grid.update(0, density, STEP)
    coords = grid.cell_coords(torch.arange(res**3)).float()
    centres = -1.0 + (coords + 0.5) * (2.0 / res)
    distance = centres.norm(dim=-1)
    half_diagonal = math.sqrt(3) / res
    assert bool(grid.occupancy[distance < radius - half_diagonal].all())
    assert not bool(grid.occupancy[distance > radius + half_diagonal].any())
    probes = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.9, 0.9], [2.0, 0.0, 0.0]])
    assert grid.occupied(probes).tolist() == [True, False, False]

    assert not grid.update(5, density, STEP)  # not a multiple of update_every
    grid.eval()
    assert not grid.update(16, density, STEP)  # eval mode never updates
    grid.train()

    # After warm-up: a random subset plus occupied cells; reproducible from the RNG state.
    def after_warmup(seed: int) -> Tensor:
        copy = OccupancyGrid(OccupancyGridConfig(resolution=res))
        copy.load_state_dict(grid.state_dict())
        torch.manual_seed(seed)
        copy.update(512, lambda x: 100.0 * (x.norm(dim=-1) < 0.3).float(), STEP)
        return copy.density_ema

    first, second = after_warmup(1), after_warmup(1)
    assert torch.equal(first, second)
    assert not torch.equal(first, after_warmup(2))
    decayed = (first < grid.density_ema) & (first > 0)
    assert bool(decayed.any())  # cells of the old ball outside the new one decay by ema_decay


def test_render_rays_end_to_end() -> None:
    grid = sphere_grid(radius=0.7)
    origins, dirs = random_rays(3, 64)
    colour = torch.tensor([0.2, 0.5, 0.9], requires_grad=True)

    def field(points: Tensor, view_dirs: Tensor) -> tuple[Tensor, Tensor]:
        sigma = 20.0 * (points.norm(dim=-1) < 0.5).float()
        return sigma, colour.expand(points.shape[0], 3)

    generator = torch.Generator().manual_seed(0)
    out = render_rays(origins, dirs, field, grid, STEP, stratified=True, generator=generator, tier="reference")
    assert out.rgb.shape == (64, 3) and out.opacity.shape == (64, 1) and out.depth.shape == (64, 1)
    assert out.weights.shape == out.samples.t_starts.shape
    opacity = out.opacity.detach()
    assert float(opacity.max()) > 0.9 and float(opacity.min()) == 0.0
    torch.testing.assert_close(out.rgb, out.opacity * colour.detach())
    out.rgb.sum().backward()
    torch.testing.assert_close(colour.grad, out.opacity.detach().sum().expand(3))


@pytest.mark.parametrize("tier", ["reference", "cpu"])
def test_chunked_render_without_gradient_matches_one_call(tier: str) -> None:
    """Chunks of rays (march + composite) and of samples (field calls) change nothing but memory,
    and the field never sees more than ``chunk_samples`` points at once."""
    if tier == "cpu":
        require_cpu_ops("march_rays", "composite_forward")
    grid = sphere_grid(radius=0.7)
    origins, dirs = random_rays(5, 300)
    seen: list[int] = []

    def field(points: Tensor, view_dirs: Tensor) -> tuple[Tensor, Tensor]:
        seen.append(points.shape[0])
        radius = points.norm(dim=-1)
        sigma = 20.0 * (radius < 0.5).float() + 2.0 * points[:, 0].clamp_min(0)
        return sigma, torch.stack([radius, points[:, 2], (points * view_dirs).sum(-1)], dim=-1)

    with torch.no_grad():
        whole = render_rays(origins, dirs, field, grid, STEP, stratified=True,
                            generator=torch.Generator().manual_seed(3), tier=tier)
        seen.clear()
        chunked = render_rays(origins, dirs, field, grid, STEP, stratified=True,
                              generator=torch.Generator().manual_seed(3), tier=tier, chunk_rays=37, chunk_samples=100)
    assert max(seen) <= 100 and len(seen) > 9  # 300 rays / 37 = 9 ray chunks, each split further
    assert chunked.weights is None and chunked.samples is None
    for name in ("rgb", "opacity", "depth"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-5, atol=1e-6)
    assert float(whole.opacity.max()) > 0.9  # the case is not trivially empty


def test_chunking_is_ignored_while_autograd_records() -> None:
    grid = sphere_grid(radius=0.7)
    origins, dirs = random_rays(6, 50)
    colour = torch.tensor([0.2, 0.5, 0.9], requires_grad=True)

    def field(points: Tensor, view_dirs: Tensor) -> tuple[Tensor, Tensor]:
        return 20.0 * (points.norm(dim=-1) < 0.5).float(), colour.expand(points.shape[0], 3)

    out = render_rays(origins, dirs, field, grid, STEP, tier="reference", chunk_rays=7, chunk_samples=5)
    assert out.weights is not None and out.samples is not None  # one call: the graph needs every sample
    out.rgb.sum().backward()
    assert colour.grad is not None


def test_composite_cpu_weights_are_correctly_rounded(cpu_tier: None, march_build: str) -> None:
    """The cpu tier evaluates exp and expm1 in double (4 lanes at a time with AVX2): rounded to
    float, w_1 = 1 - exp(-sd_1) and T_2 = exp(-sd_1) of two-sample rays are the correctly rounded
    values, over optical depths from 1e-7 (expm1's cancellation) to 120 (underflow)."""
    R = 20000
    g = torch.Generator().manual_seed(8)
    sd = torch.exp(torch.empty(R).uniform_(math.log(1e-7), math.log(120.0), generator=g))
    sigmas = torch.stack([sd, torch.rand(R, generator=g)], dim=1).reshape(-1)
    t_starts = torch.stack([torch.zeros(R), torch.ones(R)], dim=1).reshape(-1)
    t_ends = t_starts + 1.0  # delta = 1: sd_i = sigma_i exactly
    ray_indices = torch.arange(R).repeat_interleave(2)
    values = torch.ones(2 * R, 1)
    out = composite(sigmas, values, t_starts, t_ends, ray_indices, R, transmittance_threshold=1e-30, tier="cpu")
    first = sigmas[0::2].double()
    assert torch.equal(out.weights[0::2], (-torch.expm1(-first)).float())
    T = torch.exp(-first).float()
    kept = sigmas[0::2] <= -math.log(1e-30)  # past that depth the second sample is terminated
    alpha = (-torch.expm1(-sigmas[1::2].double())).float()
    assert torch.equal(out.weights[1::2][kept], (T * alpha)[kept])
    assert not out.weights[1::2][~kept].any()
    assert kept.float().mean() > 0.5 and (~kept).any()


def test_composite_cpu_baseline_build_matches_avx2_bit_for_bit(cpu_tier: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # exp/expm1 run 4 lanes at a time with AVX2 and one at a time otherwise: the same double
    # operations in the same order (no FMA), so not a single bit of output or gradient may differ.
    sigmas, values, starts, ends, ray_indices = composite_case(2)
    R = int(ray_indices.max()) + 1
    g = torch.Generator().manual_seed(3)
    cotangents = [torch.randn(shape, generator=g) for shape in ((sigmas.numel(),), (R, 4), (R, 1), (R, 1))]

    def run() -> list[Tensor]:
        s, v = sigmas.clone().requires_grad_(), values.clone().requires_grad_()
        out = composite(s, v, starts, ends, ray_indices, R, tier="cpu")
        outputs = [out.weights, out.accumulated, out.opacity, out.depth]
        return [o.detach() for o in outputs] + list(torch.autograd.grad(outputs, (s, v), cotangents))

    default = run()
    monkeypatch.setenv("LIFT3D_KERNELS_NO_AVX2", "1")
    baseline = run()
    for name, a, b in zip(["weights", "accumulated", "opacity", "depth", "d_sigmas", "d_values"], default, baseline):
        assert torch.equal(a, b), name
