"""Run a function on N gloo processes (torch.multiprocessing spawn) and collect what each rank returns."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from mambatron.config import ParallelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int,
    fn: Callable,
    world_size: int,
    tp: int,
    port: int,
    out_dir: str,
    launcher: str,
    args: tuple,
    cp: int = 1,
    ep: int = 1,
) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(var, None)
    if launcher == "torchrun":
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    else:  # what srun sets: the rendezvous host comes from the node list
        os.environ.update(
            SLURM_PROCID=str(rank), SLURM_NTASKS=str(world_size), SLURM_LOCALID=str(rank),
            SLURM_JOB_NODELIST="127.0.0.1",
        )  # fmt: skip
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    from mambatron.parallel import dist as pdist

    info = pdist.setup(ParallelConfig(tp=tp, cp=cp, ep=ep))
    try:
        result = fn(info, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        pdist.teardown()


def run_distributed(
    fn: Callable, world_size: int, tp: int, *args: Any, launcher: str = "torchrun", cp: int = 1, ep: int = 1
) -> list[Any]:
    """``fn(dist_info, *args)`` on ``world_size`` processes with TP ``tp``, CP ``cp`` and EP ``ep``, set up from
    torchrun-style or SLURM-style (``launcher="slurm"``) environment variables; returns each rank's result."""
    with tempfile.TemporaryDirectory() as out_dir:
        spawn_args = (fn, world_size, tp, _free_port(), out_dir, launcher, args, cp, ep)
        mp.spawn(_entry, args=spawn_args, nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
