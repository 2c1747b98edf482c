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


def _run_line(data):
    """What a results file says about how it was measured: clock, date, load average, command."""
    parts = []
    if data.get("clock"):
        parts.append("CPU time of the process" if data["clock"] == "cpu" else "wall-clock time")
    if data.get("date"):
        parts.append(data["date"])
    if data.get("load_average"):
        parts.append("load average " + " / ".join(f"{v:.2f}" for v in data["load_average"]) + " (1 / 5 / 15 min) at the end")
    line = ", ".join(parts)
    return (f" `{data['command']}`" if data.get("command") else "") + (f" ({line})" if line else "")


def kernels(name="kernels.json"):
    path = R / name
    if not path.is_file():
        return "(not measured)"
    data = json.loads(path.read_text())
    lines = ["| case | size | tier | median ms | speed-up vs reference | max rel. error | peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        speed = "– (reference not run: too slow)" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.1f}×"
        error = "–" if r["max_relative_error"] is None else f"{r['max_relative_error']:.1e}"
        rss = "–" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:.0f}"
        lines.append(f"| {r['case']} | {r['size']} | {r['tier']} | {r['median_ms']:.1f} | {speed} | {error} | {rss} |")
    m = data["machine"]
    return "\n".join(lines) + (f"\n\nMachine: {m['platform']}, {m['threads']} threads, torch {m['torch']}, {data['repeats']} timed "
                               f"runs per tier (median).{_run_line(data)}")


def kernels_ab(pairs):
    """One row per (case, size, run) of A/B kernel results: ``pairs`` is [(label, main file, branch
    file)]; each file's cpu tier against the reference timed in that same file."""
    lines = ["| case | size | run | reference ms (main's run / this branch's) | main: cpu ms (speed-up) | this branch: cpu ms "
             "(speed-up) | peak RSS MiB, cpu tier: main / this branch |", "|---|---|---|---|---|---|---|"]
    for label, main_name, branch_name in pairs:
        if not ((R / main_name).is_file() and (R / branch_name).is_file()):
            continue
        main, branch = (json.loads((R / n).read_text())["results"] for n in (main_name, branch_name))
        for a in (r for r in main if r["tier"] == "cpu"):
            b = next(r for r in branch if (r["case"], r["size"], r["tier"]) == (a["case"], a["size"], "cpu"))
            ref = [next(r for r in rs if (r["case"], r["size"], r["tier"]) == (a["case"], a["size"], "reference"))
                   for rs in (main, branch)]
            lines.append(f"| {a['case']} | {a['size']} | {label} | {ref[0]['median_ms']:.1f} / {ref[1]['median_ms']:.1f} | "
                         f"{a['median_ms']:.2f} ({a['speedup_vs_reference']:.1f}×) | **{b['median_ms']:.2f} ({b['speedup_vs_reference']:.1f}×)** | "
                         f"{a['peak_rss_mib']:.0f} / {b['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def kernels_vs_main(main_name, branch_name, label="this branch"):
    """One row per (case, size) of the cpu tier: main's run against ``label``'s, each file timed
    by the same command on its own checkout; the reference where it ran."""
    if not ((R / main_name).is_file() and (R / branch_name).is_file()):
        return "(not measured)"
    main, branch = (json.loads((R / n).read_text()) for n in (main_name, branch_name))
    lines = [f"| case | size | main: cpu ms | {label}: cpu ms | main / {label} | reference ms (main's run / {label}'s) "
             f"| max rel. error vs reference, {label} | peak RSS MiB, cpu tier: main / {label} |",
             "|---|---|---|---|---|---|---|---|"]
    for a in (r for r in main["results"] if r["tier"] == "cpu"):
        key = (a["case"], a["size"])
        b = next(r for r in branch["results"] if (r["case"], r["size"], r["tier"]) == (*key, "cpu"))
        refs = [next((r for r in d["results"] if (r["case"], r["size"], r["tier"]) == (*key, "reference")), None)
                for d in (main, branch)]
        ref = " / ".join(f"{r['median_ms']:.0f}" for r in refs) if all(refs) else "– (not run: too large)"
        error = "–" if b["max_relative_error"] is None else f"{b['max_relative_error']:.1e}"
        lines.append(f"| {a['case']} | {a['size']} | {a['median_ms']:.2f} | **{b['median_ms']:.2f}** | "
                     f"**{a['median_ms'] / b['median_ms']:.1f}×** | {ref} | {error} | "
                     f"{a['peak_rss_mib']:.0f} / {b['peak_rss_mib']:.0f} |")
    m = branch["machine"]
    return "\n".join(lines) + (f"\n\nMachine: {m['platform']}, {m['threads']} thread, torch {m['torch']}, "
                               f"{branch['repeats']} timed runs per tier (median). {label.capitalize()}:{_run_line(branch)}; "
                               f"main:{_run_line(main)}")


def profile(name="profile.json"):
    path = R / name
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
    clocks = sorted({r.get("clock", "wall") for r in data["results"]})
    clock = " and ".join("CPU time" if c == "cpu" else "wall-clock time" for c in clocks)
    dates = sorted({r["date"] for r in data["results"] if r.get("date")})
    measured = f" Measured {', '.join(dates)}." if dates else ""
    return "\n".join(lines) + (f"\n\nMachine: {m['platform']}, {m['threads']} threads, torch {m['torch']}; {clock}.{measured} Each cell: "
                               "share of the step (ms per step, peak RSS during that stage).")


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
    text = text.replace("{{KERNELS_RAYMARCH}}", kernels("kernels-raymarch.json"))
    text = text.replace("{{KERNELS_RAYMARCH_AB}}", kernels_ab([
        ("1 thread, CPU time", "kernels-raymarch-main.json", "kernels-raymarch.json"),
        ("2 threads, wall clock", "kernels-raymarch-main-2threads.json", "kernels-raymarch-2threads.json"),
    ]))
    text = text.replace("{{PROFILE_MAIN}}", profile("profile-main.json"))
    text = text.replace("{{PROFILE_AFTER}}", profile("profile-after-cuts.json"))
    text = text.replace("{{KERNELS_GAUSSIAN_AB}}", kernels_vs_main("kernels-gaussian_raster-main.json",
                                                                   "kernels-gaussian_raster.json"))
    text = text.replace("{{KERNELS_GAUSSIAN_BASELINE}}", kernels_vs_main(
        "kernels-gaussian_raster-main.json", "kernels-gaussian_raster-baseline.json", label="baseline build"))
    text = text.replace("{{PROFILE_GAUSSIANS}}", profile("profile-gaussians.json"))
    text = text.replace("{{PROFILE_GAUSSIANS_MAIN}}", profile("profile-gaussians-main.json"))
    text = text.replace("{{MESH}}", quality("quality-mesh.json") if (R / "quality-mesh.json").is_file() else "(not measured)")
    gaussians = json.loads((R / "quality-gaussians.json").read_text())
    text = text.replace("{{GAUSSIANS}}", quality("quality-gaussians.json") if gaussians.get("mean_chamfer") else "")
    OUTPUT.write_text(text)
    sys.stdout.write(f"wrote {OUTPUT}\n")


if __name__ == "__main__":
    main()
