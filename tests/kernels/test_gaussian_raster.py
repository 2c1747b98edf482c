"""Gaussian splatting kernels: the reference against a brute-force loop, the cpu tier against the
reference (values and gradients), projection, and bit-for-bit determinism of the cpu tier."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lift3d.cameras import orbit_cameras
from conftest import require_cpu_ops

from lift3d.kernels.gaussian_raster import (
    FORWARD_OP,
    ProjectedGaussians,
    project_gaussians,
    rasterize_gaussians,
)

Scene = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@pytest.fixture(scope="module")
def cpu_tier() -> None:
    require_cpu_ops(FORWARD_OP)


def random_scene(
    seed: int, B: int, N: int, C: int, width: int, height: int, dtype: torch.dtype = torch.float32
) -> Scene:
    """Screen-space Gaussians with radii consistent with their conics.

    Means spread 15% past every border (some splats partly off-screen), sigmas 0.7-4.7 px (heavy
    overlap), 30% of opacities at 1 (alpha clamps at 0.99 and pixels terminate early), depths on a
    coarse grid (ties exercise the stable order), 10% culled (radius 0).
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    size = torch.tensor([width, height], dtype=torch.float64)
    means2d = (rand(B, N, 2) * 1.3 - 0.15) * size
    sigma = 0.7 + 4.0 * rand(B, N, 2)
    theta = rand(B, N) * math.pi
    cos, sin = torch.cos(theta), torch.sin(theta)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    cov = rotation @ torch.diag_embed(sigma**2) @ rotation.transpose(-1, -2)
    inverse = torch.linalg.inv(cov)
    conics = torch.stack([inverse[..., 0, 0], inverse[..., 0, 1], inverse[..., 1, 1]], -1)
    radii = torch.ceil(3.33 * sigma.max(-1).values).to(torch.int32)
    radii[rand(B, N) < 0.1] = 0
    opacities = 0.05 + 0.95 * rand(B, N)
    opacities[rand(B, N) < 0.3] = 1.0
    depths = 1.0 + torch.randint(0, 40, (B, N), generator=g).double() / 10
    colors = rand(B, N, C)
    floats = tuple(t.to(dtype).contiguous() for t in (means2d, conics, colors, opacities, depths))
    return (*floats, radii)  # type: ignore[return-value]


def untruncated_transmittance(scene: Scene, width: int, height: int) -> Tensor:
    """[B, H*W] product of (1 - alpha) over every contributing Gaussian, ignoring the early stop."""
    means2d, conics, _, opacities, _, radii = scene
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    dx = means2d[..., 0].unsqueeze(1) - xs.reshape(1, -1, 1)
    dy = means2d[..., 1].unsqueeze(1) - ys.reshape(1, -1, 1)
    a, b, c = (conics[..., k].unsqueeze(1) for k in range(3))
    power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy
    alpha = torch.clamp(opacities.unsqueeze(1) * torch.exp(power), max=0.99)
    alpha = torch.where((alpha >= 1 / 255) & (radii.unsqueeze(1) > 0), alpha, torch.zeros_like(alpha))
    return torch.prod(1 - alpha, dim=-1)


