"""Multi-stage runs in one command (Magic3D coarse -> refine, Fantasia3D geometry -> appearance).

A pipeline file is a YAML with a ``stages`` list instead of a single run's sections::

    name: quickstart-mesh
    prompt: a red sphere on a blue cube     # optional: every stage's prompt
    stages:
      - name: coarse
        config: quickstart-nerf.yaml        # a preset, relative to this file
        overrides: ["export.formats=[png]"]
      - name: mesh                          # inline sections are merged over ``config`` (or stand alone)
        representation: {type: dmtet, grid_resolution: 96}
        teacher: {type: analytic}
        ...

Each stage is an ordinary run in ``<run>/<stage name>/`` (its own config.yaml, checkpoints,
metrics and exports). A stage after the first starts from the one before it:
``representation.init_from`` is set to the previous stage's folder unless the stage says
``init_from_previous: false`` (or sets ``init_from`` itself). This replaces threestudio's
hand-chained ``system.geometry_convert_from=<ckpt>`` commands.

Command-line overrides ``<stage>.<key>=value`` reach one stage; ``<key>=value`` reaches every
stage. A stage writes ``done.json`` when it has finished, so ``resume=<run>`` skips finished
stages, resumes the interrupted one from its last checkpoint and goes on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lift3d.config import (
    ConfigError, RunConfig, apply_override, build_run_config, parse_override, read_yaml, registered_name,
)

logger = logging.getLogger(__name__)

RUN_SECTIONS = ("name", "prompt", "negative_prompt", "representation", "teacher", "guidance", "trainer", "export")
STAGE_KEYS = ("name", "config", "overrides", "init_from_previous")
DONE_FILE = "done.json"
PIPELINE_FILE = "pipeline.yaml"


@dataclass
class Stage:
    """One resolved stage of a pipeline."""

    name: str
    """Folder name of the stage inside the pipeline's run folder."""
    data: dict[str, Any]
    """The stage's run config as plain data (preset + inline sections + overrides)."""
    init_from_previous: bool = True
    """Start the representation from the previous stage's run folder."""
    config: RunConfig | None = None
    """``data`` built and validated, once, by ``load_pipeline`` after the overrides (before any stage runs)."""


@dataclass
class Pipeline:
    """A named list of stages."""

    name: str
    """The pipeline's name (the run folder's parent under outputs/)."""
    stages: list[Stage] = field(default_factory=list)
    """The stages in order."""


def is_pipeline(path: str | Path | None) -> bool:
    """Whether a config file is a pipeline (a top-level ``stages`` list)."""
    if path is None or not Path(path).is_file():
        return False
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        return False  # load_config reports the YAML error with its own message
    return isinstance(data, dict) and "stages" in data


def _merge(base: dict, update: dict) -> dict:
    """Deep merge; a section whose ``type`` changes is replaced, not merged (its fields differ)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        old = merged.get(key)
        same_type = isinstance(old, dict) and isinstance(value, dict) and value.get("type", old.get("type")) == old.get("type")
        merged[key] = _merge(old, value) if same_type else copy.deepcopy(value)
    return merged


def load_pipeline(path: str | Path, overrides: list[str] = (), prompt: str | None = None) -> Pipeline:
    """Read a pipeline file, resolve each stage's config and apply the overrides; validates every stage."""
    path = Path(path)
    data = read_yaml(path, "pipeline")
    unknown = sorted(set(data) - {"name", "prompt", "negative_prompt", "stages"})
    if unknown:
        raise ConfigError(f"{path}: unknown pipeline key(s) {unknown}; valid: name, prompt, negative_prompt, stages")
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list")
    stages: list[Stage] = []
    for index, raw in enumerate(raw_stages):
        if not isinstance(raw, dict) or not raw.get("name"):
            raise ConfigError(f"{path}: stage {index} must be a mapping with a 'name'")
        name = str(raw["name"])
        where = f"{path}: stage {name!r}"
        bad = sorted(set(raw) - set(STAGE_KEYS) - set(RUN_SECTIONS[3:]))
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad}; valid: {', '.join(STAGE_KEYS + RUN_SECTIONS[3:])}")
        if name in RUN_SECTIONS or name in (s.name for s in stages) or "/" in name:
            raise ConfigError(f"{where}: stage names must be unique, without '/', and not one of {RUN_SECTIONS}")
        stage_data: dict = {}
        if raw.get("config"):
            stage_data = read_yaml(path.parent / str(raw["config"]), where)
        stage_data = _merge(stage_data, {k: v for k, v in raw.items() if k in RUN_SECTIONS[3:]})
        stage_data["name"] = f"{data.get('name', path.stem)}-{name}"
        for key in ("prompt", "negative_prompt"):
            if key in data:
                stage_data[key] = data[key]
        for text in raw.get("overrides") or []:
            apply_override(stage_data, *parse_override(str(text)))
        stages.append(Stage(name, stage_data, bool(raw.get("init_from_previous", True))))

    names = {stage.name for stage in stages}
    for text in overrides:
        keys, value = parse_override(text)
        targets = [s for s in stages if s.name == keys[0]] if keys[0] in names else stages
        keys = keys[1:] if keys[0] in names else keys
        if not keys:
            raise ConfigError(f"override {text!r} names a stage but no key (e.g. {text.split('=')[0]}.trainer.steps=100)")
        for stage in targets:
            apply_override(stage.data, keys, value)
    if prompt is not None:
        for stage in stages:
            stage.data["prompt"] = prompt
    pipeline = Pipeline(str(data.get("name", path.stem)), stages)
    for stage in stages:  # fail before any stage runs
        try:
            stage.config = build_run_config(stage.data)
        except ConfigError as error:
            raise ConfigError(f"stage {stage.name!r}: {error} (prefix an override with '{stage.name}.' to reach this stage only)") from None
    return pipeline


