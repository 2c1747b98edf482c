"""``lift3d report PATH [--out FILE]``: a static HTML page for a run folder or a folder of runs.

One run (a run folder, or a pipeline run folder with a section per stage): the turntable video
(``export/turntable.mp4``), the eval strip (``images/eval.png``, prediction above ground truth),
every logged scalar of ``metrics.jsonl`` as an inline SVG curve, the final metrics, the resolved
``config.yaml`` and the exported ``export/model.glb`` in an interactive three.js viewer
(OrbitControls: drag to turn, wheel to zoom). A folder of runs (a batch folder with
``batch.jsonl``, or any folder holding run folders): one row per run (prompt, status, key
metrics, thumbnail) sortable by clicking a column header, each row linking to the run's own page.

The page is one HTML file plus ``report_assets/`` next to it: the vendored, minified three.js
modules (``lift3d/report_assets/three``, rebuilt by ``tools/vendor_three.py``), the viewer
script and thumbnails made here. The run's own files are linked by relative paths from the
HTML file's folder, so nothing is copied and the page works offline. A missing file gives a
note instead of a broken reference. Browsers load ES modules (the 3D viewer) only over http(s)
or, in Firefox, from ``file://``; in Chrome serve the folder (``python -m http.server -d DIR``) —
everything else works from the file.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import yaml

logger = logging.getLogger(__name__)

ASSETS_SOURCE = Path(__file__).resolve().parent / "report_assets"
ASSETS_DIR = "report_assets"
"""Folder next to the HTML file that holds the copied assets and the generated thumbnails."""
RUN_PAGES_DIR = "report_runs"
"""Folder next to a folder-of-runs page that holds one page per run."""
REPORT_FILE = "report.html"
KEY_METRICS = ("eval/psnr", "eval/chamfer", "loss")
"""Metrics shown as columns of a folder-of-runs table (when any run has them), in this order."""
THUMBNAIL_SIZE = 96


# ------------------------------------------------------------------------------- reading runs


@dataclass
class Stage:
    """One ordinary run folder: a plain run, or one stage of a pipeline."""

    name: str
    """The stage's name ('' for a plain run)."""
    directory: Path
    """The run folder."""
    records: list[dict] = field(default_factory=list)
    """The metrics.jsonl lines, in order."""

    @property
    def final(self) -> dict[str, float]:
        """The last logged value of every scalar (``step``: the last step logged)."""
        return final_metrics(self.records)

    def file(self, relative: str) -> Path | None:
        """``directory / relative`` if that file exists (reports show a note otherwise)."""
        path = self.directory / relative
        return path if path.is_file() else None


@dataclass
class Run:
    """A run folder (with one stage, or a pipeline's stages) and what a batch knows about it."""

    name: str
    """Its path relative to the folder of runs (its folder name for a single run)."""
    directory: Path
    """The run folder (a pipeline's root for a pipeline)."""
    stages: list[Stage]
    """One stage for a plain run, a pipeline's stages in order, none if the folder holds no run."""
    prompt: str = ""
    """The prompt (from the last stage's config.yaml, or the batch row)."""
    status: str = ""
    """done, failed, interrupted, pending (a batch's words) or incomplete; '' if unknown."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Final metrics of the last stage (a batch's row when the run has no metrics.jsonl)."""
    wall_s: float | None = None
    """Wall time a batch recorded for the prompt (None outside batches)."""
    error: str = ""
    """The last failure a batch recorded."""

    @property
    def last(self) -> Stage | None:
        return self.stages[-1] if self.stages else None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as a list of dicts; unreadable lines (a run killed mid-write) are skipped."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: not JSON, skipped", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def final_metrics(records: list[dict]) -> dict[str, float]:
    final: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                final[key] = float(value)
    return final


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "pipeline.yaml").is_file()


