"""Animated GLB (morph targets + weights animation), checked by reading it back, by the Khronos
validator and by three.js in headless Chromium against lift3d's own rasterizer.

The deformation is synthetic (``Stretch``: a small class with ``deform``) so nothing depends on
training. ``LIFT3D_VIEWER_RENDERS=<folder>`` keeps the viewer renders there.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from lift3d.cameras import orbit_cameras
from lift3d.export.animated import (
    deform_vertices,
    grid_image,
    keyframe_times,
    read_accessor,
    read_glb,
    welded_vertex_normals,
    write_animated_glb,
)
from lift3d.export.gltf import world_to_file_rotation
from lift3d.render.mesh import render_mesh
from test_mesh_export import _find_validator  # the Khronos validator, installed the same way
from conftest import load_render_glb

ROOT = Path(__file__).resolve().parents[2]
SIZE = 128
KEYFRAMES = 3
DURATION = 2.0


class Stretch:
    """A non-rigid motion: slide along world +y and stretch along z (up) as time runs."""

    is_dynamic = True

    def deform(self, points: torch.Tensor, time: float) -> torch.Tensor:
        moved = points.clone()
        moved[:, 1] = moved[:, 1] + 0.6 * time
        moved[:, 2] = moved[:, 2] * (1.0 + 0.8 * time)
        return moved


@pytest.fixture(scope="module")
def sphere():
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


@pytest.fixture(scope="module")
def animated(sphere, tmp_path_factory):
    vertices, faces = sphere
    times = keyframe_times(KEYFRAMES)
    frames = deform_vertices(Stretch().deform, vertices, times)
    colors = np.tile([0.8, 0.3, 0.2], (len(vertices), 1))
    path = write_animated_glb(tmp_path_factory.mktemp("glb") / "animated.glb", vertices, faces, frames, times,
                              duration=DURATION, vertex_colors=colors)
    return path, vertices, faces, frames, times


@pytest.fixture(scope="module")
def validator():
    found, reason = _find_validator()
    if found is None:
        pytest.skip(f"glTF validator unavailable: {reason}")
    return found


def test_morph_targets_reproduce_the_deformation_at_each_keyframe(animated):
    path, vertices, faces, frames, times = animated
    tree, binary = read_glb(path)
    (gltf_mesh,) = tree["meshes"]
    primitive = gltf_mesh["primitives"][0]
    rotation = world_to_file_rotation()
    base = read_accessor(tree, binary, primitive["attributes"]["POSITION"])
    np.testing.assert_allclose(base, vertices @ rotation.T, atol=1e-6)  # vertex order kept
    assert len(primitive["targets"]) == KEYFRAMES and gltf_mesh["weights"] == [0.0] * KEYFRAMES
    assert gltf_mesh["extras"]["targetNames"] == ["t=0.000", "t=0.500", "t=1.000"]
    base_normals = read_accessor(tree, binary, primitive["attributes"]["NORMAL"])
    for k, target in enumerate(primitive["targets"]):
        moved = base + read_accessor(tree, binary, target["POSITION"])
        np.testing.assert_allclose(moved, frames[k] @ rotation.T, atol=1e-5)
        expected = Stretch().deform(torch.tensor(vertices), float(times[k])).numpy() @ rotation.T
        np.testing.assert_allclose(moved, expected, atol=1e-5)
        normals = base_normals + read_accessor(tree, binary, target["NORMAL"])
        np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    (animation,) = tree["animations"]
    sampler = animation["samplers"][0]
    assert sampler["interpolation"] == "LINEAR"
    np.testing.assert_allclose(read_accessor(tree, binary, sampler["input"])[:, 0], times * DURATION)
    np.testing.assert_allclose(read_accessor(tree, binary, sampler["output"]).reshape(KEYFRAMES, KEYFRAMES),
                               np.eye(KEYFRAMES))
    channel = animation["channels"][0]
    assert channel["target"]["path"] == "weights" and "mesh" in tree["nodes"][channel["target"]["node"]]


def test_keyframe_normals_are_the_deformed_meshes_smooth_normals(sphere):
    vertices, faces = sphere
    stretched = vertices * np.array([1.0, 1.0, 3.0])
    normals = welded_vertex_normals(stretched, faces)
    # an ellipsoid (x^2 + y^2 + z^2/9 = r^2) has normals along (x, y, z / 9)
    analytic = stretched / np.array([1.0, 1.0, 9.0])
    analytic /= np.linalg.norm(analytic, axis=1, keepdims=True)
    assert np.mean(np.sum(normals * analytic, axis=1)) > 0.995


def test_validator_reports_no_errors_for_linear_and_step(animated, sphere, tmp_path, validator):
    path, vertices, faces, frames, times = animated
    validator.check(path)
    step = write_animated_glb(tmp_path / "step.glb", vertices, faces, frames, times, interpolation="STEP")
    validator.check(step)
    assert read_glb(step)[0]["animations"][0]["samplers"][0]["interpolation"] == "STEP"


def test_bad_inputs_name_the_problem(sphere, tmp_path):
    vertices, faces = sphere
    frames = np.stack([vertices, vertices])
    with pytest.raises(ValueError, match="one time per keyframe"):
        write_animated_glb(tmp_path / "a.glb", vertices, faces, frames, [0.0])
    with pytest.raises(ValueError, match="increase"):
        write_animated_glb(tmp_path / "a.glb", vertices, faces, frames, [0.5, 0.2])
    with pytest.raises(ValueError, match=r"\[K, 642, 3\]"):
        write_animated_glb(tmp_path / "a.glb", vertices, faces, frames[:, :10], [0.0, 1.0])
    with pytest.raises(ValueError, match="LINEAR or STEP"):
        write_animated_glb(tmp_path / "a.glb", vertices, faces, frames, [0.0, 1.0], interpolation="CUBICSPLINE")


def test_grid_image_tiles_rows_of_views_and_columns_of_times():
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 2, 3, 3)
    grid = grid_image(images, rows=2)
    assert grid.shape == (4, 9, 3)
    assert float(grid[0, 3, 0]) == 1.0 and float(grid[2, 0, 0]) == 3.0 and float(grid[3, 8, 0]) == 5.0


# --------------------------------------------------------------------------- three.js vs lift3d




def _camera():
    return orbit_cameras(torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([4.0]), torch.tensor([40.0]),
                         SIZE, SIZE)


def _lift3d_silhouette(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    v = torch.tensor(vertices, dtype=torch.float32)
    f = torch.tensor(faces, dtype=torch.int32)
    render = render_mesh(v, f, _camera(), torch.zeros(1), v, lambda a, px: torch.ones(a.shape[0], 1))
    return render.alpha[0, ..., 0].numpy() > 0.5


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_threejs_at_keyframe_k_draws_what_lift3d_renders_at_t_k(animated, tmp_path):
    render_glb = load_render_glb()
    path, vertices, faces, frames, times = animated
    camera = _camera()
    rotation = world_to_file_rotation()
    eye = (rotation @ camera.position[0].double().numpy()).tolist()
    view = {"glb": path, "eye": eye, "target": [0.0, 0.0, 0.0], "up": [0.0, 1.0, 0.0], "fov": 40.0,
            "environment": "none", "lights": [{"direction": [0, 1, 1], "intensity": 2.0}]}
    jobs = [{**view, "png": tmp_path / f"anim_{k}.png", "animationTime": float(times[k] * DURATION)}
            for k in range(KEYFRAMES)]
    jobs.append({**view, "png": tmp_path / "weights_1.png", "morphWeights": [0.0, 1.0, 0.0]})
    try:
        infos = render_glb.render(jobs, SIZE, SIZE)
    except render_glb.ViewerUnavailable as error:
        pytest.skip(f"glTF viewer unavailable: {error}")
    from PIL import Image

    silhouettes = [np.asarray(Image.open(job["png"]))[..., 3] > 127 for job in jobs]
    assert infos[0]["animations"][0]["duration"] == pytest.approx(DURATION)
    assert infos[0]["morphs"][0]["names"] == ["t=0.000", "t=0.500", "t=1.000"]
    np.testing.assert_allclose(infos[-1]["morphs"][0]["influences"], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(infos[1]["morphs"][0]["influences"], [0.0, 1.0, 0.0], atol=1e-6)
    ours = [_lift3d_silhouette(frame, faces) for frame in frames]
    renders = os.environ.get("LIFT3D_VIEWER_RENDERS")
    if renders:
        Path(renders).mkdir(parents=True, exist_ok=True)
        strip = np.concatenate([np.concatenate([s, o], axis=0) for s, o in zip(silhouettes, ours + [ours[1]])], 1)
        Image.fromarray((strip * 255).astype(np.uint8)).save(Path(renders) / "animated_silhouettes.png")
    for k in range(KEYFRAMES):
        assert _iou(silhouettes[k], ours[k]) > 0.95, k
        for j in range(KEYFRAMES):
            if j != k:  # the keyframes differ: the match is not a coincidence of one static shape
                assert _iou(silhouettes[k], ours[j]) < 0.85, (k, j)
    assert _iou(silhouettes[-1], ours[1]) > 0.95  # weights (0, 1, 0) pose keyframe 1 too
