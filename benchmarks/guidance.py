"""Guidance objectives on ground truth: every objective x {gaussians, nerf} over analytic prompts.

Two suites, both on the analytic teacher:

- ``quality`` (camera-aware teacher): PSNR on the held-out turntable, Chamfer distance of the
  exported mesh (divided by the ground-truth bounding-box diagonal) and wall time per run.
- ``janus`` (``teacher.camera_aware=false``: the conditional is a mixture over the scene seen from
  canonical azimuths, as a text-to-image model that ignores the camera): the Janus rate, the
  fraction of back views (azimuth 180 +- 30 degrees) whose render is closer in PSNR to the scene's
  FRONT-view ground truth (same camera rotated by 180 degrees) than to its own back-view ground
  truth. The scenes are lit from the front, so a back view that looks lit like the front is the
  Janus face. Run with and without view-dependent prompts (``trainer.view_dependent_prompts``).

    python benchmarks/guidance.py                                  # everything (hours on a CPU)
    python benchmarks/guidance.py --quick --objectives sds,vsd,esd --suites janus
    python benchmarks/guidance.py --objectives asd --representations nerf --steps 400 -- guidance.plus_ratio=0.2

Prints a table and writes JSON (default ``benchmarks/results/guidance.json``).
``--report A.json [B.json ...]`` renders saved results as Markdown tables (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from lift3d import registry
from lift3d.cameras import orbit_cameras
from lift3d.config import load_config
from lift3d.metrics import psnr
from lift3d.prompts import read_prompt_file, slugify
from lift3d.train import Trainer

BASE_CONFIGS = {"gaussians": "configs/quickstart.yaml", "nerf": "configs/quickstart-nerf.yaml"}
"""The quickstart preset of each representation; objectives are swapped in with ``guidance.type``."""

OBJECTIVE_OVERRIDES: dict[str, list[str]] = {}
"""Per-objective overrides applied in every run (the quickstart defaults pass as they are)."""

QUICK = ["trainer.steps=300", "trainer.cameras.width=32", "trainer.cameras.height=32", "teacher.resolution=32",
         "trainer.eval.width=32", "trainer.eval.height=32"]
"""--quick: fewer steps at 32 px (and, unless --num-prompts is given, two prompts)."""
QUICK_REPRESENTATION = {"gaussians": ["representation.num_points=2048"], "nerf": ["representation.mesh_resolution=64"]}

JANUS_OFFSETS_DEG = (-30.0, -15.0, 0.0, 15.0, 30.0)
"""Back views: azimuth 180 plus these offsets."""


def janus_rate(trainer: Trainer) -> tuple[float, float]:
    """(fraction of back views closer to the front ground truth, mean PSNR margin front - back in dB)."""
    eval_cfg = trainer.config.trainer.eval
    n = len(JANUS_OFFSETS_DEG)
    azimuth = 180.0 + torch.tensor(JANUS_OFFSETS_DEG)

    def ring(azimuths: torch.Tensor):
        return orbit_cameras(torch.full((n,), eval_cfg.elevation_deg), azimuths, torch.full((n,), eval_cfg.distance),
                             torch.full((n,), eval_cfg.fovy_deg), eval_cfg.width, eval_cfg.height)

    back = ring(azimuth)
    render = trainer.render_views(back)
    back_truth = trainer.teacher.ground_truth(trainer.prompt_state, back.to(trainer.device)).cpu()
    front_truth = trainer.teacher.ground_truth(trainer.prompt_state, ring(azimuth - 180.0).to(trainer.device)).cpu()
    to_front, to_back = psnr(render, front_truth), psnr(render, back_truth)
    return float((to_front > to_back).float().mean()), float((to_front - to_back).mean())


def run_one(base: str, overrides: list[str], prompt: str, scratch: Path, janus: bool) -> dict:
    """One optimisation; returns its metrics (and the Janus rate for the janus suite)."""
    config = load_config(base, [*overrides, "trainer.progress_bar=false"], prompt=prompt)
    start = time.perf_counter()
    trainer = Trainer(config, run_dir=scratch / f"{slugify(prompt)}-{time.monotonic_ns()}")
    result = trainer.fit()
    row = {"prompt": prompt, "seconds": round(time.perf_counter() - start, 1)}
    row.update({key: round(value, 4) for key, value in result.metrics.items()})
    if janus:
        rate, margin = janus_rate(trainer)
        row.update({"janus_rate": rate, "janus_margin_db": round(margin, 3)})
    return row


def _mean(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if key in row and math.isfinite(row[key])]
    return round(statistics.mean(values), 4) if values else None


def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_report(paths: list[Path]) -> str:
    """Markdown tables of saved benchmark JSON files: one row per (objective, representation, suite)."""
    blocks = []
    for path in paths:
        data = json.loads(path.read_text())
        lines = [
            f"**{path.name}** — {data['date']}, `{data['command']}`, {data['machine']}; "
            f"prompts: {'; '.join(data['prompts'])}",
            "",
            "| objective | representation | suite | mean PSNR (dB) | min PSNR | mean Chamfer | Janus rate | mean s/run |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for entry in data["results"]:
            psnrs = [row["eval/psnr"] for row in entry["rows"] if "eval/psnr" in row]
            lines.append(
                f"| {entry['objective']} | {entry['representation']} | {entry['suite']} "
                f"| {_cell(entry.get('mean_psnr'), 2)} | {_cell(min(psnrs) if psnrs else None, 2)} "
                f"| {_cell(entry.get('mean_chamfer'), 4)} | {_cell(entry.get('janus_rate'), 2)} "
                f"| {_cell(entry.get('mean_seconds'), 0)} |"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", default="", help="comma list (default: every registered guidance)")
    parser.add_argument("--representations", default="gaussians,nerf", help="comma list of gaussians, nerf")
    parser.add_argument("--suites", default="quality,janus", help="comma list of quality, janus")
    parser.add_argument("--prompts", default="prompts/analytic-5.txt")
    parser.add_argument("--num-prompts", type=int, default=0, help="use the first N prompts (0 = all; --quick: 2)")
    parser.add_argument("--steps", type=int, default=0, help="override trainer.steps (0 = the preset's)")
    parser.add_argument("--quick", action="store_true", help="300 steps at 32 px on two prompts")
    parser.add_argument("--json", default="benchmarks/results/guidance.json")
    parser.add_argument("--report", nargs="+", type=Path, metavar="JSON", help="render saved results as Markdown and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (after --)")
    args = parser.parse_args(argv)
    if args.report:
        sys.stdout.write(markdown_report(args.report))
        return 0
    logging.basicConfig(level=logging.WARNING)

    objectives = [o for o in args.objectives.split(",") if o] or registry.choices("guidance")
    representations = [r for r in args.representations.split(",") if r]
    suites = [s for s in args.suites.split(",") if s]
    for name in objectives:
        registry.lookup("guidance", name)  # fail early on a typo
    unknown = [r for r in representations if r not in BASE_CONFIGS]
    unknown += [s for s in suites if s not in ("quality", "janus")]
    if unknown:
        parser.error(f"unknown representation or suite: {', '.join(unknown)}")
    prompts = read_prompt_file(args.prompts)
    count = args.num_prompts or (2 if args.quick else len(prompts))
    prompts = prompts[:count]
    variants = []
    if "quality" in suites:
        variants.append(("quality", ["teacher.camera_aware=true"], False))
    if "janus" in suites:
        variants.append(("janus", ["teacher.camera_aware=false", "trainer.view_dependent_prompts=false"], True))
        variants.append(("janus-vd", ["teacher.camera_aware=false", "trainer.view_dependent_prompts=true"], True))

    results: list[dict] = []
    summary = {
        "date": date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/guidance.py", *argv]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "prompts": prompts,
        "results": results,
    }
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # Written after every run, so an interrupted benchmark keeps what it measured.
        json_path.write_text(json.dumps(summary, indent=2) + "\n")

    sys.stdout.write(f"{'objective':10s} {'repr':9s} {'suite':9s} {'prompt':28s} {'psnr':>6s} {'chamfer':>8s} "
                     f"{'janus':>6s} {'sec':>7s}\n")
    with tempfile.TemporaryDirectory() as scratch:
        for name in objectives:
            for representation in representations:
                for suite, suite_overrides, janus in variants:
                    overrides = [f"guidance.type={name}", *OBJECTIVE_OVERRIDES.get(name, []), *suite_overrides]
                    if args.quick:
                        overrides += QUICK + QUICK_REPRESENTATION[representation]
                    if args.steps:
                        overrides.append(f"trainer.steps={args.steps}")
                    # A mesh is exported (and scored) only where it is the point of the suite.
                    formats = "[obj]" if suite == "quality" else "[]"
                    overrides += [f"export.formats={formats}", "export.texture_size=64", *args.overrides]
                    rows: list[dict] = []
                    results.append({"objective": name, "representation": representation, "suite": suite,
                                    "overrides": overrides, "rows": rows})
                    for prompt in prompts:
                        row = run_one(BASE_CONFIGS[representation], overrides, prompt, Path(scratch), janus)
                        rows.append(row)
                        sys.stdout.write(
                            f"{name:10s} {representation:9s} {suite:9s} {prompt[:28]:28s} "
                            f"{row.get('eval/psnr', float('nan')):6.2f} {row.get('eval/chamfer', float('nan')):8.4f} "
                            f"{row.get('janus_rate', float('nan')):6.2f} {row['seconds']:7.1f}\n"
                        )
                        sys.stdout.flush()
                        results[-1].update({
                            "mean_psnr": _mean(rows, "eval/psnr"), "mean_chamfer": _mean(rows, "eval/chamfer"),
                            "janus_rate": _mean(rows, "janus_rate"), "mean_seconds": _mean(rows, "seconds"),
                        })
                        save()

    sys.stdout.write("\nsummary (means over prompts)\n")
    sys.stdout.write(
        f"{'objective':10s} {'repr':9s} {'psnr':>6s} {'chamfer':>8s} {'janus':>6s} {'janus+vd':>8s} {'sec':>7s}\n"
    )
    for name in objectives:
        for representation in representations:
            by_suite = {
                r["suite"]: r for r in results if r["objective"] == name and r["representation"] == representation
            }
            quality, plain, vd = by_suite.get("quality", {}), by_suite.get("janus", {}), by_suite.get("janus-vd", {})

            def fmt(value: float | None, width: int, digits: int) -> str:
                return f"{value:{width}.{digits}f}" if value is not None else " " * (width - 1) + "-"

            seconds = quality.get("mean_seconds") or plain.get("mean_seconds")
            sys.stdout.write(
                f"{name:10s} {representation:9s} {fmt(quality.get('mean_psnr'), 6, 2)} "
                f"{fmt(quality.get('mean_chamfer'), 8, 4)} {fmt(plain.get('janus_rate'), 6, 2)} "
                f"{fmt(vd.get('janus_rate'), 8, 2)} {fmt(seconds, 7, 1)}\n"
            )
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
