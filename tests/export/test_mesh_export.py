"""Mesh extraction, clean-up, Chamfer, UV baking and GLB/OBJ export (plus the Khronos glTF validator)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from lift3d.export.gltf import export_textured_mesh, world_to_file_rotation, write_glb, write_obj
from lift3d.export.mesh import chamfer_distance, clean_mesh, extract_mesh
from lift3d.export.texture import bake_texture, rasterize_uv, unwrap_uv, vertex_colors

RADIUS = 0.5
RED, BLUE = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])

# --------------------------------------------------------------------------- fields


def sphere_sdf(center=(0.0, 0.0, 0.0), radius: float = RADIUS) -> Callable[[torch.Tensor], torch.Tensor]:
    c = torch.tensor(center, dtype=torch.float32)
    return lambda p: (p - c).norm(dim=-1) - radius


def sphere_density(center=(0.0, 0.0, 0.0), radius: float = RADIUS, peak: float = 10.0, width: float = 0.02):
    """NeRF-like density: ``peak`` inside, 0 outside, a sigmoid shell of ``width``; level peak/2 is the sphere."""
    c = torch.tensor(center, dtype=torch.float32)
    return lambda p: peak * torch.sigmoid((radius - (p - c).norm(dim=-1)) / width)


def red_above_blue_below(center_z: float = 0.0):
    def color_fn(points: torch.Tensor) -> torch.Tensor:
        above = (points[:, 2:3] > center_z).float()
        return above * torch.tensor([1.0, 0.0, 0.0]) + (1 - above) * torch.tensor([0.0, 0.0, 1.0])

    return color_fn


@pytest.fixture(scope="module")
def reference_sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=5, radius=RADIUS)


@pytest.fixture(scope="module")
def textured_sphere() -> dict:
    """An off-centre sphere (so the axis conversion shows in the bounds), unwrapped and baked once."""
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=RADIUS)
    mesh.apply_translation([0.1, 0.2, 0.3])
    vertices, faces, uvs, vmapping = unwrap_uv(mesh, texture_size=256)
    texture = bake_texture(vertices, faces, uvs, red_above_blue_below(0.3), size=256)
    return dict(mesh=mesh, vertices=vertices, faces=faces, uvs=uvs, vmapping=vmapping, texture=texture)


# --------------------------------------------------------------------------- glTF validator


_VALIDATE_JS = r"""
const path = require('path');
const fs = require('fs');
const validator = require(path.resolve(process.argv[2]));
(async () => {
  for (const file of process.argv.slice(3)) {
    const report = await validator.validateBytes(new Uint8Array(fs.readFileSync(file)), {uri: path.basename(file)});
    console.log(JSON.stringify({file: file, issues: report.issues}));
  }
})().catch((error) => { console.error(error); process.exit(2); });
"""


class GltfValidator:
    """Runs the Khronos glTF validator (npm ``gltf-validator``) through node."""

    def __init__(self, package_dir: Path, node: str):
        self.package_dir = package_dir
        self.node = node
        self.script = Path(tempfile.mkdtemp(prefix="lift3d-gltfv-")) / "validate.js"
        self.script.write_text(_VALIDATE_JS)

    def issues(self, path: Path) -> dict:
        result = subprocess.run(
            [self.node, str(self.script), str(self.package_dir), str(path)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])["issues"]

    def check(self, path: Path) -> dict:
        """Assert 0 errors; surface warnings as pytest warnings (they show in the summary)."""
        issues = self.issues(path)
        messages = [f"{m['code']} at {m.get('pointer', '?')}: {m['message']}" for m in issues["messages"]]
        errors = [m for m, raw in zip(messages, issues["messages"]) if raw["severity"] == 0]
        assert issues["numErrors"] == 0, f"{path.name}: glTF validator errors:\n" + "\n".join(errors)
        if issues["numWarnings"]:
            details = [m for m, raw in zip(messages, issues["messages"]) if raw["severity"] == 1]
            warnings.warn(f"{path.name}: {issues['numWarnings']} glTF validator warnings: {details}", stacklevel=2)
        counts = {k: v for k, v in issues.items() if k != "messages"}
        logging.getLogger(__name__).info("%s: glTF validator %s", path.name, counts)
        return issues


def _validator_package(directory: Path) -> Path | None:
    for candidate in (directory, directory / "node_modules" / "gltf-validator"):
        if (candidate / "package.json").is_file() and (candidate / "index.js").is_file():
            return candidate
    return None


def _find_validator() -> tuple[GltfValidator | None, str]:
    node = shutil.which("node")
    if node is None:
        return None, "node is not on PATH"
    configured = os.environ.get("LIFT3D_GLTF_VALIDATOR_DIR")
    if configured:
        package = _validator_package(Path(configured))
        if package is None:
            return None, f"LIFT3D_GLTF_VALIDATOR_DIR={configured} holds no gltf-validator package"
        return GltfValidator(package, node), ""
    cache = Path(tempfile.gettempdir()) / "lift3d-gltf-validator"
    package = _validator_package(cache)
    if package is not None:
        return GltfValidator(package, node), ""
    npm = shutil.which("npm")
    if npm is None:
        return None, "gltf-validator not installed and npm is not on PATH"
    command = [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", "--no-save",
               "--fetch-retries=0", "--fetch-timeout=15000", "gltf-validator"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=45, check=False)
    except subprocess.TimeoutExpired:
        return None, "npm install gltf-validator timed out (no network to the npm registry?)"
    package = _validator_package(cache)
    if result.returncode != 0 or package is None:
        return None, f"npm install gltf-validator failed: {result.stderr.strip()[-300:]}"
    return GltfValidator(package, node), ""


@pytest.fixture(scope="module")
def gltf_validator() -> tuple[GltfValidator | None, str]:
    return _find_validator()


@pytest.fixture
def check_glb(gltf_validator) -> Callable[[Path], None]:
    """Validate a written GLB when the validator is available (a no-op otherwise)."""
    validator, _ = gltf_validator

    def check(path: Path) -> None:
        if validator is not None:
            validator.check(path)

    return check


# --------------------------------------------------------------------------- helpers


def glb_json(path: Path) -> dict:
    """The JSON chunk of a GLB file."""
    raw = path.read_bytes()
    magic, version, _ = struct.unpack_from("<4sII", raw, 0)
    assert magic == b"glTF" and version == 2
    length, kind = struct.unpack_from("<I4s", raw, 12)
    assert kind == b"JSON"
    return json.loads(raw[20 : 20 + length])


def sample_bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear texture lookup with the OpenGL convention (uv origin lower-left, texel centres at +0.5)."""
    h, w = image.shape[:2]
    x = np.clip(uv[:, 0] * w - 0.5, 0, w - 1)
    y = np.clip((1.0 - uv[:, 1]) * h - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    img = image[..., :3].astype(np.float64) / 255.0
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def assert_red_above_blue_below(colors: np.ndarray, height: np.ndarray, margin: float = 0.05) -> None:
    """Colours [V,3] in [0,1]: red where height > margin, blue where height < -margin."""
    above, below = height > margin, height < -margin
    assert above.sum() > 50 and below.sum() > 50
    assert np.abs(colors[above] - RED).max() < 0.05, colors[above][np.abs(colors[above] - RED).max(1).argmax()]
    assert np.abs(colors[below] - BLUE).max() < 0.05, colors[below][np.abs(colors[below] - BLUE).max(1).argmax()]


def expected_bounds(world_bounds: np.ndarray, front_to_plus_z: bool = False) -> np.ndarray:
    corners = trimesh.bounds.corners(world_bounds) @ world_to_file_rotation(front_to_plus_z).T
    return np.stack([corners.min(0), corners.max(0)])


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("kind", ["sdf", "density"])
def test_extract_mesh_of_a_sphere_has_the_right_radius_and_outward_normals(kind, reference_sphere):
    if kind == "sdf":
        mesh = extract_mesh(sphere_sdf(), [-1, -1, -1], [1, 1, 1], resolution=96, level_kind="sdf")
    else:
        mesh = extract_mesh(sphere_density(), [-1, -1, -1], [1, 1, 1], resolution=96, threshold=5.0)
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(radii.mean() - RADIUS) < 1e-3 and radii.std() < 2e-3
    assert mesh.is_watertight and mesh.volume > 0  # outward winding
    assert np.all(np.einsum("ij,ij->i", mesh.vertex_normals, mesh.vertices) > 0)
    assert chamfer_distance(mesh, reference_sphere) < 0.005


def test_automatic_density_threshold_encloses_the_occupied_region():
    mesh = extract_mesh(sphere_density(), [-1, -1, -1], [1, 1, 1], resolution=64)
    level = mesh.metadata["iso_level"]
    assert 0.0 < level < 10.0
    radii = np.linalg.norm(mesh.vertices, axis=1)
    # the shell is 0.02 wide: the automatic level sits inside it, on the outer side of peak/2
    assert RADIUS - 0.01 < radii.mean() < RADIUS + 0.06 and radii.std() < 5e-3


def test_coarse_to_fine_gives_the_single_pass_surface_in_world_coordinates():
    center = (0.3, -0.2, 0.1)
    field = sphere_sdf(center, radius=0.3)
    box = dict(bbox_min=[-1, -1, -1], bbox_max=[1, 1, 1], level_kind="sdf")
    fine = extract_mesh(field, resolution=96, coarse_to_fine=True, coarse_resolution=32, **box)
    single = extract_mesh(field, resolution=96, coarse_to_fine=False, **box)
    for mesh in (fine, single):
        radii = np.linalg.norm(mesh.vertices - np.array(center), axis=1)
        assert abs(radii.mean() - 0.3) < 2e-3
    assert np.allclose(fine.bounds, single.bounds, atol=5e-3)
    assert chamfer_distance(fine, single, num_samples=50_000) < 0.003
    # the fine pass spends its samples on the tight box: more detail than the single pass
    assert len(fine.faces) > 2 * len(single.faces)


def test_extract_mesh_without_a_surface_is_a_clear_error():
    with pytest.raises(ValueError, match="never crosses"):
        extract_mesh(sphere_sdf(radius=5.0), [-1, -1, -1], [1, 1, 1], resolution=16, level_kind="sdf")
    with pytest.raises(ValueError, match="level_kind"):
        extract_mesh(sphere_sdf(), [-1, -1, -1], [1, 1, 1], level_kind="occupancy")


# --------------------------------------------------------------------------- clean-up and Chamfer


def test_clean_mesh_drops_a_small_floater_and_degenerate_faces():
    body = trimesh.creation.icosphere(subdivisions=4, radius=RADIUS)  # 5120 faces
    floater = trimesh.creation.icosphere(subdivisions=0, radius=0.05)  # 20 faces (0.4%)
    floater.apply_translation([1.0, 0.0, 0.0])
    # unmerged copies (a duplicated vertex per face corner) and one degenerate face
    parts = [body, floater]
    vertices = np.concatenate([p.vertices[p.faces].reshape(-1, 3) for p in parts])
    faces = np.arange(len(vertices)).reshape(-1, 3)
    faces = np.concatenate([faces, [[0, 0, 1]]])
    messy = trimesh.Trimesh(vertices, faces, process=False)
    clean = clean_mesh(messy)
    assert len(clean.faces) == len(body.faces) and len(clean.vertices) == len(body.vertices)
    assert clean.is_watertight and clean.bounds[1, 0] < RADIUS + 1e-6
    assert len(messy.faces) == len(body.faces) + len(floater.faces) + 1  # input untouched
    kept = clean_mesh(messy, min_component_fraction=0.0)
    assert len(kept.faces) == len(body.faces) + len(floater.faces)


def test_clean_mesh_decimates_only_with_a_decimator(caplog):
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=RADIUS)
    try:
        import fast_simplification  # noqa: F401
    except ImportError:
        with caplog.at_level(logging.INFO, logger="lift3d.export.mesh"):
            out = clean_mesh(mesh, target_faces=1000)
        assert len(out.faces) == len(mesh.faces)
        assert "no decimator" in caplog.text
    else:
        out = clean_mesh(mesh, target_faces=1000)
        assert len(out.faces) <= 1100


