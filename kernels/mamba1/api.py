"""``mamba1_conv_scan_fn``: conv1d → x_proj → dt_proj → selective scan → gate on the in_proj output as one autograd op.

Composed from the conv1d and selective-scan kernels' functional forward/backward and three small GEMMs, so it adds no
kernel of its own. What it changes is what is kept and where gradients land:

- saved for backward: the in_proj output (x and z are column views of it) and x_proj's output ([dt | B | C],
  dt_rank + 2·dstate per token), plus the scan's fp32 state at every chunk start. The conv output and Δ (d_inner
  wide each) are recomputed in backward, one conv launch and one small GEMM;
- every (batch, d_inner, seqlen) tensor the kernels read is time-contiguous when the in_proj output is feature-major
  (:func:`mambatron.parallel.projections.feature_major` computes it that way, as W·xᵀ), so nothing is transposed
  or copied on the way in; a channel-last in_proj output (tensor-parallel layers) works too, through one copy of z
  and of the conv output;
- given out_proj's weight (a single-device linear), the projection runs inside as a batched GEMM on the
  time-contiguous scan output, so neither it nor its gradient is transposed;
- backward writes dz (the scan) and dx (the conv) straight into one gradient buffer laid out like the in_proj
  output, so there is no split-backward concatenation, and Δ's gradient flows to dt_proj and x_proj by GEMMs.
"""

import torch
import torch.distributed as dist

from mambatron.kernels._common import use_triton
from mambatron.kernels.conv1d.api import conv_backward, conv_forward
from mambatron.kernels.selective_scan.api import _time_major, scan_backward, scan_forward

from .reference import check_widths, inner_norms, mamba1_conv_scan_fn_ref


def _conv(xz, conv_weight, conv_bias, seq_idx, d_inner):
    """x's view (batch, d_inner, seqlen) of the in_proj output and silu(conv(x)) in the same layout."""
    x = xz[..., :d_inner].transpose(1, 2)
    return x, conv_forward(x, conv_weight, conv_bias, seq_idx, None, True)


def _split(x_dbl, dt_rank, dstate):
    """dt (batch, dt_rank, seqlen) and B, C (batch, 1, dstate, seqlen): row views of x_proj's output."""
    dt = x_dbl[:, :dt_rank]
    B = x_dbl[:, dt_rank : dt_rank + dstate].unsqueeze(1)
    C = x_dbl[:, dt_rank + dstate :].unsqueeze(1)
    return dt, B, C


