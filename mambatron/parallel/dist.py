"""Process-group setup: torchrun or SLURM environment → torch.distributed + megatron-core parallel_state.

Ranks are laid out TP-major (megatron's default order, tp-cp-dp): ranks ``[k*tp, (k+1)*tp)`` form one
tensor-parallel group, ``cp`` consecutive TP groups form one context-parallel group (one rank from each TP group per
CP group), and the data-parallel groups take one rank from each of those. nccl on GPU, gloo on CPU (where
:mod:`.cpu_shims` are applied first). A single process with no launcher environment gets a world of one, so tests
and notebooks need no setup.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mambatron.config import ConfigError, ParallelConfig
from mambatron.parallel import cpu_shims


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. ``device`` is the torch device its model lives on."""

    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device
    backend: str
    cp_size: int = 1
    cp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    """Rank layout and rendezvous read from the launcher's environment variables."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Read RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (torchrun), else SLURM_PROCID/SLURM_NTASKS/
    SLURM_LOCALID with MASTER_ADDR from the first host of SLURM_NODELIST, else a single process.

    torchrun's variables win when both are present (``srun torchrun ...``).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK") or 0),
            master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
            master_port=int(env.get("MASTER_PORT") or 29500),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        master_addr = env.get("MASTER_ADDR") or first_host(nodelist)
        # One port per job so two jobs sharing a node do not collide; 15000-24999 stays below Linux's ephemeral
        # range (32768+), where an outgoing connection may already hold the port, and below torchrun's 29500.
        default_port = 15000 + int(env.get("SLURM_JOB_ID") or 0) % 10000
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID") or 0),
            master_addr=master_addr,
            master_port=int(env.get("MASTER_PORT") or default_port),
            source="slurm",
        )
    return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0, source="single")


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: ``"gpu[01-03,7],cpu1"`` → ``["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"]``.

    Handles several bracket groups per name (``"r[1-2]n[3-4]"``); zero padding follows the range's first bound.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        expanded = [""]
        for text, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            if not text and not ranges:
                continue
            parts = [text]
            if ranges:
                parts = [text + n for n in _expand_ranges(ranges)]
            expanded = [prefix + part for prefix in expanded for part in parts]
        hosts.extend(h for h in expanded if h)
    return hosts


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list, via ``scontrol show hostnames`` when available, else :func:`expand_hostlist`."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_hostlist(nodelist)[0]


def local_cuda_device(local_rank: int, device_count: int) -> int:
    """The CUDA device index of the process with ``local_rank`` on a node where it sees ``device_count`` devices.

    Normally its local rank; 0 when every task sees only its own GPU (``srun --gpus-per-task=1`` or
    ``--gpu-bind=single:1`` set ``CUDA_VISIBLE_DEVICES`` per task, while local ranks still count up).
    """
    if local_rank < device_count:
        return local_rank
    if device_count == 1:
        return 0
    raise ConfigError(
        f"local rank {local_rank} but only {device_count} CUDA devices are visible; launch at most {device_count} "
        "processes per node (torchrun --nproc-per-node, srun --ntasks-per-node) or give each task one GPU"
    )


def setup(parallel_cfg: ParallelConfig | None = None, *, timeout_minutes: int = 30) -> DistInfo:
    """Initialise torch.distributed and megatron-core's parallel_state with TP = ``parallel_cfg.tp``, CP =
    ``parallel_cfg.cp``, DP = the rest.

    Idempotent for an already initialised process group (its backend is kept). Raises :class:`ConfigError` when
    the world size is not a multiple of TP × CP.
    """
    parallel_cfg = parallel_cfg or ParallelConfig()
    tp = parallel_cfg.tp * parallel_cfg.cp  # the model-parallel block every data-parallel rank spans
    launch = read_launch_env()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_shims.apply()
    backend = "nccl" if on_gpu else "gloo"

    if not dist.is_initialized():
        world = launch.world_size
        if world % tp:
            raise ConfigError(
                f"WORLD_SIZE={world} is not a multiple of {_tp_cp(parallel_cfg)}; launch a multiple of {tp}"
            )
        if on_gpu:
            torch.cuda.set_device(local_cuda_device(launch.local_rank, torch.cuda.device_count()))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if launch.source == "single":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            # DeepSpeed and other libraries read these; SLURM launches do not set them.
            for key, value in (
                ("RANK", launch.rank),
                ("WORLD_SIZE", launch.world_size),
                ("LOCAL_RANK", launch.local_rank),
                ("MASTER_ADDR", launch.master_addr),
                ("MASTER_PORT", launch.master_port),
            ):
                os.environ[key] = os.environ.get(key) or str(value)
            dist.init_process_group(
                backend,
                init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                rank=launch.rank,
                world_size=launch.world_size,
                timeout=timeout,
            )
    else:
        backend = dist.get_backend()
        if on_gpu:
            torch.cuda.set_device(local_cuda_device(launch.local_rank, torch.cuda.device_count()))
    world = dist.get_world_size()
    if world % tp:
        raise ConfigError(f"WORLD_SIZE={world} is not a multiple of {_tp_cp(parallel_cfg)}; launch a multiple of {tp}")
    dp = world // (parallel_cfg.tp * parallel_cfg.cp)
    if parallel_cfg.tp == 1 and (dp * parallel_cfg.cp) % parallel_cfg.ep:
        raise ConfigError(
            f"parallel.ep={parallel_cfg.ep} must divide the {dp * parallel_cfg.cp} data x context parallel ranks "
            f"(WORLD_SIZE={world} over {_tp_cp(parallel_cfg)}); the experts are split over those ranks"
        )

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
        ) != (parallel_cfg.tp, parallel_cfg.cp, parallel_cfg.ep):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel_cfg.tp,
            context_parallel_size=parallel_cfg.cp,
            expert_model_parallel_size=parallel_cfg.ep,
            expert_tensor_parallel_size=1,  # experts are never split by TP: EP groups are consecutive ranks
            distributed_timeout_minutes=timeout_minutes,
            create_gloo_process_groups=False,
        )
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return DistInfo(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=launch.local_rank,
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
        backend=backend,
        cp_size=parallel_state.get_context_parallel_world_size(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        ep_size=parallel_state.get_expert_model_parallel_world_size(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
    )


def _tp_cp(parallel_cfg: ParallelConfig) -> str:
    if parallel_cfg.cp == 1:
        return f"parallel.tp={parallel_cfg.tp}"
    return f"parallel.tp × parallel.cp = {parallel_cfg.tp} × {parallel_cfg.cp}"


def context_parallel(info: DistInfo):
    """This rank's :class:`~mambatron.parallel.context.ContextParallel` (megatron-core's CP group), None at CP=1."""
    if info.cp_size == 1:
        return None
    from megatron.core import parallel_state

    from mambatron.parallel.context import ContextParallel

    return ContextParallel(parallel_state.get_context_parallel_group(), info.cp_size, info.cp_rank)


def seed_model_parallel(seed: int) -> None:
    """Seed megatron's RNG tracker (default, tensor-parallel and expert streams) for ``tensor_parallel.checkpoint``
    and forked regions. Does not touch the global CPU generator when running without CUDA."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def teardown() -> None:
    """Destroy megatron's groups and the default process group (an exit without it sometimes aborts under gloo)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _split_top_level(nodelist: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in nodelist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if current:
        items.append(current)
    return [i.strip() for i in items if i.strip()]


def _expand_ranges(ranges: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
        else:
            out.append(part)
    return out
