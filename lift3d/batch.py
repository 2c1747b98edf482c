"""``lift3d batch``: one ordinary run per prompt of a corpus, resumable and sharded.

Every prompt gets its own run folder ``<out>/<prompt-slug>/`` (what ``lift3d run --out`` would
write; a pipeline preset's run folder for pipelines). A prompt's state lives in that folder, so a
batch can always be re-run with the same command:

- ``batch-status.json`` with ``"status": "done"``: finished, skipped on a re-run;
- ``"failed"`` (with the error): tried again on a re-run;
- ``"interrupted"``, or a checkpoint without a status file (a killed process): resumed from its
  newest checkpoint;
- nothing: not started.

``<out>/batch.jsonl`` is rebuilt from those folders after every prompt: one row per prompt
(prompt, folder, status, final metrics, wall time, error).

Sharding: under ``torchrun`` every rank takes ``prompts[rank::world]`` on its own device
(``cuda:<local rank>`` on a GPU machine) and the ranks meet in a ``torch.distributed`` barrier
(gloo) at the end, after which rank 0 writes the final ``batch.jsonl`` and the summary.
``--workers N`` starts N local ranks through torchrun's own launcher.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from lift3d.interrupts import RunInterrupted, graceful_stop
from lift3d.prompts import load_prompts, slugify

logger = logging.getLogger(__name__)

STATUS_FILE = "batch-status.json"
REPORT_FILE = "batch.jsonl"
LAUNCHED_ENV = "LIFT3D_BATCH_LAUNCHED"
"""Set by ``--workers``: its ranks leave the exit code and the summary to the launching process."""
BARRIER_TIMEOUT = timedelta(days=7)
"""How long a rank that finished its shard waits for the slowest one."""
SUMMARY_METRICS = ("eval/psnr", "eval/chamfer", "eval/time_margin_db")
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)
"""Failures caused by the prompt or the options (config errors are ValueErrors), not by the code."""


@dataclass
class PromptRecord:
    """One prompt of a batch and what its run folder says about it."""

    prompt: str
    """The prompt text."""
    run_dir: Path
    """Its run folder, ``<out>/<slug>``."""
    status: str = "pending"
    """done, failed, interrupted or pending."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Final metrics of a finished run (``eval/psnr`` ...)."""
    wall_s: float = 0.0
    """Seconds spent on the prompt, summed over the attempts that got as far as writing a status."""
    error: str = ""
    """``Type: message`` of the last failure."""

    def row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "run_dir": self.run_dir.name, "status": self.status,
                "metrics": self.metrics, "wall_s": round(self.wall_s, 3), "error": self.error}


def prompt_folders(prompts: list[str], out: Path) -> list[PromptRecord]:
    """A record per prompt with a unique folder: prompts whose slugs collide get ``-2``, ``-3`` ..."""
    records, taken = [], set()
    for prompt in prompts:
        slug, number = slugify(prompt), 1
        while (candidate := slug if number == 1 else f"{slug}-{number}") in taken:
            number += 1
        taken.add(candidate)
        records.append(PromptRecord(prompt, out / candidate))
    return records


def refresh(record: PromptRecord) -> PromptRecord:
    """Read the record's state from its run folder."""
    status_path = record.run_dir / STATUS_FILE
    if status_path.is_file():
        data = json.loads(status_path.read_text())
        record.status, record.metrics = data["status"], data.get("metrics", {})
        record.wall_s, record.error = float(data.get("wall_s", 0.0)), data.get("error", "")
    elif any(record.run_dir.rglob("ckpt/*.pt")):
        record.status = "interrupted"  # killed without a chance to say so
    return record


def _write_status(record: PromptRecord) -> None:
    record.run_dir.mkdir(parents=True, exist_ok=True)
    data = {"prompt": record.prompt, "status": record.status, "metrics": record.metrics,
            "wall_s": record.wall_s, "error": record.error}
    temporary = record.run_dir / f".{STATUS_FILE}.tmp"
    temporary.write_text(json.dumps(data, indent=1))
    os.replace(temporary, record.run_dir / STATUS_FILE)


def write_report(records: list[PromptRecord], out: Path) -> Path:
    """``<out>/batch.jsonl`` from the run folders (atomically: readers never see half a file)."""
    path = out / REPORT_FILE
    temporary = out / f".{REPORT_FILE}.{os.getpid()}.tmp"
    temporary.write_text("".join(json.dumps(refresh(r).row()) + "\n" for r in records))
    os.replace(temporary, path)
    return path


