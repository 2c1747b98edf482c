"""Triangle rasterization kernels: hand-checkable cases for every tier, reference gradchecks, the
cpu tier against the reference (values and gradients), bit-for-bit determinism of the cpu tier,
and input checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from conftest import require_cpu_ops

from lift3d.kernels.mesh_raster import (
    ANTIALIAS_OP,
    INTERPOLATE_OP,
    RASTERIZE_OP,
    TEXTURE_OP,
    RasterOutput,
    antialias,
    edge_topology,
    interpolate,
    rasterize,
    texture,
)

TIERS = ["reference", "cpu"]


@pytest.fixture(scope="module")
def cpu_tier() -> None:
    require_cpu_ops(RASTERIZE_OP, INTERPOLATE_OP, ANTIALIAS_OP, TEXTURE_OP)


@pytest.fixture(params=TIERS)
def tier(request: pytest.FixtureRequest) -> str:
    if request.param == "cpu":
        request.getfixturevalue("cpu_tier")
    return request.param


def pixel_grid(height: int, width: int) -> tuple[Tensor, Tensor]:
    """[H, W] NDC x and y of the pixel centres (row 0 at ndc_y = -1)."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return (2 * xs.double() + 1) / width - 1, (2 * ys.double() + 1) / height - 1


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected|| (the difference itself when the reference vanishes)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / scale if scale > 0 else difference


# --------------------------------------------------------------------------------------------
# hand-checkable cases (every tier)
# --------------------------------------------------------------------------------------------


def test_one_triangle_covers_the_lower_left_half(tier: str) -> None:
    # (-1,-1), (1,-1), (-1,1) at w = 1: covered iff qx + qy <= 0, i.e. x + y <= 7 at 8x8 (the
    # diagonal's pixel centres lie exactly on the edge, and edges are inclusive).
    positions = torch.tensor([[-1.0, -1.0, 0.25, 1.0], [1.0, -1.0, 0.25, 1.0], [-1.0, 1.0, 0.25, 1.0]])
    faces = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    raster = rasterize(positions, faces, (8, 8), tier=tier)
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    expected = torch.where(xs + ys <= 7, 0, -1).to(torch.int32)
    assert raster.triangle_id.dtype == torch.int32
    assert torch.equal(raster.triangle_id[0], expected)
    qx, qy = pixel_grid(8, 8)
    covered = expected >= 0
    # Affine triangle (w constant): q = u v0 + v v1 + (1 - u - v) v2.
    u, v = -(qx + qy) / 2, (qx + 1) / 2
    torch.testing.assert_close(raster.barycentrics[0, ..., 0][covered].double(), u[covered], atol=1e-6, rtol=0)
    torch.testing.assert_close(raster.barycentrics[0, ..., 1][covered].double(), v[covered], atol=1e-6, rtol=0)
    torch.testing.assert_close(raster.depth[0][covered], torch.full((int(covered.sum()),), 0.25))
    assert (raster.barycentrics[0][~covered] == 0).all() and (raster.depth[0][~covered] == 0).all()


