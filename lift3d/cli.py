"""The ``lift3d`` command: run, batch, export, report, info, kernels."""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import sys
import time

from lift3d.checkpoint import CheckpointError
from lift3d.config import ConfigError
from lift3d.interrupts import RunInterrupted

logger = logging.getLogger("lift3d")

# One representative native op per kernel, to report which tiers are live.
KERNEL_OPS = {
    "gaussian_raster": "gaussian_rasterize_forward",
    "hashgrid": "hashgrid_forward",
    "raymarch": "march_rays",
}

USER_ERRORS = (ConfigError, CheckpointError, ValueError, FileNotFoundError, KeyError, ImportError)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        datefmt="%H:%M:%S",
    )


def _split_resume(overrides: list[str]) -> tuple[list[str], str | None]:
    """``resume=PATH`` is a run option, not a config key."""
    resume = None
    rest = []
    for item in overrides:
        if item.startswith("resume="):
            resume = item.split("=", 1)[1]
        else:
            rest.append(item)
    return rest, resume


def cmd_run(args: argparse.Namespace) -> int:
    from lift3d.pipeline import is_pipeline, run_pipeline
    from lift3d.train import elapsed, run

    from lift3d.amortized.train import is_amortized

    if args.config.endswith((".yaml", ".yml")) and is_amortized(args.config):
        raise ValueError(f"{args.config} trains a generator over a corpus: use `lift3d amortized {args.config}`")
    overrides, resume = _split_resume(args.overrides)
    start = time.perf_counter()
    runner = run_pipeline if is_pipeline(args.config) else run
    try:
        result = runner(args.config, overrides, prompt=args.prompt, out=args.out, resume=resume)
    except RunInterrupted as interrupted:
        again = ["lift3d", "run", args.config, *(["--prompt", args.prompt] if args.prompt else []), *overrides,
                 f"resume={interrupted.run_dir}"]
        logger.error("%s; checkpoint %s. Resume with:\n  %s", interrupted, interrupted.checkpoint, shlex.join(again))
        return interrupted.exit_code
    summary = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items())
    logger.info("finished %d steps in %s%s -> %s", result.step, elapsed(start), f" ({summary})" if summary else "", result.run_dir)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from lift3d.batch import run_batch

    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    return run_batch(args.config, args.prompts, args.overrides, out=args.out, split=args.split, workers=args.workers)


