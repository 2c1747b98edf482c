"""Stub teachers and students with known eps for the guidance tests (tests/guidance is on sys.path)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from conftest import GaussianStubTeacher  # tests/conftest.py (pytest puts tests/ on sys.path)
from lift3d.cameras import Cameras, orbit_cameras
from lift3d.representations.base import RenderOutput
from lift3d.teachers.analytic import spherical_camera_embedding
from lift3d.teachers.base import Conditioning


class StubStudent(nn.Module):
    """eps = teacher_eps(x_t; mu_c) + a x_t + (camera @ W) per channel: a known function with parameters."""

    def __init__(self, teacher: GaussianStubTeacher, camera_dim: int = 4):
        super().__init__()
        self._teacher = (teacher,)
        self.a = nn.Parameter(torch.tensor(0.0))
        self.camera_weight = nn.Parameter(torch.zeros(camera_dim, teacher.channels))

    def camera_embedding_of(self, cameras: Cameras) -> Tensor:
        return spherical_camera_embedding(cameras)

    def forward(self, x_t: Tensor, t: Tensor, conditioning: Conditioning, camera: Tensor | None = None) -> Tensor:
        eps = self._teacher[0].eps(x_t, t, conditioning.cond) + self.a * x_t
        if camera is not None:
            eps = eps + (camera @ self.camera_weight)[:, :, None, None]
        return eps


class GaussianStudent(nn.Module):
    """The exact eps of N(m, sd^2 I) with a learnable mean m (starts at the teacher's mu_c); ignores the camera."""

    def __init__(self, teacher: GaussianStubTeacher, sigma_data: float | None = None):
        super().__init__()
        self._teacher = (teacher,)
        self.mean = nn.Parameter(teacher.mu_cond.clone())
        self.sigma_data = teacher.sigma_data if sigma_data is None else sigma_data

    def forward(self, x_t: Tensor, t: Tensor, conditioning: Conditioning, camera: Tensor | None = None) -> Tensor:
        abar = self._teacher[0].alphas_cumprod[t].view(-1, 1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        return sigma * (x_t - alpha * self.mean) / (alpha**2 * self.sigma_data**2 + sigma**2)


class DiracStudent(nn.Module):
    """The exact eps of a deterministic render r: (x_t - alpha r) / sigma, i.e. the injected noise."""

    def __init__(self, teacher: GaussianStubTeacher):
        super().__init__()
        self._teacher = (teacher,)
        self.render: Tensor | None = None
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_t: Tensor, t: Tensor, conditioning: Conditioning, camera: Tensor | None = None) -> Tensor:
        abar = self._teacher[0].alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * self.render) / (1 - abar).sqrt() + 0.0 * self.dummy


class StudentStubTeacher(GaussianStubTeacher):
    """GaussianStubTeacher whose ``make_student`` builds ``student_cls(self)``."""

    def __init__(self, mu_cond: Tensor, mu_uncond: Tensor, student_cls: type = StubStudent, sigma_data: float = 0.1):
        super().__init__(mu_cond, mu_uncond, sigma_data)
        self.student_cls = student_cls

    def make_student(self) -> nn.Module:
        return self.student_cls(self)


def make_teacher(student_cls: type = StubStudent, seed: int = 0, size: int = 4,
                 sigma_data: float = 0.1) -> StudentStubTeacher:
    generator = torch.Generator().manual_seed(seed)
    mu_c = torch.rand(3, size, size, generator=generator)
    mu_u = torch.rand(3, size, size, generator=generator)
    return StudentStubTeacher(mu_c, mu_u, student_cls, sigma_data)


def cameras(batch: int, size: int = 4) -> Cameras:
    return orbit_cameras(torch.linspace(0, 30, batch), torch.linspace(-90, 90, batch), torch.full((batch,), 3.0),
                         torch.full((batch,), 40.0), size, size)


def render_of(rgb: Tensor) -> RenderOutput:
    return RenderOutput(rgb=rgb, alpha=torch.ones(*rgb.shape[:-1], 1))


def hand_x_t(teacher: GaussianStubTeacher, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    abar = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def optimise(guidance, teacher, steps: int, batch: int = 8, lr: float = 0.02, size: int = 4, seed: int = 0) -> Tensor:
    """Adam on one shared image theta [1, H, W, 3] rendered for ``batch`` cameras; guidance state trained too."""
    torch.manual_seed(seed)
    theta = torch.full((1, size, size, 3), 0.5, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    groups = guidance.param_groups()
    guidance_optimizer = torch.optim.Adam(groups) if groups else None
    cams = cameras(batch, size)
    conditioning = teacher.condition(None, cams)
    for step in range(steps):
        optimizer.zero_grad()
        if guidance_optimizer:
            guidance_optimizer.zero_grad()
        out = guidance(render_of(theta.expand(batch, -1, -1, -1)), conditioning, cams, step)
        out.loss.backward()
        optimizer.step()
        if guidance_optimizer:
            guidance_optimizer.step()
    return theta.detach()[0].permute(2, 0, 1)


def cfg_target(teacher: GaussianStubTeacher, scale: float) -> Tensor:
    return teacher.mu_uncond + scale * (teacher.mu_cond - teacher.mu_uncond)
