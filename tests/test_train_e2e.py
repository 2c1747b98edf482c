"""End to end on CPU: tiny runs of the quickstart through the CLI and the Trainer."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from lift3d.cli import main
from lift3d.config import load_config
from lift3d.interrupts import RunInterrupted
from lift3d.train import Trainer

from conftest import QUICKSTART, TINY_QUICKSTART as TINY

ROOT = Path(__file__).resolve().parents[1]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_run_writes_the_run_folder(tmp_path):
    out = tmp_path / "run"
    assert main(["run", QUICKSTART, "--prompt", "a green torus", "--out", str(out), *TINY]) == 0
    for relative in ("config.yaml", "ckpt/last.pt", "metrics.jsonl", "images/final.png", "images/eval.png",
                     "export/gaussians.ply", "export/turntable.png", "export/turntable.mp4"):
        assert (out / relative).is_file(), relative
    metrics = _metrics(out)
    assert [m["step"] for m in metrics[:6]] == [1, 2, 3, 4, 5, 6]
    assert "eval/psnr" in metrics[-1] and metrics[-1]["eval/psnr"] > 5
    assert (out / "export" / "turntable.mp4").stat().st_size > 1000
    resolved = load_config(out / "config.yaml")
    assert resolved.prompt == "a green torus" and resolved.trainer.steps == 6
    # export again from the finished run, one format
    (out / "export" / "gaussians.ply").unlink()
    assert main(["export", str(out), "--format", "ply"]) == 0
    assert (out / "export" / "gaussians.ply").is_file()


def _params(trainer):
    return {k: v.clone() for k, v in trainer.representation.state_dict().items()}


def test_resume_continues_bit_for_bit(tmp_path):
    overrides = TINY + ["export.formats=[ply]", "trainer.steps=6"]
    straight = Trainer(load_config(QUICKSTART, overrides), run_dir=tmp_path / "a")
    straight.fit()

    half = Trainer(load_config(QUICKSTART, TINY + ["export.formats=[ply]", "trainer.steps=3"]), run_dir=tmp_path / "b")
    half.fit()
    resumed = Trainer(load_config(QUICKSTART, overrides), resume=tmp_path / "b" / "ckpt" / "last.pt")
    assert resumed.run_dir == (tmp_path / "b").resolve() and resumed.step == 3
    resumed.fit()
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses_a = [m["loss"] for m in _metrics(tmp_path / "a") if "loss" in m]
    losses_b = [m["loss"] for m in _metrics(tmp_path / "b") if "loss" in m]
    assert losses_a == losses_b


def test_ctrl_c_finishes_the_step_then_checkpoints(tmp_path, monkeypatch):
    trainer = Trainer(load_config(QUICKSTART, TINY + ["export.formats=[ply]"]), run_dir=tmp_path / "run")
    original = trainer.train_step

    def interrupted(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step; the step still completes
        return original(step)

    monkeypatch.setattr(trainer, "train_step", interrupted)
    # What was installed before (default_int_handler, or SIG_IGN where the suite itself was started
    # in the background by a non-interactive shell) is what must be back afterwards.
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted) as caught:
        trainer.fit()
    assert caught.value.step == 3 and caught.value.exit_code == 130
    state = torch.load(tmp_path / "run" / "ckpt" / "last.pt", weights_only=True)
    assert state["step"] == 3
    assert (tmp_path / "run" / "ckpt" / "step_000003.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored


def test_a_second_ctrl_c_stops_at_once_without_a_new_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(load_config(QUICKSTART, TINY + ["export.formats=[ply]", "trainer.checkpoint_every=1"]),
                      run_dir=tmp_path / "run")
    original = trainer.train_step

    def interrupted(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(step)

    monkeypatch.setattr(trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    state = torch.load(tmp_path / "run" / "ckpt" / "last.pt", weights_only=True)
    assert state["step"] == 2  # the periodic checkpoint before the step that was cut short


@pytest.mark.parametrize(
    "args, message",
    [
        (["trainer.stepz=3"], "unknown key 'trainer.stepz'"),
        (["--prompt", "a red dodecahedron"], "dodecahedron"),
        (["--prompt", "a red ../../sphere"], "vocabulary"),
    ],
)
def test_bad_input_fails_cleanly_and_writes_nothing(tmp_path, monkeypatch, caplog, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["run", QUICKSTART, *TINY, *args]) == 2
    assert message in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_truncated_resume_checkpoint_fails_cleanly(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "ckpt" / "last.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    assert main(["run", QUICKSTART, *TINY, f"resume={bad}"]) == 2
    assert "truncated or corrupt" in caplog.text
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ckpt", "last.pt"]


def test_nerf_quickstart_exports_a_textured_mesh_and_chamfer(tmp_path):
    out = tmp_path / "nerf"
    args = [
        "run", str(ROOT / "configs" / "quickstart-nerf.yaml"), "--out", str(out), "trainer.steps=4",
        "trainer.cameras.width=16", "trainer.cameras.height=16", "trainer.eval.width=16", "trainer.eval.height=16",
        "trainer.eval.num_views=2", "teacher.resolution=16", "representation.mesh_resolution=32",
        "representation.encoding.n_levels=4", "representation.encoding.log2_hashmap_size=12",
        "export.texture_size=64", "export.video_resolution=16", "export.strip_views=2",
    ]
    assert main(args) == 0
    for relative in ("export/model.glb", "export/model.obj", "export/model.mtl", "export/model.png"):
        assert (out / relative).is_file(), relative
    final = _metrics(out)[-1]
    assert final["eval/chamfer"] > 0 and "eval/psnr" in final
    import trimesh

    scene = trimesh.load(out / "export" / "model.glb")
    mesh = next(iter(scene.geometry.values()))
    assert mesh.visual.material.baseColorTexture.size == (64, 64)
