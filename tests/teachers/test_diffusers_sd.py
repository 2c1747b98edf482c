"""The Stable Diffusion teacher on tiny random models saved as real diffusers folders (offline)."""

from __future__ import annotations

import json
import math
import shutil
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_diffusers import one_thread, save_tiny_sd  # noqa: E402, F401  (tests/teachers is on sys.path)

from lift3d import registry  # noqa: E402
from lift3d.cameras import orbit_cameras  # noqa: E402
from lift3d.teachers.base import Conditioning, scaled_linear_alphas_cumprod  # noqa: E402
from lift3d.teachers.diffusers_sd import (  # noqa: E402
    ModelNotFoundError,
    StableDiffusionTeacher,
    StableDiffusionTeacherConfig,
)
from lift3d.teachers.prompting import (  # noqa: E402
    PerpNegPayload,
    PromptConfig,
    perp_neg_cfg,
    perp_neg_plan,
    perpendicular_component,
    save_prompt_embeddings,
    view_prompts,
)

ROOT = Path(__file__).resolve().parents[2]
IMAGE = 16
"""Teacher image size of the tiny models (the tiny VAE halves it: 8x8 latents)."""


pytestmark = pytest.mark.usefixtures("one_thread")  # shared fixture from tiny_diffusers


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="module")
def sd_v_folder(sd_folder, tmp_path_factory) -> Path:
    """The same weights with a v-prediction scheduler (as SD 2.x 768)."""
    folder = tmp_path_factory.mktemp("tiny-sd-v") / "model"
    shutil.copytree(sd_folder, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["prediction_type"] = "v_prediction"
    path.write_text(json.dumps(config))
    return folder


def make_teacher(folder: Path, cache_dir: Path, **overrides) -> StableDiffusionTeacher:
    prompting = overrides.pop("prompting", {})
    config = StableDiffusionTeacherConfig(
        model=str(folder), image_size=IMAGE, prompting=PromptConfig(cache_dir=str(cache_dir), **prompting), **overrides
    )
    return StableDiffusionTeacher(config)


def cameras(elevation=(0.0, 10.0, 5.0, 75.0), azimuth=(0.0, 90.0, 180.0, 30.0)):
    n = len(elevation)
    return orbit_cameras(
        torch.tensor(elevation), torch.tensor(azimuth), torch.full((n,), 3.0), torch.full((n,), 40.0), IMAGE, IMAGE
    )


@pytest.fixture(scope="module")
def teacher(sd_folder, tmp_path_factory) -> StableDiffusionTeacher:
    return make_teacher(sd_folder, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def state(teacher):
    return teacher.encode_prompt("a hamburger", "")


def noisy(teacher, batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, teacher.channels, teacher.latent_size, teacher.latent_size, generator=generator)
    t = torch.randint(20, 980, (batch,), generator=generator)
    return teacher.add_noise(x0, torch.randn(x0.shape, generator=generator), t), t


class UNetCalls:
    """Records the batch size of every UNet forward."""

    def __init__(self, unet):
        self.batches: list[int] = []
        self.handle = unet.register_forward_pre_hook(lambda module, args: self.batches.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------ loading


def test_registered_and_loads_the_folder(teacher, sd_folder):
    assert registry.lookup("teacher", "stable-diffusion").cls is StableDiffusionTeacher
    assert (sd_folder / "model_index.json").is_file()
    assert teacher.prediction_type == "epsilon" and teacher.channels == 4 and teacher.latent_size == IMAGE // 2
    torch.testing.assert_close(teacher.alphas_cumprod, scaled_linear_alphas_cumprod(), atol=1e-6, rtol=0)
    # fp16 is a GPU setting: on CPU every weight is float32
    assert teacher.config.dtype == "float16" and teacher.compute_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert {type(p).__name__ for p in teacher.unet.attn_processors.values()} == {"AttnProcessor2_0"}  # SDPA
    assert teacher._text is None  # the text encoder was freed after encoding


def test_missing_folder_gives_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        make_teacher(tmp_path / "nowhere" / "model", tmp_path)


def test_incomplete_folder_names_the_missing_part(sd_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"incomplete: missing unet/"):
        make_teacher(broken, tmp_path)


def test_hub_id_not_in_cache_fails_offline_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    hub_cache = tmp_path / "hf" / "hub"
    config = StableDiffusionTeacherConfig(model="stabilityai/stable-diffusion-2-1-base", hub_cache_dir=str(hub_cache))
    with pytest.raises(ModelNotFoundError) as error:
        StableDiffusionTeacher(config)
    message = str(error.value)
    expected_parts = (
        "stabilityai/stable-diffusion-2-1-base", str(hub_cache),
        "hf download stabilityai/stable-diffusion-2-1-base", "huggingface-cli download stabilityai/stable-diffusion-2-1-base",
        "allow_download=true", "teacher.model=PATH",
    )
    for expected in expected_parts:
        assert expected in message, expected


def test_hub_id_resolves_from_the_local_cache_only(sd_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("the network was touched"))
    hub_cache = tmp_path / "hub"
    repo, commit = hub_cache / "models--lift3d--tiny-sd", "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(sd_folder, repo / "snapshots" / commit)  # the layout `hf download` leaves
    config = StableDiffusionTeacherConfig(
        model="lift3d/tiny-sd", hub_cache_dir=str(hub_cache), image_size=IMAGE,
        prompting=PromptConfig(cache_dir=str(tmp_path / "cache")),
    )
    assert StableDiffusionTeacher(config).model_folder == repo / "snapshots" / commit
    (repo / "snapshots" / commit / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"incomplete in the Hugging Face cache .*missing vae/.*hf download"):
        StableDiffusionTeacher(config)


# ------------------------------------------------------------------------------ prompts


def test_view_prompts_follow_threestudio_phrasing():
    prompts = view_prompts("a hamburger", PromptConfig())
    assert prompts == {
        "side": "a hamburger, side view", "front": "a hamburger, front view",
        "back": "a hamburger, back view", "overhead": "a hamburger, overhead view",
    }


def test_view_dependent_prompt_per_camera(teacher, state):
    cams = cameras()
    conditioning = teacher.condition(state, cams)
    assert conditioning.view_labels == ["front", "side", "back", "overhead"]
    for i, label in enumerate(conditioning.view_labels):
        torch.testing.assert_close(conditioning.cond[i], state.views[label])
        torch.testing.assert_close(conditioning.uncond[i], state.negative)
    # the four view embeddings differ, so the selection matters
    assert not torch.allclose(state.views["front"], state.views["back"])
    for i in range(len(cams)):  # what a VSD student sees: the plain prompt
        torch.testing.assert_close(conditioning.view_independent[i], state.base)
    plain = teacher.condition(state, cams, view_dependent=False, with_unconditional=False)
    assert plain.uncond is None
    for i in range(len(cams)):
        torch.testing.assert_close(plain.cond[i], state.base)


def test_embedding_cache_hit_miss_and_corruption(sd_folder, tmp_path, monkeypatch):
    first = make_teacher(sd_folder, tmp_path)
    fresh = first.encode_prompt("a red car", "blurry")
    texts = first.prompt_texts("a red car", "blurry")
    assert len(texts) == 6 and first.prompt_cache.misses == 6 and first.prompt_cache.hits == 0
    assert len(list(tmp_path.glob("*.pt"))) == 6

    second = make_teacher(sd_folder, tmp_path)
    monkeypatch.setattr(second, "_load_text_models", lambda dtype: pytest.fail("text encoder loaded on a cache hit"))
    cached = second.encode_prompt("a red car", "blurry")
    assert second.prompt_cache.hits == 6 and second.prompt_cache.misses == 0
    torch.testing.assert_close(cached.views["back"], fresh.views["back"], atol=0, rtol=0)
    monkeypatch.undo()

    # a torn file and a valid file holding another entry are both rebuilt, not trusted
    second.prompt_cache.path("a red car, back view").write_bytes(b"not a checkpoint")
    torch.save({"key": "x", "text": "a red car", "embedding": torch.zeros(3, 3)}, second.prompt_cache.path("blurry"))
    third = make_teacher(sd_folder, tmp_path)
    rebuilt = third.encode_prompt("a red car", "blurry")
    assert third.prompt_cache.rebuilt == 2 and third.prompt_cache.hits == 4
    torch.testing.assert_close(rebuilt.views["back"], fresh.views["back"])
    torch.testing.assert_close(rebuilt.negative, fresh.negative)
    fourth = make_teacher(sd_folder, tmp_path)
    fourth.encode_prompt("a red car", "blurry")
    assert fourth.prompt_cache.hits == 6  # the rebuilt entries were written back


def test_injected_embeddings_need_no_tokenizer(sd_folder, teacher, state, tmp_path):
    texts = teacher.prompt_texts("a hamburger", "")
    views = (state.views[v] for v in ("side", "front", "back", "overhead"))
    embeddings = dict(zip(texts, [state.base, state.negative, *views]))
    save_prompt_embeddings(tmp_path / "embeds.pt", embeddings)
    bare = tmp_path / "no-text"
    shutil.copytree(sd_folder, bare)
    shutil.rmtree(bare / "text_encoder")
    shutil.rmtree(bare / "tokenizer")
    injected = make_teacher(bare, tmp_path / "cache", prompting={"prompt_embeds_path": str(tmp_path / "embeds.pt")})
    got = injected.encode_prompt("a hamburger", "")
    torch.testing.assert_close(got.views["front"], state.views["front"])
    with pytest.raises(ValueError, match="no embeddings"):
        injected.encode_prompt("a cat", "")
    # without the embeddings file the same folder is incomplete
    with pytest.raises(ModelNotFoundError, match="text_encoder/"):
        make_teacher(bare, tmp_path / "cache")


# ------------------------------------------------------------------------------ encode / decode


def test_encode_is_differentiable_and_decodes(teacher):
    rgb = torch.rand(2, 24, 24, 3, requires_grad=True)  # any render size: resized to image_size
    x0 = teacher.encode_images(rgb)
    assert x0.shape == (2, 4, IMAGE // 2, IMAGE // 2) and x0.dtype == torch.float32
    (x0 * torch.randn_like(x0)).sum().backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    image = teacher.decode(x0.detach())
    assert image.shape == (2, IMAGE, IMAGE, 3) and 0 <= image.min() and image.max() <= 1
    latents = torch.rand(2, 12, 12, 4)  # latent renders (rgb_as_latents) are only resized
    assert teacher.encode_images(latents).shape == (2, 4, IMAGE // 2, IMAGE // 2)


def test_encode_mean_mode_is_deterministic_and_scaled(sd_folder, tmp_path):
    teacher = make_teacher(sd_folder, tmp_path, encode_mode="mean")
    rgb = torch.rand(1, IMAGE, IMAGE, 3)
    expected = teacher.vae.encode(2 * rgb.permute(0, 3, 1, 2) - 1).latent_dist.mean * teacher.vae.config.scaling_factor
    torch.testing.assert_close(teacher.encode_images(rgb), expected)


# ------------------------------------------------------------------------------ noise prediction


def test_cfg_branches_share_one_unet_call_and_match_separate_calls(teacher, state):
    conditioning = teacher.condition(state, cameras())
    x_t, t = noisy(teacher)
    with UNetCalls(teacher.unet) as calls:
        both = teacher.predict_noise(x_t, t, conditioning)
    assert calls.batches == [8]
    cond_only = teacher.predict_noise(x_t, t, Conditioning(conditioning.cond, None, conditioning.view_labels))
    uncond_only = teacher.predict_noise(x_t, t, Conditioning(conditioning.uncond, None, conditioning.view_labels))
    assert cond_only.uncond is None
    torch.testing.assert_close(both.cond, cond_only.cond, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both.uncond, uncond_only.cond, atol=1e-5, rtol=1e-4)
    # scale 1 needs no unconditional branch: the trainer asks for none and the UNet sees B samples
    with UNetCalls(teacher.unet) as calls:
        teacher.predict_noise(x_t, t, teacher.condition(state, cameras(), with_unconditional=False))
    assert calls.batches == [4]


def test_v_prediction_is_converted_to_eps(sd_v_folder, tmp_path, state):
    teacher = make_teacher(sd_v_folder, tmp_path)
    assert teacher.prediction_type == "v_prediction"
    conditioning = teacher.condition(state, cameras(), with_unconditional=False)
    x_t, t = noisy(teacher)
    with torch.no_grad():
        v = teacher.unet(x_t, t, encoder_hidden_states=conditioning.cond).sample
    abar = scaled_linear_alphas_cumprod()[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * v + (1 - abar).sqrt() * x_t  # by hand: v = alpha eps - sigma x0
    torch.testing.assert_close(teacher.predict_noise(x_t, t, conditioning).cond, expected, atol=1e-5, rtol=1e-4)


def test_epsilon_model_output_is_returned_as_is(teacher, state):
    conditioning = teacher.condition(state, cameras(), with_unconditional=False)
    x_t, t = noisy(teacher)
    with torch.no_grad():
        eps = teacher.unet(x_t, t, encoder_hidden_states=conditioning.cond).sample
    torch.testing.assert_close(teacher.predict_noise(x_t, t, conditioning).cond, eps, atol=1e-6, rtol=1e-5)


def test_memory_options_keep_the_prediction(sd_folder, tmp_path, teacher, state):
    options = make_teacher(
        sd_folder, tmp_path, channels_last=True, attention_slicing=2, offload_text_encoder=True,
        offload_vae_decoder=True, free_text_encoder=False,
    )
    conditioning = teacher.condition(state, cameras())
    x_t, t = noisy(teacher)
    reference = teacher.predict_noise(x_t, t, conditioning)
    got = options.predict_noise(x_t, t, conditioning)
    torch.testing.assert_close(got.cond, reference.cond, atol=1e-5, rtol=1e-4)
    options.encode_prompt("a hamburger", "")
    assert options._text is not None  # kept: free_text_encoder=false
    options.to(torch.float16)  # precision follows the device: CPU stays float32
    assert options.compute_dtype == torch.float32 and all(p.dtype == torch.float32 for p in options.parameters())
    assert options.alphas_cumprod.dtype == torch.float32


# ------------------------------------------------------------------------------ Perp-Neg


def test_perpendicular_component_is_orthogonal():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    perp = perpendicular_component(x, y)
    inner = (perp * y).sum(dim=(1, 2, 3))
    assert inner.abs().max() < 1e-4 * (x.norm() * y.norm())
    torch.testing.assert_close(perpendicular_component(y, y), torch.zeros_like(y), atol=1e-5, rtol=0)
    # zero weights reduce Perp-Neg to plain CFG
    negatives = torch.randn(3, 2, 4, 8, 8, generator=generator)
    torch.testing.assert_close(perp_neg_cfg(y, x, negatives, torch.zeros(3, 2), 7.5), y + 7.5 * (x - y))


def test_perp_neg_plan_uses_threestudio_weights():
    labels = ["front", "front", "back", "overhead"]
    mix, negatives, weights = perp_neg_plan(torch.tensor([0.0, 45.0, 135.0, 10.0]), labels, PromptConfig())
    torch.testing.assert_close(mix[0], torch.tensor([0.0, 1.0, 0.0, 0.0]))  # pure front
    torch.testing.assert_close(mix[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))  # half side, half front
    torch.testing.assert_close(mix[2], torch.tensor([0.5, 0.0, 0.5, 0.0]))  # half side, half back
    assert negatives == [("front", "side"), ("front", "side"), ("side", "front"), ("negative", "negative")]
    # -f_fs(1) = -(4 e^-0.5 - 2.426) and -f_sf(0) = -(4 - 2.426); overhead views get no negatives
    torch.testing.assert_close(weights[0], torch.tensor([-(4 * torch.exp(torch.tensor(-0.5)).item() - 2.426), -1.574]))
    assert weights[3].abs().sum() == 0


def test_perp_neg_teacher_matches_the_formula(sd_folder, tmp_path, state):
    teacher = make_teacher(sd_folder, tmp_path, prompting={"perp_neg": True})
    conditioning = teacher.condition(state, cameras())
    payload = conditioning.cond
    assert isinstance(payload, PerpNegPayload) and payload.negatives.shape[:2] == (4, 2)
    x_t, t = noisy(teacher)
    with UNetCalls(teacher.unet) as calls:
        prediction = teacher.predict_noise(x_t, t, conditioning)
    assert calls.batches == [16]  # positive, uncond and two negatives per sample in one call

    def eps(embeddings):
        return teacher.predict_noise(x_t, t, Conditioning(embeddings, None, conditioning.view_labels)).cond

    negatives = torch.stack([eps(payload.negatives[:, k]) for k in range(2)], dim=1)
    expected = perp_neg_cfg(eps(payload.uncond), eps(payload.positive), negatives, payload.weights, 7.5)
    torch.testing.assert_close(prediction.cfg(7.5), expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ student


def test_student_starts_at_the_teacher_and_trains_only_lora_and_camera(sd_folder, tmp_path, state):
    teacher = make_teacher(sd_folder, tmp_path)
    student = teacher.make_student()
    names = [name for name, _ in student.named_parameters()]
    assert names and all(name.startswith(("lora.", "camera_embedding.")) for name in names)
    assert any("lora_A" in name for name in names) and any("to_out/0" in name for name in names)
    frozen = [p for n, p in teacher.unet.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in frozen) and all(p.requires_grad for p in student.parameters())

    cams = cameras()
    conditioning = teacher.condition(state, cams, with_unconditional=False)
    x_t, t = noisy(teacher)
    reference = teacher.predict_noise(x_t, t, conditioning).cond
    camera = student.camera_features(cams)
    eps = student(x_t, t, conditioning, camera)
    torch.testing.assert_close(eps, reference, atol=1e-6, rtol=1e-5)
    ((eps - torch.randn_like(eps)) ** 2).mean().backward()
    grads = {name: p.grad for name, p in student.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert grads["camera_embedding.2.weight"].abs().sum() > 0
    assert all(p.grad is None for p in frozen)


def test_student_checkpoint_round_trip_and_teacher_unaffected(sd_folder, tmp_path, state):
    teacher = make_teacher(sd_folder, tmp_path)
    student = teacher.make_student()
    cams = cameras()
    conditioning = teacher.condition(state, cams, with_unconditional=False)
    x_t, t = noisy(teacher)
    before = teacher.predict_noise(x_t, t, conditioning).cond
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    with torch.no_grad():
        trained = student(x_t, t, conditioning, student.camera_features(cams))
    assert not torch.allclose(trained, before, atol=1e-4)
    # the teacher's own calls never see the LoRA
    torch.testing.assert_close(teacher.predict_noise(x_t, t, conditioning).cond, before, atol=0, rtol=0)
    assert all(p.requires_grad for p in student.parameters())

    torch.save(student.state_dict(), tmp_path / "student.pt")
    state_dict = torch.load(tmp_path / "student.pt", weights_only=True)
    assert all(key.startswith(("lora.", "camera_embedding.")) for key in state_dict)
    other_teacher = make_teacher(sd_folder, tmp_path)
    other = other_teacher.make_student()
    other.load_state_dict(state_dict)
    with torch.no_grad():
        restored = other(x_t, t, conditioning, other.camera_features(cams))
    torch.testing.assert_close(restored, trained, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="already has a student"):
        other_teacher.make_student()


# ------------------------------------------------------------------------------ the CLI


def test_cli_runs_dreamfusion_sd_on_the_tiny_model(sd_folder, tmp_path):
    from lift3d.cli import main
    from lift3d.config import load_config

    out = tmp_path / "run"
    overrides = [
        f"teacher.model={sd_folder}", f"teacher.image_size={IMAGE}",
        f"teacher.prompting.cache_dir={tmp_path / 'cache'}",
        "trainer.steps=4", "trainer.cameras.width=16", "trainer.cameras.height=16", "trainer.eval.width=16",
        "trainer.eval.height=16", "trainer.eval.num_views=2", "trainer.log_every=1", "trainer.progress_bar=false",
        "representation.encoding.n_levels=4", "representation.encoding.log2_hashmap_size=12",
        "representation.hidden_dim=16", "representation.num_samples_per_ray=64", "representation.mesh_resolution=32",
        "export.formats=[glb]", "export.texture_size=32",
    ]
    config = str(ROOT / "configs" / "dreamfusion-sd.yaml")
    assert main(["run", config, "--prompt", "a hamburger", "--out", str(out), *overrides]) == 0
    assert (out / "ckpt" / "last.pt").is_file() and (out / "export" / "model.glb").is_file()
    assert (out / "ckpt" / "last.pt").stat().st_size < 5_000_000  # the frozen teacher is not saved
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert not any("eval/psnr" in m for m in metrics)  # no ground truth for a real teacher
    resolved = load_config(out / "config.yaml")  # the resolved teacher section loads back
    assert resolved.teacher.model == str(sd_folder) and resolved.teacher.prompting.front_threshold_deg == 45.0


def test_cli_runs_latent_nerf_sketch_shape_and_refinement_on_the_tiny_model(sd_folder, tmp_path):
    """Latent-NeRF renders the latents (no VAE encode), Sketch-Shape adds its loss, and the RGB
    refinement starts from the latent run's checkpoint and goes back through the VAE."""
    from lift3d.cli import main

    common = [
        f"teacher.model={sd_folder}", f"teacher.image_size={IMAGE}", f"teacher.prompting.cache_dir={tmp_path / 'cache'}",
        "teacher.dtype=float32", "trainer.steps=2", "trainer.eval.width=8", "trainer.eval.height=8",
        "trainer.eval.num_views=2", "trainer.log_every=1", "trainer.progress_bar=false",
        "representation.encoding.n_levels=4", "representation.encoding.log2_hashmap_size=12",
        "representation.hidden_dim=16", "representation.num_samples_per_ray=32", "representation.mesh_resolution=32",
        "export.formats=[glb]", "export.texture_size=32",
    ]
    latent_size = ["trainer.cameras.width=8", "trainer.cameras.height=8"]  # the tiny VAE's 8x8 latents
    sketch = ["representation.sketch_shape.grid_resolution=16", "representation.sketch_shape.surface_samples=2000",
              f"representation.sketch_shape.mesh={ROOT / 'configs' / 'sketches' / 'sphere-on-box.obj'}"]
    latent_run, sketch_run, refine_run = tmp_path / "latent", tmp_path / "sketch", tmp_path / "refine"
    assert main(["run", str(ROOT / "configs" / "latent-nerf.yaml"), "--out", str(latent_run), *common, *latent_size]) == 0
    assert main(["run", str(ROOT / "configs" / "sketch-shape.yaml"), "--out", str(sketch_run),
                 *common, *latent_size, *sketch]) == 0
    assert main(["run", str(ROOT / "configs" / "latent-nerf-refine.yaml"), "--out", str(refine_run),
                 f"representation.init_from={latent_run}", *common,
                 "trainer.cameras.width=16", "trainer.cameras.height=16"]) == 0
    for run in (latent_run, sketch_run, refine_run):
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
        assert (run / "export" / "model.glb").is_file()
    assert "reg/sketch_shape" in (sketch_run / "metrics.jsonl").read_text()
    assert "reg/sketch_shape" not in (latent_run / "metrics.jsonl").read_text()


def test_cli_runs_latent_paint_on_the_tiny_model(sd_folder, tmp_path):
    """Latent-Paint: a latent UV texture on the given mesh, judged as latents, exported as a GLB."""
    from lift3d.cli import main

    out = tmp_path / "paint"
    assert main([
        "run", str(ROOT / "configs" / "latent-paint.yaml"), "--out", str(out),
        f"representation.path={ROOT / 'configs' / 'sketches' / 'sphere-on-box.obj'}",
        "representation.texture_resolution=16", f"teacher.model={sd_folder}", f"teacher.image_size={IMAGE}",
        f"teacher.prompting.cache_dir={tmp_path / 'cache'}", "teacher.dtype=float32", "trainer.steps=2",
        "trainer.cameras.width=8", "trainer.cameras.height=8", "trainer.eval.width=8", "trainer.eval.height=8",
        "trainer.eval.num_views=2", "trainer.log_every=1", "trainer.progress_bar=false", "export.formats=[glb]",
    ]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    state = torch.load(out / "ckpt" / "last.pt", weights_only=True)["representation"]
    assert state["texture"].shape == (1, 16, 16, 4) and state["texture"].abs().sum() > 0  # painted
    assert (out / "export" / "model.glb").is_file()
