"""Kernel benchmarks: time every live tier of each op on identical inputs and check they agree.

Each benchmark case is a function ``(size, args) -> list[Result]``, registered in ``CASES`` with
its default sizes; add hash-grid or ray-marching cases the same way. Timings are forward +
backward (the training cost), median over ``--repeats`` after one warm-up run.

    python benchmarks/kernels.py                       # default sizes, writes benchmarks/results/kernels.json
    python benchmarks/kernels.py --sizes 64x64:5000 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

try:
    import lift3d  # noqa: F401
except ImportError:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lift3d.cameras import orbit_cameras  # noqa: E402
from lift3d.kernels._backend import tier_available  # noqa: E402
from lift3d.kernels.gaussian_raster import FORWARD_OP, project_gaussians, rasterize_gaussians  # noqa: E402

logger = logging.getLogger("benchmarks.kernels")

ROOT = Path(__file__).resolve().parents[1]

REFERENCE = "reference"


@dataclass
class Result:
    """One (case, size, tier) timing."""

    case: str
    size: str
    tier: str
    median_ms: float
    times_ms: list[float]
    speedup_vs_reference: float | None = None
    max_relative_error: float | None = None
    """Largest ||tier - reference|| / ||reference|| over the outputs and input gradients."""
    notes: dict[str, float | int | str] = field(default_factory=dict)
    peak_rss_mib: float | None = None
    """Peak resident memory of the process while this tier's runs ran (MiB; Linux's VmHWM, reset
    before the tier starts), or its lifetime peak where the mark cannot be reset."""


def reset_peak_rss() -> None:
    """Restart the kernel's RSS high-water mark (Linux >= 4.0; a no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """The process's peak RSS since the last reset, in MiB."""
    from lift3d.profiling import current_peak_rss_bytes

    return current_peak_rss_bytes() / 2**20


def native_tiers(device: torch.device) -> list[str]:
    """The non-reference tiers that can run on ``device``."""
    return ["cuda"] if device.type == "cuda" else ["cpu"]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (the difference itself when the reference is zero)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / scale if scale > 0 else difference


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""``--clock``: ``wall`` (elapsed time) or ``cpu`` (CPU time of the whole process, all threads).
On a machine shared with other jobs, CPU time does not count the waits for a core, so ratios of
``--clock cpu --threads 1`` runs stay comparable where wall-clock ones measure the load."""


def time_runs(run: Callable[[], list[Tensor]], repeats: int, device: torch.device,
              clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], list[Tensor]]:
    """Milliseconds of ``repeats`` calls after one warm-up (by ``clock``), and the last call's tensors."""
    tensors = run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = clock()
        tensors = run()
        synchronize(device)
        times.append(1e3 * (clock() - start))
    return times, tensors


def compare_tiers(
    case: str,
    size: str,
    tiers: list[str],
    make_run: Callable[[str], Callable[[], list[Tensor]]],
    repeats: int,
    device: torch.device,
    notes: dict[str, float | int | str],
    clock: str = "wall",
) -> list[Result]:
    """Time each tier's run (``clock``: a key of ``CLOCKS``), then fill in speed-ups and errors
    against the reference (if it ran)."""
    results: list[Result] = []
    outputs: dict[str, list[Tensor]] = {}
    for tier in tiers:
        logger.info("%s %s: timing tier %s", case, size, tier)
        reset_peak_rss()
        times, outputs[tier] = time_runs(make_run(tier), repeats, device, CLOCKS[clock])
        results.append(Result(case, size, tier, statistics.median(times), times, notes=dict(notes),
                              peak_rss_mib=peak_rss_mib()))
    if REFERENCE in outputs:
        reference_ms = next(r.median_ms for r in results if r.tier == REFERENCE)
        for result in results:
            result.speedup_vs_reference = reference_ms / result.median_ms
            result.max_relative_error = max(
                (relative_error(a, e) for a, e in zip(outputs[result.tier], outputs[REFERENCE])), default=0.0
            )
    return results


# --------------------------------------------------------------------------------------------
# case: Gaussian rasterization
# --------------------------------------------------------------------------------------------


def gaussian_scene(
    count: int, width: int, height: int, device: torch.device, seed: int = 0
) -> tuple[list[Tensor], Tensor]:
    """Gaussians in the unit ball seen by an orbit camera at distance 3 (B = 1, C = 3), projected.

    Returns the five differentiable rasterizer inputs (means2d, conics, colors, opacities, depths)
    and the radii.
    """
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(count, 3, generator=g)
    means = direction / direction.norm(dim=-1, keepdim=True) * torch.rand(count, 1, generator=g) ** (1 / 3)
    scales = torch.exp(torch.empty(count, 3).uniform_(-4.5, -2.5, generator=g))  # 1%-8% of the radius
    quats = torch.randn(count, 4, generator=g)
    opacities = torch.sigmoid(2.0 * torch.randn(1, count, generator=g))
    colors = torch.rand(1, count, 3, generator=g)
    cameras = orbit_cameras(
        torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([3.0]), torch.tensor([40.0]), width, height
    )
    with torch.no_grad():
        projected = project_gaussians(
            means, scales, quats, cameras.world_to_camera(), cameras.intrinsics(), width, height
        )
    inputs = [projected.means2d, projected.conics, colors, opacities, projected.depths]
    return [t.contiguous().to(device) for t in inputs], projected.radii.to(device)


