"""Chooses the implementation of each sequence op from ``model.kernels`` (auto | triton | reference).

``auto`` runs the Triton kernels on CUDA tensors and the plain-PyTorch references elsewhere; ``triton`` always
calls the Triton entry points (on CPU that needs ``TRITON_INTERPRET=1``); ``reference`` always runs the references.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache

import torch

_OPS = {
    "selective_scan": ("mambatron.kernels.selective_scan", "selective_scan_fn"),
    "ssd": ("mambatron.kernels.ssd", "mamba_chunk_scan_combined"),
    "conv1d": ("mambatron.kernels.conv1d", "causal_conv1d_fn"),
    "conv1d_update": ("mambatron.kernels.conv1d", "causal_conv1d_update"),
    "rms_norm": ("mambatron.kernels.rmsnorm", "rms_norm_fn"),
    "gated_rms_norm": ("mambatron.kernels.rmsnorm", "rmsnorm_fn"),
    "attention": ("mambatron.kernels.attention", "attention_fn"),
    "linear_cross_entropy": ("mambatron.kernels.cross_entropy", "linear_cross_entropy_fn"),
    "mamba1_conv_scan": ("mambatron.kernels.mamba1", "mamba1_conv_scan_fn"),
    "mamba2_split_conv_scan": ("mambatron.kernels.mamba2", "mamba2_split_conv_scan_fn"),
    "grouped_linear": ("mambatron.kernels.grouped_gemm", "grouped_linear_fn"),
}


@cache
def _load(op: str, reference: bool) -> Callable:
    module, name = _OPS[op]
    if reference:
        return getattr(importlib.import_module(module + ".reference"), name + "_ref")
    return getattr(importlib.import_module(module), name)


def get_op(op: str, kernels: str, like: torch.Tensor) -> Callable:
    """The function implementing ``op`` for tensors like ``like`` under the ``kernels`` setting."""
    if kernels == "reference" or (kernels == "auto" and not like.is_cuda):
        return _load(op, True)
    return _load(op, False)
