"""Stage profiler: exclusive times of nested stages (on a fake clock), the teacher's methods timed
as their own stage, the no-op default, and the stages of a tiny real training loop."""

from __future__ import annotations

import contextlib

import pytest

from lift3d import profiling
from lift3d.config import load_config
from lift3d.profiling import NULL_PROFILER, STAGES, StageProfiler
from lift3d.train import Trainer
from conftest import QUICKSTART, TINY_QUICKSTART


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(profiling.time, "perf_counter", fake)
    return fake


def test_nested_stages_are_exclusive_and_warmup_is_skipped(clock: FakeClock) -> None:
    profiler = StageProfiler(skip_steps=1)
    for step in range(3):
        with profiler.stage("guidance"):
            clock.now += 1.0
            with profiler.stage("teacher"):
                clock.now += 3.0
            clock.now += 0.5
        with profiler.stage("backward"):
            clock.now += 2.0
        profiler.step_done()
    summary = profiler.summary()
    assert summary["steps"] == 2
    rows = {row["stage"]: row for row in summary["stages"]}
    assert rows["guidance"]["ms_per_step"] == pytest.approx(1500.0)
    assert rows["teacher"]["ms_per_step"] == pytest.approx(3000.0)
    assert rows["backward"]["ms_per_step"] == pytest.approx(2000.0)
    assert sum(row["share"] for row in summary["stages"]) == pytest.approx(1.0)
    assert summary["step_ms_median"] == pytest.approx(6500.0)
    assert [row["stage"] for row in summary["stages"]] == ["teacher", "guidance", "backward"]  # loop order
    assert all(row["peak_rss_mib"] > 0 for row in summary["stages"])


def test_instrument_teacher_times_its_methods_as_the_teacher_stage(clock: FakeClock) -> None:
    class Teacher:
        def predict_noise(self, x: float) -> float:
            clock.now += 4.0
            return 2 * x

    teacher = Teacher()
    profiler = StageProfiler()
    profiler.instrument_teacher(teacher)
    profiler.instrument_teacher(teacher)  # idempotent: not wrapped twice
    with profiler.stage("guidance"):
        assert teacher.predict_noise(3.0) == 6.0
        clock.now += 1.0
    profiler.step_done()
    rows = {row["stage"]: row for row in profiler.summary()["stages"]}
    assert rows["teacher"]["ms_per_step"] == pytest.approx(4000.0)
    assert rows["teacher"]["calls_per_step"] == 1
    assert rows["guidance"]["ms_per_step"] == pytest.approx(1000.0)
    assert "predict_noise" not in vars(Teacher())  # the class is untouched


def test_default_profiler_is_a_shared_no_op() -> None:
    assert isinstance(NULL_PROFILER.stage("render"), contextlib.nullcontext)
    assert NULL_PROFILER.stage("render") is NULL_PROFILER.stage("backward")


def test_tiny_training_loop_reports_every_stage(tmp_path) -> None:
    config = load_config(QUICKSTART, [*TINY_QUICKSTART, "trainer.steps=3", "trainer.progress_bar=false"])
    trainer = Trainer(config, run_dir=tmp_path / "run")
    assert trainer.profiler is NULL_PROFILER
    profiler = StageProfiler(skip_steps=1)
    profiler.attach(trainer)
    trainer.finish = lambda: {}  # evaluation and export are not part of a step
    trainer.fit()
    summary = profiler.summary()
    assert summary["steps"] == 2
    names = [row["stage"] for row in summary["stages"]]
    assert set(names) == set(STAGES)
    assert names == [name for name in STAGES if name in names]
    assert sum(row["share"] for row in summary["stages"]) == pytest.approx(1.0)
    assert {row["stage"]: row["calls_per_step"] for row in summary["stages"]}["optimizer"] == 2  # zero_grad, step


def test_a_given_clock_times_the_stages() -> None:
    """``clock=time.process_time`` (CPU time) replaces the wall clock everywhere."""
    fake = FakeClock()
    profiler = StageProfiler(clock=fake)
    with profiler.stage("render"):
        fake.now += 0.25
    profiler.step_done()
    summary = profiler.summary()
    assert summary["stages"][0]["ms_per_step"] == pytest.approx(250.0)
    assert summary["step_ms_median"] == pytest.approx(250.0)


def test_every_term_teacher_of_a_hybrid_is_timed_as_teacher(tmp_path) -> None:
    overrides = ["trainer.steps=2", "trainer.progress_bar=false", "trainer.cameras.width=16", "trainer.cameras.height=16",
                 "representation.num_points=100", "guidance.entries.image.teacher.resolution=16",
                 "guidance.entries.clip.teacher.resolution=16"]
    trainer = Trainer(load_config("configs/quickstart-4d.yaml", overrides), run_dir=tmp_path / "run")
    profiler = StageProfiler()
    profiler.attach(trainer)
    assert trainer.profiler is profiler
    teachers = [term.teacher for term in trainer.guidance.terms()]
    assert len({id(t) for t in teachers}) == 2 and all(t is not trainer.teacher for t in teachers)
    for teacher in teachers:
        assert getattr(teacher.predict_noise, "_lift3d_profiled", False)
    trainer.finish = lambda: {}
    trainer.fit()
    rows = {row["stage"]: row for row in profiler.summary()["stages"]}
    # Per step each of the two terms conditions, encodes and predicts at least once (the run's own
    # teacher, the only one instrumented before, is not called by the loop at all here).
    assert rows["teacher"]["calls_per_step"] >= 6 and rows["teacher"]["ms_per_step"] > 0
