"""Scenes of the analytic teacher: grammar, SDF primitives, sphere-traced renders, meshes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import trimesh

from lift3d.cameras import orbit_cameras
from lift3d.teachers.scenes import (
    AMBIENT,
    BACKGROUND,
    DIFFUSE,
    PALETTE,
    PRIMITIVES,
    SHAPES,
    TARGET_RADIUS,
    Part,
    parse_prompt,
)


def _cameras(azimuths_deg, elevation_deg=15.0, size=32, distance=3.25, fovy_deg=40.0):
    n = len(azimuths_deg)
    return orbit_cameras(
        torch.full((n,), elevation_deg), torch.tensor(azimuths_deg, dtype=torch.float32),
        torch.full((n,), distance), torch.full((n,), fovy_deg), size, size,
    )


# -------------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a red sphere", [("sphere", "red")]),
        ("A Red SPHERE", [("sphere", "red")]),
        ("  the blue cube.  ", [("cube", "blue")]),
        ("an orange torus!", [("torus", "orange")]),
        ("red cone on gray cylinder", [("cone", "red"), ("cylinder", "gray")]),
        ("A yellow capsule on THE white cube.", [("capsule", "yellow"), ("cube", "white")]),
        ("a grey capsule", [("capsule", "gray")]),
    ],
)
def test_valid_prompts_parse(text, expected):
    scene = parse_prompt(text)
    assert [(part.shape, part.color) for part in scene.parts] == expected
    assert scene.slug == "-on-".join(f"{color}-{shape}" for shape, color in expected)


def test_canonical_prompt_and_slug():
    scene = parse_prompt("ORANGE cube on a red torus")
    assert scene.prompt == "an orange cube on a red torus"
    assert scene.slug == "orange-cube-on-red-torus"
    assert parse_prompt(scene.prompt) == scene


@pytest.mark.parametrize("top, bottom", list(itertools.product(SHAPES, repeat=2)))
def test_composition_stacks_touching_centred_and_fits(top, bottom):
    scene = parse_prompt(f"a red {top} on a blue {bottom}")
    top_part, bottom_part = scene.parts
    (_, _, top_min_z), _ = top_part.bounds()
    _, (_, _, bottom_max_z) = bottom_part.bounds()
    assert top_min_z == pytest.approx(bottom_max_z, abs=1e-9)
    (_, _, low_z), (_, _, high_z) = scene.bounds()
    assert low_z == pytest.approx(-high_z, abs=1e-9)
    assert scene.bounding_radius() <= TARGET_RADIUS + 1e-9


def test_composition_touches_on_the_surface():
    # The sphere's lowest point is on the cube's top face: both SDFs vanish there.
    scene = parse_prompt("a red sphere on a blue cube")
    sphere, cube = scene.parts
    (_, _, touch_z), _ = sphere.bounds()
    point = torch.tensor([[0.0, 0.0, touch_z]], dtype=torch.float64)
    assert abs(float(sphere.sdf(point))) < 1e-9 and abs(float(cube.sdf(point))) < 1e-9
    assert float(sphere.sdf(point + torch.tensor([0.0, 0.0, 0.01], dtype=torch.float64))) < 0


@pytest.mark.parametrize("text, bad", [("a red dodecahedron", "dodecahedron"), ("a teal sphere", "teal"),
                                       ("a red sphere under a blue cube", "under")])
def test_unknown_word_error_names_it_and_lists_the_vocabulary(text, bad):
    with pytest.raises(ValueError) as info:
        parse_prompt(text)
    message = str(info.value)
    assert repr(bad) in message
    for word in (*SHAPES, *PALETTE, "<color> <shape> on", "vocabulary"):
        assert word in message


@pytest.mark.parametrize("text", ["", "red", "sphere red", "a red sphere on", "red sphere blue cube",
                                  "a red sphere on a blue cube on a green cone"])
def test_malformed_prompt_error_gives_the_grammar(text):
    with pytest.raises(ValueError, match="<color> <shape> on a <color> <shape>"):
        parse_prompt(text)


# ------------------------------------------------------------------------------------ sdf

# A point inside and a point just outside each unit-scale primitive.
INSIDE_OUTSIDE = {
    "sphere": ((0.0, 0.0, 0.5), (0.0, 0.0, 0.7)),
    "cube": ((0.4, 0.4, 0.4), (0.5, 0.0, 0.0)),
    "torus": ((0.5, 0.0, 0.1), (0.0, 0.0, 0.0)),  # the centre is in the hole
    "cone": ((0.0, 0.0, 0.45), (0.3, 0.0, 0.3)),  # at z = 0.3 the cone's radius is 0.12
    "cylinder": ((0.4, 0.0, 0.45), (0.0, 0.0, 0.55)),
    "capsule": ((0.0, 0.0, 0.65), (0.3, 0.0, 0.6)),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_sdf_sign_inside_outside(shape):
    part = Part(shape, "red")
    inside, outside = INSIDE_OUTSIDE[shape]
    assert float(part.sdf(torch.tensor(inside))) < 0
    assert float(part.sdf(torch.tensor(outside))) > 0
    far = torch.tensor([[3.0, 0.0, 0.0], [0.0, -3.0, 0.0], [0.0, 0.0, 3.0], [-2.0, 2.0, -2.0]])
    assert (part.sdf(far) > 1.0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_sdf_is_exact_distance_on_the_axes(shape):
    """Along +x and +z beyond the bounding box the distance is known from the half extents."""
    part = Part(shape, "red", center=(0.1, -0.2, 0.3), scale=0.7)
    hx, _, hz = (0.7 * h for h in PRIMITIVES[shape].half_extents)
    # Along z every primitive ends in a flat cap, a pole or an apex on the axis; the torus has a hole there.
    if shape != "torus":
        above = torch.tensor([0.1, -0.2, 0.3 + hz + 0.5])
        assert float(part.sdf(above)) == pytest.approx(0.5, abs=1e-6)
    if shape != "cone":  # the cone's widest point is at its base, not at z = 0
        beside = torch.tensor([0.1 + hx + 0.5, -0.2, 0.3])
        assert float(part.sdf(beside)) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_sdf_gradient_has_unit_norm(shape):
    """Exact SDFs satisfy the eikonal equation almost everywhere (what sphere tracing relies on)."""
    points = (2.0 * torch.rand(2000, 3, generator=torch.Generator().manual_seed(0)) - 1.0).double()
    points.requires_grad_(True)
    Part(shape, "red").sdf(points).sum().backward()
    norms = points.grad.norm(dim=-1)
    assert ((norms - 1.0).abs() < 1e-6).float().mean() > 0.99


# --------------------------------------------------------------------------------- render


def test_render_background_where_rays_miss_and_palette_where_they_hit():
    scene = parse_prompt("a green sphere")
    rgb, alpha = scene.render(_cameras([0.0, 120.0]), supersample=2)
    assert rgb.shape == (2, 32, 32, 3) and alpha.shape == (2, 32, 32, 1)
    assert rgb.min() >= 0 and rgb.max() <= 1
    background = torch.tensor(BACKGROUND)
    missed = alpha[..., 0] == 0
    assert missed[:, 0, 0].all() and missed.float().mean() > 0.5
    assert torch.equal(rgb[missed], background.expand(int(missed.sum()), 3))
    covered = alpha[..., 0] == 1
    assert covered[:, 16, 16].all()
    # Covered pixels are the palette colour times one shading factor in [ambient, ambient + diffuse].
    ratio = rgb[covered] / torch.tensor(PALETTE["green"])
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)
    assert ratio.min() >= AMBIENT - 1e-5 and ratio.max() <= AMBIENT + DIFFUSE + 1e-5
    assert ratio.max() - ratio.min() > 0.3  # the shading varies over the sphere


def test_supersampling_antialiases_the_silhouette():
    scene = parse_prompt("a red cube")
    _, hard = scene.render(_cameras([30.0]), supersample=1)
    _, soft = scene.render(_cameras([30.0]), supersample=3)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    fractional = (soft > 0) & (soft < 1)
    assert fractional.any()
    assert (soft.mean() - hard.mean()).abs() < 0.02


def test_front_and_back_views_differ_because_the_light_is_fixed_in_world_space():
    # A sphere looks the same from every side: only the lighting tells front from back.
    rgb, alpha = parse_prompt("a white sphere").render(_cameras([0.0, 180.0]))
    assert torch.equal(alpha[0], alpha[1])
    covered = alpha[0, ..., 0] == 1
    front, back = rgb[0][covered].mean(), rgb[1][covered].mean()
    assert front > back + 0.2


def test_render_is_deterministic_and_independent_of_the_batch():
    scene = parse_prompt("a yellow cone on a purple torus")
    cameras = _cameras([0.0, 45.0, 200.0], elevation_deg=25.0)
    rgb, alpha = scene.render(cameras)
    again, _ = scene.render(cameras)
    alone, alone_alpha = scene.render(cameras[1])
    assert torch.equal(rgb, again)
    assert torch.allclose(alone, rgb[1:2], atol=1e-6) and torch.allclose(alone_alpha, alpha[1:2], atol=1e-6)


def test_render_places_the_object_where_the_camera_looks():
    """The front camera (+x) sees the stacked object upright: the top part's colour above the bottom's."""
    rgb, alpha = parse_prompt("a red sphere on a blue cube").render(_cameras([0.0], elevation_deg=0.0, size=48))
    column = rgb[0, :, 24]
    covered = alpha[0, :, 24, 0] == 1
    redness = (column[:, 0] - column[:, 2])[covered]
    assert redness[0] > 0 and redness[-1] < 0  # image rows go down (OpenCV): red on top, blue below
    # Left/right symmetric about the image centre for a camera on the axis of symmetry.
    assert torch.allclose(alpha[0], alpha[0].flip(1), atol=1e-6)


# ----------------------------------------------------------------------------------- mesh


@pytest.mark.parametrize("shape", SHAPES)
def test_mesh_lies_on_the_zero_level_set_with_the_right_bounds(shape):
    scene = parse_prompt(f"a gray {shape}")
    resolution = 48
    mesh = scene.mesh(resolution=resolution)
    assert isinstance(mesh, trimesh.Trimesh) and len(mesh.faces) > 100
    low, high = (torch.tensor(corner) for corner in scene.bounds())
    spacing = float((high - low).max() + 0.1) / (resolution - 1)
    distance = scene.sdf(torch.from_numpy(mesh.vertices).float())
    assert distance.abs().max() < 0.5 * spacing
    # Marching cubes cuts a sharp apex inside its last cell.
    tolerance = 2.0 * spacing if shape == "cone" else spacing
    assert torch.allclose(torch.tensor(mesh.bounds).float(), torch.stack([low, high]).float(), atol=tolerance)
    assert mesh.volume > 0  # faces wind outward
    assert mesh.is_watertight


def test_mesh_of_a_sphere_has_the_right_volume_colour_and_position():
    mesh = parse_prompt("a red sphere").mesh(resolution=64)
    assert mesh.volume == pytest.approx(4.0 / 3.0 * math.pi * 0.6**3, rel=0.02)
    assert abs(mesh.center_mass).max() < 1e-2
    assert (mesh.visual.vertex_colors[:, :3] == [round(255 * c) for c in PALETTE["red"]]).all()


def test_mesh_of_a_composition_is_stacked_in_world_coordinates():
    scene = parse_prompt("a blue cone on a white cylinder")
    mesh = scene.mesh(resolution=64)
    low, high = scene.bounds()
    assert mesh.bounds[0, 2] == pytest.approx(low[2], abs=0.03)
    assert mesh.bounds[1, 2] == pytest.approx(high[2], abs=0.03)
    colours = mesh.visual.vertex_colors[:, :3].astype(float) / 255.0
    top = mesh.vertices[:, 2] > scene.parts[0].center[2]
    assert abs(colours[top].mean(0) - PALETTE["blue"]).max() < 0.05