def _wx(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight · x[b] for every batch row of x (batch, in, seqlen), as one strided-batched GEMM whose weight operand
    has batch stride 0. (``torch.matmul(weight, x)`` folds the batch into the rows instead, which copies x
    transposed and then the result back: two (batch, d_inner, seqlen) copies per call.)"""
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


def _batch_sum(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.sum(0, dtype=torch.float32).to(dtype)


class _Mamba1ConvScan(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, seq_idx, tp_group, out_w,
        out_b, inner_eps, dt_norm_w, b_norm_w, c_norm_w,
    ):  # fmt: skip
        d_inner, dt_rank, dstate = check_widths(xz, x_proj_weight, dt_proj_weight)
        _, xc = _conv(xz, conv_weight, conv_bias, seq_idx, d_inner)
        batch = xz.shape[0]
        x_dbl = _wx(x_proj_weight, xc)  # (batch, dt_rank + 2·dstate, seqlen), contiguous
        if tp_group is not None:
            dist.all_reduce(x_dbl, group=tp_group)
        # x_proj's output is kept as is; with FalconMamba's norms the normalised copy is recomputed in backward.
        norm_ws = None if dt_norm_w is None else (dt_norm_w, b_norm_w, c_norm_w)
        x_used = x_dbl if inner_eps is None else inner_norms(x_dbl, dt_rank, dstate, inner_eps, norm_ws)
        dt, B, C = _split(x_used, dt_rank, dstate)
        delta = _wx(dt_proj_weight, dt)  # (batch, d_inner, seqlen), time-contiguous
        z = _time_major(xz[..., d_inner:].transpose(1, 2))
        y, _, chunk_states = scan_forward(_time_major(xc), delta, A, B, C, D, z, dt_proj_bias, True, None, seq_idx)
        del xc, delta, z, x_used
        ctx.inner_eps = inner_eps
        ctx.save_for_backward(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, seq_idx,
                              x_dbl, chunk_states, out_w, out_b, y if out_w is not None else None, dt_norm_w,
                              b_norm_w, c_norm_w)  # fmt: skip
        ctx.tp_group = tp_group
        if out_w is None:
            return y.transpose(1, 2)
        # (batch, seqlen, d_model) = yᵀ·Wᵀ per batch row: cuBLAS reads the time-contiguous y as a transposed operand.
        out = torch.bmm(y.transpose(1, 2), out_w.t().expand(batch, -1, -1))
        return out if out_b is None else out.add_(out_b)

    @staticmethod
    def backward(ctx, dy):
        (xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, seq_idx, x_dbl, chunk_states,
         out_w, out_b, y, dt_norm_w, b_norm_w, c_norm_w) = ctx.saved_tensors  # fmt: skip
        norm_ws = None if dt_norm_w is None else (dt_norm_w, b_norm_w, c_norm_w)
        d_inner, dt_rank, dstate = check_widths(xz, x_proj_weight, dt_proj_weight)
        batch = xz.shape[0]
        dout_w = dout_b = None
        if out_w is None:
            dy = _time_major(dy.transpose(1, 2))
        else:  # dy arrives as out_proj's output gradient (batch, seqlen, d_model)
            dres = dy
            dout_w = _batch_sum(torch.bmm(dres.transpose(1, 2), y.transpose(1, 2)), out_w.dtype)
            dout_b = _batch_sum(dres.sum(1, dtype=torch.float32), out_b.dtype) if out_b is not None else None
            dy = torch.bmm(out_w.t().expand(batch, -1, -1), dres.transpose(1, 2))  # (batch, d_inner, seqlen)
            del y
        x, xc = _conv(xz, conv_weight, conv_bias, seq_idx, d_inner)
        x_used = x_dbl if ctx.inner_eps is None else inner_norms(x_dbl, dt_rank, dstate, ctx.inner_eps, norm_ws)
        dt, B, C = _split(x_used, dt_rank, dstate)
        delta = _wx(dt_proj_weight, dt)
        dxz = torch.empty_like(xz)  # the in_proj output's strides (empty_like keeps a dense layout)
        dz = dxz[..., d_inner:].transpose(1, 2)
        z = _time_major(xz[..., d_inner:].transpose(1, 2))
        du, ddelta, dA, dB, dC, dD, _, ddt_bias, _ = scan_backward(
            _time_major(xc), delta, A, B, C, D, z, dt_proj_bias, True, seq_idx, chunk_states, dy, None, dz=dz,
        )  # fmt: skip
        del delta, z
        ddt = _wx(dt_proj_weight.t(), ddelta)  # (batch, dt_rank, seqlen)
        ddt_proj_weight = _batch_sum(torch.bmm(ddelta, dt.transpose(1, 2)), dt_proj_weight.dtype)
        del ddelta
        dx_dbl = torch.cat([ddt, dB.squeeze(1).to(ddt.dtype), dC.squeeze(1).to(ddt.dtype)], dim=1)
        del x_used
        dnorm_ws = (None, None, None)
        if ctx.inner_eps is not None:  # back through the norms: a small (batch, dt_rank + 2·dstate, seqlen) graph
            with torch.enable_grad():
                leaves = [x_dbl.detach().requires_grad_()]
                if norm_ws is not None:
                    leaves += [w.detach().requires_grad_() for w in norm_ws]
                normed = inner_norms(leaves[0], dt_rank, dstate, ctx.inner_eps, leaves[1:] or None)
                dx_dbl, *rest = torch.autograd.grad(normed, leaves, dx_dbl)
            if rest:
                dnorm_ws = tuple(rest)
        if ctx.tp_group is not None:
            dist.all_reduce(dx_dbl, group=ctx.tp_group)
        dx_proj_weight = _batch_sum(torch.bmm(dx_dbl, xc.transpose(1, 2)), x_proj_weight.dtype)
        del xc
        # dxc = du + x_projᵀ · d[dt | B | C], one batched GEMM accumulating into du.
        dxc = du.baddbmm_(x_proj_weight.t().expand(batch, -1, -1), dx_dbl)
        del du
        _, dconv_weight, dconv_bias, _ = conv_backward(
            x, conv_weight, conv_bias, seq_idx, None, True, dxc, dx=dxz[..., :d_inner].transpose(1, 2)
        )
        cast = lambda g, like: None if like is None else g.to(like.dtype)
        return (dxz, dconv_weight, dconv_bias, dx_proj_weight, ddt_proj_weight, cast(ddt_bias, dt_proj_bias),
                cast(dA, A), cast(dD, D), None, None, dout_w, dout_b, None, *dnorm_ws)  # fmt: skip


def mamba1_conv_scan_fn(
    xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, *, seq_idx=None, tp_group=None,
    out_proj_weight=None, out_proj_bias=None, inner_norm_eps=None, inner_norm_weights=None,
):  # fmt: skip
    """Arguments and result as :func:`mamba1_conv_scan_fn_ref` (the spec). Without out_proj the result is a
    (batch, seqlen, d_inner) view of a time-contiguous tensor. Runs the Triton kernels on CUDA tensors or under
    TRITON_INTERPRET=1 (fp16/bf16/fp32), the reference otherwise."""
    if not use_triton(xz) or xz.dtype == torch.float64:
        return mamba1_conv_scan_fn_ref(
            xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, seq_idx=seq_idx,
            tp_group=tp_group, out_proj_weight=out_proj_weight, out_proj_bias=out_proj_bias,
            inner_norm_eps=inner_norm_eps, inner_norm_weights=inner_norm_weights,
        )  # fmt: skip
    check_widths(xz, x_proj_weight, dt_proj_weight)
    if seq_idx is not None and seq_idx.dtype != torch.int32:
        raise TypeError(f"seq_idx must be int32, got {seq_idx.dtype}")
    contig = lambda t: None if t is None else t.contiguous()
    # The GEMM weights in the activations' dtype, as autocast would give F.linear (backward runs outside autocast).
    x_proj_weight, dt_proj_weight = x_proj_weight.to(xz.dtype), dt_proj_weight.to(xz.dtype)
    out_proj_weight = None if out_proj_weight is None else out_proj_weight.to(xz.dtype).contiguous()
    out_proj_bias = None if out_proj_bias is None else out_proj_bias.to(xz.dtype)
    return _Mamba1ConvScan.apply(
        xz, conv_weight.contiguous(), contig(conv_bias), x_proj_weight.contiguous(), dt_proj_weight.contiguous(),
        contig(dt_proj_bias), A.contiguous(), contig(D), contig(seq_idx), tp_group, out_proj_weight, out_proj_bias,
        inner_norm_eps, *(inner_norm_weights or (None, None, None)),
    )  # fmt: skip
