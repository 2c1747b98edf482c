"""``lift3d report``: static HTML pages for a run, a pipeline run and a folder of runs.

The run folders are synthesised with lift3d's own writers (a real GLB from
:func:`lift3d.export.gltf.write_glb`, an MP4 from :func:`lift3d.export.video.write_video`, PNG
strips, metrics.jsonl, config.yaml), so no training is needed. The HTML is checked twice: here
(every relative src/href/poster/data-glb resolves to a file, the SVG curves hold the logged
points, missing files give notes and no references), and in headless Chromium through the
npm-installed viewer of ``tools/render_glb.py`` with the page served on 127.0.0.1 (no console
errors, no failed requests, the three.js viewer draws the model, sorting a column reorders the
rows). The browser tests skip only when the npm install cannot reach the registry.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import subprocess
import threading
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
import trimesh
import yaml
from PIL import Image

from lift3d.cli import main
from lift3d.export.gltf import write_glb
from lift3d.export.video import write_strip, write_video
from lift3d.report import ASSETS_DIR, RUN_PAGES_DIR, find_runs, svg_curve, write_report
from conftest import load_render_glb

ROOT = Path(__file__).resolve().parents[1]
BACKGROUND = (0xF4, 0xF5, 0xF7)  # the viewer's clear colour (report.js)
READY = "window.lift3dReport && window.lift3dReport.ready"  # every viewer drawn (or failed)


# --------------------------------------------------------------------------- synthetic runs


def make_run(directory: Path, prompt: str, psnr: float | None, steps: int = 20, glb: bool = True, mp4: bool = True,
             status: str | None = None) -> Path:
    """A finished-looking run folder: config.yaml, metrics.jsonl, images/, export/."""
    directory.mkdir(parents=True)
    config = {"name": "test", "prompt": prompt, "trainer": {"steps": steps}, "export": {"formats": ["png"]}}
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"step": s, "loss": 10.0 / s, "guidance/t_mean": 500.0 - s} for s in range(1, steps + 1)]
    if psnr is not None:
        records.append({"step": steps, "eval/psnr": psnr})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    generator = torch.Generator().manual_seed(len(prompt))
    views = torch.rand(3, 16, 16, 3, generator=generator)
    (directory / "images").mkdir()
    write_strip(directory / "images" / "final.png", views)
    write_strip(directory / "images" / "eval.png", torch.cat([views, views.flip(-1)], dim=1))
    export = directory / "export"
    export.mkdir()
    write_strip(export / "turntable.png", views)
    if mp4:
        write_video(export / "turntable.mp4", torch.rand(4, 16, 16, 3, generator=generator), fps=4)
    if glb:
        sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.6)
        colors = np.tile(np.array([[0.8, 0.1, 0.1]]), (len(sphere.vertices), 1))
        write_glb(export / "model.glb", np.asarray(sphere.vertices), np.asarray(sphere.faces), vertex_colors=colors)
    if status is not None:
        (directory / "batch-status.json").write_text(json.dumps({"prompt": prompt, "status": status}))
    return directory


def make_pipeline(directory: Path, prompt: str, psnr: float) -> Path:
    """A pipeline run folder: pipeline.yaml and two finished stages, only the last with a GLB."""
    directory.mkdir(parents=True)
    (directory / "pipeline.yaml").write_text(yaml.safe_dump({"name": "pipe", "stages": [
        {"name": "coarse", "init_from_previous": True}, {"name": "fine", "init_from_previous": True}]}))
    make_run(directory / "coarse", prompt, psnr - 3.0, glb=False)
    make_run(directory / "fine", prompt, psnr)
    for stage in ("coarse", "fine"):
        (directory / stage / "done.json").write_text("{}")
    return directory


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    """A batch folder: three finished runs (one a pipeline, one without GLB and MP4) and a failure."""
    folder = tmp_path_factory.mktemp("batch")
    make_run(folder / "a-red-sphere", "a red sphere", psnr=20.0)
    make_run(folder / "a-blue-cube", "a blue cube", psnr=25.0, glb=False, mp4=False)
    make_pipeline(folder / "a-gray-torus", "a gray torus", psnr=15.0)
    rows = [
        {"prompt": "a red sphere", "run_dir": "a-red-sphere", "status": "done", "metrics": {"eval/psnr": 20.0}, "wall_s": 3.0, "error": ""},
        {"prompt": "a blue cube", "run_dir": "a-blue-cube", "status": "done", "metrics": {"eval/psnr": 25.0}, "wall_s": 1.0, "error": ""},
        {"prompt": "a gray torus", "run_dir": "a-gray-torus", "status": "done", "metrics": {"eval/psnr": 15.0}, "wall_s": 9.0, "error": ""},
        {"prompt": "a plaid ghost", "run_dir": "a-plaid-ghost", "status": "failed", "metrics": {}, "wall_s": 0.1,
         "error": "ValueError: unknown word 'plaid'"},
    ]
    (folder / "batch.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(folder)
    write_report(folder / "a-red-sphere")  # a single run's own page too: assets in the run folder
    return folder


class References(HTMLParser):
    """Every src/href/poster/data-glb of a page, and the inline SVG curves."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, str]] = []
        self.svgs: list[dict] = []
        self.polylines: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        for name in ("src", "href", "poster", "data-glb"):
            if attributes.get(name):
                self.links.append((tag, name, attributes[name]))
        if tag == "svg":
            self.svgs.append(attributes)
        if tag == "polyline" and attributes.get("class") == "line":
            self.polylines.append(attributes["points"])


