"""Clip teachers from diffusers: text-to-video (ModelScope, Zeroscope) and Stable Video Diffusion.

A clip teacher judges F consecutive frames at once (``frames_per_clip = F``). Renders arrive
clip-major, rgb [B*F, H, W, 3] (camera ``b*F + f`` is frame f of clip b, the Cameras contract),
and the sample space is x0 [B, C, F, h, w]: the per-frame VAE latents of each clip stacked along
a frame axis, so the DDPM forward process, the guidance objectives (which reduce over all
non-batch dims) and CFG work on whole clips unchanged, with one timestep per clip.

``TextToVideoTeacher`` (``text-to-video``) is ``TextToVideoSDPipeline``'s model: an SD VAE applied
frame by frame, a CLIP text encoder and a ``UNet3DConditionModel`` on [B, C, F, h, w] latents with
the SD DDPM schedule; everything about prompts is the SD teacher's.

``StableVideoDiffusionTeacher`` (``stable-video-diffusion``) is image-to-video. It is conditioned
on one image (``teacher.image``, or ``condition_on_image``): its CLIP image embedding (the UNet's
cross-attention input), its VAE latent concatenated to every noisy frame's channels, and the
added time ids (fps - 1, motion bucket, noise augmentation); the unconditional branch zeroes the
embedding and the latent, as the pipeline does. The prompt text is not used.

SVD is an EDM model (variance exploding, ``x = x0 + sigma n``) and its scheduler an Euler one.
The Teacher interface speaks DDPM (variance preserving, ``x_t = sqrt(abar) x0 + sqrt(1-abar) n``);
the two are the same process up to a scale:

    abar = 1 / (1 + sigma^2),    x_t(VP) = x(VE) / sqrt(1 + sigma^2) = x(VE) sqrt(abar)

and the pipeline's UNet input ``scheduler.scale_model_input(x, sigma) = x / sqrt(sigma^2 + 1)``
is exactly the VP ``x_t``. So the teacher exposes an ``alphas_cumprod`` grid and, at integer t,
feeds the UNet ``x_t`` with the noise level ``sigma_t = sqrt((1 - abar_t) / abar_t)`` encoded as
the scheduler does (``c_noise = 0.25 ln sigma`` for continuous timesteps). The v-prediction of
EDM's Euler scheduler, ``x0 = -sigma/sqrt(1+sigma^2) v + x/(1+sigma^2)``, is the VP relation
``x0 = sqrt(abar) x_t - sqrt(1-abar) v``, so eps = ``sqrt(abar) v + sqrt(1-abar) x_t`` as for SD
2.x. The grid (``sigma_grid``): ``scheduler`` takes the scheduler's own beta schedule (Euler's
training sigmas, 0.03..14.6 for SVD's scaled-linear betas; the SDS ranges of every other teacher
mean the same noise levels); ``karras`` spaces T sigmas on the Karras rho = 7 ramp between the
scheduler's sigma_min and sigma_max (0.002..700, the range SVD samples over).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lift3d.cameras import Cameras
from lift3d.registry import register
from lift3d.teachers.base import Conditioning, NoisePrediction, clips_to_frames, frames_to_clips
from lift3d.teachers.diffusers_sd import (
    DiffusersTeacher,
    DiffusersTeacherConfig,
    StableDiffusionTeacher,
    _load_component,
    _read_json,
    _transformers_dtype_kwarg,
)
from lift3d.teachers.prompting import text_conditioning

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP normalisation (used when the model folder has no feature_extractor/)."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------ clip layout


def clip_cameras(cameras: Cameras, frames_per_clip: int) -> Cameras:
    """The first camera of each clip (what a clip-level prompt or label is chosen from)."""
    if len(cameras) % frames_per_clip:
        raise ValueError(
            f"{len(cameras)} cameras do not split into clips of {frames_per_clip} frames (the teacher's"
            " frames_per_clip); sample clips of that length"
        )
    if cameras.frames not in (1, frames_per_clip):  # 1: a plain batch, taken as consecutive clips
        raise ValueError(f"cameras come in clips of {cameras.frames} frames but the teacher takes {frames_per_clip}")
    return cameras[torch.arange(0, len(cameras), frames_per_clip, device=cameras.device)]  # frames = 1


def _resize_hw(image: Tensor, height: int, width: int, antialias: bool = False) -> Tensor:
    """[N, C, H, W] -> [N, C, height, width], bilinear."""
    if image.shape[-2:] == (height, width):
        return image
    return F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias)


def _check_frames(rgb: Tensor, channels: tuple[int, ...]) -> None:
    if rgb.dim() != 4 or rgb.shape[-1] not in channels:
        raise ValueError(f"encode_images expects rgb frames [B*F, H, W, 3] (clip-major), got {tuple(rgb.shape)}")


class _VideoVAE:
    """Per-frame VAE encode/decode shared by both clip teachers (a mixin over ``vae``/``config``)."""

    vae: nn.Module
    scaling_factor: float
    vae_scale_factor: int

    def _set_vae(self, height: int, width: int) -> None:
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for name, size in (("height", height), ("width", width)):
            if size % self.vae_scale_factor:
                raise ValueError(
                    f"teacher.{name}={size} must be a multiple of the VAE factor {self.vae_scale_factor}"
                )

    @property
    def latent_hw(self) -> tuple[int, int]:
        """(h, w) of one frame's latents."""
        return self.config.height // self.vae_scale_factor, self.config.width // self.vae_scale_factor

    def _encode_frames(self, rgb: Tensor) -> Tensor:
        """rgb frames [N, H, W, 3] in [0, 1] -> scaled latents [N, C, h, w], differentiable, in chunks."""
        pixels = 2.0 * _resize_hw(rgb.permute(0, 3, 1, 2), self.config.height, self.config.width) - 1.0
        dtype = next(self.vae.encoder.parameters()).dtype
        chunk = self.config.vae_chunk or pixels.shape[0]
        latents = []
        for i in range(0, pixels.shape[0], chunk):
            posterior = self.vae.encode(pixels[i : i + chunk].to(dtype)).latent_dist
            latents.append(posterior.sample() if self.config.encode_mode == "sample" else posterior.mean)
        return torch.cat(latents).float() * self.scaling_factor


