"""The 4D presets (4dfy, dream-in-4d, dreamgaussian4d, eg4d) run a few steps on tiny random models.

Each preset is read, every teacher is pointed at a tiny folder (hybrid entries sit in lists, which
command-line overrides cannot reach, so the YAML is rewritten), sizes are shrunk, and the run goes
through the ``lift3d run`` command.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("diffusers")

from tiny_diffusers import one_thread, save_tiny_sd, save_tiny_svd, save_tiny_t2v  # noqa: E402, F401

from lift3d.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from PIL import Image

    base = tmp_path_factory.mktemp("tiny-models")
    image = base / "input.png"
    Image.fromarray((np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8)).save(image)
    return {"stable-diffusion": save_tiny_sd(base / "sd"), "text-to-video": save_tiny_t2v(base / "t2v"),
            "stable-video-diffusion": save_tiny_svd(base / "svd"), "image": image, "cache": base / "cache"}


def tiny(node, folders):
    """The preset with tiny teachers, representations, renders and step counts."""
    if isinstance(node, list):
        return [tiny(item, folders) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: tiny(value, folders) for key, value in node.items()}
    kind = node.get("type")
    if kind in ("stable-diffusion", "text-to-video", "stable-video-diffusion"):
        node["model"] = str(folders[kind])
        node["prompting"] = {"cache_dir": str(folders["cache"])}
        if kind == "stable-diffusion":
            node["image_size"] = SIZE
        else:
            node.update(height=SIZE, width=SIZE)
        if kind == "text-to-video":
            node["num_frames"] = 2
        if kind == "stable-video-diffusion":
            node["image"] = str(folders["image"])
            node.pop("prompting")
    if kind in ("gaussians", "dynamic-gaussians"):
        node["num_points"] = 200
    if kind == "reconstruction":
        node.update(sampler_steps=2, views={**node.get("views", {}), "width": SIZE, "height": SIZE})
    if "trainer" in node:
        trainer = node["trainer"]
        trainer.update(steps=2, progress_bar=False, log_every=1, eval_times=2,
                       eval={"num_views": 1, "width": SIZE, "height": SIZE})
        trainer["cameras"] = {**trainer.get("cameras", {}), "width": SIZE, "height": SIZE, "batch_size": 1}
    if "export" in node:
        node["export"] = {"formats": []}
    return node


def run_preset(name: str, folders, tmp_path) -> Path:
    preset = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny(preset, folders)))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 0
    return out


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def test_4dfy_hybrid_of_image_vsd_and_video_sds(folders, tmp_path):
    out = run_preset("4dfy", folders, tmp_path)
    values = losses(out)
    assert len(values) == 2 and all(math.isfinite(v) for v in values)


def test_dream_in_4d_static_then_motion(folders, tmp_path):
    out = run_preset("dream-in-4d", folders, tmp_path)
    for stage in ("static", "motion"):
        assert (out / stage / "done.json").is_file(), stage
    config = yaml.safe_load((out / "motion" / "config.yaml").read_text())
    assert config["representation"]["init_from"] and config["representation"]["freeze_canonical"]
    assert all(math.isfinite(v) for v in losses(out / "motion"))


@pytest.mark.parametrize("name", ["dreamgaussian4d", "eg4d"])
def test_svd_driven_presets_sample_and_fit(name, folders, tmp_path):
    out = run_preset(name, folders, tmp_path)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sampled = [value for line in lines for key, value in line.items() if key.endswith("recon/sampled")]
    assert sampled and sampled[-1] == 1.0  # the driving clip was generated
    assert all(math.isfinite(v) for v in losses(out))