def brute_force_raster(positions: Tensor, faces: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per pixel, per triangle: solve for the point of the triangle on the pixel's ray (float64)."""
    qx, qy = pixel_grid(height, width)
    ids = torch.full((height, width), -1, dtype=torch.long)
    bary = torch.zeros(height, width, 2, dtype=torch.float64)
    depth = torch.full((height, width), math.inf, dtype=torch.float64)
    for f, corners in enumerate(faces.tolist()):
        c = positions.double()[corners]  # [3, 4]
        for y in range(height):
            for x in range(width):
                # sum l_i (x_i - qx w_i) = 0, sum l_i (y_i - qy w_i) = 0, sum l_i = 1
                system = torch.stack([c[:, 0] - qx[y, x] * c[:, 3], c[:, 1] - qy[y, x] * c[:, 3], torch.ones(3)])
                weights = torch.linalg.solve(system, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
                point = weights @ c
                if (weights < 0).any() or point[3] <= 0:
                    continue
                z = point[2] / point[3]
                if -1 <= z <= 1 and z < depth[y, x]:
                    ids[y, x], depth[y, x], bary[y, x] = f, z, weights[:2]
    return ids, bary, torch.where(ids >= 0, depth, torch.zeros_like(depth))


def test_perspective_barycentrics_and_vertices_behind_the_eye(tier: str) -> None:
    # Triangle 0 has distinct w (perspective-correct barycentrics differ from screen-linear ones);
    # triangle 1 has a vertex behind the eye (w < 0): drawn without clipping; triangle 2 lies
    # beyond the far plane (z/w > 1): never drawn.
    positions = torch.tensor(
        [
            [-0.9, -0.8, 0.2, 1.0], [1.6, -0.4, 0.9, 2.0], [-0.2, 2.1, 1.5, 3.0],
            [0.3, 0.1, 0.1, 1.0], [0.9, -0.5, 0.3, 1.5], [0.5, 0.5, -0.5, -0.5],
            [-1.0, -1.0, 2.0, 1.0], [1.0, -1.0, 2.0, 1.0], [0.0, 1.0, 2.0, 1.0],
        ]
    )
    faces = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    raster = rasterize(positions, faces, (11, 13), tier=tier)
    ids, bary, depth = brute_force_raster(positions, faces, 11, 13)
    assert torch.equal(raster.triangle_id[0].long(), ids)
    assert (ids == 0).any() and (ids == 1).any() and not (ids == 2).any()
    torch.testing.assert_close(raster.barycentrics[0].double(), bary, atol=2e-6, rtol=0)
    torch.testing.assert_close(raster.depth[0].double(), depth, atol=2e-6, rtol=0)


def test_depth_test_and_ties(tier: str) -> None:
    # Two triangles covering the same pixels; the nearer (smaller z/w) wins whatever the order,
    # and at equal depth the smaller index wins.
    def quad_triangle(z: float) -> list[list[float]]:
        return [[-1.0, -1.0, z, 1.0], [3.0, -1.0, z, 1.0], [-1.0, 3.0, z, 1.0]]  # covers the screen

    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    for z_first, z_second, winner in [(0.5, -0.2, 1), (-0.2, 0.5, 0), (0.3, 0.3, 0)]:
        positions = torch.tensor(quad_triangle(z_first) + quad_triangle(z_second))
        raster = rasterize(positions, faces, (5, 6), tier=tier)
        assert (raster.triangle_id == winner).all()
        torch.testing.assert_close(raster.depth, torch.full((1, 5, 6), min(z_first, z_second)))


def test_rows_start_at_the_bottom_and_empty_pixels(tier: str) -> None:
    # A triangle in the upper half of NDC (y > 0) lands in rows >= H / 2; the rest stays empty.
    positions = torch.tensor([[-1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2]])
    raster = rasterize(positions, faces, (8, 8), tier=tier)
    assert (raster.triangle_id[0, :4] == -1).all()
    assert (raster.triangle_id[0, 4:] == 0).any()
    colors = interpolate(torch.ones(3, 2), raster, faces, tier=tier)
    torch.testing.assert_close(colors[..., :1], raster.coverage())
    empty = rasterize(positions, faces[:0], (4, 4), tier=tier)
    assert (empty.triangle_id == -1).all() and (empty.barycentrics == 0).all()


def test_antialias_gives_analytic_edge_coverage(tier: str) -> None:
    # A quad from x = -0.3 to x = 0.45 (NDC) spanning all rows, white on black, 8 pixels wide: its
    # vertical edges sit at screen x = 2.8 and 5.8, so pixel 2 is 20% covered and pixel 5 80%.
    # The diagonal between its two triangles is shared and front-facing on both sides: no blend.
    positions = torch.tensor(
        [[-0.3, -2.0, 0.0, 1.0], [0.45, -2.0, 0.0, 1.0], [0.45, 2.0, 0.0, 1.0], [-0.3, 2.0, 0.0, 1.0]],
        requires_grad=True,
    )
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    raster = rasterize(positions, faces, (6, 8), tier=tier)
    assert set(raster.triangle_id.unique().tolist()) == {-1, 0, 1}
    color = interpolate(torch.ones(4, 1), raster, faces, tier=tier)
    out = antialias(color, raster, positions, faces, tier=tier)
    expected = torch.tensor([0.0, 0.0, 0.2, 1.0, 1.0, 0.8, 0.0, 0.0]).expand(6, 8)
    torch.testing.assert_close(out[0, ..., 0], expected, atol=1e-5, rtol=0)
    # d coverage(pixel 5) / d (edge x in NDC) = W / 2 = 4, shared by the edge's two vertices.
    (grad,) = torch.autograd.grad(out[0, 3, 5, 0], positions)
    torch.testing.assert_close(grad[1, 0] + grad[2, 0], torch.tensor(4.0), atol=1e-4, rtol=0)
    assert grad[0, 0] == 0 and grad[3, 0] == 0


def test_edge_topology() -> None:
    # Two triangles sharing the edge (1, 2); a third shares nothing.
    faces = torch.tensor([[0, 1, 2], [2, 1, 3], [4, 5, 6]])
    expected = torch.tensor([[3, -1, -1], [-1, -1, 0], [-1, -1, -1]])
    assert torch.equal(edge_topology(faces), expected)
    # An edge with three faces on it counts as open.
    assert torch.equal(edge_topology(torch.tensor([[0, 1, 2], [1, 0, 3], [0, 1, 4]])), torch.full((3, 3), -1))


def test_texture_bilinear_wrap_and_clamp(tier: str) -> None:
    tex = torch.tensor([[[[0.0], [1.0]], [[2.0], [3.0]]]])  # [1, 2, 2, 1]: rows v, columns u
    centres = torch.tensor([[[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]]])
    torch.testing.assert_close(texture(tex, centres, tier=tier).flatten(), torch.tensor([0.0, 1.0, 2.0, 3.0]))
    corner = torch.zeros(1, 1, 1, 2)
    torch.testing.assert_close(texture(tex, corner, "wrap", tier=tier).flatten(), torch.tensor([1.5]))  # mean of all four
    torch.testing.assert_close(texture(tex, corner, "clamp", tier=tier).flatten(), torch.tensor([0.0]))
    middle = torch.tensor([[[[0.5, 0.25]]]])
    torch.testing.assert_close(texture(tex, middle, "clamp", tier=tier).flatten(), torch.tensor([0.5]))


# --------------------------------------------------------------------------------------------
# reference gradients (float64)
# --------------------------------------------------------------------------------------------


def tiny_scene() -> tuple[Tensor, Tensor]:
    """Three overlapping triangles with distinct w, float64, no pixel centre near an edge at 7x9."""
    positions = torch.tensor(
        [
            [-0.8, -0.7, 0.1, 1.0], [0.9, -0.5, 0.3, 1.2], [-0.1, 0.95, 0.2, 0.9],
            [-0.3, -0.9, -0.2, 1.1], [1.1, 0.4, 0.4, 1.3], [0.05, 0.8, -0.1, 1.0],
            [-1.2, 0.2, 0.5, 1.4], [0.2, -0.2, -0.4, 0.8], [-0.6, 1.3, 0.0, 1.5],
        ],
        dtype=torch.float64,
    )
    return positions, torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])


