"""Hybrid guidance: several (teacher, objective, weight, probability) terms in one run.

4D-fy's hybrid SDS mixes an image prior, a 3D-aware prior and a video prior, one sampled per
step; Dream-in-4D sums a video SDS with a small image SDS. Here each entry names an objective
(any registered guidance) and optionally its own teacher (default: the run's ``teacher``); the
training loop renders each active term's own cameras (clips for a clip teacher) and sums the
weighted losses. Example::

    guidance:
      type: hybrid
      entries:
        - name: image                    # per-frame image prior at random times (motion-blind)
          guidance: {type: sds, guidance_scale: 1.0}
        - name: video                    # a clip teacher: x0 [B, C, F, h, w]
          teacher: {type: analytic, frames_per_clip: 8}
          guidance: {type: sds, guidance_scale: 1.0}
          weight: 1.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lift3d import registry
from lift3d.guidance.common import Guidance, GuidanceTerm
from lift3d.registry import register
from lift3d.teachers.base import Teacher


@dataclass
class HybridEntry:
    """One term of a hybrid guidance."""

    name: str
    """Label of the term (its logs are ``<name>/<key>``); unique within the hybrid."""
    guidance: Any
    """The objective's config, a mapping with a ``type`` naming a registered guidance (not hybrid)."""
    teacher: Any = None
    """This term's teacher config (a mapping with a ``type``); unset = the run's ``teacher``."""
    weight: float = 1.0
    """Multiplier on the term's loss."""
    probability: float = 1.0
    """``independent`` selection: the chance the term runs in a step; ``one``: its relative odds."""

    def __post_init__(self) -> None:
        from lift3d.config import build_pluggable

        if not self.name or "/" in self.name:
            raise ValueError(f"hybrid entry name {self.name!r} must be non-empty and without '/'")
        self.guidance = build_pluggable("guidance", self.guidance, f"guidance.entries[{self.name}].guidance")
        if isinstance(self.guidance, HybridConfig):
            raise ValueError(f"guidance.entries[{self.name}].guidance: a hybrid cannot nest another hybrid")
        if self.teacher is not None:
            self.teacher = build_pluggable("teacher", self.teacher, f"guidance.entries[{self.name}].teacher")
        if self.weight < 0 or not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"hybrid entry {self.name!r}: weight must be >= 0 and probability in [0, 1]")


@dataclass
class HybridConfig:
    """Several guidance terms, each with its own teacher, weight and per-step probability."""

    entries: list[HybridEntry] = field(default_factory=list)
    """The terms, in evaluation order."""
    selection: Literal["independent", "one"] = "independent"
    """``independent``: each term runs with its own probability; ``one``: exactly one term per step,
    drawn with odds proportional to the probabilities (4D-fy's per-step prior choice)."""

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError("guidance.entries must list at least one term")
        names = [entry.name for entry in self.entries]
        if len(set(names)) != len(names):
            raise ValueError(f"guidance.entries names must be unique, got {names}")
        if self.selection == "one" and not any(entry.probability > 0 for entry in self.entries):
            raise ValueError("guidance.selection=one needs an entry with probability > 0")


@register("guidance", "hybrid", HybridConfig)
class HybridGuidance(nn.Module):
    """Holds the terms (objectives as submodules, so their trainable state is checkpointed)."""

    def __init__(self, config: HybridConfig, teacher: Teacher):
        super().__init__()
        self.config = config
        self.objectives = nn.ModuleList()
        self._terms: list[GuidanceTerm] = []
        for entry in config.entries:
            term_teacher = teacher
            if entry.teacher is not None:
                teacher_entry = registry.lookup("teacher", _name_of("teacher", entry.teacher))
                term_teacher = teacher_entry.cls(entry.teacher)
            objective_entry = registry.lookup("guidance", _name_of("guidance", entry.guidance))
            objective = objective_entry.cls(entry.guidance, term_teacher)
            self.objectives.append(objective)
            self._terms.append(GuidanceTerm(entry.name, term_teacher, objective, entry.weight, entry.probability))

    def forward(self, *args, **kwargs):
        raise TypeError("a hybrid guidance is evaluated term by term by the training loop (see terms())")

    def terms(self) -> list[GuidanceTerm]:
        return list(self._terms)

    def active_terms(self, generator: torch.Generator, step: int) -> list[GuidanceTerm]:
        """The terms of this step: one Bernoulli draw per term, or one categorical draw."""
        probabilities = torch.tensor([term.probability for term in self._terms], dtype=torch.float64)
        if self.config.selection == "one":
            index = int(torch.multinomial(probabilities, 1, generator=generator))
            return [self._terms[index]]
        draws = torch.rand(len(self._terms), generator=generator, dtype=torch.float64)
        return [term for term, draw, p in zip(self._terms, draws, probabilities) if p >= 1.0 or draw < p]

    def param_groups(self) -> list[dict]:
        return [group for objective in self.objectives for group in objective.param_groups()]

    @property
    def needs_unconditional(self) -> bool:
        return any(isinstance(o, Guidance) and o.needs_unconditional for o in self.objectives)


def _name_of(interface: str, section: Any) -> str:
    from lift3d.config import registered_name

    return registered_name(interface, section)
