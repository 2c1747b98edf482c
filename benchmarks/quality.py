"""Quality on ground truth: run a config over analytic prompts; print PSNR (held-out views),
wall time per prompt, and write JSON.

    python benchmarks/quality.py --config configs/quickstart.yaml --prompts prompts/analytic-5.txt
    python benchmarks/quality.py --config configs/quickstart-mesh.yaml mesh.export.formats=[glb]   # a pipeline
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from lift3d.config import load_config
from lift3d.pipeline import is_pipeline, run_pipeline
from lift3d.prompts import read_prompt_file, slugify
from lift3d.train import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--prompts", default="prompts/analytic-5.txt")
    parser.add_argument("--json", default="benchmarks/results/quality.json")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for prompt in read_prompt_file(args.prompts):
            # No media exports (they cost time and say nothing); a mesh export stays if asked for.
            defaults = ["trainer.progress_bar=false", "export.formats=[]"]
            overrides = [*defaults, *args.overrides]
            run_dir = Path(scratch) / slugify(prompt)
            start = time.perf_counter()
            if is_pipeline(args.config):  # every stage; the last one's metrics
                result = run_pipeline(args.config, overrides, prompt=prompt, out=str(run_dir))
            else:
                result = Trainer(load_config(args.config, overrides, prompt=prompt), run_dir=run_dir).fit()
            seconds = time.perf_counter() - start
            rows.append({"prompt": prompt, "seconds": round(seconds, 1), **{k: round(v, 5) for k, v in result.metrics.items()}})
            chamfer = result.metrics.get("eval/chamfer")
            sys.stdout.write(
                f"{prompt:40s} psnr {result.metrics.get('eval/psnr', float('nan')):6.2f} dB  "
                + (f"chamfer {chamfer:.4f}  " if chamfer is not None else "")
                + f"{seconds:6.1f} s\n"
            )
            sys.stdout.flush()

    psnrs = [r["eval/psnr"] for r in rows if "eval/psnr" in r]
    chamfers = [r["eval/chamfer"] for r in rows if "eval/chamfer" in r]
    summary = {
        "config": args.config,
        "overrides": args.overrides,
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "mean_psnr": round(statistics.mean(psnrs), 3) if psnrs else None,
        "mean_chamfer": round(statistics.mean(chamfers), 5) if chamfers else None,
        "mean_seconds": round(statistics.mean(r["seconds"] for r in rows), 1),
        "rows": rows,
    }
    mean_chamfer = f"chamfer {summary['mean_chamfer']:.4f}  " if chamfers else ""
    sys.stdout.write(f"{'mean':40s} psnr {summary['mean_psnr']:6.2f} dB  {mean_chamfer}{summary['mean_seconds']:6.1f} s\n")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
