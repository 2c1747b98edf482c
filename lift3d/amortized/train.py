"""``lift3d amortized CONFIG``: train one prompt-conditioned generator over a prompt corpus.

Every step renders ``prompts_per_step`` prompts per rank (``trainer.cameras.batch_size`` views
each) through their generated fields and applies the configured Guidance against the Teacher,
exactly as ``lift3d run`` does for one prompt; the loss is the mean over the step's samples.

Data parallelism (``torchrun --nproc_per_node=N -m lift3d amortized CONFIG``): DDP, gloo on CPU
and NCCL on GPU. The corpus is walked in seeded epochs (a permutation per epoch); global sample
``g`` of step ``s`` is ``s * G + i`` with ``G = world * prompts_per_step``, and rank ``r`` takes
the slice ``[r * b, (r + 1) * b)`` of every step, so the ranks' shards are disjoint. All
randomness of a sample (its cameras, ray jitter, timesteps and noise) is seeded by ``g``, so N
ranks with ``b`` prompts each compute the same update as one rank with ``N * b``, and a checkpoint
resumes on any world size. Rank 0 writes checkpoints (atomic, ``lift3d.checkpoint``), metrics and
the evaluation; SIGINT/SIGTERM stop every rank after the step in flight, as ``lift3d run``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from lift3d import registry
from lift3d.batch import Shard
from lift3d.cameras import OrbitSampler, OrbitSamplerConfig, TurntableConfig, turntable
from lift3d.checkpoint import load_latest_checkpoint, remove_partial_writes, save_rotating_checkpoint
from lift3d.config import (
    ConfigError, ExportConfig, _build_pluggable, _suggest, apply_override, build_dataclass, parse_override, read_yaml,
    registered_name, to_dict,
)
from lift3d.interrupts import RunInterrupted, graceful_stop
from lift3d.kernels._backend import prepare_kernels
from lift3d.metrics import mean_psnr
from lift3d.optim import adam
from lift3d.prompts import load_prompts, slugify
from lift3d.train import resolve_device

from lift3d.amortized.embeddings import CorpusEmbeddings
from lift3d.amortized.generators import GeneratedNeRF, Generator, build_generator

logger = logging.getLogger(__name__)

OUTPUTS_ROOT = Path("outputs")
CHECKPOINT_KIND = "amortized-generator"


@dataclass
class AmortizedTrainerConfig:
    """The amortized training loop."""

    steps: int = 2000
    """Optimizer steps."""
    prompts_per_step: int = 4
    """Prompts per step on each rank (the global batch is this times the world size)."""
    seed: int = 0
    """Seed of the generator's initialisation, the corpus order and every sample's randomness."""
    device: str = "auto"
    """``auto`` (cuda when available, ``cuda:LOCAL_RANK`` under torchrun), ``cpu`` or ``cuda[:i]``."""
    threads: int = 0
    """CPU threads (0 = torch's default; under torchrun the cores are shared out between local ranks)."""
    cameras: OrbitSamplerConfig = field(default_factory=lambda: OrbitSamplerConfig(batch_size=1))
    """Random training cameras of each prompt (``batch_size`` = views per prompt)."""
    view_dependent_prompts: bool = True
    """Condition the teacher on each camera's view label."""
    max_grad_norm: float = 0.0
    """Clip the generator's total gradient norm (0 = off)."""
    eval: TurntableConfig = field(default_factory=lambda: TurntableConfig(num_views=4, azimuth_offset_deg=22.5))
    """Held-out turntable of the evaluation (no test-time optimisation)."""
    eval_prompts: int = 0
    """Prompts of each split scored at the end (0 = all)."""
    chamfer_prompts: int = 1
    """Prompts of each split whose extracted mesh is scored by Chamfer distance (0 = none)."""
    clip_model: str = ""
    """CLIP model (hub id or folder) for ScaleDreamer's CLIP similarity and R@1 on teachers without
    ground truth ("" = skip)."""
    embedding_cache: str = ""
    """Folder of the memory-mapped corpus text embeddings ("" = ``corpus/`` in the user cache of
    text embeddings, ``~/.cache/lift3d/embeddings``; ``off`` = keep them in memory only)."""
    log_every: int = 10
    """Write a metrics.jsonl line every N steps."""
    checkpoint_every: int = 0
    """Also checkpoint every N steps (0 = by time only)."""
    checkpoint_every_minutes: float = 10.0
    """Checkpoint when this many minutes passed since the last (0 = off)."""
    keep_checkpoints: int = 3
    """Step checkpoints kept."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.prompts_per_step < 1:
            raise ValueError(f"steps must be >= 0 and prompts_per_step >= 1, got {self.steps}, {self.prompts_per_step}")


@dataclass
class AmortizedConfig:
    """A whole amortized run."""

    name: str
    """Config name; runs land in ``outputs/<name>/amortized@<timestamp>``."""
    corpus: str
    """Prompt corpus (text file or JSON with splits, see ``lift3d.prompts.load_prompts``)."""
    generator: Any
    """The generator (chosen by ``generator.type``: hyper-ingp, triplane, voxel-3dconv)."""
    teacher: Any
    """The teacher (``teacher.type``)."""
    guidance: Any
    """The guidance objective (``guidance.type``)."""
    train_split: str = "train"
    """Split trained on ("" = every prompt of the corpus)."""
    heldout_split: str = "test"
    """Split scored as unseen prompts ("" = none)."""
    negative_prompt: str = ""
    """Negative prompt of every sample."""
    trainer: AmortizedTrainerConfig = field(default_factory=AmortizedTrainerConfig)
    """The loop."""
    export: ExportConfig = field(default_factory=lambda: ExportConfig(formats=["glb"]))
    """Default formats and sizes of ``lift3d generate``."""


TOP_KEYS = tuple(f.name for f in dataclasses.fields(AmortizedConfig))


def build_amortized_config(data: dict) -> AmortizedConfig:
    """Validate a raw mapping; errors name the key and the valid choices."""
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"unknown key {key!r}{_suggest(key, list(TOP_KEYS))}; valid keys: {', '.join(TOP_KEYS)}")
    for key in ("name", "corpus"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ConfigError(f"{key!r} must be a non-empty string")
    return AmortizedConfig(
        name=data["name"], corpus=data["corpus"],
        generator=_build_pluggable("generator", data.get("generator")),
        teacher=_build_pluggable("teacher", data.get("teacher")),
        guidance=_build_pluggable("guidance", data.get("guidance")),
        train_split=build_dataclass_str(data, "train_split", "train"),
        heldout_split=build_dataclass_str(data, "heldout_split", "test"),
        negative_prompt=build_dataclass_str(data, "negative_prompt", ""),
        trainer=build_dataclass(AmortizedTrainerConfig, data.get("trainer"), "trainer"),
        export=build_dataclass(ExportConfig, data.get("export", {"formats": ["glb"]}), "export"),
    )


def build_dataclass_str(data: dict, key: str, default: str) -> str:
    value = data.get(key, default)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def is_amortized(path: str | Path) -> bool:
    """Whether a YAML preset is a ``lift3d amortized`` config (it names a corpus and a generator)."""
    data = read_yaml(Path(path))
    return "corpus" in data and "generator" in data


def load_amortized_config(path: str | Path | None, overrides: list[str] = (), data: dict | None = None) -> AmortizedConfig:
    """A YAML preset (or ``data``) with ``key.sub=value`` overrides, validated."""
    if data is None:
        data = {}
        if path is not None:
            data = read_yaml(Path(path))
            data.setdefault("name", Path(path).stem)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    return build_amortized_config(data)


def amortized_to_dict(config: AmortizedConfig) -> dict:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in ("generator", "teacher", "guidance"):
            out[f.name] = {"type": registered_name(f.name, value), **to_dict(value)}
        else:
            out[f.name] = to_dict(value)
    return out


# ------------------------------------------------------------------------------ the trainer


def sample_seed(seed: int, index: int) -> int:
    """The seed of global sample ``index``: its cameras, ray jitter, timesteps and noise."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


class AmortizedTrainer:
    """Trains a generator on a corpus; one per rank under torchrun."""

    def __init__(self, config: AmortizedConfig, run_dir: Path | None = None, resume: str | Path | None = None,
                 shard: Shard | None = None):
        self.config = config
        cfg = config.trainer
        self.shard = shard or Shard.from_environment()
        self.distributed = self.shard.world > 1
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        elif self.shard.local_world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.shard.local_world))
        device_name = cfg.device
        if device_name == "auto" and torch.cuda.is_available() and self.distributed:
            device_name = f"cuda:{self.shard.local_rank % torch.cuda.device_count()}"
        self.device = resolve_device(device_name)
        self.train_prompts = load_prompts(config.corpus, config.train_split or None)
        self.heldout_prompts = load_prompts(config.corpus, config.heldout_split) if config.heldout_split else []
        resume_state = None
        if resume:
            resume_path, resume_state = load_latest_checkpoint(Path(resume))
            if resume_state.get("kind") != CHECKPOINT_KIND:
                raise ValueError(f"{resume_path} is not an amortized-generator checkpoint")
            run_dir = run_dir or Path(resume)
        torch.manual_seed(cfg.seed)
        self.teacher = registry.lookup("teacher", registered_name("teacher", config.teacher)).cls(config.teacher).to(self.device)
        self.teacher.requires_grad_(False)
        self.guidance = registry.lookup("guidance", registered_name("guidance", config.guidance)).cls(
            config.guidance, self.teacher).to(self.device)
        if self.guidance.param_groups():
            raise ValueError("amortized training needs a guidance without trainable state (e.g. sds, asd, ism, csd), "
                             f"not {registered_name('guidance', config.guidance)!r}")
        from lift3d.teachers.prompting import default_cache_dir

        if cfg.embedding_cache == "off":
            cache = None
        else:
            cache = Path(cfg.embedding_cache).expanduser() if cfg.embedding_cache else default_cache_dir() / "corpus"
        self.embeddings = CorpusEmbeddings(self.teacher, self.train_prompts + self.heldout_prompts, cache)
        tokens, dim = self.embeddings.shape
        torch.manual_seed(cfg.seed)
        self.generator: Generator = build_generator(config.generator, tokens, dim).to(self.device)
        self.step = 0
        if resume_state is not None:
            self.generator.load_state_dict(resume_state["generator"])
        self.optimizer = adam(self.generator.param_groups(), eps=1e-15)
        if resume_state is not None:
            self.optimizer.load_state_dict(resume_state["optimizer"])
            self.step = int(resume_state["step"])
        self.model: torch.nn.Module = self.generator
        if self.distributed:
            self.model = _wrap_ddp(self.generator, self.device)
        self.sampler = OrbitSampler(cfg.cameras)
        self.background = getattr(self.teacher, "background", torch.ones(3)).to(self.device)
        self.prompt_states: dict[str, Any] = {}
        self.is_main = self.shard.rank == 0
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(run_dir) if run_dir else (OUTPUTS_ROOT / slugify(config.name) / f"amortized@{stamp}").resolve()
        if self.is_main:
            for sub in ("ckpt", "images"):
                (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
            remove_partial_writes(self.run_dir / "ckpt")
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(amortized_to_dict(config), sort_keys=False))
            self.metrics_path = self.run_dir / "metrics.jsonl"
            if resume_state is not None and self.metrics_path.exists():
                kept = [line for line in self.metrics_path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= self.step]
                self.metrics_path.write_text("".join(line + "\n" for line in kept))
            logger.info("run folder: %s (%d training prompts, %d held out, world %d)", self.run_dir,
                        len(self.train_prompts), len(self.heldout_prompts), self.shard.world)

    # ----------------------------------------------------------------------- data

    def prompt_state(self, prompt: str) -> Any:
        if prompt not in self.prompt_states:
            self.prompt_states[prompt] = self.teacher.encode_prompt(prompt, self.config.negative_prompt)
        return self.prompt_states[prompt]

    def prompt_of(self, index: int) -> str:
        """The training prompt of global sample ``index`` (seeded epochs over the corpus)."""
        n = len(self.train_prompts)
        epoch, position = divmod(index, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(self.config.trainer.seed, -1 - epoch)))
        return self.train_prompts[int(order[position])]

    def local_indices(self, step: int) -> list[int]:
        b = self.config.trainer.prompts_per_step
        first = step * self.shard.world * b + self.shard.rank * b
        return list(range(first, first + b))

    # ----------------------------------------------------------------------- loop

    def sample_loss(self, field_module: torch.nn.Module, prompt: str, index: int, step: int) -> tuple[Tensor, dict[str, float]]:
        """Render one prompt's field from its seeded cameras and score it with the guidance."""
        cfg = self.config.trainer
        seed = sample_seed(cfg.seed, index)
        torch.manual_seed(seed)  # ray jitter, grid probes, timesteps and noise of this sample
        rep = GeneratedNeRF(self.generator.nerf, field_module).to(self.device)
        rep.refresh_grid()
        cameras = self.sampler.sample(torch.Generator().manual_seed(seed)).to(self.device)
        render = rep.render(cameras, self.background)
        conditioning = self.teacher.condition(self.prompt_state(prompt), cameras, view_dependent=cfg.view_dependent_prompts,
                                              with_unconditional=self.guidance.needs_unconditional)
        output = self.guidance(render, conditioning, cameras, step)
        regularizers = rep.regularization(render, step)
        loss = output.loss + sum(regularizers.values(), torch.zeros((), device=self.device))
        return loss, output.logs

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config.trainer
        self.generator.train()
        indices = self.local_indices(step)
        prompts = [self.prompt_of(i) for i in indices]
        fields = self.model(self.embeddings(prompts).to(self.device))
        losses, logs = [], {}
        for field_module, prompt, index in zip(fields, prompts, indices):
            loss, sample_logs = self.sample_loss(field_module, prompt, index, step)
            losses.append(loss)
            for key, value in sample_logs.items():
                logs[key] = logs.get(key, 0.0) + value / len(indices)
        loss = torch.stack(losses).mean()
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if self.distributed:  # every rank must skip together, or DDP's reducer hangs
            flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            finite = float(flag) == 0.0
        if not finite:
            logger.warning("step %d: non-finite loss, step skipped", step)
            return {"loss": float("nan"), "skipped": 1.0}
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        return {"loss": float(loss.detach()), **logs}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": CHECKPOINT_KIND, "step": self.step, "generator": self.generator.state_dict(),
                "optimizer": self.optimizer.state_dict(), "config": amortized_to_dict(self.config),
                "embedding_shape": list(self.embeddings.shape)}

    def save(self) -> Path | None:
        path = None
        if self.is_main:
            path = save_rotating_checkpoint(self.run_dir / "ckpt", self.step, self.state_dict(),
                                            keep=self.config.trainer.keep_checkpoints)
        self._barrier()
        return path

    def _barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def _mean_across_ranks(self, logs: dict[str, float]) -> dict[str, float]:
        if not self.distributed or not logs:
            return logs
        keys = sorted(logs)
        values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values)
        return {k: float(v) / self.shard.world for k, v in zip(keys, values)}

    def log_metrics(self, record: dict[str, float]) -> None:
        if self.is_main:
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def fit(self) -> dict[str, float]:
        cfg = self.config.trainer
        from tqdm import tqdm

        prepare_kernels(self.device)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress_bar and self.is_main),
                   dynamic_ncols=True, desc="amortized", unit="it", mininterval=0.5)
        start, last_save = time.perf_counter(), time.monotonic()
        with graceful_stop(f"the amortized run in {self.run_dir}") as stop:
            try:
                while self.step < cfg.steps:
                    if self._stop_everywhere(stop.requested):
                        break
                    logs = self.train_step(self.step)
                    self.step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        logs = self._mean_across_ranks(logs)
                        self.log_metrics({"step": self.step, **logs, "time/wall_s": time.perf_counter() - start})
                    due_steps = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                    due_time = cfg.checkpoint_every_minutes and time.monotonic() - last_save >= 60.0 * cfg.checkpoint_every_minutes
                    if self._any_rank(bool(due_steps or due_time)) and self.step < cfg.steps:
                        self.save()
                        last_save = time.monotonic()
            finally:
                bar.close()
            path = self.save()
            if stop.requested or self.step < cfg.steps:
                raise RunInterrupted(stop.signum or 15, self.step, path, self.run_dir)
        train_wall = time.perf_counter() - start
        metrics = self.evaluate() if self.is_main else {}
        self._barrier()
        metrics["time/train_s"] = train_wall
        if self.is_main:
            self.log_metrics({"step": self.step, **metrics})
            logger.info("eval: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics

    def _stop_everywhere(self, requested: bool) -> bool:
        """True on every rank once any rank got a stop signal (they must leave the loop together)."""
        return self._any_rank(requested)

    def _any_rank(self, value: bool) -> bool:
        if not self.distributed:
            return value
        flag = torch.tensor([1.0 if value else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return float(flag) > 0.0

    # ----------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def generated(self, prompt: str) -> GeneratedNeRF:
        """The generator's field of ``prompt``, one forward pass, ready to render (eval mode)."""
        self.generator.eval()
        field_module = self.generator(self.embeddings([prompt]).to(self.device))[0]
        rep = GeneratedNeRF(self.generator.nerf, field_module).to(self.device)
        rep.refresh_grid()
        rep.eval()
        return rep

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Ground-truth PSNR / Chamfer (analytic teachers) or CLIP similarity / R@1 (``clip_model``)."""
        cfg = self.config.trainer
        metrics: dict[str, float] = {}
        splits = {"seen": self.train_prompts, "heldout": self.heldout_prompts}
        cameras = turntable(cfg.eval).to(self.device)
        has_truth = hasattr(self.teacher, "ground_truth")
        renders: dict[str, list[Tensor]] = {}
        for split, prompts in splits.items():
            prompts = prompts[: cfg.eval_prompts] if cfg.eval_prompts else prompts
            if not prompts:
                continue
            scores, strips = [], []
            for prompt in prompts:
                rep = self.generated(prompt)
                prediction = rep.render(cameras, self.background).rgb[..., :3].clamp(0, 1).cpu()
                renders.setdefault(split, []).append(prediction)
                if has_truth:
                    target = self.teacher.ground_truth(self.prompt_state(prompt), cameras).cpu()
                    scores.append(mean_psnr(prediction, target))
                    if len(strips) < 4:
                        strips.append(torch.cat([prediction, target], dim=1))
            if has_truth:
                metrics[f"eval/psnr_{split}"] = sum(scores) / len(scores)
                from lift3d.export.video import write_strip

                write_strip(self.run_dir / "images" / f"eval_{split}.png", torch.cat(strips, dim=2))
            if has_truth and cfg.chamfer_prompts and hasattr(self.teacher, "ground_truth_mesh"):
                from lift3d.export.mesh import chamfer_distance

                distances = []
                for prompt in prompts[: cfg.chamfer_prompts]:
                    mesh, _ = self.generated(prompt).surface()
                    distances.append(chamfer_distance(mesh, self.teacher.ground_truth_mesh(self.prompt_state(prompt))))
                metrics[f"eval/chamfer_{split}"] = sum(distances) / len(distances)
        if not has_truth and cfg.clip_model:
            from lift3d.amortized.clip_eval import clip_scores, load_clip

            model, processor = load_clip(cfg.clip_model)
            for split, prompts in splits.items():
                prompts = prompts[: cfg.eval_prompts] if cfg.eval_prompts else prompts
                if prompts:
                    scores = clip_scores(model, processor, renders[split], prompts)
                    metrics.update({f"eval/clip_{k}_{split}": v for k, v in scores.items()})
        return metrics


def _wrap_ddp(generator: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(generator, device_ids=ids)


def run_amortized(config_path: str, overrides: list[str], out: str | None = None) -> dict[str, float]:
    """``lift3d amortized CONFIG [key=value ...] [resume=RUN_DIR]``."""
    rest, resume = [], None
    for item in overrides:
        if item.startswith("resume="):
            resume = item.split("=", 1)[1]
        else:
            rest.append(item)
    config = load_amortized_config(config_path, rest)
    trainer = AmortizedTrainer(config, run_dir=Path(out) if out else None, resume=resume)
    try:
        return trainer.fit()
    finally:
        if trainer.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