def brute_force(scene: Scene, width: int, height: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """The semantics, literally: one Python loop per pixel. Also counts early stops."""
    means2d, conics, colors, opacities, depths, radii = (t.tolist() for t in scene)
    B, N, C = len(colors), len(colors[0]) if colors else 0, len(colors[0][0]) if colors and colors[0] else 0
    rgb = torch.zeros(B, height, width, C, dtype=torch.float64)
    alpha_out = torch.zeros(B, height, width, 1, dtype=torch.float64)
    depth_out = torch.zeros(B, height, width, 1, dtype=torch.float64)
    stops = 0
    for b in range(B):
        order = sorted((i for i in range(N) if radii[b][i] > 0), key=lambda i: (depths[b][i], i))
        for y in range(height):
            for x in range(width):
                px, py = x + 0.5, y + 0.5
                transmittance = 1.0
                for i in order:
                    dx, dy = means2d[b][i][0] - px, means2d[b][i][1] - py
                    a, bb, c = conics[b][i]
                    power = -0.5 * (a * dx * dx + c * dy * dy) - bb * dx * dy
                    if power > 0:
                        continue
                    alpha = min(0.99, opacities[b][i] * math.exp(power))
                    if alpha < 1 / 255:
                        continue
                    if transmittance * (1 - alpha) < 1e-4:
                        stops += 1
                        break
                    for ch in range(C):
                        rgb[b, y, x, ch] += transmittance * alpha * colors[b][i][ch]
                    depth_out[b, y, x, 0] += transmittance * alpha * depths[b][i]
                    transmittance *= 1 - alpha
                alpha_out[b, y, x, 0] = 1 - transmittance
    return rgb, alpha_out, depth_out, stops


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected|| (0 when both vanish)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / scale if scale > 0 else difference


def run_with_grads(scene: Scene, width: int, height: int, tier: str, seed: int = 123) -> list[Tensor]:
    """Outputs and the gradients of all five differentiable inputs under a random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in scene[:5]]
    outputs = rasterize_gaussians(*leaves, scene[5], width, height, tier=tier)
    g = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outputs]
    loss = sum((o * u).sum() for o, u in zip(outputs, upstream))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach() for o in outputs] + [torch.zeros_like(l) if gr is None else gr for l, gr in zip(leaves, grads)]


NAMES = ["rgb", "alpha", "depth", "d_means2d", "d_conics", "d_colors", "d_opacities", "d_depths"]


def test_reference_matches_brute_force() -> None:
    width, height = 9, 7
    scene = list(random_scene(0, B=2, N=10, C=3, width=width, height=height, dtype=torch.float64))
    # Four opaque splats on one spot guarantee early termination there.
    scene[0][0, :4] = torch.tensor([4.2, 3.1], dtype=torch.float64)
    scene[3][0, :4] = 1.0
    scene[5][0, :4] = scene[5][0, :4].clamp(min=1)
    scene = tuple(scene)
    rgb, alpha, depth = rasterize_gaussians(*scene, width, height, tier="reference")
    rgb_bf, alpha_bf, depth_bf, stops = brute_force(scene, width, height)
    assert stops > 0
    torch.testing.assert_close(rgb, rgb_bf, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(alpha, alpha_bf, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(depth, depth_bf, rtol=1e-10, atol=1e-12)


CASES = [
    # seed, B, N, C, width, height
    (1, 1, 0, 3, 37, 29),
    (2, 3, 0, 4, 37, 29),
    (3, 1, 1, 3, 37, 29),
    (4, 3, 1, 4, 37, 29),
    (5, 1, 200, 3, 37, 29),
    (6, 3, 200, 4, 37, 29),
    (7, 3, 200, 3, 37, 29),
    (8, 1, 200, 4, 16, 48),
]


@pytest.mark.parametrize("seed,B,N,C,width,height", CASES)
def test_cpu_matches_reference(cpu_tier: None, seed: int, B: int, N: int, C: int, width: int, height: int) -> None:
    scene = random_scene(seed, B, N, C, width, height)
    if N >= 200:  # the scene must reach the early stop, or that path goes untested
        assert untruncated_transmittance(scene, width, height).min() < 1e-4
    expected = run_with_grads(scene, width, height, "reference")
    actual = run_with_grads(scene, width, height, "cpu")
    for name, a, e in zip(NAMES, actual, expected):
        assert a.shape == e.shape, name
        assert torch.isfinite(a).all(), name
        assert relative_error(a, e) <= 1e-4, f"{name}: relative error {relative_error(a, e):.2e}"


def test_cpu_matches_reference_on_projected_scene(cpu_tier: None) -> None:
    width, height = 40, 32
    projected, colors, opacities = projected_scene(300, width, height, seed=11)
    scene = (projected.means2d, projected.conics, colors, opacities, projected.depths, projected.radii)
    scene = tuple(t.detach().contiguous() for t in scene)
    expected = run_with_grads(scene, width, height, "reference")
    actual = run_with_grads(scene, width, height, "cpu")
    for name, a, e in zip(NAMES, actual, expected):
        assert relative_error(a, e) <= 1e-4, f"{name}: relative error {relative_error(a, e):.2e}"


def test_cpu_is_deterministic(cpu_tier: None) -> None:
    width, height = 37, 29
    scene = random_scene(21, B=3, N=400, C=4, width=width, height=height)
    first = run_with_grads(scene, width, height, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # a different thread count must not change a single bit either
        second = run_with_grads(scene, width, height, "cpu")
    finally:
        torch.set_num_threads(threads)
    third = run_with_grads(scene, width, height, "cpu")
    for name, a, b, c in zip(NAMES, first, second, third):
        assert torch.equal(a, b), name
        assert torch.equal(a, c), name


def test_cpu_rejects_float64(cpu_tier: None) -> None:
    scene = random_scene(0, B=1, N=5, C=3, width=8, height=8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32"):
        rasterize_gaussians(*scene, 8, 8, tier="cpu")


def test_default_tier_runs() -> None:
    scene = random_scene(0, B=1, N=20, C=3, width=12, height=10)
    rgb, alpha, depth = rasterize_gaussians(*scene, 12, 10)
    reference = rasterize_gaussians(*scene, 12, 10, tier="reference")
    assert relative_error(rgb, reference[0]) <= 1e-4
    assert relative_error(alpha, reference[1]) <= 1e-4
    assert relative_error(depth, reference[2]) <= 1e-4


def test_rasterize_rejects_bad_shapes() -> None:
    means2d, conics, colors, opacities, depths, radii = random_scene(0, B=1, N=5, C=3, width=8, height=8)
    with pytest.raises(ValueError, match="conics"):
        rasterize_gaussians(means2d, conics[..., :2], colors, opacities, depths, radii, 8, 8, tier="reference")


# --------------------------------------------------------------------------------------------
# projection
# --------------------------------------------------------------------------------------------


def projected_scene(N: int, width: int, height: int, seed: int) -> tuple[ProjectedGaussians, Tensor, Tensor]:
    """Gaussians in the unit ball seen from an orbit camera; returns projection, colours, opacities."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(N, 3, generator=g)
    means = direction / direction.norm(dim=-1, keepdim=True) * torch.rand(N, 1, generator=g) ** (1 / 3)
    scales = torch.exp(torch.rand(N, 3, generator=g) * 2.0 - 4.0)
    quats = torch.randn(N, 4, generator=g)
    cameras = orbit_cameras(
        torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([3.0]), torch.tensor([40.0]), width, height
    )
    projected = project_gaussians(means, scales, quats, cameras.world_to_camera(), cameras.intrinsics(), width, height)
    colors = torch.rand(1, N, 3, generator=g)
    opacities = torch.sigmoid(2.0 * torch.randn(1, N, generator=g))
    return projected, colors, opacities


def test_projection_on_axis() -> None:
    width, height = 64, 48
    cameras = orbit_cameras(
        torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.0]), torch.tensor([40.0]), width, height
    )
    means = torch.zeros(1, 3)
    scales = torch.full((1, 3), 0.05)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    out = project_gaussians(means, scales, quats, cameras.world_to_camera(), cameras.intrinsics(), width, height)
    torch.testing.assert_close(out.means2d[0, 0], torch.tensor([width / 2, height / 2]))
    torch.testing.assert_close(out.depths[0, 0], torch.tensor(3.0))
    # An isotropic Gaussian: sigma_px = f * s / z, plus the 0.3 px^2 blur, both axes.
    focal = cameras.focal()[0]
    variance = (focal * 0.05 / 3.0) ** 2 + 0.3
    torch.testing.assert_close(out.conics[0, 0], torch.stack([1 / variance, torch.tensor(0.0), 1 / variance]))
    assert out.radii[0, 0] == math.ceil(3.33 * math.sqrt(variance))


