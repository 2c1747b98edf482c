"""Where a training step's time goes: wall time and peak memory per stage of ``Trainer.train_step``.

The loop (``lift3d/train.py``) wraps each stage in ``with trainer.profiler.stage(name):``. By
default ``trainer.profiler`` is :data:`NULL_PROFILER`, whose ``stage`` hands back one shared
no-op context manager, so an unprofiled run pays a method call per stage and nothing else.
``benchmarks/step_profile.py`` swaps in a :class:`StageProfiler`.

Stages nest: time spent inside an inner stage is the inner stage's alone (exclusive times), so the
shares of a step add up to one. The teacher's own work (``encode_images``, ``predict_noise``,
``decode``), which the guidance calls, is timed as ``teacher`` by wrapping those methods of the
Teacher interface (:meth:`StageProfiler.instrument_teacher`), without touching any guidance.

Peak memory is the process's peak resident set size during the stage (Linux: the high-water mark
is reset through ``/proc/self/clear_refs`` when a stage starts and read from ``VmHWM`` when it
ends; elsewhere ``ru_maxrss``, which only grows).
"""

from __future__ import annotations

import contextlib
import functools
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("camera", "render", "teacher", "guidance", "backward", "optimizer", "hooks", "logging")
"""The stages of a step, in loop order. ``teacher``: prompt conditioning, encode, noise prediction
(UNet or analytic score), decode; ``guidance``: the rest of the objective and the regularizers;
``backward``: ``loss.backward()`` (for a latent teacher it includes the VAE encoder's backward);
``optimizer``: zero_grad, clipping, steps; ``hooks``: ``Representation.on_step`` (densify,
occupancy-grid update, ...); ``logging``: metrics, validation images and checkpoints."""

TEACHER_METHODS = ("condition", "encode_images", "predict_noise", "decode")
"""The Teacher-interface methods timed as the ``teacher`` stage."""

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_peak_rss() -> bool:
    """Restart the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        _PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def current_peak_rss_bytes() -> int:
    """Peak RSS of this process since the last reset (``VmHWM``), else its lifetime peak."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


@dataclass
class StageStats:
    """Accumulated figures of one stage."""

    seconds: float = 0.0
    """Exclusive wall time summed over the recorded steps."""
    calls: int = 0
    """How many times the stage was entered."""
    peak_rss_bytes: int = 0
    """Largest peak RSS seen while the stage ran."""


class NullProfiler:
    """Profiles nothing: every ``stage`` is the same no-op context manager."""

    enabled = False
    _NULL = contextlib.nullcontext()

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._NULL

    def step_done(self) -> None:
        """Nothing to count."""


NULL_PROFILER = NullProfiler()
"""The default profiler of a Trainer."""


@dataclass
class StageProfiler:
    """Exclusive time (by ``clock``) and peak RSS per stage, summed over the steps after ``skip_steps``."""

    skip_steps: int = 0
    """Steps not recorded at the start (warm-up: first calls build caches and fault in memory)."""
    synchronize: Callable[[], None] | None = None
    """Called at stage edges so asynchronous devices (CUDA) finish their work inside the stage."""
    clock: Callable[[], float] | None = None
    """Seconds; None: wall time (``time.perf_counter``). ``time.process_time`` counts CPU time,
    which other jobs on a shared machine do not inflate (with one thread, the stages' own work)."""
    stats: dict[str, StageStats] = field(default_factory=dict)
    steps: int = 0
    """Steps recorded so far."""
    step_seconds: list[float] = field(default_factory=list)
    """Time of each recorded step (from its first stage to ``step_done``)."""
    peak_rss_bytes: int = 0
    """Largest peak RSS over the recorded steps."""
    enabled = True

    def __post_init__(self) -> None:
        self._stack: list[list[Any]] = []  # [name, start, child seconds]
        self._seen = 0
        self._step_start: float | None = None

    def _now(self) -> float:
        return self.clock() if self.clock is not None else time.perf_counter()

    @property
    def recording(self) -> bool:
        return self._seen >= self.skip_steps

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.synchronize is not None:
            self.synchronize()
        if self._step_start is None:
            self._step_start = self._now()
        _reset_peak_rss()  # the mark restarts; an enclosing stage keeps the larger of its parts
        start = self._now()
        self._stack.append([name, start, 0.0])
        try:
            yield
        finally:
            if self.synchronize is not None:
                self.synchronize()
            elapsed = self._now() - start
            peak = current_peak_rss_bytes()
            _, _, children = self._stack.pop()
            if self._stack:
                self._stack[-1][2] += elapsed
            if self.recording:
                stats = self.stats.setdefault(name, StageStats())
                stats.seconds += elapsed - children
                stats.calls += 1
                stats.peak_rss_bytes = max(stats.peak_rss_bytes, peak)
                for outer in self._stack:  # the enclosing stages' peaks include this one
                    outer_stats = self.stats.setdefault(outer[0], StageStats())
                    outer_stats.peak_rss_bytes = max(outer_stats.peak_rss_bytes, peak)
                self.peak_rss_bytes = max(self.peak_rss_bytes, peak)

    def step_done(self) -> None:
        """Mark the end of a training step (after its logging)."""
        if self.recording and self._step_start is not None:
            self.steps += 1
            self.step_seconds.append(self._now() - self._step_start)
        self._seen += 1
        self._step_start = None

    def attach(self, trainer: Any) -> None:
        """Profile ``trainer``'s loop: become its profiler and time every teacher it calls as
        ``teacher`` (the run's and each guidance term's, e.g. a hybrid's clip teacher)."""
        for teacher in (trainer.teacher, *(term.teacher for term in trainer.guidance.terms())):
            self.instrument_teacher(teacher)
        trainer.profiler = self

    def instrument_teacher(self, teacher: Any) -> None:
        """Time the teacher's :data:`TEACHER_METHODS` as the ``teacher`` stage (instance attributes
        wrapping the bound methods; the class is untouched)."""
        for name in TEACHER_METHODS:
            method = getattr(teacher, name, None)
            if method is None or getattr(method, "_lift3d_profiled", False):
                continue

            def timed(*args: Any, _method: Callable[..., Any] = method, **kwargs: Any) -> Any:
                with self.stage("teacher"):
                    return _method(*args, **kwargs)

            functools.update_wrapper(timed, method)
            timed._lift3d_profiled = True  # type: ignore[attr-defined]
            object.__setattr__(teacher, name, timed)

    def summary(self) -> dict[str, Any]:
        """Per stage: mean ms per step, share of the step, calls per step, peak RSS (MiB)."""
        steps = max(self.steps, 1)
        total = sum(s.seconds for s in self.stats.values())
        order = [name for name in STAGES if name in self.stats] + sorted(set(self.stats) - set(STAGES))
        rows = [
            {
                "stage": name,
                "ms_per_step": 1e3 * self.stats[name].seconds / steps,
                "share": self.stats[name].seconds / total if total > 0 else 0.0,
                "calls_per_step": self.stats[name].calls / steps,
                "peak_rss_mib": self.stats[name].peak_rss_bytes / 2**20,
            }
            for name in order
        ]
        step_ms = sorted(1e3 * s for s in self.step_seconds)
        median = step_ms[len(step_ms) // 2] if step_ms else 0.0
        return {
            "steps": self.steps,
            "step_ms_median": median,
            "step_ms_mean": 1e3 * sum(self.step_seconds) / steps,
            "peak_rss_mib": self.peak_rss_bytes / 2**20,
            "stages": rows,
        }


__all__ = ["NULL_PROFILER", "STAGES", "NullProfiler", "StageProfiler", "StageStats", "current_peak_rss_bytes"]
