"""Typed run configuration: dataclasses, YAML presets, ``key.sub=value`` overrides, validation.

A run config has the sections ``representation``, ``teacher``, ``guidance`` (each with a
``type`` naming a registered component whose config dataclass validates the rest),
``trainer`` and ``export``. Every problem — an unknown key, a wrong type, an unknown
registered name — raises ``ConfigError`` before any work starts, with one line naming the key
and the valid choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lift3d import registry
from lift3d.cameras import OrbitSamplerConfig, TurntableConfig


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


@dataclass
class Schedule:
    """A scalar that changes with the training step.

    ``constant`` keeps ``start``; ``linear`` interpolates from ``start`` at ``start_step`` to
    ``end`` at ``end_step``; ``step`` jumps from ``start`` to ``end`` at ``start_step``;
    ``sqrt`` follows HiFA's ``start + (end - start) * sqrt(progress)``. In YAML a plain number
    means a constant.
    """

    start: float = 0.0
    """Value at and before ``start_step``."""
    end: float | None = None
    """Value at and after ``end_step`` (defaults to ``start``)."""
    start_step: int = 0
    """Step where the change begins."""
    end_step: int = 0
    """Step where the change ends (ignored by ``step`` and ``constant``)."""
    kind: Literal["constant", "linear", "step", "sqrt"] = "constant"
    """Shape of the change."""

    def __call__(self, step: int) -> float:
        end = self.start if self.end is None else self.end
        if self.kind == "constant" or end == self.start:
            return self.start
        if self.kind == "step":
            return self.start if step < self.start_step else end
        span = max(self.end_step - self.start_step, 1)
        progress = min(max((step - self.start_step) / span, 0.0), 1.0)
        if self.kind == "sqrt":
            progress = progress**0.5
        return self.start + (end - self.start) * progress


@dataclass
class ResolutionMilestone:
    """From ``step`` on, render at ``width``×``height``."""

    step: int
    """First step at this resolution."""
    width: int
    """Render width."""
    height: int
    """Render height."""


@dataclass
class TrainerConfig:
    """The optimisation loop."""

    steps: int = 1000
    """Optimisation steps."""
    seed: int = 0
    """Seed for parameters, cameras and noise; the same seed reproduces a run bit for bit."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu`` or ``cuda[:i]``."""
    threads: int = 0
    """CPU threads for torch and the C++ kernels (0 = leave torch's default)."""
    cameras: OrbitSamplerConfig = field(default_factory=OrbitSamplerConfig)
    """Random training cameras."""
    resolution_milestones: list[ResolutionMilestone] = field(default_factory=list)
    """Render-size changes during training (e.g. 64 then 128), sorted by step."""
    view_dependent_prompts: bool = True
    """Condition the teacher on the view label (front/side/back/overhead) of each camera."""
    eval: TurntableConfig = field(default_factory=lambda: TurntableConfig(num_views=8, azimuth_offset_deg=22.5))
    """Held-out turntable used for validation images and the final ``eval/psnr``."""
    log_every: int = 10
    """Write a metrics.jsonl line every N steps."""
    val_every: int = 0
    """Save validation images every N steps (0 = only at the end)."""
    checkpoint_every: int = 0
    """Write a checkpoint every N steps (0 = by time only); ``ckpt/last.pt`` is always the newest."""
    checkpoint_every_minutes: float = 10.0
    """Also write one when this many minutes passed since the last (0 = off), so a preempted or
    crashed run loses at most that much work."""
    keep_checkpoints: int = 3
    """Step checkpoints (``ckpt/step_<N>.pt``) kept on disk; older ones are deleted."""
    max_grad_norm: float = 0.0
    """Clip the total gradient norm of the representation (0 = off)."""
    progress_bar: bool = True
    """Show a progress bar (step/total, loss, it/s, ETA)."""
    eval_times: int = 0
    """Times T of the held-out (view x time) grid, k / T for k < T; 0 = 8 for a dynamic
    representation and 1 (t = 0, the static turntable) otherwise. With more than one time the
    evaluation also reports ``eval/time_margin_db`` (choose T with T * clip_span / 2 whole)."""
    render_chunk_pixels: int = 1 << 16
    """Outside training (validation strips, ``eval/psnr``, turntable PNG/MP4) cameras are rendered
    in groups of at most this many pixels (at least one camera per group); representations bound
    the memory of one camera themselves (e.g. ``representation.render_chunk_rays`` of a NeRF)."""


