"""``mamba2_split_conv_scan_fn``: conv1d → SSD → gated RMSNorm on the in_proj output as one autograd op.

Composed from the kernels' functional forward/backward (conv1d, ssd, rmsnorm), so it adds no kernel of its own. What
it changes is what is kept and where gradients land:

- saved for backward: the in_proj output itself (z, xBC and dt are column views of it), the SSD output before the
  norm, the norm's rstd and SSD's per-chunk dt/cumsum (batch·nheads·seqlen fp32 each). The conv output (x, B, C) is
  recomputed in backward, one conv launch, instead of kept; z is read in place, never copied;
- given out_proj's weight (a single-device linear), the projection runs inside too, and the norm's output, which
  out_proj would otherwise keep for its weight gradient, is written again by the norm's backward kernel, from values
  it loads anyway (d_inner per token less kept, and no second forward pass of the norm);
- backward writes dz, the conv input's gradient and ddt straight into one preallocated (batch, seqlen, features)
  buffer, and SSD's dx, dB, dC into one conv-output-gradient buffer, so there is no split-backward concatenation.
"""

import torch
import torch.nn.functional as F

from mambatron.kernels._common import bias_grad, use_triton, weight_grad
from mambatron.kernels.conv1d.api import conv_backward, conv_forward
from mambatron.kernels.rmsnorm.api import norm_backward, norm_forward, row_stride
from mambatron.kernels.ssd.combined import ssd_backward, ssd_forward
from mambatron.kernels.ssd.reference import NO_DT_LIMIT, document_index

from .reference import mamba2_split_conv_scan_fn_ref, split_sizes


class _Views:
    """The column views of a [z | x | B | C | dt] tensor (the in_proj output or its gradient)."""

    def __init__(self, t: torch.Tensor, d_inner: int, conv_dim: int):
        self.z = t[..., :d_inner]
        self.xbc = t[..., d_inner : d_inner + conv_dim]
        self.dt = t[..., d_inner + conv_dim :]


def _xbc_heads(xbc: torch.Tensor, d_inner: int, ngroups: int, dstate: int, nheads: int):
    """x (batch, seqlen, nheads, headdim), B and C (batch, seqlen, ngroups, dstate): views of an xBC tensor."""
    gn = ngroups * dstate
    x = xbc[..., :d_inner].unflatten(-1, (nheads, d_inner // nheads))
    B = xbc[..., d_inner : d_inner + gn].unflatten(-1, (ngroups, dstate))
    C = xbc[..., d_inner + gn :].unflatten(-1, (ngroups, dstate))
    return x, B, C


class _Mamba2SplitConvScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, seq_idx, dims, out_w, out_b):
        d_inner, ngroups, dstate, chunk_size, group_size, eps, keep_states = dims
        di, conv_dim, nheads = split_sizes(zxbcdt, d_inner, ngroups, dstate)
        v = _Views(zxbcdt, di, conv_dim)
        batch, seqlen, _ = zxbcdt.shape
        # The conv reads xBC in place as a channel-last view and returns a channel-last (batch, seqlen, conv_dim).
        xbc = conv_forward(v.xbc.transpose(1, 2), conv_weight, conv_bias, seq_idx, None, True).transpose(1, 2)
        x, B, C = _xbc_heads(xbc, di, ngroups, dstate, nheads)
        doc = document_index(seq_idx).contiguous() if seq_idx is not None else None
        y, _, (_, dt_out, dA_cumsum, prev_states) = ssd_forward(
            x, v.dt, A, B, C, chunk_size, D, None, dt_bias, None, doc, True, NO_DT_LIMIT, keep_states
        )
        del xbc, x, B, C
        y = y.view(batch, seqlen, di)
        out, _, rstd = norm_forward(y, None, v.z, norm_weight, None, eps, group_size, False, False, None)
        # out_proj in the activations' dtype, as autocast would run F.linear; its gradients come back in the
        # parameters' dtype (an fp32 weight's from an fp32-output GEMM), with no cast pass.
        ctx.out_dtypes = None if out_w is None else (out_w.dtype, None if out_b is None else out_b.dtype)
        if out_w is not None:
            out_w = out_w.to(zxbcdt.dtype)
            out_b = None if out_b is None else out_b.to(zxbcdt.dtype)
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, seq_idx, y, rstd, dt_out,
                              dA_cumsum, prev_states, out_w)  # fmt: skip
        ctx.dims = dims
        return out if out_w is None else F.linear(out, out_w, out_b)

    @staticmethod
    def backward(ctx, dout):
        (zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, seq_idx, y, rstd, dt_out, dA_cumsum, prev_states,
         out_w) = ctx.saved_tensors  # fmt: skip
        d_inner, ngroups, dstate, chunk_size, group_size, eps, _ = ctx.dims
        di, conv_dim, nheads = split_sizes(zxbcdt, d_inner, ngroups, dstate)
        batch, seqlen, _ = zxbcdt.shape
        v = _Views(zxbcdt, di, conv_dim)
        dout_w = dout_b = None
        dres = dout.reshape(-1, dout.shape[-1])
        if out_w is not None:
            dout = torch.matmul(dout, out_w)
        dzxbcdt = torch.empty_like(zxbcdt)
        dv = _Views(dzxbcdt, di, conv_dim)
        # With out_proj inside, its weight gradient needs the norm's output: the norm's backward writes it again.
        out_dtype = y.dtype if out_w is not None else None
        dy, _, _, dnorm_weight, _, *out = norm_backward(
            y, None, v.z, norm_weight, None, rstd, False, dout, dz=dv.z, out_dtype=out_dtype
        )
        del y
        if out_w is not None:
            w_dtype, b_dtype = ctx.out_dtypes
            dout_w = weight_grad(dres, out[0].view(-1, di), w_dtype)
            dout_b = bias_grad(dres, b_dtype) if b_dtype is not None else None
            del out
        xbc_t = v.xbc.transpose(1, 2)
        xbc = conv_forward(xbc_t, conv_weight, conv_bias, seq_idx, None, True).transpose(1, 2)
        x, B, C = _xbc_heads(xbc, di, ngroups, dstate, nheads)
        dxbc = torch.empty_like(xbc)
        dx, dB, dC = _xbc_heads(dxbc, di, ngroups, dstate, nheads)
        doc = document_index(seq_idx).contiguous() if seq_idx is not None else None
        _, _, dA, _, _, dD, _, ddt_bias, _ = ssd_backward(
            x, v.dt, A, B, C, chunk_size, D, None, dt_bias, None, doc, True, NO_DT_LIMIT,
            (None, dt_out, dA_cumsum, prev_states),
            dy.view(x.shape), None, dx=dx, dB=dB, dC=dC, ddt=dv.dt,
        )  # fmt: skip
        del xbc, x, B, C, dy
        _, dconv_weight, dconv_bias, _ = conv_backward(
            xbc_t, conv_weight, conv_bias, seq_idx, None, True, dxbc.transpose(1, 2), dx=dv.xbc.transpose(1, 2)
        )
        return (
            dzxbcdt,
            dconv_weight,
            dconv_bias,
            ddt_bias.to(dt_bias.dtype),
            dA.to(A.dtype),
            dD.to(D.dtype),
            dnorm_weight,
            None,
            None,
            dout_w,
            dout_b,
        )


