"""The one loop: cameras -> Representation.render -> Teacher/Guidance -> loss -> optimizer step.

This is the only module that knows all four interfaces. A ``Run`` owns the run folder
(``config.yaml``, ``ckpt/``, ``metrics.jsonl``, ``images/``, ``export/``), checkpoints atomically
(also on Ctrl-C), resumes bit for bit, evaluates against ground truth when the teacher has it,
and exports at the end.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d import registry
from lift3d.cameras import Cameras, OrbitSampler, TurntableConfig, turntable, view_time_grid
from lift3d.checkpoint import (
    load_checkpoint,
    load_latest_checkpoint,
    remove_partial_writes,
    resolve_checkpoint_path,
    run_dir_of_checkpoint,
    save_rotating_checkpoint,
)
from lift3d.config import ResolutionMilestone, RunConfig, dump_config, load_config
from lift3d.export.video import write_strip, write_video
from lift3d.interrupts import RunInterrupted, graceful_stop
from lift3d.kernels._backend import prepare_kernels
from lift3d.metrics import mean_psnr, time_margin_db, time_shifted
from lift3d.optim import adam
from lift3d.profiling import NULL_PROFILER
from lift3d.prompts import slugify
from lift3d.representations.base import Representation
from lift3d.teachers.base import Teacher

logger = logging.getLogger(__name__)

OUTPUTS_ROOT = Path("outputs")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name!r} but no CUDA device is available; use cpu or auto")
    return device


def default_run_dir(config: RunConfig, root: Path = OUTPUTS_ROOT) -> Path:
    """``outputs/<config-name>/<prompt-slug>@<timestamp>``; never outside ``root``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = (root / slugify(config.name) / f"{slugify(config.prompt)}@{stamp}").resolve()
    if root.resolve() not in run_dir.parents:  # belt and braces: slugify already forbids it
        raise ValueError(f"run folder {run_dir} would lie outside {root}")
    return run_dir


def build_teacher(config: RunConfig, device: torch.device) -> Teacher:
    entry = registry.lookup("teacher", _type_of("teacher", config.teacher))
    return entry.cls(config.teacher).to(device)


def build_representation(config: RunConfig, device: torch.device) -> Representation:
    entry = registry.lookup("representation", _type_of("representation", config.representation))
    generator = torch.Generator().manual_seed(config.trainer.seed)
    return entry.cls(config.representation, generator=generator).to(device)


def build_guidance(config: RunConfig, teacher: Teacher):
    entry = registry.lookup("guidance", _type_of("guidance", config.guidance))
    return entry.cls(config.guidance, teacher)


def _type_of(interface: str, section: Any) -> str:
    from lift3d.config import registered_name

    return registered_name(interface, section)


def resolution_at(step: int, default: tuple[int, int], milestones: list[ResolutionMilestone]) -> tuple[int, int]:
    width, height = default
    for milestone in sorted(milestones, key=lambda m: m.step):
        if step >= milestone.step:
            width, height = milestone.width, milestone.height
    return width, height


@dataclass
class RunResult:
    """What a finished (or interrupted) run left behind."""

    run_dir: Path
    step: int
    metrics: dict[str, float]


