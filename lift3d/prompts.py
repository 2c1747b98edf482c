"""Prompt text helpers: safe folder names and prompt corpora (one prompt per line)."""

from __future__ import annotations

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