# ------------------------------------------------------------------------------ text-to-video


@dataclass
class TextToVideoTeacherConfig(DiffusersTeacherConfig):
    """ModelScope / Zeroscope text-to-video (``TextToVideoSDPipeline`` folders) from diffusers."""

    model: str = "cerspense/zeroscope_v2_576w"
    """Hub id (read from the local Hugging Face cache) or a local diffusers model folder."""
    num_frames: int = 16
    """Frames per clip F (frames_per_clip); the trainer renders clips of this length."""
    height: int = 320
    """Frames are resized (bilinear) to this height before the VAE (Zeroscope 576w: 320, ModelScope: 256)."""
    width: int = 576
    """Frames are resized (bilinear) to this width before the VAE (Zeroscope 576w: 576, ModelScope: 256)."""
    encode_mode: Literal["sample", "mean"] = "sample"
    """Take a sample of the VAE posterior (threestudio) or its mean."""
    vae_chunk: int = 0
    """Frames per VAE call (0 = all at once); bounds the encoder's activation memory."""
    offload_vae_decoder: bool = False
    """Keep the VAE decoder on the CPU between ``decode`` calls (it is not needed for SDS)."""

    def validate(self) -> None:
        super().validate()
        if self.num_frames < 1:
            raise ValueError(f"teacher.num_frames must be >= 1, got {self.num_frames}")
        if self.height < 8 or self.width < 8:
            raise ValueError(f"teacher.height and teacher.width must be at least 8, got {self.height}x{self.width}")
        if self.vae_chunk < 0:
            raise ValueError(f"teacher.vae_chunk must be >= 0, got {self.vae_chunk}")


