"""Stable Diffusion 1.x / 2.x as a teacher (diffusers), and what it shares with other diffusers teachers.

``DiffusersTeacher`` holds the parts every text-conditioned diffusers UNet teacher shares:
resolving ``teacher.model`` (a local diffusers folder, or a hub id read from the local Hugging
Face cache only unless ``allow_download``), the noise schedule and prediction type of its
scheduler, prompt processing (view-dependent prompts, negative prompt, Perp-Neg, the embedding
cache, injected embeddings), one batched UNet call for both CFG branches, eps/v/x0 outputs
converted to eps, device-dependent precision, and the VSD student (LoRA + camera embedding).
``StableDiffusionTeacher`` adds the VAE: differentiable encode of renders to latents, decode.
"""

from __future__ import annotations

import gc
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lift3d.cameras import Cameras
from lift3d.registry import register
from lift3d.teachers.base import Conditioning, NoisePrediction, Teacher
from lift3d.teachers.prompting import (
    EmbeddingCache,
    PerpNegPayload,
    PromptConfig,
    TextPromptState,
    load_prompt_embeddings,
    perp_neg_cfg,
    positive_embeddings,
    text_conditioning,
    view_prompts,
)

logger = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
"""What a hub repository id looks like (``org/name``); anything else is taken as a local path."""
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TEXT_COMPONENTS = ("text_encoder", "tokenizer")
STUDENT_ADAPTER = "lift3d_student"
"""peft adapter name of the VSD student's LoRA."""
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""UNet attention projections that carry the student's LoRA."""


class ModelNotFoundError(FileNotFoundError):
    """A teacher model that is missing or incomplete; the message says how to get it."""


# ------------------------------------------------------------------------------ model folders


def hub_cache_folder(cache_dir: str | None = None) -> str:
    """The Hugging Face hub cache in use (``$HF_HOME/hub`` unless overridden)."""
    if cache_dir:
        return str(Path(cache_dir).expanduser())
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _has_weights(folder: Path, variant: str | None) -> bool:
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.name.endswith(WEIGHT_SUFFIXES) and path.is_file():  # is_file follows hub symlinks
            if variant is None or f".{variant}." in path.name or f".{variant}-" in path.name:
                return True
    return False


def missing_components(folder: Path, components: tuple[str, ...], variant: str | None = None) -> list[str]:
    """Which of ``components`` (diffusers subfolders) are absent or hold no config/weights."""
    missing = []
    for name in components:
        sub = folder / name
        if name == "scheduler":
            present = (sub / "scheduler_config.json").is_file()
        elif name == "tokenizer":
            present = sub.is_dir() and any(path.is_file() for path in sub.iterdir())
        else:
            present = (sub / "config.json").is_file() and _has_weights(sub, variant)
        if not present:
            missing.append(f"{name}/")
    return missing


def _download_patterns(components: tuple[str, ...], variant: str | None) -> tuple[list[str], list[str]]:
    """Only the subfolders a teacher loads, safetensors only, one precision variant."""
    allow = ["model_index.json"]
    for name in components:
        if name in ("scheduler", "tokenizer"):
            allow.append(f"{name}/*")
        elif variant:
            allow += [f"{name}/config.json", f"{name}/*.{variant}*.safetensors", f"{name}/*.safetensors.index.{variant}.json"]
        else:
            allow += [f"{name}/config.json", f"{name}/*.safetensors", f"{name}/*.safetensors.index.json"]
    ignore = [] if variant else ["*.fp16.*", "*.fp16-*", "*.non_ema.*"]
    return allow, ignore


