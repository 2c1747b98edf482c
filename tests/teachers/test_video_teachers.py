"""The clip teachers (text-to-video, Stable Video Diffusion) on tiny random models saved as real folders."""

from __future__ import annotations

import dataclasses
import math
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_diffusers import SVD_FRAMES, one_thread, save_tiny_svd, save_tiny_t2v  # noqa: E402, F401

from lift3d import registry  # noqa: E402
from lift3d.cameras import orbit_cameras  # noqa: E402
from lift3d.guidance.common import GuidanceBaseConfig  # noqa: E402
from lift3d.guidance.sds import SDSGuidance  # noqa: E402
from lift3d.representations.base import RenderOutput  # noqa: E402
from lift3d.teachers.base import (  # noqa: E402
    Conditioning,
    clips_to_frames,
    frames_to_clips,
    scaled_linear_alphas_cumprod,
)
from lift3d.teachers.prompting import PromptConfig  # noqa: E402
from lift3d.teachers.video import (  # noqa: E402
    StableVideoDiffusionTeacher,
    StableVideoDiffusionTeacherConfig,
    TextToVideoTeacher,
    TextToVideoTeacherConfig,
    karras_alphas_cumprod,
    load_image,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES = 3
"""Frames per clip of the tiny text-to-video teacher."""
H, W = 16, 24
"""Teacher frame size (the tiny VAEs halve it)."""


def cameras(n: int, azimuth: list[float] | None = None, frames: int = 1):
    azimuth = azimuth or [0.0] * n
    cams = orbit_cameras(torch.zeros(n), torch.tensor(azimuth), torch.full((n,), 3.0), torch.full((n,), 40.0), W, H)
    return dataclasses.replace(cams, time=torch.linspace(0, 1, frames).repeat(n // frames), frames=frames)


@pytest.fixture(scope="module")
def t2v_folder(tmp_path_factory) -> Path:
    return save_tiny_t2v(tmp_path_factory.mktemp("tiny-t2v") / "model")


@pytest.fixture(scope="module")
def svd_folder(tmp_path_factory) -> Path:
    return save_tiny_svd(tmp_path_factory.mktemp("tiny-svd") / "model")


def make_t2v(folder: Path, cache: Path, **overrides) -> TextToVideoTeacher:
    return TextToVideoTeacher(TextToVideoTeacherConfig(
        model=str(folder), num_frames=FRAMES, height=H, width=W, prompting=PromptConfig(cache_dir=str(cache)),
        **overrides,
    ))


@pytest.fixture(scope="module")
def t2v(t2v_folder, tmp_path_factory) -> TextToVideoTeacher:
    return make_t2v(t2v_folder, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def t2v_state(t2v):
    return t2v.encode_prompt("a dog running", "")


@pytest.fixture(scope="module")
def condition_image(tmp_path_factory) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = (rng.random((20, 20, 4)) * 255).astype(np.uint8)
    rgba[:5, :, 3] = 0  # a transparent band: composited over the background
    path = tmp_path_factory.mktemp("image") / "cond.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def make_svd(folder: Path, image: Path | str = "", **overrides) -> StableVideoDiffusionTeacher:
    return StableVideoDiffusionTeacher(StableVideoDiffusionTeacherConfig(
        model=str(folder), image=str(image), height=H, width=W, **overrides,
    ))


@pytest.fixture(scope="module")
def svd(svd_folder, condition_image) -> StableVideoDiffusionTeacher:
    return make_svd(svd_folder, condition_image)


@pytest.fixture(scope="module")
def svd_state(svd):
    return svd.encode_prompt("ignored", "")


def noisy_clips(teacher, clips: int, frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = teacher.latent_hw
    x0 = torch.randn(clips, teacher.channels, frames, h, w, generator=g)
    t = torch.randint(50, 950, (clips,), generator=g)
    return teacher.add_noise(x0, torch.randn(x0.shape, generator=g), t), t


def sds_step_gradients(teacher, state, n_frames: int, guidance_scale: float) -> torch.Tensor:
    """The gradient an SDS step puts on rendered frames [N, H, W, 3] of clips as the trainer samples them."""
    torch.manual_seed(0)
    rgb = torch.rand(n_frames, H, W, 3, requires_grad=True)
    render = RenderOutput(rgb=rgb, alpha=torch.ones(n_frames, H, W, 1))
    guidance = SDSGuidance(GuidanceBaseConfig(guidance_scale=guidance_scale), teacher)
    cams = cameras(n_frames, frames=teacher.frames_per_clip)
    conditioning = teacher.condition(state, cams, with_unconditional=guidance.needs_unconditional)
    output = guidance(render, conditioning, cams, step=0)
    output.loss.backward()
    assert math.isfinite(output.logs["guidance/grad_norm"]) and output.logs["guidance/nonfinite"] == 0
    return rgb.grad


# ------------------------------------------------------------------------------ clip layout


def test_clip_layout_round_trips_clip_major():
    frames = torch.arange(6 * 2 * 1 * 1, dtype=torch.float32).view(6, 2, 1, 1)
    clips = frames_to_clips(frames, 3)
    assert clips.shape == (2, 2, 3, 1, 1)
    torch.testing.assert_close(clips[1, :, 2], frames[1 * 3 + 2])  # clip b, frame f = camera b*F + f
    torch.testing.assert_close(clips_to_frames(clips), frames)
    with pytest.raises(ValueError, match=r"\[B\*4"):
        frames_to_clips(frames, 4)


# ------------------------------------------------------------------------------ text-to-video


def test_text_to_video_loads_the_folder(t2v, t2v_folder):
    assert registry.lookup("teacher", "text-to-video").cls is TextToVideoTeacher
    assert type(t2v.unet).__name__ == "UNet3DConditionModel"
    assert t2v.frames_per_clip == FRAMES and t2v.channels == 4 and t2v.latent_hw == (H // 2, W // 2)
    torch.testing.assert_close(t2v.alphas_cumprod, scaled_linear_alphas_cumprod(), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in t2v.parameters())


def test_text_to_video_hub_id_resolves_from_the_local_cache_only(t2v_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("the network was touched"))
    repo, commit = tmp_path / "hub" / "models--lift3d--tiny-t2v", "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(t2v_folder, repo / "snapshots" / commit)
    teacher = make_t2v("lift3d/tiny-t2v", tmp_path / "cache", hub_cache_dir=str(tmp_path / "hub"))
    assert teacher.model_folder == repo / "snapshots" / commit


def test_text_to_video_encode_is_per_frame_and_decodes(t2v, tmp_path, t2v_folder):
    teacher = make_t2v(t2v_folder, tmp_path, encode_mode="mean")
    rgb = torch.rand(2 * FRAMES, H, W, 3, requires_grad=True)
    x0 = teacher.encode_images(rgb)
    assert x0.shape == (2, 4, FRAMES, H // 2, W // 2)
    # frame f of clip b is the SD VAE latent of camera b*F + f
    single = teacher.vae.encode(2 * rgb[4:5].detach().permute(0, 3, 1, 2) - 1).latent_dist.mean * teacher.scaling_factor
    torch.testing.assert_close(x0[1, :, 1], single[0], atol=1e-5, rtol=1e-4)
    x0.square().mean().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    decoded = teacher.decode(x0.detach())
    assert decoded.shape == (2 * FRAMES, H, W, 3) and 0 <= decoded.min() and decoded.max() <= 1
    with pytest.raises(ValueError, match=r"\[B\*3"):
        teacher.encode_images(torch.rand(4, H, W, 3))


def test_text_to_video_conditions_once_per_clip_on_its_first_camera(t2v, t2v_state):
    cams = cameras(2 * FRAMES, [0.0, 90.0, 90.0, 180.0, 0.0, 0.0])
    conditioning = t2v.condition(t2v_state, cams)
    assert conditioning.cond.shape[0] == 2 and conditioning.uncond.shape[0] == 2
    assert conditioning.view_labels == ["front", "back"]
    torch.testing.assert_close(conditioning.cond[1], t2v_state.views["back"])
    with pytest.raises(ValueError, match="clips of 3 frames"):
        t2v.condition(t2v_state, cameras(4))
    with pytest.raises(ValueError, match="clips of 2 frames but the teacher takes 3"):
        t2v.condition(t2v_state, cameras(6, frames=2))


def test_text_to_video_noise_prediction_cfg_and_temporal_coupling(t2v, t2v_state):
    conditioning = t2v.condition(t2v_state, cameras(2 * FRAMES))
    x_t, t = noisy_clips(t2v, 2, FRAMES)
    both = t2v.predict_noise(x_t, t, conditioning)
    assert both.cond.shape == x_t.shape and both.uncond.shape == x_t.shape
    with torch.no_grad():
        direct = t2v.unet(x_t, t, encoder_hidden_states=conditioning.cond).sample  # epsilon model
    torch.testing.assert_close(both.cond, direct, atol=1e-5, rtol=1e-4)
    uncond_only = t2v.predict_noise(x_t, t, Conditioning(conditioning.uncond, None, conditioning.view_labels))
    torch.testing.assert_close(both.uncond, uncond_only.cond, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both.cfg(7.5), both.uncond + 7.5 * (both.cond - both.uncond))
    # a clip model: the prediction for frame 0 depends on the other frames (temporal attention)
    moved = x_t.clone()
    moved[:, :, 2] += 1.0
    again = t2v.predict_noise(moved, t, conditioning)
    assert (again.cond[:, :, 0] - both.cond[:, :, 0]).abs().max() > 1e-4


def test_sds_step_on_a_text_to_video_clip_gives_finite_gradients_on_every_frame(t2v, t2v_state):
    grad = sds_step_gradients(t2v, t2v_state, 2 * FRAMES, guidance_scale=20.0)
    assert torch.isfinite(grad).all()
    assert (grad.flatten(1).abs().sum(1) > 0).all()


def test_text_to_video_has_no_student(t2v):
    with pytest.raises(NotImplementedError, match="sds"):
        t2v.make_student()


# ------------------------------------------------------------------------------ Stable Video Diffusion


def test_svd_loads_the_folder_without_text_models(svd, svd_folder):
    assert registry.lookup("teacher", "stable-video-diffusion").cls is StableVideoDiffusionTeacher
    assert not (svd_folder / "text_encoder").exists() and not svd.has_text_encoder
    assert svd.frames_per_clip == SVD_FRAMES  # 0 = the UNet's num_frames
    assert svd.prediction_type == "v_prediction" and svd.continuous_timesteps
    torch.testing.assert_close(svd.alphas_cumprod, scaled_linear_alphas_cumprod(), atol=1e-6, rtol=0)


def test_svd_needs_an_image(svd_folder):
    teacher = make_svd(svd_folder)
    with pytest.raises(ValueError, match="teacher.image"):
        teacher.encode_prompt("a dog")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        make_svd(svd_folder, "nope.png").encode_prompt("a dog")


def test_conditioning_image_composites_alpha_over_the_background(condition_image):
    image = load_image(condition_image, (0.25, 0.5, 1.0))
    assert image.shape == (20, 20, 3)
    torch.testing.assert_close(image[0, 0], torch.tensor([0.25, 0.5, 1.0]))


def test_svd_image_condition_and_unconditional_branch(svd, svd_state):
    assert svd_state.image_embeds.shape == (1, 1, 16) and svd_state.image_latents.shape == (1, 4, H // 2, W // 2)
    torch.testing.assert_close(svd_state.added_time_ids, torch.tensor([[6.0, 127.0, 0.02]]))
    conditioning = svd.condition(svd_state, cameras(2 * SVD_FRAMES))
    assert conditioning.cond.image_embeds.shape[0] == 2 and len(conditioning.view_labels) == 2
    assert conditioning.uncond.image_embeds.abs().sum() == 0 and conditioning.uncond.image_latents.abs().sum() == 0


def test_svd_encode_and_decode_clips(svd):
    x0 = svd.encode_images(torch.rand(2 * SVD_FRAMES, H, W, 3))
    assert x0.shape == (2, 4, SVD_FRAMES, H // 2, W // 2)
    decoded = svd.decode(x0)
    assert decoded.shape == (2 * SVD_FRAMES, H, W, 3) and 0 <= decoded.min() and decoded.max() <= 1


def test_svd_denoised_estimate_matches_the_diffusers_euler_scheduler(svd, svd_state, svd_folder):
    """Our VP x_t / DDPM-t view of SVD gives the x0 that the pipeline's EDM Euler step computes."""
    from diffusers import EulerDiscreteScheduler

    conditioning = svd.condition(svd_state, cameras(SVD_FRAMES), with_unconditional=False)
    g = torch.Generator().manual_seed(1)
    h, w = svd.latent_hw
    x0 = torch.randn(1, 4, SVD_FRAMES, h, w, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    for step in (30, 400, 900):
        t = torch.tensor([step])
        sigma = float(svd.sigmas(t))
        abar = svd.alphas_cumprod[t].view(1, 1, 1, 1, 1)
        x_t = svd.add_noise(x0, noise, t)
        eps = svd.predict_noise(x_t, t, conditioning).cond
        ours = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        # the pipeline's path: VE sample, scale_model_input, image latents concatenated, Euler to sigma = 0
        scheduler = EulerDiscreteScheduler.from_pretrained(str(svd_folder / "scheduler"))
        scheduler.set_timesteps(sigmas=[sigma, 0.0])
        timestep = scheduler.timesteps[0]
        x_ve = (x_t * math.sqrt(1 + sigma**2)).transpose(1, 2)  # [B, F, C, h, w]
        model_in = scheduler.scale_model_input(x_ve, timestep)
        model_in = torch.cat([model_in, svd_state.image_latents.unsqueeze(1).expand(-1, SVD_FRAMES, -1, -1, -1)], 2)
        with torch.no_grad():
            v = svd.unet(model_in, timestep, encoder_hidden_states=svd_state.image_embeds,
                         added_time_ids=svd_state.added_time_ids).sample
        reference = scheduler.step(v, timestep, x_ve).prev_sample.transpose(1, 2)
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_svd_cfg_branches_share_one_call_and_match_separate_calls(svd, svd_state):
    conditioning = svd.condition(svd_state, cameras(2 * SVD_FRAMES))
    x_t, t = noisy_clips(svd, 2, SVD_FRAMES)
    both = svd.predict_noise(x_t, t, conditioning)
    uncond_only = svd.predict_noise(x_t, t, Conditioning(conditioning.uncond, None, conditioning.view_labels))
    cond_only = svd.predict_noise(x_t, t, Conditioning(conditioning.cond, None, conditioning.view_labels))
    torch.testing.assert_close(both.cond, cond_only.cond, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both.uncond, uncond_only.cond, atol=1e-5, rtol=1e-4)
    assert (both.cond - both.uncond).abs().max() > 1e-5  # the image condition matters


def test_karras_grid_spans_the_scheduler_sigmas(svd_folder, condition_image):
    abar = karras_alphas_cumprod(1000, 0.002, 700.0)
    sigma = ((1 - abar) / abar).sqrt()
    assert bool((sigma[1:] > sigma[:-1]).all())
    assert math.isclose(float(sigma[0]), 0.002, rel_tol=1e-3) and math.isclose(float(sigma[-1]), 700.0, rel_tol=1e-3)
    teacher = make_svd(svd_folder, condition_image, sigma_grid="karras")
    torch.testing.assert_close(teacher.alphas_cumprod, abar)


def test_sds_step_on_an_svd_clip_gives_finite_gradients_on_every_frame(svd, svd_state):
    grad = sds_step_gradients(svd, svd_state, 2 * SVD_FRAMES, guidance_scale=3.0)
    assert torch.isfinite(grad).all()
    assert (grad.flatten(1).abs().sum(1) > 0).all()
