#!/usr/bin/env python3
"""Render a GLB with a third-party glTF viewer: three.js (GLTFLoader) in headless Chromium.

    python tools/render_glb.py model.glb out.png                      # framed from the +Z front
    python tools/render_glb.py model.glb out.png --eye 0,0,3 --target 0,0,0 --size 512
    python tools/render_glb.py model.glb out.png --environment none --light 0,1,1:3

Needs node and npm. On first use it npm-installs ``tools/gltf_viewer/package.json`` (three,
puppeteer-core, and @sparticuz/chromium, whose npm tarball carries a headless Chromium, so no
browser download from elsewhere is needed) into ``$TMPDIR/lift3d-gltf-viewer`` (a 70 MB
download, seconds; Chromium unpacks to ``runtime/`` there, 190 MB), or into
``$LIFT3D_GLTF_VIEWER_DIR``. WebGL runs on SwiftShader: CPU only, no display.

Camera coordinates are in the GLB's own frame (y-up); lift3d's writers map world ``(x, y, z)``
to file ``(x, z, -y)``. Without ``--background`` the PNG is RGBA and alpha is the silhouette.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VIEWER_SOURCE = Path(__file__).resolve().parent / "gltf_viewer"
FILES = ("package.json", "render_glb.mjs", "inspect_page.mjs")  # inspect_page: tests/test_report.py


NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH",
                  "EHOSTUNREACH", "ERR_SOCKET_TIMEOUT", "network request", "proxy")


class ViewerUnavailable(RuntimeError):
    """node/npm are missing, or the npm install cannot reach the registry."""


def default_dir() -> Path:
    configured = os.environ.get("LIFT3D_GLTF_VIEWER_DIR")
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "lift3d-gltf-viewer"


def ensure_viewer(directory: Path | None = None, install_timeout: float = 240.0) -> Path:
    """The viewer folder, npm-installed once (keyed by the package.json contents); raises ViewerUnavailable."""
    directory = Path(directory) if directory else default_dir()
    if shutil.which("node") is None:
        raise ViewerUnavailable("node is not on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # the script is re-copied each time, so edits to it take effect at once
        source = (VIEWER_SOURCE / name).read_bytes()
        target = directory / name
        if not target.is_file() or target.read_bytes() != source:
            target.write_bytes(source)
    stamp = directory / ".installed"
    key = hashlib.sha256((VIEWER_SOURCE / "package.json").read_bytes()).hexdigest()
    packages = ("three", "puppeteer-core", "@sparticuz/chromium")
    installed = all((directory / "node_modules" / p / "package.json").is_file() for p in packages)
    if installed and stamp.is_file() and stamp.read_text() == key:
        return directory
    npm = shutil.which("npm")
    if npm is None:
        raise ViewerUnavailable("the viewer is not installed and npm is not on PATH")
    command = [npm, "install", "--no-audit", "--no-fund", "--no-package-lock", "--fetch-retries=1",
               "--fetch-timeout=30000"]
    try:
        result = subprocess.run(command, cwd=directory, capture_output=True, text=True,
                                timeout=install_timeout, check=False)
    except subprocess.TimeoutExpired as error:
        raise ViewerUnavailable(f"npm install timed out after {install_timeout:.0f} s "
                                "(no network to the npm registry?)") from error
    installed = all((directory / "node_modules" / p / "package.json").is_file() for p in packages)
    if result.returncode != 0 or not installed:
        message = f"npm install in {directory} failed: {result.stderr.strip()[-800:]}"
        if any(code in result.stderr for code in NETWORK_ERRORS):
            raise ViewerUnavailable(message)  # the registry cannot be reached: nothing to test with
        raise RuntimeError(message)  # anything else is a real failure
    stamp.write_text(key)
    return directory


def render(jobs: list[dict], width: int = 256, height: int = 256, directory: Path | None = None,
           timeout: float = 300.0) -> list[dict]:
    """Render each job (``{"glb": path, "png": path, ...}``; options in gltf_viewer/render_glb.mjs) in one browser.

    Returns one dict per job with what the viewer loaded (materials, texture maps, bounds, camera).
    Raises RuntimeError when the page or the loader reports an error.
    """
    viewer = ensure_viewer(directory)
    jobs = [{**job, "glb": str(Path(job["glb"]).resolve()), "png": str(Path(job["png"]).resolve())} for job in jobs]
    with tempfile.TemporaryDirectory(prefix="lift3d-render-") as scratch:
        spec = Path(scratch) / "jobs.json"
        spec.write_text(json.dumps({"width": width, "height": height, "jobs": jobs}))
        # @sparticuz/chromium unpacks Chromium (~190 MB) into the node process's temp folder: keep it in ours.
        runtime = viewer / "runtime"
        runtime.mkdir(exist_ok=True)
        environment = {**os.environ, "TMPDIR": str(runtime), "TMP": str(runtime), "TEMP": str(runtime)}
        result = subprocess.run(["node", str(viewer / "render_glb.mjs"), str(spec)], cwd=viewer, env=environment,
                                capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the glTF viewer failed (exit {result.returncode}):\n{result.stderr.strip()[-3000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if len(lines) != len(jobs):
        raise RuntimeError(f"the glTF viewer rendered {len(lines)} of {len(jobs)} files:\n{result.stdout[-2000:]}")
    return [json.loads(line) for line in lines]


def _vector(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected x,y,z, got {text!r}")
    return values


def _light(text: str) -> dict:
    direction, _, intensity = text.partition(":")
    return {"direction": _vector(direction), "intensity": float(intensity or 2.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("glb", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--size", type=int, default=512, help="square image side in pixels")
    parser.add_argument("--eye", type=_vector, help="camera position x,y,z (file frame); default: framed")
    parser.add_argument("--target", type=_vector, help="look-at point x,y,z; default: the bounding-sphere centre")
    parser.add_argument("--view", type=_vector, help="direction to frame from when --eye is not given")
    parser.add_argument("--fov", type=float, default=40.0, help="vertical field of view, degrees")
    parser.add_argument("--environment", choices=("room", "none"), default="room")
    parser.add_argument("--light", type=_light, action="append", default=[],
                        help="directional light x,y,z[:intensity] (towards the light); repeatable")
    parser.add_argument("--tone-mapping", choices=("neutral", "aces", "none"), default="neutral")
    parser.add_argument("--background", type=_vector, help="r,g,b in 0..1 (default: transparent)")
    args = parser.parse_args(argv)
    job = {"glb": args.glb, "png": args.png, "fov": args.fov, "environment": args.environment,
           "lights": args.light, "toneMapping": args.tone_mapping}
    for key in ("eye", "target", "view", "background"):
        if getattr(args, key) is not None:
            job[key] = getattr(args, key)
    try:
        (info,) = render([job], args.size, args.size)
    except ViewerUnavailable as error:
        print(f"render_glb: viewer unavailable: {error}", file=sys.stderr)
        return 3
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