def resolve_model_folder(
    model: str,
    components: tuple[str, ...],
    family: str,
    allow_download: bool = False,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | None = None,
    access_hint: str = "",
) -> Path:
    """A local folder holding ``components`` of ``model`` (a diffusers folder or a hub id).

    Hub ids are read from the local cache only (``local_files_only``) unless ``allow_download``.
    Raises ``ModelNotFoundError`` with one message naming the model, the cache folder and how to
    fetch it (or which local path to pass).
    """
    local_hint = "or pass a local diffusers folder as teacher.model=PATH"
    if not model.strip():
        raise ModelNotFoundError(f"teacher.model is empty: give a hub id or a local {family} diffusers folder")
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"teacher.model={model!r} is a file; pass a {family} diffusers folder")
        missing = missing_components(path, components, variant)
        if missing:
            raise ModelNotFoundError(
                f"{family} model folder {str(path)!r} is incomplete: missing {', '.join(missing)}"
                f"{f' (variant {variant!r})' if variant else ''}; pass a complete diffusers folder"
                f" (model_index.json with {', '.join(components)}/)"
            )
        return path
    if not HUB_ID.match(model):
        raise ModelNotFoundError(
            f"{family} model folder {model!r} does not exist; pass an existing diffusers folder or a hub id"
        )

    from huggingface_hub import snapshot_download

    cache = hub_cache_folder(cache_dir)
    options = f" --revision {revision}" if revision else ""
    fetch = f"`hf download {model}{options}` (`huggingface-cli download {model}{options}` before huggingface_hub 1.0)"
    hint = f" {access_hint}" if access_hint else ""
    allow, ignore = _download_patterns(components, variant)
    try:
        folder = Path(snapshot_download(
            model, revision=revision, cache_dir=cache_dir, local_files_only=not allow_download,
            allow_patterns=allow, ignore_patterns=ignore,
        ))
    except (OSError, ValueError) as error:  # LocalEntryNotFoundError and HTTP errors are OSErrors
        if not allow_download:
            raise ModelNotFoundError(
                f"{family} model {model!r} is not in the local Hugging Face cache ({cache}; HF_HOME moves it)"
                f" and downloads are off. Fetch it once with {fetch} or set teacher.allow_download=true,"
                f" {local_hint}.{hint}"
            ) from None
        raise ModelNotFoundError(
            f"could not download {family} model {model!r} into {cache}: {error}. Check the id and your network,"
            f" fetch it with {fetch}, {local_hint}.{hint}"
        ) from None
    missing = missing_components(folder, components, variant)
    if missing:
        raise ModelNotFoundError(
            f"{family} model {model!r} is incomplete in the Hugging Face cache ({folder}): missing"
            f" {', '.join(missing)}. Fetch it with {fetch}"
            f"{'' if allow_download else ' or set teacher.allow_download=true'}, {local_hint}.{hint}"
        )
    return folder


def _load_component(loader: Any, folder: Path, name: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(folder/name)`` with load failures turned into one clear error."""
    try:
        return loader.from_pretrained(str(folder / name), local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelNotFoundError(f"could not load {name}/ of {folder}: {error}") from None


def _transformers_dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers 4.56+ calls it ``dtype``; older versions ``torch_dtype``."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _stat(folder: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of the weight files in ``folder``: part of the embedding-cache identity."""
    if not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.iterdir()):
        if path.name.endswith(WEIGHT_SUFFIXES) and path.is_file():
            stat = path.stat()
            entries.append((path.name, stat.st_size, stat.st_mtime_ns))
    return entries


