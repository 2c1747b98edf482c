#!/usr/bin/env python3
"""Rebuild the vendored three.js modules of ``lift3d report`` in ``lift3d/report_assets/three/``.

    python tools/vendor_three.py

The report's 3D viewer needs three's core (``three.module.js`` + ``three.core.js``), GLTFLoader,
OrbitControls, RoomEnvironment and the two utils GLTFLoader imports. This npm-installs the three
version pinned in ``tools/gltf_viewer/package.json`` (the one ``tools/render_glb.py`` uses) and
esbuild into a temp folder, minifies each file on its own (no bundling: every ``import`` stays as
it is, so the page's importmap maps ``three`` and ``three/addons/`` onto these files) and copies
three's MIT LICENSE next to them. About 0.9 MB in all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "lift3d" / "report_assets" / "three"
ESBUILD = "0.25.0"
# source path in the three package -> path under TARGET (addons keep three's examples/jsm layout,
# so GLTFLoader's relative '../utils/...' imports resolve)
FILES = {
    "build/three.module.js": "three.module.js",
    "build/three.core.js": "three.core.js",
    "examples/jsm/loaders/GLTFLoader.js": "addons/loaders/GLTFLoader.js",
    "examples/jsm/controls/OrbitControls.js": "addons/controls/OrbitControls.js",
    "examples/jsm/environments/RoomEnvironment.js": "addons/environments/RoomEnvironment.js",
    "examples/jsm/utils/BufferGeometryUtils.js": "addons/utils/BufferGeometryUtils.js",
    "examples/jsm/utils/SkeletonUtils.js": "addons/utils/SkeletonUtils.js",
}


def main() -> int:
    version = json.loads((ROOT / "tools" / "gltf_viewer" / "package.json").read_text())["dependencies"]["three"]
    npm = shutil.which("npm")
    if npm is None:
        sys.stderr.write("vendor_three: npm is not on PATH\n")
        return 3
    with tempfile.TemporaryDirectory(prefix="lift3d-vendor-three-") as scratch:
        work = Path(scratch)
        (work / "package.json").write_text(json.dumps(
            {"private": True, "dependencies": {"three": version, "esbuild": ESBUILD}}))
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--no-package-lock"], cwd=work, check=True)
        three = work / "node_modules" / "three"
        if TARGET.exists():
            shutil.rmtree(TARGET)
        for source, target in FILES.items():
            out = TARGET / target
            out.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([str(work / "node_modules" / ".bin" / "esbuild"), str(three / source), "--minify",
                            "--format=esm", "--legal-comments=none", "--log-level=warning", f"--outfile={out}"],
                           check=True)
            # esbuild drops the licence banner with the other comments: put a one-line one back.
            out.write_text(f"/* three.js r{version.split('.')[1]} ({source}), MIT License, see LICENSE */\n"
                           + out.read_text())
        shutil.copy(three / "LICENSE", TARGET / "LICENSE")
        (TARGET / "VERSION").write_text(f"three {version}, minified with esbuild {ESBUILD} by tools/vendor_three.py\n")
    total = sum(p.stat().st_size for p in TARGET.rglob("*") if p.is_file())
    sys.stdout.write(f"wrote {len(FILES)} modules to {TARGET.relative_to(ROOT)} ({total / 1e6:.2f} MB)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
