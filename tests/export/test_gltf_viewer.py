"""A PBR GLB written by lift3d, rendered by a third-party glTF viewer: three.js in headless Chromium.

The viewer (``tools/render_glb.py``: three's GLTFLoader + MeshStandardMaterial, WebGL on
SwiftShader) is npm-installed once under ``$TMPDIR/lift3d-gltf-viewer``, like the Khronos
validator; the tests skip only when that install cannot reach the npm registry.

The model is a lat-long UV sphere built in the file (y-up) frame and handed to
:func:`lift3d.export.gltf.write_glb` in world (z-up) coordinates through the documented mapping
``file (x, y, z) = world (x, z, -y)``, written here by hand so the check is not circular. Every
expectation (silhouette, which colour shows where, the shading direction of a tilted normal map)
is computed from that construction by ray casting, independently of the writer.

``LIFT3D_VIEWER_RENDERS=<folder>`` keeps the renders (and a labelled strip of them) there.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lift3d.export.gltf import write_glb
from test_mesh_export import _find_validator  # the Khronos validator, installed the same way
from conftest import load_render_glb

ROOT = Path(__file__).resolve().parents[2]
SIZE = 192  # image side in pixels
RADIUS = 0.5
CENTER_WORLD = np.array([0.1, 0.2, 0.3])  # off-centre, so a wrong axis mapping moves the silhouette
CENTER_FILE = np.array([CENTER_WORLD[0], CENTER_WORLD[2], -CENTER_WORLD[1]])  # (x, z, -y), by hand
FOV = 30.0  # degrees, vertical
EYE = CENTER_FILE + np.array([0.0, 0.0, 3.0])  # in front (+Z) of the sphere, looking at its centre
CAP = 45.0  # latitude (degrees) above which the albedo is green
TILT = 35.0  # degrees the "tilted" normal maps lean their normals (north: +Y, east: +X in tangent space)

RED, GREEN, BLUE = 0, 1, 2




render_glb = load_render_glb()


# --------------------------------------------------------------------------- the model


def lat_long_sphere(n_lat: int = 48, n_lon: int = 96):
    """Unit directions, faces, UVs (lower-left origin) and east tangents of a lat-long sphere, FILE frame.

    u = (longitude + 180) / 360 with longitude 0 facing +Z (the camera) and +90 at +X (image
    right); v = (latitude + 90) / 180, so north (+Y) is v = 1. The seam (u = 0 = 1) is at the back.
    The tangent is d/du (east); normal x east = north = d/dv, so the handedness w is +1.
    """
    lat = np.linspace(90.0, -90.0, n_lat + 1)  # rows, north to south
    lon = np.linspace(-180.0, 180.0, n_lon + 1)  # columns; the seam column is duplicated
    la, lo = np.meshgrid(np.radians(lat), np.radians(lon), indexing="ij")
    directions = np.stack([np.sin(lo) * np.cos(la), np.sin(la), np.cos(lo) * np.cos(la)], -1).reshape(-1, 3)
    uvs = np.stack([(lo + np.pi) / (2 * np.pi), (la + np.pi / 2) / np.pi], -1).reshape(-1, 2)
    east = np.stack([np.cos(lo), np.zeros_like(lo), -np.sin(lo)], -1).reshape(-1, 3)
    index = np.arange((n_lat + 1) * (n_lon + 1)).reshape(n_lat + 1, n_lon + 1)
    faces = []
    for i in range(n_lat):
        for j in range(n_lon):
            a, b, c, d = index[i, j], index[i, j + 1], index[i + 1, j], index[i + 1, j + 1]
            if i != 0:
                faces.append((a, c, b))  # counter-clockwise seen from outside
            if i != n_lat - 1:
                faces.append((b, c, d))
    faces = np.array(faces, dtype=np.int64)
    corners = directions[faces]
    outward = np.einsum("fj,fj->f", np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]),
                        corners.mean(1))
    assert (outward > 0).all(), "test geometry: faces must wind counter-clockwise from outside"
    assert np.allclose(np.cross(directions, east), np.stack([-directions[:, 1] * np.sin(lo.ravel()),
                       np.cos(la.ravel()), -directions[:, 1] * np.cos(lo.ravel())], -1))  # = north
    return directions, faces, uvs, east


def file_to_world(points: np.ndarray) -> np.ndarray:
    """Inverse of the documented world -> file mapping (x, y, z) -> (x, z, -y)."""
    return np.stack([points[:, 0], -points[:, 2], points[:, 1]], -1)


def albedo_texture(width: int = 256, height: int = 128) -> np.ndarray:
    """sRGB: red west of longitude 0 (image left), blue east of it (image right), a green cap north of CAP."""
    v = 1.0 - (np.arange(height) + 0.5) / height  # row 0 is the top of the image: v = 1
    u = (np.arange(width) + 0.5) / width
    latitude = v * 180.0 - 90.0
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, u < 0.5] = (220, 30, 30)
    image[:, u >= 0.5] = (30, 30, 220)
    image[latitude > CAP] = (30, 200, 30)
    return image


def constant_texture(rgb, size: int = 16) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (size, size, 3)).copy()


def tilted_normal(east: float = 0.0, north: float = 0.0) -> np.ndarray:
    """A tangent-space normal leaning ``east`` degrees towards +X (+u) or ``north`` degrees towards +Y (+v)."""
    assert east == 0.0 or north == 0.0
    e, n = math.radians(east), math.radians(north)
    return np.array([math.sin(e), math.sin(n), math.cos(e) * math.cos(n)])


def tilted_normal_texture(east: float = 0.0, north: float = 0.0) -> np.ndarray:
    """A constant normal texture (n + 1) / 2 of :func:`tilted_normal`."""
    return constant_texture(np.round((tilted_normal(east, north) + 1.0) * 127.5))


def bumpy_normal_texture(width: int = 256, height: int = 128, stripes: int = 24, degrees: float = 35.0) -> np.ndarray:
    """Normals rocking east/west in ``stripes`` bands along u (a corrugated surface)."""
    u = (np.arange(width) + 0.5) / width
    angle = np.radians(degrees) * np.sin(2 * np.pi * stripes * u)
    normal = np.stack([np.sin(angle), np.zeros_like(angle), np.cos(angle)], -1)
    row = np.round((normal + 1.0) * 127.5).astype(np.uint8)
    return np.broadcast_to(row[None], (height, width, 3)).copy()


MODELS = {
    # name: write_glb keyword arguments (beyond geometry) and the viewer's lighting
    "albedo": dict(base_color_texture=albedo_texture(), metallic=0.0, roughness=1.0),
    "polished_metal_factors": dict(base_color_texture=albedo_texture(), metallic=1.0, roughness=0.1),
    "polished_metal_texture": dict(base_color_texture=albedo_texture(), metallic=1.0, roughness=1.0,
                                   metallic_roughness_texture=constant_texture((255, 26, 255))),
    "rough_dielectric_texture": dict(base_color_texture=albedo_texture(), metallic=1.0, roughness=1.0,
                                     metallic_roughness_texture=constant_texture((255, 255, 0))),
    "bumpy": dict(base_color_texture=albedo_texture(), metallic=0.0, roughness=1.0,
                  normal_texture=bumpy_normal_texture()),
    # lit by one directional light, no environment: the normal map's direction moves the terminator
    "top_lit_flat": dict(normal_texture=constant_texture((128, 128, 255))),
    "top_lit_tilt_north": dict(normal_texture=tilted_normal_texture(north=TILT)),
    "top_lit_tilt_south": dict(normal_texture=tilted_normal_texture(north=-TILT)),
    "side_lit_tilt_east": dict(normal_texture=tilted_normal_texture(east=TILT)),
}
TILTED = {  # name: (light direction, file frame; east, north tilt in degrees)
    "top_lit_flat": ((0.0, 1.0, 0.0), 0.0, 0.0),
    "top_lit_tilt_north": ((0.0, 1.0, 0.0), 0.0, TILT),
    "top_lit_tilt_south": ((0.0, 1.0, 0.0), 0.0, -TILT),
    "side_lit_tilt_east": ((1.0, 0.0, 0.0), TILT, 0.0),
}
WRITES_TANGENTS = "tangents" in inspect.signature(write_glb).parameters
if WRITES_TANGENTS:  # the same normal maps relative to a TANGENT attribute instead of viewer-derived tangents
    MODELS.update({f"{name}_tangents": dict(MODELS[name], tangents=True)
                   for name in ("bumpy", "top_lit_tilt_north", "top_lit_tilt_south", "side_lit_tilt_east")})


def lighting(name: str) -> dict:
    """The viewer settings: a room environment, or for TILTED models one white directional light, no tone mapping."""
    tilted = TILTED.get(name.removesuffix("_tangents"))
    if tilted is None:
        return {}
    return dict(environment="none", lights=[{"direction": list(tilted[0]), "intensity": 3.0}], toneMapping="none")


# --------------------------------------------------------------------------- expectations by ray casting


def camera_rays(size: int = SIZE):
    """Unit ray directions [H, W, 3] (file frame) through pixel centres; row 0 is the top."""
    forward = CENTER_FILE - EYE
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    half = math.tan(math.radians(FOV) / 2)
    ndc = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    x, y = np.meshgrid(ndc, -ndc)
    rays = forward + (x * half)[..., None] * right + (y * half)[..., None] * up
    return rays / np.linalg.norm(rays, axis=-1, keepdims=True)


def expected_surface(size: int = SIZE):
    """(hit mask [H,W], unit sphere direction [H,W,3] of the first hit, file frame)."""
    rays = camera_rays(size)
    offset = EYE - CENTER_FILE
    b = rays @ offset
    disc = b * b - (offset @ offset - RADIUS**2)
    hit = disc > 0
    t = -b - np.sqrt(np.maximum(disc, 0.0))
    points = EYE + t[..., None] * rays
    return hit, (points - CENTER_FILE) / RADIUS


def expected_labels(size: int = SIZE):
    """Expected dominant channel per pixel (-1: background or within 6 degrees of a colour border)."""
    hit, direction = expected_surface(size)
    latitude = np.degrees(np.arcsin(np.clip(direction[..., 1], -1, 1)))
    longitude = np.degrees(np.arctan2(direction[..., 0], direction[..., 2]))
    labels = np.where(latitude > CAP, GREEN, np.where(longitude < 0, RED, BLUE))
    border = (np.abs(latitude - CAP) < 6) | ((np.abs(longitude) < 6) & (latitude < CAP + 6))
    return np.where(hit & ~border, labels, -1)


# --------------------------------------------------------------------------- rendering (once per module)


@pytest.fixture(scope="module")
def gltf_validator():
    return _find_validator()


@pytest.fixture(scope="module")
def viewer_renders(tmp_path_factory, gltf_validator) -> dict:
    """Write every model, check it with the Khronos validator, render all of them in one browser session."""
    try:
        render_glb.ensure_viewer()
    except render_glb.ViewerUnavailable as error:
        pytest.skip(f"glTF viewer unavailable: {error}")
    validator, reason = gltf_validator
    folder = tmp_path_factory.mktemp("viewer")
    directions, faces, uvs, east = lat_long_sphere()
    vertices = file_to_world(CENTER_FILE + RADIUS * directions)
    tangents = np.concatenate([file_to_world(east), np.ones((len(east), 1))], -1)
    jobs, validation = [], {}
    for name, material in MODELS.items():
        if material.get("tangents") is True:
            material = dict(material, tangents=tangents)
        glb = write_glb(folder / f"{name}.glb", vertices, faces, uvs=uvs, normals=file_to_world(directions),
                        **material)
        validation[name] = None if validator is None else validator.issues(glb)
        jobs.append(dict(glb=glb, png=folder / f"{name}.png", eye=EYE.tolist(), target=CENTER_FILE.tolist(),
                         fov=FOV, **lighting(name)))
    infos = render_glb.render(jobs, SIZE, SIZE)
    renders = {}
    for (name, _), job, info in zip(MODELS.items(), jobs, infos):
        rgba = np.asarray(Image.open(job["png"]).convert("RGBA"), dtype=np.float64) / 255.0
        renders[name] = dict(rgba=rgba, info=info, png=job["png"])
    keep = os.environ.get("LIFT3D_VIEWER_RENDERS")
    if keep:
        _keep_renders(Path(keep), renders)
    return dict(renders=renders, validation=validation, validator_reason=reason)


def _keep_renders(folder: Path, renders: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, render in renders.items():
        shutil.copy(render["png"], folder / f"{name}.png")
    shown = ["albedo", "polished_metal_texture", "bumpy", "top_lit_flat", "top_lit_tilt_north"]
    titles = ["rough, albedo", "metal 1 / rough 0.1 (MR tex)", "bumpy normal map", "top light, flat", "top light, tilted +Y"]
    strip = Image.new("RGB", (SIZE * len(shown), SIZE + 16), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for k, (name, title) in enumerate(zip(shown, titles)):
        image = Image.open(renders[name]["png"]).convert("RGBA")
        tile = Image.new("RGBA", image.size, (255, 255, 255, 255))
        tile.alpha_composite(image)
        strip.paste(tile.convert("RGB"), (k * SIZE, 16))
        draw.text((k * SIZE + 4, 2), title, fill=(0, 0, 0))
    strip.save(folder / "strip.png", optimize=True)


def luminance(rgba: np.ndarray) -> np.ndarray:
    return rgba[..., :3] @ np.array([0.2126, 0.7152, 0.0722])


def silhouette(rgba: np.ndarray) -> np.ndarray:
    return rgba[..., 3] > 0.5


def interior(size: int = SIZE, margin_degrees: float = 12.0) -> np.ndarray:
    """Pixels well inside the expected silhouette (view angle to the surface normal < 90 - margin)."""
    hit, direction = expected_surface(size)
    to_eye = EYE - (CENTER_FILE + RADIUS * direction)
    to_eye /= np.linalg.norm(to_eye, axis=-1, keepdims=True)
    return hit & (np.einsum("hwc,hwc->hw", direction, to_eye) > math.sin(math.radians(margin_degrees)))


def detail(rgba: np.ndarray) -> float:
    """Mean |Laplacian| of luminance inside the object, away from the albedo's colour borders:
    sharp reflections and bumps raise it, smooth diffuse shading does not."""
    lum = luminance(rgba)
    laplacian = np.abs(4 * lum[1:-1, 1:-1] - lum[:-2, 1:-1] - lum[2:, 1:-1] - lum[1:-1, :-2] - lum[1:-1, 2:])
    keep = interior() & (expected_labels() >= 0)
    return float(laplacian[keep[1:-1, 1:-1]].mean())


# --------------------------------------------------------------------------- the checks


def test_viewer_loads_the_pbr_material(viewer_renders):
    """The validator finds 0 errors (when installed) and three.js sees the maps and factors we wrote."""
    for name, issues in viewer_renders["validation"].items():
        if issues is None:
            continue
        messages = [f"{m['code']} at {m.get('pointer', '?')}: {m['message']}" for m in issues["messages"]]
        assert issues["numErrors"] == 0, f"{name}.glb: glTF validator errors: {messages}"
        codes = [m["code"] for m in issues["messages"]]
        derived = "normal_texture" in MODELS[name] and "tangents" not in MODELS[name]
        # normal maps without TANGENT: the validator notes that viewers derive tangents (these models test that)
        assert ("MESH_PRIMITIVE_GENERATED_TANGENT_SPACE" in codes) == derived, (name, messages)
        others = [m for m, code in zip(messages, codes) if code != "MESH_PRIMITIVE_GENERATED_TANGENT_SPACE"]
        if others:
            warnings.warn(f"{name}.glb: glTF validator: {others}", stacklevel=2)
    materials = {name: r["info"]["materials"] for name, r in viewer_renders["renders"].items()}
    assert all(len(m) == 1 and m[0]["type"] == "MeshStandardMaterial" for m in materials.values()), materials
    albedo = materials["albedo"][0]
    assert albedo["map"] and albedo["mapSize"] == [256, 128] and not albedo["normalMap"]
    assert (albedo["metalness"], albedo["roughness"]) == (0, 1)
    metal = materials["polished_metal_factors"][0]
    assert (metal["metalness"], pytest.approx(metal["roughness"])) == (1, 0.1) and not metal["metalnessMap"]
    textured = materials["polished_metal_texture"][0]
    assert textured["metalnessMap"] and textured["roughnessMap"] and textured["aoMap"]
    assert materials["bumpy"][0]["normalMap"] and "uv" in materials["bumpy"][0]["attributes"]
    for name, material in MODELS.items():
        assert ("tangent" in materials[name][0]["attributes"]) == ("tangents" in material), name


def test_silhouette_matches_the_sphere(viewer_renders):
    """The rendered coverage is the ray-cast sphere at its documented file-frame position."""
    expected, _ = expected_surface()
    for name, render in viewer_renders["renders"].items():
        if name.removesuffix("_tangents") in TILTED:
            continue  # unlit half: its pixels are black but still opaque; checked below all the same
        drawn = silhouette(render["rgba"])
        iou = (drawn & expected).sum() / (drawn | expected).sum()
        assert iou > 0.98, f"{name}: silhouette IoU {iou:.3f} with the expected sphere"
    drawn = silhouette(viewer_renders["renders"]["top_lit_flat"]["rgba"])
    assert (drawn & expected).sum() / (drawn | expected).sum() > 0.98


def test_albedo_texture_lands_where_it_was_painted(viewer_renders):
    """Red left, blue right, green cap on top: a flipped V (cap at the bottom) or U (red/blue swapped) fails."""
    labels = expected_labels()
    rgba = viewer_renders["renders"]["albedo"]["rgba"]
    rgb = rgba[..., :3]
    dominant = rgb.argmax(-1)
    checked = labels >= 0
    agreement = (dominant[checked] == labels[checked]).mean()
    per_colour = {c: (dominant[labels == c] == c).mean() for c in (RED, GREEN, BLUE)}
    assert agreement > 0.97 and min(per_colour.values()) > 0.9, (
        f"dominant colour agrees with the painted texture on {agreement:.1%} of pixels; per colour "
        f"(R, G, B) {per_colour}")
    # and it is the texture's hue, not a grey: the dominant channel clearly leads
    leading = np.sort(rgb[checked], -1)
    assert np.median(leading[:, 2] - leading[:, 1]) > 0.25


def test_metallic_roughness_change_the_look(viewer_renders):
    """Polished metal (metallic 1, roughness 0.1) shows sharp environment reflections; the MR texture
    (G = roughness, B = metallic) gives the same image as the same factors; swapped channels would not."""
    r = {name: render["rgba"] for name, render in viewer_renders["renders"].items()}
    inside = interior()

    def difference(a: str, b: str) -> float:
        return float(np.abs(r[a][..., :3] - r[b][..., :3])[inside].mean())

    rough, metal = detail(r["albedo"]), detail(r["polished_metal_factors"])
    assert metal > 3 * rough, f"polished metal detail {metal:.4f} vs rough dielectric {rough:.4f}"
    apart = difference("albedo", "polished_metal_factors")
    assert apart > 0.05, apart
    assert difference("polished_metal_texture", "polished_metal_factors") < 0.1 * apart
    assert difference("rough_dielectric_texture", "albedo") < 0.1 * apart
    # a metal has no diffuse term: its albedo shows as tinted reflections, still red left / blue right
    labels = expected_labels()
    dominant = r["polished_metal_texture"][..., :3].argmax(-1)
    for colour in (RED, BLUE):
        assert (dominant[labels == colour] == colour).mean() > 0.8


def test_normal_map_is_applied_with_plus_y_north(viewer_renders):
    """A corrugated normal map adds shading detail, and a constant tilt moves the terminator of a sphere
    lit by one light the way the tangent-space convention says: +Y leans towards +v (north, as lift3d's
    lower-left v runs), +X towards +u (east). A DirectX-style (-Y) map or a mirrored UV fails.

    Without a TANGENT attribute three.js derives a cotangent frame from screen-space derivatives
    (not MikkTSpace): on this 2:1 lat-long map it halves the east tilt near the equator, so here
    only the direction and at least a third of the shift are required (the validator's
    MESH_PRIMITIVE_GENERATED_TANGENT_SPACE warning is about exactly this)."""
    check_normal_maps(viewer_renders, "", exact=False)


@pytest.mark.skipif(not WRITES_TANGENTS, reason="write_glb has no tangents argument")
def test_normal_map_with_written_tangents(viewer_renders):
    """The same with the analytic east tangents written as TANGENT: three.js uses them as they are,
    so the lit area must match the Lambert prediction to within 3% of the sphere."""
    check_normal_maps(viewer_renders, "_tangents", exact=True)


def check_normal_maps(viewer_renders, suffix: str, exact: bool) -> None:
    r = {name: render["rgba"] for name, render in viewer_renders["renders"].items()}
    flat, bumpy = detail(r["albedo"]), detail(r["bumpy" + suffix])
    assert bumpy > 2 * flat, f"bumpy{suffix}: normal map detail {bumpy:.4f} vs flat {flat:.4f}"

    hit, normal = expected_surface()
    longitude = np.arctan2(normal[..., 0], normal[..., 2])
    east = np.stack([np.cos(longitude), np.zeros_like(longitude), -np.sin(longitude)], -1)
    north = np.cross(normal, east)

    def lit_fraction(name: str) -> float:
        return float((luminance(r[name]) > 0.02)[hit].mean())

    flat_lit = lit_fraction("top_lit_flat")
    assert abs(flat_lit - 0.5) < 0.03, f"top_lit_flat: {flat_lit:.1%} of the sphere lit, 50% expected"
    for name, (light, tilt_east, tilt_north) in TILTED.items():
        if name == "top_lit_flat":
            continue
        t = tilted_normal(tilt_east, tilt_north)
        shading_normal = t[0] * east + t[1] * north + t[2] * normal
        expected = float((shading_normal @ np.asarray(light) > 0)[hit].mean())  # Lambert: lit where n . l > 0
        lit = lit_fraction(name + suffix)
        message = f"{name + suffix}: {lit:.1%} of the sphere lit, {expected:.1%} expected (untilted 50%)"
        if exact:
            assert abs(lit - expected) < 0.03, message
        else:
            assert (lit - 0.5) / (expected - 0.5) > 1 / 3, message
