"""Tiny random diffusers models built from config, saved as real model folders (no hub, no network).

``save_tiny_sd`` writes a Stable-Diffusion-layout folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/), ``save_tiny_if`` a DeepFloyd-IF-stage-I-layout one
(unet/ with 3 -> 6 channels, a T5 text_encoder/, tokenizer/, scheduler/), ``save_tiny_t2v`` a
ModelScope/Zeroscope ``TextToVideoSDPipeline`` one (a ``UNet3DConditionModel``) and
``save_tiny_svd`` a ``StableVideoDiffusionPipeline`` one (spatio-temporal UNet, temporal-decoder
VAE, CLIP image encoder, EDM Euler scheduler). The tokenizers are built
from vocabulary files written here, so nothing is fetched. model_index.json is written by hand
(the same JSON ``DiffusionPipeline.save_pretrained`` writes) because importing the pipeline
classes alone costs seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz,"
SD_MAX_TOKENS = 32
"""Tokenizer length of the tiny SD text encoder (77 for real CLIP)."""
IF_MAX_TOKENS = 32
"""Tokenizer length of the tiny IF text encoder (77 for the real pipeline)."""


def _model_index(folder: Path, pipeline: str, components: dict[str, tuple[str, str] | None]) -> None:
    index = {"_class_name": pipeline, "_diffusers_version": "0.27.0"}
    index.update({name: list(value) if value else [None, None] for name, value in components.items()})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def clip_tokenizer(folder: Path, max_length: int = SD_MAX_TOKENS):
    """A character-level CLIP BPE tokenizer built from a vocab.json/merges.txt written into ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in LETTERS:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def t5_tokenizer(max_length: int = IF_MAX_TOKENS):
    """A character-level unigram tokenizer with T5's special tokens (pad 0, eos 1, unk 2).

    Built with the ``tokenizers`` library, so it works with transformers 4 and 5 alike (v4's
    ``T5Tokenizer`` would need a sentencepiece model file).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(c, -1.0) for c in LETTERS]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=max_length
    )


def tiny_sd_unet(cross_attention_dim: int = 16, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=4,
    )


def _save_sd_parts(folder: Path, prediction_type: str, seed: int) -> None:
    """The SD VAE (factor 2), CLIP text encoder, tokenizer and DDIM scheduler shared by SD and text-to-video."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed + 1)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4, sample_size=16,
    ).save_pretrained(folder / "vae")
    torch.manual_seed(seed + 2)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
            max_position_embeddings=SD_MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    ).save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type=prediction_type,
    ).save_pretrained(folder / "scheduler")


def save_tiny_sd(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A complete tiny SD model folder at ``folder``; VAE factor 2, so 16-px images give 8x8 latents."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_sd_unet(seed=seed).save_pretrained(folder / "unet")
    _save_sd_parts(folder, prediction_type, seed)
    _model_index(folder, "StableDiffusionPipeline", {
        "vae": ("diffusers", "AutoencoderKL"), "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"), "unet": ("diffusers", "UNet2DConditionModel"),
        "scheduler": ("diffusers", "DDIMScheduler"), "safety_checker": None, "feature_extractor": None,
    })
    return folder


def tiny_if_unet(text_dim: int = 16, seed: int = 0):
    """Configured like IF stage I: 3 -> 6 channels (learned variance), text projection, simple cross-attention."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=32, encoder_hid_dim=text_dim, attention_head_dim=8, norm_num_groups=4,
        addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn="gelu",
    )


def save_tiny_if(folder: Path, seed: int = 0) -> Path:
    """A complete tiny DeepFloyd-IF stage-I model folder at ``folder``."""
    from diffusers import DDPMScheduler
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = t5_tokenizer()
    tiny_if_unet(seed=seed).save_pretrained(folder / "unet")
    torch.manual_seed(seed + 2)
    T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    ).save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", variance_type="learned_range", prediction_type="epsilon",
        thresholding=True, sample_max_value=1.0,
    ).save_pretrained(folder / "scheduler")
    _model_index(folder, "IFPipeline", {
        "text_encoder": ("transformers", "T5EncoderModel"), "tokenizer": ("transformers", "PreTrainedTokenizerFast"),
        "unet": ("diffusers", "UNet2DConditionModel"), "scheduler": ("diffusers", "DDPMScheduler"),
        "safety_checker": None, "feature_extractor": None, "watermarker": None,
    })
    return folder


def tiny_t2v_unet(cross_attention_dim: int = 16, seed: int = 0):
    """A ``UNet3DConditionModel`` (spatial + temporal attention) on 5-D latents [B, 4, F, h, w]."""
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    return UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=4,
    )


def save_tiny_t2v(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A complete tiny ModelScope/Zeroscope (``TextToVideoSDPipeline``) folder: the SD parts plus a 3-D UNet."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_t2v_unet(seed=seed).save_pretrained(folder / "unet")
    _save_sd_parts(folder, prediction_type, seed)
    _model_index(folder, "TextToVideoSDPipeline", {
        "vae": ("diffusers", "AutoencoderKL"), "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"), "unet": ("diffusers", "UNet3DConditionModel"),
        "scheduler": ("diffusers", "DDIMScheduler"),
    })
    return folder


SVD_FRAMES = 4
"""Frames of the tiny SVD UNet (14 or 25 for the real models)."""
SVD_CLIP_SIZE = 32
"""Input size of the tiny CLIP image encoder (224 for the real one)."""


def save_tiny_svd(folder: Path, seed: int = 0) -> Path:
    """A complete tiny Stable Video Diffusion folder (VAE factor 2).

    The spatio-temporal blocks fix GroupNorm at 32 groups; with 32 channels every group is one
    channel and the norms would erase the timestep embedding's per-channel shift, so 64.

    The scheduler is SVD's: EDM Euler, v-prediction, continuous timesteps ``0.25 ln sigma``.
    """
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(64, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, cross_attention_dim=16,
        num_attention_heads=(2, 2), num_frames=SVD_FRAMES,
    ).save_pretrained(folder / "unet")
    torch.manual_seed(seed + 1)
    AutoencoderKLTemporalDecoder(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, sample_size=16,
    ).save_pretrained(folder / "vae")
    torch.manual_seed(seed + 2)
    CLIPVisionModelWithProjection(
        CLIPVisionConfig(hidden_size=16, projection_dim=16, intermediate_size=32, num_attention_heads=2,
                         num_hidden_layers=2, image_size=SVD_CLIP_SIZE, patch_size=8)
    ).save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": SVD_CLIP_SIZE}, crop_size=SVD_CLIP_SIZE).save_pretrained(
        folder / "feature_extractor"
    )
    EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
        interpolation_type="linear", use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0,
        timestep_spacing="leading", timestep_type="continuous", steps_offset=1,
    ).save_pretrained(folder / "scheduler")
    _model_index(folder, "StableVideoDiffusionPipeline", {
        "vae": ("diffusers", "AutoencoderKLTemporalDecoder"),
        "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
        "unet": ("diffusers", "UNetSpatioTemporalConditionModel"), "scheduler": ("diffusers", "EulerDiscreteScheduler"),
        "feature_extractor": ("transformers", "CLIPImageProcessor"),
    })
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models are all overhead: extra threads only add contention on a shared box.
    Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")`` after importing it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