def run_prompt(config: str, record: PromptRecord, overrides: list[str]) -> PromptRecord:
    """Run (or resume) one prompt; a failure is recorded, not raised. ``RunInterrupted`` is raised
    after the interrupted state is recorded."""
    from lift3d.pipeline import is_pipeline, run_pipeline
    from lift3d.train import run

    runner = run_pipeline if is_pipeline(config) else run
    resume = str(record.run_dir) if record.status == "interrupted" else None
    if record.status == "failed" and record.run_dir.exists():
        resume = str(record.run_dir) if any(record.run_dir.rglob("ckpt/*.pt")) else None
    previous_wall = record.wall_s
    start = time.perf_counter()
    try:
        result = runner(config, overrides, prompt=record.prompt, out=str(record.run_dir), resume=resume)
    except RunInterrupted:
        record.status, record.wall_s = "interrupted", previous_wall + time.perf_counter() - start
        _write_status(record)
        raise
    except Exception as error:  # noqa: BLE001 (one prompt's failure must not stop the batch)
        record.status, record.error = "failed", f"{type(error).__name__}: {error}"
        record.wall_s = previous_wall + time.perf_counter() - start
        # A bad prompt or option says all in its message; anything else gets its traceback.
        detail = "" if isinstance(error, USER_ERRORS) else "\n" + traceback.format_exc(limit=8)
        logger.error("prompt %r failed: %s%s", record.prompt, record.error, detail)
        _write_status(record)
        return record
    record.status, record.metrics, record.error = "done", dict(result.metrics), ""
    record.wall_s = previous_wall + time.perf_counter() - start
    _write_status(record)
    return record


@dataclass
class Shard:
    """This process's place in a (possibly distributed) batch."""

    rank: int = 0
    """Global rank (0 without torchrun)."""
    world: int = 1
    """Number of ranks."""
    local_rank: int = 0
    """Rank on this machine (picks the GPU)."""
    local_world: int = 1
    """Ranks on this machine (shares the CPU cores)."""

    @classmethod
    def from_environment(cls) -> "Shard":
        """torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (defaults: one process)."""
        get = lambda name, default: int(os.environ.get(name, default))  # noqa: E731
        world = get("WORLD_SIZE", 1)
        return cls(get("RANK", 0), world, get("LOCAL_RANK", 0), get("LOCAL_WORLD_SIZE", world))


def _placement_overrides(shard: Shard, overrides: list[str]) -> list[str]:
    """A rank's device and CPU threads, unless the user chose them."""
    import torch

    extra = []
    given = {item.split("=", 1)[0] for item in overrides}
    if "trainer.device" not in given and torch.cuda.is_available() and shard.world > 1:
        extra.append(f"trainer.device=cuda:{shard.local_rank % torch.cuda.device_count()}")
    if "trainer.threads" not in given and shard.local_world > 1:
        extra.append(f"trainer.threads={max(1, (os.cpu_count() or 1) // shard.local_world)}")
    return extra


def summary_table(records: list[PromptRecord]) -> str:
    """The end-of-batch table: counts, then mean/min of the evaluation metrics over finished prompts."""
    counts = {status: sum(r.status == status for r in records) for status in ("done", "failed", "interrupted", "pending")}
    lines = [f"prompts {len(records)}: " + ", ".join(f"{count} {status}" for status, count in counts.items()),
             f"wall time {sum(r.wall_s for r in records):.1f} s in all"]
    header = f"{'metric':<20} {'n':>4} {'mean':>10} {'min':>10} {'max':>10}"
    rows = []
    for metric in SUMMARY_METRICS:
        values = [r.metrics[metric] for r in records if r.status == "done" and metric in r.metrics]
        if values:
            rows.append(f"{metric:<20} {len(values):>4} {sum(values) / len(values):>10.4g} {min(values):>10.4g} {max(values):>10.4g}")
    if rows:
        lines += [header, *rows]
    for record in records:
        if record.status == "failed":
            lines.append(f"failed: {record.prompt!r}: {record.error}")
    return "\n".join(lines)


def default_out(config: str, prompts_path: str) -> Path:
    """``outputs/<config-name>/batch-<corpus-name>``: stable, so re-running the command resumes."""
    from lift3d.train import OUTPUTS_ROOT

    return OUTPUTS_ROOT / slugify(Path(config).stem) / f"batch-{slugify(Path(prompts_path).stem)}"