def load_run(directory: Path, name: str | None = None) -> Run:
    """A run folder (plain or pipeline) with its stages' metrics, prompt and status."""
    from lift3d.batch import STATUS_FILE
    from lift3d.pipeline import DONE_FILE, PIPELINE_FILE

    pipeline = _read_yaml(directory / PIPELINE_FILE)
    if pipeline:
        names = [str(s.get("name", "")) for s in pipeline.get("stages") or [] if isinstance(s, dict)]
        stages = [Stage(n, directory / n, read_metrics(directory / n / "metrics.jsonl")) for n in names if n]
    elif (directory / "config.yaml").is_file():
        stages = [Stage("", directory, read_metrics(directory / "metrics.jsonl"))]
    else:
        stages = []
    run = Run(name or directory.name, directory, stages)
    if stages:
        config = _read_yaml(stages[-1].directory / "config.yaml") or _read_yaml(stages[0].directory / "config.yaml")
        run.prompt = str(config.get("prompt", ""))
        run.metrics = stages[-1].final
    status = _read_json(directory / STATUS_FILE)
    if status:
        run.status = str(status.get("status", ""))
        run.prompt = run.prompt or str(status.get("prompt", ""))
        run.metrics = run.metrics or dict(status.get("metrics") or {})
        run.wall_s = status.get("wall_s")
        run.error = str(status.get("error", ""))
    elif pipeline:
        run.status = "done" if stages and all((s.directory / DONE_FILE).is_file() for s in stages) else "incomplete"
    elif stages:
        steps = (_read_yaml(directory / "config.yaml").get("trainer") or {}).get("steps")
        finished = (directory / "images" / "final.png").is_file() and steps is not None and \
            stages[0].final.get("step", -1) >= steps
        run.status = "done" if finished else "incomplete"
    return run


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def find_runs(folder: Path) -> list[Run]:
    """The runs of a folder: a batch's rows (``batch.jsonl``, in corpus order), else every run
    folder below it (not looking inside run folders), sorted by path."""
    from lift3d.batch import REPORT_FILE as BATCH_FILE

    batch = folder / BATCH_FILE
    if batch.is_file():
        runs = []
        for row in read_metrics(batch):  # one JSON object per line, like metrics.jsonl
            run = load_run(folder / str(row.get("run_dir", "")), str(row.get("run_dir", "")))
            run.prompt = str(row.get("prompt", run.prompt))
            run.status = str(row.get("status", run.status))
            run.metrics = run.metrics or dict(row.get("metrics") or {})
            run.wall_s = row.get("wall_s", run.wall_s)
            run.error = str(row.get("error", run.error))
            runs.append(run)
        return runs
    found = []
    for current, subfolders, _ in os.walk(folder):
        here = Path(current)
        if here != folder and is_run_folder(here):
            found.append(here)
            subfolders[:] = []  # stages and ckpt/ belong to this run
        else:
            subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != ASSETS_DIR)
    return [load_run(path, path.relative_to(folder).as_posix()) for path in sorted(found)]


# ------------------------------------------------------------------------------------ drawing


def _nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    if not high > low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _format(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.4g}"


def svg_curve(title: str, points: list[tuple[float, float]], width: int = 340, height: int = 190) -> str:
    """A line chart of (step, value) points as an inline SVG element (raw values, and a moving
    average over about a twentieth of the points when there are many)."""
    points = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    left, right, top, bottom = 52, 10, 22, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [f'<svg class="curve" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="14" class="title">{html.escape(title)}</text>']
    if len(points) < 2:
        parts.append(f'<text x="{left}" y="{top + plot_h / 2}">fewer than two points</text></svg>')
        return "".join(parts)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1.0), y1 + 0.5 * (abs(y1) or 1.0)
    x1 = x1 if x1 > x0 else x0 + 1.0

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (1.0 - (y - y0) / (y1 - y0)) * plot_h

    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    for tick in _nice_ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{sy(tick) + 4:.1f}" text-anchor="end">{_format(tick)}</text>')
    for tick in _nice_ticks(x0, x1):
        parts.append(f'<text x="{sx(tick):.1f}" y="{height - 8}" text-anchor="middle">{_format(tick)}</text>')
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    window = len(points) // 20
    parts.append(f'<polyline points="{path}" class="{"raw" if window >= 2 else "line"}"/>')
    if window >= 2:  # noisy losses: the trend on top of the raw values
        smooth = [sum(ys[max(0, i - window): i + 1]) / len(ys[max(0, i - window): i + 1]) for i in range(len(ys))]
        parts.append('<polyline points="' + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, smooth))
                     + '" class="line"/>')
    parts.append("</svg>")
    return "".join(parts)


