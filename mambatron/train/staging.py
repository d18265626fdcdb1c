"""Staging DeepSpeed's checkpoint files in host memory, so that they can be written while training goes on.

DeepSpeed's ``engine.save_checkpoint`` hands every file it writes (module states, ZeRO optimizer shards, MoE expert
states) to ``engine.checkpoint_engine.save(state_dict, path)``. :func:`staged_save` swaps that engine for one whose
``save`` copies the state dict's tensors into host buffers (pinned and reused from save to save on a GPU) and keeps
``(path, copy)``; the copies are then written by :class:`mambatron.train.checkpoint.Checkpointer`'s background
thread. This module is the only place that touches the engine's ``checkpoint_engine`` attribute; the contract it
relies on (every file goes through ``checkpoint_engine.save``) is pinned by a test for the supported DeepSpeed
versions (tests/train/test_async_save.py).
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class HostBuffers:
    """Host copies of tensors, reused by the next save when it copies tensors of the same sizes in the same order
    (the same model and optimizer): pinned memory is slow to allocate (page-locking gigabytes takes seconds), and a
    save copies gigabytes. :meth:`reserve` allocates them ahead of the first save, in a background thread."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._next = 0
        self._reserving: threading.Thread | None = None
        self.allocations = 0  # buffers the current save had to allocate (none when reserved buffers fit)
        self.reserve_seconds: float | None = None  # how long the background allocation took
        self.reserve_error: BaseException | None = None

    def reserve(self, specs: list[tuple[torch.dtype, int, bool]]) -> None:
        """Allocate buffers for tensors of these ``(dtype, numel, pinned)``, in this order, in a background thread
        (:class:`SizeRecorder` gives them). A save waits for it to finish; if it failed (no pinned memory left), the
        save allocates as it goes, and fails the same way if it must."""
        self.wait_reserved()

        def allocate() -> None:
            started = time.perf_counter()
            try:
                buffers = [torch.empty(numel, dtype=dtype, pin_memory=pin) for dtype, numel, pin in specs]
            except BaseException as e:  # noqa: BLE001 - the save allocates on demand instead
                self.reserve_error = e
                return
            self._buffers = buffers
            self.reserve_seconds = time.perf_counter() - started

        self._reserving = threading.Thread(target=allocate, name="checkpoint-buffers", daemon=True)
        self._reserving.start()

    def wait_reserved(self) -> None:
        if self._reserving is not None:
            self._reserving.join()
            self._reserving = None

    def reset(self) -> None:
        """Start a new save: buffers handed out before may be reused (their previous save must be written)."""
        self.wait_reserved()
        self._next = 0
        self.allocations = 0

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        pin = t.is_cuda
        if self._next < len(self._buffers):
            buf = self._buffers[self._next]
            if buf.dtype != t.dtype or buf.numel() != t.numel() or buf.is_pinned() != pin:
                buf = self._buffers[self._next] = torch.empty(t.numel(), dtype=t.dtype, pin_memory=pin)
                self.allocations += 1
        else:
            buf = torch.empty(t.numel(), dtype=t.dtype, pin_memory=pin)
            self._buffers.append(buf)
            self.allocations += 1
        self._next += 1
        out = buf.view(t.shape)
        out.copy_(t, non_blocking=pin)
        return out


class SizeRecorder:
    """Stands in for :class:`HostBuffers` in a save that only learns what it would copy: records each tensor's
    ``(dtype, numel, pinned)`` and copies nothing."""

    def __init__(self) -> None:
        self.specs: list[tuple[torch.dtype, int, bool]] = []

    def reset(self) -> None:
        pass

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        self.specs.append((t.dtype, t.numel(), t.is_cuda))
        return t


def stage(obj: Any, buffers: HostBuffers | SizeRecorder) -> Any:
    """A copy of ``obj`` (nested dicts, lists, tuples and plain objects, as DeepSpeed saves) whose tensors are host
    copies, so that training may change the originals once it returns (after a CUDA synchronize)."""
    memo: dict[int, Any] = {}

    def visit(o: Any) -> None:
        if torch.is_tensor(o):
            if id(o) not in memo:
                memo[id(o)] = buffers.copy(o)
        elif isinstance(o, dict):
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple, set)):
            for v in o:
                visit(v)

    with torch.no_grad():
        visit(obj)
        return copy.deepcopy(obj, memo)


def _staging_engine(original: Any, buffers: HostBuffers | SizeRecorder) -> Any:
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class StagingCheckpointEngine(CheckpointEngine):
        """Keeps each file's state dict as host copies instead of writing it."""

        def __init__(self) -> None:
            super().__init__(None)
            self.files: list[tuple[str, Any]] = []

        def create(self, info: Any) -> None:
            pass

        def makedirs(self, path: str, exist_ok: bool = False) -> None:
            os.makedirs(path, exist_ok=exist_ok)

        def save(self, state_dict: Any, path: str) -> None:
            self.files.append((str(path), stage(state_dict, buffers)))

        def load(self, path: str, map_location: Any = None) -> Any:
            return original.load(path, map_location=map_location)

        def commit(self, info: Any) -> bool:
            return True

        def is_data_parallel_writer(self, dp_rank: int) -> bool:
            return original.is_data_parallel_writer(dp_rank)

        def is_decoupled(self) -> bool:
            return False

        def preserves_storage_sharing(self) -> bool:
            return False  # each tensor is copied on its own: no need for DeepSpeed to clone views first

    return StagingCheckpointEngine()


@contextmanager
def staged_save(engine: Any, buffers: HostBuffers | SizeRecorder) -> Iterator[list[tuple[str, Any]]]:
    """Within the block, ``engine.save_checkpoint`` stages its files into the yielded list ``[(path, state), ...]``
    instead of writing them. An engine without a ``checkpoint_engine`` (a test double) writes as it always does."""
    original = getattr(engine, "checkpoint_engine", None)
    if original is None:
        yield []
        return
    buffers.reset()
    staging = _staging_engine(original, buffers)
    engine.checkpoint_engine = staging
    try:
        yield staging.files
    finally:
        engine.checkpoint_engine = original
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the host copies are complete before training changes the originals
