"""Rendering activated 3D Gaussians: SH colour, projection, rasterization, compositing."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lift3d.cameras import Cameras
from lift3d.kernels.gaussian_raster import project_gaussians, rasterize_gaussians
from lift3d.representations.base import RenderOutput

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (
    -0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
    -0.4570457994644658, 1.445305721320277, -0.5900435899266435,
)


def num_sh_coefficients(degree: int) -> int:
    """Coefficients per channel for SH of ``degree`` (0..3)."""
    return (degree + 1) ** 2


def sh_basis(directions: Tensor, degree: int) -> Tensor:
    """Real SH basis of the 3DGS convention, [..., (degree+1)^2], for unit ``directions`` [..., 3]."""
    if not 0 <= degree <= 3:
        raise ValueError(f"sh_degree must be in 0..3, got {degree}")
    x, y, z = directions.unbind(-1)
    basis = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        basis += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        basis += [
            SH_C2[0] * xy, SH_C2[1] * yz, SH_C2[2] * (2.0 * zz - xx - yy), SH_C2[3] * xz, SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        basis += [
            SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * xy * z, SH_C3[2] * y * (4 * zz - xx - yy),
            SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[4] * x * (4 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy), SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(basis, dim=-1)


def sh_to_color(coefficients: Tensor, directions: Tensor, degree: int) -> Tensor:
    """3DGS colour ``max(0.5 + sum_k c_k Y_k(d), 0)``; coefficients [N, K, C], directions [B, N, 3] -> [B, N, C]."""
    basis = sh_basis(directions, degree)  # [B, N, K]
    colors = torch.einsum("bnk,nkc->bnc", basis, coefficients[:, : basis.shape[-1]])
    return torch.clamp_min(colors + 0.5, 0.0)


def render_gaussians(
    means: Tensor,
    scales: Tensor,
    quats: Tensor,
    opacities: Tensor,
    sh_coefficients: Tensor,
    sh_degree: int,
    cameras: Cameras,
    background: Tensor,
    kernel_tier: str | None = None,
) -> RenderOutput:
    """Render activated Gaussians (means [N,3], scales [N,3], quats [N,4] wxyz, opacities [N],
    SH coefficients [N,K,C]) for a batch of cameras, composited over ``background`` [C]."""
    B = len(cameras)
    projected = project_gaussians(
        means, scales, quats, cameras.world_to_camera(), cameras.intrinsics(), cameras.width, cameras.height
    )
    view_dirs = means.unsqueeze(0) - cameras.position.unsqueeze(1)
    view_dirs = view_dirs / view_dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    colors = sh_to_color(sh_coefficients, view_dirs, sh_degree)
    rgb, alpha, depth = rasterize_gaussians(
        projected.means2d,
        projected.conics,
        colors.contiguous(),
        opacities.unsqueeze(0).expand(B, -1).contiguous(),
        projected.depths,
        projected.radii,
        cameras.width,
        cameras.height,
        tier=kernel_tier,
    )
    rgb = rgb + (1.0 - alpha) * background.to(rgb).view(1, 1, 1, -1)
    return RenderOutput(
        rgb=rgb, alpha=alpha, depth=depth, aux={"means2d": projected.means2d, "radii": projected.radii}
    )


def rgb_to_sh_dc(rgb: Tensor) -> Tensor:
    """The degree-0 coefficient that renders as ``rgb``."""
    return (rgb - 0.5) / SH_C0


def inverse_sigmoid(x: Tensor) -> Tensor:
    return torch.log(x / (1.0 - x))


def ball_volume(radius: float) -> float:
    return 4.0 / 3.0 * math.pi * radius**3
