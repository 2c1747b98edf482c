"""Checkpoints: written atomically (temp file + rename), read with ``weights_only=True``.

A run folder's ``ckpt/`` holds ``step_<N>.pt`` files (the newest few are kept) and ``last.pt``, a
hard link to (or, where links are not possible, a copy of) the newest. A process killed at any
moment, even during a write, leaves every one of them either complete or untouched: a write goes
to a hidden temporary file that is renamed over the target only once it is on disk.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch


logger = logging.getLogger(__name__)

LAST = "last.pt"
STEP_FILE = re.compile(r"step_(\d+)\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not a lift3d checkpoint."""


FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` so that a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        torch.save({"format_version": FORMAT_VERSION, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a power cut must not undo it)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def step_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step_<N>.pt`` files in ``directory``, oldest first."""
    found = []
    for path in Path(directory).glob("step_*.pt"):
        match = STEP_FILE.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_rotating_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``step_<step>.pt``, point ``last.pt`` at it and delete all but the newest ``keep``
    step files (``last.pt`` always stays). Returns the step file."""
    directory = Path(directory)
    path = directory / f"step_{step:06d}.pt"
    save_checkpoint(path, state)
    temporary = directory / f".{LAST}.tmp"
    temporary.unlink(missing_ok=True)
    try:
        os.link(path, temporary)  # free, and atomic once renamed
    except OSError:
        shutil.copyfile(path, temporary)
    os.replace(temporary, directory / LAST)
    _sync_directory(directory)
    for _, old in step_checkpoints(directory)[: -max(keep, 1)]:
        old.unlink(missing_ok=True)
    return path


def remove_partial_writes(directory: Path) -> None:
    """Delete temporary files that a process killed mid-write left in ``directory``."""
    for stale in Path(directory).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def load_latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The newest loadable checkpoint of a run folder: ``last.pt``, else the step files newest
    first (a damaged file is skipped with a warning). ``CheckpointError`` if none loads."""
    directory = Path(run_dir) / "ckpt"
    candidates = [directory / LAST] + [path for _, path in reversed(step_checkpoints(directory))]
    candidates = [path for path in candidates if path.is_file()]
    if not candidates:
        raise CheckpointError(f"run folder {str(run_dir)!r} has no checkpoint in ckpt/")
    errors = []
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            logger.warning("skipping %s: %s", path, error)
            errors.append(str(error))
    raise CheckpointError(f"no checkpoint of {str(run_dir)!r} can be loaded: {'; '.join(errors)}")


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or ``ckpt/last.pt`` of a run folder."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "ckpt" / "last.pt"
        if not candidate.is_file():
            raise CheckpointError(f"run folder {str(path)!r} has no checkpoint at ckpt/last.pt")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; clear errors for damaged files."""
    path = resolve_checkpoint_path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt and cannot be resumed "
            f"({str(error).splitlines()[0]}); pass an earlier step checkpoint from the same ckpt/ folder"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} is not a lift3d checkpoint (format {FORMAT_VERSION})")
    return state


def resolve_init_from(source: str | Path, key: str = "representation.init_from") -> Path:
    """The checkpoint an ``init_from`` option names (a file or a run folder), as ``FileNotFoundError`` naming ``key``."""
    try:
        return resolve_checkpoint_path(Path(source).expanduser())
    except CheckpointError as error:
        raise FileNotFoundError(f"{key}: {error}") from None


def run_dir_of_checkpoint(path: Path) -> Path:
    """The run folder holding ``<run>/ckpt/<file>.pt``."""
    return Path(path).resolve().parent.parent


def load_run_representation(source: str | Path, key: str = "representation.init_from") -> "torch.nn.Module":
    """The representation of another run, for ``init_from`` options: built on the CPU from the
    run's ``config.yaml``, loaded from the checkpoint ``source`` names (a file or a run folder),
    in eval mode. Errors name ``key``."""
    from lift3d.config import load_config  # lazy: config and train import this module
    from lift3d.train import build_representation

    checkpoint = resolve_init_from(source, key)
    run_dir = run_dir_of_checkpoint(checkpoint)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{key}: no config.yaml in the run folder {run_dir}")
    representation = build_representation(load_config(run_dir / "config.yaml"), torch.device("cpu"))
    representation.load_state_dict(load_checkpoint(checkpoint)["representation"])
    return representation.eval()