@register("teacher", "text-to-video", TextToVideoTeacherConfig)
class TextToVideoTeacher(_VideoVAE, StableDiffusionTeacher):
    """A ``UNet3DConditionModel`` text-to-video prior: x0 [B, 4, F, h, w], one text embedding per clip."""

    FAMILY = "text-to-video"
    UNET_CLASS = "UNet3DConditionModel"
    config: TextToVideoTeacherConfig

    def __init__(self, config: TextToVideoTeacherConfig | None = None):
        DiffusersTeacher.__init__(self, config or TextToVideoTeacherConfig())

    @property
    def frames_per_clip(self) -> int:
        return self.config.num_frames

    def _load_image_models(self, dtype: torch.dtype) -> None:
        from diffusers import AutoencoderKL

        self.vae = _load_component(
            AutoencoderKL, self.model_folder, "vae", variant=self.config.variant, torch_dtype=dtype
        )
        self._set_vae(self.config.height, self.config.width)

    @property
    def latent_size(self) -> int:
        raise AttributeError("a text-to-video teacher's frames need not be square: use latent_hw")

    def encode_images(self, rgb: Tensor) -> Tensor:
        """Frames [B*F, H, W, 3] in [0, 1] (clip-major) -> latents [B, 4, F, h, w], differentiable.

        Each frame is resized to ``height x width`` and VAE-encoded on its own (the video models
        use the per-frame SD VAE). A 4-channel render is taken as latents already.
        """
        _check_frames(rgb, (3, self.channels))
        if rgb.shape[-1] == self.channels:
            latents = _resize_hw(rgb.permute(0, 3, 1, 2), *self.latent_hw).float()
        else:
            latents = self._encode_frames(rgb)
        return frames_to_clips(latents, self.frames_per_clip)

    def decode(self, x0: Tensor) -> Tensor:
        """Latents [B, 4, F, h, w] -> frames [B*F, H, W, 3] in [0, 1] (clip-major)."""
        return StableDiffusionTeacher.decode(self, clips_to_frames(x0))

    def condition(
        self, prompt_state: Any, cameras: Cameras, view_dependent: bool = True, with_unconditional: bool = True
    ) -> Conditioning:
        """One text embedding per clip, view-dependent on the clip's first camera."""
        return text_conditioning(
            prompt_state, clip_cameras(cameras, self.frames_per_clip), self.config.prompting, view_dependent,
            with_unconditional,
        )

    def make_student(self) -> nn.Module:
        raise NotImplementedError(
            "VSD-type objectives need a per-camera student; the text-to-video teacher has none (use sds, or VSD"
            " with an image teacher)"
        )


# ------------------------------------------------------------------------------ Stable Video Diffusion


@dataclass
class StableVideoDiffusionTeacherConfig(DiffusersTeacherConfig):
    """Stable Video Diffusion image-to-video (``StableVideoDiffusionPipeline`` folders) from diffusers."""

    model: str = "stabilityai/stable-video-diffusion-img2vid"
    """Hub id (read from the local Hugging Face cache) or a local diffusers model folder."""
    image: str = ""
    """The conditioning image (PNG/JPEG; transparent pixels become ``background``). Empty: call
    ``condition_on_image`` before use (a pipeline stage that generates the image does)."""
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Colour composited under a transparent conditioning image, and the renders' background."""
    num_frames: int = 0
    """Frames per clip F (0 = the UNet's ``num_frames``: 14 for img2vid, 25 for -xt)."""
    height: int = 576
    """Frames are resized (bilinear) to this height before the VAE (SVD was trained at 576x1024)."""
    width: int = 1024
    """Frames are resized (bilinear) to this width before the VAE."""
    fps: int = 7
    """Frame rate conditioning (the UNet sees fps - 1, as the pipeline)."""
    motion_bucket_id: int = 127
    """Motion-amount conditioning of SVD (higher = more motion)."""
    noise_aug_strength: float = 0.02
    """Gaussian noise added to the conditioning image before VAE encoding (also a conditioning input)."""
    sigma_grid: Literal["scheduler", "karras"] = "scheduler"
    """How integer timesteps map to EDM sigmas (module docstring): the scheduler's beta schedule, or
    Karras sigmas between the scheduler's sigma_min and sigma_max."""
    encode_mode: Literal["sample", "mean"] = "sample"
    """Take a sample of the VAE posterior or its mean (the pipeline encodes the conditioning image with the mode)."""
    vae_chunk: int = 0
    """Frames per VAE call (0 = all at once)."""
    seed: int = 0
    """Seed of the conditioning image's noise augmentation."""

    def validate(self) -> None:
        super().validate()
        if self.num_frames < 0:
            raise ValueError(f"teacher.num_frames must be >= 0 (0 = the UNet's), got {self.num_frames}")
        if self.height < 8 or self.width < 8:
            raise ValueError(f"teacher.height and teacher.width must be at least 8, got {self.height}x{self.width}")
        if self.noise_aug_strength < 0:
            raise ValueError(f"teacher.noise_aug_strength must be >= 0, got {self.noise_aug_strength}")
        if self.vae_chunk < 0:
            raise ValueError(f"teacher.vae_chunk must be >= 0, got {self.vae_chunk}")
        if len(self.background) != 3:
            raise ValueError(f"teacher.background must be 3 numbers, got {self.background}")