class Trainer:
    """Optimises one representation for one prompt."""

    def __init__(self, config: RunConfig, run_dir: Path | None = None, resume: str | Path | None = None):
        self.config = config
        trainer_cfg = config.trainer
        if trainer_cfg.threads > 0:
            torch.set_num_threads(trainer_cfg.threads)
        self.device = resolve_device(trainer_cfg.device)
        # Everything that can fail on bad input happens before the run folder exists.
        resume_state = None
        if resume:
            if Path(resume).is_dir():  # a run folder: its newest checkpoint that loads
                resume_path, resume_state = load_latest_checkpoint(Path(resume))
            else:  # a file the user named: that one or an error
                resume_path = resolve_checkpoint_path(resume)
                resume_state = load_checkpoint(resume_path)
            run_dir = run_dir or run_dir_of_checkpoint(resume_path)
            logger.info("resuming from %s", resume_path)
        torch.manual_seed(trainer_cfg.seed)
        self.teacher = build_teacher(config, self.device)
        self.teacher.requires_grad_(False)
        self.prompt_state = self.teacher.encode_prompt(config.prompt, config.negative_prompt)
        self.representation = build_representation(config, self.device)
        self.guidance = build_guidance(config, self.teacher).to(self.device)
        # Every term's teacher (a hybrid may name its own) is frozen, on the device, with its prompt parsed once.
        self.prompt_states: dict[int, Any] = {id(self.teacher): self.prompt_state}
        for term in self.guidance.terms():
            if id(term.teacher) not in self.prompt_states:
                term.teacher.to(self.device).requires_grad_(False)
                self.prompt_states[id(term.teacher)] = term.teacher.encode_prompt(config.prompt, config.negative_prompt)
        self._warn_fixed_clip_times()
        self.term_generator = torch.Generator().manual_seed(trainer_cfg.seed + 2)
        self.camera_sampler = OrbitSampler(trainer_cfg.cameras)
        self.camera_generator = torch.Generator().manual_seed(trainer_cfg.seed + 1)
        self.background = self.teacher.background.to(self.device) if hasattr(self.teacher, "background") else torch.ones(3, device=self.device)
        self.step = 0
        self.profiler = NULL_PROFILER  # benchmarks/step_profile.py swaps in a StageProfiler
        if resume_state is not None:
            self.representation.load_state_dict(resume_state["representation"])
            self.representation.to(self.device)
        self.optimizer = adam(self.representation.param_groups(), eps=1e-15)
        guidance_groups = self.guidance.param_groups()
        self.guidance_optimizer = adam(guidance_groups, weight_decay_decoupled=True) if guidance_groups else None
        if resume_state is not None:
            self._restore(resume_state)

        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
        for sub in ("ckpt", "images", "export"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        remove_partial_writes(self.run_dir / "ckpt")
        dump_config(config, self.run_dir / "config.yaml")
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume_state is not None:
            self._truncate_metrics(self.step)
        logger.info("run folder: %s", self.run_dir)

    def _warn_fixed_clip_times(self) -> None:
        """At ``clip_span`` 1 every clip lands on the same F frame times; a motion-blind frame term
        then alone shapes every other time (measured: the quickstart-4d margin fell from +10 to -1 dB)."""
        terms = self.guidance.terms()
        clip_frames = sorted({term.teacher.frames_per_clip for term in terms if term.teacher.frames_per_clip > 1})
        has_frame_term = any(term.teacher.frames_per_clip == 1 for term in terms)
        span = self.config.trainer.cameras.clip_span
        if self.representation.is_dynamic and clip_frames and has_frame_term and span >= 1.0:
            frames = clip_frames[0]
            logger.warning(
                "trainer.cameras.clip_span=%g puts every %d-frame clip at the same times k/%d; the frame-level "
                "terms alone then decide every other time. Use a span below 1, e.g. %.4g = (F-1)/F.",
                span, frames, frames - 1, (frames - 1) / frames,
            )

    # ----------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "representation": self.representation.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "guidance": self.guidance.state_dict(),
            "guidance_optimizer": self.guidance_optimizer.state_dict() if self.guidance_optimizer else {},
            "torch_rng": torch.get_rng_state(),
            "camera_rng": self.camera_generator.get_state(),
            "term_rng": self.term_generator.get_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.guidance.load_state_dict(state["guidance"])
        if self.guidance_optimizer is not None and state["guidance_optimizer"]:
            self.guidance_optimizer.load_state_dict(state["guidance_optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.camera_generator.set_state(state["camera_rng"])
        if "term_rng" in state:  # checkpoints from before hybrid guidance have none
            self.term_generator.set_state(state["term_rng"])
        if torch.cuda.is_available() and state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        logger.info("resumed at step %d", self.step)

    def save(self) -> Path:
        """Checkpoint the current step (``ckpt/step_<N>.pt``, and ``ckpt/last.pt`` pointing at it)."""
        return save_rotating_checkpoint(self.run_dir / "ckpt", self.step, self.state_dict(),
                                        keep=self.config.trainer.keep_checkpoints)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint we resume from."""
        if not self.metrics_path.exists():
            return
        kept = [
            line for line in self.metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def log_metrics(self, record: dict[str, float]) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------------- loop

    def sample_cameras(self, step: int, frames: int = 1) -> Cameras:
        """Training cameras: ``frames > 1`` clips for a clip teacher, else single frames (at random
        times when the representation is dynamic)."""
        cfg = self.config.trainer
        width, height = resolution_at(step, (cfg.cameras.width, cfg.cameras.height), cfg.resolution_milestones)
        if frames > 1:
            return self.camera_sampler.sample_clips(self.camera_generator, frames, width, height).to(self.device)
        with_time = self.representation.is_dynamic
        return self.camera_sampler.sample(self.camera_generator, width, height, with_time=with_time).to(self.device)

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config.trainer
        stage = self.profiler.stage
        for group in self.optimizer.param_groups:
            scheduled = getattr(self.representation, "learning_rates", lambda s: {})(step)
            if group.get("name") in scheduled:
                group["lr"] = scheduled[group["name"]]
        self.representation.train()
        terms = self.guidance.active_terms(self.term_generator, step)
        several = len(self.guidance.terms()) > 1
        guidance_loss = torch.zeros((), device=self.device)
        guidance_logs: dict[str, float] = {}
        render = None
        for term in terms:
            with stage("camera"):
                cameras = term.objective.own_cameras(step)  # e.g. reconstruction targets; None: the sampler's
                cameras = self.sample_cameras(step, term.teacher.frames_per_clip) if cameras is None else cameras.to(self.device)
            with stage("render"):
                term_render = self.representation.render(cameras, self.background)
            if render is None:  # the first render feeds the regularisers and on_step
                render = term_render
            with stage("guidance"):  # the teacher's calls inside are timed as "teacher" when profiled
                conditioning = term.teacher.condition(
                    self.prompt_states[id(term.teacher)], cameras, view_dependent=cfg.view_dependent_prompts,
                    with_unconditional=term.objective.needs_unconditional,
                )
                output = term.objective(term_render, conditioning, cameras, step)
                guidance_loss = guidance_loss + term.weight * output.loss
            prefix = f"{term.name}/" if several else ""
            guidance_logs.update({f"{prefix}{key}": value for key, value in output.logs.items()})
        if render is None:  # no term drawn this step: regularisers only, on a plain batch
            with stage("camera"):
                cameras = self.sample_cameras(step)
            with stage("render"):
                render = self.representation.render(cameras, self.background)
        with stage("guidance"):
            regularizers = self.representation.regularization(render, step)
            loss = guidance_loss + sum(regularizers.values(), torch.zeros((), device=self.device))
        with stage("logging"):
            logs = {"loss": float(loss.detach()), **guidance_logs}
            logs.update({f"reg/{name}": float(value.detach()) for name, value in regularizers.items()})
        with stage("optimizer"):
            self.optimizer.zero_grad(set_to_none=True)
            if self.guidance_optimizer is not None:
                self.guidance_optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            logger.warning("step %d: non-finite loss, step skipped", step)
            logs["skipped"] = 1.0
            return logs
        with stage("backward"):
            loss.backward()
        with stage("optimizer"):
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.representation.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            if self.guidance_optimizer is not None:
                self.guidance_optimizer.step()
        with stage("hooks"):
            self.representation.on_step(step, render, self.optimizer)
        logs["num_primitives"] = float(getattr(self.representation, "num_gaussians", 0))
        return logs

    def fit(self) -> RunResult:
        """Optimise to ``trainer.steps``, then evaluate and export.

        SIGINT/SIGTERM stop the loop after the step in flight: the step is checkpointed and
        :class:`RunInterrupted` raised (resuming from it continues bit for bit). Checkpoints are
        also written every ``checkpoint_every`` steps and ``checkpoint_every_minutes`` minutes.
        """
        cfg = self.config.trainer
        from tqdm import tqdm

        # Build or load the native kernels now, under their own message, not inside step 1's timing.
        prepare_kernels(self.device)
        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not cfg.progress_bar, dynamic_ncols=True,
            desc=slugify(self.config.prompt)[:30], unit="it", mininterval=0.5,
        )
        last_save = time.monotonic()
        with graceful_stop(f"the run in {self.run_dir}") as stop:
            try:
                while self.step < cfg.steps and not stop.requested:
                    logs = self.train_step(self.step)
                    self.step += 1
                    with self.profiler.stage("logging"):
                        bar.update(1)
                        bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)
                        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                            self.log_metrics({"step": self.step, **logs})
                        if cfg.val_every and self.step % cfg.val_every == 0:
                            self.save_validation(f"val_{self.step:06d}.png")
                        due_by_steps = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                        due_by_time = cfg.checkpoint_every_minutes and time.monotonic() - last_save >= 60.0 * cfg.checkpoint_every_minutes
                        if (due_by_steps or due_by_time) and self.step < cfg.steps:
                            self.save()
                            last_save = time.monotonic()
                    self.profiler.step_done()
            finally:
                bar.close()
            path = self.save()
            if stop.requested:
                raise RunInterrupted(stop.signum, self.step, path, self.run_dir)
        metrics = self.finish()
        return RunResult(self.run_dir, self.step, metrics)

    # ----------------------------------------------------------------------- evaluation & export

    @torch.no_grad()
    def render_views(self, cameras: Cameras) -> Tensor:
        """RGB [N, H, W, 3] in [0, 1] of ``cameras``, rendered in groups of at most
        ``trainer.render_chunk_pixels`` pixels; latent renders are decoded by the teacher."""
        self.representation.eval()
        chunk = max(1, self.config.trainer.render_chunk_pixels // (cameras.width * cameras.height))
        images = []
        for i in range(0, len(cameras), chunk):
            rgb = self.representation.render(cameras[i : i + chunk].to(self.device), self.background).rgb
            if rgb.shape[-1] != 3:  # latents (Latent-NeRF): the teacher's decoder, back to the camera size
                decoded = self.teacher.decode(rgb.permute(0, 3, 1, 2).float())
                rgb = F.interpolate(decoded.permute(0, 3, 1, 2), size=(cameras.height, cameras.width),
                                    mode="area" if decoded.shape[1] >= cameras.height else "bilinear")
                rgb = rgb.permute(0, 2, 3, 1)
            images.append(rgb.cpu())
        return torch.cat(images)

    def save_validation(self, name: str) -> None:
        write_strip(self.run_dir / "images" / name, self.render_views(turntable(self.config.trainer.eval)))

    def eval_cameras(self) -> Cameras:
        """The held-out (view x time) grid: the eval turntable at ``trainer.eval_times`` times."""
        cfg = self.config.trainer
        num_times = cfg.eval_times or (8 if self.representation.is_dynamic else 1)
        return view_time_grid(cfg.eval, num_times) if num_times > 1 else turntable(cfg.eval)

    def evaluate(self) -> dict[str, float]:
        """``eval/psnr`` over the held-out (view x time) grid against the teacher's ground truth, if
        it has one; with several times also ``eval/time_margin_db`` (see ``lift3d.metrics``)."""
        if not hasattr(self.teacher, "ground_truth"):
            return {}
        cameras = self.eval_cameras()
        prediction = self.render_views(cameras)
        target = self.teacher.ground_truth(self.prompt_state, cameras.to(self.device)).cpu()
        strip = torch.cat([prediction, target], dim=1)
        if cameras.frames > 1:  # one row per time, views side by side
            strip = strip.view(-1, cameras.frames, *strip.shape[1:]).transpose(0, 1)
            strip = torch.cat(list(strip), dim=1)
        write_strip(self.run_dir / "images" / "eval.png", strip)
        metrics = {"eval/psnr": mean_psnr(prediction, target)}
        if cameras.frames > 1:
            span = self.config.trainer.cameras.clip_span
            if abs(cameras.frames * span / 2 - round(cameras.frames * span / 2)) > 1e-6:
                logger.warning(
                    "eval/time_margin_db: trainer.eval_times=%d times clip_span=%g / 2 is not whole, so the shift "
                    "does not permute the grid and a static result need not score 0", cameras.frames, span,
                )
            shifted = cameras.with_time(time_shifted(cameras.times(), span))
            shifted_target = self.teacher.ground_truth(self.prompt_state, shifted.to(self.device)).cpu()
            metrics["eval/time_margin_db"] = time_margin_db(prediction, target, shifted_target)
        return metrics

    def finish(self) -> dict[str, float]:
        self.save_validation("final.png")
        metrics = self.evaluate()
        _, mesh = export_run(self, self.config.export.formats)
        if mesh is not None and hasattr(self.teacher, "ground_truth_mesh"):
            from lift3d.export.mesh import chamfer_distance

            metrics["eval/chamfer"] = chamfer_distance(mesh, self.teacher.ground_truth_mesh(self.prompt_state))
        if metrics:
            self.log_metrics({"step": self.step, **metrics})
            logger.info("eval: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics


MEDIA_FORMATS = ("png", "mp4")
MESH_FORMATS = ("glb", "obj")


def trimesh_of(vertices, faces) -> "trimesh.Trimesh":  # noqa: F821
    """A welded trimesh of UV-split arrays (for Chamfer scoring)."""
    import trimesh

    return trimesh.Trimesh(vertices, faces, process=True)


def export_run(trainer: Trainer, formats: list[str]) -> tuple[list[Path], "trimesh.Trimesh | None"]:  # noqa: F821
    """Write the requested formats into ``<run>/export``: the representation's own files
    (e.g. ply), a textured mesh (glb/obj) and rendered media (png/mp4). Returns the files and
    the exported mesh, if any."""
    cfg = trainer.config.export
    directory = trainer.run_dir / "export"
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    from lift3d.export.animated import DYNAMIC_FORMATS, export_dynamic, turntable_over_time

    native = [f for f in formats if f not in MEDIA_FORMATS + MESH_FORMATS + DYNAMIC_FORMATS]
    if native:
        written += trainer.representation.export(directory, native)
    dynamic = [f for f in formats if f in DYNAMIC_FORMATS]
    if dynamic:
        written += export_dynamic(trainer, dynamic)
    mesh = None
    mesh_formats = [f for f in formats if f in MESH_FORMATS]
    if mesh_formats:
        if not hasattr(trainer.representation, "surface"):
            raise ValueError(f"{type(trainer.representation).__name__} cannot export {mesh_formats}")
        from lift3d.export.gltf import export_textured_mesh, write_textured_mesh

        textured = getattr(trainer.representation, "textured_surface", lambda: None)()
        if textured is not None:  # the representation has its own UVs and texture
            vertices, faces, uvs, texture = textured
            written += write_textured_mesh(directory, vertices, faces, uvs, texture, formats=mesh_formats)
            mesh = trimesh_of(vertices, faces)
        else:
            mesh, color_fn = trainer.representation.surface(chunk=cfg.query_chunk)
            # Query the colour field where it lives (a GPU run's field cannot take CPU points).
            written += export_textured_mesh(directory, mesh, color_fn, formats=mesh_formats,
                                            texture_size=cfg.texture_size, device=str(trainer.device),
                                            chunk=cfg.query_chunk)
    size = cfg.video_resolution
    eval_cfg = trainer.config.trainer.eval
    if "png" in formats:
        views = TurntableConfig(cfg.strip_views, eval_cfg.elevation_deg, eval_cfg.distance, eval_cfg.fovy_deg, 0.0, size, size)
        write_strip(directory / "turntable.png", trainer.render_views(turntable(views)))
        written.append(directory / "turntable.png")
    if "mp4" in formats:
        views = TurntableConfig(cfg.video_frames, eval_cfg.elevation_deg, eval_cfg.distance, eval_cfg.fovy_deg, 0.0, size, size)
        # A dynamic scene's turntable runs its clock too: one orbit while t goes 0 -> 1.
        cameras = turntable_over_time(views) if trainer.representation.is_dynamic else turntable(views)
        write_video(directory / "turntable.mp4", trainer.render_views(cameras), cfg.video_fps)
        written.append(directory / "turntable.mp4")
    for path in written:
        logger.info("exported %s", path)
    return written, mesh


def run(config_path: str | None, overrides: list[str], prompt: str | None = None, out: str | None = None,
        resume: str | None = None) -> RunResult:
    """``lift3d run``: validate everything, then optimise, evaluate and export."""
    config = load_config(config_path, overrides, prompt=prompt)
    trainer = Trainer(config, run_dir=Path(out) if out else None, resume=resume)
    return trainer.fit()


def open_run(run_dir: str | Path) -> Trainer:
    """A trainer restored from a run folder's config and last checkpoint (for export); the last
    stage's for a pipeline run folder."""
    from lift3d.pipeline import last_stage_dir

    run_dir = last_stage_dir(Path(run_dir)) or Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run folder (no config.yaml)")
    config = load_config(config_path)
    return Trainer(config, run_dir=run_dir, resume=run_dir)


def elapsed(start: float) -> str:
    seconds = time.perf_counter() - start
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s" if seconds >= 60 else f"{seconds:.1f}s"

