"""The spec of the fused Mamba2 op: the reference conv1d, SSD and gated RMSNorm composed, as the mixer defines them."""

import torch
import torch.nn.functional as F

from mambatron.kernels.conv1d.reference import causal_conv1d_fn_ref
from mambatron.kernels.rmsnorm.reference import rmsnorm_fn_ref
from mambatron.kernels.ssd.reference import mamba_chunk_scan_combined_ref


def split_sizes(zxbcdt: torch.Tensor, d_inner: int, ngroups: int, dstate: int) -> tuple[int, int, int]:
    """(d_inner, conv_dim, nheads) of a [z | x | B | C | dt] in_proj output; checks that the widths add up."""
    conv_dim = d_inner + 2 * ngroups * dstate
    nheads = zxbcdt.shape[-1] - d_inner - conv_dim
    if nheads <= 0 or d_inner % nheads:
        raise ValueError(
            f"zxbcdt has {zxbcdt.shape[-1]} features; [z | x | B | C | dt] with d_inner={d_inner}, ngroups={ngroups}, "
            f"dstate={dstate} needs 2·d_inner + 2·ngroups·dstate + nheads with nheads dividing d_inner"
        )
    return d_inner, conv_dim, nheads


def mamba2_split_conv_scan_fn_ref(
    zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, *, d_inner, ngroups, dstate, chunk_size,
    norm_group_size, eps, seq_idx=None, out_proj_weight=None, out_proj_bias=None, keep_states=False,
):  # fmt: skip
    """zxbcdt: (batch, seqlen, 2·d_inner + 2·ngroups·dstate + nheads), the in_proj output [z | x | B | C | dt];
    conv_weight: (conv_dim, width), conv_bias: (conv_dim,) or None; dt_bias, A, D: (nheads,); norm_weight: (d_inner,);
    seq_idx: (batch, seqlen) int32 document ids or None.

    xBC = silu(causal_conv1d(xBC)); y = SSD(x, softplus(dt + dt_bias), A, B, C, D); out = RMSNorm(y · silu(z)) per
    group of norm_group_size channels. Returns out: (batch, seqlen, d_inner) in zxbcdt's dtype, or, given
    out_proj_weight (d_model, d_inner) and optional out_proj_bias (d_model,), the projection F.linear(out, W, b):
    (batch, seqlen, d_model). keep_states (what the Triton op keeps for backward) does not change the result.
    """
    di, conv_dim, nheads = split_sizes(zxbcdt, d_inner, ngroups, dstate)
    batch, seqlen, _ = zxbcdt.shape
    z, xbc, dt = torch.split(zxbcdt, [di, conv_dim, nheads], dim=-1)
    xbc = causal_conv1d_fn_ref(xbc.transpose(1, 2), conv_weight, conv_bias, seq_idx=seq_idx, activation="silu")
    x, B, C = torch.split(xbc.transpose(1, 2), [di, ngroups * dstate, ngroups * dstate], dim=-1)
    y = mamba_chunk_scan_combined_ref(
        x.reshape(batch, seqlen, nheads, di // nheads), dt, A,
        B.reshape(batch, seqlen, ngroups, dstate), C.reshape(batch, seqlen, ngroups, dstate), chunk_size,
        D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True,
    )  # fmt: skip
    out = rmsnorm_fn_ref(
        y.reshape(batch, seqlen, di), norm_weight, None, z=z, eps=eps, group_size=norm_group_size,
        norm_before_gate=False,
    )  # fmt: skip
    return out if out_proj_weight is None else F.linear(out, out_proj_weight, out_proj_bias)