def test_chamfer_is_zero_on_itself_and_grows_with_a_shift():
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=RADIUS)
    assert chamfer_distance(mesh, mesh, num_samples=20_000) == 0.0
    distances = []
    for shift in (0.01, 0.05, 0.2):
        moved = mesh.copy().apply_translation([shift, 0, 0])
        distances.append(chamfer_distance(moved, mesh, num_samples=20_000))
    assert 0 < distances[0] < distances[1] < distances[2]
    # normalised by the ground truth's diagonal: scaling both meshes changes nothing
    scaled = [m.copy().apply_scale(3.0) for m in (mesh.copy().apply_translation([0.05, 0, 0]), mesh)]
    assert chamfer_distance(*scaled, num_samples=20_000) == pytest.approx(distances[1], rel=1e-6)


# --------------------------------------------------------------------------- UVs and baking


def test_rasterize_uv_covers_a_full_quad_exactly():
    uvs = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    face_ids, bary, rows, cols = rasterize_uv(faces, uvs, 32, max_candidates=500)  # several batches
    covered = np.zeros((32, 32), dtype=int)
    np.add.at(covered, (rows, cols), 1)
    assert covered.min() == 1 and covered.max() <= 2  # the diagonal's centres go to both triangles
    assert np.allclose(bary.sum(1), 1.0) and bary.min() >= 0
    # bottom-left triangle (face 0: u >= v) holds the texel at the image's bottom-right corner
    corner = (rows == 31) & (cols == 31)
    assert set(face_ids[corner].tolist()) == {0}