def cmd_amortized(args: argparse.Namespace) -> int:
    from lift3d.amortized.train import run_amortized

    try:
        run_amortized(args.config, args.overrides, out=args.out)
    except RunInterrupted as interrupted:
        again = ["lift3d", "amortized", args.config, *args.overrides, f"resume={interrupted.run_dir}"]
        logger.error("%s; checkpoint %s. Resume with:\n  %s", interrupted, interrupted.checkpoint, shlex.join(again))
        return interrupted.exit_code
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lift3d.amortized.generate import generate

    generate(args.checkpoint, args.prompt, formats=args.format, out=args.out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lift3d.train import export_run, open_run

    trainer = open_run(args.run_dir)
    formats = args.format or trainer.config.export.formats
    export_run(trainer, formats)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lift3d.report import write_report

    write_report(args.path, args.out)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from lift3d import __version__, registry
    from lift3d.kernels._backend import live_tiers

    lines = [
        f"lift3d {__version__}",
        f"python {platform.python_version()} ({platform.machine()}), torch {torch.__version__}",
        f"device: {'cuda ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu only'}"
        f", {torch.get_num_threads()} threads",
    ]
    for name in ("diffusers", "transformers", "trimesh", "kornia", "gsplat", "nerfacc", "tinycudann"):
        try:
            module = __import__(name)
            lines.append(f"{name}: {getattr(module, '__version__', 'installed')}")
        except ImportError:
            lines.append(f"{name}: not installed")
    for label, op in KERNEL_OPS.items():
        tiers = live_tiers(op)
        lines.append(f"kernel {label}: " + ", ".join(f"{t}={'live' if ok else 'off'}" for t, ok in tiers.items()))
    for interface in registry.INTERFACES:
        lines.append(f"{interface}: {', '.join(registry.choices(interface))}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    import torch

    from lift3d.kernels._backend import load_cpu_extension, load_cuda_extension

    start = time.perf_counter()
    load_cpu_extension()
    logger.info("cpu kernels ready (%.1fs)", time.perf_counter() - start)
    if torch.cuda.is_available():
        start = time.perf_counter()
        load_cuda_extension()
        logger.info("cuda kernels ready (%.1fs)", time.perf_counter() - start)
    else:
        logger.info("no CUDA device: cuda kernels not built")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lift3d", description="Text to 3D by score distillation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run_parser = sub.add_parser("run", help="optimise one prompt (one run, or every stage of a pipeline preset)")
    run_parser.add_argument("config", help="YAML preset, e.g. configs/quickstart.yaml, or a pipeline (a 'stages' list)")
    run_parser.add_argument("--prompt", help="the text prompt (overrides the preset's)")
    run_parser.add_argument("--out", help="put the run exactly in this folder")
    run_parser.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.steps=500 (a pipeline: STAGE.key=value for one stage); "
        "resume=PATH continues a run"
    )
    run_parser.set_defaults(func=cmd_run)

    batch_parser = sub.add_parser(
        "batch", help="one run per prompt of a corpus: resumable, failures recorded, sharded under torchrun",
        description="Runs CONFIG once per prompt into OUT/<prompt-slug>/. Re-running the same command skips "
        "finished prompts and resumes interrupted ones; OUT/batch.jsonl has a row per prompt. Under torchrun "
        "every rank takes prompts[rank::world].",
    )
    batch_parser.add_argument("config", help="YAML preset (or pipeline) every prompt runs with")
    batch_parser.add_argument("prompts", help="corpus: a text file (one prompt a line, # comments) or a JSON corpus with splits")
    batch_parser.add_argument("--out", help="batch folder (default: outputs/<config-name>/batch-<corpus-name>)")
    batch_parser.add_argument("--split", help="split of a JSON corpus (default: every split)")
    batch_parser.add_argument("--workers", type=int, default=1, help="local worker processes (torchrun's launcher); default 1")
    batch_parser.add_argument("overrides", nargs="*", help="key.sub=value overrides for every prompt's run")
    batch_parser.set_defaults(func=cmd_batch)

    amortized_parser = sub.add_parser(
        "amortized", help="train a prompt-conditioned generator over a prompt corpus (DDP under torchrun)",
        description="Trains CONFIG's generator on its corpus; under torchrun --nproc_per_node=N every rank takes its "
        "own shard of each step's prompts. resume=RUN_DIR continues (on any world size).",
    )
    amortized_parser.add_argument("config", help="YAML preset, e.g. configs/amortized-quickstart.yaml")
    amortized_parser.add_argument("--out", help="put the run exactly in this folder")
    amortized_parser.add_argument("overrides", nargs="*", help="key.sub=value overrides; resume=RUN_DIR continues a run")
    amortized_parser.set_defaults(func=cmd_amortized)

    generate_parser = sub.add_parser("generate", help="one generator forward pass for a prompt, then the usual export")
    generate_parser.add_argument("checkpoint", help="an amortized run folder or its checkpoint file")
    generate_parser.add_argument("--prompt", required=True, help="the text prompt (need not be in the corpus)")
    generate_parser.add_argument("--out", help="output folder (default: RUN/generated/<prompt-slug>)")
    generate_parser.add_argument(
        "--format", nargs="+", choices=["glb", "obj", "mp4", "png"], help="default: the run's export.formats"
    )
    generate_parser.set_defaults(func=cmd_generate)

    export_parser = sub.add_parser("export", help="export a finished or interrupted run")
    export_parser.add_argument("run_dir", help="the run folder")
    export_parser.add_argument(
        "--format", action="append", choices=["ply", "glb", "obj", "mp4", "png", "glb_animated", "ply_frames", "grid"], help="repeatable; default: the run's export.formats"
    )
    export_parser.set_defaults(func=cmd_export)

    report_parser = sub.add_parser(
        "report", help="a static HTML page (video, eval strip, curves, metrics, config, 3D viewer) for runs",
        description="Writes PATH/report.html (or --out) with report_assets/ next to it; a folder of runs "
        "(a batch folder, or any folder holding run folders) gets a sortable table and one page per run.",
    )
    report_parser.add_argument("path", help="a run folder, a pipeline run folder, or a folder of runs")
    report_parser.add_argument("--out", help="the HTML file to write (default: PATH/report.html)")
    report_parser.set_defaults(func=cmd_report)

    info_parser = sub.add_parser("info", help="versions, device, live kernel tiers, registered components")
    info_parser.set_defaults(func=cmd_info)

    kernels_parser = sub.add_parser("kernels", help="native kernels")
    kernels_sub = kernels_parser.add_subparsers(dest="kernels_command", required=True)
    build = kernels_sub.add_parser("build", help="pre-build the C++ (and CUDA, on a GPU) extensions")
    build.set_defaults(func=cmd_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after --prompt/--out: argparse leaves the later ones over.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in ("run", "batch", "amortized") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        logger.error("error: %s", message)
        return 2
    except KeyboardInterrupt:
        logger.error("stopped at once; the newest checkpoint in the run's ckpt/ folder is what remains")
        return 130


if __name__ == "__main__":
    sys.exit(main())
