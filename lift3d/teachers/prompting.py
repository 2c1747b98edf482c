"""Prompt processing for text-conditioned teachers (Stable Diffusion, DeepFloyd IF).

- View-dependent prompts: each camera gets ``"{prompt}, front view"`` (side/back/overhead) by
  threestudio's rule (side by default; front if |azimuth| < front threshold; back if |azimuth| >
  180 - back threshold; overhead if elevation > overhead threshold; later rules win).
- Negative prompts: the unconditional branch is the negative prompt ("" = truly unconditional),
  without a view suffix, as in threestudio.
- Perp-Neg (Armandpour et al., arXiv 2304.04968), threestudio's variant: the positive embedding
  interpolates neighbouring view prompts and the other views act as negatives whose noise
  directions are projected perpendicular to the positive one (:func:`perp_neg_cfg`).
- An on-disk embedding cache keyed by model, text-encoder config and prompt; a corrupt entry is
  rebuilt, never trusted.
- Injected embeddings (a file of ``{text: [L, D] tensor}``), so a teacher can run without a
  tokenizer or text encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lift3d.cameras import Cameras, wrap_azimuth
from lift3d.teachers.base import Conditioning

logger = logging.getLogger(__name__)

VIEWS = ("side", "front", "back", "overhead")
"""View labels in threestudio's direction order (side is the default)."""
CACHE_FORMAT = 1
"""Version of the cache entry layout; bump it to invalidate every entry."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lift3d/embeddings``, i.e. ``~/.cache/lift3d/embeddings`` by default."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root).expanduser() / "lift3d" / "embeddings"


@dataclass
class PromptConfig:
    """How a text teacher turns the run's prompt into per-camera embeddings."""

    side_template: str = "{prompt}, side view"
    """Prompt for side views (the default label); ``{prompt}`` is replaced by the run's prompt."""
    front_template: str = "{prompt}, front view"
    """Prompt for front views (threestudio's ``view_dependent_prompt_front`` uses "front view of {prompt}")."""
    back_template: str = "{prompt}, back view"
    """Prompt for back views."""
    overhead_template: str = "{prompt}, overhead view"
    """Prompt for overhead views."""
    front_threshold_deg: float = 45.0
    """Views with |azimuth| below this are front views (ProlificDreamer uses 30)."""
    back_threshold_deg: float = 45.0
    """Views with |azimuth| above 180 minus this are back views."""
    overhead_threshold_deg: float = 60.0
    """Views with elevation above this are overhead views."""
    perp_neg: bool = False
    """Perp-Neg: interpolate view prompts and push away from the other views perpendicular to the
    positive direction (4 UNet branches per sample instead of 2; needs view-dependent prompts)."""
    perp_neg_f_sb: tuple[float, float, float] = (1.0, 0.5, -0.606)
    """(a, b, c) of the side-back negative weight a exp(-b r) + c (threestudio's defaults)."""
    perp_neg_f_fsb: tuple[float, float, float] = (1.0, 0.5, 0.967)
    """(a, b, c) of the front negative weight in the side-back sector."""
    perp_neg_f_fs: tuple[float, float, float] = (4.0, 0.5, -2.426)
    """(a, b, c) of the front negative weight in the front-side sector."""
    perp_neg_f_sf: tuple[float, float, float] = (4.0, 0.5, -2.426)
    """(a, b, c) of the side negative weight in the front-side sector."""
    cache: bool = True
    """Keep text embeddings on disk so later runs skip the text encoder."""
    cache_dir: str = ""
    """Folder of the embedding cache ("" = ``~/.cache/lift3d/embeddings``, or under ``$XDG_CACHE_HOME``)."""
    prompt_embeds_path: str = ""
    """A ``torch.save``'d ``{text: [L, D] tensor}`` file consulted before the text encoder; with it
    the model folder needs no tokenizer or text encoder (see ``DiffusersTeacher.prompt_texts``)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        for view in VIEWS:
            template = getattr(self, f"{view}_template")
            if "{prompt}" not in template:
                raise ValueError(f"teacher.prompting.{view}_template must contain {{prompt}}, got {template!r}")
        if not 0.0 <= self.front_threshold_deg <= 180.0 or not 0.0 <= self.back_threshold_deg <= 180.0:
            raise ValueError("teacher.prompting front/back thresholds must lie in [0, 180] degrees")

    def template(self, view: str) -> str:
        return getattr(self, f"{view}_template")

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


def view_prompts(prompt: str, config: PromptConfig) -> dict[str, str]:
    """The prompt of every view label, e.g. ``{"front": "a hamburger, front view", ...}``."""
    return {view: config.template(view).replace("{prompt}", prompt) for view in VIEWS}


@dataclass
class TextPromptState:
    """What a text teacher's ``encode_prompt`` returns: every embedding a run needs, [L, D] each."""

    prompt: str
    """The prompt as given."""
    negative_prompt: str
    """The negative prompt as given ("" = unconditional)."""
    base: Tensor
    """[L, D] embedding of the prompt itself (view-independent conditioning)."""
    views: dict[str, Tensor]
    """View label -> [L, D] embedding of the view prompt."""
    negative: Tensor
    """[L, D] embedding of the negative prompt (the unconditional branch)."""

    def to(self, device: torch.device | str) -> "TextPromptState":
        return TextPromptState(
            self.prompt, self.negative_prompt, self.base.to(device),
            {view: embedding.to(device) for view, embedding in self.views.items()}, self.negative.to(device),
        )


