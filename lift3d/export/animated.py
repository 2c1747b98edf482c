"""Exports of dynamic (4D) representations: animated GLB, per-frame Gaussian PLYs, over-time media.

Animated GLB. A deformation-based representation moves canonical points with
``deform(points [P, 3], time) -> [P, 3]``. The GLB holds the canonical mesh (textured as a static
export is) with one **morph target per keyframe** t_k: POSITION deltas ``deform(v, t_k) - v`` and
NORMAL deltas (the deformed mesh's smooth normals minus the canonical ones), both in the file
frame of :mod:`lift3d.export.gltf`. The mesh's default ``weights`` are all 0 (the canonical
shape); one **animation** drives the node's ``weights`` channel with keyframe k at
``t_k * duration`` seconds holding the one-hot weights e_k, so the player shows exactly
``deform(v, t_k)`` at each keyframe and, with ``LINEAR`` interpolation, blends neighbouring keyframes
linearly in between (``STEP`` holds each keyframe until the next). ``extras.targetNames`` names the
targets ``t=0.250``... (three.js's ``morphTargetDictionary``, Blender's shape keys).

The writer post-processes the GLB that :func:`lift3d.export.gltf.write_glb` writes: it appends the
target and animation data to the BIN chunk and their accessors to the JSON, so the static and
the animated exports share one mesh/material path.

Over time. ``turntable_over_time`` cameras orbit once while time runs 0 -> 1 (an MP4 that shows
both shape and motion); :func:`lift3d.cameras.view_time_grid` images tile into a (view x time)
PNG with one row per view and one column per time (:func:`grid_image`).
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import trimesh
from torch import Tensor

from lift3d.cameras import Cameras, TurntableConfig, turntable
from lift3d.export.gltf import _safe_unit, world_to_file_rotation, write_glb
from lift3d.export.ply import write_atomic

log = logging.getLogger(__name__)

DeformFn = Callable[[Tensor, float], Tensor]
"""``deform(points [P, 3], time) -> [P, 3]``: canonical world positions to their positions at ``time``."""

FLOAT, ARRAY_BUFFER = 5126, 34962
_JSON, _BIN = 0x4E4F534A, 0x004E4942


# --------------------------------------------------------------------------- GLB container


def read_glb(path: Path | str) -> tuple[dict, bytes]:
    """The JSON tree and the BIN chunk of a binary glTF file."""
    raw = Path(path).read_bytes()
    magic, version, total = struct.unpack_from("<4sII", raw, 0)
    if magic != b"glTF" or version != 2 or total != len(raw):
        raise ValueError(f"{path} is not a glTF 2.0 binary file")
    tree, binary, offset = None, b"", 12
    while offset < total:
        length, kind = struct.unpack_from("<II", raw, offset)
        chunk = raw[offset + 8 : offset + 8 + length]
        if kind == _JSON:
            tree = json.loads(chunk)
        elif kind == _BIN:
            binary = bytes(chunk)
        offset += 8 + length
    if tree is None:
        raise ValueError(f"{path} has no JSON chunk")
    return tree, binary


def glb_bytes(tree: dict, binary: bytes) -> bytes:
    """A GLB container of ``tree`` and ``binary`` (chunks padded to 4 bytes: JSON with spaces, BIN with zeros)."""
    text = json.dumps(tree, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 4)
    binary = binary + b"\0" * (-len(binary) % 4)
    if tree.get("buffers"):
        tree_length = tree["buffers"][0].get("byteLength", len(binary))
        if tree_length > len(binary):
            raise ValueError("buffers[0].byteLength exceeds the BIN chunk")
    chunks = struct.pack("<II", len(text), _JSON) + text
    if binary:
        chunks += struct.pack("<II", len(binary), _BIN) + binary
    return struct.pack("<4sII", b"glTF", 2, 12 + len(chunks)) + chunks


def read_accessor(tree: dict, binary: bytes, index: int) -> np.ndarray:
    """A float accessor's data as [count, components] (the test and inspection helper)."""
    accessor = tree["accessors"][index]
    if accessor["componentType"] != FLOAT:
        raise ValueError(f"accessor {index} is not float")
    width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}[accessor["type"]]
    view = tree["bufferViews"][accessor["bufferView"]]
    start = view.get("byteOffset", 0) + accessor.get("byteOffset", 0)
    stride = view.get("byteStride", 4 * width)
    shape = (accessor["count"], width)
    return np.ndarray(shape, dtype="<f4", buffer=binary, offset=start, strides=(stride, 4)).copy()


