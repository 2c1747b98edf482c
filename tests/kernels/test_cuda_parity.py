"""cuda tier against the reference tier: every op's outputs and gradients on random inputs at
several sizes, empty and degenerate cases included. Skips without a GPU (DESIGN §3).

The reference runs on the CPU (float32, its definition); the cuda tier runs on the GPU on the
same values. Tolerance: 1e-4 relative (norm of the difference over the norm of the reference).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lift3d.kernels._backend import KernelBuildError, load_cuda_extension, tier_available
from lift3d.kernels.gaussian_raster import FORWARD_OP as RASTER_OP
from lift3d.kernels.gaussian_raster import rasterize_gaussians
from lift3d.kernels.hashgrid import FORWARD_OP as HASHGRID_OP
from lift3d.kernels.hashgrid import HashGridConfig, hashgrid_encode
from lift3d.kernels.raymarch import (
    COMPOSITE_FORWARD_OP,
    MARCH_OP,
    OccupancyGrid,
    OccupancyGridConfig,
    composite,
    march_rays,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOLERANCE = 1e-4
CUDA = torch.device("cuda")


@pytest.fixture(scope="module", autouse=True)
def cuda_tier() -> None:
    try:
        load_cuda_extension()
    except KernelBuildError as error:
        pytest.fail(f"the CUDA kernels do not build on a GPU machine: {error}")
    for op in (RASTER_OP, HASHGRID_OP, MARCH_OP, COMPOSITE_FORWARD_OP):
        assert tier_available("cuda", op), op


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected|| (the plain difference when the reference vanishes)."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    scale = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / scale if scale > 0 else difference


def assert_close(names: list[str], actual: list[Tensor], expected: list[Tensor]) -> None:
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        error = relative_error(a, e)
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e}"


def outputs_and_grads(fn, inputs: list[Tensor], device: torch.device, seed: int) -> list[Tensor]:
    """fn's outputs and the gradients of every input under a fixed random upstream gradient."""
    leaves = [t.detach().to(device).clone().requires_grad_(True) for t in inputs]
    outputs = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=g).to(device) for o in outputs]
    loss = sum((o * u).sum() for o, u in zip(outputs, upstream))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach().cpu() for o in outputs] + [
        torch.zeros_like(leaf).cpu() if grad is None else grad.cpu() for leaf, grad in zip(leaves, grads)
    ]


# --------------------------------------------------------------------------------------------
# Gaussian rasterization
# --------------------------------------------------------------------------------------------

RASTER_NAMES = ["rgb", "alpha", "depth", "d_means2d", "d_conics", "d_colors", "d_opacities", "d_depths"]


