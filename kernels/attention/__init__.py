"""Causal grouped-query attention over packed documents: ``attention_fn`` (torch SDPA: flash / memory-efficient
kernels on a GPU) and ``attention_fn_ref`` (explicit softmax, the spec)."""

from .api import attention_fn
from .reference import attention_fn_ref

__all__ = ["attention_fn", "attention_fn_ref"]
