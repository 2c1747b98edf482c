"""The analytic scene teacher: a diffusion prior whose data distribution is known exactly.

Data model: for a prompt naming a scene (see ``lift3d.teachers.scenes``) and a camera,
``p(x0 | prompt, camera) = N(x0*, sigma_d^2 I)`` where ``x0* = encode(reference render)``.
Every branch is a Gaussian mixture ``sum_k pi_k N(mu_k, sigma_d^2 I)`` with equal covariances,
so under the DDPM forward process ``x_t = alpha x0 + sigma eps`` (alpha = sqrt(abar),
sigma = sqrt(1 - abar)) the noised density is
``p_t = sum_k pi_k N(alpha mu_k, (alpha^2 sigma_d^2 + sigma^2) I)`` and

    eps(x_t) = -sigma grad log p_t(x_t) = sigma (x_t - alpha sum_k r_k mu_k) / (alpha^2 sigma_d^2 + sigma^2)

with responsibilities ``r_k ∝ pi_k N(x_t; alpha mu_k, ...)``: closed form, no weights.

- Conditional branch: the prompt's scene at the true camera (``camera_aware``), or a mixture over
  the scene seen from canonical azimuths, ignoring the camera's azimuth (the Janus problem of
  real teachers, measurable); view-dependent prompts narrow that mixture to the camera's sector.
- Unconditional branch: the exact mixture over a fixed set of scenes, so classifier-free
  guidance has its real meaning; a negative prompt replaces that set by its own scene.
- Moving prompts (``a red sphere bouncing on a blue cube``, see ``lift3d.teachers.scenes``):
  the image teacher (``frames_per_clip = 1``) does not know the time, so its conditional is the
  time-marginal, an equal mixture of the scene at ``marginal_times`` evenly spaced times
  (motion-blind, as a text-to-image model is). The clip teacher (``frames_per_clip = F > 1``)
  judges whole clips x0 [B, C, F, h, w]: its conditional is the clip of the scene at the
  cameras' own times, so temporal coherence has an exact score.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
import trimesh
from torch import Tensor, nn

from lift3d.cameras import Cameras, orbit_cameras, wrap_azimuth
from lift3d.registry import register
from lift3d.teachers.base import (
    Conditioning, NoisePrediction, Teacher, clips_to_frames, frames_to_clips, scaled_linear_alphas_cumprod,
)
from lift3d.teachers.scenes import ARTICLES, BACKGROUND, COLOR_ALIASES, PALETTE, SHAPES, Scene, parse_prompt

logger = logging.getLogger(__name__)

LATENT_PATCH = 8
"""Side of the pixel patch that one latent cell encodes."""
LATENT_CHANNELS = 4
"""Channels of the latent variant's x0."""
LUMINANCE = (0.299, 0.587, 0.114)
"""Weights of the luminance that the latent pattern channel reads."""


# ------------------------------------------------------------------------ mixture algebra


def _per_sample(value: Tensor | float, batch: int, like: Tensor) -> Tensor:
    """A scalar or [B] value as a float64 [B] tensor on ``like``'s device."""
    value = torch.as_tensor(value, dtype=torch.float64, device=like.device)
    return value.expand(batch) if value.dim() == 0 else value.reshape(batch).to(torch.float64)


