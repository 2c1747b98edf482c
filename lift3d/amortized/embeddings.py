"""Text embeddings of a whole prompt corpus, computed once and memory-mapped from disk.

``CorpusEmbeddings`` keys every row by (teacher identity, prompt): the identity is
``Teacher.text_embedding_identity()`` (the model folder, its weight files and settings for
diffusers teachers), so a different model never reads another's rows. A cache folder holds, per
identity, ``<digest>.npy`` (float32 [N, T, D], read with ``mmap_mode='r'``) and
``<digest>.json`` (the prompts, in row order). New prompts are encoded and appended by
rewriting both files atomically (temp file + rename); 100k CLIP prompts are ~30 GB in float32,
which a memory map pages in only as rows are read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lift3d.teachers.base import Teacher

logger = logging.getLogger(__name__)

ENCODE_CHUNK = 64
"""Prompts per ``text_embedding`` call while filling the cache."""


class CorpusEmbeddings:
    """Rows of ``teacher.text_embedding`` for ``prompts``; ``cache_dir=None`` keeps them in memory."""

    def __init__(self, teacher: Teacher, prompts: list[str], cache_dir: str | Path | None = None):
        self.prompts = list(dict.fromkeys(prompts))
        self.row_of = {prompt: i for i, prompt in enumerate(self.prompts)}
        identity = teacher.text_embedding_identity()
        if cache_dir is None:
            self.table = _encode(teacher, self.prompts)
            return
        directory = Path(cache_dir)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
        array_path, index_path = directory / f"{digest}.npy", directory / f"{digest}.json"
        stored: list[str] = []
        if array_path.is_file() and index_path.is_file():
            try:
                stored = json.loads(index_path.read_text())["prompts"]
                table = np.load(array_path, mmap_mode="r")
                if table.shape[0] != len(stored):
                    raise ValueError("row count does not match the index")
            except (ValueError, KeyError, OSError) as error:
                logger.warning("embedding cache %s is unreadable (%s); rebuilding it", array_path, error)
                stored = []
        missing = [p for p in self.prompts if p not in set(stored)]
        if missing:
            logger.info("encoding %d prompts into the embedding cache %s", len(missing), directory)
            fresh = _encode(teacher, missing).numpy()
            old = np.load(array_path, mmap_mode="r") if stored else np.zeros((0, *fresh.shape[1:]), np.float32)
            if old.shape[1:] != fresh.shape[1:]:
                raise ValueError(f"cached embeddings {old.shape[1:]} and new ones {fresh.shape[1:]} disagree in shape")
            directory.mkdir(parents=True, exist_ok=True)
            temporary = directory / f".{digest}.{os.getpid()}.npy"
            combined = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32,
                                                 shape=(old.shape[0] + fresh.shape[0], *fresh.shape[1:]))
            combined[: old.shape[0]] = old
            combined[old.shape[0]:] = fresh
            combined.flush()
            del combined, old
            stored = stored + missing
            index_temporary = directory / f".{digest}.{os.getpid()}.json"
            index_temporary.write_text(json.dumps({"identity": identity, "prompts": stored}))
            os.replace(temporary, array_path)
            os.replace(index_temporary, index_path)
        table = np.load(array_path, mmap_mode="r")
        position = {prompt: i for i, prompt in enumerate(stored)}
        self._rows = np.array([position[p] for p in self.prompts], dtype=np.int64)
        self._memmap = table
        self.table = None

    @property
    def shape(self) -> tuple[int, int]:
        """(tokens, dim) of one embedding."""
        source = self.table if self.table is not None else self._memmap
        return int(source.shape[1]), int(source.shape[2])

    def __call__(self, prompts: list[str]) -> Tensor:
        """[B, T, D] float32 rows of ``prompts`` (each must be in the corpus)."""
        unknown = [p for p in prompts if p not in self.row_of]
        if unknown:
            raise KeyError(f"prompt {unknown[0]!r} is not in the embedded corpus")
        rows = [self.row_of[p] for p in prompts]
        if self.table is not None:
            return self.table[rows]
        return torch.from_numpy(np.ascontiguousarray(self._memmap[self._rows[rows]]))


def _encode(teacher: Teacher, prompts: list[str]) -> Tensor:
    with torch.no_grad():
        parts = [teacher.text_embedding(prompts[i : i + ENCODE_CHUNK]).float().cpu()
                 for i in range(0, len(prompts), ENCODE_CHUNK)]
    return torch.cat(parts) if parts else torch.zeros(0)
