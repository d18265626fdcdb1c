"""Helpers shared by every kernel folder: when Triton runs, how outputs are allocated, the autotuners."""

import os
import sys

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under the Triton interpreter."""
    return all(t.is_cuda for t in tensors) or interpreting()


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or filled with NaN when MAMBATRON_POISON=1 so that an element a kernel never writes shows up."""
    if os.environ.get("MAMBATRON_POISON", "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def channel_last(t: torch.Tensor) -> bool:
    """Whether a (batch, dim, seqlen) tensor has unit-stride channels (a transposed (batch, seqlen, dim) view)."""
    return t.stride(1) == 1 and t.stride(2) != 1


def new_output_like_layout(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A :func:`new_output` of t's (batch, dim, seqlen) shape: channel-last when t is, else contiguous."""
    batch, dim, seqlen = t.shape
    dtype = dtype or t.dtype
    if channel_last(t):
        return new_output((batch, seqlen, dim), dtype, t.device).transpose(1, 2)
    return new_output((batch, dim, seqlen), dtype, t.device)


def weight_grad(dout: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """doutᵀ·x for dout (rows, out_f) and x (rows, in_f), returned in ``dtype`` (the parameter's). On CUDA a half
    precision product is written by the GEMM in fp32 directly: no rounding to bf16 and no cast pass afterwards."""
    if dout.is_cuda and dtype == torch.float32 and dout.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(dout.t(), x, out_dtype=torch.float32)
    return torch.matmul(dout.t(), x).to(dtype)


def bias_grad(dout: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The sum of dout (rows, out_f) over rows, accumulated in fp32 and returned in ``dtype`` (the parameter's)."""
    return dout.sum(0, dtype=torch.float32).to(dtype)


def autotuners():
    """Every autotuned Triton kernel in the loaded modules under ``mambatron.kernels``, once each."""
    from triton.runtime.autotuner import Autotuner

    seen = set()
    for name, module in sorted(sys.modules.items()):
        if not name.startswith("mambatron.kernels.") or module is None:
            continue
        for tuner in vars(module).values():
            if isinstance(tuner, Autotuner) and id(tuner) not in seen:
                seen.add(id(tuner))
                yield tuner


def reset_autotuning() -> int:
    """Forgets every autotuning pick of our kernels; returns how many there were. The keys hold the shapes that set
    the tiles (chunk size, head dim, state size, ...) and the grid's size only in factors of 4 (the SSD kernels'
    ``grid_bucket``), so a pick made on a small input can still be reused on a larger one in the same bucket: a
    benchmark that checks at a small shape and times at another calls this in between, so that the timed run picks
    at its own shape, as a training run's first step does."""
    forgotten = 0
    for tuner in autotuners():
        forgotten += len(tuner.cache)
        tuner.cache.clear()
    return forgotten
