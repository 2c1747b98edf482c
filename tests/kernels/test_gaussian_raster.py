"""Gaussian splatting kernels: the reference against a brute-force loop, the cpu tier (its AVX2 and
baseline builds) against the reference (values and gradients, edge cases included), the builds
against each other and the cpu tier's culling against the reference's footprint, projection, and
bit-for-bit determinism of the cpu tier."""

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


@pytest.fixture(params=["default", "baseline"])
def cpu_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The cpu tier's 8-pixel step is built for AVX2 (used where the CPU has it) and for the
    baseline x86-64 target (``LIFT3D_KERNELS_NO_AVX2=1``): both must be the reference."""
    if request.param == "baseline":
        monkeypatch.setenv("LIFT3D_KERNELS_NO_AVX2", "1")
    return request.param


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


def assert_cpu_matches_reference(scene: Scene, width: int, height: int) -> None:
    expected = run_with_grads(scene, width, height, "reference")
    actual = run_with_grads(scene, width, height, "cpu")
    for name, a, e in zip(NAMES, actual, expected):
        assert a.shape == e.shape, name
        assert torch.isfinite(a).all(), name
        assert relative_error(a, e) <= 1e-4, f"{name}: relative error {relative_error(a, e):.2e}"


@pytest.mark.parametrize("seed,B,N,C,width,height", CASES)
def test_cpu_matches_reference(
    cpu_tier: None, cpu_build: str, seed: int, B: int, N: int, C: int, width: int, height: int
) -> None:
    scene = random_scene(seed, B, N, C, width, height)
    if N >= 200:  # the scene must reach the early stop, or that path goes untested
        assert untruncated_transmittance(scene, width, height).min() < 1e-4
    assert_cpu_matches_reference(scene, width, height)


def splats_from_sigmas(
    means2d: Tensor, sigmas: Tensor, angles: Tensor, opacities: Tensor, colors: Tensor, depths: Tensor
) -> Scene:
    """One camera's scene from per-Gaussian pixel means [N, 2], sigmas [N, 2] and angles [N],
    with radii ceil(3.33 sigma_max) (project_gaussians's rule)."""
    cos, sin = torch.cos(angles.double()), torch.sin(angles.double())
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    cov = rotation @ torch.diag_embed(sigmas.double() ** 2) @ rotation.transpose(-1, -2)
    inverse = torch.linalg.inv(cov)
    conics = torch.stack([inverse[..., 0, 0], inverse[..., 0, 1], inverse[..., 1, 1]], -1)
    radii = torch.ceil(3.33 * sigmas.double().max(-1).values).to(torch.int32)
    floats = (means2d, conics, colors, opacities, depths)
    return (*(t.float().unsqueeze(0).contiguous() for t in floats), radii.unsqueeze(0))  # type: ignore[return-value]


def test_cpu_matches_reference_at_tile_borders(cpu_tier: None, cpu_build: str) -> None:
    # Means on and half a pixel either side of the 16-pixel tile lines and the image border, small
    # splats (one tile) and large ones (several), round and needle-thin at many angles.
    g = torch.Generator().manual_seed(31)
    width, height = 40, 35
    lines = torch.tensor([0.0, 15.5, 16.0, 16.5, 31.5, 32.0, 32.5, 40.0])
    xs, ys = torch.meshgrid(lines, lines.clamp(max=35.0), indexing="ij")
    means2d = torch.stack([xs.flatten(), ys.flatten()], -1).repeat(2, 1)
    N = len(means2d)
    sigmas = torch.where(torch.rand(N, 1, generator=g) < 0.5, 0.4 + torch.rand(N, 2, generator=g), 2.0 + 6.0 * torch.rand(N, 2, generator=g))
    sigmas[::3, 1] = 0.3  # needles
    angles = torch.rand(N, generator=g) * math.pi
    opacities = 0.02 + 0.98 * torch.rand(N, generator=g)
    scene = splats_from_sigmas(means2d, sigmas, angles, opacities, torch.rand(N, 3, generator=g), 1.0 + torch.rand(N, generator=g))
    assert_cpu_matches_reference(scene, width, height)


def test_cpu_matches_reference_when_opaque_splats_saturate_every_pixel(cpu_tier: None, cpu_build: str) -> None:
    # Layers of opaque (alpha clamped at 0.99) splats over the whole image: every pixel stops after
    # two of them, and whole tiles stop; behind them more splats that must not show, in front a
    # translucent one that must.
    g = torch.Generator().manual_seed(32)
    width, height = 37, 21
    grid = torch.stack(torch.meshgrid(torch.arange(2.0, 40.0, 4.0), torch.arange(2.0, 24.0, 4.0), indexing="ij"), -1)
    layer = grid.reshape(-1, 2)
    means2d = torch.cat([layer, layer + 1.0, layer + 2.0, torch.tensor([[18.0, 10.0]])])
    N = len(means2d)
    sigmas = torch.full((N, 2), 6.0)
    opacities = torch.ones(N)
    opacities[-1] = 0.3
    depths = torch.cat([torch.full((len(layer),), 2.0), torch.full((len(layer),), 3.0), torch.full((len(layer),), 4.0), torch.tensor([1.0])])
    scene = splats_from_sigmas(means2d, sigmas, torch.zeros(N), opacities, torch.rand(N, 3, generator=g), depths)
    assert untruncated_transmittance(scene, width, height).max() < 1e-4  # every pixel stops early
    assert_cpu_matches_reference(scene, width, height)


def test_cpu_matches_reference_with_culled_and_faint_splats(cpu_tier: None, cpu_build: str) -> None:
    # Radius 0 (culled even where bright), opacity 0, opacities just below and above the 1/255 at
    # which a splat can show at all, and zero-size images.
    g = torch.Generator().manual_seed(33)
    width, height = 29, 23
    N = 60
    means2d = torch.rand(N, 2, generator=g) * torch.tensor([width, height])
    sigmas = 0.5 + 3.0 * torch.rand(N, 2, generator=g)
    opacities = 0.05 + 0.9 * torch.rand(N, generator=g)
    opacities[:10] = torch.tensor([0.0, 1 / 255 * 0.999, 1 / 255, 1 / 255 * 1.001, 1 / 255 * 1.01, 0.0039, 0.004, 0.005, 1.0, 1.0])
    scene = list(splats_from_sigmas(means2d, sigmas, torch.rand(N, generator=g) * math.pi, opacities,
                                    torch.rand(N, 3, generator=g), 1.0 + torch.rand(N, generator=g)))
    scene[5][0, 8:20] = 0  # culled, among them both opaque ones
    assert_cpu_matches_reference(tuple(scene), width, height)
    for w, h in ((0, 0), (0, 5), (5, 0)):
        rgb, alpha, depth = rasterize_gaussians(*scene, w, h, tier="cpu")
        assert rgb.shape == (1, h, w, 3) and alpha.shape == depth.shape == (1, h, w, 1)


def test_cpu_culling_keeps_every_pixel_the_reference_draws(cpu_tier: None, cpu_build: str) -> None:
    # The cpu tier visits only the pixels in each splat's ellipse bound (row chords): one splat per
    # camera, so a pixel it drops would show as alpha 0 where the reference has alpha >= 1/255.
    # Thin, rotated, faint and opaque splats, centred anywhere (tile lines included).
    g = torch.Generator().manual_seed(34)
    width, height = 48, 40
    B = 400
    means2d = torch.rand(B, 2, generator=g) * torch.tensor([width + 8.0, height + 8.0]) - 4.0
    means2d[::4] = torch.round(means2d[::4] * 2) / 2  # on pixel centres and pixel edges
    sigmas = 0.3 + 8.0 * torch.rand(B, 2, generator=g) ** 2
    opacities = torch.exp(-6.0 * torch.rand(B, generator=g))  # 0.0025 .. 1
    scene = splats_from_sigmas(means2d, sigmas, torch.rand(B, generator=g) * math.pi, opacities, torch.ones(B, 1), torch.ones(B))
    scene = tuple(t.transpose(0, 1).contiguous() for t in scene)  # [B, 1, ...]: one splat per camera
    _, alpha_cpu, _ = rasterize_gaussians(*scene, width, height, tier="cpu")
    _, alpha_ref, _ = rasterize_gaussians(*(t.double() if t.is_floating_point() else t for t in scene), width, height, tier="reference")
    drawn = alpha_ref > 0
    assert drawn.sum() > 1000
    # Where the exact alpha is within float rounding of 1/255 the tiers may round either way.
    near_threshold = (alpha_ref - 1 / 255).abs() < 1e-6
    assert ((alpha_cpu > 0) == drawn)[~near_threshold].all()


def test_cpu_baseline_build_matches_avx2_bit_for_bit(cpu_tier: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Both builds run the same IEEE operations per lane (no FMA, the same exp polynomial) and sum
    # lanes in the same order, so they must not differ in a single bit; C = 3 (unrolled) and C = 4.
    for seed, C in ((41, 3), (42, 4)):
        scene = random_scene(seed, B=2, N=300, C=C, width=45, height=37)
        monkeypatch.delenv("LIFT3D_KERNELS_NO_AVX2", raising=False)
        default = run_with_grads(scene, 45, 37, "cpu")
        monkeypatch.setenv("LIFT3D_KERNELS_NO_AVX2", "1")
        baseline = run_with_grads(scene, 45, 37, "cpu")
        for name, a, b in zip(NAMES, default, baseline):
            assert torch.equal(a, b), f"C={C} {name}"


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
