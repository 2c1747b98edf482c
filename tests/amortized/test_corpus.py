"""Prompt corpora: the analytic ones are reproducible and compositional; every shipped corpus loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lift3d.amortized.corpus import CORPORA, write_corpora
from lift3d.prompts import load_prompts
from lift3d.teachers.scenes import parse_prompt

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"


def parts(prompt: str) -> list[tuple[str, str]]:
    """(color, shape) of each part of an analytic prompt, top first."""
    return [(part.color, part.shape) for part in parse_prompt(prompt).parts]


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_shipped_corpus_is_the_generated_one(name, tmp_path):
    write_corpora(tmp_path)
    assert json.loads((tmp_path / f"{name}.json").read_text()) == json.loads((PROMPTS / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_heldout_prompts_are_unseen_combinations_of_seen_words(name):
    path = PROMPTS / f"{name}.json"
    train, test = load_prompts(path, "train"), load_prompts(path, "test")
    assert len(train) >= 30 and test and not set(train) & set(test)
    train_words = {word for prompt in train for word in prompt.split()}
    assert all(word in train_words for prompt in test for word in prompt.split())
    train_pairs = {pair for prompt in train for pair in parts(prompt)}
    train_stackings = {(ps[0][1], ps[1][1]) for ps in map(parts, train) if len(ps) == 2}
    for prompt in test:
        ps = parts(prompt)
        if len(ps) == 1:  # a colour-shape pair never trained, in any position
            assert ps[0] not in train_pairs, prompt
        else:  # a stacking of shapes never trained, built from trained pairs
            assert (ps[0][1], ps[1][1]) not in train_stackings, prompt
            assert all(p in train_pairs for p in ps), prompt


def test_public_corpora_load_with_their_source():
    for path in PROMPTS.glob("*.json"):
        data = json.loads(path.read_text())
        assert data.get("source"), path
        assert load_prompts(path, "train"), path
