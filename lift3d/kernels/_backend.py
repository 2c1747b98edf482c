"""Lazy builds of the native kernel extensions and the choice of tier per call.

Three tiers share one semantics (DESIGN §3): ``reference`` (pure torch, autograd), ``cpu``
(C++/OpenMP in ``cuda/*_cpu.cpp``) and ``cuda`` (``cuda/*.cu`` + a torch binding). All C++ CPU
kernels build into one extension and all CUDA kernels into another, JIT-compiled with
``torch.utils.cpp_extension.load`` on first use (never at import or install time).

Native ops register themselves with ``TORCH_LIBRARY_FRAGMENT`` in the namespaces
``lift3d_cpu`` and ``lift3d_cuda``, so an op is ``torch.ops.lift3d_cpu.<name>`` once built.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TIERS = ("reference", "cpu", "cuda")
FORCE_ENV = "LIFT3D_KERNELS"


class KernelBuildError(RuntimeError):
    """A native extension could not be built or loaded."""


def source_dir() -> Path:
    """Folder with the C++/CUDA sources: ``cuda/`` of a checkout, or the copy shipped in the package."""
    candidates = [
        Path(__file__).resolve().parents[2] / "cuda",  # editable install / source checkout
        Path(__file__).resolve().parents[1] / "_cuda_src",  # regular install (see setup.py package_dir)
    ]
    for candidate in candidates:
        if any(candidate.glob("*_cpu.cpp")):
            return candidate
    raise KernelBuildError(f"kernel sources not found in any of {[str(c) for c in candidates]}")


@functools.lru_cache(maxsize=None)
def load_cpu_extension() -> None:
    """Build (first time) and load the C++ extension holding every cpu-tier op."""
    from torch.utils import cpp_extension

    # LIFT3D_CPU_SOURCES (a glob) lets a kernel developer build just the file being worked on.
    pattern = os.environ.get("LIFT3D_CPU_SOURCES", "*_cpu.cpp")
    sources = sorted(str(p) for p in source_dir().glob(pattern))
    if not sources:
        raise KernelBuildError(f"no C++ kernel sources match {pattern!r} in {source_dir()}")
    logger.info("building/loading the lift3d C++ kernels from %d sources (first build takes ~1 min)", len(sources))
    try:
        cpp_extension.load(
            name="lift3d_cpu_kernels",
            sources=sources,
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=os.environ.get("LIFT3D_KERNELS_VERBOSE") == "1",
        )
    except Exception as error:  # the compiler's output is in the error; keep it
        raise KernelBuildError(f"building the C++ cpu kernels failed: {error}") from error


@functools.lru_cache(maxsize=None)
def load_cuda_extension() -> None:
    """Build (first time) and load the CUDA extension holding every cuda-tier op."""
    if not torch.cuda.is_available():
        raise KernelBuildError("no CUDA device is available")
    from torch.utils import cpp_extension

    directory = source_dir()
    sources = sorted(str(p) for p in directory.glob("*.cu")) + sorted(str(p) for p in directory.glob("*_cuda.cpp"))
    if not sources:
        raise KernelBuildError(f"no CUDA kernel sources in {directory}")
    try:
        cpp_extension.load(
            name="lift3d_cuda_kernels",
            sources=sources,
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "--use_fast_math"],
            is_python_module=False,
            verbose=os.environ.get("LIFT3D_KERNELS_VERBOSE") == "1",
        )
    except Exception as error:
        raise KernelBuildError(f"building the CUDA kernels failed: {error}") from error


def _has_op(namespace: str, op: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return False
    return True


def tier_available(tier: str, op: str, quiet: bool = False) -> bool:
    """Whether ``op`` can run on ``tier`` here (builds the extension on first ask)."""
    if tier == "reference":
        return True
    loader = load_cpu_extension if tier == "cpu" else load_cuda_extension
    try:
        loader()
    except KernelBuildError as error:
        if not quiet:
            _warn_once(f"lift3d {tier} kernels unavailable ({str(error).splitlines()[0]})")
        return False
    return _has_op(f"lift3d_{tier}", op)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def forced_tier() -> str | None:
    """The tier named by ``LIFT3D_KERNELS``, validated."""
    value = os.environ.get(FORCE_ENV, "").strip().lower()
    if not value:
        return None
    if value not in TIERS:
        raise ValueError(f"{FORCE_ENV}={value!r} is not a kernel tier; choose one of {', '.join(TIERS)}")
    return value


def select_tier(op: str, device: torch.device, requested: str | None = None) -> str:
    """The tier to run ``op`` on for tensors on ``device``.

    ``requested`` (or ``LIFT3D_KERNELS``) forces a tier; otherwise the fastest live tier for the
    device wins, falling back to ``reference`` with one warning.
    """
    tier = requested or forced_tier()
    if tier is not None:
        if tier not in TIERS:
            raise ValueError(f"kernel tier {tier!r} is unknown; choose one of {', '.join(TIERS)}")
        if tier != "reference" and (tier == "cuda") != (device.type == "cuda"):
            raise ValueError(f"kernel tier {tier!r} cannot run on tensors on {device}")
        if not tier_available(tier, op):
            raise KernelBuildError(f"kernel tier {tier!r} was requested for {op} but is not available")
        return tier
    preferred = "cuda" if device.type == "cuda" else "cpu"
    if tier_available(preferred, op):
        return preferred
    _warn_once(f"{op}: falling back to the slow reference tier on {device}")
    return "reference"


def native_op(tier: str, name: str, device: torch.device):
    """``torch.ops.lift3d_<tier>.<name>``; for cuda, bound to the current stream of ``device``
    (the .cu launchers take the stream as their last argument, DESIGN §3)."""
    op = getattr(getattr(torch.ops, f"lift3d_{tier}"), name)
    if tier != "cuda":
        return op
    stream = torch.cuda.current_stream(device).cuda_stream
    return lambda *args: op(*args, stream)


def live_tiers(op: str) -> dict[str, bool]:
    """Which tiers are live for ``op`` on this machine (for ``lift3d info``)."""
    return {tier: tier_available(tier, op, quiet=True) for tier in TIERS}


def prepare_kernels(device: torch.device) -> None:
    """Build (first time) or load the native extension for ``device`` now, under its own log line,
    so that a training loop's first step and its progress bar's rate do not include the build.
    A build failure is not an error here: the ops fall back to the reference tier with a warning
    when they are called, as always."""
    tier = forced_tier() or ("cuda" if device.type == "cuda" else "cpu")
    if tier == "reference":
        return
    loader = load_cuda_extension if tier == "cuda" else load_cpu_extension
    start = time.perf_counter()
    try:
        loader()
    except KernelBuildError as error:
        _warn_once(f"lift3d {tier} kernels unavailable ({str(error).splitlines()[0]})")
        return
    seconds = time.perf_counter() - start
    logger.log(logging.INFO if seconds > 0.5 else logging.DEBUG, "%s kernels ready (%.1f s)", tier, seconds)