def curve_keys(records: list[dict]) -> list[str]:
    """Scalars logged at two steps or more: loss first, then eval/*, then the rest by name."""
    counts: dict[str, int] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                counts[key] = counts.get(key, 0) + 1
    keys = [k for k, n in counts.items() if n >= 2]
    return sorted(keys, key=lambda k: (k != "loss", not k.startswith("eval/"), k))


# ------------------------------------------------------------------------------------ writing


class _Page:
    """Paths of one HTML page: relative links from its folder, thumbnails in its assets folder."""

    def __init__(self, html_path: Path, assets: Path):
        self.path = html_path
        self.assets = assets

    def link(self, target: Path) -> str:
        relative = os.path.relpath(target.resolve(), self.path.parent.resolve())
        return quote(Path(relative).as_posix(), safe="/")

    def thumbnail(self, source: Path, name: str, size: int | None = THUMBNAIL_SIZE) -> Path | None:
        """The first (leftmost, top) square view of a strip image, saved as a PNG in the assets
        folder (``size`` pixels, or the view's own size for None); None if it cannot be read."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(source) as image:
                side = min(image.size)
                view = image.convert("RGB").crop((0, 0, side, side))
        except (OSError, UnidentifiedImageError) as error:
            logger.warning("no thumbnail from %s: %s", source, error)
            return None
        if size is not None:
            view = view.resize((size, size), Image.Resampling.LANCZOS)
        target = self.assets / "media" / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        view.save(target)
        return target


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _metrics_table(metrics: dict[str, float]) -> str:
    if not metrics:
        return _note("No metrics logged (metrics.jsonl is missing or empty).")
    keys = sorted(metrics, key=lambda k: (not k.startswith("eval/"), k != "step", k))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_format(metrics[k])}</td></tr>" for k in keys)
    return f'<table class="metrics">{rows}</table>'


def _stage_section(page: _Page, run: Run, stage: Stage) -> str:
    label = f"stage {html.escape(stage.name)}" if stage.name else ""
    slug = _slug(f"{run.name}-{stage.name or 'run'}")
    out = [f'<section class="stage" id="{_slug(stage.name or "run")}">']
    if label:
        out.append(f"<h2>{label} <small>{html.escape(page.link(stage.directory))}/</small></h2>")
    if not stage.directory.is_dir():
        out.append(_note(f"The run folder {stage.directory} does not exist.") + "</section>")
        return "".join(out)
    out.append('<div class="media">')
    # Turntable video (poster: its first view, from the PNG strip, so the box is never empty).
    video, strip = stage.file("export/turntable.mp4"), stage.file("export/turntable.png")
    out.append('<figure><figcaption>turntable</figcaption>')
    if video:
        poster = page.thumbnail(strip, f"{slug}-poster", size=None) if strip else None
        poster_attr = f' poster="{page.link(poster)}"' if poster else ""
        out.append(f'<video src="{page.link(video)}"{poster_attr} controls loop muted autoplay playsinline '
                   'preload="metadata"></video>')
    elif strip:
        out.append(f'<img class="strip" src="{page.link(strip)}"{_strip_size(strip, rows=1)} alt="turntable views">'
                   + _note("No export/turntable.mp4 (add mp4 to export.formats); the PNG strip instead."))
    else:
        out.append(_note("No turntable: export/ has neither turntable.mp4 nor turntable.png."))
    out.append("</figure>")
    # The GLB in three.js.
    glb = stage.file("export/model.glb")
    out.append('<figure><figcaption>export/model.glb (drag to turn, wheel to zoom)</figcaption>')
    if glb:
        out.append(f'<div class="viewer" data-glb="{page.link(glb)}"><canvas></canvas>'
                   '<p class="status">loading the 3D viewer…</p></div>')
    else:
        out.append(_note("No export/model.glb (add glb to export.formats, or run `lift3d export RUN --format glb`)."))
    out.append("</figure></div>")
    # Eval strip.
    evaluation = stage.file("images/eval.png")
    final = stage.file("images/final.png")
    out.append("<h3>held-out views</h3>")
    if evaluation:
        out.append(f'<img class="strip" src="{page.link(evaluation)}"{_strip_size(evaluation, rows=2)} alt="prediction above ground truth">'
                   '<p class="caption">prediction (top) above ground truth (bottom), images/eval.png</p>')
    elif final:
        out.append(f'<img class="strip" src="{page.link(final)}"{_strip_size(final, rows=1)} alt="validation views">'
                   + _note("No images/eval.png (the teacher has no ground truth); images/final.png instead."))
    else:
        out.append(_note("No images/eval.png or images/final.png yet (the run has not finished)."))
    # Curves and metrics.
    keys = curve_keys(stage.records)
    out.append("<h3>curves</h3>")
    if keys:
        out.append('<div class="curves">' + "".join(
            svg_curve(k, [(float(r.get("step", i)), float(r[k])) for i, r in enumerate(stage.records)
                          if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)])
            for k in keys) + "</div>")
    else:
        out.append(_note("No scalar was logged at two steps or more."))
    out.append("<h3>final metrics</h3>" + _metrics_table(stage.final))
    # Files and config.
    exports = sorted(p for p in (stage.directory / "export").glob("*") if p.is_file()) \
        if (stage.directory / "export").is_dir() else []
    if exports:
        out.append("<h3>exported files</h3><ul class=\"files\">" + "".join(
            f'<li><a href="{page.link(p)}">{html.escape(p.name)}</a> ({p.stat().st_size / 1e6:.2f} MB)</li>'
            for p in exports) + "</ul>")
    config = stage.file("config.yaml")
    if config:
        out.append(f'<details><summary>resolved config (<a href="{page.link(config)}">config.yaml</a>)</summary>'
                   f"<pre>{html.escape(config.read_text(encoding='utf-8', errors='replace'))}</pre></details>")
    else:
        out.append(_note("No config.yaml."))
    out.append("</section>")
    return "".join(out)


def _strip_size(path: Path, rows: int, view: int = 128) -> str:
    """A style attribute that shows a strip of square views at ``view`` pixels a view at least
    (tiny test renders would otherwise be a few pixels tall); '' if the image cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError):
        return ""
    scale = max(1.0, view * rows / max(height, 1))
    return f' style="width: {round(width * scale)}px"'


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-") or "run"


