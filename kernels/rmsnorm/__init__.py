"""RMSNorms: fused residual-add ``rms_norm_fn`` and gated group-wise ``rmsnorm_fn`` (Triton, reference on CPU), and
their plain-PyTorch references."""

from .api import rms_norm_fn, rmsnorm_fn
from .reference import rms_norm_fn_ref, rmsnorm_fn_ref

__all__ = ["rms_norm_fn", "rmsnorm_fn", "rms_norm_fn_ref", "rmsnorm_fn_ref"]