def test_unwrap_uv_keeps_geometry(textured_sphere):
    keys = ("mesh", "vertices", "faces", "uvs", "vmapping")
    mesh, vertices, faces, uvs, vmapping = (textured_sphere[k] for k in keys)
    assert np.allclose(vertices, mesh.vertices[vmapping])
    assert len(faces) == len(mesh.faces) and uvs.min() >= 0 and uvs.max() <= 1
    assert np.allclose(trimesh.Trimesh(vertices, faces, process=False).area, mesh.area)


def test_baked_texture_matches_the_colour_field(textured_sphere):
    t = textured_sphere
    assert t["texture"].shape == (256, 256, 3) and t["texture"].dtype == np.uint8
    colors = sample_bilinear(t["texture"], t["uvs"])  # vertices sit on chart borders: needs the dilation
    assert_red_above_blue_below(colors, t["vertices"][:, 2] - 0.3)
    # a smooth field: texture lookups at random surface points match the field there
    smooth = lambda p: (p + 0.5) / 1.5  # noqa: E731  (in [0,1] on this sphere)
    image = bake_texture(t["vertices"], t["faces"], t["uvs"], smooth, size=256)
    rng = np.random.default_rng(0)
    face = rng.integers(0, len(t["faces"]), 4000)
    bary = rng.dirichlet(np.ones(3), 4000)
    corners = t["faces"][face]
    points = np.einsum("nk,nkc->nc", bary, t["vertices"][corners])
    uv = np.einsum("nk,nkc->nc", bary, t["uvs"][corners])
    error = np.abs(sample_bilinear(image, uv) - smooth(torch.from_numpy(points)).numpy())
    assert error.mean() < 0.01 and error.max() < 0.05, (error.mean(), error.max())
    per_vertex = vertex_colors(t["mesh"], red_above_blue_below(0.3))
    assert_red_above_blue_below(per_vertex, t["mesh"].vertices[:, 2] - 0.3)


