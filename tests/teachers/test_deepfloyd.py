"""The DeepFloyd IF stage-I teacher on a tiny random IF UNet and T5 encoder (offline)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_diffusers import IF_MAX_TOKENS, one_thread, save_tiny_if  # noqa: E402, F401  (tests/teachers is on sys.path)

from lift3d import registry  # noqa: E402
from lift3d.cameras import orbit_cameras  # noqa: E402
from lift3d.teachers.base import Conditioning  # noqa: E402
from lift3d.teachers.deepfloyd import DeepFloydTeacher, DeepFloydTeacherConfig  # noqa: E402
from lift3d.teachers.diffusers_sd import ModelNotFoundError  # noqa: E402
from lift3d.teachers.prompting import PromptConfig  # noqa: E402

RESOLUTION = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # shared fixture from tiny_diffusers


@pytest.fixture(scope="module")
def if_folder(tmp_path_factory) -> Path:
    return save_tiny_if(tmp_path_factory.mktemp("tiny-if") / "model")


def make_teacher(folder: Path, cache_dir: Path, **prompting) -> DeepFloydTeacher:
    config = DeepFloydTeacherConfig(
        model=str(folder), resolution=RESOLUTION, text_max_length=IF_MAX_TOKENS,
        prompting=PromptConfig(cache_dir=str(cache_dir), **prompting),
    )
    return DeepFloydTeacher(config)


@pytest.fixture(scope="module")
def teacher(if_folder, tmp_path_factory) -> DeepFloydTeacher:
    return make_teacher(if_folder, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def state(teacher):
    return teacher.encode_prompt("A Hamburger", "")


def cameras():
    return orbit_cameras(
        torch.tensor([0.0, 10.0, 5.0]), torch.tensor([0.0, 90.0, 180.0]), torch.full((3,), 3.0),
        torch.full((3,), 40.0), RESOLUTION, RESOLUTION,
    )


def noisy(teacher, batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1
    t = torch.randint(20, 980, (batch,), generator=generator)
    return teacher.add_noise(x0, torch.randn(x0.shape, generator=generator), t), t


def test_registered_pixel_teacher_with_t5_embeddings(teacher, state, if_folder):
    assert registry.lookup("teacher", "deepfloyd-if").cls is DeepFloydTeacher
    assert (if_folder / "model_index.json").is_file()
    assert teacher.channels == 3 and teacher.unet.config.out_channels == 6
    assert state.base.shape == (IF_MAX_TOKENS, 16)  # [L, d_model] of the tiny T5
    assert teacher.prompt_texts("A Hamburger")[0] == "a hamburger"  # IF lower-cases its prompts
    # squaredcos schedule from the IF scheduler, not SD's
    assert teacher.alphas_cumprod[-1] < 1e-4 and teacher.alphas_cumprod[0] > 0.9999


def test_encode_decode_pixels(teacher):
    rgb = torch.rand(2, 32, 32, 3, requires_grad=True)
    x0 = teacher.encode_images(rgb)
    assert x0.shape == (2, 3, RESOLUTION, RESOLUTION) and -1 <= x0.min() and x0.max() <= 1
    x0.sum().backward()
    assert rgb.grad.abs().sum() > 0
    same = torch.rand(1, RESOLUTION, RESOLUTION, 3)
    torch.testing.assert_close(teacher.decode(teacher.encode_images(same)), same)


def test_learned_variance_is_dropped_and_cfg_is_one_call(teacher, state):
    conditioning = teacher.condition(state, cameras())
    assert conditioning.view_labels == ["front", "side", "back"]
    x_t, t = noisy(teacher)
    batches = []
    handle = teacher.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        prediction = teacher.predict_noise(x_t, t, conditioning)
    finally:
        handle.remove()
    assert batches == [6] and prediction.cond.shape == x_t.shape and prediction.uncond.shape == x_t.shape
    with torch.no_grad():
        raw = teacher.unet(x_t, t, encoder_hidden_states=conditioning.cond).sample
    assert raw.shape[1] == 6
    torch.testing.assert_close(prediction.cond, raw[:, :3], atol=1e-5, rtol=1e-4)
    alone = teacher.predict_noise(x_t, t, Conditioning(conditioning.uncond, None, conditioning.view_labels))
    torch.testing.assert_close(prediction.uncond, alone.cond, atol=1e-5, rtol=1e-4)


def test_cache_round_trip(if_folder, tmp_path, state):
    first = make_teacher(if_folder, tmp_path)
    first.encode_prompt("A Hamburger", "")
    second = make_teacher(if_folder, tmp_path)
    again = second.encode_prompt("A Hamburger", "")
    assert first.prompt_cache.misses == 6 and second.prompt_cache.hits == 6
    torch.testing.assert_close(again.views["side"], state.views["side"])


def test_student_on_the_if_unet(if_folder, tmp_path, state):
    teacher = make_teacher(if_folder, tmp_path)
    student = teacher.make_student()
    cams = cameras()
    conditioning = teacher.condition(state, cams, with_unconditional=False)
    x_t, t = noisy(teacher)
    reference = teacher.predict_noise(x_t, t, conditioning).cond
    eps = student(x_t, t, conditioning, student.camera_features(cams))
    torch.testing.assert_close(eps, reference, atol=1e-6, rtol=1e-5)
    eps.square().mean().backward()
    assert student.camera_embedding[2].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.named_parameters() if "lora_B" in n)


def test_missing_if_model_names_the_gate(tmp_path, if_folder):
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache.*gated"):
        DeepFloydTeacher(DeepFloydTeacherConfig(hub_cache_dir=str(tmp_path / "hub")))
    broken = tmp_path / "broken"
    shutil.copytree(if_folder, broken)
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(ModelNotFoundError, match="missing scheduler/"):
        make_teacher(broken, tmp_path)
