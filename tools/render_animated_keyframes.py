#!/usr/bin/env python3
"""Render keyframes of an animated GLB (lift3d's glb_animated) side by side with three.js.

    python tools/render_animated_keyframes.py run/export/animated.glb out.png --keyframes 0,4 --size 384
    python tools/render_animated_keyframes.py --synthetic out.png      # a deforming test mesh instead

Each keyframe k is posed by the GLB's own animation (``--animation-time`` of tools/render_glb.py at
``t_k * duration``), so the picture shows what a glTF player shows. ``--synthetic`` writes a
sphere that slides and stretches (the deformation of tests/export/test_animated_export.py) first.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def _viewer():
    spec = importlib.util.spec_from_file_location("lift3d_tools_render_glb", HERE / "render_glb.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def synthetic_glb(path: Path, keyframes: int = 5) -> Path:
    """A two-coloured sphere sliding along +y and stretching along z, as an animated GLB."""
    import torch
    import trimesh

    from lift3d.export.animated import deform_vertices, keyframe_times, write_animated_glb

    mesh = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    vertices, faces = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    colors = np.where(vertices[:, 2:3] > 0, [0.85, 0.25, 0.2], [0.2, 0.35, 0.85])

    def deform(points: torch.Tensor, time: float) -> torch.Tensor:
        moved = points.clone()
        moved[:, 1] += 0.6 * time
        moved[:, 2] *= 1.0 + 0.8 * time
        return moved

    times = keyframe_times(keyframes)
    return write_animated_glb(path, vertices, faces, deform_vertices(deform, vertices, times), times,
                              vertex_colors=colors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("glb", nargs="?", type=Path, help="an animated GLB (omit with --synthetic)")
    parser.add_argument("png", type=Path)
    parser.add_argument("--synthetic", action="store_true", help="render a synthetic deforming sphere")
    parser.add_argument("--keyframes", default="0,-1", help="keyframe indices (negative: from the end)")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--eye", default="2.4,1.4,2.4", help="camera x,y,z in the file (y-up) frame")
    args = parser.parse_args(argv)
    from lift3d.export.animated import read_accessor, read_glb

    scratch = Path(tempfile.mkdtemp(prefix="lift3d-keyframes-"))
    glb = synthetic_glb(scratch / "synthetic.glb") if args.synthetic else args.glb
    if glb is None:
        parser.error("give a GLB or --synthetic")
    tree, binary = read_glb(glb)
    sampler = tree["animations"][0]["samplers"][0]
    seconds = read_accessor(tree, binary, sampler["input"])[:, 0]
    names = tree["meshes"][0].get("extras", {}).get("targetNames", [f"k={k}" for k in range(len(seconds))])
    chosen = [int(k) % len(seconds) for k in args.keyframes.split(",")]
    eye = [float(v) for v in args.eye.split(",")]
    jobs = [{"glb": glb, "png": scratch / f"k{k}.png", "animationTime": float(seconds[k]), "eye": eye,
             "target": [0.0, 0.3, 0.0], "background": [1.0, 1.0, 1.0]} for k in chosen]
    _viewer().render(jobs, args.size, args.size)
    tiles = []
    for job, k in zip(jobs, chosen):
        tile = Image.open(job["png"]).convert("RGB")
        ImageDraw.Draw(tile).text((10, 10), f"three.js, keyframe {k} ({names[k]}, {seconds[k]:.2f} s)", fill=(0, 0, 0))
        tiles.append(np.asarray(tile))
    args.png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(args.png)
    print(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
