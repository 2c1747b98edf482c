"""Hash-grid encoding benchmark: forward + backward of every live tier on identical inputs.

Sizes are ``N:L:F:log2T`` (points, levels, features per level, log2 of the per-level table size),
with an optional ``:x`` suffix that also differentiates with respect to the positions (analytic
normals); otherwise only the table gets a gradient (plain NeRF training). Points are uniform in
the unit cube (no spatial coherence: the worst case for the table's caches), the table is tcnn's
init and the upstream gradient is standard normal, handed to autograd as ``grad_outputs`` (so
the timed region is the encoding's forward and backward and nothing else). Timings are the median
of ``--repeats`` runs after one warm-up.

The ``hashgrid4d`` case is the space-time grid (``n_input_dims = 4``, 16 corners per level, the
dynamic NeRF's): points uniform in [0, 1]^4, resolutions from 4 to 128 in space and time alike.

    python benchmarks/bench_hashgrid.py                    # default sizes, writes benchmarks/results/hashgrid.json
    python benchmarks/bench_hashgrid.py --sizes 65536:16:2:19 --repeats 3
    python benchmarks/bench_hashgrid.py --cases hashgrid4d --sizes 65536:16:2:17 --repeats 3

``cases()`` returns the ``Case`` entries for ``benchmarks/kernels.py``, whose helpers this uses.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks/kernels.py
try:
    import lift3d  # noqa: F401
except ImportError:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import REFERENCE, Case, Result, compare_tiers, native_tiers, run_cli  # noqa: E402

from lift3d.kernels._backend import tier_available  # noqa: E402
from lift3d.kernels.hashgrid import FORWARD_OP, INIT_RANGE, HashGridConfig, hashgrid_encode, level_is_hashed  # noqa: E402

logger = logging.getLogger("benchmarks.hashgrid")

DEFAULT_SIZES = [
    "4096:16:2:19",
    "65536:16:2:19",
    "262144:16:2:19",  # the target: threestudio's grid at a NeRF training batch
    "262144:16:2:19:x",
    "262144:16:2:14",
]
DEFAULT_4D_SIZES = ["65536:16:2:17", "262144:16:2:17"]


def parse_size(size: str, dims: int = 3) -> tuple[int, HashGridConfig, bool]:
    """``N:L:F:log2T[:x]`` -> (N, config, position grads): threestudio's base 16 and max resolution
    4096 for 3-D inputs, base 4 and max 128 for 4-D (space-time) ones."""
    parts = size.split(":")
    if len(parts) not in (4, 5) or (len(parts) == 5 and parts[4] != "x"):
        raise ValueError(f"hash-grid size must be N:L:F:log2T[:x], got {size!r}")
    count, levels, features, log2_size = (int(p) for p in parts[:4])
    # Keep the finest resolution fixed whatever L is, as threestudio's configs do.
    base, finest = (16, 4096) if dims == 3 else (4, 128)
    per_level_scale = (finest / base) ** (1 / (levels - 1)) if levels > 1 else 1.0
    config = HashGridConfig(
        n_levels=levels, n_features_per_level=features, log2_hashmap_size=log2_size, base_resolution=base,
        per_level_scale=per_level_scale, n_input_dims=dims,
    )
    return count, config, len(parts) == 5


def bench_hashgrid(size: str, args: argparse.Namespace, dims: int = 3) -> list[Result]:
    """Forward + backward of ``hashgrid_encode`` (see the module docstring for the size format)."""
    count, config, position_grads = parse_size(size, dims)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    positions = torch.rand(count, dims, generator=g).to(device)
    table = torch.empty(config.n_params, config.n_features_per_level).uniform_(-INIT_RANGE, INIT_RANGE, generator=g).to(device)
    upstream = torch.randn(count, config.output_dim, generator=g).to(device)

    def make_run(tier: str) -> Callable[[], list[Tensor]]:
        # Leaves are made once, so the 50 MB table is not copied inside the timed region.
        leaves = [table.clone().requires_grad_(True)]
        x = positions.clone().requires_grad_(position_grads)
        if position_grads:
            leaves.append(x)

        def run() -> list[Tensor]:
            features = hashgrid_encode(x, leaves[0], config, tier=tier)
            # The upstream gradient goes in as grad_outputs, so what is timed is the encoding's
            # forward and backward, not a [N, L*F] product and sum around it.
            grads = torch.autograd.grad(features, leaves, grad_outputs=upstream)
            return [features.detach(), *grads]

        return run

    tiers = [REFERENCE] + [t for t in native_tiers(device) if tier_available(t, FORWARD_OP)]
    notes: dict[str, float | int | str] = {
        "points": count,
        "levels": config.n_levels,
        "dense_levels": sum(not h for h in level_is_hashed(config)),
        "table_rows": config.n_params,
        "position_grads": int(position_grads),
        "threads": torch.get_num_threads(),
    }
    return compare_tiers("hashgrid" if dims == 3 else "hashgrid4d", size, tiers, make_run, args.repeats, device, notes, args.clock)


def bench_hashgrid4d(size: str, args: argparse.Namespace) -> list[Result]:
    """The space-time (4-D input) hash grid, same size format."""
    return bench_hashgrid(size, args, dims=4)


def cases() -> list[Case]:
    """The hash-grid benchmark cases (3-D and 4-D inputs) for ``benchmarks/kernels.py``'s ``CASES``."""
    return [
        Case("hashgrid", bench_hashgrid, list(DEFAULT_SIZES)),
        Case("hashgrid4d", bench_hashgrid4d, list(DEFAULT_4D_SIZES)),
    ]


def main(argv: list[str] | None = None) -> list[Result]:
    return run_cli(cases(), argv, __doc__, Path("benchmarks/results/hashgrid.json"), repeats_default=3)


if __name__ == "__main__":
    main()