@dataclass
class PerpNegPayload:
    """The conditional payload of a Perp-Neg batch (the teacher folds it into one eps)."""

    positive: Tensor
    """[B, L, D] interpolated view embeddings."""
    uncond: Tensor
    """[B, L, D] unconditional (negative-prompt) embeddings, needed even when CFG's uncond is not."""
    negatives: Tensor
    """[B, K, L, D] embeddings of the K negative views."""
    weights: Tensor
    """[B, K] Perp-Neg weights (<= 0 push away; 0 = ignore)."""


# -------------------------------------------------------------------------- Perp-Neg math


def perpendicular_component(x: Tensor, y: Tensor) -> Tensor:
    """The part of ``x`` perpendicular to ``y``, per sample over all non-batch dims.

    ``x - <x, y> / max(|y|^2, 1e-6) y`` (threestudio's ``perpendicular_component``).
    """
    dims = tuple(range(1, x.dim()))
    projection = (x * y).sum(dim=dims, keepdim=True) / (y * y).sum(dim=dims, keepdim=True).clamp_min(1e-6)
    return x - projection * y


def perp_neg_cfg(
    eps_uncond: Tensor, eps_positive: Tensor, eps_negatives: Tensor, weights: Tensor, guidance_scale: float
) -> Tensor:
    """Perp-Neg guidance ``eps_u + s (e_pos + sum_k w_k perp(e_k, e_pos))`` [B, ...].

    Args:
        eps_uncond: eps of the unconditional branch [B, ...].
        eps_positive: eps of the (interpolated) positive prompt [B, ...].
        eps_negatives: eps of the K negative prompts [B, K, ...].
        weights: [B, K] negative weights (threestudio's are <= 0).
        guidance_scale: s, diffusers convention (s = 1 and no negatives gives ``eps_positive``).
    With ``guidance_scale = 1`` this is the effective conditional eps the teacher returns, so any
    guidance's ``NoisePrediction.cfg(s)`` reproduces Perp-Neg at scale s.
    """
    if eps_negatives.shape[:2] != weights.shape or eps_negatives.shape[2:] != eps_positive.shape[1:]:
        raise ValueError(
            f"eps_negatives {tuple(eps_negatives.shape)} and weights {tuple(weights.shape)}"
            " must be [B, K, ...] and [B, K]"
        )
    e_positive = eps_positive - eps_uncond
    accumulated = torch.zeros_like(e_positive)
    shape = (-1,) + (1,) * (e_positive.dim() - 1)
    for k in range(weights.shape[1]):
        e_negative = eps_negatives[:, k] - eps_uncond
        accumulated = accumulated + weights[:, k].to(e_positive.dtype).view(shape) * perpendicular_component(
            e_negative, e_positive
        )
    return eps_uncond + guidance_scale * (e_positive + accumulated)


def shifted_exponential_decay(a: float, b: float, c: float, r: float) -> float:
    """``a exp(-b r) + c`` (threestudio's ``shifted_expotional_decay``)."""
    return a * math.exp(-b * r) + c