def _mixture_terms(
    x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float, means: Tensor, log_weights: Tensor, sigma_data: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flattened float64 pieces: x [B, D], mu [B, K, D], alpha, sigma, variance [B], responsibilities [B, K]."""
    B = x_t.shape[0]
    if means.shape[0] != B or means.shape[2:] != x_t.shape[1:]:
        raise ValueError(f"means {tuple(means.shape)} do not match x_t {tuple(x_t.shape)} as [B, K, ...]")
    if log_weights.shape != means.shape[:2]:
        raise ValueError(f"log_weights {tuple(log_weights.shape)} must be [B, K] = {tuple(means.shape[:2])}")
    x = x_t.reshape(B, -1).to(torch.float64)
    log_weights = log_weights.to(device=x.device, dtype=torch.float64)
    present = torch.isfinite(log_weights)
    # Padding components (-inf weight) may hold anything; zero them so 0 * mu stays finite.
    mu = torch.where(present.unsqueeze(-1), means.reshape(B, means.shape[1], -1).to(torch.float64), 0.0)
    alpha, sigma = _per_sample(alpha, B, x), _per_sample(sigma, B, x)
    variance = alpha.square() * sigma_data**2 + sigma.square()
    squared_distance = (x.unsqueeze(1) - alpha.view(B, 1, 1) * mu).square().sum(-1)  # [B, K]
    logits = log_weights - squared_distance / (2.0 * variance.unsqueeze(1))
    responsibilities = torch.softmax(logits, dim=1)  # logsumexp-stable; exactly 0 where the weight is -inf
    return x, mu, alpha, sigma, variance, responsibilities


def mixture_responsibilities(
    x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float, means: Tensor, log_weights: Tensor, sigma_data: float
) -> Tensor:
    """Posterior component probabilities [B, K] (float64) of x_t under the noised mixture.

    Args:
        x_t: noisy samples [B, ...].
        alpha, sigma: sqrt(abar_t) and sqrt(1 - abar_t), scalars or [B].
        means: component means [B, K, ...] in x0 space.
        log_weights: log mixture weights [B, K]; ``-inf`` marks padding (each row needs a finite one).
        sigma_data: standard deviation of every component.
    """
    return _mixture_terms(x_t, alpha, sigma, means, log_weights, sigma_data)[-1]


def mixture_eps(
    x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float, means: Tensor, log_weights: Tensor, sigma_data: float
) -> Tensor:
    """The exact noise prediction ``-sigma grad log p_t(x_t)`` [B, ...] of a Gaussian mixture.

    ``eps = sigma (x_t - alpha sum_k r_k mu_k) / (alpha^2 sigma_d^2 + sigma^2)``; arguments as in
    :func:`mixture_responsibilities`. Computed in float64, returned in ``x_t``'s dtype.
    """
    x, mu, alpha, sigma, variance, responsibilities = _mixture_terms(x_t, alpha, sigma, means, log_weights, sigma_data)
    mean_of_means = torch.einsum("bk,bkd->bd", responsibilities, mu)
    eps = sigma.unsqueeze(1) * (x - alpha.unsqueeze(1) * mean_of_means) / variance.unsqueeze(1)
    return eps.to(x_t.dtype).view_as(x_t)


def mixture_posterior_mean(
    x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float, means: Tensor, log_weights: Tensor, sigma_data: float
) -> Tensor:
    """The exact ``E[x0 | x_t]`` [B, ...] of a Gaussian mixture (Tweedie: ``(x_t - sigma eps) / alpha``).

    ``sum_k r_k (mu_k + alpha sigma_d^2 (x_t - alpha mu_k) / (alpha^2 sigma_d^2 + sigma^2))``;
    arguments as in :func:`mixture_responsibilities`.
    """
    x, mu, alpha, sigma, variance, responsibilities = _mixture_terms(x_t, alpha, sigma, means, log_weights, sigma_data)
    mean_of_means = torch.einsum("bk,bkd->bd", responsibilities, mu)
    posterior = (sigma.square().unsqueeze(1) * mean_of_means + (alpha * sigma_data**2).unsqueeze(1) * x) / (
        variance.unsqueeze(1)
    )
    return posterior.to(x_t.dtype).view_as(x_t)


@dataclass
class MixturePayload:
    """One branch of the analytic teacher's conditioning: a Gaussian mixture per sample."""

    means: Tensor
    """[B, K, C, h, w] component means in x0 space (padding components are zeros)."""
    log_weights: Tensor
    """[B, K] log mixture weights; ``-inf`` for components excluded for that sample."""
    component_names: tuple[str, ...]
    """K names, e.g. ``red-sphere`` or ``red-sphere@az180`` (same layout for every sample)."""
    sigma: float
    """Standard deviation of every component, in x0 units."""

    @property
    def num_components(self) -> int:
        return self.means.shape[1]

    def to(self, device: torch.device | str) -> "MixturePayload":
        return MixturePayload(self.means.to(device), self.log_weights.to(device), self.component_names, self.sigma)


# -------------------------------------------------------------------------------- config


@dataclass
class AnalyticTeacherConfig:
    """The analytic scene teacher: exact scores of rendered SDF scenes, no weights."""

    resolution: int = 64
    """Side of the square image the teacher judges, in pixels (the latent x0 is resolution/8 on a side)."""
    sigma_data: float = 0.1
    """Standard deviation of the data around the reference render, in x0 units."""
    camera_aware: bool = True
    """Condition on the true camera; false makes the conditional a mixture over canonical azimuths (Janus)."""
    canonical_azimuths_deg: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)
    """Azimuths of the mixture components when ``camera_aware`` is false, degrees."""
    image: Literal["rgb", "normal"] = "rgb"
    """What the scenes look like: ``rgb`` (lit colour) or ``normal`` (world-space normal maps (n + 1) / 2,
    the prior Fantasia3D's geometry stage asks Stable Diffusion to be)."""
    latent: bool = False
    """Work in a 4-channel latent space (a fixed linear 8x8-patch map) instead of pixels."""
    supersample: int = 2
    """Rays per pixel side of the reference renders (antialiasing)."""
    unconditional_prompts: tuple[str, ...] = (
        "a red sphere",
        "a green cube",
        "a blue torus",
        "a yellow cone",
        "an orange cylinder",
        "a purple capsule",
        "a white sphere on a gray cube",
        "a gray cone on a white cylinder",
    )
    """Scenes of the unconditional branch, an equal-weight mixture (covers every shape and colour)."""
    unconditional_sigma: float = 1.0
    """Standard deviation of each unconditional component (1: broad over the whole [0, 1] image range).
    Broader than ``sigma_data``, as p(x) of a real
    text-to-image model is broader than any p(x | y): the implicit classifier eps(y) - eps(0) then pulls
    towards the prompt's scene instead of pushing without bound away from the others (CSD, CSM, BSD)."""
    front_threshold_deg: float = 45.0
    """Views with |azimuth| below this are labelled front."""
    back_threshold_deg: float = 45.0
    """Views with |azimuth| above 180 minus this are labelled back."""
    overhead_threshold_deg: float = 60.0
    """Views with elevation above this are labelled overhead (the whole mixture is kept)."""
    background: tuple[float, float, float] = BACKGROUND
    """RGB background of the reference renders (representations composite over it)."""
    num_train_timesteps: int = 1000
    """Length T of the DDPM schedule (Stable Diffusion's scaled-linear betas)."""
    student_camera_dim: int = 4
    """Length D of the camera embedding the student accepts ([elev_rad, sin az, cos az, dist])."""
    student_hidden_channels: int = 32
    """Width of the student's residual conv net."""
    frames_per_clip: int = 1
    """F: 1 = an image teacher (motion-blind on moving prompts); F > 1 = a clip teacher judging
    F-frame clips x0 [B, C, F, h, w] at the cameras' times."""
    marginal_times: int = 8
    """Times (evenly spaced over [0, 1]) of the image teacher's time-marginal on a moving prompt."""
    embedding_dim: int = 32
    """Width of the frozen token embedding ``text_embedding`` gives amortized generators."""
    embedding_tokens: int = 5
    """Token slots of that embedding (a stacked prompt has 5 words besides articles)."""
    embedding_seed: int = 0
    """Seed of the fixed random word and position vectors."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if self.frames_per_clip < 1 or self.marginal_times < 1:
            raise ValueError(
                f"teacher.frames_per_clip and teacher.marginal_times must be >= 1, got "
                f"{self.frames_per_clip} and {self.marginal_times}"
            )
        if self.frames_per_clip > 1 and not self.camera_aware:
            raise ValueError("teacher.camera_aware=false (canonical-azimuth mixtures) needs teacher.frames_per_clip=1")
        if self.image not in ("rgb", "normal"):
            raise ValueError(f"teacher.image must be one of rgb, normal; got {self.image!r}")
        if self.resolution < 1:
            raise ValueError(f"teacher.resolution must be positive, got {self.resolution}")
        if self.latent and self.resolution % LATENT_PATCH:
            raise ValueError(
                f"teacher.resolution must be a multiple of {LATENT_PATCH} when latent, got {self.resolution}"
            )
        if self.sigma_data <= 0:
            raise ValueError(f"teacher.sigma_data must be positive, got {self.sigma_data}")
        if self.unconditional_sigma <= 0:
            raise ValueError(f"teacher.unconditional_sigma must be positive, got {self.unconditional_sigma}")
        if self.supersample < 1:
            raise ValueError(f"teacher.supersample must be >= 1, got {self.supersample}")
        if not self.canonical_azimuths_deg:
            raise ValueError("teacher.canonical_azimuths_deg must list at least one azimuth")
        if not self.unconditional_prompts:
            raise ValueError("teacher.unconditional_prompts must list at least one prompt")
        if self.embedding_dim < 1 or self.embedding_tokens < 1:
            raise ValueError("teacher.embedding_dim and teacher.embedding_tokens must be positive")
        if self.student_camera_dim < 1 or self.student_hidden_channels < 1:
            raise ValueError("teacher.student_camera_dim and teacher.student_hidden_channels must be positive")


@dataclass
class AnalyticPromptState:
    """What ``encode_prompt`` returns: the parsed scenes of a prompt and its negative prompt."""

    prompt: str
    """The prompt as given."""
    scene: Scene
    """The scene the prompt names."""
    negative_prompt: str = ""
    """The negative prompt as given ("" for none)."""
    negative_scene: Scene | None = field(default=None)
    """The scene the negative prompt names, replacing the unconditional set when present."""


# ----------------------------------------------------------------------------- the teacher


def spherical_camera_embedding(cameras: Cameras) -> Tensor:
    """[B, 4] camera embedding ``[elevation_rad, sin azimuth, cos azimuth, distance]`` (threestudio's "spherical")."""
    azimuth = torch.deg2rad(cameras.azimuth_deg)
    return torch.stack(
        [torch.deg2rad(cameras.elevation_deg), torch.sin(azimuth), torch.cos(azimuth), cameras.distance], dim=-1
    )


def _latent_maps() -> tuple[Tensor, Tensor]:
    """The fixed 8x8-patch encoder [4, 3, p, p] (conv weight) and its pseudo-inverse (conv-transpose weight).

    Channels 0-2 are the patch means of R, G, B (in [-1, 1] units); channel 3 is the luminance
    projected on a zero-mean diagonal ramp, scaled so that a ramp from -1 to 1 across the patch
    reads 1. All four rows are orthogonal, so the pseudo-inverse is the transpose over the row norms.
    """
    p = LATENT_PATCH
    encoder = torch.zeros(LATENT_CHANNELS, 3, p, p, dtype=torch.float64)
    for channel in range(3):
        encoder[channel, channel] = 1.0 / (p * p)
    centred = torch.arange(p, dtype=torch.float64) - 0.5 * (p - 1)
    ramp = centred.view(p, 1) + centred.view(1, p)  # from -(p-1) to p-1
    unit_ramp = ramp / (p - 1)  # the -1..1 ramp that should read 1
    pattern = ramp / (ramp * unit_ramp).sum()
    encoder[3] = torch.tensor(LUMINANCE, dtype=torch.float64).view(3, 1, 1) * pattern
    rows = encoder.reshape(LATENT_CHANNELS, -1)
    decoder = torch.linalg.pinv(rows).T.reshape(LATENT_CHANNELS, 3, p, p)
    return encoder.float(), decoder.float()


def _resize(image: Tensor, size: int) -> Tensor:
    """[B, C, H, W] -> [B, C, size, size]: area average for integer downsampling, else antialiased bilinear."""
    H, W = image.shape[-2:]
    if (H, W) == (size, size):
        return image
    if H % size == 0 and W % size == 0:
        # Exactly the supersampled reference when H = s * size: the same sub-pixel rays, averaged.
        return F.avg_pool2d(image, kernel_size=(H // size, W // size))
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@register("teacher", "analytic", AnalyticTeacherConfig)
class AnalyticTeacher(Teacher):
    """Exact scores of sphere-traced SDF scenes named by a tiny prompt grammar (no weights)."""

    background: Tensor
    """[3] RGB background that representations composite over."""

    def __init__(self, config: AnalyticTeacherConfig | None = None):
        super().__init__()
        self.config = config = config or AnalyticTeacherConfig()
        config.validate()
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod(config.num_train_timesteps))
        self.register_buffer("background", torch.tensor(config.background, dtype=torch.float32), persistent=False)
        encoder, decoder = _latent_maps()
        self.register_buffer("latent_encoder", encoder, persistent=False)
        self.register_buffer("latent_decoder", decoder, persistent=False)
        self.unconditional_scenes: tuple[Scene, ...] = tuple(parse_prompt(p) for p in config.unconditional_prompts)
        self.requires_grad_(False)

    # ------------------------------------------------------------------ sample space

    @property
    def channels(self) -> int:
        return LATENT_CHANNELS if self.config.latent else 3

    @property
    def frames_per_clip(self) -> int:
        return self.config.frames_per_clip

    @property
    def sample_size(self) -> int:
        """Side h = w of x0."""
        return self.config.resolution // LATENT_PATCH if self.config.latent else self.config.resolution

    def encode_images(self, rgb: Tensor) -> Tensor:
        """Renders rgb [B, H, W, 3] in [0, 1] -> x0 [B, C, h, w], differentiable.

        Pixel variant: ``2 rgb - 1`` at ``resolution``. Latent variant: the fixed linear patch map
        of that image; a render that already has 4 channels [B, H, W, 4] (latent-NeRF style) is
        taken as latents and only resized to ``resolution / 8``.
        """
        if rgb.dim() != 4 or rgb.shape[-1] not in (3, self.channels):
            raise ValueError(f"encode_images expects rgb [B, H, W, 3], got {tuple(rgb.shape)}")
        F_ = self.frames_per_clip
        if F_ > 1:  # a clip teacher: frames are encoded one by one, then grouped into clips
            if rgb.shape[0] % F_:
                raise ValueError(f"a clip teacher of {F_} frames got {rgb.shape[0]} renders (not whole clips)")
            return frames_to_clips(self._encode_frames(rgb), F_)
        return self._encode_frames(rgb)

    def _encode_frames(self, rgb: Tensor) -> Tensor:
        image = rgb.permute(0, 3, 1, 2)
        if rgb.shape[-1] == LATENT_CHANNELS and self.config.latent:
            return _resize(image, self.sample_size)
        pixels = 2.0 * _resize(image, self.config.resolution) - 1.0
        if not self.config.latent:
            return pixels
        return F.conv2d(pixels, self.latent_encoder.to(pixels.dtype), stride=LATENT_PATCH)

    def decode(self, x0: Tensor) -> Tensor:
        """x0 [B, C, h, w] -> rgb [B, resolution, resolution, 3] in [0, 1] (lossy for latents);
        clips [B, C, F, h, w] -> [B*F, resolution, resolution, 3]."""
        if x0.dim() == 5:
            x0 = clips_to_frames(x0)
        pixels = x0
        if self.config.latent:
            pixels = F.conv_transpose2d(x0, self.latent_decoder.to(x0.dtype), stride=LATENT_PATCH)
        return ((pixels + 1.0) * 0.5).clamp(0.0, 1.0).permute(0, 2, 3, 1)

    # ------------------------------------------------------------------ conditioning

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> AnalyticPromptState:
        """Parse the prompt (and negative prompt); ``ValueError`` with the vocabulary on an unknown word."""
        scene = parse_prompt(prompt)
        negative_scene = None
        if negative_prompt.strip():
            try:
                negative_scene = parse_prompt(negative_prompt)
            except ValueError as error:
                raise ValueError(f"negative prompt: {error}") from None
        return AnalyticPromptState(prompt, scene, negative_prompt, negative_scene)

    def condition(
        self,
        prompt_state: AnalyticPromptState,
        cameras: Cameras,
        view_dependent: bool = True,
        with_unconditional: bool = True,
    ) -> Conditioning:
        """Mixture payloads for both branches; ``view_labels`` are the cameras' labels either way.

        With ``view_dependent`` and ``camera_aware=False`` the conditional mixture keeps only the
        canonical azimuths in each camera's label sector (all of them for overhead views, or when
        the sector holds none). The unconditional / negative branch is never narrowed: as with
        Stable Diffusion, the negative text carries no view suffix.
        """
        cfg = self.config
        if cfg.frames_per_clip > 1 and cameras.frames != cfg.frames_per_clip:
            raise ValueError(
                f"a clip teacher of frames_per_clip={cfg.frames_per_clip} got cameras with frames={cameras.frames}"
            )
        labels = cameras.view_labels(cfg.front_threshold_deg, cfg.back_threshold_deg, cfg.overhead_threshold_deg)
        labels = labels[:: cfg.frames_per_clip]  # one label per sample: a clip's is its first frame's
        reference = cameras.with_resolution(cfg.resolution, cfg.resolution)
        narrow_to = labels if view_dependent else None
        cond = self._mixture((prompt_state.scene,), reference, narrow_to, cfg.sigma_data)
        negative = prompt_state.negative_scene
        # A negative prompt is a text condition like the prompt (sigma_data); the empty prompt is broad.
        if negative is not None:
            uncond_scenes, uncond_sigma = (negative,), cfg.sigma_data
        else:
            uncond_scenes, uncond_sigma = self.unconditional_scenes, cfg.unconditional_sigma
        # The unconditional mixture is most of the cost; skip it when CFG will not use it.
        uncond = self._mixture(uncond_scenes, reference, None, uncond_sigma) if with_unconditional else None
        return Conditioning(cond=cond, uncond=uncond, view_labels=labels)

    def predict_noise(self, x_t: Tensor, t: Tensor, conditioning: Conditioning) -> NoisePrediction:
        """The exact eps of both branches, each [B, C, h, w]."""
        alpha, sigma = self._alpha_sigma(t, x_t)
        cond, uncond = conditioning.cond, conditioning.uncond
        return NoisePrediction(
            cond=mixture_eps(x_t, alpha, sigma, cond.means, cond.log_weights, cond.sigma),
            uncond=None
            if uncond is None
            else mixture_eps(x_t, alpha, sigma, uncond.means, uncond.log_weights, uncond.sigma),
        )

    def posterior_mean(self, x_t: Tensor, t: Tensor, payload: MixturePayload) -> Tensor:
        """Exact E[x0 | x_t] [B, C, h, w] under one branch's mixture."""
        alpha, sigma = self._alpha_sigma(t, x_t)
        return mixture_posterior_mean(x_t, alpha, sigma, payload.means, payload.log_weights, payload.sigma)

    def text_embedding(self, prompts: list[str]) -> Tensor:
        """[B, embedding_tokens, embedding_dim] frozen token embeddings, built like CLIP's input layer:
        one fixed random vector per vocabulary word plus one per token position, a pad vector in
        unused slots. Word-level only (articles dropped, aliases folded): nothing of the parsed scene
        (placement, scale, albedo) is in it, so a generator must learn what the words mean."""
        words_table, positions, pad = self._token_tables()
        rows = []
        for prompt in prompts:
            parse_prompt(prompt)  # the same errors as encode_prompt for an unusable prompt
            words = [COLOR_ALIASES.get(w, w) for w in prompt.strip().lower().rstrip(".!?,;: \t\n").split() if w not in ARTICLES]
            if len(words) > self.config.embedding_tokens:
                raise ValueError(
                    f"prompt {prompt!r} has {len(words)} words; teacher.embedding_tokens={self.config.embedding_tokens}"
                )
            tokens = [words_table[w] for w in words] + [pad] * (self.config.embedding_tokens - len(words))
            rows.append(torch.stack(tokens) + positions)
        return torch.stack(rows).to(self.background.device)

    def text_embedding_identity(self) -> str:
        cfg = self.config
        return f"analytic-tokens-d{cfg.embedding_dim}-t{cfg.embedding_tokens}-s{cfg.embedding_seed}"

    def _token_tables(self) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Word vectors, position vectors [T, D] and the pad vector, from ``embedding_seed``."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.embedding_seed)
        vocabulary = ["on", *PALETTE, *SHAPES]  # fixed order: the same seed gives the same vectors
        table = torch.randn(len(vocabulary) + 1, cfg.embedding_dim, generator=generator)
        positions = 0.5 * torch.randn(cfg.embedding_tokens, cfg.embedding_dim, generator=generator)
        return dict(zip(vocabulary, table)), positions, table[-1]

    # ------------------------------------------------------------------ ground truth

    def reference_images(self, scene: Scene, cameras: Cameras) -> Tensor:
        """x0* [B, C, h, w]: the encoded reference render of ``scene`` at the teacher resolution."""
        res = self.config.resolution
        with torch.no_grad():
            rgb, _ = scene.render(cameras.with_resolution(res, res), self.config.supersample, self.background,
                                  image=self.config.image)
            return self.encode_images(rgb.to(self.background.device))

    def marginal_times(self, scene: Scene) -> Tensor:
        """The times of the image teacher's time-marginal of ``scene`` ([0.] when it is static)."""
        count = self.config.marginal_times if scene.is_dynamic and self.frames_per_clip == 1 else 1
        return torch.linspace(0.0, 1.0, count) if count > 1 else torch.zeros(1)

    def ground_truth(self, prompt_state: AnalyticPromptState, cameras: Cameras) -> Tensor:
        """rgb [B, H, W, 3] in [0, 1] of the prompt's scene at the cameras' own resolution."""
        with torch.no_grad():
            return prompt_state.scene.render(cameras, self.config.supersample, self.background, image=self.config.image)[0]

    def ground_truth_mesh(self, prompt_state: AnalyticPromptState, resolution: int = 128) -> trimesh.Trimesh:
        """The prompt's scene as a ``trimesh.Trimesh`` (marching cubes of its SDF, world coordinates; t = 0)."""
        return prompt_state.scene.mesh(resolution=resolution)

    # ------------------------------------------------------------------ student

    def make_student(self) -> "AnalyticStudent":
        """The analytic conditional eps plus a zero-initialised conv residual (trainable); of a clip
        teacher, a clip student (the residual runs frame by frame, see :class:`AnalyticStudent`)."""
        cfg = self.config
        return AnalyticStudent(
            self.alphas_cumprod.detach().clone(), cfg.sigma_data, self.channels,
            cfg.student_camera_dim, cfg.student_hidden_channels,
        ).to(self.alphas_cumprod.device)

    # ------------------------------------------------------------------ internals

    def _alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod.to(like.device)[t.long()].to(torch.float64)
        return abar.sqrt(), (1.0 - abar).sqrt()

    def _allowed_azimuths(self, labels: list[str] | None, batch: int, device: torch.device) -> Tensor:
        """[B, A] bool: which canonical azimuths each sample's mixture keeps."""
        cfg = self.config
        azimuths = wrap_azimuth(torch.tensor(cfg.canonical_azimuths_deg, dtype=torch.float32)).abs()
        everything = torch.ones(batch, len(azimuths), dtype=torch.bool)
        if labels is None:
            return everything.to(device)
        sector = {
            "front": azimuths < cfg.front_threshold_deg,
            "back": azimuths > 180.0 - cfg.back_threshold_deg,
        }
        sector["side"] = ~(sector["front"] | sector["back"])
        rows = []
        for label in labels:
            keep = sector.get(label)  # overhead keeps everything
            if keep is None or not bool(keep.any()):
                if keep is not None:
                    logger.debug("no canonical azimuth in the %s sector; keeping the whole mixture", label)
                keep = everything[0]
            rows.append(keep)
        return torch.stack(rows).to(device)

    def _mixture(
        self, scenes: tuple[Scene, ...], cameras: Cameras, narrow_to: list[str] | None, sigma: float
    ) -> MixturePayload:
        """Equal-weight mixture over ``scenes``, each at the true camera or at the canonical azimuths
        (and, for the image teacher on a moving scene, at each of its ``marginal_times``)."""
        B, device = len(cameras) // self.frames_per_clip, self.background.device
        if self.config.camera_aware:
            components, names = [], []
            for scene in scenes:
                times = self.marginal_times(scene)
                if scene.is_dynamic and self.frames_per_clip == 1:  # motion-blind: every time is a component
                    components += [self.reference_images(scene, cameras.with_time(float(t))) for t in times]
                    names += [f"{scene.slug}@t{float(t):.3g}" for t in times]
                else:  # static scenes, and clips at their own times
                    components.append(self.reference_images(scene, cameras))
                    names.append(scene.slug)
            means = torch.stack(components, dim=1)
            log_weights = torch.full((B, len(components)), -math.log(len(components)), device=device)
            return MixturePayload(means, log_weights, tuple(names), sigma)
        if any(scene.is_dynamic for scene in scenes):
            raise ValueError("teacher.camera_aware=false supports static prompts only")

        azimuths = self.config.canonical_azimuths_deg
        A = len(azimuths)
        allowed = self._allowed_azimuths(narrow_to, B, device)  # [B, A]
        # Render only the (sample, azimuth) pairs that carry weight, all in one batch per scene.
        sample_index, azimuth_index = allowed.nonzero(as_tuple=True)
        camera_index = sample_index.to(cameras.device)
        canonical = orbit_cameras(
            cameras.elevation_deg[camera_index],
            torch.tensor(azimuths, dtype=torch.float32, device=cameras.device)[azimuth_index.to(cameras.device)],
            cameras.distance[camera_index],
            torch.rad2deg(cameras.fovy[camera_index]),
            cameras.width,
            cameras.height,
        )
        means = torch.zeros(B, len(scenes) * A, self.channels, self.sample_size, self.sample_size, device=device)
        for i, scene in enumerate(scenes):
            means[sample_index, i * A + azimuth_index] = self.reference_images(scene, canonical).to(device)
        per_sample = torch.log(allowed.sum(dim=1, keepdim=True).double() * len(scenes)).float()
        log_weights = torch.where(allowed, -per_sample, -math.inf).repeat(1, len(scenes))
        names = tuple(f"{scene.slug}@az{azimuth:g}" for scene in scenes for azimuth in azimuths)
        return MixturePayload(means, log_weights, names, sigma)


# ------------------------------------------------------------------------------- student


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of integer timesteps [B] (the DDPM/transformer one)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float().unsqueeze(1) * frequencies.unsqueeze(0)
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(embedding, (0, dim - 2 * half))


class AnalyticStudent(nn.Module):
    """The teacher's conditional eps plus a small conv residual, zero at initialisation.

    The residual sees x_t, the teacher's own posterior mean E[x0 | x_t] (its "features", which a
    LoRA adapts inside a real UNet), the timestep and (optionally) a camera embedding [B, D]; a
    missing camera is the zero embedding (threestudio's "cam = 0" branch), so camera dropout works.
    Without the posterior mean the residual could not place anything in the image at high noise
    (x_t is then nearly pure noise and a 3x3 conv stack has no notion of position), so VSD's
    gradient, teacher minus student, stayed near zero (11.9 dB on the quickstart).

    Clips x_t [B, C, F, h, w] (a clip teacher's student): the analytic part is the clip teacher's
    exact eps and posterior mean over whole clips, so frames stay coupled; the residual runs on
    each frame with its clip's timestep and camera (a clip's camera is its first frame's, as its
    view label is).
    """

    def __init__(
        self, alphas_cumprod: Tensor, sigma_data: float, channels: int, camera_dim: int = 4, hidden_channels: int = 32
    ):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.sigma_data = sigma_data
        self.camera_dim = camera_dim
        self.time_embedding_dim = hidden_channels
        self.conv_in = nn.Conv2d(2 * channels, hidden_channels, 3, padding=1)  # [x_t, E[x0 | x_t]]
        self.time_projection = nn.Sequential(
            nn.Linear(hidden_channels, hidden_channels), nn.SiLU(), nn.Linear(hidden_channels, hidden_channels)
        )
        # No bias: the zero embedding (no camera) adds nothing.
        self.camera_projection = nn.Linear(camera_dim, hidden_channels, bias=False)
        self.conv_mid = nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden_channels, channels, 3, padding=1)
        # Zero output layer: the student starts exactly at the teacher, as a fresh LoRA does.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def analytic_eps(self, x_t: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        """The teacher's conditional eps [B, C, h, w] (no trainable part)."""
        abar = self.alphas_cumprod.to(x_t.device)[t.long()].to(torch.float64)
        payload = conditioning.cond
        return mixture_eps(x_t, abar.sqrt(), (1.0 - abar).sqrt(), payload.means, payload.log_weights, payload.sigma)

    def forward(self, x_t: Tensor, t: Tensor, conditioning: Conditioning, camera: Tensor | None = None) -> Tensor:
        """eps [B, C, h, w] (or clips [B, C, F, h, w]) for noisy x_t of that shape, integer timesteps
        t [B], camera embedding [B, D] or None."""
        embedding = self.time_projection(timestep_embedding(t, self.time_embedding_dim).to(x_t.dtype))
        if camera is not None:
            if camera.shape != (x_t.shape[0], self.camera_dim):
                raise ValueError(f"camera embedding must be [B, {self.camera_dim}], got {tuple(camera.shape)}")
            embedding = embedding + self.camera_projection(camera.to(x_t.dtype))
        abar = self.alphas_cumprod.to(x_t.device)[t.long()].to(torch.float64)
        payload = conditioning.cond
        x0_teacher = mixture_posterior_mean(
            x_t, abar.sqrt(), (1.0 - abar).sqrt(), payload.means, payload.log_weights, payload.sigma
        ).to(x_t.dtype)
        frames = x_t.shape[2] if x_t.dim() == 5 else 1
        if x_t.dim() == 5:  # the residual sees one frame at a time, with its clip's embedding
            x_in, x0_in = clips_to_frames(x_t), clips_to_frames(x0_teacher)
            embedding = embedding.repeat_interleave(frames, dim=0)
        else:
            x_in, x0_in = x_t, x0_teacher
        hidden = F.silu(self.conv_in(torch.cat([x_in, x0_in], dim=1)) + embedding[:, :, None, None])
        residual = self.conv_out(F.silu(self.conv_mid(hidden)))
        if x_t.dim() == 5:
            residual = frames_to_clips(residual, frames)
        return self.analytic_eps(x_t, t, conditioning) + residual
