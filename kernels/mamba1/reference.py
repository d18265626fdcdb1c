"""The spec of the fused Mamba1 op: the reference conv1d, x_proj, dt_proj and selective scan composed, as the mixer
defines them."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mambatron.kernels.conv1d.reference import causal_conv1d_fn_ref
from mambatron.kernels.selective_scan.reference import selective_scan_fn_ref


def inner_norms(x_dbl: torch.Tensor, dt_rank: int, dstate: int, eps: float, weights=None) -> torch.Tensor:
    """RMSNorm of each of dt, B and C: x_dbl (batch, dt_rank + 2·dstate, seqlen) normalised over each segment of dim
    1 per token, in fp32 (fp64 for fp64), returned in x_dbl's dtype. ``weights``: None (FalconMamba: weightless) or
    (dt (dt_rank,), B (dstate,), C (dstate,)) per-channel weights applied after the cast, as Jamba does."""
    parts = torch.split(x_dbl.to(torch.promote_types(x_dbl.dtype, torch.float32)), [dt_rank, dstate, dstate], dim=1)
    normed = [(p * torch.rsqrt(p.pow(2).mean(1, keepdim=True) + eps)).to(x_dbl.dtype) for p in parts]
    if weights is not None:
        normed = [n * w[:, None].to(x_dbl.dtype) for n, w in zip(normed, weights)]
    return torch.cat(normed, dim=1)


def check_widths(xz: torch.Tensor, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor) -> tuple[int, int, int]:
    """(d_inner, dt_rank, dstate) of an [x | z] in_proj output and the x_proj, dt_proj weights; checks they agree."""
    d_inner, dt_rank = dt_proj_weight.shape
    rows = x_proj_weight.shape[0]
    if xz.shape[-1] != 2 * d_inner or x_proj_weight.shape[1] != d_inner or (rows - dt_rank) % 2 or rows <= dt_rank:
        raise ValueError(
            f"xz has {xz.shape[-1]} features, x_proj_weight is {tuple(x_proj_weight.shape)} and dt_proj_weight "
            f"{tuple(dt_proj_weight.shape)}; [x | z] needs 2·d_inner features with x_proj_weight (dt_rank + "
            "2·dstate, d_inner) and dt_proj_weight (d_inner, dt_rank)"
        )
    return d_inner, dt_rank, (rows - dt_rank) // 2


class _AllReduceBothWays(torch.autograd.Function):
    """Sum over the group in forward and in backward: x_proj's output under tensor parallelism is a partial sum over
    the ranks' channels, and every rank consumes all of it with its own channels, so its gradient is partial too."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def mamba1_conv_scan_fn_ref(
    xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, *, seq_idx=None, tp_group=None,
    out_proj_weight=None, out_proj_bias=None, inner_norm_eps=None, inner_norm_weights=None,
):  # fmt: skip
    """xz: (batch, seqlen, 2·d_inner) in_proj output [x | z], any strides; conv_weight: (d_inner, width), conv_bias:
    (d_inner,) or None; x_proj_weight: (dt_rank + 2·dstate, d_inner); dt_proj_weight: (d_inner, dt_rank),
    dt_proj_bias: (d_inner,); A: (d_inner, dstate) (negative: -exp(A_log)); D: (d_inner,); seq_idx: (batch, seqlen)
    int32 document ids or None; tp_group: the tensor-parallel group when d_inner is this rank's slice (x_proj's output
    is then summed over it), else None; inner_norm_eps: when given, dt, B and C are RMS-normalised after x_proj
    (:func:`inner_norms`), weightless as in FalconMamba or with inner_norm_weights (dt, B, C) as in Jamba.

    x = silu(causal_conv1d(x)); [dt | B | C] = x_proj(x); Δ = dt_proj(dt) (its bias added inside the scan, then
    softplus); y = selective_scan(x, Δ, A, B, C, D) · silu(z). Returns y: (batch, seqlen, d_inner) in xz's dtype,
    or, given out_proj_weight (d_model, d_inner) and optional out_proj_bias (d_model,), the projection
    F.linear(y, W, b): (batch, seqlen, d_model).
    """
    d_inner, dt_rank, dstate = check_widths(xz, x_proj_weight, dt_proj_weight)
    x, z = xz[..., :d_inner].transpose(1, 2), xz[..., d_inner:].transpose(1, 2)  # (batch, d_inner, seqlen)
    x = causal_conv1d_fn_ref(x, conv_weight, conv_bias, seq_idx=seq_idx, activation="silu")
    x_dbl = torch.matmul(x_proj_weight, x)  # (batch, dt_rank + 2·dstate, seqlen)
    if tp_group is not None:
        x_dbl = _AllReduceBothWays.apply(x_dbl, tp_group)
    if inner_norm_eps is not None:
        x_dbl = inner_norms(x_dbl, dt_rank, dstate, inner_norm_eps, inner_norm_weights)
    dt, B, C = torch.split(x_dbl, [dt_rank, dstate, dstate], dim=1)
    delta = torch.matmul(dt_proj_weight, dt)
    y = selective_scan_fn_ref(
        x, delta, A, B, C, D, z=z, delta_bias=dt_proj_bias, delta_softplus=True, seq_idx=seq_idx
    )  # fmt: skip
    y = y.transpose(1, 2)
    return y if out_proj_weight is None else F.linear(y, out_proj_weight, out_proj_bias)