def perp_neg_plan(
    azimuth_deg: Tensor, labels: list[str], config: PromptConfig
) -> tuple[Tensor, list[tuple[str, str]], Tensor]:
    """Per-sample Perp-Neg recipe in terms of view labels (threestudio's ``get_text_embeddings_perp_neg``).

    Returns ``(mix, negatives, weights)``: ``mix`` [B, 4] coefficients over ``VIEWS`` of the
    positive embedding; ``negatives`` the two negative views per sample ("negative" names the
    negative-prompt embedding, used with zero weight for overhead views); ``weights`` [B, 2].
    - front-side (|azimuth| < 90): r = 1 - |az|/90, positive r front + (1 - r) side, negatives
      (front, side) with weights (-f_fs(r), -f_sf(1 - r));
    - side-back: r = 2 - |az|/90, positive r side + (1 - r) back, negatives (side, front) with
      weights (-f_sb(r), -f_fsb(r));
    - overhead: the overhead prompt, no negatives.
    """
    index = {view: i for i, view in enumerate(VIEWS)}
    azimuth = wrap_azimuth(azimuth_deg.detach().float().cpu()).abs().tolist()
    mix = torch.zeros(len(labels), len(VIEWS))
    negatives: list[tuple[str, str]] = []
    weights = torch.zeros(len(labels), 2)
    for i, (label, az) in enumerate(zip(labels, azimuth)):
        if label == "overhead":
            mix[i, index["overhead"]] = 1.0
            negatives.append(("negative", "negative"))
        elif az < 90.0:
            r = 1.0 - az / 90.0
            mix[i, index["front"]], mix[i, index["side"]] = r, 1.0 - r
            negatives.append(("front", "side"))
            weights[i, 0] = -shifted_exponential_decay(*config.perp_neg_f_fs, r)
            weights[i, 1] = -shifted_exponential_decay(*config.perp_neg_f_sf, 1.0 - r)
        else:
            r = 2.0 - az / 90.0
            mix[i, index["side"]], mix[i, index["back"]] = r, 1.0 - r
            negatives.append(("side", "front"))
            weights[i, 0] = -shifted_exponential_decay(*config.perp_neg_f_sb, r)
            weights[i, 1] = -shifted_exponential_decay(*config.perp_neg_f_fsb, r)
    return mix, negatives, weights


# ------------------------------------------------------------------------ conditioning


def text_conditioning(
    state: TextPromptState, cameras: Cameras, config: PromptConfig, view_dependent: bool, with_unconditional: bool
) -> Conditioning:
    """Per-camera embeddings: the view prompt (or the plain prompt), the negative prompt, or Perp-Neg.

    View-dependent conditionings also carry ``view_independent`` ([B, L, D] of the plain prompt),
    which VSD-type students use instead (threestudio's LoRA sees view-independent text).
    """
    labels = cameras.view_labels(config.front_threshold_deg, config.back_threshold_deg, config.overhead_threshold_deg)
    B = len(cameras)
    negative = state.negative.unsqueeze(0).expand(B, -1, -1)
    base = state.base.unsqueeze(0).expand(B, -1, -1)
    uncond = negative if with_unconditional else None
    if not view_dependent:
        return Conditioning(cond=base, uncond=uncond, view_labels=labels)
    if not config.perp_neg:
        cond = torch.stack([state.views[label] for label in labels])
        return _with_view_independent(Conditioning(cond=cond, uncond=uncond, view_labels=labels), base)
    mix, negative_views, weights = perp_neg_plan(cameras.azimuth_deg, labels, config)
    stacked = torch.stack([state.views[view] for view in VIEWS])  # [4, L, D]
    positive = torch.einsum("bv,vld->bld", mix.to(stacked), stacked)
    table = {**state.views, "negative": state.negative}
    negatives = torch.stack([torch.stack([table[a], table[b]]) for a, b in negative_views])
    payload = PerpNegPayload(positive, negative, negatives, weights.to(stacked.device))
    return _with_view_independent(Conditioning(cond=payload, uncond=uncond, view_labels=labels), base)


def _with_view_independent(conditioning: Conditioning, base: Tensor) -> Conditioning:
    # An optional attribute (read with getattr by the student objectives), not a Conditioning field yet.
    conditioning.view_independent = base
    return conditioning


