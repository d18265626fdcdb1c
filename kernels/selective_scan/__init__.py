"""Mamba1 selective scan: ``selective_scan_fn`` (Triton, reference on CPU) and its plain-PyTorch references."""

from .api import selective_scan_fn
from .reference import selective_scan_chunked_ref, selective_scan_fn_ref, selective_scan_sequential_ref

__all__ = ["selective_scan_fn", "selective_scan_fn_ref", "selective_scan_chunked_ref", "selective_scan_sequential_ref"]