def mamba2_split_conv_scan_fn(
    zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, *, d_inner, ngroups, dstate, chunk_size,
    norm_group_size, eps, seq_idx=None, out_proj_weight=None, out_proj_bias=None, keep_states=False,
):  # fmt: skip
    """Arguments and result as :func:`mamba2_split_conv_scan_fn_ref` (the spec); ``keep_states`` (a memory/speed choice,
    same results) keeps SSD's per-chunk entering states from the forward instead of recomputing them in backward. zxbcdt
    is read in place when it is uniformly strided over (batch, seqlen) rows of unit-stride features (an in_proj output),
    else copied first (a tensor-parallel layer's sequence-major output). Runs the Triton kernels on CUDA tensors or
    under TRITON_INTERPRET=1 (fp16/bf16/fp32), the reference otherwise."""
    if not use_triton(zxbcdt) or zxbcdt.dtype == torch.float64:
        return mamba2_split_conv_scan_fn_ref(
            zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, d_inner=d_inner, ngroups=ngroups,
            dstate=dstate, chunk_size=chunk_size, norm_group_size=norm_group_size, eps=eps, seq_idx=seq_idx,
            out_proj_weight=out_proj_weight, out_proj_bias=out_proj_bias,
        )  # fmt: skip
    split_sizes(zxbcdt, d_inner, ngroups, dstate)
    if seq_idx is not None and seq_idx.dtype != torch.int32:
        raise TypeError(f"seq_idx must be int32, got {seq_idx.dtype}")
    if row_stride(zxbcdt) is None:  # the norm reads z as (rows, d_inner) rows; megatron's output is seq-major
        zxbcdt = zxbcdt.contiguous()
    contig = lambda t: None if t is None else t.contiguous()
    dims = (d_inner, ngroups, dstate, chunk_size, norm_group_size, eps, keep_states)
    return _Mamba2SplitConvScan.apply(
        zxbcdt, conv_weight.contiguous(), contig(conv_bias), dt_bias.contiguous(), A.contiguous(), D.contiguous(),
        norm_weight.contiguous(), contig(seq_idx), dims, contig(out_proj_weight), contig(out_proj_bias),
    )  # fmt: skip
