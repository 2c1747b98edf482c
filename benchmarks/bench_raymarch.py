"""Ray-marching benchmarks: occupancy-grid marching and march + composite (forward + backward),
every live tier on identical inputs, with the agreement against the reference.

Scene: an orbit camera at distance 3 (fov 40 deg) looking at a ball of radius 0.7 inside the box
[-1, 1]^3; a 32^3 occupancy grid updated from that ball; ``step = 2 sqrt(3) / N`` (threestudio's
rule, N samples across the box diagonal). Sizes are ``WxH:N`` (W*H rays).

    python benchmarks/bench_raymarch.py                    # writes benchmarks/results/raymarch.json
    python benchmarks/bench_raymarch.py --sizes 64x64:512 --repeats 3

``cases()`` returns the cases in ``benchmarks/kernels.py``'s ``Case`` form, for folding in there.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

try:
    import lift3d  # noqa: F401
except ImportError:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the shared helpers in kernels.py

from kernels import REFERENCE, Case, Result, compare_tiers, native_tiers, run_cli  # noqa: E402

from lift3d.cameras import orbit_cameras  # noqa: E402
from lift3d.kernels._backend import tier_available  # noqa: E402
from lift3d.kernels.raymarch import (  # noqa: E402
    COMPOSITE_FORWARD_OP,
    MARCH_OP,
    OccupancyGrid,
    OccupancyGridConfig,
    composite,
    march_rays,
)

logger = logging.getLogger("benchmarks.raymarch")

BALL_RADIUS = 0.7
GRID_RESOLUTION = 32
DEFAULT_SIZES = ["32x32:256", "64x64:512", "128x128:512"]


def parse_size(size: str) -> tuple[int, int, int]:
    """``WxH:N`` -> (W, H, N)."""
    resolution, samples = size.split(":")
    width, height = (int(v) for v in resolution.lower().split("x"))
    return width, height, int(samples)


def ball_density(points: Tensor) -> Tensor:
    """[S] density: 40 inside the ball with a soft edge, ~0 outside."""
    return 40.0 * torch.sigmoid(40.0 * (BALL_RADIUS - points.norm(dim=-1)))


def scene(
    width: int, height: int, samples_per_ray: int, device: torch.device
) -> tuple[Tensor, Tensor, OccupancyGrid, float]:
    """[R, 3] origins and unit directions of one camera, the updated grid and the step size."""
    cameras = orbit_cameras(
        torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([3.0]), torch.tensor([40.0]), width, height
    )
    origins, dirs = cameras.rays()
    step = 2 * math.sqrt(3) / samples_per_ray
    grid = OccupancyGrid(OccupancyGridConfig(resolution=GRID_RESOLUTION))
    torch.manual_seed(0)
    grid.update(0, ball_density, step)
    return origins.reshape(-1, 3).to(device), dirs.reshape(-1, 3).to(device), grid.to(device), step


def live_tiers(device: torch.device, ops: tuple[str, ...]) -> list[str]:
    """The reference plus every native tier that has all of ``ops`` here."""
    return [REFERENCE] + [t for t in native_tiers(device) if all(tier_available(t, op) for op in ops)]


def bench_march(size: str, args: argparse.Namespace) -> list[Result]:
    """``march_rays`` alone (stratified, no gradient); size is ``WxH:N``."""
    width, height, samples_per_ray = parse_size(size)
    device = torch.device(args.device)
    origins, dirs, grid, step = scene(width, height, samples_per_ray, device)
    jitter = torch.rand(origins.shape[0], generator=torch.Generator().manual_seed(1)).to(device)

    def make_run(tier: str) -> Callable[[], list[Tensor]]:
        def run() -> list[Tensor]:
            samples = march_rays(
                origins, dirs, grid.aabb, grid.occupancy, grid.resolution, step,
                jitter=jitter, max_samples_per_ray=samples_per_ray, tier=tier,
            )
            return [samples.ray_indices, samples.t_starts, samples.t_ends]

        return run

    count = make_run(REFERENCE)()[0].numel()
    notes: dict[str, float | int | str] = {
        "rays": origins.shape[0],
        "samples": count,
        "occupied_cells": int(grid.occupancy.sum()),
    }
    return compare_tiers("raymarch_march", size, live_tiers(device, (MARCH_OP,)), make_run, args.repeats, device, notes, args.clock)


def bench_render(size: str, args: argparse.Namespace) -> list[Result]:
    """``march_rays`` + ``composite`` forward and backward; size is ``WxH:N``.

    The ray marcher's cost in a NeRF step, without the field: its outputs (densities and colours
    of the ball at the sample midpoints) are computed once per tier from that tier's samples,
    outside the timing (they cost the same in every tier, and the samples are identical), and the
    upstream gradients of colour, opacity and depth go in as ``grad_outputs``.
    """
    return _bench_render(size, args, with_field=False, case="raymarch_render")


def bench_render_with_field(size: str, args: argparse.Namespace) -> list[Result]:
    """As ``raymarch_render``, with the field evaluated inside the timing and the upstream
    gradients applied through a product and sum (this case's timing before the kernel-only one)."""
    return _bench_render(size, args, with_field=True, case="raymarch_render_field")


def _bench_render(size: str, args: argparse.Namespace, with_field: bool, case: str) -> list[Result]:
    width, height, samples_per_ray = parse_size(size)
    device = torch.device(args.device)
    origins, dirs, grid, step = scene(width, height, samples_per_ray, device)
    R = origins.shape[0]
    jitter = torch.rand(R, generator=torch.Generator().manual_seed(1)).to(device)
    g = torch.Generator().manual_seed(2)
    upstream = [torch.randn(shape, generator=g).to(device) for shape in ((R, 3), (R, 1), (R, 1))]

    def march(tier: str):
        return march_rays(
            origins, dirs, grid.aabb, grid.occupancy, grid.resolution, step,
            jitter=jitter, max_samples_per_ray=samples_per_ray, tier=tier,
        )

    def field(samples) -> tuple[Tensor, Tensor]:
        points = origins[samples.ray_indices] + samples.midpoints().unsqueeze(-1) * dirs[samples.ray_indices]
        return ball_density(points), (0.5 + 0.5 * points).clamp(0, 1)

    def make_run(tier: str) -> Callable[[], list[Tensor]]:
        fixed = field(march(tier))

        def run() -> list[Tensor]:
            samples = march(tier)
            sigmas, rgb = field(samples) if with_field else fixed
            sigmas, rgb = sigmas.detach().requires_grad_(True), rgb.detach().requires_grad_(True)
            out = composite(sigmas, rgb, samples.t_starts, samples.t_ends, samples.ray_indices, R, tier=tier)
            outputs = (out.accumulated, out.opacity, out.depth)
            if with_field:
                loss = sum((o * u).sum() for o, u in zip(outputs, upstream))
                grads = torch.autograd.grad(loss, (sigmas, rgb))
            else:
                grads = torch.autograd.grad(outputs, (sigmas, rgb), upstream)
            return [out.weights.detach(), out.accumulated.detach(), out.opacity.detach(), out.depth.detach(), *grads]

        return run

    probe = make_run(REFERENCE)()
    notes: dict[str, float | int | str] = {
        "rays": R,
        "samples": probe[0].numel(),
        "terminated_samples": int((probe[0] == 0).sum()),
        "mean_opacity": round(float(probe[2].mean()), 4),
    }
    ops = (MARCH_OP, COMPOSITE_FORWARD_OP)
    return compare_tiers(case, size, live_tiers(device, ops), make_run, args.repeats, device, notes, args.clock)


def cases() -> list[Case]:
    """The ray-marching cases with their default sizes (``benchmarks/kernels.py`` form)."""
    return [
        Case("raymarch_march", bench_march, list(DEFAULT_SIZES)),
        Case("raymarch_render", bench_render, list(DEFAULT_SIZES)),
        Case("raymarch_render_field", bench_render_with_field, list(DEFAULT_SIZES)),
    ]


def main(argv: list[str] | None = None) -> list[Result]:
    return run_cli(cases(), argv, __doc__, Path("benchmarks/results/raymarch.json"), repeats_default=3)


if __name__ == "__main__":
    main()