def gaussian_raster_runs(
    inputs: list[Tensor], radii: Tensor, width: int, height: int, cameras: int, channels: int
) -> Callable[[str], Callable[[], list[Tensor]]]:
    """``make_run(tier)`` for ``compare_tiers``: one forward + backward of ``rasterize_gaussians`` on
    ``inputs``, the outputs (features, alpha, depth) weighted by fixed random upstream gradients."""
    g = torch.Generator().manual_seed(1)
    shapes = [(cameras, height, width, channels), (cameras, height, width, 1), (cameras, height, width, 1)]
    upstream = [torch.randn(shape, generator=g).to(inputs[0].device) for shape in shapes]

    def make_run(tier: str) -> Callable[[], list[Tensor]]:
        def run() -> list[Tensor]:
            leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
            outputs = rasterize_gaussians(*leaves, radii, width, height, tier=tier)
            loss = sum((o * u).sum() for o, u in zip(outputs, upstream))
            return [o.detach() for o in outputs] + list(torch.autograd.grad(loss, leaves))

        return run

    return make_run


def bench_gaussian_raster(size: str, args: argparse.Namespace) -> list[Result]:
    """Forward + backward of ``rasterize_gaussians``; size is ``WxH:N``."""
    resolution, count_text = size.split(":")
    width, height = (int(v) for v in resolution.lower().split("x"))
    count = int(count_text)
    device = torch.device(args.device)
    inputs, radii = gaussian_scene(count, width, height, device)
    make_run = gaussian_raster_runs(inputs, radii, width, height, cameras=1, channels=3)
    tiers = [t for t in native_tiers(device) if tier_available(t, FORWARD_OP)]
    # The reference is dense in (pixels x Gaussians); past the budget it would swap, so skip it.
    if width * height * count <= args.max_reference_elements:
        tiers.insert(0, REFERENCE)
    else:
        logger.info(
            "gaussian_raster %s: reference skipped (%d > --max-reference-elements)", size, width * height * count
        )
    notes: dict[str, float | int | str] = {
        "visible_gaussians": int((radii > 0).sum()),
        "mean_radius_px": round(float(radii[radii > 0].float().mean()), 2) if bool((radii > 0).any()) else 0.0,
    }
    return compare_tiers("gaussian_raster", size, tiers, make_run, args.repeats, device, notes, args.clock)


QUICKSTART_CAPTURES = Path(tempfile.gettempdir()) / "lift3d-bench-gaussian-quickstart"
"""Where ``gaussian_raster_quickstart`` keeps the captured rasterizer inputs: one trained run
serves every later call, and two checkouts timed in turn (main against a branch) time the same
inputs."""


def quickstart_raster_inputs(step: int) -> tuple[list[Tensor], Tensor, int, int]:
    """The rasterizer's inputs at training step ``step`` of ``configs/quickstart.yaml`` (4 cameras of
    64x64, 4096 Gaussians at the start, densified and pruned as it trains; one thread), captured from
    a run of ``step + 1`` steps, or loaded from ``QUICKSTART_CAPTURES`` where an earlier call saved them."""
    path = QUICKSTART_CAPTURES / f"step{step:04d}.pt"
    if not path.is_file():
        import lift3d.render.gaussian as gaussian_render
        from lift3d.config import load_config
        from lift3d.train import Trainer

        captured: list[object] = []
        original = gaussian_render.rasterize_gaussians

        def capture(*args: object, **kwargs: object) -> tuple[Tensor, Tensor, Tensor]:
            if torch.is_grad_enabled():
                captured[:] = [a.detach().clone() if isinstance(a, Tensor) else a for a in args[:8]]
            return original(*args, **kwargs)

        config = load_config(str(ROOT / "configs" / "quickstart.yaml"),
                             [f"trainer.steps={step + 1}", "trainer.threads=1", "trainer.progress_bar=false"])
        gaussian_render.rasterize_gaussians = capture  # type: ignore[assignment]
        try:
            with tempfile.TemporaryDirectory(prefix="lift3d-bench-quickstart-") as tmp:
                trainer = Trainer(config, run_dir=Path(tmp) / "run")
                trainer.finish = lambda: {}  # type: ignore[method-assign]  # no evaluation/export
                trainer.fit()
        finally:
            gaussian_render.rasterize_gaussians = original  # type: ignore[assignment]
        QUICKSTART_CAPTURES.mkdir(parents=True, exist_ok=True)
        torch.save(captured, path)
    means2d, conics, colors, opacities, depths, radii, width, height = torch.load(path)
    return [means2d, conics, colors, opacities, depths], radii, int(width), int(height)


