"""Loading checkpoint files without running code from them.

A ``.pt`` file is a pickle: loaded with ``torch.load(..., weights_only=False)`` it can run any command its author put
in it. mambatron only ever loads with ``weights_only=True``: tensors, containers and plain Python values, plus the
few types below that DeepSpeed (and older mambatron rank files) store beside the tensors. Anything else is refused
with :class:`UnsafeCheckpointError`, naming the file.

DeepSpeed loads its own files with ``weights_only=False`` (its checkpoint engine and ``zero_to_fp32``); wrap every
call that makes it load in :func:`safe_torch_load`, which routes each ``torch.load`` of the block through
:func:`load`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["UnsafeCheckpointError", "load", "safe_torch_load", "allowed_globals"]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds Python objects that could run code when unpickled; it was not loaded."""


def before_deepspeed_import() -> None:
    """On a machine without CUDA, name the CPU accelerator DeepSpeed would pick itself, so that importing it does not
    print a warning about the choice (the trainer's CPU shims do the same)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@functools.cache
def allowed_globals() -> tuple[Any, ...]:
    """The non-tensor types a mambatron or DeepSpeed checkpoint may hold; each is plain data once unpickled."""
    import numpy as np

    # Older rank files hold NumPy's RNG key as a uint32 array.
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    allowed: list[Any] = [np.ndarray, np.dtype, multiarray._reconstruct, np.dtypes.UInt32DType]
    before_deepspeed_import()
    try:  # DeepSpeed's optimizer files: the loss-scaler settings, the ZeRO stage and flat-buffer fragment offsets
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    return tuple(allowed)


_torch_load = torch.load


def load(path: str | Path | Any, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """``torch.load`` with ``weights_only=True`` and :func:`allowed_globals`; refuses anything else."""
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)
    try:
        with torch.serialization.safe_globals(list(allowed_globals())):
            return _torch_load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)", str(e))
        what = f"it references {found.group(1)}" if found else "it holds more than tensors and plain data"
        raise UnsafeCheckpointError(
            f"refusing to load {path}: {what}, which could run code when unpickled; checkpoints are loaded with "
            "weights_only=True (see 'Trust model' in docs/training.md)"
        ) from None


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Inside the block every ``torch.load`` (also a library's that asks for ``weights_only=False``) is :func:`load`."""
    previous = torch.load
    torch.load = lambda f, map_location=None, **kwargs: load(f, map_location, **kwargs)
    try:
        yield
    finally:
        torch.load = previous
