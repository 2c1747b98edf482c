"""Prompt text helpers: safe folder names and prompt corpora (one prompt per line)."""

from __future__ import annotations

import json
import re
from pathlib import Path

MAX_SLUG_LENGTH = 80


def slugify(prompt: str) -> str:
    """A folder name for a prompt: lowercase ``[a-z0-9-]`` only, so no prompt can name a path
    outside its parent folder (``../``, ``/``, ``~`` and dots all vanish)."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:MAX_SLUG_LENGTH].rstrip("-") or "prompt"


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-empty lines of a prompt corpus, ``#`` comments dropped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def load_prompts(path: str | Path, split: str | None = None) -> list[str]:
    """The prompts of a corpus file: a text file (:func:`read_prompt_file`) or a JSON corpus
    ``{"splits": {"train": [...], "val": [...], "test": [...]}, ...}`` (or a plain JSON list).
    ``split`` picks one split of a JSON corpus; None takes every split in order. Duplicates are
    dropped (first occurrence kept). Errors name the file and the valid splits."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt corpus {str(path)!r} does not exist")
    if path.suffix.lower() != ".json":
        if split is not None:
            raise ValueError(f"{path}: a text corpus has no splits (got split={split!r}); use a JSON corpus")
        prompts = read_prompt_file(path)
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if isinstance(data, list):
            splits = {"all": data}
        elif isinstance(data, dict) and isinstance(data.get("splits"), dict):
            splits = data["splits"]
        else:
            raise ValueError(f"{path}: a JSON corpus is a list of prompts or an object with a 'splits' mapping")
        if split is not None and split not in splits:
            raise ValueError(f"{path}: no split {split!r}; valid splits: {', '.join(splits)}")
        chosen = [splits[split]] if split is not None else list(splits.values())
        prompts = [p for part in chosen for p in part]
        bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ValueError(f"{path}: every prompt must be a non-empty string, got {bad[0]!r}")
        prompts = [p.strip() for p in prompts]
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise ValueError(f"{path}: no prompts" + (f" in split {split!r}" if split else ""))
    return prompts
