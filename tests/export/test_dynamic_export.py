"""A dynamic run's exports: per-keyframe PLYs, the animated GLB, the (view x time) grid and the
turntable-over-time MP4, from a tiny quickstart-4d run (dynamic-gaussians, analytic teachers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lift3d.cli import main
from lift3d.config import load_config
from lift3d.export.animated import keyframe_times, read_accessor, read_glb, turntable_over_time
from lift3d.export.gltf import world_to_file_rotation
from lift3d.export.ply import read_ply
from lift3d.train import Trainer, export_run
from test_mesh_export import _find_validator

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART_4D = str(ROOT / "configs" / "quickstart-4d.yaml")
KEYFRAMES = 3
TINY_4D = [
    "trainer.steps=2", "trainer.cameras.width=16", "trainer.cameras.height=16", "trainer.eval.width=16",
    "trainer.eval.height=16", "trainer.eval.num_views=2", "trainer.eval_times=2", "representation.num_points=400",
    "teacher.resolution=16",
    "export.formats=[ply_frames,glb_animated,grid,mp4]", f"export.keyframes={KEYFRAMES}", "export.video_frames=6",
    "export.video_resolution=24", "export.grid_views=2", "export.grid_times=3", "export.texture_size=64",
    "representation.mesh_resolution=24", "representation.mesh_threshold=0.05",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import yaml

    folder = tmp_path_factory.mktemp("run4d")
    config = yaml.safe_load(Path(QUICKSTART_4D).read_text())
    config["guidance"]["entries"][1]["teacher"].update(resolution=16, frames_per_clip=4)  # lists take no overrides
    (folder / "tiny-4d.yaml").write_text(yaml.safe_dump(config))
    trainer = Trainer(load_config(str(folder / "tiny-4d.yaml"), TINY_4D), run_dir=folder / "run")
    # The deformation starts at zero; give it a time-dependent motion so keyframes differ.
    generator = torch.Generator().manual_seed(0)
    deformation = trainer.representation.deformation
    with torch.no_grad():
        deformation.heads.weight.normal_(0.0, 0.3, generator=generator)
        for plane in deformation.field.time_planes():
            plane.mul_(1.0 + torch.rand(plane.shape, generator=generator))
    trainer.fit()  # trainer.steps=2, then the end-of-run export
    return trainer


def test_turntable_over_time_runs_the_clock_with_the_orbit():
    from lift3d.cameras import TurntableConfig

    cameras = turntable_over_time(TurntableConfig(5, 15.0, 3.0, 40.0, 0.0, 8, 8))
    torch.testing.assert_close(cameras.times(), torch.linspace(0, 1, 5, dtype=cameras.c2w.dtype))
    assert len(set(cameras.azimuth_deg.tolist())) == 5


def test_ply_frames_hold_the_gaussians_deformed_to_each_keyframe(run):
    frames = sorted((run.run_dir / "export" / "frames").glob("gaussians_*.ply"))
    assert len(frames) == KEYFRAMES
    first, last = read_ply(frames[0]), read_ply(frames[-1])
    assert np.abs(first["x"] - last["x"]).max() > 1e-3  # the Gaussians move between keyframes
    for path, time in zip(frames, keyframe_times(KEYFRAMES)):
        means, scales, _ = run.representation.deformed(float(time))
        vertices = read_ply(path)
        xyz = np.stack([vertices["x"], vertices["y"], vertices["z"]], axis=1)
        np.testing.assert_allclose(xyz, means.detach().numpy(), atol=1e-6)
        np.testing.assert_allclose(vertices["scale_0"], scales[:, 0].log().detach().numpy(), atol=1e-5)


def test_animated_glb_moves_the_canonical_mesh_by_deform(run):
    path = run.run_dir / "export" / "animated.glb"
    tree, binary = read_glb(path)
    primitive = tree["meshes"][0]["primitives"][0]
    assert len(primitive["targets"]) == KEYFRAMES
    rotation = world_to_file_rotation()
    base = read_accessor(tree, binary, primitive["attributes"]["POSITION"])
    canonical = torch.tensor(base @ rotation, dtype=torch.float32)  # file -> world: the rotation's inverse
    for target, time in zip(primitive["targets"], keyframe_times(KEYFRAMES)):
        moved = base + read_accessor(tree, binary, target["POSITION"])
        expected = run.representation.deform(canonical, float(time)).detach().numpy() @ rotation.T
        np.testing.assert_allclose(moved, expected, atol=1e-4)
    validator, _ = _find_validator()
    if validator is not None:
        validator.check(path)


def test_grid_and_mp4_show_views_by_times(run):
    import imageio.v3 as iio

    grid = iio.imread(run.run_dir / "export" / "view_time_grid.png")
    assert grid.shape == (2 * 24, 3 * 24, 3)
    video = iio.imread(run.run_dir / "export" / "turntable.mp4")
    assert video.shape[0] == 6


def test_cli_exports_a_dynamic_format_from_the_run_folder(run):
    target = run.run_dir / "export" / "view_time_grid.png"
    target.unlink()
    assert main(["export", str(run.run_dir), "--format", "grid"]) == 0
    assert target.is_file()


def test_static_representations_refuse_dynamic_formats(run, tmp_path):
    trainer = Trainer(load_config(str(ROOT / "configs" / "quickstart.yaml"), [
        "trainer.steps=0", "representation.num_points=50", "trainer.eval.num_views=1", "teacher.resolution=16",
        "trainer.eval.width=16", "trainer.eval.height=16", "export.formats=[ply]",
    ]), run_dir=tmp_path / "static")
    with pytest.raises(ValueError, match="static"):
        export_run(trainer, ["ply_frames"])
