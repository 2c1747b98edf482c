"""Every objective through ``lift3d.train.Trainer`` on the quickstart at tiny sizes: it runs, its
state is checkpointed, and a run resumes from that checkpoint (bit for bit where it can)."""

from pathlib import Path

import pytest
import torch
import yaml

from lift3d import registry
from lift3d.config import load_config
from lift3d.train import Trainer

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY = [
    "trainer.cameras.width=16", "trainer.cameras.height=16", "trainer.cameras.batch_size=2",
    "trainer.eval.width=16", "trainer.eval.height=16", "trainer.eval.num_views=2", "trainer.log_every=1",
    "representation.num_points=200", "teacher.resolution=16", "export.formats=[]", "trainer.progress_bar=false",
]
EXTRA = {
    # Short cycles so that both phases run within three steps.
    "bootstrap": ["guidance.period=2", "guidance.pretrain_fraction=0.5", "guidance.augment_steps=3"],
    "ism": ["guidance.xs_inv_steps=2"],
    "tsm": ["guidance.xs_inv_steps=2"],
    "csm": ["guidance.xs_inv_steps=2"],
}
OBJECTIVES = ["vsd", "esd", "asd", "bsd", "bootstrap", "ism", "tsm", "csd", "csm"]
STATEFUL = {"vsd", "esd", "bootstrap"}


def _config(name, steps, extra=()):
    overrides = [*TINY, f"guidance.type={name}", f"trainer.steps={steps}", *EXTRA.get(name, []), *extra]
    return load_config(QUICKSTART, overrides)


# Objectives with their own end-to-end tests: hybrid (several terms; tests/test_4d_e2e.py) and
# reconstruction (samples targets, then fits them; tests/guidance/test_reconstruction.py).
COVERED_ELSEWHERE = {"hybrid", "reconstruction"}


def test_every_registered_objective_is_covered():
    assert set(OBJECTIVES) | {"sds"} | COVERED_ELSEWHERE == set(registry.choices("guidance"))


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_runs_three_steps_checkpoints_and_resumes(tmp_path, name):
    trainer = Trainer(_config(name, 3), run_dir=tmp_path / "run")
    result = trainer.fit()
    assert result.step == 3 and "eval/psnr" in result.metrics
    state = torch.load(tmp_path / "run" / "ckpt" / "last.pt", weights_only=True)
    if name in STATEFUL:
        assert any(key.startswith("student.") for key in state["guidance"]), "the student is checkpointed"
        assert state["guidance_optimizer"]["state"], "and its optimizer"
    resumed = Trainer(_config(name, 4), resume=tmp_path / "run" / "ckpt" / "last.pt")
    assert resumed.step == 3
    for key, value in resumed.guidance.state_dict().items():
        assert torch.equal(value.cpu(), state["guidance"][key].cpu()), key
    assert resumed.fit().step == 4
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["guidance"]["type"] == name


@pytest.mark.parametrize("name", ["vsd"])
def test_stateful_objective_resumes_bit_for_bit(tmp_path, name):
    straight = Trainer(_config(name, 4), run_dir=tmp_path / "a")
    straight.fit()
    Trainer(_config(name, 2), run_dir=tmp_path / "b").fit()
    resumed = Trainer(_config(name, 4), resume=tmp_path / "b" / "ckpt" / "last.pt")
    resumed.fit()
    for module in ("representation", "guidance"):
        a, b = getattr(straight, module).state_dict(), getattr(resumed, module).state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{module}.{key}"
