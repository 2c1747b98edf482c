"""Share of a training step in each stage (camera, render, teacher, guidance, backward, optimizer,
hooks, logging), with the peak RSS of each, for the quickstart presets and one full-size Stable
Diffusion step.

The stages are timed inside the one loop (``Trainer.train_step`` / ``fit``) by swapping a
``lift3d.profiling.StageProfiler`` in for the default no-op profiler; the final evaluation and
export are skipped (they are not part of a step).

    python benchmarks/step_profile.py                           # every quickstart; writes benchmarks/results/profile.json
    python benchmarks/step_profile.py --override trainer.threads=1 --clock cpu   # one thread, CPU time: other jobs do not skew it
    python benchmarks/step_profile.py --runs quickstart-nerf --steps 20 --warmup 5
    python benchmarks/step_profile.py --runs dreamfusion-sd     # one step on the SD 2.1-base architecture, random weights

``dreamfusion-sd`` needs no weights: the UNet, VAE and text encoder are built with random weights
by ``benchmarks/teacher.py``'s ``save_sd21_base`` (the configs of stabilityai/stable-diffusion-2-1-base)
and saved as a local diffusers folder (about 5 GB, under ``--sd-folder``) that ``teacher.model``
then names; CPU float32, 512^2 renders to 64^2 latents.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script, this folder comes first on sys.path, where kernels.py would shadow the
# `kernels` package that transformers imports; siblings are imported by path (_sibling).
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch  # noqa: E402

try:
    import lift3d  # noqa: F401
except ImportError:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lift3d.config import RunConfig, load_config  # noqa: E402
from lift3d.pipeline import load_pipeline  # noqa: E402
from lift3d.profiling import StageProfiler  # noqa: E402
from lift3d.train import Trainer  # noqa: E402

logger = logging.getLogger("benchmarks.profile")

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.progress_bar=false", "trainer.checkpoint_every=0", "trainer.checkpoint_every_minutes=0"]


@dataclass
class ProfileRun:
    """A preset to profile: its file, the pipeline stage (if a pipeline) and extra overrides."""

    name: str
    config: str
    stage: str | None = None
    overrides: tuple[str, ...] = ()
    note: str = ""


RUNS = {
    "quickstart": ProfileRun("quickstart", "configs/quickstart.yaml"),
    "quickstart-nerf": ProfileRun("quickstart-nerf", "configs/quickstart-nerf.yaml", note="64 px (the first 450 steps)"),
    "quickstart-nerf-128": ProfileRun(
        "quickstart-nerf-128", "configs/quickstart-nerf.yaml",
        overrides=("trainer.cameras.width=128", "trainer.cameras.height=128", "trainer.resolution_milestones=[]"),
        note="128 px (the last 450 steps)",
    ),
    "quickstart-mesh": ProfileRun(
        "quickstart-mesh", "configs/quickstart-mesh.yaml", stage="mesh",
        note="the DMTet stage, started from its default shape instead of the NeRF",
    ),
    "quickstart-pbr": ProfileRun(
        "quickstart-pbr", "configs/quickstart-pbr.yaml", note="from its default icosphere instead of a NeRF run",
    ),
    "quickstart-4d": ProfileRun("quickstart-4d", "configs/quickstart-4d.yaml"),
    "quickstart-4d-image": ProfileRun("quickstart-4d-image", "configs/quickstart-4d-image.yaml"),
    "quickstart-4d-nerf": ProfileRun(
        "quickstart-4d-nerf", "configs/quickstart-4d-nerf.yaml", stage="dynamic",
        note="the dynamic stage, started from its default field instead of the static NeRF",
    ),
    "dreamfusion-sd": ProfileRun(
        "dreamfusion-sd", "configs/dreamfusion-sd.yaml", note="SD 2.1-base architecture, random weights, CPU float32",
    ),
}


# ------------------------------------------------------------------------------ the SD folder


def _sibling(name: str) -> Any:
    """Import ``benchmarks/<name>.py`` by path (this folder is off ``sys.path``, see above)."""
    module_name = f"lift3d_benchmarks_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, Path(__file__).resolve().parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def build_sd21_folder(folder: Path, seed: int = 0) -> Path:
    """A diffusers SD folder with the 2.1-base architecture and random weights (kept if already built):
    ``benchmarks/teacher.py``'s ``save_sd21_base``, the one writer of that folder."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    start = time.perf_counter()
    _sibling("teacher").save_sd21_base(folder, seed)
    done.write_text("")
    logger.info("built the SD 2.1-base-architecture folder %s in %.0f s", folder, time.perf_counter() - start)
    return folder