class _Appender:
    """Appends float32 arrays to a GLB's BIN chunk as new buffer views and accessors."""

    def __init__(self, tree: dict, binary: bytes):
        self.tree, self.binary = tree, bytearray(binary)
        self.tree.setdefault("bufferViews", [])
        self.tree.setdefault("accessors", [])
        if not self.tree.get("buffers"):
            self.tree["buffers"] = [{"byteLength": 0}]

    def add(self, data: np.ndarray, kind: str, target: int | None = None, bounds: bool = False) -> int:
        data = np.ascontiguousarray(data, dtype="<f4")
        self.binary += b"\0" * (-len(self.binary) % 4)
        view = {"buffer": 0, "byteOffset": len(self.binary), "byteLength": data.nbytes}
        if target is not None:
            view["target"] = target
        self.binary += data.tobytes()
        self.tree["bufferViews"].append(view)
        rows = data.reshape(data.shape[0], -1)
        accessor = {"bufferView": len(self.tree["bufferViews"]) - 1, "componentType": FLOAT,
                    "count": int(rows.shape[0]), "type": kind}
        if bounds:  # required for POSITION (also targets) and animation inputs; exact float32 values
            accessor["min"] = [float(v) for v in rows.min(axis=0)]
            accessor["max"] = [float(v) for v in rows.max(axis=0)]
        self.tree["accessors"].append(accessor)
        return len(self.tree["accessors"]) - 1

    def finish(self) -> bytes:
        self.binary += b"\0" * (-len(self.binary) % 4)
        self.tree["buffers"][0]["byteLength"] = len(self.binary)
        return bytes(self.binary)


# --------------------------------------------------------------------------- animated GLB


def welded_vertex_normals(vertices: np.ndarray, faces: np.ndarray, weld_key: np.ndarray | None = None) -> np.ndarray:
    """Smooth unit vertex normals [V, 3], with copies of one vertex (UV seams) sharing their normal.

    Copies are the vertices whose ``weld_key`` rows (default: the positions) are equal.
    """
    key = np.round(np.asarray(vertices if weld_key is None else weld_key, dtype=np.float64), 9)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    welded = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64)[first], inverse[np.asarray(faces)], process=False)
    return _safe_unit(np.asarray(welded.vertex_normals, dtype=np.float64))[inverse]


def keyframe_times(count: int) -> np.ndarray:
    """``count`` evenly spaced times over [0, 1] (t = 0 for one keyframe)."""
    if count < 1:
        raise ValueError(f"keyframes must be >= 1, got {count}")
    return np.linspace(0.0, 1.0, count) if count > 1 else np.zeros(1)


