"""ScaleDreamer's evaluation of amortized generators with real teachers: CLIP similarity and R@1.

Per prompt: the mean cosine similarity between its rendered views and its text (``similarity``),
and whether, with the views' mean image embedding, the prompt's own text is the most similar of
all the evaluated prompts (``r_at_1``); both averaged over prompts. ScaleDreamer uses CLIP
ViT-L/14 (``openai/clip-vit-large-patch14``); the model is a config choice
(``trainer.clip_model``), loaded from the local Hugging Face cache or a folder.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's image normalisation."""


def load_clip(model: str, allow_download: bool = False) -> tuple[Any, Any]:
    """(CLIPModel in eval mode, its tokenizer) from a folder or a cached hub id."""
    from transformers import CLIPModel, CLIPTokenizer

    try:
        clip = CLIPModel.from_pretrained(model, local_files_only=not allow_download)
        tokenizer = CLIPTokenizer.from_pretrained(model, local_files_only=not allow_download)
    except OSError as error:
        raise FileNotFoundError(f"CLIP model {model!r} is not available locally ({error}); download it with "
                                f"`huggingface-cli download {model}` or set trainer.clip_model to a folder") from None
    return clip.eval(), tokenizer


def _features(output: Any) -> Tensor:
    """Projected features: transformers 4 returns the tensor, 5 an output whose pooler_output holds it."""
    return output if isinstance(output, Tensor) else output.pooler_output


def text_features(model: Any, tokenizer: Any, prompts: list[str]) -> Tensor:
    """[P, E] unit CLIP text embeddings."""
    device = next(model.parameters()).device
    tokens = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").to(device)
    return F.normalize(_features(model.get_text_features(**tokens)), dim=-1)


def image_features(model: Any, pixels: Tensor) -> Tensor:
    """[V, E] unit CLIP image embeddings of normalised pixels [V, 3, S, S]."""
    return F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)


@torch.no_grad()
def clip_scores(model: Any, tokenizer: Any, renders: list[Tensor], prompts: list[str]) -> dict[str, float]:
    """``similarity`` and ``r_at_1`` of renders (one [V, H, W, 3] tensor in [0, 1] per prompt)."""
    if len(renders) != len(prompts):
        raise ValueError(f"{len(renders)} render sets for {len(prompts)} prompts")
    device = next(model.parameters()).device
    size = model.config.vision_config.image_size
    text = text_features(model, tokenizer, prompts)  # [P, E]
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    similarities, hits = [], []
    for index, views in enumerate(renders):
        pixels = F.interpolate(views.permute(0, 3, 1, 2).float().to(device), size=(size, size), mode="bicubic",
                               align_corners=False).clamp(0, 1)
        image = image_features(model, (pixels - mean) / std)  # [V, E]
        similarities.append(float((image @ text[index]).mean()))
        pooled = F.normalize(image.mean(0), dim=-1)
        hits.append(float(int((text @ pooled).argmax()) == index))
    return {"similarity": sum(similarities) / len(similarities), "r_at_1": sum(hits) / len(hits)}
