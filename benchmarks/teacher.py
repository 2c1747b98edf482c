"""Teacher benchmark: one SDS step of the Stable Diffusion teacher at full SD-2.1-base size.

The weights are random (no weights can be fetched here) but the architecture is SD 2.1-base's
(UNet 320/640/1280/1280 with linear-projection transformers and 1024-d cross-attention, the
4-channel VAE, the 23-layer OpenCLIP-H text encoder), so time and memory are the real ones.
The model is saved as a diffusers folder and loaded through ``StableDiffusionTeacher``; each
device is measured in a fresh subprocess so its peak memory is its own. One step is split into

    render    a dummy differentiable render (a learnable 16x16 image upsampled to the render size)
    encode    resize to image_size, VAE encode (with autograd)
    unet      add noise + one UNet call on [cond, uncond] (CFG) + the SDS gradient
    backward  the surrogate loss back through the VAE encoder to the render

    python benchmarks/teacher.py                   # CPU (and CUDA when present) -> benchmarks/results/teacher.json
    python benchmarks/teacher.py --save DIR        # keep the random-weight model folder, then time a run:
    lift3d run configs/dreamfusion-sd.yaml teacher.model=DIR trainer.steps=1
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

try:
    import lift3d  # noqa: F401
except ImportError:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("benchmarks.teacher")

RESULTS = Path(__file__).resolve().parent / "results" / "teacher.json"
PHASES = ("render", "encode", "unet", "backward")

# SD 2.1-base component configs (stabilityai/stable-diffusion-2-1-base, written out: no hub access).
UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
    steps_offset=1, prediction_type="epsilon", num_train_timesteps=1000,
)


def save_sd21_base(folder: Path, seed: int = 0) -> Path:
    """Write a random-weight SD-2.1-base diffusers folder (its tokenizer is a character-level stand-in)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    for name, build in (
        ("unet", lambda: UNet2DConditionModel(**UNET_CONFIG)),
        ("vae", lambda: AutoencoderKL(**VAE_CONFIG)),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))),
    ):
        model = build()
        logger.info("%s: %.0fM parameters", name, sum(p.numel() for p in model.parameters()) / 1e6)
        model.save_pretrained(folder / name)
        del model
        gc.collect()
    tokenizer_dir = folder / "tokenizer"
    tokenizer_dir.mkdir(exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 2, "!": 1}
    for char in "abcdefghijklmnopqrstuvwxyz,":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), pad_token="!",
                  model_max_length=77).save_pretrained(tokenizer_dir)
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.27.0",
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


@dataclass
class DeviceResult:
    """Timings (ms, median over repeats) and peak memory (MiB) of one device."""

    device: str
    dtype: str
    load_s: float
    prompt_s: float
    phases_ms: dict[str, float]
    step_ms: float
    peak_memory_mib: dict[str, float]
    """Per phase: CUDA max_memory_allocated, or the process peak RSS so far (ru_maxrss) on CPU."""
    repeats: int
    times_ms: dict[str, list[float]] = field(default_factory=dict)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def measure(args: argparse.Namespace) -> DeviceResult:
    """One device, in this process: load, encode the prompt, then time ``repeats`` SDS steps."""
    from lift3d.guidance.common import surrogate_loss, weighting
    from lift3d.teachers.diffusers_sd import StableDiffusionTeacher, StableDiffusionTeacherConfig
    from lift3d.teachers.prompting import PromptConfig
    from lift3d.cameras import orbit_cameras

    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    config = StableDiffusionTeacherConfig(
        model=str(args.model), image_size=args.image_size, dtype=args.dtype, prompting=PromptConfig(cache=False)
    )
    teacher = StableDiffusionTeacher(config).to(device)
    sync()
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    state = teacher.encode_prompt("a hamburger", "")
    sync()
    prompt_s = time.perf_counter() - start
    B, R = args.batch, args.render
    cameras = orbit_cameras(
        torch.zeros(B), torch.linspace(0, 270, B), torch.full((B,), 3.0), torch.full((B,), 40.0), R, R
    ).to(device)
    conditioning = teacher.condition(state, cameras)
    texture = torch.rand(B, 3, 16, 16, device=device, requires_grad=True)
    generator = torch.Generator(device=device).manual_seed(0)

    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    memory: dict[str, float] = {}
    for repeat in range(args.warmup + args.repeats):
        marks = []
        for phase in PHASES:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            begin = time.perf_counter()
            if phase == "render":
                rgb = torch.nn.functional.interpolate(texture, size=(R, R), mode="bilinear", align_corners=False)
                rgb = torch.sigmoid(rgb).permute(0, 2, 3, 1)
            elif phase == "encode":
                x0 = teacher.encode_images(rgb)
            elif phase == "unet":
                with torch.no_grad():
                    t = torch.randint(20, 981, (B,), device=device, generator=generator)
                    noise = torch.randn(x0.shape, device=device, generator=generator)
                    x_t = teacher.add_noise(x0.detach(), noise, t)
                    eps = teacher.predict_noise(x_t, t, conditioning).cfg(args.guidance_scale)
                    w = weighting("sds", teacher.alphas_cumprod[t]).view(-1, 1, 1, 1)
                    grad = w * (eps - noise)
            else:
                texture.grad = None
                surrogate_loss(x0, grad).backward()
            sync()
            marks.append((phase, (time.perf_counter() - begin) * 1e3))
            memory[phase] = max(
                memory.get(phase, 0.0),
                torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib(),
            )
        if repeat >= args.warmup:
            for phase, ms in marks:
                times[phase].append(ms)
        logger.info("%s step %d: %s", device, repeat, ", ".join(f"{p} {ms:.0f} ms" for p, ms in marks))
    phases_ms = {phase: statistics.median(values) for phase, values in times.items()}
    return DeviceResult(
        device=torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        dtype=str(teacher.compute_dtype).replace("torch.", ""), load_s=load_s, prompt_s=prompt_s,
        phases_ms=phases_ms, step_ms=sum(phases_ms.values()), peak_memory_mib=memory, repeats=args.repeats,
        times_ms=times,
    )