# --------------------------------------------------------------------------- files


def test_write_glb_reloads_with_texture_material_and_y_up_bounds(textured_sphere, tmp_path, check_glb):
    t = textured_sphere
    path = write_glb(tmp_path / "model.glb", t["vertices"], t["faces"], uvs=t["uvs"],
                     base_color_texture=t["texture"], metallic=0.0, roughness=0.8)
    assert not list(tmp_path.glob(".*.tmp"))
    loaded = trimesh.load(path, force="mesh")
    material = loaded.visual.material
    assert material.baseColorTexture.size == (256, 256)
    assert material.metallicFactor == 0.0 and material.roughnessFactor == pytest.approx(0.8)
    assert np.allclose(loaded.bounds, expected_bounds(t["mesh"].bounds), atol=1e-5)
    # world z is glTF y: the colour split follows the up axis
    colors = sample_bilinear(np.asarray(material.baseColorTexture.convert("RGB")), loaded.visual.uv)
    assert_red_above_blue_below(colors, loaded.vertices[:, 1] - 0.3)
    trimesh_colors = loaded.visual.to_color().vertex_colors[:, :3] / 255.0  # trimesh's own (nearest) lookup
    assert_red_above_blue_below(trimesh_colors, loaded.vertices[:, 1] - 0.3)
    # normals point outward in the file frame too
    center = np.array([0.1, 0.2, 0.3]) @ world_to_file_rotation().T
    assert np.all(np.einsum("ij,ij->i", loaded.vertex_normals, loaded.vertices - center) > 0)
    pbr = glb_json(path)["materials"][0]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0 and pbr["roughnessFactor"] == pytest.approx(0.8)
    assert "baseColorTexture" in pbr
    check_glb(path)


