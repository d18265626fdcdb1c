"""Stand-ins that let megatron-core and DeepSpeed run on CPU with gloo (tests, CI, GPU-less clusters).

Applied once by :func:`apply` and only when CUDA is unavailable; on a GPU machine nothing here is touched.

- megatron-core allocates communication buffers with ``device=torch.cuda.current_device()``; on CPU that call
  raises, so it returns the CPU device instead.
- megatron's RNG tracker (``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker().fork()``, its activation
  checkpointing) reads and writes CUDA generator states. Here they read and write one dedicated CPU generator, so
  the tracker works without perturbing the global CPU RNG stream that data order and init depend on.
- DeepSpeed's CPU accelerator JIT-builds a shared-memory collective op on ``init_distributed`` (minutes, gigabytes);
  gloo does not need it, so the build is skipped.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

_applied = False
_moe_applied = False
# Stands in for the CUDA default generator that megatron's RNG tracker saves, seeds and restores.
_tracker_generator = torch.Generator(device="cpu")


def needed() -> bool:
    """True when the shims apply: no usable CUDA device."""
    return not torch.cuda.is_available()


def apply() -> bool:
    """Install the CPU stand-ins (idempotent). Returns True when they are active, False on a CUDA machine."""
    global _applied
    if not needed():
        return False
    if _applied:
        return True
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.manual_seed = _manual_seed
    torch.cuda.manual_seed_all = _manual_seed
    _patch_megatron_random()
    _skip_deepspeed_shm_build()
    _applied = True
    return True


def apply_moe() -> bool:
    """The stand-ins megatron-core's MoE layer needs on CPU, on top of :func:`apply` (idempotent; False on CUDA):

    - its all-to-all token dispatcher moves routing counts to the host on a side CUDA stream, so
      ``torch.cuda.Stream``, ``current_stream`` and ``stream`` become no-op stand-ins;
    - it turns those counts into the split sizes of ``all_to_all_single`` only when they are CUDA tensors (through
      numpy); CPU tensors would reach gloo as tensors, which it rejects, so they go through numpy too.
    """
    global _moe_applied
    if not apply():
        return False
    if _moe_applied:
        return True
    import contextlib

    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    stream = _HostStream()
    torch.cuda.Stream = lambda *args, **kwargs: stream
    torch.cuda.current_stream = lambda *args, **kwargs: stream
    torch.cuda.stream = lambda s: contextlib.nullcontext()
    to_host = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return to_host(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    _moe_applied = True
    return True


class _HostStream:
    """A CUDA stream's interface, doing nothing: on CPU every operation is already in order."""

    def wait_stream(self, other) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, event=None):
        return self

    def wait(self, *args) -> None:
        return None


def _get_rng_state(device: object = "cuda") -> torch.Tensor:
    return _tracker_generator.get_state()


def _set_rng_state(new_state: torch.Tensor, device: object = -1, graph_safe: bool = False) -> None:
    _tracker_generator.set_state(new_state)


def _get_tracker_state(device: object = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return _tracker_generator.get_state()


def _manual_seed(seed: int) -> None:
    _tracker_generator.manual_seed(int(seed))


def _patch_megatron_random() -> None:
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _get_tracker_state
    random._set_cuda_rng_state = _set_rng_state


def _skip_deepspeed_shm_build() -> None:
    # ``import deepspeed.comm.torch as m`` binds the real ``torch`` (the package re-exports it under that name),
    # so the module is taken from sys.modules.
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