@dataclass
class ImagePromptState:
    """The image condition of an SVD run (what ``encode_prompt`` returns)."""

    prompt: str
    """The run's prompt text (logged only: SVD is not text-conditioned)."""
    image: Tensor
    """[H, W, 3] the conditioning image in [0, 1]."""
    image_embeds: Tensor
    """[1, 1, D] CLIP image embedding (the UNet's cross-attention input)."""
    image_latents: Tensor
    """[1, C, h, w] VAE latent (posterior mode, unscaled, as the pipeline) of the noise-augmented image."""
    added_time_ids: Tensor
    """[1, 3] (fps - 1, motion_bucket_id, noise_aug_strength)."""


@dataclass
class ImagePayload:
    """Per-clip image conditioning of one branch."""

    image_embeds: Tensor
    """[B, 1, D]."""
    image_latents: Tensor
    """[B, C, h, w]."""
    added_time_ids: Tensor
    """[B, 3]."""


@register("teacher", "stable-video-diffusion", StableVideoDiffusionTeacherConfig)
class StableVideoDiffusionTeacher(_VideoVAE, DiffusersTeacher):
    """SVD image-to-video: x0 [B, 4, F, h, w]; EDM sigmas mapped to a DDPM grid (module docstring)."""

    FAMILY = "Stable Video Diffusion"
    IMAGE_COMPONENTS = ("vae", "image_encoder")
    UNET_CLASS = "UNetSpatioTemporalConditionModel"
    SCHEDULER_CLASS = "EulerDiscreteScheduler"
    TEXT_MODEL_COMPONENTS = ()
    config: StableVideoDiffusionTeacherConfig

    def __init__(self, config: StableVideoDiffusionTeacherConfig | None = None):
        super().__init__(config or StableVideoDiffusionTeacherConfig())
        scheduler = _read_json(self.model_folder / "scheduler" / "scheduler_config.json") or {}
        self.continuous_timesteps = (
            scheduler.get("timestep_type") == "continuous" and self.prediction_type == "v_prediction"
        )
        if self.config.sigma_grid == "karras":
            self.alphas_cumprod = karras_alphas_cumprod(
                self.num_train_timesteps, float(scheduler.get("sigma_min") or 0.002),
                float(scheduler.get("sigma_max") or 700.0),
            ).to(self.alphas_cumprod.device)
        expected = self.unet.add_embedding.linear_1.in_features
        if self.unet.config.addition_time_embed_dim * 3 != expected:
            raise ValueError(
                f"{self.model_folder}: the UNet expects {expected} added-time features, not 3 x"
                f" {self.unet.config.addition_time_embed_dim} (fps, motion bucket, noise augmentation)"
            )
        self.register_buffer("background", torch.tensor(self.config.background, dtype=torch.float32), persistent=False)

    @property
    def frames_per_clip(self) -> int:
        return self.config.num_frames or int(self.unet.config.num_frames)

    @property
    def channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def _load_image_models(self, dtype: torch.dtype) -> None:
        from diffusers import AutoencoderKLTemporalDecoder
        from transformers import CLIPVisionModelWithProjection

        self.vae = _load_component(
            AutoencoderKLTemporalDecoder, self.model_folder, "vae", variant=self.config.variant, torch_dtype=dtype
        )
        self._set_vae(self.config.height, self.config.width)
        self.image_encoder = _load_component(
            CLIPVisionModelWithProjection, self.model_folder, "image_encoder", variant=self.config.variant,
            **_transformers_dtype_kwarg(dtype),
        )
        processor = _read_json(self.model_folder / "feature_extractor" / "preprocessor_config.json") or {}
        self.register_buffer("clip_mean", torch.tensor(processor.get("image_mean", CLIP_MEAN)).view(1, 3, 1, 1))
        self.register_buffer("clip_std", torch.tensor(processor.get("image_std", CLIP_STD)).view(1, 3, 1, 1))

    def _weight_modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, self.image_encoder]

    # ------------------------------------------------------------------ the image condition

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> ImagePromptState:
        """The image condition from ``teacher.image`` (the prompt text is not used by SVD)."""
        if not self.config.image:
            raise ValueError(
                "the stable-video-diffusion teacher is image-conditioned: set teacher.image=PATH (PNG/JPEG), or"
                " run it after a stage that makes the image"
            )
        return self.condition_on_image(load_image(self.config.image, self.config.background), prompt)

    @torch.no_grad()
    def condition_on_image(self, image: Tensor, prompt: str = "") -> ImagePromptState:
        """The image condition of ``image`` [H, W, 3] in [0, 1] (e.g. a front render or a generated image)."""
        if image.dim() != 3 or image.shape[-1] != 3:
            raise ValueError(f"the conditioning image must be [H, W, 3], got {tuple(image.shape)}")
        device = self.device
        pixels = image.to(device, torch.float32).permute(2, 0, 1).unsqueeze(0).clamp(0, 1)
        # CLIP embedding: antialiased resize to the encoder's input size, CLIP normalisation.
        size = int(self.image_encoder.config.image_size)
        clip_in = (_resize_hw(pixels, size, size, antialias=True) - self.clip_mean) / self.clip_std
        dtype = next(self.image_encoder.parameters()).dtype
        embeds = self.image_encoder(clip_in.to(dtype)).image_embeds.float().unsqueeze(1)
        # VAE latent of the noise-augmented image, unscaled posterior mode (as the pipeline).
        generator = torch.Generator(device="cpu").manual_seed(self.config.seed)
        vae_in = 2.0 * _resize_hw(pixels, self.config.height, self.config.width) - 1.0
        vae_in = vae_in + self.config.noise_aug_strength * torch.randn(vae_in.shape, generator=generator).to(device)
        vae_dtype = next(self.vae.encoder.parameters()).dtype
        latents = self.vae.encode(vae_in.to(vae_dtype)).latent_dist.mode().float()
        cfg = self.config
        time_ids = torch.tensor([[cfg.fps - 1, cfg.motion_bucket_id, cfg.noise_aug_strength]], device=device)
        return ImagePromptState(prompt, image.detach().cpu(), embeds, latents, time_ids)

    def condition(
        self, prompt_state: ImagePromptState, cameras: Cameras, view_dependent: bool = True,
        with_unconditional: bool = True,
    ) -> Conditioning:
        """The same image condition for every clip; the unconditional branch zeroes embedding and latent."""
        first = clip_cameras(cameras, self.frames_per_clip)
        B = len(first)
        state = prompt_state
        cond = ImagePayload(
            state.image_embeds.expand(B, -1, -1), state.image_latents.expand(B, -1, -1, -1),
            state.added_time_ids.expand(B, -1),
        )
        uncond = None
        if with_unconditional:
            uncond = ImagePayload(torch.zeros_like(cond.image_embeds), torch.zeros_like(cond.image_latents),
                                  cond.added_time_ids)
        return Conditioning(cond=cond, uncond=uncond, view_labels=first.view_labels())

    # ------------------------------------------------------------------ sample space

    def encode_images(self, rgb: Tensor) -> Tensor:
        """Frames [B*F, H, W, 3] in [0, 1] (clip-major) -> latents [B, 4, F, h, w], differentiable."""
        _check_frames(rgb, (3,))
        return frames_to_clips(self._encode_frames(rgb), self.frames_per_clip)

    def decode(self, x0: Tensor) -> Tensor:
        """Latents [B, 4, F, h, w] -> frames [B*F, H, W, 3] in [0, 1] (the temporal decoder sees whole clips)."""
        frames = x0.shape[2]
        z = clips_to_frames(x0).to(self.device) / self.scaling_factor
        dtype = next(self.vae.decoder.parameters()).dtype
        images = []
        per_call = max(1, (self.config.vae_chunk or z.shape[0]) // frames) * frames  # whole clips per call
        with torch.no_grad():
            for i in range(0, z.shape[0], per_call):
                images.append(self.vae.decode(z[i : i + per_call].to(dtype), num_frames=frames).sample.float())
        image = torch.cat(images)
        return ((image + 1.0) * 0.5).clamp(0.0, 1.0).permute(0, 2, 3, 1).to(x0.device)

    # ------------------------------------------------------------------ noise prediction

    def sigmas(self, t: Tensor) -> Tensor:
        """EDM noise level sigma_t = sqrt((1 - abar_t) / abar_t) of integer timesteps [B]."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return ((1.0 - abar) / abar).sqrt()

    def _unet_timestep(self, t: Tensor) -> Tensor:
        """What the UNet is given as its timestep: ``0.25 ln sigma`` (continuous, SVD) or t itself."""
        return 0.25 * self.sigmas(t).log() if self.continuous_timesteps else t.float()

    def predict_noise(self, x_t: Tensor, t: Tensor, conditioning: Conditioning) -> NoisePrediction:
        """eps [B, C, F, h, w] of both branches from ONE UNet call (cond first, then uncond)."""
        if x_t.dim() != 5:
            raise ValueError(f"x_t must be clips [B, C, F, h, w], got {tuple(x_t.shape)}")
        B = x_t.shape[0]
        t = t.to(x_t.device).long().expand(B) if t.dim() == 0 else t.to(x_t.device).long()
        branches = [conditioning.cond] + ([conditioning.uncond] if conditioning.uncond is not None else [])
        if any(branch.image_embeds.shape[0] != B for branch in branches):
            raise ValueError(f"conditioning holds {branches[0].image_embeds.shape[0]} clips for a batch of {B}")
        n = len(branches)
        embeds = torch.cat([b.image_embeds for b in branches])
        latents = torch.cat([b.image_latents for b in branches])
        time_ids = torch.cat([b.added_time_ids for b in branches])
        x_in = x_t.repeat(n, 1, 1, 1, 1)
        t_in = t.repeat(n)
        frames = x_t.shape[2]
        # the spatio-temporal UNet takes [B, F, C, h, w]; the image latent is concatenated per frame
        sample = torch.cat([x_in.transpose(1, 2), latents.unsqueeze(1).expand(-1, frames, -1, -1, -1)], dim=2)
        dtype = next(self.unet.parameters()).dtype
        output = self.unet(
            sample.to(dtype), self._unet_timestep(t_in).to(dtype), encoder_hidden_states=embeds.to(dtype),
            added_time_ids=time_ids.to(dtype),
        ).sample.float().transpose(1, 2)
        eps = self._to_eps(output, x_in, t_in)
        return NoisePrediction(cond=eps[:B], uncond=eps[B:] if n == 2 else None)

    def make_student(self) -> nn.Module:
        raise NotImplementedError("VSD-type objectives need a text-conditioned student; SVD has none (use sds)")

    # ------------------------------------------------------------------ the shared loader's text hooks

    def _cache_identity(self) -> dict[str, Any]:
        return {"teacher": type(self).__name__, "model": str(self.model_folder.resolve())}


def karras_alphas_cumprod(num: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """[num] abar = 1 / (1 + sigma^2) on Karras et al.'s ramp, sigma rising with t."""
    ramp = torch.linspace(0.0, 1.0, num, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (inv_min + ramp * (inv_max - inv_min)) ** rho
    return (1.0 / (1.0 + sigmas**2)).float()


def load_image(path: str | Path, background: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Tensor:
    """[H, W, 3] float image in [0, 1] from a file; alpha is composited over ``background``."""
    from PIL import Image

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"conditioning image {str(path)!r} does not exist")
    with Image.open(path) as image:
        rgba = torch.from_numpy(np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0)
    alpha = rgba[..., 3:]
    return rgba[..., :3] * alpha + torch.tensor(background) * (1.0 - alpha)