def format_table(results: list[DeviceResult]) -> str:
    phases = " ".join(f"{p + ' ms':>12}" for p in PHASES)
    header = f"{'device':<28} {'dtype':<9} {phases} {'step ms':>10} {'peak MiB':>9}"
    lines = [header, "-" * len(header)]
    for r in results:
        phases = " ".join(f"{r.phases_ms[p]:>12.0f}" for p in PHASES)
        lines.append(f"{r.device:<28} {r.dtype:<9} {phases} {r.step_ms:>10.0f} {max(r.peak_memory_mib.values()):>9.0f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save", type=Path, help="keep the random-weight SD-2.1-base folder here")
    parser.add_argument("--model", type=Path, help="use this model folder instead of building one")
    parser.add_argument("--devices", default="auto", help="comma list of cpu,cuda (auto: cpu, plus cuda when present)")
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)  # internal: measure one device here
    parser.add_argument("--batch", type=int, default=1, help="renders per step")
    parser.add_argument("--render", type=int, default=64, help="render resolution")
    parser.add_argument("--image-size", type=int, default=512, help="VAE input size (latents are 1/8: 64x64)")
    parser.add_argument("--guidance-scale", type=float, default=100.0)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="GPU precision")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default: 1 on CPU, 5 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 0 on CPU, 2 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[DeviceResult]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device is not None:  # child: measure one device and write its result
        cpu = args.device == "cpu"
        args.repeats = args.repeats if args.repeats is not None else (1 if cpu else 5)
        args.warmup = args.warmup if args.warmup is not None else (0 if cpu else 2)
        result = measure(args)
        args.json.write_text(json.dumps(asdict(result)))
        return [result]

    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = args.devices.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            model = args.save or Path(scratch) / "sd21-base-random"
            start = time.perf_counter()
            save_sd21_base(model)
            logger.info("saved the random SD-2.1-base folder to %s (%.0f s)", model, time.perf_counter() - start)
        results = []
        for device in devices:
            out = Path(scratch) / f"{device}.json"
            command = [sys.executable, __file__, "--device", device, "--model", str(model), "--json", str(out)]
            for flag in ("batch", "render", "image_size", "guidance_scale", "dtype", "repeats", "warmup", "threads"):
                value = getattr(args, flag)
                if value is not None:
                    command += [f"--{flag.replace('_', '-')}", str(value)]
            subprocess.run(command, check=True)
            results.append(DeviceResult(**json.loads(out.read_text())))
    print(format_table(results))
    payload = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
        "setup": {"model": "SD-2.1-base architecture, random weights", "batch": args.batch, "render": args.render,
                  "image_size": args.image_size, "latent_size": args.image_size // 8, "cfg": True,
                  "guidance_scale": args.guidance_scale},
        "results": [asdict(r) for r in results],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2))
    logger.info("wrote %s", args.json)
    if args.save:
        logger.info(
            "time a run with: lift3d run configs/dreamfusion-sd.yaml teacher.model=%s trainer.steps=1", args.save
        )
    return results


if __name__ == "__main__":
    main()