# ------------------------------------------------------------------------------ profiling


def run_config(run: ProfileRun, steps: int, extra: list[str]) -> RunConfig:
    overrides = [*run.overrides, f"trainer.steps={steps}", *QUIET, *extra]
    path = ROOT / run.config
    if run.stage is None:
        return load_config(path, overrides)
    stages = {stage.name: stage for stage in load_pipeline(path, [f"{run.stage}.{o}" for o in overrides]).stages}
    config = stages[run.stage].config
    assert config is not None
    return config


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def profile(run: ProfileRun, steps: int, warmup: int, extra: list[str], clock: str = "wall") -> dict[str, Any]:
    """Stage shares over ``steps`` recorded steps after ``warmup`` unrecorded ones (``clock``: a key of CLOCKS)."""
    config = run_config(run, steps + warmup, extra)
    with tempfile.TemporaryDirectory(prefix=f"lift3d-profile-{run.name}-") as tmp:
        start = time.perf_counter()
        trainer = Trainer(config, run_dir=Path(tmp) / "run")
        setup_s = time.perf_counter() - start
        profiler = StageProfiler(skip_steps=warmup, clock=CLOCKS[clock])
        profiler.attach(trainer)
        trainer.finish = lambda: {}  # type: ignore[method-assign]  # evaluation/export are not a step
        start = time.perf_counter()
        trainer.fit()
        loop_s = time.perf_counter() - start
    summary = profiler.summary()
    summary.update(name=run.name, config=run.config, stage=run.stage, note=run.note, warmup=warmup,
                   setup_s=setup_s, loop_s=loop_s, overrides=list(run.overrides) + extra, clock=clock,
                   date=datetime.date.today().isoformat(), load_average=[round(v, 2) for v in os.getloadavg()])
    return summary


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['name']}: {result['steps']} steps, median step {result['step_ms_median']:.1f} ms, "
             f"peak RSS {result['peak_rss_mib']:.0f} MiB",
             f"{'stage':<10} {'ms/step':>10} {'share':>7} {'peak RSS MiB':>13}"]
    for row in result["stages"]:
        lines.append(f"{row['stage']:<10} {row['ms_per_step']:>10.1f} {100 * row['share']:>6.1f}% {row['peak_rss_mib']:>13.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(name for name in RUNS if name.startswith("quickstart")),
                        help=f"comma-separated, of: {', '.join(RUNS)} (default: every quickstart)")
    parser.add_argument("--steps", type=int, default=20, help="recorded steps per run (dreamfusion-sd: --sd-steps)")
    parser.add_argument("--warmup", type=int, default=5, help="unrecorded steps first (dreamfusion-sd: none)")
    parser.add_argument("--sd-steps", type=int, default=1, help="recorded steps of dreamfusion-sd")
    parser.add_argument("--sd-folder", type=Path, default=Path(tempfile.gettempdir()) / "lift3d-sd21-base-random",
                        help="where the random-weight SD 2.1-base-architecture folder is built (and reused)")
    parser.add_argument("--override", action="append", default=[], help="extra override for every run (repeatable)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall: elapsed time; cpu: CPU time of the process (with trainer.threads=1, robust to other jobs)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/profile.json"))
    args = parser.parse_args(argv)
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    results = []
    for name in names:
        run = RUNS[name]
        if name == "dreamfusion-sd":
            folder = build_sd21_folder(args.sd_folder)
            result = profile(run, args.sd_steps, 0, [f"teacher.model={folder}", "trainer.device=cpu", *args.override],
                             args.clock)
        else:
            result = profile(run, args.steps, args.warmup, args.override, args.clock)
        print(format_table(result), flush=True)
        results.append(result)
    machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    merged = {r["name"]: r for r in previous.get("results", [])}  # keep runs measured separately
    merged.update({r["name"]: r for r in results})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "results": list(merged.values())}, indent=2) + "\n")
    logger.info("wrote %s", args.json)
    return results


if __name__ == "__main__":
    main()