def bench_gaussian_raster_quickstart(size: str, args: argparse.Namespace) -> list[Result]:
    """Forward + backward of ``rasterize_gaussians`` on the quickstart's own inputs at training step
    ``size`` (the splat sizes and opacities of a real run, which the synthetic case does not have)."""
    device = torch.device(args.device)
    cpu_inputs, radii, width, height = quickstart_raster_inputs(int(size))
    inputs = [t.contiguous().to(device) for t in cpu_inputs]
    radii = radii.to(device)
    B, N, C = inputs[2].shape
    make_run = gaussian_raster_runs(inputs, radii, width, height, cameras=B, channels=C)
    tiers = [t for t in native_tiers(device) if tier_available(t, FORWARD_OP)]
    if B * width * height * N <= args.max_reference_elements:
        tiers.insert(0, REFERENCE)
    visible = radii > 0
    notes: dict[str, float | int | str] = {
        "cameras": B, "gaussians": N, "visible_gaussians": int(visible.sum()),
        "mean_radius_px": round(float(radii[visible].float().mean()), 2) if bool(visible.any()) else 0.0,
        "mean_opacity": round(float(inputs[3][visible].mean()), 3) if bool(visible.any()) else 0.0,
    }
    return compare_tiers("gaussian_raster_quickstart", size, tiers, make_run, args.repeats, device, notes, args.clock)


@dataclass
class Case:
    """A benchmark case: its runner and the sizes it runs by default."""

    name: str
    run: Callable[[str, argparse.Namespace], list[Result]]
    default_sizes: list[str]


CASES: list[Case] = [
    Case("gaussian_raster", bench_gaussian_raster, ["32x32:1000", "64x64:5000", "128x128:5000", "256x256:50000"]),
    Case("gaussian_raster_quickstart", bench_gaussian_raster_quickstart, ["0", "100", "200", "399"]),
]


def all_cases() -> list[Case]:
    """This file's cases plus those of the per-kernel scripts (imported lazily: they import us)."""
    import bench_hashgrid
    import bench_mesh_raster
    import bench_raymarch

    return [*CASES, *bench_hashgrid.cases(), *bench_raymarch.cases(), *bench_mesh_raster.cases()]


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def format_table(results: list[Result]) -> str:
    """A plain-text table: case, size, tier, median ms, speed-up vs reference, max relative error."""
    header = ("case", "size", "tier", "median ms", "speed-up", "max rel err", "peak RSS MiB")
    rows = [
        (
            r.case,
            r.size,
            r.tier,
            f"{r.median_ms:.2f}",
            "-" if r.speedup_vs_reference is None else f"{r.speedup_vs_reference:.1f}x",
            "-" if r.max_relative_error is None else f"{r.max_relative_error:.1e}",
            "-" if r.peak_rss_mib is None else f"{r.peak_rss_mib:.0f}",
        )
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None, cases: list[Case], description: str | None, json_default: Path,
               repeats_default: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(c.name for c in cases), help="comma-separated case names")
    parser.add_argument(
        "--sizes", default=None, help="comma-separated sizes for every selected case (gaussian_raster: WxH:N)"
    )
    parser.add_argument("--repeats", type=int, default=repeats_default, help="timed runs per tier (after one warm-up)")
    parser.add_argument("--json", type=Path, default=json_default, help="where to write results")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the inputs")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's choice)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall: elapsed time; cpu: CPU time of the process (robust to other jobs on the machine)")
    parser.add_argument(
        "--max-reference-elements", type=float, default=2.1e7,
        help="skip the dense reference tier above this many pixel x Gaussian pairs (its memory grows with it)",
    )
    return parser.parse_args(argv)


def run_cli(cases: list[Case], argv: list[str] | None, description: str | None, json_default: Path,
            repeats_default: int = 5) -> list[Result]:
    """The command line of every kernel benchmark script: select cases and sizes, time, print, save."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv, cases, description, json_default, repeats_default)
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # also the OpenMP thread count of the C++ kernels
    selected = set(args.cases.split(","))
    unknown = selected - {c.name for c in cases}
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(sorted(unknown))}")
    results: list[Result] = []
    for case in cases:
        if case.name not in selected:
            continue
        sizes = args.sizes.split(",") if args.sizes else case.default_sizes
        for size in sizes:
            results.extend(case.run(size, args))
    print(format_table(results))
    write_results(results, args)
    return results


def main(argv: list[str] | None = None) -> list[Result]:
    return run_cli(all_cases(), argv, __doc__, Path("benchmarks/results/kernels.json"))


def write_results(results: list[Result], args: argparse.Namespace) -> None:
    """Save ``results`` with the machine's description, the clock, the command, the date and the
    load average at the end (other jobs on the machine) to ``args.json`` (every kernel benchmark's format)."""
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
    }
    payload = {
        "machine": machine,
        "repeats": args.repeats,
        "clock": args.clock,
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "results": [asdict(r) for r in results],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    logger.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