def run_batch(config: str, prompts_path: str, overrides: list[str], out: str | None = None,
              split: str | None = None, workers: int = 1, progress_bar: bool = True) -> int:
    """Run every prompt of ``prompts_path``; returns the exit code (0: all done, 1: some failed,
    128 + signal: interrupted)."""
    from lift3d.config import load_config

    prompts = load_prompts(prompts_path, split)
    out_dir = Path(out) if out else default_out(config, prompts_path)
    # Validate the config (and every override) once, before any work or folder.
    from lift3d.pipeline import is_pipeline, load_pipeline

    (load_pipeline if is_pipeline(config) else load_config)(config, overrides, prompt=prompts[0])
    if workers > 1:
        return _launch_workers(config, prompts_path, overrides, out_dir, split, workers)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard = Shard.from_environment()
    group = _join_group(shard)
    records = prompt_folders(prompts, out_dir)
    mine = [refresh(r) for r in records[shard.rank :: shard.world]]
    todo = [r for r in mine if r.status != "done"]
    logger.info("batch of %d prompts -> %s%s: %d to run here, %d already done", len(records), out_dir,
                f" (rank {shard.rank} of {shard.world})" if shard.world > 1 else "", len(todo), len(mine) - len(todo))
    placement = _placement_overrides(shard, overrides)
    interrupted: RunInterrupted | None = None
    from tqdm import tqdm

    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="prompt", disable=not progress_bar,
               desc="batch" if shard.world == 1 else f"batch rank {shard.rank}", dynamic_ncols=True)
    with graceful_stop("the batch") as stop:
        try:
            for record in todo:
                if stop.requested:
                    break
                try:
                    run_prompt(config, record, [*overrides, *placement])
                except RunInterrupted as error:
                    interrupted = error
                    break
                bar.update(1)
                bar.set_postfix(done=sum(r.status == "done" for r in mine), failed=sum(r.status == "failed" for r in mine),
                                refresh=False)
                write_report(records, out_dir)
        finally:
            bar.close()
        signum = interrupted.signum if interrupted else stop.signum
    if signum is not None:
        path = write_report(records, out_dir)
        if shard.world == 1:
            sys.stdout.write(summary_table(records) + f"\nreport: {path}\n")
        logger.error("batch interrupted (%d of this shard's %d prompts unfinished); run the same command again to go on",
                     sum(r.status != "done" for r in mine), len(mine))
        return 128 + signum
    if group:
        import torch.distributed as dist

        dist.barrier()  # every shard finished: rank 0's report below is complete
        dist.destroy_process_group()
    if shard.rank != 0:
        return 0
    return _finish(records, out_dir, launched=os.environ.get(LAUNCHED_ENV) == "1")


def _finish(records: list[PromptRecord], out_dir: Path, launched: bool = False) -> int:
    """Write the final report, print the summary; the exit code says whether anything failed."""
    path = write_report(records, out_dir)
    if launched:
        return 0  # the launching process prints the summary and decides the exit code
    sys.stdout.write(summary_table(records) + f"\nreport: {path}\n")
    return 1 if any(r.status != "done" for r in records) else 0


def _join_group(shard: Shard) -> bool:
    """Join torchrun's process group (gloo: the ranks exchange nothing but a barrier)."""
    if shard.world <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return True


def _launch_workers(config: str, prompts_path: str, overrides: list[str], out_dir: Path, split: str | None,
                    workers: int) -> int:
    """``--workers N``: N local ranks started by torchrun's launcher (a c10d rendezvous on 127.0.0.1)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    arguments = ["--nnodes=1", f"--nproc_per_node={workers}", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
                 f"--rdzv-id={uuid.uuid4().hex}", "--max-restarts=0", "-m", "lift3d", "batch", config, prompts_path,
                 "--out", str(out_dir), *(["--split", split] if split else []), *overrides]
    os.environ[LAUNCHED_ENV] = "1"
    # torchrun would set 1 thread per rank (with a warning); share the cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        run(get_args_parser().parse_args(arguments))
        failed_workers = False
    except ChildFailedError as error:
        failed_workers = True
        codes = {failure.exitcode for failure in error.failures.values()}
        if codes and all(code in (130, 143, -2, -15) for code in codes):  # the ranks were interrupted
            logger.error("batch interrupted; run the same command again to go on")
            return 143 if any(code in (143, -15) for code in codes) else 130
        logger.error("a batch worker crashed: %s", error)
    finally:
        os.environ.pop(LAUNCHED_ENV, None)
    records = [refresh(r) for r in prompt_folders(load_prompts(prompts_path, split), out_dir)]
    path = write_report(records, out_dir)
    sys.stdout.write(summary_table(records) + f"\nreport: {path}\n")
    return 1 if failed_workers or any(r.status != "done" for r in records) else 0