def stage_config(stage: Stage, previous_run: Path | None) -> RunConfig:
    """The stage's run config, started from ``previous_run`` when it chains."""
    config = copy.deepcopy(stage.config)
    if previous_run is None or not stage.init_from_previous:
        return config
    if not hasattr(config.representation, "init_from"):
        raise ConfigError(
            f"stage {stage.name!r}: representation {registered_name('representation', config.representation)!r} cannot start from "
            f"the previous stage (it has no init_from); set init_from_previous: false"
        )
    if not config.representation.init_from:
        config.representation.init_from = str(previous_run)
    return config


def finished_metrics(stage_dir: Path) -> dict[str, float] | None:
    """The metrics a finished stage recorded, or None if it has not finished."""
    done = stage_dir / DONE_FILE
    return json.loads(done.read_text()) if done.is_file() else None


def run_pipeline(
    path: str | Path, overrides: list[str], prompt: str | None = None, out: str | None = None, resume: str | None = None
):
    """``lift3d run PIPELINE.yaml``: run the stages in order in one run folder; returns the last ``RunResult``."""
    from lift3d.interrupts import RunInterrupted
    from lift3d.train import RunResult, Trainer, default_run_dir

    pipeline = load_pipeline(path, overrides, prompt)
    if resume:
        run_dir = Path(resume)
        if not (run_dir / PIPELINE_FILE).is_file():
            raise FileNotFoundError(f"resume={resume}: not a pipeline run folder (no {PIPELINE_FILE})")
    else:
        run_dir = Path(out) if out else default_run_dir(dataclasses.replace(pipeline.stages[-1].config, name=pipeline.name))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / PIPELINE_FILE).write_text(yaml.safe_dump(
        {"name": pipeline.name, "stages": [{"name": s.name, "init_from_previous": s.init_from_previous} for s in pipeline.stages]},
        sort_keys=False,
    ))
    previous: Path | None = None
    result = None
    for number, stage in enumerate(pipeline.stages, start=1):
        stage_dir = run_dir / stage.name
        # Only a resume reuses what a stage folder holds; a fresh run starts every stage anew.
        metrics = finished_metrics(stage_dir) if resume else None
        if metrics is not None:
            logger.info("stage %d/%d %s: already finished (%s)", number, len(pipeline.stages), stage.name, stage_dir)
            result = RunResult(stage_dir, stage.config.trainer.steps, metrics)
        else:
            logger.info("stage %d/%d %s -> %s", number, len(pipeline.stages), stage.name, stage_dir)
            config = stage_config(stage, previous)
            (stage_dir / DONE_FILE).unlink(missing_ok=True)
            has_checkpoint = bool(resume) and any((stage_dir / "ckpt").glob("*.pt"))
            trainer = Trainer(config, run_dir=stage_dir, resume=stage_dir if has_checkpoint else None)
            try:
                result = trainer.fit()
            except RunInterrupted as interrupted:
                interrupted.run_dir = run_dir  # a pipeline resumes from its root, not the stage folder
                raise
            (stage_dir / DONE_FILE).write_text(json.dumps(result.metrics))
        previous = stage_dir
    return result


def last_stage_dir(run_dir: Path) -> Path | None:
    """The last stage's folder of a pipeline run folder (None if ``run_dir`` is not one)."""
    manifest = run_dir / PIPELINE_FILE
    if not manifest.is_file():
        return None
    stages = (yaml.safe_load(manifest.read_text()) or {}).get("stages") or []
    return run_dir / stages[-1]["name"] if stages else None