def parse(page: Path) -> References:
    parser = References()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def local_targets(page: Path) -> list[tuple[str, Path]]:
    """(attribute, file) of every reference that is not a data: URL."""
    targets = []
    for _, name, value in parse(page).links:
        if value.startswith(("data:", "#")):
            continue  # inline data and anchors on the same page
        assert not urlparse(value).scheme and not value.startswith("/"), f"{page.name}: {value} is not relative"
        targets.append((name, (page.parent / unquote(value.split("#")[0])).resolve()))
    return targets


# --------------------------------------------------------------------------- HTML checks


def test_single_run_page_references_resolve_and_plot_the_metrics(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "a red sphere", psnr=21.5, steps=30)
    page = write_report(run)
    assert page == run / "report.html"
    targets = local_targets(page)
    assert targets and all(path.is_file() for _, path in targets), [t for t in targets if not t[1].is_file()]
    referenced = {path for _, path in targets}
    for name in ("export/turntable.mp4", "export/model.glb", "images/eval.png", "config.yaml"):
        assert (run / name).resolve() in referenced, name
    assert (run / ASSETS_DIR / "three" / "three.module.js").resolve() in {p.resolve() for p in (run / ASSETS_DIR).rglob("*.js")}
    parsed = parse(page)
    titles = [svg["aria-label"] for svg in parsed.svgs]
    assert titles == ["loss", "guidance/t_mean"]  # eval/psnr has one point: a table entry, no curve
    loss_points = [tuple(map(float, p.split(","))) for p in parsed.polylines[0].split()]
    assert len(loss_points) == 30
    xs, ys = zip(*loss_points)
    assert xs == tuple(sorted(xs)) and ys[0] == min(ys) and ys[-1] == max(ys)  # loss falls: SVG y grows down
    text = page.read_text()
    assert "21.5" in text
    imports = json.loads(re.search(r'<script type="importmap">(.*?)</script>', text).group(1))["imports"]
    for address in imports.values():  # import maps ignore bare relative addresses
        assert address.startswith(("./", "../")), address
        assert (page.parent / address).resolve().exists(), address


def test_missing_files_give_notes_not_broken_references(tmp_path: Path) -> None:
    run = make_run(tmp_path / "bare", "a blue cube", psnr=None, glb=False, mp4=False)
    (run / "images" / "eval.png").unlink()
    page = write_report(run, out=tmp_path / "out" / "bare.html")
    assert all(path.is_file() for _, path in local_targets(page))
    text = page.read_text()
    assert not any(value.endswith(("model.glb", ".mp4")) for _, _, value in parse(page).links)
    assert 'class="viewer"' not in text and "<video" not in text
    assert "No export/model.glb" in text and "No export/turntable.mp4" in text
    assert "No images/eval.png" in text and "images/final.png instead" in text
    assert "importmap" not in text and "report.js" not in text  # no viewer, no module to load
    # A folder that is not a run at all.
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither a run folder"):
        write_report(empty)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        write_report(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"\.html"):
        write_report(run, out=tmp_path / "report.txt")