@dataclass
class ExportConfig:
    """What a finished run writes into ``export/``."""

    formats: list[str] = field(default_factory=lambda: ["ply", "png", "mp4"])
    """Any of: ply (Gaussians, 3DGS layout), glb / obj (textured mesh), png (turntable strip), mp4 (turntable
    video; of a dynamic representation: the camera orbits while time runs 0 -> 1); dynamic representations
    also: glb_animated (canonical mesh + one morph target per keyframe), ply_frames (one PLY per keyframe),
    grid (a views x times PNG)."""
    texture_size: int = 1024
    """Side of the baked base-colour texture of glb/obj exports."""
    video_frames: int = 60
    """Frames of the turntable video."""
    video_fps: int = 24
    """Frames per second of the video."""
    video_resolution: int = 256
    """Width and height of the video and the PNG strip."""
    strip_views: int = 8
    """Views in the PNG strip."""
    query_chunk: int = 1 << 18
    """Points per field query during mesh extraction and texture baking (bounds their memory)."""
    keyframes: int = 8
    """Keyframes (evenly spaced over t in [0, 1]) of glb_animated morph targets and ply_frames."""
    animation_seconds: float = 2.0
    """Seconds the glb_animated animation takes from t = 0 to t = 1."""
    animation_interpolation: Literal["LINEAR", "STEP"] = "LINEAR"
    """glb_animated keyframe interpolation: LINEAR blends neighbouring keyframes, STEP holds each."""
    grid_views: int = 4
    """Views (rows) of the grid export."""
    grid_times: int = 5
    """Times (columns) of the grid export."""


SECTIONS = ("representation", "teacher", "guidance", "trainer", "export")
TOP_LEVEL_KEYS = ("name", "prompt", "negative_prompt") + SECTIONS


@dataclass
class RunConfig:
    """A whole run: what to optimise, judged by whom, how, and what to write."""

    name: str
    """Config name; runs land in ``outputs/<name>/<prompt-slug>@<timestamp>``."""
    prompt: str
    """The text prompt."""
    representation: Any
    """The representation config (its dataclass is chosen by ``representation.type``)."""
    teacher: Any
    """The teacher config (chosen by ``teacher.type``)."""
    guidance: Any
    """The guidance config (chosen by ``guidance.type``)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The optimisation loop."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """What to export at the end."""
    negative_prompt: str = ""
    """Negative prompt for the unconditional branch of classifier-free guidance."""


# ----------------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; ``key`` names it in errors."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{key}: {value!r} is not a valid {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not valid; choose one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if tp is Schedule and isinstance(value, (int, float)) and not isinstance(value, bool):
            return Schedule(start=float(value))
        if isinstance(value, tp):
            return value
        return build_dataclass(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-5" (no dot) as a string; accept any spelling float() accepts.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: cannot use {value!r} as {_type_name(tp)}")


def build_dataclass(cls: type, data: Any, key: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            valid = sorted(fields)
            raise ConfigError(
                f"unknown key {_join(key, name)!r}{_suggest(name, valid)}; valid keys: {', '.join(valid)}"
            )
        kwargs[name] = _coerce(value, hints[name], _join(key, name))
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing key {_join(key, missing[0])!r} ({cls.__name__} needs it)")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{key or cls.__name__}: {error}") from None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _entry_index(items: list, part: str, path: list[str]) -> int:
    """The position in a list section that ``part`` names: an index (negative from the end) or the
    ``name`` of an entry (hybrid guidance terms, pipeline stages)."""
    names = [item.get("name") for item in items if isinstance(item, dict) and item.get("name")]
    if part.lstrip("-").isdigit():
        index = int(part)
        if -len(items) <= index < len(items):
            return index % len(items)
    elif part in names:
        return [isinstance(item, dict) and item.get("name") for item in items].index(part)
    choices = f"an index 0..{len(items) - 1}" + (f" or one of the names {', '.join(names)}" if names else "")
    raise ConfigError(f"cannot set {'.'.join(path)}: {part!r} is not an entry of that list; use {choices}")


def apply_override(data: dict, path: list[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]... = value``, creating nested mappings. A list on the way is
    entered by index or by an entry's ``name``: ``guidance.entries.1.weight=0.5`` or
    ``guidance.entries.clip.weight=0.5``."""
    node: Any = data
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(node, list):
            index = _entry_index(node, part, path)
            if last:
                node[index] = value
                return
            child = node[index]
        else:
            if last:
                node[part] = value
                return
            child = node.get(part)
            if child is None:
                child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part!r} is not a section")
        node = child


