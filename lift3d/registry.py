"""Name -> (class, config class) per pluggable interface.

Configs pick components by registered name (``guidance.type=sds``); an unknown name is an
error that lists the registered choices. Components register with a decorator next to their
definition, and ``lift3d.components`` imports every built-in module once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

INTERFACES = ("representation", "teacher", "guidance", "generator")
"""Every pluggable interface; ``generator`` is the amortized (prompt -> field) network of ``lift3d amortized``."""

RUN_INTERFACES = ("representation", "teacher", "guidance")
"""The pluggable sections of a per-prompt run config (``RunConfig``)."""

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    name: str
    cls: type
    config_cls: type


_REGISTRY: dict[str, dict[str, Entry]] = {interface: {} for interface in INTERFACES}


def register(interface: str, name: str, config_cls: type) -> Callable[[type[T]], type[T]]:
    """Class decorator: make ``cls`` selectable as ``<interface>.type=<name>``."""
    if interface not in _REGISTRY:
        raise ValueError(f"unknown interface {interface!r}; choose one of {', '.join(INTERFACES)}")

    def decorator(cls: type[T]) -> type[T]:
        existing = _REGISTRY[interface].get(name)
        if existing is not None and existing.cls is not cls:
            raise ValueError(f"{interface} {name!r} is already registered by {existing.cls.__qualname__}")
        _REGISTRY[interface][name] = Entry(name, cls, config_cls)
        return cls

    return decorator


def choices(interface: str) -> list[str]:
    """Registered names of an interface, sorted."""
    _load_builtins()
    return sorted(_REGISTRY[interface])


def lookup(interface: str, name: str) -> Entry:
    """The entry registered as ``name``; ``KeyError`` with the valid choices otherwise."""
    _load_builtins()
    try:
        return _REGISTRY[interface][name]
    except KeyError:
        raise KeyError(
            f"unknown {interface} type {name!r}; choose one of: {', '.join(choices(interface))}"
        ) from None


def _load_builtins() -> None:
    # Imported lazily: the component modules import this one to register themselves.
    import lift3d.components  # noqa: F401
