"""The animated GLB in Blender: its glTF importer must turn the morph targets into shape keys and
the weights animation into an action that plays lift3d's deformation at every keyframe time and
blends neighbouring keyframes linearly in between.

Blender runs headless (``tools/blender_animated_check.py``); the test skips where no ``blender``
is on PATH (``.ci/run`` installs Debian's package).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import trimesh

from lift3d.export.animated import deform_vertices, keyframe_times, write_animated_glb
from test_animated_export import Stretch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "blender_animated_check.py"


def _blender_report(glb: Path, out: Path) -> dict:
    blender = shutil.which("blender")
    if blender is None:
        pytest.skip("blender is not installed (Debian: apt-get install blender)")
    # Blender's own Python imports numpy for the glTF importer: lend it this interpreter's.
    environment = {**os.environ, "PYTHONPATH": str(Path(np.__file__).resolve().parents[1])}
    result = subprocess.run(
        [blender, "-b", "--factory-startup", "--python-exit-code", "1", "--python", str(SCRIPT), "--", str(glb), str(out)],
        capture_output=True, text=True, timeout=300, env=environment,
    )
    assert result.returncode == 0 and out.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("interpolation", ["LINEAR", "STEP"])
def test_blender_plays_the_deformation_at_every_keyframe(tmp_path, interpolation):
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    vertices, faces = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    times = keyframe_times(4)
    frames = deform_vertices(Stretch().deform, vertices, times)
    duration = 2.0
    glb = write_animated_glb(tmp_path / "animated.glb", vertices, faces, frames, times, duration=duration,
                             interpolation=interpolation)
    report = _blender_report(glb, tmp_path / "report.json")

    assert report["shape_keys"] == ["Basis", *(f"t={t:.3f}" for t in times)]
    assert report["fcurves"] == len(times)  # one weight curve per shape key
    assert np.allclose(report["keyframe_seconds"], times * duration, atol=1e-3)
    # Blender's world is z up like lift3d's: the glTF y-up mapping must undo itself exactly.
    for played, expected in zip(report["vertices"], frames):
        assert np.abs(np.asarray(played) - expected).max() < 1e-5
    for k, played in enumerate(report["midpoint_vertices"]):
        expected = 0.5 * (frames[k] + frames[k + 1]) if interpolation == "LINEAR" else frames[k]
        assert np.abs(np.asarray(played) - expected).max() < 1e-4, (interpolation, k)