def _build_pluggable(interface: str, data: Any, key: str | None = None) -> Any:
    key = key or interface
    if not isinstance(data, dict) or "type" not in data:
        raise ConfigError(
            f"{key}.type is required; choose one of: {', '.join(registry.choices(interface))}"
        )
    data = dict(data)
    name = data.pop("type")
    try:
        entry = registry.lookup(interface, name)
    except KeyError as error:
        raise ConfigError(f"{key}: {error.args[0]}") from None
    return build_dataclass(entry.config_cls, data, key)


def build_pluggable(interface: str, data: Any, key: str) -> Any:
    """A nested pluggable section (e.g. a hybrid guidance's entries): a mapping with a ``type``,
    or an already-built config of a registered component, which is returned as is."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        registered_name(interface, data)  # raises if it is not one of the interface's configs
        return data
    return _build_pluggable(interface, data, key)


def build_run_config(data: dict) -> RunConfig:
    """Validate a raw mapping into a ``RunConfig``."""
    if not isinstance(data, dict):
        raise ConfigError("a config file must hold a mapping of sections")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                f"unknown key {key!r}{_suggest(key, list(TOP_LEVEL_KEYS))}; valid keys: {', '.join(TOP_LEVEL_KEYS)}"
            )
    for key in ("name", "prompt"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ConfigError(f"{key!r} must be a non-empty string (give the prompt with --prompt or prompt=...)")
    return RunConfig(
        name=data["name"],
        prompt=data["prompt"],
        negative_prompt=_coerce(data.get("negative_prompt", ""), str, "negative_prompt"),
        representation=_build_pluggable("representation", data.get("representation")),
        teacher=_build_pluggable("teacher", data.get("teacher")),
        guidance=_build_pluggable("guidance", data.get("guidance")),
        trainer=build_dataclass(TrainerConfig, data.get("trainer"), "trainer"),
        export=build_dataclass(ExportConfig, data.get("export"), "export"),
    )


def read_yaml(path: Path, what: str = "") -> dict:
    """A YAML file's top-level mapping; ``ConfigError`` (prefixed by ``what``) if it is missing,
    not valid YAML or not a mapping."""
    prefix = f"{what}: " if what else ""
    if not path.is_file():
        raise ConfigError(f"{prefix}config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), prompt: str | None = None) -> RunConfig:
    """Read a YAML preset (or start empty), apply overrides and validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        data = read_yaml(path)
        data.setdefault("name", path.stem)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    if prompt is not None:
        data["prompt"] = prompt
    return build_run_config(data)


def to_dict(config: Any) -> Any:
    """Plain data (for YAML) from a config; pluggable sections get their ``type`` back."""
    if dataclasses.is_dataclass(config):
        out = {}
        if isinstance(config, RunConfig):
            out.update(name=config.name, prompt=config.prompt, negative_prompt=config.negative_prompt)
            for interface in registry.RUN_INTERFACES:
                section = getattr(config, interface)
                out[interface] = {"type": registered_name(interface, section), **to_dict(section)}
            out["trainer"] = to_dict(config.trainer)
            out["export"] = to_dict(config.export)
            return out
        hints = typing.get_type_hints(type(config))
        out = {}
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            out[f.name] = to_dict(value)
            # A pluggable section nested in another (hybrid entries, typed Any) needs its ``type``
            # back; a field declared as one concrete config class (a generator's NeRFConfig) does not.
            nested = _registered_interface(value) if dataclasses.is_dataclass(value) and hints.get(f.name) is not type(value) else None
            if nested:
                out[f.name] = {"type": registered_name(nested, value), **out[f.name]}
        return out
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def _registered_interface(config: Any) -> str | None:
    """The interface whose registered config class ``config`` is an instance of, if any."""
    for interface in registry.INTERFACES:
        if any(type(config) is registry.lookup(interface, name).config_cls for name in registry.choices(interface)):
            return interface
    return None


def registered_name(interface: str, config: Any) -> str:
    """The registered name whose config class ``config`` is an instance of."""
    for name in registry.choices(interface):
        if type(config) is registry.lookup(interface, name).config_cls:
            return name
    raise ConfigError(f"{type(config).__name__} is not a registered {interface} config")


def dump_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (it loads back to an equal config)."""
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