def test_front_to_plus_z_turns_the_front_to_glTF_front(textured_sphere, tmp_path, check_glb):
    t = textured_sphere
    path = write_glb(tmp_path / "front.glb", t["vertices"], t["faces"], uvs=t["uvs"],
                     base_color_texture=t["texture"], front_to_plus_z=True)
    loaded = trimesh.load(path, force="mesh")
    assert np.allclose(loaded.bounds, expected_bounds(t["mesh"].bounds, True), atol=1e-5)
    assert np.allclose(world_to_file_rotation(True) @ [1, 0, 0], [0, 0, 1])  # front (+x) -> +Z
    assert np.allclose(world_to_file_rotation(True) @ [0, 0, 1], [0, 1, 0])  # up stays up
    check_glb(path)


def test_write_glb_with_vertex_colours_and_no_texture(tmp_path, check_glb):
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=RADIUS)
    colors = vertex_colors(mesh, red_above_blue_below())
    path = write_glb(tmp_path / "vc.glb", mesh.vertices, mesh.faces, vertex_colors=colors)
    tree = glb_json(path)
    primitive = tree["meshes"][0]["primitives"][0]
    assert "COLOR_0" in primitive["attributes"] and "TEXCOORD_0" not in primitive["attributes"]
    pbr = tree["materials"][primitive["material"]]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0 and pbr["roughnessFactor"] == 1.0
    scene = trimesh.load(path)  # as a scene: force="mesh" would drop the colour attribute
    (loaded,) = scene.geometry.values()
    reloaded = np.asarray(loaded.visual.vertex_attributes["color"])[:, :3] / 255.0
    assert_red_above_blue_below(reloaded, loaded.vertices[:, 1])
    plain = write_glb(tmp_path / "plain.glb", mesh.vertices, mesh.faces, normals=False)
    assert "NORMAL" not in glb_json(plain)["meshes"][0]["primitives"][0]["attributes"]
    check_glb(path)
    check_glb(plain)


