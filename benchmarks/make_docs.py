"""Assemble docs/benchmarks.md from the saved results (benchmarks/results/*.json) and the prose in
benchmarks/docs_template.md, whose {{PLACEHOLDERS}} become the measured tables.

    python benchmarks/make_docs.py
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
R = ROOT / "benchmarks" / "results"
TEMPLATE = ROOT / "benchmarks" / "docs_template.md"
OUTPUT = ROOT / "docs" / "benchmarks.md"

def report(*names):
    paths = [str(R / n) for n in names if (R / n).is_file()]
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "guidance.py"), "--report", *paths], capture_output=True, text=True, check=True).stdout

def acceptance():
    entries = []
    for name in ("guidance-gaussians.json", "guidance-gaussians-2.json"):
        if (R / name).is_file():
            entries += json.loads((R / name).read_text())["results"]
    lines = ["| objective | eval/psnr (dB), default prompt | pass (≥ 22) | s/run |", "|---|---|---|---|"]
    for e in entries:
        row = next((r for r in e["rows"] if r["prompt"] == "a red sphere on a blue cube"), None)
        if row:
            lines.append(f"| {e['objective']} | {row['eval/psnr']:.2f} | {'yes' if row['eval/psnr'] >= 22 else 'NO'} | {row['seconds']:.0f} |")
    return "\n".join(lines)

def janus():
    path = R / "guidance-janus.json"
    if not path.is_file():
        return "(not measured)"
    data = json.loads(path.read_text())
    by = {}
    for e in data["results"]:
        by.setdefault(e["objective"], {})[e["suite"]] = e
    lines = ["| objective | Janus rate, no view prompts | Janus rate, view-dependent prompts | PSNR (dB) no / with |", "|---|---|---|---|"]
    for name, suites in by.items():
        a, b = suites.get("janus", {}), suites.get("janus-vd", {})
        lines.append(f"| {name} | {fmt(a.get('janus_rate'), 2)} | {fmt(b.get('janus_rate'), 2)} | {fmt(a.get('mean_psnr'), 1)} / {fmt(b.get('mean_psnr'), 1)} |")
    return "\n".join(lines) + f"\n\n`{data['command']}` ({data['date']}, {data['machine']}; prompts: {'; '.join(data['prompts'])})"

def fmt(value, digits):
    return "–" if value is None else f"{value:.{digits}f}"


def kernels():
    path = R / "kernels.json"
    data = json.loads(path.read_text())
    lines = ["| case | size | tier | median ms | speed-up vs reference | max rel. error | peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        speed = "– (reference not run: too slow)" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.1f}×"
        error = "–" if r["max_relative_error"] is None else f"{r['max_relative_error']:.1e}"
        rss = "–" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:.0f}"
        lines.append(f"| {r['case']} | {r['size']} | {r['tier']} | {r['median_ms']:.1f} | {speed} | {error} | {rss} |")
    m = data["machine"]
    return "\n".join(lines) + f"\n\nMachine: {m['platform']}, {m['threads']} threads, torch {m['torch']}, {data['repeats']} timed runs per tier (median)."

def profile():
    path = R / "profile.json"
    if not path.is_file():
        return "(not measured)"
    data = json.loads(path.read_text())
    stages = ["camera", "render", "teacher", "guidance", "backward", "optimizer", "hooks", "logging"]
    head = "| run | steps | median step (ms) | peak RSS MiB | " + " | ".join(stages) + " |"
    lines = [head, "|" + "---|" * (4 + len(stages))]
    for r in data["results"]:
        by = {row["stage"]: row for row in r["stages"]}
        cells = [f"{100 * by[s]['share']:.1f}% ({by[s]['ms_per_step']:.0f} ms, {by[s]['peak_rss_mib']:.0f} MiB)" if s in by else "–" for s in stages]
        lines.append(f"| {r['name']}{' (' + r['note'] + ')' if r['note'] else ''} | {r['steps']} | {r['step_ms_median']:.0f} | {r['peak_rss_mib']:.0f} | " + " | ".join(cells) + " |")
    m = data["machine"]
    return "\n".join(lines) + f"\n\nMachine: {m['platform']}, {m['threads']} threads, torch {m['torch']}. Each cell: share of the step (ms per step, peak RSS during that stage)."


def quality(name):
    d = json.loads((R / name).read_text())
    rows = "\n".join(f"| {r['prompt']} | {r.get('eval/psnr', float('nan')):.2f} | {r.get('eval/chamfer', float('nan')):.4f} | {r['seconds']:.0f} |" for r in d["rows"])
    mc = d.get("mean_chamfer")
    return (f"| prompt | eval/psnr (dB) | eval/chamfer | s |\n|---|---|---|---|\n{rows}\n| **mean** | **{d['mean_psnr']:.2f}** | "
            f"**{mc:.4f}** | {d['mean_seconds']:.0f} |" if mc is not None else "") + f"\n\n`python benchmarks/quality.py --config {d['config']} {' '.join(d['overrides'])}` ({d['date']}, {d['machine']})"


def main() -> None:
    text = TEMPLATE.read_text()
    text = text.replace("{{ACCEPTANCE}}", acceptance())
    text = text.replace("{{GUIDANCE}}", report("guidance-gaussians.json", "guidance-gaussians-2.json", "guidance-nerf-quick.json"))
    text = text.replace("{{JANUS}}", janus()).replace("{{KERNELS}}", kernels()).replace("{{PROFILE}}", profile()).replace("{{NERF}}", quality("quality-nerf.json"))
    text = text.replace("{{MESH}}", quality("quality-mesh.json") if (R / "quality-mesh.json").is_file() else "(not measured)")
    gaussians = json.loads((R / "quality-gaussians.json").read_text())
    text = text.replace("{{GAUSSIANS}}", quality("quality-gaussians.json") if gaussians.get("mean_chamfer") else "")
    OUTPUT.write_text(text)
    sys.stdout.write(f"wrote {OUTPUT}\n")


if __name__ == "__main__":
    main()