def test_reference_gradcheck_rasterize_and_interpolate() -> None:
    positions, faces = tiny_scene()
    attributes = torch.rand(9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def run(positions: Tensor, attributes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raster = rasterize(positions, faces, (7, 9), tier="reference")
        return raster.barycentrics, raster.depth, interpolate(attributes, raster, faces, tier="reference")

    raster = rasterize(positions, faces, (7, 9), tier="reference")
    assert len(raster.triangle_id.unique()) == 4  # all three triangles visible, some empty pixels
    inputs = (positions.clone().requires_grad_(True), attributes.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(run, inputs)


def test_reference_gradcheck_antialias() -> None:
    positions, faces = tiny_scene()
    g = torch.Generator().manual_seed(1)
    color = torch.rand(1, 7, 9, 3, dtype=torch.float64, generator=g)
    raster = rasterize(positions, faces, (7, 9), tier="reference")
    detached = RasterOutput(raster.triangle_id, raster.barycentrics.detach(), raster.depth.detach())
    out = antialias(color, detached, positions, faces, tier="reference")
    assert (out != color).any()

    def run(color: Tensor, positions: Tensor) -> Tensor:
        return antialias(color, detached, positions, faces, tier="reference")

    inputs = (color.clone().requires_grad_(True), positions.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(run, inputs)


def test_reference_gradcheck_texture() -> None:
    g = torch.Generator().manual_seed(2)
    tex = torch.rand(2, 4, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    uv = (torch.rand(2, 3, 3, 2, dtype=torch.float64, generator=g) * 1.4 - 0.2).requires_grad_(True)
    for mode in ("wrap", "clamp"):
        assert torch.autograd.gradcheck(lambda t, c: texture(t, c, mode, tier="reference"), (tex, uv))


# --------------------------------------------------------------------------------------------
# cpu tier against the reference
# --------------------------------------------------------------------------------------------


def icosphere(subdivisions: int) -> tuple[Tensor, Tensor]:
    """Unit icosphere: [V, 3] vertices and [20 * 4^s, 3] outward-wound faces."""
    t = (1 + 5**0.5) / 2
    vertices = [[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
                [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]]
    faces = [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2],
             [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5],
             [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]]
    for _ in range(subdivisions):
        midpoints: dict[tuple[int, int], int] = {}

        def midpoint(a: int, b: int) -> int:
            key = (min(a, b), max(a, b))
            if key not in midpoints:
                midpoints[key] = len(vertices)
                vertices.append([(p + q) / 2 for p, q in zip(vertices[a], vertices[b])])
            return midpoints[key]

        refined = []
        for a, b, c in faces:
            ab, bc, ca = midpoint(a, b), midpoint(b, c), midpoint(c, a)
            refined += [[a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca]]
        faces = refined
    points = torch.tensor(vertices, dtype=torch.float64)
    return points / points.norm(dim=-1, keepdim=True), torch.tensor(faces)


def perspective(points: Tensor, distance: float, focal: float, near: float = 0.5, far: float = 10.0) -> Tensor:
    """[N, 4] clip coordinates of [N, 3] points seen from (0, 0, distance) looking down -z (OpenGL)."""
    depth = distance - points[:, 2]
    a, b = (far + near) / (far - near), -2 * far * near / (far - near)
    return torch.stack([focal * points[:, 0], focal * points[:, 1], a * depth + b, depth], dim=-1)


def random_mesh_scene(seed: int, views: int = 2) -> tuple[Tensor, Tensor]:
    """[views, V, 4] float32 clip positions and [F, 3] faces (~370 faces): a jittered icosphere
    (closed: silhouettes and occlusion) plus loose random triangles, some with a vertex behind
    the eye, some crossing the near plane, some sharing an edge with each other."""
    g = torch.Generator().manual_seed(seed)
    points, faces = icosphere(2)  # 162 vertices, 320 faces
    points = points * (1 + 0.08 * torch.randn(points.shape[0], 1, generator=g, dtype=torch.float64))
    centres = (torch.rand(20, 1, 3, generator=g, dtype=torch.float64) - 0.5) * 2.4
    loose = (centres + 0.25 * torch.randn(20, 3, 3, generator=g, dtype=torch.float64)).reshape(60, 3)
    loose[::9, 2] = 3.5  # behind the eye (in the first view): w < 0
    loose[4::9, 2] = 2.7  # in front of the eye but before the near plane
    loose_faces = torch.arange(162, 222).view(20, 3)
    strip = torch.stack([loose_faces[:-1, 1], loose_faces[:-1, 2], loose_faces[1:, 0]], dim=-1)  # shares edges
    all_points = torch.cat([points, loose])
    all_faces = torch.cat([faces, loose_faces, strip])
    clip = []
    for view in range(views):
        angle = 0.7 * view + 0.3
        rotation = torch.tensor(
            [[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0], [-math.sin(angle), 0.0, math.cos(angle)]],
            dtype=torch.float64,
        )
        clip.append(perspective(all_points @ rotation.T, distance=3.0, focal=2.2))
    return torch.stack(clip).float(), all_faces


def pipeline(positions: Tensor, attributes: Tensor, faces: Tensor, size: tuple[int, int], tier: str,
             topology: Tensor | None = None) -> dict[str, Tensor]:
    """rasterize -> interpolate -> antialias under a fixed random upstream gradient; the outputs
    and the gradients w.r.t. positions and attributes."""
    pos = positions.detach().clone().requires_grad_(True)
    attr = attributes.detach().clone().requires_grad_(True)
    raster = rasterize(pos, faces, size, tier=tier)
    color = interpolate(attr, raster, faces, tier=tier)
    out = antialias(color, raster, pos, faces, topology=topology, tier=tier)
    g = torch.Generator().manual_seed(99)
    loss = (out * torch.randn(out.shape, generator=g)).sum()
    loss = loss + (raster.depth * torch.randn(raster.depth.shape, generator=g)).sum()
    grad_pos, grad_attr = torch.autograd.grad(loss, [pos, attr])
    return {
        "triangle_id": raster.triangle_id,
        "barycentrics": raster.barycentrics.detach(),
        "depth": raster.depth.detach(),
        "interpolated": color.detach(),
        "antialiased": out.detach(),
        "grad_positions": grad_pos,
        "grad_attributes": grad_attr,
    }


@pytest.mark.parametrize("shared_attributes", [True, False])
def test_cpu_matches_reference(cpu_tier: None, shared_attributes: bool) -> None:
    positions, faces = random_mesh_scene(seed=3)
    g = torch.Generator().manual_seed(4)
    attributes = torch.rand(1 if shared_attributes else 2, positions.shape[1], 3, generator=g)
    if shared_attributes:
        attributes = attributes[0]
    expected = pipeline(positions, attributes, faces, (64, 64), "reference")
    actual = pipeline(positions, attributes, faces, (64, 64), "cpu")
    ids = expected["triangle_id"]
    assert 0.2 < (ids >= 0).float().mean() < 0.9 and len(ids.unique()) > 100
    assert torch.equal(actual["triangle_id"], ids)
    assert (expected["antialiased"] != expected["interpolated"]).sum() > 50  # antialiasing did something
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        assert torch.isfinite(actual[name].float()).all(), name
        error = relative_error(actual[name].float(), expected[name].float())
        assert error <= 1e-4, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("used", ["colour", "depth"])
def test_cpu_matches_reference_when_one_raster_output_is_unused(cpu_tier: None, used: str) -> None:
    # The cpu backward skips the terms of an unused output (its gradient arrives as None): only
    # the antialiased colour (depth unused, the common case) or only the depth reaches the loss.
    positions, faces = random_mesh_scene(seed=11)
    attributes = torch.rand(positions.shape[1], 3, generator=torch.Generator().manual_seed(12))
    results = {}
    for tier_name in TIERS:
        pos = positions.clone().requires_grad_(True)
        raster = rasterize(pos, faces, (48, 56), tier=tier_name)
        if used == "colour":
            out = antialias(interpolate(attributes, raster, faces, tier=tier_name), raster, pos, faces, tier=tier_name)
        else:
            out = raster.depth
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(13))
        (grad,) = torch.autograd.grad((out * upstream).sum(), pos)
        results[tier_name] = (out.detach(), grad)
    for a, e in zip(results["cpu"], results["reference"]):
        assert relative_error(a, e) <= 1e-4


def test_cpu_baseline_loop_matches_avx2_bit_for_bit(cpu_tier: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tile loop runs 4 pixels per step with AVX2 where the CPU has it and 2 otherwise; both
    # round every lane alike, so the results must not differ in a single bit.
    positions, faces = random_mesh_scene(seed=14)
    attributes = torch.rand(positions.shape[1], 3, generator=torch.Generator().manual_seed(15))
    default = pipeline(positions, attributes, faces, (37, 45), "cpu")
    monkeypatch.setenv("LIFT3D_KERNELS_NO_AVX2", "1")
    baseline = pipeline(positions, attributes, faces, (37, 45), "cpu")
    for name in default:
        assert torch.equal(default[name], baseline[name]), name


def test_cpu_reads_int32_and_int64_topology_alike(cpu_tier: None) -> None:
    positions, faces = random_mesh_scene(seed=16, views=1)
    attributes = torch.rand(positions.shape[1], 3, generator=torch.Generator().manual_seed(17))
    topology = edge_topology(faces)
    wide = pipeline(positions, attributes, faces, (40, 40), "cpu", topology=topology)
    narrow = pipeline(positions, attributes, faces, (40, 40), "cpu", topology=topology.to(torch.int32))
    for name in wide:
        assert torch.equal(wide[name], narrow[name]), name


def test_cpu_antialias_color_gradient_matches_reference(cpu_tier: None) -> None:
    positions, faces = random_mesh_scene(seed=5, views=1)
    raster = rasterize(positions, faces, (48, 40), tier="reference")
    g = torch.Generator().manual_seed(6)
    color = torch.rand(1, 48, 40, 4, generator=g)
    upstream = torch.randn(1, 48, 40, 4, generator=g)
    topology = edge_topology(faces)
    results = {}
    for tier_name in TIERS:
        leaf = color.clone().requires_grad_(True)
        out = antialias(leaf, raster, positions[0], faces, topology=topology, tier=tier_name)
        (grad,) = torch.autograd.grad((out * upstream).sum(), leaf)
        results[tier_name] = (out.detach(), grad)
    for a, e in zip(results["cpu"], results["reference"]):
        assert relative_error(a, e) <= 1e-5


def texture_case(seed: int, batch: int, shared: bool, tex_size: tuple[int, int], size: tuple[int, int],
                 channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """float32 texture, uv and upstream gradient; uv spans [-1.3, 2.3] (outside [0, 1] both ways),
    and a quarter of the coordinates sit exactly on texel borders or centres (integer/half x, y)."""
    g = torch.Generator().manual_seed(seed)
    Ht, Wt = tex_size
    tex = torch.rand(1 if shared else batch, Ht, Wt, channels, generator=g)
    uv = torch.rand(batch, *size, 2, generator=g) * 3.6 - 1.3
    on_grid = torch.rand(batch, *size, generator=g) < 0.25
    steps = torch.randint(-2 * max(Ht, Wt), 4 * max(Ht, Wt), (batch, *size, 2), generator=g).float() / 2
    scale = torch.tensor([Wt, Ht], dtype=torch.float32)
    uv = torch.where(on_grid.unsqueeze(-1), (steps + 0.5) / scale, uv)  # x = u * Wt - 0.5 is a multiple of 0.5
    upstream = torch.randn(batch, *size, channels, generator=g)
    return tex, uv, upstream


@pytest.mark.parametrize("mode", ["wrap", "clamp"])
@pytest.mark.parametrize(
    "batch, shared, tex_size, size, channels",
    [(3, True, (7, 5), (9, 11), 3), (2, False, (5, 9), (13, 7), 4), (1, True, (1, 1), (5, 3), 2),
     (2, True, (33, 65), (96, 80), 1)],  # the last one is large enough for several grad_tex chunks
)
def test_cpu_texture_matches_reference(
    cpu_tier: None, mode: str, batch: int, shared: bool, tex_size: tuple[int, int], size: tuple[int, int],
    channels: int,
) -> None:
    tex, uv, upstream = texture_case(9, batch, shared, tex_size, size, channels)
    results = {}
    for tier_name in TIERS:
        leaves = (tex.clone().requires_grad_(True), uv.clone().requires_grad_(True))
        out = texture(*leaves, mode, tier=tier_name)
        grads = torch.autograd.grad((out * upstream).sum(), leaves)
        results[tier_name] = (out.detach(), *grads)
    for name, a, e in zip(("values", "grad_tex", "grad_uv"), results["cpu"], results["reference"]):
        assert a.shape == e.shape, name
        assert relative_error(a, e) <= 1e-5, name


def test_cpu_texture_gradient_to_one_input_only(cpu_tier: None) -> None:
    tex, uv, upstream = texture_case(10, 2, True, (6, 6), (8, 8), 3)
    leaf = tex.clone().requires_grad_(True)
    (grad_tex,) = torch.autograd.grad((texture(leaf, uv, tier="cpu") * upstream).sum(), leaf)
    (expected,) = torch.autograd.grad((texture(leaf, uv, tier="reference") * upstream).sum(), leaf)
    assert relative_error(grad_tex, expected) <= 1e-5
    leaf = uv.clone().requires_grad_(True)
    (grad_uv,) = torch.autograd.grad((texture(tex, leaf, "clamp", tier="cpu") * upstream).sum(), leaf)
    (expected,) = torch.autograd.grad((texture(tex, leaf, "clamp", tier="reference") * upstream).sum(), leaf)
    assert relative_error(grad_uv, expected) <= 1e-5


def test_cpu_texture_is_deterministic(cpu_tier: None) -> None:
    tex, uv, upstream = texture_case(11, 2, True, (33, 65), (96, 80), 3)

    def run() -> tuple[Tensor, ...]:
        leaves = (tex.clone().requires_grad_(True), uv.clone().requires_grad_(True))
        out = texture(*leaves, "wrap", tier="cpu")
        return (out.detach(), *torch.autograd.grad((out * upstream).sum(), leaves))

    first = run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)  # another thread count must not change a bit
        second = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cpu_is_deterministic(cpu_tier: None) -> None:
    positions, faces = random_mesh_scene(seed=7)
    attributes = torch.rand(positions.shape[1], 3, generator=torch.Generator().manual_seed(8))
    first = pipeline(positions, attributes, faces, (40, 48), "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)  # another thread count must not change a bit
        second = pipeline(positions, attributes, faces, (40, 48), "cpu")
    finally:
        torch.set_num_threads(threads)
    third = pipeline(positions, attributes, faces, (40, 48), "cpu")
    for name in first:
        assert torch.equal(first[name], second[name]), name
        assert torch.equal(first[name], third[name]), name


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument() -> None:
    positions, faces = tiny_scene()
    raster = rasterize(positions, faces, (4, 4), tier="reference")
    with pytest.raises(ValueError, match="clip_positions"):
        rasterize(positions[:, :3], faces, (4, 4))
    with pytest.raises(TypeError, match="clip_positions"):
        rasterize(positions.long(), faces, (4, 4))
    with pytest.raises(TypeError, match="faces"):
        rasterize(positions, faces.float(), (4, 4))
    with pytest.raises(ValueError, match="faces"):
        rasterize(positions, faces[:, :2], (4, 4))
    with pytest.raises(ValueError, match="faces"):
        rasterize(positions, faces + 1, (4, 4))
    with pytest.raises(ValueError, match="resolution"):
        rasterize(positions, faces, (0, 4))
    with pytest.raises(ValueError, match="attributes"):
        interpolate(torch.rand(3, 9, 2, dtype=torch.float64), raster, faces)
    with pytest.raises(ValueError, match="attributes"):
        interpolate(torch.rand(9, dtype=torch.float64), raster, faces)
    with pytest.raises(ValueError, match="color"):
        antialias(torch.rand(1, 4, 5, 3), raster, positions, faces)
    with pytest.raises(ValueError, match="uv"):
        texture(torch.rand(1, 4, 4, 3), torch.rand(1, 2, 2, 3))
    with pytest.raises(ValueError, match="boundary_mode"):
        texture(torch.rand(1, 4, 4, 3), torch.rand(1, 2, 2, 2), "mirror")


def test_cpu_rejects_float64(cpu_tier: None) -> None:
    positions, faces = tiny_scene()
    with pytest.raises(TypeError, match="float32 tex"):
        texture(torch.rand(1, 4, 4, 3, dtype=torch.float64), torch.rand(1, 2, 2, 2), tier="cpu")
    with pytest.raises(TypeError, match="float32 clip_positions"):
        rasterize(positions, faces, (4, 4), tier="cpu")