def test_write_obj_mtl_png_reload(textured_sphere, tmp_path):
    t = textured_sphere
    files = write_obj(tmp_path / "sub" / "model.obj", t["vertices"], t["faces"], uvs=t["uvs"],
                      base_color_texture=t["texture"], roughness=0.7)
    assert [f.name for f in files] == ["model.obj", "model.mtl", "model.png"]
    assert "mtllib model.mtl" in files[0].read_text()
    mtl = files[1].read_text()
    assert "map_Kd model.png" in mtl and "Pr 0.7" in mtl
    loaded = trimesh.load(files[0], force="mesh", process=False)
    assert loaded.visual.material.image.size == (256, 256)
    assert np.allclose(loaded.bounds, expected_bounds(t["mesh"].bounds), atol=1e-5)
    colors = sample_bilinear(np.asarray(loaded.visual.material.image.convert("RGB")), loaded.visual.uv)
    assert_red_above_blue_below(colors, loaded.vertices[:, 1] - 0.3)


def test_export_textured_mesh_from_an_extracted_field(tmp_path, check_glb):
    mesh = clean_mesh(extract_mesh(sphere_sdf(), [-1, -1, -1], [1, 1, 1], resolution=40, level_kind="sdf"))
    files = export_textured_mesh(tmp_path / "export", mesh, red_above_blue_below(), texture_size=128)
    assert [f.name for f in files] == ["model.glb", "model.obj", "model.mtl", "model.png"]
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)
    loaded = trimesh.load(files[0], force="mesh")
    assert loaded.visual.material.baseColorTexture.size == (128, 128)
    colors = sample_bilinear(np.asarray(loaded.visual.material.baseColorTexture.convert("RGB")), loaded.visual.uv)
    assert_red_above_blue_below(colors, loaded.vertices[:, 1], margin=0.08)
    check_glb(files[0])
    with pytest.raises(ValueError, match="unknown mesh formats"):
        export_textured_mesh(tmp_path / "x", mesh, red_above_blue_below(), formats=["fbx"])


def test_glb_files_pass_the_khronos_validator(gltf_validator, textured_sphere, tmp_path):
    validator, reason = gltf_validator
    if validator is None:
        pytest.skip(f"glTF validator unavailable: {reason}")
    t = textured_sphere
    paths = [
        write_glb(tmp_path / "textured.glb", t["vertices"], t["faces"], uvs=t["uvs"], base_color_texture=t["texture"]),
        write_glb(tmp_path / "vertex_colours.glb", t["mesh"].vertices, t["mesh"].faces,
                  vertex_colors=vertex_colors(t["mesh"], red_above_blue_below(0.3))),
        write_glb(tmp_path / "plain.glb", t["mesh"].vertices, t["mesh"].faces, normals=False),
    ]
    for path in paths:
        issues = validator.check(path)
        assert issues["numErrors"] == 0
    # the harness is not vacuous: non-unit normals (written by trimesh directly) are errors
    sphere = trimesh.creation.icosphere(subdivisions=1)
    sphere.vertex_normals = sphere.vertex_normals * 2.0
    bad = tmp_path / "bad.glb"
    payload = trimesh.exchange.gltf.export_glb(trimesh.Scene(sphere), include_normals=True, unitize_normals=False)
    bad.write_bytes(payload)
    assert validator.issues(bad)["numErrors"] > 0


