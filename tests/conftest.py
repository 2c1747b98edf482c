"""Shared fixtures: stub teachers whose noise prediction is a known function; tiny quickstart runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lift3d.kernels._backend import KernelBuildError, load_cpu_extension, tier_available

from lift3d.cameras import Cameras
from lift3d.teachers.base import Conditioning, NoisePrediction, Teacher, scaled_linear_alphas_cumprod


QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
TINY_QUICKSTART = [
    "trainer.steps=6", "trainer.cameras.width=24", "trainer.cameras.height=24", "trainer.cameras.batch_size=2",
    "trainer.eval.width=24", "trainer.eval.height=24", "trainer.eval.num_views=3", "trainer.log_every=1",
    "representation.num_points=300", "teacher.resolution=24", "export.video_frames=4",
    "export.video_resolution=32", "representation.densify.start_step=2", "representation.densify.interval=2",
]
"""Overrides that make ``configs/quickstart.yaml`` a run of seconds (later overrides win)."""


class GaussianStubTeacher(Teacher):
    """Pixel teacher with p(x0|cond) = N(mu_c, sd^2 I) and p(x0|uncond) = N(mu_u, sd^2 I), exact eps."""

    def __init__(self, mu_cond: torch.Tensor, mu_uncond: torch.Tensor, sigma_data: float = 0.1):
        super().__init__()
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod())
        self.register_buffer("mu_cond", mu_cond)
        self.register_buffer("mu_uncond", mu_uncond)
        self.sigma_data = sigma_data

    @property
    def channels(self) -> int:
        return self.mu_cond.shape[0]

    def encode_prompt(self, prompt: str, negative_prompt: str = ""):
        return prompt

    def condition(self, prompt_state, cameras: Cameras, view_dependent: bool = True, with_unconditional: bool = True):
        uncond = self.mu_uncond if with_unconditional else None
        return Conditioning(cond=self.mu_cond, uncond=uncond, view_labels=cameras.view_labels())

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        return rgb.permute(0, 3, 1, 2)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.permute(0, 2, 3, 1)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        return sigma * (x_t - alpha * mu) / (alpha**2 * self.sigma_data**2 + sigma**2)

    def predict_noise(self, x_t, t, conditioning: Conditioning) -> NoisePrediction:
        uncond = None if conditioning.uncond is None else self.eps(x_t, t, conditioning.uncond)
        return NoisePrediction(cond=self.eps(x_t, t, conditioning.cond), uncond=uncond)


@pytest.fixture
def stub_teacher() -> GaussianStubTeacher:
    generator = torch.Generator().manual_seed(0)
    mu_c = torch.rand(3, 4, 4, generator=generator)
    mu_u = torch.rand(3, 4, 4, generator=generator)
    return GaussianStubTeacher(mu_c, mu_u)


def require_cpu_ops(*ops: str) -> None:
    """Skip (with the reason) unless the C++ kernels build here and register ``ops``."""
    try:
        load_cpu_extension()
    except KernelBuildError as error:
        pytest.skip(f"cpu kernels unavailable: {str(error).splitlines()[0]}")
    for op in ops:
        if not tier_available("cpu", op):
            pytest.skip(f"the cpu extension has no {op} op")


def load_render_glb():
    """``tools/render_glb.py`` (the three.js-in-headless-Chromium viewer), imported once as a module."""
    name = "lift3d_tools_render_glb"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "tools" / "render_glb.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
