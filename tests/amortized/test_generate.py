"""End to end on the analytic teacher: train (with eval), generate + export, refine with lift3d run."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml

from amortized_tiny import tiny_config
from lift3d.amortized.generate import GeneratedInitConfig, GeneratedRepresentation, generate, load_generator
from lift3d.amortized.train import AmortizedTrainer, load_amortized_config
from lift3d.batch import Shard
from lift3d.cameras import TurntableConfig, turntable
from lift3d.cli import main
from lift3d.interrupts import RunInterrupted
from lift3d.train import run


def test_train_generate_and_refine(tmp_path):
    data = tiny_config(tmp_path)
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(data))
    assert main(["amortized", str(config_path), "--out", str(tmp_path / "run")]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = metrics[-1]
    for key in ("eval/psnr_seen", "eval/psnr_heldout", "eval/chamfer_seen", "eval/chamfer_heldout"):
        assert key in final
    assert 5.0 < final["eval/psnr_heldout"] < 60.0
    assert (tmp_path / "run" / "images" / "eval_heldout.png").is_file()

    # Generate a held-out prompt: a GLB and a timing record.
    result = generate(tmp_path / "run", "a red sphere", formats=["glb"], out=tmp_path / "gen")
    assert (tmp_path / "gen" / "export" / "model.glb").stat().st_size > 0
    assert result["forward_s"] > 0 and json.loads((tmp_path / "gen" / "timing.json").read_text())["files"]

    # init_from: the representation renders what the generator made, then lift3d run refines it.
    generator, teacher, _, _ = load_generator(tmp_path / "run", "cpu")
    cameras = turntable(TurntableConfig(num_views=1, width=12, height=12))
    with torch.no_grad():
        expected = generator.representation(teacher.text_embedding(["a red sphere"])).eval().render(cameras, teacher.background).rgb
        made = GeneratedRepresentation(GeneratedInitConfig(init_from=str(tmp_path / "run"), prompt="a red sphere"))
        torch.testing.assert_close(made.eval().render(cameras, teacher.background).rgb, expected)
    refine = {
        "name": "refine", "prompt": "a red sphere",
        "representation": {"type": "generated", "init_from": str(tmp_path / "run"), "prompt": "a red sphere"},
        "teacher": {"type": "analytic", "resolution": 16, "supersample": 1},
        "guidance": {"type": "sds", "guidance_scale": 1.0},
        "trainer": {"steps": 2, "threads": 1, "progress_bar": False, "cameras": {"batch_size": 1, "width": 16, "height": 16},
                    "eval": {"num_views": 2, "width": 16, "height": 16}},
        "export": {"formats": ["png"], "video_resolution": 16, "strip_views": 2},
    }
    (tmp_path / "refine.yaml").write_text(yaml.safe_dump(refine))
    outcome = run(str(tmp_path / "refine.yaml"), [], out=str(tmp_path / "refined"))
    assert outcome.step == 2 and "eval/psnr" in outcome.metrics


def test_sigterm_checkpoints_and_resume_continues(tmp_path, monkeypatch):
    config = load_amortized_config(None, data=tiny_config(tmp_path, steps=3))
    trainer = AmortizedTrainer(config, run_dir=tmp_path / "r", shard=Shard())
    original = trainer.train_step

    def step_then_sigterm(step):
        logs = original(step)
        if step == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the step: it finishes, then the run stops
        return logs

    monkeypatch.setattr(trainer, "train_step", step_then_sigterm)
    with pytest.raises(RunInterrupted) as caught:
        trainer.fit()
    assert caught.value.step == 1 and caught.value.exit_code == 143 and caught.value.checkpoint.is_file()
    resumed = AmortizedTrainer(config, resume=tmp_path / "r", shard=Shard())
    assert resumed.step == 1 and resumed.run_dir == tmp_path / "r"
    torch.testing.assert_close(resumed.generator.state_dict(), trainer.generator.state_dict())