def test_write_glb_pbr_maps_follow_the_gltf_channel_layout(textured_sphere, tmp_path, check_glb):
    """metallicRoughness: G = roughness, B = metallic (linear), R = occlusion; normal map; no pack()."""
    t = textured_sphere
    size = 64
    orm = np.zeros((size, size, 3), dtype=np.uint8)
    orm[..., 0], orm[..., 1], orm[..., 2] = 255, 200, 40  # occlusion 1, roughness ~0.78, metallic ~0.16
    normal = np.zeros((size, size, 3), dtype=np.uint8)
    normal[...] = (128, 128, 255)  # the unperturbed tangent-space normal
    path = write_glb(tmp_path / "pbr.glb", t["vertices"], t["faces"], uvs=t["uvs"], base_color_texture=t["texture"],
                     metallic=1.0, roughness=1.0, metallic_roughness_texture=orm, normal_texture=normal)
    material = glb_json(path)["materials"][0]
    pbr = material["pbrMetallicRoughness"]
    assert {"baseColorTexture", "metallicRoughnessTexture"} <= set(pbr) and "normalTexture" in material
    assert pbr["metallicFactor"] == 1.0 and pbr["roughnessFactor"] == 1.0
    loaded = trimesh.load(path, force="mesh").visual.material
    channels = np.asarray(loaded.metallicRoughnessTexture.convert("RGB"))
    assert tuple(channels[0, 0]) == (255, 200, 40)  # written as given: G roughness, B metallic
    check_glb(path)
    with pytest.raises(ValueError, match="metallic_roughness_texture needs uvs"):
        write_glb(tmp_path / "x.glb", t["vertices"], t["faces"], metallic_roughness_texture=orm)


# --------------------------------------------------------------------------- PBR materials


def glb_accessor(path: Path, index: int) -> np.ndarray:
    """A float32 accessor of a GLB file as [count, components] (tightly packed views only)."""
    raw = path.read_bytes()
    tree = glb_json(path)
    json_length = struct.unpack_from("<I", raw, 12)[0]
    binary = raw[20 + json_length + 8 :]
    accessor = tree["accessors"][index]
    view = tree["bufferViews"][accessor["bufferView"]]
    assert accessor["componentType"] == 5126 and view.get("byteStride") in (None, 4 * {"VEC2": 2, "VEC3": 3, "VEC4": 4}[accessor["type"]])
    components = {"VEC2": 2, "VEC3": 3, "VEC4": 4}[accessor["type"]]
    start = view.get("byteOffset", 0) + accessor.get("byteOffset", 0)
    return np.frombuffer(binary, dtype="<f4", count=accessor["count"] * components, offset=start).reshape(-1, components)


def _constant_pbr_mesh(albedo, roughness, metallic, bump_xy):
    """A PBR-material icosphere whose field is forced constant (zero last layer, biases = logits)."""
    from lift3d.render.pbr import EnvironmentLightConfig
    from lift3d.representations.mesh import PBRMaterialConfig, TexturedMesh, TexturedMeshConfig

    material = PBRMaterialConfig(albedo_range=(0.0, 1.0), roughness_range=(0.0, 1.0), metallic_range=(0.0, 1.0),
                                 bump=True, bump_scale=0.5, light=EnvironmentLightConfig(base_resolution=16, min_resolution=4))
    model = TexturedMesh(TexturedMeshConfig(icosphere_subdivisions=3, appearance="field", material="pbr",
                                            kernel_tier="reference", pbr=material))
    unit = torch.tensor([*albedo, roughness, metallic, *((np.asarray(bump_xy) + 0.5) / 1.0)], dtype=torch.float32)
    with torch.no_grad():
        model.network[-1].weight.zero_()
        model.network[-1].bias.copy_(torch.logit(unit.clamp(1e-4, 1 - 1e-4)))
    return model


