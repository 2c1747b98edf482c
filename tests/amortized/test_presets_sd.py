"""The Stable Diffusion presets train a few steps on the tiny random SD; CLIP eval on a tiny random CLIP."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "teachers"))
from tiny_diffusers import clip_tokenizer, one_thread, save_tiny_sd  # noqa: E402, F401

from lift3d.amortized.clip_eval import clip_scores, load_clip  # noqa: E402
from lift3d.amortized.train import AmortizedTrainer, load_amortized_config  # noqa: E402
from lift3d.batch import Shard  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
TINY = {
    "att3d-hyper-ingp": ["generator.nerf.encoding.n_levels=4", "generator.nerf.encoding.log2_hashmap_size=12",
                         "generator.nerf.hidden_dim=16", "generator.hyper_hidden=8"],
    "scaledreamer-3dconv": ["generator.base_resolution=2", "generator.upsample=1", "generator.channels=4",
                            "generator.volume_channels=4", "generator.decoder_hidden=8"],
    "scaledreamer-triplane": ["generator.width=16", "generator.layers=1", "generator.heads=2",
                              "generator.query_resolution=4", "generator.plane_channels=4", "generator.decoder_hidden=8"],
}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip") / "clip"
    tokenizer = clip_tokenizer(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                     "num_hidden_layers": 1, "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                       "image_size": 16, "patch_size": 8},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("preset", sorted(TINY))
def test_sd_preset_trains_on_tiny_sd(preset, sd_folder, clip_folder, tmp_path):
    overrides = [
        f"teacher.model={sd_folder}", "teacher.image_size=16", "teacher.dtype=float32", "trainer.steps=2",
        "trainer.cameras.width=8", "trainer.cameras.height=8", "trainer.eval.width=8", "trainer.eval.height=8",
        "trainer.eval.num_views=2", "trainer.eval_prompts=3", f"trainer.clip_model={clip_folder}",
        f"trainer.embedding_cache={tmp_path / 'cache'}", "trainer.progress_bar=false", "trainer.device=cpu",
        "generator.nerf.num_samples_per_ray=16", "generator.nerf.mesh_resolution=16",
        "generator.nerf.occupancy.resolution=8", *TINY[preset],
    ]
    config = load_amortized_config(REPO / "configs" / f"{preset}.yaml", overrides)
    trainer = AmortizedTrainer(config, run_dir=tmp_path / "run", shard=Shard())
    before = [p.detach().clone() for p in trainer.generator.parameters()]
    metrics = trainer.fit()
    assert trainer.step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.generator.parameters()))
    assert 0.0 <= metrics["eval/clip_r_at_1_seen"] <= 1.0 and -1.0 <= metrics["eval/clip_similarity_seen"] <= 1.0
    # The corpus embeddings are memory-mapped CLIP hidden states, keyed by the model.
    cached = list((tmp_path / "cache").glob("*.npy"))
    assert len(cached) == 1
    expected = trainer.teacher.text_embedding(trainer.train_prompts[:1]).cpu()
    torch.testing.assert_close(trainer.embeddings(trainer.train_prompts[:1]), expected)


def test_clip_scores_match_a_direct_computation(clip_folder):
    from lift3d.amortized.clip_eval import CLIP_MEAN, CLIP_STD, _features

    model, tokenizer = load_clip(str(clip_folder))
    prompts = ["a cat", "a dog", "a car"]
    torch.manual_seed(0)
    renders = [torch.rand(2, 16, 16, 3) for _ in prompts]  # at CLIP's own size: no resampling
    scores = clip_scores(model, tokenizer, renders, prompts)
    with torch.no_grad():
        tokens = tokenizer(prompts, padding="max_length", return_tensors="pt")
        text = torch.nn.functional.normalize(_features(model.get_text_features(**tokens)), dim=-1)
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        similarity, hits = 0.0, 0
        for i, views in enumerate(renders):
            pixels = (views.permute(0, 3, 1, 2) - mean) / std
            image = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
            similarity += float((image @ text[i]).mean()) / len(prompts)
            hits += int(int((text @ image.mean(0)).argmax()) == i)
    assert scores["similarity"] == pytest.approx(similarity, abs=1e-4)
    assert scores["r_at_1"] == pytest.approx(hits / len(prompts))
    with pytest.raises(FileNotFoundError, match="clip_model"):
        load_clip(str(clip_folder / "missing"))