def test_folder_of_runs_without_batch_file_finds_nested_runs_but_not_stages(tmp_path: Path) -> None:
    make_run(tmp_path / "quickstart" / "a-red-sphere@1", "a red sphere", psnr=20.0)
    make_pipeline(tmp_path / "magic3d" / "a-gray-torus@2", "a gray torus", psnr=15.0)
    (tmp_path / "notes").mkdir()
    runs = find_runs(tmp_path)
    assert [r.name for r in runs] == ["magic3d/a-gray-torus@2", "quickstart/a-red-sphere@1"]
    assert [len(r.stages) for r in runs] == [2, 1]
    assert [r.status for r in runs] == ["done", "done"]
    assert runs[0].prompt == "a gray torus" and runs[0].metrics["eval/psnr"] == 15.0


def test_batch_index_links_every_run_page(batch: Path) -> None:
    index = batch / "report.html"
    targets = local_targets(index)
    assert all(path.is_file() for _, path in targets)
    pages = sorted(p for _, p in targets if p.suffix == ".html")
    assert [p.name for p in pages] == sorted(f"{n}.html" for n in ("a-red-sphere", "a-blue-cube", "a-gray-torus", "a-plaid-ghost"))
    for page in pages:
        assert page.parent == (batch / RUN_PAGES_DIR).resolve()
        assert all(path.is_file() for _, path in local_targets(page)), page
    text = index.read_text()
    assert text.count('<tr data-run="') == 4 and "unknown word" in text
    pipeline = (batch / RUN_PAGES_DIR / "a-gray-torus.html").read_text()
    assert pipeline.count('class="stage"') == 2 and pipeline.count('class="viewer"') == 1
    assert "holds no run" in (batch / RUN_PAGES_DIR / "a-plaid-ghost.html").read_text()


def test_svg_curve_of_a_constant_and_of_too_few_points() -> None:
    flat = svg_curve("flat", [(0, 1.0), (1, 1.0), (2, float("nan"))])
    assert flat.count("<polyline") == 1 and "nan" not in flat.split("</text>")[-1]
    assert "fewer than two points" in svg_curve("one", [(0, 1.0)])