def _document(title: str, body: str, assets_link: str, viewer: bool) -> str:
    head = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request (and no 404 in the console)
        f"<title>{html.escape(title)}</title>",
        f'<link rel="stylesheet" href="{assets_link}/report.css">',
    ]
    if viewer:
        # Import-map addresses must be absolute or start with /, ./ or ../ (a bare "report_assets/..." is void).
        base = assets_link if assets_link.startswith(("./", "../", "/")) else f"./{assets_link}"
        imports = {"three": f"{base}/three/three.module.js", "three/addons/": f"{base}/three/addons/"}
        head.append(f'<script type="importmap">{json.dumps({"imports": imports})}</script>')
    head.append("</head><body>")
    tail = []
    if viewer:
        # A browser that refuses modules from file:// (Chrome) fires onerror or never starts the viewer.
        tail.append(
            "<script>function lift3dNoViewer(only){for(const v of only?[only]:document.querySelectorAll('.viewer')){"
            "v.dataset.state='unavailable';v.querySelector('.status').textContent="
            "'The 3D viewer needs the page served over http (browsers block ES modules from file://): '"
            "+'python -m http.server -d <this folder>, then open http://localhost:8000/'+location.pathname.split('/').pop();}}"
            "addEventListener('load',()=>{if(!window.lift3dViewerStarted)lift3dNoViewer();});</script>")
        tail.append(f'<script type="module" src="{assets_link}/report.js" onerror="lift3dNoViewer()"></script>')
    return "\n".join(head) + body + "\n".join(tail) + "</body></html>\n"


