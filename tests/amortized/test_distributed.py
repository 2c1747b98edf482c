"""DDP: 2 gloo ranks with b prompts each == 1 rank with 2b; checkpoints resume on another world size."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from amortized_tiny import tiny_config
from lift3d.amortized.train import AmortizedTrainer, load_amortized_config
from lift3d.batch import Shard

STEPS = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(tmp: str, rank: int, world: int, per_rank: int, steps: int, resume: str | None = None) -> dict:
    config = load_amortized_config(None, data=tiny_config(Path(tmp), prompts_per_step=per_rank, steps=steps))
    trainer = AmortizedTrainer(config, run_dir=Path(tmp) / f"run-w{world}", resume=resume,
                               shard=Shard(rank, world, rank, world))
    while trainer.step < steps:
        trainer.train_step(trainer.step)
        trainer.step += 1
    trainer.save()
    return {k: v.detach().clone() for k, v in trainer.generator.state_dict().items()}


def _rank_main(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    state = _train(tmp, rank, world, per_rank=1, steps=STEPS)
    torch.save(state, Path(tmp) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_ranks_match_one_rank_with_twice_the_batch(tmp_path):
    mp.start_processes(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = _train(str(tmp_path), 0, 1, per_rank=2, steps=STEPS)
    initial = load_amortized_config(None, data=tiny_config(tmp_path))
    for name, value in single.items():
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)  # DDP keeps the ranks identical
        torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-6)
    # ...and training did move the parameters (the comparison is not between two initialisations).
    fresh = AmortizedTrainer(initial, run_dir=tmp_path / "fresh", shard=Shard()).generator.state_dict()
    moved = max(float((fresh[n] - single[n]).abs().max()) for n in single)
    assert moved > 1e-4
    # The 2-rank checkpoint resumes on 1 rank and continues as the 1-rank run would.
    resumed = _train(str(tmp_path), 0, 1, per_rank=2, steps=STEPS + 1, resume=str(tmp_path / "run-w2"))
    straight = _train(str(tmp_path / "straight"), 0, 1, per_rank=2, steps=STEPS + 1)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-4, atol=1e-6)
