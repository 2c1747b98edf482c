"""benchmarks/guidance.py end to end at toy sizes: both suites, the JSON and the Janus measure."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("guidance_benchmark", ROOT / "benchmarks" / "guidance.py")
guidance_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guidance_benchmark)  # loaded by path: benchmarks/ is not a package

TOY = ["trainer.cameras.width=16", "trainer.cameras.height=16", "trainer.cameras.batch_size=2",
       "trainer.eval.width=16", "trainer.eval.height=16", "trainer.eval.num_views=2", "teacher.resolution=16",
       "representation.num_points=200", "representation.mesh_resolution=32"]


def test_benchmark_writes_both_suites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "guidance.json"
    code = guidance_benchmark.main(["--objectives", "sds", "--representations", "gaussians", "--num-prompts", "1",
                                    "--steps", "2", "--json", str(out), *TOY])
    assert code == 0
    summary = json.loads(out.read_text())
    suites = {r["suite"]: r for r in summary["results"]}
    assert set(suites) == {"quality", "janus", "janus-vd"}
    assert suites["quality"]["mean_psnr"] is not None and suites["quality"]["mean_chamfer"] is not None
    assert 0.0 <= suites["janus"]["janus_rate"] <= 1.0
    assert "summary" in capsys.readouterr().out
    report = guidance_benchmark.markdown_report([out])
    rows = [line for line in report.splitlines() if line.startswith("| sds | gaussians |")]
    assert len(rows) == 3 and f"{suites['quality']['mean_psnr']:.2f}" in rows[0]