def _copy_assets(target: Path) -> None:
    """The static assets (vendored three.js, the viewer script, the stylesheet) into ``target``."""
    for source in ASSETS_SOURCE.rglob("*"):
        if source.is_file() and "__pycache__" not in source.parts:
            destination = target / source.relative_to(ASSETS_SOURCE)
            destination.parent.mkdir(parents=True, exist_ok=True)
            if not destination.is_file() or destination.stat().st_size != source.stat().st_size \
                    or destination.read_bytes() != source.read_bytes():
                shutil.copyfile(source, destination)


def write_run_page(run: Run, html_path: Path, assets: Path, back: Path | None = None) -> Path:
    """One run's page at ``html_path`` (assets already in ``assets``)."""
    page = _Page(html_path, assets)
    title = run.prompt or run.name
    body = [f"<header><h1>{html.escape(title)}</h1>"]
    if back is not None:
        body.append(f'<p><a href="{page.link(back)}">← all runs</a></p>')
    facts = [("run folder", html.escape(page.link(run.directory)) + "/"), ("status", html.escape(run.status or "?"))]
    if run.last is not None and run.last.name:
        facts.append(("stages", ", ".join(f'<a href="#{_slug(s.name)}">{html.escape(s.name)}</a>' for s in run.stages)))
    if run.wall_s is not None:
        facts.append(("wall time", f"{float(run.wall_s):.1f} s"))
    if run.error:
        facts.append(("error", f"<code>{html.escape(run.error)}</code>"))
    for key in ("eval/psnr", "eval/chamfer"):
        if key in run.metrics:
            facts.append((key, _format(run.metrics[key])))
    body.append('<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl></header>")
    if not run.stages:
        body.append(_note(f"{run.directory} holds no run (no config.yaml or pipeline.yaml)."))
    for stage in run.stages:
        body.append(_stage_section(page, run, stage))
    viewer = any(s.file("export/model.glb") for s in run.stages)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(_document(f"lift3d report: {title}", "".join(body), page.link(assets), viewer), encoding="utf-8")
    return html_path


def write_index_page(runs: list[Run], folder: Path, html_path: Path, assets: Path) -> Path:
    """The table of a folder of runs, each row linking to the run's page in ``report_runs/``."""
    page = _Page(html_path, assets)
    pages_dir = html_path.parent / RUN_PAGES_DIR
    metric_keys = [k for k in KEY_METRICS if any(k in r.metrics for r in runs)]
    metric_keys += sorted({k for r in runs for k in r.metrics if k.startswith("eval/")} - set(metric_keys))
    columns = [("#", "number"), ("view", None), ("prompt", "text"), ("status", "text"), ("steps", "number")]
    columns += [(k, "number") for k in metric_keys] + [("wall s", "number")]
    header = "".join(
        f'<th data-sort="{kind}" data-column="{i}" data-key="{html.escape(name)}" title="sort">{html.escape(name)}</th>' if kind else f"<th>{name}</th>"
        for i, (name, kind) in enumerate(columns))
    rows, taken = [], set()
    for number, run in enumerate(runs, start=1):
        slug = _slug(run.name)
        while slug in taken:  # 'a@1' and 'a-1' slug alike
            slug += "-"
        taken.add(slug)
        run_page = write_run_page(run, pages_dir / f"{slug}.html", assets, back=html_path)
        last = run.last
        strip = last and (last.file("export/turntable.png") or last.file("images/eval.png") or last.file("images/final.png"))
        thumb = page.thumbnail(strip, f"thumb-{slug}") if strip else None
        view = f'<img class="thumb" src="{page.link(thumb)}" alt="">' if thumb else '<span class="note">none</span>'
        cells = [(str(number), number), (view, None),
                 (f'<a href="{page.link(run_page)}">{html.escape(run.prompt or run.name)}</a>', run.prompt or run.name),
                 (html.escape(run.status or "?") + (f' <span class="error" title="{html.escape(run.error)}">!</span>'
                                                   if run.error else ""), run.status),
                 _number_cell(run.metrics.get("step"))]
        cells += [_number_cell(run.metrics.get(k)) for k in metric_keys]
        cells.append(_number_cell(run.wall_s))
        rows.append(f'<tr data-run="{html.escape(run.name)}">' + "".join(
            f"<td>{text}</td>" if value is None else f'<td data-value="{html.escape(str(value))}">{text}</td>'
            for text, value in cells) + "</tr>")
    table = (f'<table class="runs" id="runs"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
             if rows else _note(f"No run folders found in {folder}."))
    body = (f"<header><h1>lift3d runs in {html.escape(folder.name or str(folder))}</h1>"
            f"<p>{len(runs)} runs; click a column header to sort.</p></header>{table}{_SORT_SCRIPT}")
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(_document(f"lift3d runs: {folder.name}", body, page.link(assets), viewer=False), encoding="utf-8")
    return html_path


def _number_cell(value) -> tuple[str, float | str | None]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return _format(float(value)), float(value)
    return "", ""  # an empty data-value: sorts after every number


# Plain (non-module) script, so sorting works from file:// too. Numbers compare as numbers; empty
# cells go last whichever the direction.
_SORT_SCRIPT = """<script>
for (const th of document.querySelectorAll('#runs th[data-sort]')) {
  th.addEventListener('click', () => {
    const table = th.closest('table'), body = table.tBodies[0], column = Number(th.dataset.column);
    const ascending = th.dataset.order !== 'ascending';
    for (const other of table.querySelectorAll('th')) delete other.dataset.order;
    th.dataset.order = ascending ? 'ascending' : 'descending';
    const key = (row) => row.cells[column].dataset.value ?? row.cells[column].textContent;
    const rows = [...body.rows].sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === '' || y === '') return (x === '') - (y === '');
      const order = th.dataset.sort === 'number' ? Number(x) - Number(y) : x.localeCompare(y);
      return ascending ? order : -order;
    });
    body.append(...rows);
  });
}
</script>"""


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """``lift3d report``: the page for a run folder or a folder of runs; returns the HTML file.

    ``out`` defaults to ``PATH/report.html``; the assets go to ``report_assets/`` next to it (and,
    for a folder of runs, one page per run to ``report_runs/``).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"lift3d report: {str(folder)!r} is not a folder (give a run folder or a folder of runs)")
    html_path = Path(out) if out else folder / REPORT_FILE
    if html_path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--out {str(html_path)!r}: the report is an HTML file; give a name ending in .html")
    assets = html_path.parent / ASSETS_DIR
    _copy_assets(assets)
    if is_run_folder(folder):
        written = write_run_page(load_run(folder), html_path, assets)
    else:
        runs = find_runs(folder)
        if not runs:
            raise ValueError(f"lift3d report: {str(folder)!r} is neither a run folder (config.yaml or pipeline.yaml) "
                             "nor a folder holding run folders or a batch.jsonl")
        written = write_index_page(runs, folder, html_path, assets)
    logger.info("report: %s (the 3D viewer needs it served: python -m http.server -d %s)", written, written.parent)
    return written
