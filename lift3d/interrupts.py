"""Stopping long work cleanly on SIGINT (Ctrl-C) and SIGTERM (what SLURM, Kubernetes and spot
instances send before they kill a job).

A loop runs inside :func:`graceful_stop` and polls :attr:`StopRequest.signal_name` between units
of work (training steps, prompts): the first signal only asks it to stop, so the loop finishes the
unit in flight, checkpoints a consistent state and raises :class:`RunInterrupted`. A second signal
stops at once with ``KeyboardInterrupt`` (the last periodic checkpoint is then what remains).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """Work stopped on a signal after saving what it had; the CLI exits with ``128 + signum``."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, run_dir: Path):
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.run_dir = run_dir
        """The folder to pass as ``resume=`` (a pipeline sets its own root here)."""
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by a signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


@dataclass
class StopRequest:
    """Set by the first stop signal; polled by the loop between units of work."""

    signum: int | None = None
    """The signal received, or None while no stop was asked for."""

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextmanager
def graceful_stop(what: str = "the run") -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM set the yielded request instead of killing the process;
    a second one raises ``KeyboardInterrupt``. Outside the main thread (where Python cannot install
    handlers) the block runs with the process's handlers unchanged."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame) -> None:  # noqa: ARG001 (the signal module's signature)
        if request.requested:
            raise KeyboardInterrupt
        request.signum = signum
        logger.warning("%s received: %s stops after the current step and checkpoints (send it again to stop at once)",
                       signal.Signals(signum).name, what)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