def write_animated_glb(
    path: Path | str,
    vertices: np.ndarray,
    faces: np.ndarray,
    keyframe_vertices: np.ndarray,
    times: Sequence[float],
    duration: float = 2.0,
    interpolation: Literal["LINEAR", "STEP"] = "LINEAR",
    front_to_plus_z: bool = False,
    **material: object,
) -> Path:
    """Write the canonical mesh with one morph target per keyframe and a weights animation (module docstring).

    Args:
        path: the ``.glb`` file.
        vertices: [V, 3] canonical world positions (z-up).
        faces: [F, 3] vertex indices.
        keyframe_vertices: [K, V, 3] world positions at the K keyframes (``deform(vertices, t_k)``).
        times: K keyframe times in [0, 1], increasing; keyframe k plays at ``t_k * duration`` s.
        duration: seconds the animation takes from t = 0 to t = 1.
        interpolation: ``LINEAR`` (blend neighbouring keyframes) or ``STEP`` (hold each keyframe).
        front_to_plus_z: as :func:`lift3d.export.gltf.write_glb`.
        material: ``uvs``, ``base_color_texture``, ``vertex_colors``, ``metallic``, ``roughness`` and
            the other material arguments of :func:`lift3d.export.gltf.write_glb`.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    frames = np.asarray(keyframe_vertices, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    if frames.ndim != 3 or frames.shape[1:] != vertices.shape:
        raise ValueError(f"keyframe_vertices must be [K, {len(vertices)}, 3], got {frames.shape}")
    if len(times) != len(frames) or len(times) < 1:
        raise ValueError(f"need one time per keyframe: {len(times)} times for {len(frames)} keyframes")
    if np.any(np.diff(times) <= 0) or times.min() < 0 or times.max() > 1:
        raise ValueError(f"keyframe times must increase within [0, 1], got {times.tolist()}")
    if interpolation not in ("LINEAR", "STEP"):
        raise ValueError(f"interpolation must be LINEAR or STEP, got {interpolation!r}")
    if not duration > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    if material.get("normals", True) is False:
        raise ValueError("an animated GLB carries normal deltas: normals=False is not supported")
    base_normals = material.pop("normals", True)
    if not isinstance(base_normals, np.ndarray):
        base_normals = welded_vertex_normals(vertices, faces)
    path = write_glb(path, vertices, faces, normals=base_normals, front_to_plus_z=front_to_plus_z, **material)

    rotation = world_to_file_rotation(front_to_plus_z)
    tree, binary = read_glb(path)
    appender = _Appender(tree, binary)
    mesh_index, node_index = _mesh_node(tree)
    primitive = tree["meshes"][mesh_index]["primitives"][0]
    base_file = read_accessor(tree, binary, primitive["attributes"]["POSITION"])
    base_normals_file = read_accessor(tree, binary, primitive["attributes"]["NORMAL"])
    targets = []
    for frame in frames:
        moved = (frame @ rotation.T).astype(np.float32)
        normals = (welded_vertex_normals(frame, faces, weld_key=vertices) @ rotation.T).astype(np.float32)
        targets.append({
            "POSITION": appender.add(moved - base_file, "VEC3", ARRAY_BUFFER, bounds=True),
            "NORMAL": appender.add(normals - base_normals_file, "VEC3", ARRAY_BUFFER),
        })
    primitive["targets"] = targets
    names = [f"t={t:.3f}" for t in times]
    gltf_mesh = tree["meshes"][mesh_index]
    gltf_mesh["weights"] = [0.0] * len(frames)
    gltf_mesh.setdefault("extras", {})["targetNames"] = names
    seconds = (times * duration).astype(np.float32)
    weights = np.eye(len(frames), dtype=np.float32)  # row k: the weights at keyframe k
    sampler = {"input": appender.add(seconds, "SCALAR", bounds=True),
               "output": appender.add(weights.reshape(-1), "SCALAR"), "interpolation": interpolation}
    tree["animations"] = [{
        "name": "deformation",
        "samplers": [sampler],
        "channels": [{"sampler": 0, "target": {"node": node_index, "path": "weights"}}],
    }]
    write_atomic(path, glb_bytes(tree, appender.finish()))
    log.info("wrote %s (%d vertices, %d keyframes over %.2f s, %s)", path, len(vertices), len(frames), duration,
             interpolation)
    return path


def _mesh_node(tree: dict) -> tuple[int, int]:
    """(mesh index, node index) of the single mesh node lift3d's writer makes."""
    for index, node in enumerate(tree.get("nodes", [])):
        if "mesh" in node:
            return int(node["mesh"]), index
    raise ValueError("the GLB has no mesh node")


def deform_vertices(deform: DeformFn, vertices: np.ndarray, times: Sequence[float], device: str | torch.device = "cpu",
                    chunk: int = 1 << 18) -> np.ndarray:
    """[K, V, 3] ``deform(vertices, t_k)`` for each time, in chunks, without gradients."""
    points = torch.as_tensor(np.asarray(vertices), dtype=torch.float32, device=device)
    frames = []
    with torch.no_grad():
        for time in times:
            moved = [deform(points[i : i + chunk], float(time)) for i in range(0, len(points), chunk)]
            frames.append(torch.cat(moved).double().cpu().numpy())
    return np.stack(frames)


def export_animated_mesh(
    directory: Path | str,
    mesh: trimesh.Trimesh,
    color_fn: Callable[[Tensor], Tensor],
    deform: DeformFn,
    keyframes: int = 8,
    duration: float = 2.0,
    interpolation: Literal["LINEAR", "STEP"] = "LINEAR",
    texture_size: int = 1024,
    name: str = "animated",
    device: str = "cpu",
    chunk: int = 1 << 18,
) -> Path:
    """Unwrap and bake the canonical ``mesh`` (as the static export), then ``<name>.glb`` with ``keyframes`` morph targets."""
    from lift3d.export.texture import bake_texture, unwrap_uv

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vertices, faces, uvs, vmapping = unwrap_uv(mesh, texture_size=texture_size)
    texture = bake_texture(vertices, faces, uvs, color_fn, size=texture_size, device=device, chunk=chunk)
    times = keyframe_times(keyframes)
    frames = deform_vertices(deform, vertices, times, device=device, chunk=chunk)
    normals = welded_vertex_normals(vertices, faces)
    return write_animated_glb(directory / f"{name}.glb", vertices, faces, frames, times, duration, interpolation,
                              uvs=uvs, base_color_texture=texture, normals=normals)


# --------------------------------------------------------------------------- cameras over time