def positive_embeddings(conditioning: Conditioning) -> Tensor:
    """[B, L, D] conditional embeddings of a text conditioning (the positive one under Perp-Neg)."""
    cond = conditioning.cond
    return cond.positive if isinstance(cond, PerpNegPayload) else cond


# ------------------------------------------------------------------------ embedding cache


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class EmbeddingCache:
    """Text embeddings on disk, one file per (identity, text); ``directory=None`` disables it.

    ``identity`` is anything JSON-able that pins the encoder (model folder, weight-file stats,
    text-encoder and tokenizer config, dtype): a change gives new keys. Entries are written
    atomically and checked on read (key, text, shape, finiteness); a bad entry counts as
    ``rebuilt`` and is overwritten by the caller's fresh embedding.
    """

    def __init__(self, directory: Path | None, identity: Any):
        self.directory = directory
        self.identity = _digest({"format": CACHE_FORMAT, "identity": identity})
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def key(self, text: str) -> str:
        return _digest({"identity": self.identity, "text": text})

    def path(self, text: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{self.key(text)}.pt"

    def load(self, text: str, shape: tuple[int, ...] | None = None) -> Tensor | None:
        """The cached [L, D] float32 embedding of ``text``, or None (absent or corrupt)."""
        if self.directory is None:
            return None
        path = self.path(text)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a torn or foreign file fails in many ways; all mean "rebuild"
            return self._corrupt(path, f"unreadable ({type(error).__name__})")
        if not isinstance(entry, dict) or entry.get("key") != self.key(text) or entry.get("text") != text:
            return self._corrupt(path, "wrong key")
        embedding = entry.get("embedding")
        if not isinstance(embedding, Tensor) or embedding.dim() != 2 or embedding.dtype != torch.float32:
            return self._corrupt(path, "not a float32 [L, D] tensor")
        if shape is not None and tuple(embedding.shape) != tuple(shape):
            return self._corrupt(path, f"shape {tuple(embedding.shape)} != {tuple(shape)}")
        if not torch.isfinite(embedding).all():
            return self._corrupt(path, "non-finite values")
        self.hits += 1
        return embedding

    def store(self, text: str, embedding: Tensor) -> None:
        """Write the entry atomically (temp file + rename); a read-only cache only logs."""
        if self.directory is None:
            return
        entry = {"key": self.key(text), "text": text, "embedding": embedding.detach().float().cpu().contiguous()}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            os.close(handle)
            torch.save(entry, temporary)
            os.replace(temporary, self.path(text))
        except OSError as error:
            logger.warning("could not write the embedding cache in %s: %s", self.directory, error)

    def _corrupt(self, path: Path, why: str) -> None:
        logger.warning("embedding cache entry %s is %s; rebuilding it", path.name, why)
        self.misses += 1
        self.rebuilt += 1
        return None


# ------------------------------------------------------------------------ injected embeddings


def save_prompt_embeddings(path: str | Path, embeddings: dict[str, Tensor]) -> None:
    """Write ``{text: [L, D] tensor}`` for ``PromptConfig.prompt_embeds_path``."""
    torch.save({text: e.detach().float().cpu().contiguous() for text, e in embeddings.items()}, Path(path))


def load_prompt_embeddings(path: str | Path) -> dict[str, Tensor]:
    """Read a ``{text: [L, D] tensor}`` file ([1, L, D] tensors are squeezed); ``ValueError`` if malformed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"teacher.prompting.prompt_embeds_path: {str(path)!r} does not exist")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of text -> [L, D] tensor")
    embeddings = {}
    for text, embedding in data.items():
        if not isinstance(text, str) or not isinstance(embedding, Tensor):
            raise ValueError(
                f"{path}: expected a mapping of text -> [L, D] tensor,"
                f" got {type(text).__name__} -> {type(embedding).__name__}"
            )
        if embedding.dim() == 3 and embedding.shape[0] == 1:
            embedding = embedding[0]
        if embedding.dim() != 2:
            raise ValueError(f"{path}: embedding of {text!r} has shape {tuple(embedding.shape)}, expected [L, D]")
        embeddings[text] = embedding.float()
    return embeddings