def _read_json(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ configs


@dataclass
class DiffusersTeacherConfig:
    """Options shared by the diffusers UNet teachers."""

    model: str = ""
    """Hub id (read from the local Hugging Face cache) or a local diffusers model folder."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub id; unset = main."""
    variant: str | None = None
    """Weight-file variant to load, e.g. ``fp16`` (smaller downloads); unset = the full-precision files."""
    allow_download: bool = False
    """Let a hub id missing from the cache be downloaded (off: fail with how to fetch it)."""
    hub_cache_dir: str | None = None
    """Hugging Face hub cache folder (unset = ``$HF_HOME/hub``)."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Precision of the weights on a GPU, applied when the teacher moves there (``.to(device)``, as the
    trainer does); on CPU the teacher always runs float32."""
    prediction_type: Literal["auto", "epsilon", "v_prediction", "sample"] = "auto"
    """What the UNet predicts; ``auto`` reads the scheduler config. ``predict_noise`` always returns eps."""
    channels_last: bool = False
    """Store the UNet in channels-last memory format (faster convolutions on recent GPUs)."""
    attention_slicing: int = 0
    """Compute attention in this many slices to save memory (0 = off: one fused SDPA call)."""
    offload_text_encoder: bool = False
    """Run the text encoder on the CPU in float32, so it never takes GPU memory."""
    free_text_encoder: bool = True
    """Drop the text encoder once the prompt embeddings exist (reloaded only for new prompts)."""
    prompting: PromptConfig = field(default_factory=PromptConfig)
    """View-dependent prompts, Perp-Neg, the embedding cache and injected embeddings."""
    student_lora_rank: int = 4
    """Rank of the VSD student's LoRA on the UNet attention projections (to_q/to_k/to_v/to_out.0)."""
    student_lora_alpha: float = 0.0
    """LoRA alpha (0 = the rank, i.e. scale 1)."""
    student_camera_dim: int = 16
    """Input size of the student's camera embedding (the flattened 4x4 c2w)."""
    student_camera_hidden: int = 0
    """Hidden width of the camera-embedding MLP (0 = the UNet's time-embedding width, as threestudio)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if self.attention_slicing < 0:
            raise ValueError(f"teacher.attention_slicing must be >= 0, got {self.attention_slicing}")
        if self.student_lora_rank < 1 or self.student_camera_dim < 1 or self.student_camera_hidden < 0:
            raise ValueError(
                "teacher.student_lora_rank and student_camera_dim must be positive, student_camera_hidden >= 0"
            )
        self.prompting.validate()


@dataclass
class StableDiffusionTeacherConfig(DiffusersTeacherConfig):
    """Stable Diffusion 1.x / 2.x (epsilon or v-prediction) from diffusers."""

    model: str = "stabilityai/stable-diffusion-2-1-base"
    """Hub id (read from the local Hugging Face cache) or a local diffusers model folder."""
    image_size: int = 512
    """Renders are resized (bilinear) to this square size before the VAE; latents are 1/8 of it."""
    encode_mode: Literal["sample", "mean"] = "sample"
    """Take a sample of the VAE posterior (threestudio) or its mean."""
    offload_vae_decoder: bool = False
    """Keep the VAE decoder on the CPU between ``decode`` calls (it is not needed for SDS)."""

    def validate(self) -> None:
        super().validate()
        if self.image_size < 8:
            raise ValueError(f"teacher.image_size must be at least 8, got {self.image_size}")


# ------------------------------------------------------------------------------ the shared teacher


@dataclass
class _TextModels:
    """The tokenizer and text encoder, loaded only when an embedding must be computed."""

    tokenizer: Any
    encoder: nn.Module
    device: torch.device


class DiffusersTeacher(Teacher):
    """A frozen diffusers ``UNet2DConditionModel`` conditioned on text embeddings.

    Subclasses name their model ``FAMILY`` and ``IMAGE_COMPONENTS`` and implement the sample
    space (``channels``, ``encode_images``, ``decode``) and ``_encode_text``.
    """

    FAMILY = "diffusers"
    IMAGE_COMPONENTS: tuple[str, ...] = ()
    """Model subfolders besides unet/, scheduler/ and the text ones (e.g. vae/)."""
    ACCESS_HINT = ""
    """Extra words for the missing-model message (e.g. a gated licence)."""
    UNET_CLASS = "UNet2DConditionModel"
    """diffusers class of unet/ (``UNet3DConditionModel`` for text-to-video teachers)."""
    SCHEDULER_CLASS = "DDPMScheduler"
    """diffusers class that reads scheduler/ (its ``alphas_cumprod`` is the noise schedule)."""
    TEXT_MODEL_COMPONENTS: tuple[str, ...] = TEXT_COMPONENTS
    """Subfolders of the text encoder (none for image-conditioned teachers)."""

    def __init__(self, config: DiffusersTeacherConfig):
        super().__init__()
        try:
            import diffusers
        except ImportError:
            raise ImportError(
                f"the {self.FAMILY} teacher needs diffusers and transformers: pip install lift3d[diffusers]"
            ) from None

        self.config = config
        config.validate()
        self._ready = False
        self._injected: dict[str, Tensor] = {}
        prompting = config.prompting
        if prompting.prompt_embeds_path:
            self._injected = load_prompt_embeddings(prompting.prompt_embeds_path)
        text_components = () if prompting.prompt_embeds_path else self.TEXT_MODEL_COMPONENTS
        self.model_folder = resolve_model_folder(
            config.model, ("unet", "scheduler", *self.IMAGE_COMPONENTS, *text_components), self.FAMILY,
            config.allow_download, config.revision, config.variant, config.hub_cache_dir, self.ACCESS_HINT,
        )
        self.has_text_encoder = not missing_components(self.model_folder, TEXT_COMPONENTS, config.variant)
        # Load straight in the GPU precision when a GPU exists; _settle fixes it for the real device.
        load_dtype = DTYPES[config.dtype] if torch.cuda.is_available() else torch.float32
        self.unet = _load_component(
            getattr(diffusers, self.UNET_CLASS), self.model_folder, "unet", variant=config.variant,
            torch_dtype=load_dtype,
        )
        scheduler = _load_component(getattr(diffusers, self.SCHEDULER_CLASS), self.model_folder, "scheduler")
        self.prediction_type = (
            scheduler.config.prediction_type if config.prediction_type == "auto" else config.prediction_type
        )
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"{self.FAMILY} scheduler predicts {self.prediction_type!r}; expected epsilon, v_prediction or sample"
            )
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().float().clone())
        self._load_image_models(load_dtype)
        if config.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if config.attention_slicing:
            self.unet.set_attention_slice(config.attention_slicing)
        self._text: _TextModels | None = None
        self.prompt_cache = EmbeddingCache(
            prompting.resolved_cache_dir if prompting.cache and self.has_text_encoder else None,
            self._cache_identity(),
        )
        self._student: "DiffusersStudent | None" = None
        self._adapter_layers: list[nn.Module] = []
        self.requires_grad_(False)
        self.eval()
        self._ready = True
        logger.info(
            "%s teacher from %s (%s, %d timesteps)", self.FAMILY, self.model_folder, self.prediction_type,
            self.num_train_timesteps,
        )

    # ------------------------------------------------------------------ subclass hooks

    def _load_image_models(self, dtype: torch.dtype) -> None:
        """Load the models of the sample space (the VAE for latent teachers)."""

    def _load_text_models(self, dtype: torch.dtype) -> tuple[Any, nn.Module]:
        """(tokenizer, text encoder) from the model folder."""
        raise NotImplementedError

    def _encode_text(self, texts: list[str], models: _TextModels) -> Tensor:
        """[N, L, D] embeddings of ``texts`` (float32)."""
        raise NotImplementedError

    def _weight_modules(self) -> list[nn.Module]:
        """Modules whose precision follows the device (UNet, VAE)."""
        return [self.unet]

    # ------------------------------------------------------------------ device and precision

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The configured precision on a GPU, float32 on CPU."""
        return DTYPES[self.config.dtype] if self.device.type == "cuda" else torch.float32

    def _apply(self, fn: Any, recurse: bool = True) -> "DiffusersTeacher":
        # .to()/.cuda()/.half() all land here: afterwards, precision follows the device again.
        super()._apply(fn, recurse)
        if getattr(self, "_ready", False):
            self._settle()
        return self

    def _settle(self) -> None:
        if self.alphas_cumprod.dtype != torch.float32:
            self.alphas_cumprod = self.alphas_cumprod.float()
        dtype = self.compute_dtype
        for module in self._weight_modules():
            if next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
        if self._student is not None:
            self._student.keep_float32()

    # ------------------------------------------------------------------ prompts

    def prompt_texts(self, prompt: str, negative_prompt: str = "") -> list[str]:
        """Every text ``encode_prompt`` needs an embedding for (to precompute ``prompt_embeds_path``)."""
        texts = [prompt, negative_prompt, *view_prompts(prompt, self.config.prompting).values()]
        return list(dict.fromkeys(self._preprocess_text(text) for text in texts))

    def inject_prompt_embeddings(self, embeddings: dict[str, Tensor]) -> None:
        """Use these ``{text: [L, D]}`` embeddings instead of the text encoder (and the cache)."""
        for text, embedding in embeddings.items():
            if embedding.dim() != 2:
                raise ValueError(f"embedding of {text!r} must be [L, D], got {tuple(embedding.shape)}")
            self._injected[self._preprocess_text(text)] = embedding.detach().float().cpu()

    def _lookup_embeddings(self, texts: list[str]) -> dict[str, Tensor]:
        """``{text: [L, D]}`` for preprocessed ``texts``: injected embeddings, then the disk cache,
        then the text encoder (loaded on demand, freed afterwards unless ``free_text_encoder`` is off)."""
        found: dict[str, Tensor] = {}
        missing = []
        for text in texts:
            if text in self._injected:
                found[text] = self._injected[text]
                continue
            cached = self.prompt_cache.load(text, self._embedding_shape())
            if cached is not None:
                found[text] = cached
            else:
                missing.append(text)
        if missing:
            if not self.has_text_encoder:
                raise ValueError(
                    f"no embeddings for {missing!r}: the model folder has no text encoder/tokenizer and"
                    " teacher.prompting.prompt_embeds_path does not hold them"
                )
            models = self._text_models()
            with torch.no_grad():
                encoded = self._encode_text(missing, models).detach().float().cpu()
            for text, embedding in zip(missing, encoded):
                found[text] = embedding
                self.prompt_cache.store(text, embedding)
            if self.config.free_text_encoder:
                self.free_text_encoder()
        return found

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> TextPromptState:
        """Embeddings of the prompt, its view prompts and the negative prompt.

        Order of look-up per text: injected embeddings, the disk cache, the text encoder (loaded
        on demand, freed afterwards unless ``free_text_encoder`` is off).
        """
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        prompts = view_prompts(prompt, self.config.prompting)
        views = {view: self._preprocess_text(text) for view, text in prompts.items()}
        base, negative = self._preprocess_text(prompt), self._preprocess_text(negative_prompt)
        texts = list(dict.fromkeys([base, negative, *views.values()]))
        found = self._lookup_embeddings(texts)
        shapes = {tuple(e.shape) for e in found.values()}
        if len(shapes) != 1:
            raise ValueError(f"prompt embeddings disagree in shape: {sorted(shapes)}")
        device = self.device
        return TextPromptState(
            prompt=prompt, negative_prompt=negative_prompt, base=found[base].to(device),
            views={view: found[text].to(device) for view, text in views.items()}, negative=found[negative].to(device),
        )

    def text_embedding(self, prompts: list[str]) -> Tensor:
        """[B, L, D] text-encoder hidden states of ``prompts`` (CLIP for Stable Diffusion, T5 for IF),
        through the same injected/disk-cached/encoder look-up as ``encode_prompt``."""
        texts = [self._preprocess_text(prompt) for prompt in prompts]
        found = self._lookup_embeddings(list(dict.fromkeys(texts)))
        return torch.stack([found[text] for text in texts]).float().to(self.device)

    def text_embedding_identity(self) -> str:
        return self.prompt_cache.identity

    def condition(
        self,
        prompt_state: TextPromptState,
        cameras: Cameras,
        view_dependent: bool = True,
        with_unconditional: bool = True,
    ) -> Conditioning:
        """Per-camera text embeddings; Perp-Neg payloads when ``prompting.perp_neg`` and view-dependent."""
        return text_conditioning(prompt_state, cameras, self.config.prompting, view_dependent, with_unconditional)

    def free_text_encoder(self) -> None:
        """Release the tokenizer and text encoder (they are reloaded if a new prompt needs them)."""
        if self._text is not None:
            self._text = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _preprocess_text(self, text: str) -> str:
        return text

    def _text_models(self) -> _TextModels:
        if self._text is None:
            device = torch.device("cpu") if self.config.offload_text_encoder else self.device
            dtype = DTYPES[self.config.dtype] if device.type == "cuda" else torch.float32
            tokenizer, encoder = self._load_text_models(dtype)
            encoder.requires_grad_(False).eval()
            self._text = _TextModels(tokenizer, encoder.to(device), device)
        return self._text

    def _embedding_shape(self) -> tuple[int, int] | None:
        """Expected [L, D] of a text embedding (None when the folder has no text encoder)."""
        return None

    def _cache_identity(self) -> dict[str, Any]:
        folder = self.model_folder
        return {
            "teacher": type(self).__name__,
            "model": str(folder.resolve()),
            "text_encoder_weights": _stat(folder / "text_encoder"),
            "text_encoder_config": _strip_volatile(_read_json(folder / "text_encoder" / "config.json")),
            "tokenizer_config": _strip_volatile(_read_json(folder / "tokenizer" / "tokenizer_config.json")),
            "variant": self.config.variant,
            "text_max_length": getattr(self.config, "text_max_length", None),
            "encoder_dtype": (
                "float32" if self.config.offload_text_encoder or not torch.cuda.is_available() else self.config.dtype
            ),
        }

    # ------------------------------------------------------------------ noise prediction

    def _unet_forward(self, x: Tensor, t: Tensor, embeddings: Tensor) -> Tensor:
        """Raw UNet output [N, C, h, w] (float32); learned-variance halves are dropped."""
        dtype = next(self.unet.parameters()).dtype
        output = self.unet(x.to(dtype), t.to(x.device), encoder_hidden_states=embeddings.to(x.device, dtype)).sample
        channels = x.shape[1]
        if output.shape[1] == 2 * channels:  # learned variance (IF): the first half is the prediction
            output = output[:, :channels]
        return output.float()

    def _to_eps(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """eps from the model output of the configured prediction type."""
        if self.prediction_type == "epsilon":
            return output
        abar = self.alphas_cumprod.to(x_t.device)[t.long()].view(-1, *([1] * (x_t.dim() - 1)))
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        x_t = x_t.float()
        if self.prediction_type == "v_prediction":
            return alpha * output + sigma * x_t  # v = alpha eps - sigma x0  =>  eps = alpha v + sigma x_t
        return (x_t - alpha * output) / sigma  # "sample": the UNet predicts x0

    def predict_noise(self, x_t: Tensor, t: Tensor, conditioning: Conditioning) -> NoisePrediction:
        """eps of both branches [B, C, h, w] from ONE UNet call (cond first, then uncond).

        Under Perp-Neg the batch is [positive, uncond, K negatives] and the returned ``cond`` is
        the effective conditional ``eps_u + e_pos + sum_k w_k perp(e_k, e_pos)``, so
        ``NoisePrediction.cfg(s)`` equals ``perp_neg_cfg(..., s)``.
        """
        B = x_t.shape[0]
        cond, uncond = conditioning.cond, conditioning.uncond
        t = t.to(x_t.device).long().expand(B) if t.dim() == 0 else t.to(x_t.device).long()
        with self._base_model_only():
            if isinstance(cond, PerpNegPayload):
                K = cond.weights.shape[1]
                embeddings = torch.cat([cond.positive, cond.uncond, cond.negatives.flatten(0, 1)])
                x_in = torch.cat([x_t, x_t, x_t.repeat_interleave(K, dim=0)])
                t_in = torch.cat([t, t, t.repeat_interleave(K, dim=0)])
                eps = self._to_eps(self._unet_forward(x_in, t_in, embeddings), x_in, t_in)
                eps_positive, eps_uncond, eps_negatives = eps[:B], eps[B : 2 * B], eps[2 * B :]
                effective = perp_neg_cfg(
                    eps_uncond, eps_positive, eps_negatives.view(B, K, *eps.shape[1:]), cond.weights.to(eps), 1.0
                )
                return NoisePrediction(cond=effective, uncond=eps_uncond if uncond is not None else None)
            if cond.shape[0] != B or (uncond is not None and uncond.shape[0] != B):
                raise ValueError(f"conditioning holds {cond.shape[0]} samples for a batch of {B}")
            branches = 1 if uncond is None else 2
            embeddings = cond if uncond is None else torch.cat([cond, uncond])
            x_in, t_in = x_t.repeat(branches, *([1] * (x_t.dim() - 1))), t.repeat(branches)  # clips are 5-D
            eps = self._to_eps(self._unet_forward(x_in, t_in, embeddings), x_in, t_in)
        return NoisePrediction(cond=eps[:B], uncond=eps[B:] if uncond is not None else None)

    # ------------------------------------------------------------------ student

    def make_student(self) -> "DiffusersStudent":
        """A LoRA (on this teacher's UNet, off for the teacher's own calls) plus a camera MLP.

        The student shares the frozen UNet weights; only the LoRA and the camera embedding are
        trainable, and they start at zero, so at creation the student predicts the teacher's
        conditional eps. One student per teacher.
        """
        if self._student is not None:
            raise RuntimeError(f"this {self.FAMILY} teacher already has a student; make_student() once per teacher")
        try:
            from peft import LoraConfig
            from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError:
            raise ImportError("make_student() needs peft: pip install lift3d[diffusers] (or pip install peft)") from None
        cfg = self.config
        lora = LoraConfig(
            r=cfg.student_lora_rank, lora_alpha=cfg.student_lora_alpha or cfg.student_lora_rank,
            init_lora_weights=True, target_modules=list(LORA_TARGETS),
        )
        self.unet.add_adapter(lora, adapter_name=STUDENT_ADAPTER)
        self._adapter_layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        self._student = DiffusersStudent(self, cfg.student_camera_dim, cfg.student_camera_hidden)
        return self._student

    @contextmanager
    def _base_model_only(self) -> Iterator[None]:
        """The frozen UNet without the student's LoRA (a no-op until a student exists)."""
        if not self._adapter_layers:
            yield
            return
        trainable = [(p, p.requires_grad) for p in self._student.lora.values()]
        for layer in self._adapter_layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self._adapter_layers:
                layer.enable_adapters(True)
            for parameter, flag in trainable:  # enable_adapters toggles requires_grad; put it back
                parameter.requires_grad_(flag)


def _strip_volatile(config: Any) -> Any:
    """A config dict without keys that change with library versions or paths."""
    if not isinstance(config, dict):
        return config
    volatile = {"_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype"}
    return {key: value for key, value in config.items() if key not in volatile}


# ------------------------------------------------------------------------------ student


class DiffusersStudent(nn.Module):
    """eps_phi(x_t, t, y, c): the teacher's UNet with a LoRA plus a camera embedding added to
    the timestep embedding (threestudio's VSD ``class_embedding``, zero-initialised here).

    Only ``lora`` (peft's LoRA parameters, shared with the UNet) and ``camera_embedding`` are
    parameters of this module, so ``parameters()`` is what to optimise and ``state_dict()`` is
    what to checkpoint; the frozen UNet belongs to the teacher.
    """

    def __init__(self, teacher: DiffusersTeacher, camera_dim: int = 16, hidden: int = 0):
        super().__init__()
        self._teacher = (teacher,)  # a tuple keeps it out of the module tree (no double registration)
        unet = teacher.unet
        self.camera_dim = camera_dim
        lora = {name: p for name, p in unet.named_parameters() if f".{STUDENT_ADAPTER}." in name}
        if not lora:
            raise RuntimeError(f"no LoRA parameters found in the UNet for targets {', '.join(LORA_TARGETS)}")
        # ParameterDict keys cannot hold dots; the same Parameter objects stay inside the UNet.
        self.lora = nn.ParameterDict({name.replace(".", "/"): p for name, p in lora.items()})
        time_dim = unet.time_embedding.linear_2.out_features
        hidden = hidden or time_dim
        self.camera_embedding = nn.Sequential(nn.Linear(camera_dim, hidden), nn.SiLU(), nn.Linear(hidden, time_dim))
        nn.init.zeros_(self.camera_embedding[2].weight)  # zero last layer: the student starts at the teacher
        nn.init.zeros_(self.camera_embedding[2].bias)
        self.camera_embedding.to(teacher.device)
        self.keep_float32()
        for parameter in self.parameters():
            parameter.requires_grad_(True)

    @property
    def teacher(self) -> DiffusersTeacher:
        return self._teacher[0]

    def keep_float32(self) -> None:
        """Trainable weights stay float32 even when the frozen UNet runs in half precision."""
        for parameter in self.parameters():
            if parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()

    @staticmethod
    def camera_features(cameras: Cameras) -> Tensor:
        """[B, 16] camera input: the flattened 4x4 camera-to-world matrix (threestudio's "extrinsics")."""
        return cameras.c2w.reshape(len(cameras), 16)

    def camera_embedding_of(self, cameras: Cameras) -> Tensor:
        """The camera input [B, 16] this student expects (the guidance-side student protocol)."""
        return self.camera_features(cameras)

    def forward(self, x_t: Tensor, t: Tensor, conditioning: Conditioning, camera: Tensor | None = None) -> Tensor:
        """eps [B, C, h, w] for x_t [B, C, h, w], integer t [B], text conditioning and camera [B, 16] or None.

        Uses the conditional embeddings only; ``camera=None`` feeds the zero camera (threestudio's
        "cam = 0" branch, which camera dropout trains).
        """
        teacher = self.teacher
        B = x_t.shape[0]
        if camera is None:
            camera = torch.zeros(B, self.camera_dim, device=x_t.device)
        if camera.shape != (B, self.camera_dim):
            raise ValueError(f"camera must be [B, {self.camera_dim}], got {tuple(camera.shape)}")
        if not teacher._adapter_layers:
            raise RuntimeError("the student's LoRA is gone from the teacher's UNet")
        camera_embedding = self.camera_embedding(camera.to(x_t.device, torch.float32))

        def add_camera(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            return output + camera_embedding.to(output.dtype)

        t = t.to(x_t.device).long().expand(B) if t.dim() == 0 else t.to(x_t.device).long()
        handle = teacher.unet.time_embedding.register_forward_hook(add_camera)
        try:
            output = teacher._unet_forward(x_t, t, positive_embeddings(conditioning))
        finally:
            handle.remove()
        return teacher._to_eps(output, x_t, t)


# ------------------------------------------------------------------------------ Stable Diffusion


@register("teacher", "stable-diffusion", StableDiffusionTeacherConfig)
class StableDiffusionTeacher(DiffusersTeacher):
    """Stable Diffusion 1.x / 2.x: VAE latents, CLIP text embeddings, epsilon or v-prediction."""

    FAMILY = "Stable Diffusion"
    IMAGE_COMPONENTS = ("vae",)
    config: StableDiffusionTeacherConfig

    def __init__(self, config: StableDiffusionTeacherConfig | None = None):
        super().__init__(config or StableDiffusionTeacherConfig())

    def _load_image_models(self, dtype: torch.dtype) -> None:
        from diffusers import AutoencoderKL

        self.vae = _load_component(
            AutoencoderKL, self.model_folder, "vae", variant=self.config.variant, torch_dtype=dtype
        )
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.config.image_size % self.vae_scale_factor:
            raise ValueError(
                f"teacher.image_size={self.config.image_size} must be a multiple of the VAE factor"
                f" {self.vae_scale_factor}"
            )

    def _weight_modules(self) -> list[nn.Module]:
        return [self.unet, self.vae]

    def _settle(self) -> None:
        super()._settle()
        if self.config.offload_vae_decoder and self.device.type != "cpu":
            self.vae.decoder.to("cpu")
            self.vae.post_quant_conv.to("cpu")

    @property
    def channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def latent_size(self) -> int:
        """Side h = w of the latents."""
        return self.config.image_size // self.vae_scale_factor

    def encode_images(self, rgb: Tensor) -> Tensor:
        """Renders [B, H, W, 3] in [0, 1] -> latents [B, 4, h, w] (float32), differentiable.

        Bilinear resize to ``image_size``, map to [-1, 1], VAE-encode, posterior sample (or
        mean), times ``scaling_factor``. A render with 4 channels is taken as latents already
        (latent-NeRF's ``rgb_as_latents``) and only resized to the latent size.
        """
        if rgb.dim() != 4 or rgb.shape[-1] not in (3, self.channels):
            raise ValueError(
                f"encode_images expects rgb [B, H, W, 3] (or {self.channels}-channel latents), got {tuple(rgb.shape)}"
            )
        image = rgb.permute(0, 3, 1, 2)
        if rgb.shape[-1] == self.channels:
            return _resize(image, self.latent_size).float()
        pixels = 2.0 * _resize(image, self.config.image_size) - 1.0
        vae_dtype = next(self.vae.encoder.parameters()).dtype
        posterior = self.vae.encode(pixels.to(vae_dtype)).latent_dist
        latents = posterior.sample() if self.config.encode_mode == "sample" else posterior.mean
        return latents.float() * self.scaling_factor

    def decode(self, x0: Tensor) -> Tensor:
        """Latents [B, 4, h, w] -> rgb [B, H, W, 3] in [0, 1]."""
        with self._decoder_on_device():
            dtype = next(self.vae.decoder.parameters()).dtype
            image = self.vae.decode((x0 / self.scaling_factor).to(self.device, dtype)).sample
        return ((image.float() + 1.0) * 0.5).clamp(0.0, 1.0).permute(0, 2, 3, 1).to(x0.device)

    @contextmanager
    def _decoder_on_device(self) -> Iterator[None]:
        offloaded = self.config.offload_vae_decoder and self.device.type != "cpu"
        if offloaded:
            self.vae.decoder.to(self.device)
            self.vae.post_quant_conv.to(self.device)
        try:
            yield
        finally:
            if offloaded:
                self.vae.decoder.to("cpu")
                self.vae.post_quant_conv.to("cpu")

    # ------------------------------------------------------------------ text

    def _load_text_models(self, dtype: torch.dtype) -> tuple[Any, nn.Module]:
        from transformers import AutoTokenizer, CLIPTextModel

        tokenizer = _load_component(AutoTokenizer, self.model_folder, "tokenizer")
        encoder = _load_component(
            CLIPTextModel, self.model_folder, "text_encoder", variant=self.config.variant,
            **_transformers_dtype_kwarg(dtype),
        )
        return tokenizer, encoder

    def _encode_text(self, texts: list[str], models: _TextModels) -> Tensor:
        tokenizer, encoder = models.tokenizer, models.encoder
        length = tokenizer.model_max_length
        tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        _warn_truncated(tokenizer, texts, length)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(models.device)
        return encoder(tokens.input_ids.to(models.device), attention_mask=mask)[0].float()

    def _embedding_shape(self) -> tuple[int, int] | None:
        config = _read_json(self.model_folder / "text_encoder" / "config.json")
        tokenizer = _read_json(self.model_folder / "tokenizer" / "tokenizer_config.json")
        if not isinstance(config, dict) or not isinstance(tokenizer, dict) or "model_max_length" not in tokenizer:
            return None
        return int(tokenizer["model_max_length"]), int(config["hidden_size"])


def _warn_truncated(tokenizer: Any, texts: list[str], length: int) -> None:
    for text, ids in zip(texts, tokenizer(texts, truncation=False, verbose=False).input_ids):
        if len(ids) > length:
            logger.warning(
                "prompt %r is %d tokens long; the text encoder sees only the first %d", text, len(ids), length
            )


def _resize(image: Tensor, size: int) -> Tensor:
    """[B, C, H, W] -> [B, C, size, size], bilinear (threestudio's resize before the VAE)."""
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
