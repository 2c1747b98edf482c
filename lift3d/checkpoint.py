"""Checkpoints: written atomically (temp file + rename), read with ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch


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