def test_pbr_material_export_writes_the_field_as_gltf_maps(tmp_path, check_glb):
    """baseColor = sRGB(albedo), metallicRoughness G = roughness and B = metallic (linear, R = 1), factors 1;
    a flat bump bakes the unperturbed (128, 128, 255); OBJ gets map_Pr / map_Pm / norm."""
    from lift3d.render.pbr import linear_to_srgb

    albedo, roughness, metallic = (0.8, 0.3, 0.1), 0.35, 0.6
    model = _constant_pbr_mesh(albedo, roughness, metallic, (0.0, 0.0))
    mesh, material = model.surface()
    files = export_textured_mesh(tmp_path, mesh, material, formats=["glb", "obj"], texture_size=64)
    assert [f.name for f in files] == ["model.glb", "model.obj", "model.mtl", "model.png", "model_roughness.png",
                                       "model_metallic.png", "model_normal.png"]
    check_glb(files[0])
    tree = glb_json(files[0])
    pbr = tree["materials"][0]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 1.0 and pbr["roughnessFactor"] == 1.0
    assert set(tree["meshes"][0]["primitives"][0]["attributes"]) == {"POSITION", "NORMAL", "TANGENT", "TEXCOORD_0"}
    loaded = trimesh.load(files[0], force="mesh").visual.material
    orm = np.asarray(loaded.metallicRoughnessTexture.convert("RGB")).reshape(-1, 3).astype(np.float64)
    assert np.abs(orm - [255, roughness * 255, metallic * 255]).max() <= 1.0  # not pack()'s R = metallic
    base = np.asarray(loaded.baseColorTexture.convert("RGB")).reshape(-1, 3).astype(np.float64)
    expected = linear_to_srgb(torch.tensor(albedo)).numpy() * 255
    assert np.abs(base - expected).max() <= 1.0
    normal = np.asarray(loaded.normalTexture.convert("RGB")).reshape(-1, 3).astype(np.float64)
    assert np.abs(normal - [127.5, 127.5, 255]).max() <= 1.0
    mtl = files[2].read_text()
    assert "map_Kd model.png" in mtl and "map_Pr model_roughness.png" in mtl and "map_Pm model_metallic.png" in mtl
    assert "norm model_normal.png" in mtl
    grey = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(files[4]))
    assert grey.ndim == 2 and np.abs(grey.astype(np.float64) - roughness * 255).max() <= 1.0


def test_pbr_normal_map_and_tangents_give_back_the_trained_shading_normal(tmp_path, check_glb):
    """A viewer's normalize(T x + w (N x T) y + N z) from the file's NORMAL, TANGENT and normal texture
    equals the shading normal the renderer used (bump in the normal-and-up-axis frame)."""
    from lift3d.render.pbr import perturb_normal

    bump = (0.3, -0.2)
    model = _constant_pbr_mesh((0.5, 0.5, 0.5), 0.5, 0.0, bump)
    mesh, material = model.surface()
    path = export_textured_mesh(tmp_path, mesh, material, formats=["glb"], texture_size=256)[0]
    check_glb(path)
    attributes = glb_json(path)["meshes"][0]["primitives"][0]["attributes"]
    normals, tangents = glb_accessor(path, attributes["NORMAL"]), glb_accessor(path, attributes["TANGENT"])
    uv = glb_accessor(path, attributes["TEXCOORD_0"]) * [1.0, -1.0] + [0.0, 1.0]  # glTF top-left -> OpenGL
    assert set(np.unique(tangents[:, 3])) <= {-1.0, 1.0}
    image = np.asarray(trimesh.load(path, force="mesh").visual.material.normalTexture.convert("RGB"))
    local = sample_bilinear(image, uv) * 2.0 - 1.0
    bitangents = tangents[:, 3:] * np.cross(normals, tangents[:, :3])
    rebuilt = local[:, :1] * tangents[:, :3] + local[:, 1:2] * bitangents + local[:, 2:3] * normals
    rebuilt /= np.linalg.norm(rebuilt, axis=-1, keepdims=True)
    rotation = world_to_file_rotation()
    world_normals = torch.as_tensor(normals @ rotation, dtype=torch.float32)  # file -> world (orthogonal)
    expected = perturb_normal(world_normals, torch.tensor(bump).expand(len(normals), 2)).numpy() @ rotation.T
    cosine = np.sum(rebuilt * expected, axis=-1)
    tilt = np.sum(expected * normals, axis=-1)
    assert tilt.max() < 0.95  # the bump really tilts the normal (about 20 degrees)
    # Measured: every vertex within 1.6 degrees (8-bit texels, bilinear taps); flipping the green axis gives 0.78-0.89.
    assert cosine.min() > 0.999 and np.median(cosine) > 0.9999, np.quantile(cosine, [0.0, 0.05, 0.5])
