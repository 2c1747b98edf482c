"""Preemption-safe runs, in real processes: SIGTERM mid-run then resume equals an uninterrupted run
bit for bit; SIGKILL during a checkpoint write leaves the previous checkpoint loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lift3d.checkpoint import load_checkpoint, load_latest_checkpoint, save_rotating_checkpoint, step_checkpoints

from conftest import QUICKSTART, TINY_QUICKSTART

ROOT = Path(__file__).resolve().parents[1]
RUN = [*TINY_QUICKSTART, "trainer.steps=24", "trainer.eval.num_views=2", "export.formats=[ply]",
       "representation.densify.start_step=4", "representation.densify.interval=4", "trainer.progress_bar=false"]
TIMEOUT = 300


def _cli(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lift3d.cli", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def _wait_until(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _final_state(run_dir: Path) -> dict:
    state = load_checkpoint(run_dir / "ckpt" / "last.pt")
    assert state["step"] == 24
    return state["representation"]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _assert_same_run(a: Path, b: Path) -> None:
    first, second = _final_state(a), _final_state(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert _losses(a) == _losses(b)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    process = _cli("run", QUICKSTART, "--out", str(run_dir), *RUN)
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, err[-2000:]
    return run_dir


def test_sigterm_checkpoints_exits_143_and_resumes_bit_for_bit(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    process = _cli("run", QUICKSTART, "--out", str(run_dir), *RUN)
    _wait_until(lambda: _steps_logged(run_dir) >= 6, process, "step 6")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 143, err[-2000:]
    stopped_at = load_checkpoint(run_dir / "ckpt" / "last.pt")["step"]
    assert 6 <= stopped_at < 24
    assert f"interrupted by SIGTERM at step {stopped_at}" in err
    assert f"resume={run_dir}" in err  # the message says how to go on

    resumed = _cli("run", QUICKSTART, *RUN, f"resume={run_dir}")
    _, err = resumed.communicate(timeout=TIMEOUT)
    assert resumed.returncode == 0, err[-2000:]
    _assert_same_run(uninterrupted, run_dir)


# Runs the trainer with a torch.save that, from the second checkpoint on, writes half a file and
# then hangs, so the test can SIGKILL the process in the middle of a checkpoint write.
SLOW_WRITE = textwrap.dedent(
    """
    import io, sys, time
    import torch
    import lift3d.checkpoint as checkpoint
    from lift3d.config import load_config
    from lift3d.train import Trainer

    real_save, calls = torch.save, []

    def hanging_save(obj, handle):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, handle)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        handle.flush()
        print("WRITING", flush=True)
        time.sleep(600)

    checkpoint.torch.save = hanging_save
    run_dir, overrides = sys.argv[1], sys.argv[2:]
    Trainer(load_config(%r, overrides), run_dir=run_dir).fit()
    """
) % QUICKSTART


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, str(run_dir), *RUN, "trainer.checkpoint_every=5"],
                               cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = process.stdout.readline()  # blocks until the second checkpoint is half written
    assert line.strip() == "WRITING", process.communicate()[1][-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=TIMEOUT)
    assert process.returncode == -signal.SIGKILL
    partial = list((run_dir / "ckpt").glob(".*.tmp"))
    assert partial, "the killed write should have left its temporary file"
    path, state = load_latest_checkpoint(run_dir)
    assert path.name == "last.pt" and state["step"] == 5  # the one before the interrupted write

    resumed = _cli("run", QUICKSTART, *RUN, "trainer.checkpoint_every=5", f"resume={run_dir}")
    _, err = resumed.communicate(timeout=TIMEOUT)
    assert resumed.returncode == 0, err[-2000:]
    assert not list((run_dir / "ckpt").glob(".*.tmp"))  # partial writes are cleared on resume
    _assert_same_run(uninterrupted, run_dir)


def test_rotation_keeps_the_newest_and_resume_skips_a_damaged_last(tmp_path):
    directory = tmp_path / "run" / "ckpt"
    for step in (1, 2, 3, 4, 5):
        save_rotating_checkpoint(directory, step, {"step": step, "payload": torch.full((3,), float(step))}, keep=2)
    assert [step for step, _ in step_checkpoints(directory)] == [4, 5]
    assert load_checkpoint(directory / "last.pt")["step"] == 5
    (directory / "last.pt").unlink()  # last.pt is a link: damaging it must not damage step_5
    (directory / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    path, state = load_latest_checkpoint(tmp_path / "run")
    assert path.name == "step_000005.pt" and state["step"] == 5
    (directory / "step_000005.pt").write_bytes(b"garbage")
    path, state = load_latest_checkpoint(tmp_path / "run")
    assert path.name == "step_000004.pt" and torch.equal(state["payload"], torch.full((3,), 4.0))
