"""From a trained generator to assets: ``lift3d generate`` and ``representation.type=generated``.

``lift3d generate CKPT --prompt P [--format glb obj png mp4]`` runs one generator forward pass for
``P`` (any prompt the teacher can embed, in the corpus or not) and writes the usual exports
(``lift3d.train.export_run``: textured GLB/OBJ, turntable PNG/MP4) into
``RUN/generated/<prompt-slug>/`` with ``timing.json`` (forward and export seconds).

``representation.type=generated`` with ``representation.init_from=CKPT`` and
``representation.prompt=P`` starts a ``lift3d run`` from the generator's output for ``P``: the
field's tensors become trainable parameters, so test-time refinement uses the normal loop.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lift3d import registry
from lift3d.cameras import Cameras
from lift3d.checkpoint import load_checkpoint, load_latest_checkpoint, resolve_checkpoint_path
from lift3d.config import RunConfig, TrainerConfig, registered_name
from lift3d.prompts import slugify
from lift3d.registry import register
from lift3d.representations.nerf import NeRFConfig
from lift3d.train import resolve_device

from lift3d.amortized.generators import GeneratedNeRF, Generator, build_generator

logger = logging.getLogger(__name__)


def load_generator(checkpoint: str | Path, device: str = "auto") -> tuple[Generator, Any, Any, Path]:
    """(generator in eval mode, its teacher, the AmortizedConfig, the checkpoint file) of an
    amortized run folder (its newest loadable checkpoint) or checkpoint file."""
    from lift3d.amortized.train import CHECKPOINT_KIND, load_amortized_config

    if Path(checkpoint).is_dir():
        path, state = load_latest_checkpoint(Path(checkpoint))
    else:
        path = resolve_checkpoint_path(checkpoint)
        state = load_checkpoint(path)
    if state.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not an amortized-generator checkpoint (from lift3d amortized)")
    config = load_amortized_config(None, data=state["config"])
    target = resolve_device(device)
    teacher = registry.lookup("teacher", registered_name("teacher", config.teacher)).cls(config.teacher).to(target)
    teacher.requires_grad_(False)
    tokens, dim = state["embedding_shape"]
    generator = build_generator(config.generator, tokens, dim).to(target)
    generator.load_state_dict(state["generator"])
    generator.eval()
    return generator, teacher, config, path


@dataclass
class GeneratedAsset:
    """What ``lift3d.train.export_run`` needs of a run: config, folder, representation, device, renders."""

    config: RunConfig
    run_dir: Path
    representation: GeneratedNeRF
    device: torch.device
    background: Tensor

    @torch.no_grad()
    def render_views(self, cameras: Cameras) -> Tensor:
        self.representation.eval()
        chunk = max(1, self.config.trainer.render_chunk_pixels // (cameras.width * cameras.height))
        images = [self.representation.render(cameras[i : i + chunk].to(self.device), self.background).rgb.cpu()
                  for i in range(0, len(cameras), chunk)]
        return torch.cat(images)


def generate(checkpoint: str | Path, prompt: str, formats: list[str] | None = None, out: str | Path | None = None,
             device: str = "auto") -> dict[str, Any]:
    """``lift3d generate``: forward pass + export; returns the timings and written files."""
    from lift3d.train import export_run

    from lift3d.kernels._backend import prepare_kernels

    generator, teacher, config, path = load_generator(checkpoint, device)
    if config.trainer.threads > 0:
        torch.set_num_threads(config.trainer.threads)
    target = next(generator.parameters()).device
    prepare_kernels(target)  # built/loaded before the clock starts: the forward pass alone is timed
    start = time.perf_counter()
    with torch.no_grad():
        embedding = teacher.text_embedding([prompt]).to(target)
        representation = generator.representation(embedding)
    forward_s = time.perf_counter() - start
    run_dir = Path(out) if out else path.parent.parent / "generated" / slugify(prompt)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_config = RunConfig(name=config.name, prompt=prompt, representation=None, teacher=config.teacher,
                           guidance=config.guidance, trainer=TrainerConfig(eval=config.trainer.eval), export=config.export)
    background = getattr(teacher, "background", torch.ones(3)).to(target)
    asset = GeneratedAsset(run_config, run_dir, representation, target, background)
    start = time.perf_counter()
    written, _ = export_run(asset, formats or config.export.formats)
    export_s = time.perf_counter() - start
    result = {"prompt": prompt, "checkpoint": str(path), "forward_s": forward_s, "export_s": export_s,
              "files": [str(p) for p in written]}
    (run_dir / "timing.json").write_text(json.dumps(result, indent=1))
    logger.info("generated %r: forward %.3fs, export %.2fs -> %s", prompt, forward_s, export_s, run_dir)
    return result


@dataclass
class GeneratedInitConfig:
    """A NeRF initialised from an amortized generator's output for one prompt (test-time refinement)."""

    init_from: str = ""
    """Amortized run folder or checkpoint file (``lift3d amortized``)."""
    prompt: str = ""
    """The prompt to generate (usually the run's own prompt)."""
    lr: float = 0.001
    """Adam learning rate of the field's parameters (hash grid and head, planes or volume)."""
    device: str = "auto"
    """Where the generator runs while initialising (the trainer then moves the representation)."""

    def __post_init__(self) -> None:
        if not self.init_from or not self.prompt:
            raise ValueError("representation.init_from (an amortized checkpoint) and representation.prompt are required")


@register("representation", "generated", GeneratedInitConfig)
class GeneratedRepresentation(GeneratedNeRF):
    """``GeneratedNeRF`` whose field is the generator's output for ``prompt``, as trainable parameters."""

    def __init__(self, config: GeneratedInitConfig, generator: torch.Generator | None = None):
        model, teacher, _, _ = load_generator(config.init_from, config.device)
        with torch.no_grad():
            embedding = teacher.text_embedding([config.prompt]).to(next(model.parameters()).device)
            made = model.representation(embedding, lr=config.lr)
        nerf: NeRFConfig = made.config
        super().__init__(nerf, made.field, lr=config.lr)
        self.grid.load_state_dict(made.grid.state_dict())
        self.init_config = config
