"""Plain-PyTorch RMSNorms: the specification the Triton kernels are tested against.

``rms_norm_fn_ref``: residual-add + RMSNorm of a Mamba block (mamba_ssm's ``rms_norm_fn``).
    x, residual: (..., hidden); weight, bias: (hidden,)
    s = x + residual (added in fp32); out = s / sqrt(mean(s^2) + eps) * weight + bias, in x's dtype.
    With prenorm, the sum s is returned too, in fp32 when residual_in_fp32, else in residual's (or x's) dtype.

``rmsnorm_fn_ref``: gated group-wise RMSNorm of Mamba2 (mamba_ssm's ``layernorm_gated.rmsnorm_fn``).
    x, z: (..., hidden); weight, bias: (hidden,); hidden is split into groups of group_size (None: one group)
    norm_before_gate=True:  out = norm(x) * silu(z)
    norm_before_gate=False: out = norm(x * silu(z))   (what Mamba2 uses)
    where norm is the RMSNorm of each group followed by * weight + bias; out has x's dtype.
Compute is fp32 (fp64 for fp64 inputs).
"""

import torch
import torch.nn.functional as F

__all__ = ["rms_norm_fn_ref", "rmsnorm_fn_ref"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check_affine(x, weight, bias):
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be (hidden={hidden},), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (hidden,):
        raise ValueError(f"bias must be (hidden={hidden},), got {tuple(bias.shape)}")


def rms_norm_fn_ref(x, weight, bias=None, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False):
    """Residual-add + RMSNorm in plain PyTorch (differentiable).

    Args:
        x: (..., hidden); weight, bias: (hidden,); residual: (..., hidden) or None.
    Returns:
        out (..., hidden) in x's dtype, or (out, residual_out) when prenorm.
    """
    _check_affine(x, weight, bias)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    cdt = _compute_dtype(x)
    s = x.to(cdt) if residual is None else x.to(cdt) + residual.to(cdt)
    rstd = torch.rsqrt(s.square().mean(-1, keepdim=True) + eps)
    out = s * rstd * weight.to(cdt)
    if bias is not None:
        out = out + bias.to(cdt)
    out = out.to(x.dtype)
    if not prenorm:
        return out
    if residual_in_fp32:
        residual_dtype = cdt
    else:
        residual_dtype = x.dtype if residual is None else residual.dtype
    return out, s.to(residual_dtype)


def rmsnorm_fn_ref(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Gated group-wise RMSNorm in plain PyTorch (differentiable).

    Args:
        x: (..., hidden); weight, bias: (hidden,); z: (..., hidden) gate or None; group_size divides hidden.
    Returns:
        out: (..., hidden) in x's dtype.
    """
    _check_affine(x, weight, bias)
    hidden = x.shape[-1]
    group_size = hidden if group_size is None else group_size
    if hidden % group_size != 0:
        raise ValueError(f"group_size={group_size} must divide hidden={hidden}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    cdt = _compute_dtype(x)
    xc = x.to(cdt)
    if z is not None and not norm_before_gate:
        xc = xc * F.silu(z.to(cdt))
    xg = xc.reshape(*x.shape[:-1], hidden // group_size, group_size)
    rstd = torch.rsqrt(xg.square().mean(-1, keepdim=True) + eps)
    out = (xg * rstd).reshape(x.shape) * weight.to(cdt)
    if bias is not None:
        out = out + bias.to(cdt)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(cdt))
    return out.to(x.dtype)