def random_scene(seed: int, B: int, N: int, C: int, width: int, height: int) -> list[Tensor]:
    """Screen-space Gaussians with radii bounding their 1/255 footprint (as test_gaussian_raster's):
    partly off-screen means, heavy overlap, opacities at 1 (clamp and early stop), depth ties, culled ones."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    size = torch.tensor([width, height], dtype=torch.float64)
    means2d = (rand(B, N, 2) * 1.3 - 0.15) * size
    sigma = 0.7 + 4.0 * rand(B, N, 2)
    theta = rand(B, N) * math.pi
    cos, sin = torch.cos(theta), torch.sin(theta)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    inverse = torch.linalg.inv(rotation @ torch.diag_embed(sigma**2) @ rotation.transpose(-1, -2))
    conics = torch.stack([inverse[..., 0, 0], inverse[..., 0, 1], inverse[..., 1, 1]], -1)
    radii = torch.ceil(3.33 * sigma.max(-1).values).to(torch.int32)
    radii[rand(B, N) < 0.1] = 0
    opacities = 0.05 + 0.95 * rand(B, N)
    opacities[rand(B, N) < 0.3] = 1.0
    depths = 1.0 + torch.randint(0, 40, (B, N), generator=g).double() / 10
    colors = rand(B, N, C)
    return [t.float().contiguous() for t in (means2d, conics, colors, opacities, depths)] + [radii]


def raster_both(scene: list[Tensor], width: int, height: int, seed: int = 5) -> tuple[list[Tensor], list[Tensor]]:
    radii = scene[5]

    def run(tier: str, device: torch.device):
        return lambda *leaves: rasterize_gaussians(*leaves, radii.to(device), width, height, tier=tier)

    expected = outputs_and_grads(run("reference", torch.device("cpu")), scene[:5], torch.device("cpu"), seed)
    actual = outputs_and_grads(run("cuda", CUDA), scene[:5], CUDA, seed)
    return actual, expected


# C = 3 and 4 use the register path, 1 the smallest, 7 the generic (scratch) path.
@pytest.mark.parametrize(
    "seed,B,N,C,width,height",
    [
        (0, 1, 1, 3, 16, 16),
        (1, 1, 30, 3, 17, 13),
        (2, 2, 200, 4, 40, 33),
        (3, 3, 600, 3, 64, 48),
        (4, 1, 300, 1, 31, 47),
        (5, 2, 300, 7, 33, 20),
        (6, 1, 2000, 3, 100, 70),
    ],
)
def test_rasterize_matches_reference(seed: int, B: int, N: int, C: int, width: int, height: int) -> None:
    actual, expected = raster_both(random_scene(seed, B, N, C, width, height), width, height)
    assert_close(RASTER_NAMES, actual, expected)


def test_rasterize_more_than_one_batch_per_tile() -> None:
    # > 256 Gaussians on one tile: the shared-memory batches and the block-wide early stop.
    width = height = 16
    scene = random_scene(9, 1, 900, 3, width, height)
    scene[3] = scene[3] * 0.1  # faint, so pixels run through several batches before stopping
    actual, expected = raster_both(scene, width, height)
    assert_close(RASTER_NAMES, actual, expected)


@pytest.mark.parametrize("B,N,width,height", [(1, 0, 16, 16), (2, 0, 5, 7), (1, 10, 0, 8), (0, 10, 8, 8)])
def test_rasterize_empty(B: int, N: int, width: int, height: int) -> None:
    actual, expected = raster_both(random_scene(0, B, N, 3, width, height), width, height)
    assert_close(RASTER_NAMES, actual, expected)


def test_rasterize_all_culled_or_off_screen() -> None:
    width, height = 24, 20
    scene = random_scene(3, 2, 50, 3, width, height)
    scene[5] = torch.zeros_like(scene[5])
    scene[5][1] = 3
    scene[0][1] = scene[0][1] + 1000.0  # camera 1: every splat far off the image
    actual, expected = raster_both(scene, width, height)
    assert_close(RASTER_NAMES, actual, expected)
    assert actual[1].abs().max() == 0


def test_rasterize_depth_ties_keep_index_order() -> None:
    # Equal depths (including -0 / +0) on one spot: the blend order is the index order.
    width = height = 8
    scene = random_scene(4, 1, 12, 3, width, height)
    scene[0][:] = torch.tensor([4.0, 4.0])
    scene[4][:] = 0.0
    scene[4][0, ::2] = -0.0
    scene[5][:] = 8
    actual, expected = raster_both(scene, width, height)
    assert_close(RASTER_NAMES, actual, expected)


# --------------------------------------------------------------------------------------------
# hash grid
# --------------------------------------------------------------------------------------------

HASHGRID_CONFIGS = {
    "mixed": HashGridConfig(n_levels=8, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=1.6),
    "all-hashed-f1": HashGridConfig(n_levels=4, n_features_per_level=1, log2_hashmap_size=7, base_resolution=8, per_level_scale=2.0),
    "f4": HashGridConfig(n_levels=5, n_features_per_level=4, log2_hashmap_size=9, base_resolution=3, per_level_scale=1.8),
    "f8": HashGridConfig(n_levels=3, n_features_per_level=8, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0),
    "f3-runtime": HashGridConfig(n_levels=3, n_features_per_level=3, log2_hashmap_size=8, base_resolution=5, per_level_scale=1.5),
    "default": HashGridConfig(log2_hashmap_size=14),
    # Space-time grids (n_input_dims = 4): dense and hashed levels, compile-time and runtime F.
    "4d-mixed": HashGridConfig(
        n_levels=6, n_features_per_level=2, log2_hashmap_size=11, base_resolution=3, per_level_scale=1.6, n_input_dims=4
    ),
    "4d-f1": HashGridConfig(
        n_levels=3, n_features_per_level=1, log2_hashmap_size=8, base_resolution=8, per_level_scale=1.5, n_input_dims=4
    ),
    "4d-f3-runtime": HashGridConfig(
        n_levels=3, n_features_per_level=3, log2_hashmap_size=9, base_resolution=4, per_level_scale=1.5, n_input_dims=4
    ),
}


def hashgrid_inputs(config: HashGridConfig, N: int, seed: int) -> list[Tensor]:
    """Points mostly in the cube (3-D or 4-D), some outside (clamped) and on its faces; a unit-scale table."""
    g = torch.Generator().manual_seed(seed)
    D = config.n_input_dims
    positions = torch.rand(N, D, generator=g, dtype=torch.float64)
    outside = torch.rand(N, D, generator=g, dtype=torch.float64) < 0.05
    positions = torch.where(outside, positions * 1.2 - 0.1, positions)
    positions[: N // 50, 0] = 0.0
    positions[N // 50 : N // 25, 1] = 1.0
    table = torch.randn(config.n_params, config.n_features_per_level, generator=g, dtype=torch.float64)
    return [positions.float(), table.float()]


def hashgrid_both(config: HashGridConfig, inputs: list[Tensor], active: int | None = None) -> tuple[list[Tensor], list[Tensor]]:
    def run(tier: str):
        return lambda x, t: (hashgrid_encode(x, t, config, tier=tier, active_levels=active),)

    expected = outputs_and_grads(run("reference"), inputs, torch.device("cpu"), seed=3)
    actual = outputs_and_grads(run("cuda"), inputs, CUDA, seed=3)
    return actual, expected


@pytest.mark.parametrize("name", sorted(HASHGRID_CONFIGS))
@pytest.mark.parametrize("N", [1, 257, 5000])
def test_hashgrid_matches_reference(name: str, N: int) -> None:
    config = HASHGRID_CONFIGS[name]
    actual, expected = hashgrid_both(config, hashgrid_inputs(config, N, seed=N + len(name)))
    assert_close(["features", "d_positions", "d_table"], actual, expected)


@pytest.mark.parametrize("name", ["mixed", "4d-mixed"])
@pytest.mark.parametrize("active", [0, 1, 5])
def test_hashgrid_active_levels(active: int, name: str) -> None:
    config = HASHGRID_CONFIGS[name]
    actual, expected = hashgrid_both(config, hashgrid_inputs(config, 300, seed=2), active)
    assert_close(["features", "d_positions", "d_table"], actual, expected)


def test_hashgrid_no_points() -> None:
    config = HASHGRID_CONFIGS["mixed"]
    actual, expected = hashgrid_both(config, hashgrid_inputs(config, 0, seed=0))
    assert_close(["features", "d_positions", "d_table"], actual, expected)


# --------------------------------------------------------------------------------------------
# ray marching and compositing
# --------------------------------------------------------------------------------------------

STEP = math.sqrt(3) * 2 / 256


def random_rays(seed: int, R: int, miss_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """Unit rays from radius 3 aimed near the origin; some aimed away (missing the box), some inside it."""
    g = torch.Generator().manual_seed(seed)
    origins = torch.randn(R, 3, generator=g)
    origins = 3 * origins / origins.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    origins[: R // 10] *= 0.2
    dirs = 0.6 * torch.randn(R, 3, generator=g) - origins
    away = torch.rand(R, generator=g) < miss_fraction
    dirs[away] = origins[away]
    return origins, dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def sphere_occupancy(resolution: int, radius: float = 0.6) -> tuple[Tensor, Tensor, int]:
    grid = OccupancyGrid(OccupancyGridConfig(resolution=resolution))
    grid.update(0, lambda x: 50.0 * (x.norm(dim=-1) < radius).float(), STEP)
    return grid.occupancy.clone(), grid.aabb.clone(), resolution


@pytest.mark.parametrize("R", [0, 1, 100, 3000])
@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("max_samples", [1024, 7])
def test_march_matches_reference_exactly(R: int, stratified: bool, max_samples: int) -> None:
    origins, dirs = random_rays(R, R)
    occupancy, aabb, resolution = sphere_occupancy(16)
    jitter = torch.rand(R, generator=torch.Generator().manual_seed(1)) if stratified else None
    kwargs = dict(resolution=resolution, step_size=STEP, max_samples_per_ray=max_samples)
    expected = march_rays(origins, dirs, aabb, occupancy, jitter=jitter, tier="reference", **kwargs)
    actual = march_rays(
        origins.to(CUDA),
        dirs.to(CUDA),
        aabb.to(CUDA),
        occupancy.to(CUDA),
        jitter=None if jitter is None else jitter.to(CUDA),
        tier="cuda",
        **kwargs,
    )
    assert actual.ray_indices.dtype == torch.int64
    assert torch.equal(actual.ray_indices.cpu(), expected.ray_indices)
    assert torch.equal(actual.t_starts.cpu(), expected.t_starts)
    assert torch.equal(actual.t_ends.cpu(), expected.t_ends)


def test_march_all_rays_miss_or_empty_grid() -> None:
    origins, dirs = random_rays(0, 200, miss_fraction=1.0)
    origins[: 200 // 10] *= 5  # the "inside" rays moved out too: every ray misses
    occupancy, aabb, resolution = sphere_occupancy(8)
    samples = march_rays(origins.to(CUDA), dirs.to(CUDA), aabb.to(CUDA), occupancy.to(CUDA), resolution, STEP, tier="cuda")
    assert samples.ray_indices.numel() == 0
    origins, dirs = random_rays(1, 200)
    empty = torch.zeros_like(occupancy)
    samples = march_rays(origins.to(CUDA), dirs.to(CUDA), aabb.to(CUDA), empty.to(CUDA), resolution, STEP, tier="cuda")
    assert samples.ray_indices.numel() == 0 and samples.t_starts.device.type == "cuda"


def composite_case(seed: int, R: int, C: int) -> list[Tensor]:
    """Packed samples (empty rays included), dense enough to terminate early."""
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
    values = torch.rand(S, C, generator=g)
    return [sigmas, values, starts, ends, ray_indices]


def composite_both(case: list[Tensor], R: int) -> tuple[list[Tensor], list[Tensor]]:
    sigmas, values, starts, ends, ray_indices = case

    def run(tier: str, device: torch.device):
        def fn(s: Tensor, v: Tensor):
            out = composite(s, v, starts.to(device), ends.to(device), ray_indices.to(device), R, tier=tier)
            return out.weights, out.accumulated, out.opacity, out.depth

        return fn

    expected = outputs_and_grads(run("reference", torch.device("cpu")), [sigmas, values], torch.device("cpu"), seed=2)
    actual = outputs_and_grads(run("cuda", CUDA), [sigmas, values], CUDA, seed=2)
    return actual, expected


COMPOSITE_NAMES = ["weights", "accumulated", "opacity", "depth", "d_sigmas", "d_values"]


@pytest.mark.parametrize("R,C", [(1, 3), (50, 1), (300, 4), (2000, 3)])
def test_composite_matches_reference(R: int, C: int) -> None:
    case = composite_case(R, R, C)
    actual, expected = composite_both(case, R)
    assert_close(COMPOSITE_NAMES, actual, expected)
    # Same early-termination decisions: zero weights in exactly the same places.
    assert torch.equal(actual[0] == 0, expected[0] == 0)


def test_composite_no_samples() -> None:
    empty = torch.zeros(0)
    case = [empty, torch.zeros(0, 3), empty, empty, torch.zeros(0, dtype=torch.long)]
    actual, expected = composite_both(case, 5)
    assert_close(COMPOSITE_NAMES, actual, expected)
    actual, expected = composite_both(case, 0)
    assert_close(COMPOSITE_NAMES, actual, expected)


def test_composite_rejects_unsorted_rays() -> None:
    sigmas, values, starts, ends, ray_indices = (t.to(CUDA) for t in composite_case(0, 20, 3))
    with pytest.raises(RuntimeError, match="non-decreasing"):
        composite(sigmas, values, starts, ends, ray_indices.flip(0), 20, tier="cuda")