def test_cli_report(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "a red sphere", psnr=20.0)
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").is_file() and (tmp_path / ASSETS_DIR / "report.js").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_setup_ships_every_asset() -> None:
    source = (ROOT / "setup.py").read_text()
    patterns = re.search(r'"lift3d": \[([^\]]*)\]', source).group(1)
    patterns = [p.strip().strip('"') for p in patterns.split(",") if p.strip()]
    shipped = {p for pattern in patterns for p in (ROOT / "lift3d").glob(pattern) if p.is_file()}
    assets = {p for p in (ROOT / "lift3d" / "report_assets").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert assets and assets == shipped, sorted(str(p) for p in assets ^ shipped)
    assert (ROOT / "lift3d" / "report_assets" / "three" / "LICENSE").read_text().startswith("The MIT License")
    size = sum(p.stat().st_size for p in assets)
    assert size < 1.5e6, f"vendored assets grew to {size / 1e6:.2f} MB"


# --------------------------------------------------------------------------- in Chromium




class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002  (the base class's name)
        pass


@pytest.fixture(scope="module")
def server(batch: Path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(batch)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser(batch: Path, server: str, tmp_path_factory) -> dict[str, dict]:
    """The index page and two run pages as headless Chromium saw them (one browser for all)."""
    render_glb = load_render_glb()
    try:
        viewer = render_glb.ensure_viewer()
    except render_glb.ViewerUnavailable as error:
        pytest.skip(f"headless Chromium unavailable: {error}")
    scratch = tmp_path_factory.mktemp("chromium")
    pages = {
        "index": {"url": f"{server}/report.html", "rows": "tr[data-run]",
                  "clicks": ['th[data-key="eval/psnr"]', 'th[data-key="eval/psnr"]', 'th[data-key="prompt"]']},
        "sphere": {"url": f"{server}/{RUN_PAGES_DIR}/a-red-sphere.html", "waitFor": READY,
                   "elements": {"selector": ".viewer canvas", "dir": str(scratch / "sphere")}},
        "single": {"url": f"{server}/a-red-sphere/report.html", "waitFor": READY},
        "cube": {"url": f"{server}/{RUN_PAGES_DIR}/a-blue-cube.html"},
        "file": {"url": (batch / "a-red-sphere" / "report.html").as_uri()},  # opened from disk, no server
        "torus": {"url": f"{server}/{RUN_PAGES_DIR}/a-gray-torus.html", "waitFor": READY},
    }
    spec = scratch / "spec.json"
    spec.write_text(json.dumps({"width": 1000, "height": 800, "pages": list(pages.values())}))
    runtime = viewer / "runtime"  # where @sparticuz/chromium unpacks itself (as render_glb.render does)
    runtime.mkdir(exist_ok=True)
    environment = {**os.environ, "TMPDIR": str(runtime), "TMP": str(runtime), "TEMP": str(runtime)}
    result = subprocess.run(["node", str(viewer / "inspect_page.mjs"), str(spec)], cwd=viewer, env=environment,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(pages), result.stdout[-2000:]
    return dict(zip(pages, lines))


def test_from_file_url_the_viewer_degrades_to_a_note(browser: dict, batch: Path) -> None:
    # Chrome refuses ES modules on file:// pages, and fetch() (GLTFLoader) cannot read file:// URLs
    # in any browser (this test browser runs with web security off, so it gets as far as the fetch):
    # the viewer must say how to get it, and everything else must still resolve.
    seen = browser["file"]
    assert seen["states"] == ["unavailable"], seen["problems"]
    for reference in seen["references"]:
        if reference["url"].startswith("file:"):
            assert Path(unquote(urlparse(reference["url"]).path)).is_file(), reference


@pytest.mark.parametrize("name", ["index", "sphere", "single", "cube", "torus"])
def test_pages_load_without_errors_and_every_reference_resolves(browser: dict, server: str, name: str) -> None:
    seen = browser[name]
    assert "waitError" not in seen and seen["problems"] == [] and seen["failed"] == [], {k: v for k, v in seen.items() if k != "references"}
    local = [r for r in seen["references"] if r["url"].startswith(server)]
    assert local, seen["references"]
    for reference in local:  # links (<a href>) too, which the page does not fetch itself
        with urllib.request.urlopen(reference["url"]) as response:
            assert response.status == 200 and response.read(1), reference


def test_viewer_draws_the_model(browser: dict) -> None:
    sphere = browser["sphere"]
    assert sphere["states"] == ["ready"]
    (canvas,) = sphere["elements"]
    pixels = np.asarray(Image.open(canvas).convert("RGB")).astype(int)
    drawn = np.abs(pixels - np.array(BACKGROUND)).sum(-1) > 30
    assert 0.03 < drawn.mean() < 0.6, drawn.mean()  # the sphere, framed: neither a speck nor the whole canvas
    red = pixels[drawn]
    assert (red[:, 0] > red[:, 1] + 30).mean() > 0.9  # its vertex colour is red
    assert browser["single"]["states"] == ["ready"]  # the run's own report.html (importmap ./report_assets)
    assert browser["torus"]["states"] == ["ready"]  # the pipeline's last stage has the GLB
    assert browser["cube"]["states"] == []  # no GLB: no viewer


def test_sorting_by_a_metric_column_reorders_the_rows(browser: dict) -> None:
    initial, ascending, descending, by_prompt = browser["index"]["rows"]
    assert initial == ["a-red-sphere", "a-blue-cube", "a-gray-torus", "a-plaid-ghost"]  # batch order
    assert ascending == ["a-gray-torus", "a-red-sphere", "a-blue-cube", "a-plaid-ghost"]  # 15 < 20 < 25, no value last
    assert descending == ["a-blue-cube", "a-red-sphere", "a-gray-torus", "a-plaid-ghost"]
    assert by_prompt == ["a-blue-cube", "a-gray-torus", "a-plaid-ghost", "a-red-sphere"]
