"""Gaussian splatting: projection of 3D Gaussians to the image and tile-free / tiled rasterization.

The one semantics every tier implements (DESIGN §3): for camera ``b`` and pixel centre
``p = (x + 0.5, y + 0.5)``, walk the Gaussians with ``radius > 0`` in order of increasing depth
(ties by increasing index, i.e. a stable sort). For each one, with ``d = mean2d - p``::

    power = -0.5 * (a * dx^2 + c * dy^2) - b * dx * dy      # skip if power > 0
    alpha = min(0.99, opacity * exp(power))                  # skip if alpha < 1/255
    if T * (1 - alpha) < 1e-4: stop                          # this one and all later excluded
    rgb += T * alpha * color;  depth += T * alpha * z;  T *= 1 - alpha

``T`` starts at 1 and the returned alpha is ``1 - T``. Colours are not composited with a
background: the caller does ``rgb + (1 - alpha) * background``.

Tiers: ``reference`` (dense torch, autograd; the definition), ``cpu`` (C++/OpenMP, 16x16 tiles,
hand-written backward, bit-for-bit deterministic) and ``cuda`` (tile-sorted CUDA kernels, hand-written
backward with float atomics: gradients not bit-reproducible).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lift3d.kernels._backend import native_op, select_tier

logger = logging.getLogger(__name__)

FORWARD_OP = "gaussian_rasterize_forward"
BACKWARD_OP = "gaussian_rasterize_backward"

ALPHA_MAX = 0.99
"""Per-Gaussian alpha is clamped here so transmittance never hits zero (and stays invertible)."""
ALPHA_MIN = 1.0 / 255.0
"""Contributions below one 8-bit level are skipped."""
TRANSMITTANCE_MIN = 1e-4
"""A pixel stops at the Gaussian that would take its transmittance below this."""
RADIUS_SIGMAS = 3.33
"""At 3.33 sigma, alpha = opacity * exp(-q/2) < 1/255 for opacity <= 1, so tile culling is exact."""


@dataclass
class ProjectedGaussians:
    """Screen-space Gaussians for a batch of B cameras (the rasterizer's input)."""

    means2d: Tensor
    """[B, N, 2] pixel coordinates (x right, y down); pixel centres are at i + 0.5."""
    conics: Tensor
    """[B, N, 3] (a, b, c) of the inverse 2D covariance: power = -0.5 (a dx^2 + c dy^2) - b dx dy."""
    depths: Tensor
    """[B, N] camera-space z."""
    radii: Tensor
    """[B, N] int32 screen radius in pixels; 0 means culled."""


def quaternion_to_rotation(quats: Tensor) -> Tensor:
    """[N, 3, 3] rotation matrices from [N, 4] quaternions (w, x, y, z), normalised here."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).view(*quats.shape[:-1], 3, 3)


def project_gaussians(
    means: Tensor,
    scales: Tensor,
    quats: Tensor,
    world_to_camera: Tensor,
    intrinsics: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    eps2d: float = 0.3,
) -> ProjectedGaussians:
    """Project 3D Gaussians into B pinhole cameras (EWA splatting, as in 3DGS).

    Args:
        means: [N, 3] world-space centres.
        scales: [N, 3] activated standard deviations along the local axes (world units).
        quats: [N, 4] rotations as (w, x, y, z); need not be normalised.
        world_to_camera: [B, 4, 4] world-to-camera transforms (OpenCV axes: x right, y down, z forward).
        intrinsics: [B, 3, 3] pinhole K.
        width: Image width in pixels.
        height: Image height in pixels.
        near_plane: Gaussians with depth <= this are culled.
        eps2d: Added to the 2D covariance's diagonal (a minimum screen-space blur, in pixels^2).

    Returns:
        The projected Gaussians. ``cov2d = J W Sigma W^T J^T + eps2d I`` with the Jacobian's
        x/z and y/z clamped to 1.3 tan(fov/2) (3DGS's guard against huge off-screen splats);
        ``radius = ceil(3.33 sqrt(lambda_max(cov2d)))``. Culled entries (radius 0: behind the near
        plane or bounding square off the image) have zero means2d and conics.
    """
    rotation = quaternion_to_rotation(quats)
    rs = rotation * scales.unsqueeze(-2)  # R diag(s)
    cov3d = rs @ rs.transpose(-1, -2)  # [N, 3, 3]

    w_rot = world_to_camera[:, :3, :3]  # [B, 3, 3]
    w_trans = world_to_camera[:, :3, 3]
    t = torch.einsum("bij,nj->bni", w_rot, means) + w_trans.unsqueeze(1)  # [B, N, 3]
    tz = t[..., 2]
    in_front = tz > near_plane
    # Culled points may sit at z = 0; divide by a safe value so no inf/NaN enters the graph.
    z = torch.where(in_front, tz, torch.ones_like(tz))

    fx, fy = intrinsics[:, 0, 0].unsqueeze(1), intrinsics[:, 1, 1].unsqueeze(1)
    cx, cy = intrinsics[:, 0, 2].unsqueeze(1), intrinsics[:, 1, 2].unsqueeze(1)
    u = t[..., 0] / z
    v = t[..., 1] / z
    means2d = torch.stack([fx * u + cx, fy * v + cy], dim=-1)

    lim_x = 1.3 * (0.5 * width / fx)
    lim_y = 1.3 * (0.5 * height / fy)
    u_clamped = torch.maximum(torch.minimum(u, lim_x), -lim_x)
    v_clamped = torch.maximum(torch.minimum(v, lim_y), -lim_y)
    zeros = torch.zeros_like(z)
    jacobian = torch.stack(
        [
            torch.stack([fx / z, zeros, -fx * u_clamped / z], dim=-1),
            torch.stack([zeros, fy / z, -fy * v_clamped / z], dim=-1),
        ],
        dim=-2,
    )  # [B, N, 2, 3]
    jw = jacobian @ w_rot.unsqueeze(1)  # [B, N, 2, 3]
    cov2d = jw @ cov3d.unsqueeze(0) @ jw.transpose(-1, -2)
    a = cov2d[..., 0, 0] + eps2d
    b = cov2d[..., 0, 1]
    c = cov2d[..., 1, 1] + eps2d
    det = a * c - b * b
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)

    with torch.no_grad():
        mid = 0.5 * (a + c)
        lambda_max = mid + torch.sqrt(torch.clamp(mid * mid - det, min=0.0))
        radius = torch.ceil(RADIUS_SIGMAS * torch.sqrt(lambda_max))
        mx, my = means2d[..., 0], means2d[..., 1]
        on_screen = (mx + radius > 0) & (mx - radius < width) & (my + radius > 0) & (my - radius < height)
        visible = in_front & on_screen & (det > 0)
        radii = torch.where(visible, radius, torch.zeros_like(radius)).to(torch.int32)

    keep = visible.unsqueeze(-1)
    return ProjectedGaussians(
        means2d=torch.where(keep, means2d, torch.zeros_like(means2d)),
        conics=torch.where(keep, conics, torch.zeros_like(conics)),
        depths=tz,
        radii=radii,
    )


def rasterize_gaussians(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    tier: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Alpha-blend screen-space Gaussians front to back (see the module docstring for the rule).

    Args:
        means2d: [B, N, 2] pixel coordinates.
        conics: [B, N, 3] inverse 2D covariances (a, b, c).
        colors: [B, N, C] any number of channels C >= 1.
        opacities: [B, N] activated opacities in [0, 1].
        depths: [B, N] camera-space depths (sort key, and blended into the depth output).
        radii: [B, N] integer screen radii; 0 culls. Tiled tiers only visit the tiles within
            ``radius`` of the mean, so radii must bound the 1/255 footprint (``project_gaussians``'s do).
        width: Image width in pixels.
        height: Image height in pixels.
        tier: ``reference``, ``cpu`` or ``cuda``; None picks the fastest live tier.

    Returns:
        ``rgb`` [B, H, W, C] (not composited with a background), ``alpha`` [B, H, W, 1] and
        ``depth`` [B, H, W, 1] (sum of weight * z, not normalised by alpha). Differentiable with
        respect to means2d, conics, colors, opacities and depths.
    """
    _check_shapes(means2d, conics, colors, opacities, depths, radii)
    chosen = select_tier(FORWARD_OP, means2d.device, tier)
    if chosen not in _TIERS:
        raise NotImplementedError(f"the {chosen!r} tier of the gaussian rasterizer is not wired up yet")
    return _TIERS[chosen](means2d, conics, colors, opacities, depths, radii, width, height)


def _check_shapes(
    means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, depths: Tensor, radii: Tensor
) -> None:
    if colors.dim() != 3 or colors.shape[-1] < 1:
        raise ValueError(f"colors must be [B, N, C] with C >= 1, got {tuple(colors.shape)}")
    B, N = colors.shape[:2]
    expected = {
        "means2d": (means2d, (B, N, 2)),
        "conics": (conics, (B, N, 3)),
        "opacities": (opacities, (B, N)),
        "depths": (depths, (B, N)),
        "radii": (radii, (B, N)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (from colors [B, N, C]), got {tuple(tensor.shape)}")


# --------------------------------------------------------------------------------------------
# reference tier: the definition, dense over [B, H*W, N]
# --------------------------------------------------------------------------------------------


def _rasterize_reference(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense vectorised rasterization with autograd; memory is O(B * H * W * N)."""
    B, N, C = colors.shape
    dtype, device = colors.dtype, colors.device
    order = torch.sort(depths.detach(), dim=1, stable=True).indices  # front to back, ties by index

    def sort(x: Tensor) -> Tensor:
        index = order.view(B, N, *([1] * (x.dim() - 2))).expand_as(x)
        return torch.gather(x, 1, index)

    m, con, col, opa, z = sort(means2d), sort(conics), sort(colors), sort(opacities), sort(depths)
    active = sort(radii) > 0

    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device) + 0.5,
        torch.arange(width, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )
    px = xs.reshape(1, -1, 1)
    py = ys.reshape(1, -1, 1)
    dx = m[..., 0].unsqueeze(1) - px  # [B, HW, N]
    dy = m[..., 1].unsqueeze(1) - py
    a, b, c = (con[..., k].unsqueeze(1) for k in range(3))
    power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy
    # Clamping power at 0 changes nothing kept (power > 0 is skipped) but keeps exp finite for autograd.
    alpha = torch.clamp(opa.unsqueeze(1) * torch.exp(torch.clamp(power, max=0.0)), max=ALPHA_MAX)
    candidate = active.unsqueeze(1) & (power <= 0) & (alpha >= ALPHA_MIN)
    alpha = torch.where(candidate, alpha, torch.zeros_like(alpha))
    with torch.no_grad():
        # Inclusive transmittance is monotone, so "stop at the first T*(1-alpha) < 1e-4" is this mask.
        included = candidate & (torch.cumprod(1 - alpha, dim=-1) >= TRANSMITTANCE_MIN)
    alpha = torch.where(included, alpha, torch.zeros_like(alpha))
    transmittance = torch.cumprod(1 - alpha, dim=-1)
    before = torch.cat([torch.ones_like(transmittance[..., :1]), transmittance[..., :-1]], dim=-1)
    weights = alpha * before  # [B, HW, N]

    rgb = weights @ col  # [B, HW, C]
    depth = weights @ z.unsqueeze(-1)
    # With N = 0 the weights' (empty) sum gives alpha 0 and keeps the graph connected.
    out_alpha = 1 - transmittance[..., -1:] if N > 0 else weights.sum(-1, keepdim=True)
    return (
        rgb.view(B, height, width, C),
        out_alpha.reshape(B, height, width, 1),
        depth.view(B, height, width, 1),
    )


# --------------------------------------------------------------------------------------------
# cpu tier: C++/OpenMP (cuda/gaussian_raster_cpu.cpp), 16x16 tiles, hand-written backward
# --------------------------------------------------------------------------------------------


def _check_native_inputs(tensors: dict[str, Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32:
            raise TypeError(
                f"the native gaussian rasterizer needs float32 {name}, got {tensor.dtype} "
                "(use tier='reference' for other dtypes)"
            )


class _RasterizeNative(torch.autograd.Function):
    """Autograd wrapper of ``torch.ops.lift3d_{cpu,cuda}.gaussian_rasterize_{forward,backward}``.

    The cuda tier sums gradients with float atomics, so unlike the cpu tier's their last bits vary
    from run to run.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        tier: str,
        means2d: Tensor,
        conics: Tensor,
        colors: Tensor,
        opacities: Tensor,
        depths: Tensor,
        radii: Tensor,
        width: int,
        height: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        inputs = [t.contiguous() for t in (means2d, conics, colors, opacities, depths)]
        radii = radii.to(torch.int32).contiguous()
        forward = native_op(tier, "gaussian_rasterize_forward", means2d.device)
        rgb, alpha, depth, final_t, n_contrib, tile_offsets, tile_ids = forward(*inputs, radii, width, height)
        ctx.save_for_backward(*inputs, final_t, n_contrib, tile_offsets, tile_ids)
        ctx.tier, ctx.width, ctx.height = tier, width, height
        return rgb, alpha, depth

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_rgb: Tensor, grad_alpha: Tensor, grad_depth: Tensor
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        backward = native_op(ctx.tier, "gaussian_rasterize_backward", saved[0].device)
        grads = backward(
            *saved,
            grad_rgb.contiguous().float(),
            grad_alpha.contiguous().float(),
            grad_depth.contiguous().float(),
            ctx.width,
            ctx.height,
        )
        return (None, *grads, None, None, None)


def _native_rasterizer(tier: str) -> "_Rasterizer":
    """The cpu (``cuda/gaussian_raster_cpu.cpp``) or cuda (``cuda/gaussian_raster.cu``) tier."""

    def rasterize(
        means2d: Tensor,
        conics: Tensor,
        colors: Tensor,
        opacities: Tensor,
        depths: Tensor,
        radii: Tensor,
        width: int,
        height: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        _check_native_inputs(
            {"means2d": means2d, "conics": conics, "colors": colors, "opacities": opacities, "depths": depths}
        )
        return _RasterizeNative.apply(tier, means2d, conics, colors, opacities, depths, radii, width, height)

    return rasterize


_Rasterizer = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, int], tuple[Tensor, Tensor, Tensor]]

_TIERS: dict[str, _Rasterizer] = {
    "reference": _rasterize_reference,
    "cpu": _native_rasterizer("cpu"),
    "cuda": _native_rasterizer("cuda"),
}
"""Tier name -> implementation."""
