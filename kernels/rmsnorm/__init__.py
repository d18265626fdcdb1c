"""RMSNorms: fused residual-add ``rms_norm_fn``, gated group-wise ``rmsnorm_fn``, and their references."""

from .reference import rms_norm_fn_ref, rmsnorm_fn_ref

rms_norm_fn = rms_norm_fn_ref
rmsnorm_fn = rmsnorm_fn_ref

__all__ = ["rms_norm_fn", "rmsnorm_fn", "rms_norm_fn_ref", "rmsnorm_fn_ref"]
