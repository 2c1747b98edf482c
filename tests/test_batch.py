"""``lift3d batch``: one run per prompt, failures recorded, re-runs skip finished prompts and resume
interrupted ones (also after SIGTERM), sharding over ranks started by torchrun's launcher."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lift3d.cli import main
from lift3d.prompts import load_prompts

from conftest import QUICKSTART, TINY_QUICKSTART

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_QUICKSTART, "trainer.eval.num_views=2", "export.formats=[ply]",
        "trainer.progress_bar=false"]
TIMEOUT = 300


def _rows(out: Path) -> dict[str, dict]:
    return {row["prompt"]: row for row in map(json.loads, (out / "batch.jsonl").read_text().splitlines())}


def test_batch_records_failures_goes_on_and_reruns_only_what_is_unfinished(tmp_path, capsys):
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("# three prompts, one the analytic teacher cannot draw\na red sphere\na hamburger\nA Red Sphere!\n")
    out = tmp_path / "batch"
    assert main(["batch", QUICKSTART, str(corpus), "--out", str(out), *TINY]) == 1  # one failed
    rows = _rows(out)
    assert list(rows) == ["a red sphere", "a hamburger", "A Red Sphere!"]
    assert [rows[p]["run_dir"] for p in rows] == ["a-red-sphere", "a-hamburger", "a-red-sphere-2"]  # slugs collide
    assert rows["a hamburger"]["status"] == "failed" and "unknown word 'hamburger'" in rows["a hamburger"]["error"]
    for prompt in ("a red sphere", "A Red Sphere!"):
        assert rows[prompt]["status"] == "done" and rows[prompt]["metrics"]["eval/psnr"] > 5
        assert (out / rows[prompt]["run_dir"] / "export" / "gaussians.ply").is_file()
    printed = capsys.readouterr().out
    assert "prompts 3: 2 done, 1 failed" in printed and "eval/psnr" in printed

    finished = out / "a-red-sphere" / "metrics.jsonl"
    before = finished.stat().st_mtime_ns
    corpus.write_text("a red sphere\na blue cube\nA Red Sphere!\n")  # the bad prompt fixed
    assert main(["batch", QUICKSTART, str(corpus), "--out", str(out), *TINY]) == 0
    assert finished.stat().st_mtime_ns == before  # not redone
    assert {row["status"] for row in _rows(out).values()} == {"done"}


def test_sigterm_stops_the_batch_and_a_rerun_finishes_the_rest(tmp_path):
    corpus = tmp_path / "prompts.txt"
    prompts = ["a red sphere", "a blue cube", "a yellow torus", "a green cone"]
    corpus.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "batch"
    command = [sys.executable, "-m", "lift3d", "batch", QUICKSTART, str(corpus), "--out", str(out), *TINY,
               "trainer.steps=30", "trainer.log_every=1"]
    process = subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    second = out / "a-blue-cube" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while not (second.is_file() and len(second.read_text().splitlines()) >= 3):  # inside the second prompt
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 143, err[-2000:]
    rows = _rows(out)
    assert rows["a red sphere"]["status"] == "done"
    assert rows["a blue cube"]["status"] == "interrupted"
    assert rows["a yellow torus"]["status"] == rows["a green cone"]["status"] == "pending"
    finished = (out / "a-red-sphere" / "metrics.jsonl").read_text()

    rerun = subprocess.run(command, cwd=ROOT, text=True, capture_output=True, timeout=TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "1 already done" in rerun.stderr and "resuming from" in rerun.stderr
    assert (out / "a-red-sphere" / "metrics.jsonl").read_text() == finished  # the finished prompt untouched
    rows = _rows(out)
    assert all(row["status"] == "done" for row in rows.values()) and len(rows) == 4
    assert "prompts 4: 4 done" in rerun.stdout


def test_workers_shard_the_prompts_over_torchrun_ranks(tmp_path):
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps({"splits": {"train": ["a red sphere", "a blue cube"], "test": ["a gray capsule"]}}))
    out = tmp_path / "batch"
    result = subprocess.run(
        [sys.executable, "-m", "lift3d", "batch", QUICKSTART, str(corpus), "--out", str(out), "--workers", "2", *TINY],
        cwd=ROOT, text=True, capture_output=True, timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(rank 0 of 2): 2 to run here" in result.stderr and "(rank 1 of 2): 1 to run here" in result.stderr
    rows = _rows(out)
    assert list(rows) == ["a red sphere", "a blue cube", "a gray capsule"]
    assert all(row["status"] == "done" for row in rows.values())
    assert "prompts 3: 3 done" in result.stdout


def test_load_prompts_reads_text_and_json_corpora(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("# comment\n a red sphere \n\na red sphere\na blue cube\n")
    assert load_prompts(text) == ["a red sphere", "a blue cube"]
    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps({"splits": {"train": ["a", "b"], "test": ["c", "a"]}}))
    assert load_prompts(corpus) == ["a", "b", "c"]
    assert load_prompts(corpus, "test") == ["c", "a"]
    with pytest.raises(ValueError, match="no split 'val'; valid splits: train, test"):
        load_prompts(corpus, "val")
    with pytest.raises(ValueError, match="has no splits"):
        load_prompts(text, "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