@dataclass
class OverTimeConfig:
    """Cameras for media of a dynamic scene."""

    frames: int = 60
    """Frames of the turntable-over-time video (the camera orbits once while time runs 0 -> 1)."""
    views: int = 4
    """Views (rows) of the (view x time) grid."""
    times: int = 5
    """Times (columns) of the (view x time) grid."""


def turntable_over_time(config: TurntableConfig) -> Cameras:
    """The turntable's ``config.num_views`` cameras with times evenly spaced over [0, 1]: the orbit and the clock run together."""
    cameras = turntable(config)
    return cameras.with_time(torch.as_tensor(keyframe_times(len(cameras)), dtype=cameras.c2w.dtype))


def grid_image(images: Tensor, rows: int) -> Tensor:
    """[R*C, H, W, 3] images (row-major) -> one [R*H, C*W, 3] image."""
    N, H, W, C = images.shape
    if N % rows:
        raise ValueError(f"{N} images do not fill {rows} rows")
    cols = N // rows
    return images.view(rows, cols, H, W, C).permute(0, 2, 1, 3, 4).reshape(rows * H, cols * W, C)


# --------------------------------------------------------------------------- a run's dynamic exports


DYNAMIC_FORMATS = ("glb_animated", "ply_frames", "grid")
"""Export formats of dynamic representations (``mp4`` of a dynamic run is the turntable over time)."""


def write_gaussian_frames(representation: object, directory: Path, times: Sequence[float]) -> list[Path]:
    """One 3DGS-layout PLY per time: the Gaussians deformed to t_k (positions, scales, rotations)."""
    from lift3d.export.ply import write_gaussians_ply

    if not hasattr(representation, "deformed"):
        raise ValueError(f"{type(representation).__name__} has no deformed Gaussians; ply_frames needs dynamic-gaussians")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    with torch.no_grad():
        for k, time in enumerate(times):
            means, scales, quats = representation.deformed(float(time))
            path = directory / f"gaussians_{k:03d}.ply"
            write_gaussians_ply(
                path, means=means, sh_dc=representation.sh_dc.detach()[:, 0], sh_rest=representation.sh_rest.detach(),
                opacity_logits=representation.opacity_logits.detach(), log_scales=scales.log(),
                quats=quats / quats.norm(dim=-1, keepdim=True),
            )
            written.append(path)
    (directory / "times.json").write_text(json.dumps({"times": [float(t) for t in times]}))
    return written + [directory / "times.json"]


def export_dynamic(trainer: object, formats: Sequence[str]) -> list[Path]:
    """The dynamic formats of a run (``trainer``: a :class:`lift3d.train.Trainer`) into ``<run>/export``."""
    from lift3d.cameras import view_time_grid
    from lift3d.export.video import write_png, to_uint8

    unknown = sorted(set(formats) - set(DYNAMIC_FORMATS))
    if unknown:
        raise ValueError(f"unknown dynamic formats {unknown}; valid: {list(DYNAMIC_FORMATS)}")
    representation = trainer.representation
    if not getattr(representation, "is_dynamic", False):
        raise ValueError(f"{type(representation).__name__} is static: {list(formats)} need a dynamic representation")
    cfg = trainer.config.export
    eval_cfg = trainer.config.trainer.eval
    directory = trainer.run_dir / "export"
    directory.mkdir(parents=True, exist_ok=True)
    times = keyframe_times(cfg.keyframes)
    written: list[Path] = []
    for fmt in formats:
        if fmt == "ply_frames":
            written += write_gaussian_frames(representation, directory / "frames", times)
        elif fmt == "glb_animated":
            if not hasattr(representation, "deform") or not hasattr(representation, "surface"):
                raise ValueError(f"{type(representation).__name__} cannot export glb_animated: it needs surface() and deform()")
            mesh, color_fn = representation.surface(chunk=cfg.query_chunk)
            written.append(export_animated_mesh(
                directory, mesh, color_fn, representation.deform, keyframes=cfg.keyframes,
                duration=cfg.animation_seconds, interpolation=cfg.animation_interpolation,
                texture_size=cfg.texture_size, device=str(trainer.device), chunk=cfg.query_chunk,
            ))
        elif fmt == "grid":
            size = cfg.video_resolution
            views = TurntableConfig(cfg.grid_views, eval_cfg.elevation_deg, eval_cfg.distance, eval_cfg.fovy_deg,
                                    0.0, size, size)
            images = trainer.render_views(view_time_grid(views, cfg.grid_times))
            path = directory / "view_time_grid.png"
            write_png(path, to_uint8(grid_image(images, rows=cfg.grid_views)[None])[0])
            written.append(path)
    return written
