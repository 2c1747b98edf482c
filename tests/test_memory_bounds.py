"""Renders outside training are memory-bounded: peak resident memory of one 256x256 turntable frame
does not depend on how much of the scene is occupied.

Each case runs in a fresh interpreter, so ``ru_maxrss`` (the process's high-water mark) measures
that case alone: the resident memory before the render is subtracted from the peak after it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import require_cpu_ops

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import json, resource, sys, tempfile, torch
    from lift3d.cameras import TurntableConfig, turntable
    from lift3d.config import load_config
    from lift3d.train import Trainer

    config, kind, views, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    trainer = Trainer(load_config(config, overrides), run_dir=tempfile.mkdtemp())
    representation = trainer.representation
    if kind == "nerf":
        state = float(representation.grid.occupancy.float().mean())  # every cell occupied: never updated
    else:
        with torch.no_grad():  # every Gaussian large and half opaque: many tiles each
            representation.log_scales.fill_(float(torch.log(torch.tensor(0.3))))
            representation.opacity_logits.fill_(0.0)
        state = representation.num_gaussians
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    image = trainer.render_views(turntable(TurntableConfig(views, width=256, height=256)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"state": state, "before_mib": before / 1024, "peak_mib": peak / 1024,
                      "shape": list(image.shape), "finite": bool(torch.isfinite(image).all())}))
    """
)


def _probe(config: str, kind: str, views: int, overrides: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT / config), kind, str(views), "trainer.steps=0", "trainer.progress_bar=false",
         *overrides],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


NERF_BOUND_MIB = 768
"""Peak growth allowed for one 256x256 frame of a fully occupied NeRF. Chunks of 4096 rays (up to
512 samples each) with 2^17-sample field calls take ~0.45 GiB; all rays in one march ~1.2 GiB even
with chunked field calls; the whole frame in one call (no chunks at all) over 20 GiB."""

GAUSSIAN_BOUND_MIB = 256
"""Peak growth allowed for a strip of eight 256x256 views of ``max_gaussians`` large Gaussians:
one camera per call takes ~0.1 GiB."""


def test_fully_occupied_nerf_frame_stays_under_its_bound() -> None:
    require_cpu_ops("march_rays", "hashgrid_forward")
    # DreamFusion's NeRF (16 levels, T=2^19, 512 samples per ray) before any grid update: the
    # state of a diverged or unconverged run, whose occupancy grid marks every cell.
    measured = _probe("configs/dreamfusion-sd.yaml", "nerf", 1, [
        "prompt=a red sphere", "teacher={type: analytic, resolution: 64}", "guidance={type: sds}",
        "representation.background=solid",
    ])
    assert measured["state"] == 1.0 and measured["shape"] == [1, 256, 256, 3] and measured["finite"]
    growth = measured["peak_mib"] - measured["before_mib"]
    assert growth < NERF_BOUND_MIB, measured


def test_gaussian_strip_at_max_gaussians_stays_under_its_bound() -> None:
    require_cpu_ops("gaussian_rasterize_forward")
    measured = _probe("configs/quickstart.yaml", "gaussians", 8, [
        "representation.num_points=50000", "representation.densify.max_gaussians=50000",
        "representation.init_radius=1.2",
    ])
    assert measured["state"] == 50000 and measured["shape"] == [8, 256, 256, 3] and measured["finite"]
    growth = measured["peak_mib"] - measured["before_mib"]
    assert growth < GAUSSIAN_BOUND_MIB, measured