def test_projection_culls_behind_and_off_screen() -> None:
    width, height = 32, 32
    world_to_camera = torch.eye(4).unsqueeze(0)  # camera at the origin looking down +z
    intrinsics = torch.tensor([[[40.0, 0.0, 16.0], [0.0, 40.0, 16.0], [0.0, 0.0, 1.0]]])
    means = torch.tensor([[0.0, 0.0, -2.0], [0.0, 0.0, 0.005], [5.0, 0.0, 1.0], [0.0, 0.0, 2.0]])
    scales = torch.full((4, 3), 0.01)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(4, 4)
    out = project_gaussians(means, scales, quats, world_to_camera, intrinsics, width, height)
    assert out.radii.tolist() == [[0, 0, 0, out.radii[0, 3].item()]]
    assert out.radii[0, 3] > 0
    assert out.radii.dtype == torch.int32
    assert torch.isfinite(out.means2d).all() and torch.isfinite(out.conics).all()


def test_projection_radius_bounds_the_footprint() -> None:
    projected, _, _ = projected_scene(200, 48, 40, seed=3)
    a, b, c = projected.conics.unbind(-1)
    visible = projected.radii > 0
    # The smallest q on the circle of the radius is r^2 * lambda_min(conic); alpha there < 1/255.
    lambda_min = 0.5 * (a + c) - torch.sqrt((0.5 * (a - c)) ** 2 + b**2)
    q = projected.radii.float() ** 2 * lambda_min
    assert (torch.exp(-0.5 * q[visible]) < 1 / 255).all()


def test_projection_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    N = 4
    means = (torch.rand(N, 3, generator=g, dtype=torch.float64) - 0.5) * 0.6
    scales = 0.05 + 0.1 * torch.rand(N, 3, generator=g, dtype=torch.float64)
    quats = torch.randn(N, 4, generator=g, dtype=torch.float64)
    cameras = orbit_cameras(
        torch.tensor([10.0, 40.0]), torch.tensor([20.0, -70.0]), torch.tensor([3.0, 2.5]), torch.tensor([40.0, 50.0]),
        32, 24,
    )
    world_to_camera = cameras.world_to_camera().double()
    intrinsics = cameras.intrinsics().double()

    def project(means: Tensor, scales: Tensor, quats: Tensor, world_to_camera: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = project_gaussians(means, scales, quats, world_to_camera, intrinsics, 32, 24)
        return out.means2d, out.conics, out.depths

    inputs = tuple(t.clone().requires_grad_(True) for t in (means, scales, quats, world_to_camera))
    assert (project_gaussians(means, scales, quats, world_to_camera, intrinsics, 32, 24).radii > 0).all()
    assert torch.autograd.gradcheck(project, inputs)
