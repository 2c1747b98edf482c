"""Pipelines: stage configs, override routing, chaining by init_from, resume and export of the last stage."""

import json
import os

import pytest
import yaml

from lift3d.cli import main
from lift3d.config import ConfigError
from lift3d.pipeline import is_pipeline, last_stage_dir, load_pipeline, stage_config

# A NeRF stage and a DMTet stage small enough for a test (seconds on 2 cores).
TINY_SHARED = [
    "trainer.cameras.width=8", "trainer.cameras.height=8", "trainer.eval.num_views=1", "trainer.eval.width=8",
    "trainer.eval.height=8", "teacher.resolution=16", "trainer.progress_bar=false",
    "representation.encoding.n_levels=4", "representation.encoding.log2_hashmap_size=12", "representation.hidden_dim=16",
]
TINY_COARSE = [
    "coarse.representation.num_samples_per_ray=32", "coarse.trainer.steps=2", "coarse.trainer.resolution_milestones=[]",
    "coarse.representation.mesh_resolution=32",
]
TINY_MESH = ["mesh.representation.grid_resolution=16", "mesh.trainer.steps=2", "mesh.export.texture_size=64",
             "mesh.trainer.cameras.batch_size=1"]


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_quickstart_mesh_is_a_pipeline_whose_mesh_stage_starts_from_the_nerf(tmp_path):
    assert is_pipeline("configs/quickstart-mesh.yaml") and not is_pipeline("configs/quickstart-nerf.yaml")
    pipeline = load_pipeline("configs/quickstart-mesh.yaml", ["mesh.trainer.steps=7", "trainer.seed=5"], prompt="a red sphere")
    coarse, mesh = pipeline.stages
    assert (coarse.data["representation"]["type"], mesh.data["representation"]["type"]) == ("nerf", "dmtet")
    assert mesh.data["trainer"]["steps"] == 7 and coarse.data["trainer"]["steps"] != 7  # stage-prefixed
    assert coarse.data["trainer"]["seed"] == mesh.data["trainer"]["seed"] == 5  # unprefixed: every stage
    assert coarse.data["prompt"] == mesh.data["prompt"] == "a red sphere"
    assert coarse.data["export"]["formats"] == ["png"]  # the stage's own overrides
    assert stage_config(mesh, tmp_path).representation.init_from == str(tmp_path)
    assert not hasattr(stage_config(coarse, None).representation, "init_from")  # the first stage starts fresh


def test_pipeline_errors_name_the_stage_and_the_valid_choices(tmp_path):
    base = {"name": "p", "stages": [{"name": "a", "config": "../configs/quickstart.yaml"}]}
    with pytest.raises(ConfigError, match="stage 'a'.*does not exist"):
        load_pipeline(_write(tmp_path / "p.yaml", base))
    good = {"name": "p", "stages": [{"name": "a", "config": os.path.abspath("configs/quickstart.yaml")}]}
    assert len(load_pipeline(_write(tmp_path / "p.yaml", good)).stages) == 1
    with pytest.raises(ConfigError, match="unknown key.*'steps'.*valid: name, config"):
        load_pipeline(_write(tmp_path / "p.yaml", {"stages": [{"name": "a", "steps": 3}]}))
    with pytest.raises(ConfigError, match="unique"):
        load_pipeline(_write(tmp_path / "p.yaml", {"stages": [good["stages"][0]] * 2}))
    with pytest.raises(ConfigError, match="non-empty list"):
        load_pipeline(_write(tmp_path / "p.yaml", {"stages": []}))
    with pytest.raises(ConfigError, match="stage 'coarse'.*prefix an override with 'coarse.'"):
        load_pipeline("configs/quickstart-mesh.yaml", ["representation.grid_resolution=32"])  # NeRF has no grid
    with pytest.raises(ConfigError, match="names a stage but no key"):
        load_pipeline("configs/quickstart-mesh.yaml", ["mesh=3"])
    # A stage that chains must have a representation that can start from a run folder.
    chained = {"stages": [good["stages"][0], {**good["stages"][0], "name": "b"}]}
    pipeline = load_pipeline(_write(tmp_path / "p.yaml", chained))
    with pytest.raises(ConfigError, match="cannot start from the previous stage"):
        stage_config(pipeline.stages[1], tmp_path)


def test_pipeline_runs_every_stage_chains_resumes_and_exports(tmp_path):
    out = tmp_path / "run"
    overrides = TINY_SHARED + TINY_COARSE + TINY_MESH
    assert main(["run", "configs/quickstart-mesh.yaml", "--out", str(out), *overrides]) == 0
    coarse, mesh = out / "coarse", out / "mesh"
    assert last_stage_dir(out) == mesh
    for stage in (coarse, mesh):
        assert (stage / "done.json").is_file() and (stage / "ckpt" / "last.pt").is_file()
    assert yaml.safe_load((mesh / "config.yaml").read_text())["representation"]["init_from"] == str(coarse)
    metrics = json.loads((mesh / "done.json").read_text())
    assert {"eval/psnr", "eval/chamfer"} <= set(metrics)
    assert (mesh / "export" / "model.glb").is_file() and not (coarse / "export" / "model.glb").exists()

    # Resume: the finished coarse stage is skipped, the unfinished mesh stage is resumed from its checkpoint.
    coarse_metrics = (coarse / "metrics.jsonl").read_text()
    (mesh / "done.json").unlink()
    assert main(["run", "configs/quickstart-mesh.yaml", *overrides, "mesh.trainer.steps=3", f"resume={out}"]) == 0
    assert (coarse / "metrics.jsonl").read_text() == coarse_metrics
    steps = [json.loads(line)["step"] for line in (mesh / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and (mesh / "done.json").is_file()

    # lift3d export on the pipeline folder exports its last stage.
    (mesh / "export" / "model.glb").unlink()
    assert main(["export", str(out), "--format", "glb"]) == 0
    assert (mesh / "export" / "model.glb").is_file()
