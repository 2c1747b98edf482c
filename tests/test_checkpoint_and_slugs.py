import pytest
import torch

from lift3d.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lift3d.prompts import read_prompt_file, slugify


def test_checkpoint_round_trip_and_atomic(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, {"step": 3, "weights": torch.arange(4.0)})
    state = load_checkpoint(tmp_path)  # a run folder resolves to ckpt/last.pt
    assert state["step"] == 3 and torch.equal(state["weights"], torch.arange(4.0))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["last.pt"]


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.randn(1000)})
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("prompt", ["../../etc/passwd", "/abs/path", "~/x", "..", "a/../../b", "ä ö ü"])
def test_slugs_never_escape(prompt):
    slug = slugify(prompt)
    assert slug and "/" not in slug and ".." not in slug and not slug.startswith("~")
    assert set(slug) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


def test_slug_is_readable():
    assert slugify("A Red Sphere, on a blue CUBE!") == "a-red-sphere-on-a-blue-cube"


def test_prompt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# corpus\na red sphere\n\n  a blue cube  \n")
    assert read_prompt_file(path) == ["a red sphere", "a blue cube"]
