"""Causal depthwise conv1d: ``causal_conv1d_fn``, ``causal_conv1d_update`` (Triton, reference on CPU) and their
plain-PyTorch references."""

from .api import causal_conv1d_fn, causal_conv1d_update
from .reference import causal_conv1d_fn_ref, causal_conv1d_update_ref

__all__ = ["causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_fn_ref", "causal_conv1d_update_ref"]
