"""Stage 1 of SSD: dt processing (bias, softplus, limits) and the running sum of dt·A inside each chunk.

Forward writes dt_out and dA_cumsum, both (batch, nheads, nchunks, chunk_size) fp32, with dt_out = 0 past seqlen so
padded positions neither decay nor feed the state. Backward turns the gradient w.r.t. dA_cumsum into gradients
w.r.t. dt, A and dt_bias.
"""

import torch
import triton
import triton.language as tl

from mambatron.kernels.ssd._common import new_output


@triton.jit
def _process_dt(
    dt_raw, dt_bias_ptr, offs_h, nheads, dt_min, dt_max,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
):  # fmt: skip
    """Returns (pre-clamp dt, processed dt) of a (BLOCK_H, BLOCK_CS) fp32 tile."""
    if HAS_BIAS:
        dt_raw += tl.load(dt_bias_ptr + offs_h, mask=offs_h < nheads, other=0.0).to(tl.float32)[:, None]
    dt = dt_raw
    if SOFTPLUS:
        # torch.nn.functional.softplus with its default threshold of 20.
        dt = tl.where(dt_raw > 20.0, dt_raw, tl.log(1.0 + tl.exp(tl.minimum(dt_raw, 20.0))))
    dt_unclamped = dt
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    return dt_raw, dt_unclamped, dt


@triton.jit
def _chunk_cumsum_fwd_kernel(
    dt_ptr, A_ptr, dt_bias_ptr, dt_out_ptr, dA_cumsum_ptr,
    seqlen, nheads, nchunks, chunk_size, dt_min, dt_max,
    stride_dt_b, stride_dt_l, stride_dt_h,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_CS: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_CS)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    in_seq = (offs_h[:, None] < nheads) & (offs_l[None, :] < chunk_len)
    dt_ptrs = (
        dt_ptr + pid_b * stride_dt_b + (chunk_start + offs_l[None, :]) * stride_dt_l + offs_h[:, None] * stride_dt_h
    )
    dt_raw = tl.load(dt_ptrs, mask=in_seq, other=0.0).to(tl.float32)
    _, _, dt = _process_dt(dt_raw, dt_bias_ptr, offs_h, nheads, dt_min, dt_max, HAS_BIAS, SOFTPLUS, CLAMP)
    dt = tl.where(in_seq, dt, 0.0)
    A = tl.load(A_ptr + offs_h, mask=offs_h < nheads, other=0.0).to(tl.float32)
    dA_cumsum = tl.cumsum(dt * A[:, None], axis=1)
    out_offs = ((pid_b * nheads + offs_h[:, None]) * nchunks + pid_c) * chunk_size + offs_l[None, :]
    in_chunk = (offs_h[:, None] < nheads) & (offs_l[None, :] < chunk_size)
    tl.store(dt_out_ptr + out_offs, dt, mask=in_chunk)
    tl.store(dA_cumsum_ptr + out_offs, dA_cumsum, mask=in_chunk)


@triton.jit
def _chunk_cumsum_bwd_kernel(
    ddA_cumsum_ptr, ddA_chunk_ptr, ddt_out_ptr, dt_ptr, A_ptr, dt_bias_ptr, dt_out_ptr,
    ddt_ptr, dA_part_ptr, ddt_bias_part_ptr,
    seqlen, nheads, nchunks, chunk_size, dt_min, dt_max,
    stride_dt_b, stride_dt_l, stride_dt_h, stride_ddt_b, stride_ddt_l, stride_ddt_h,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_CS: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_CS)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    in_seq = (offs_h[:, None] < nheads) & (offs_l[None, :] < chunk_len)
    in_chunk = (offs_h[:, None] < nheads) & (offs_l[None, :] < chunk_size)
    row = (pid_b * nheads + offs_h) * nchunks + pid_c
    buf_offs = row[:, None] * chunk_size + offs_l[None, :]
    ddA_cumsum = tl.load(ddA_cumsum_ptr + buf_offs, mask=in_chunk, other=0.0)
    # dA_cumsum[l] sums dA[s] for s <= l, so dA[s] collects the gradients of every l >= s (a reverse cumsum); the
    # per-chunk term belongs to the chunk's last position, which every position of the chunk feeds.
    ddA_chunk = tl.load(ddA_chunk_ptr + row, mask=offs_h < nheads, other=0.0)
    ddA = tl.sum(ddA_cumsum, axis=1)[:, None] - tl.cumsum(ddA_cumsum, axis=1) + ddA_cumsum + ddA_chunk[:, None]
    A = tl.load(A_ptr + offs_h, mask=offs_h < nheads, other=0.0).to(tl.float32)
    dt_out = tl.load(dt_out_ptr + buf_offs, mask=in_chunk, other=0.0)
    ddt_out = tl.load(ddt_out_ptr + buf_offs, mask=in_chunk, other=0.0) + ddA * A[:, None]
    ddt_out = tl.where(in_seq, ddt_out, 0.0)
    tl.store(
        dA_part_ptr + (pid_b * nchunks + pid_c) * nheads + offs_h, tl.sum(ddA * dt_out, axis=1), mask=offs_h < nheads
    )

    dt_ptrs = (
        dt_ptr + pid_b * stride_dt_b + (chunk_start + offs_l[None, :]) * stride_dt_l + offs_h[:, None] * stride_dt_h
    )
    dt_raw = tl.load(dt_ptrs, mask=in_seq, other=0.0).to(tl.float32)
    dt_raw, dt_unclamped, _ = _process_dt(
        dt_raw, dt_bias_ptr, offs_h, nheads, dt_min, dt_max, HAS_BIAS, SOFTPLUS, CLAMP
    )
    ddt = ddt_out
    if CLAMP:
        # torch.clamp passes the gradient where min <= value <= max, bounds included.
        ddt = tl.where((dt_unclamped >= dt_min) & (dt_unclamped <= dt_max), ddt, 0.0)
    if SOFTPLUS:
        ddt = tl.where(dt_raw > 20.0, ddt, ddt / (1.0 + tl.exp(-tl.minimum(dt_raw, 20.0))))
    ddt_ptrs = ddt_ptr + pid_b * stride_ddt_b + (chunk_start + offs_l[None, :]) * stride_ddt_l
    tl.store(ddt_ptrs + offs_h[:, None] * stride_ddt_h, ddt, mask=in_seq)
    if HAS_BIAS:
        tl.store(
            ddt_bias_part_ptr + (pid_b * nchunks + pid_c) * nheads + offs_h, tl.sum(ddt, axis=1), mask=offs_h < nheads
        )


def _launch_shape(dt: torch.Tensor, chunk_size: int):
    batch, seqlen, nheads = dt.shape
    nchunks = triton.cdiv(seqlen, chunk_size)
    block_h = min(triton.next_power_of_2(nheads), 8)
    return batch, seqlen, nheads, nchunks, block_h, (batch, nchunks, triton.cdiv(nheads, block_h))


def _limits(dt_limit):
    clamp = tuple(dt_limit) != (0.0, float("inf"))
    return clamp, float(dt_limit[0]), float(min(dt_limit[1], 3.0e38))


def chunk_cumsum_fwd(dt, A, chunk_size, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """dt: (batch, seqlen, nheads); A, dt_bias: (nheads,).

    Returns dA_cumsum, dt_out: (batch, nheads, nchunks, chunk_size) fp32 (as chunk_cumsum_ref).
    """
    batch, seqlen, nheads, nchunks, block_h, grid = _launch_shape(dt, chunk_size)
    dt_out = new_output((batch, nheads, nchunks, chunk_size), torch.float32, dt.device)
    dA_cumsum = new_output((batch, nheads, nchunks, chunk_size), torch.float32, dt.device)
    clamp, dt_min, dt_max = _limits(dt_limit)
    _chunk_cumsum_fwd_kernel[grid](
        dt, A, dt_bias, dt_out, dA_cumsum,
        seqlen, nheads, nchunks, chunk_size, dt_min, dt_max,
        *dt.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=clamp,
        BLOCK_H=block_h, BLOCK_CS=triton.next_power_of_2(chunk_size),
    )  # fmt: skip
    return dA_cumsum, dt_out


def chunk_cumsum_bwd(ddA_cumsum, ddA_chunk, ddt_out, dt, A, dt_out, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, float("inf")), ddt=None):  # fmt: skip
    """Gradients of chunk_cumsum_fwd.

    ddA_cumsum, ddt_out: (batch, nheads, nchunks, chunk_size) fp32, the gradients w.r.t. dA_cumsum and dt_out;
    ddA_chunk: (batch, nheads, nchunks) fp32, an extra gradient w.r.t. each chunk's last dA_cumsum;
    dt: (batch, seqlen, nheads) the raw input; dt_out from the forward.
    Returns ddt (like dt; written into ``ddt``, any strides, when given), dA (nheads,) fp32, ddt_bias (nheads,) fp32
    or None.
    """
    chunk_size = dt_out.shape[-1]
    batch, seqlen, nheads, nchunks, block_h, grid = _launch_shape(dt, chunk_size)
    ddt = new_output(dt.shape, dt.dtype, dt.device) if ddt is None else ddt
    dA_part = new_output((batch, nchunks, nheads), torch.float32, dt.device)
    ddt_bias_part = new_output((batch, nchunks, nheads), torch.float32, dt.device) if dt_bias is not None else None
    clamp, dt_min, dt_max = _limits(dt_limit)
    _chunk_cumsum_bwd_kernel[grid](
        ddA_cumsum, ddA_chunk, ddt_out, dt, A, dt_bias, dt_out,
        ddt, dA_part, ddt_bias_part,
        seqlen, nheads, nchunks, chunk_size, dt_min, dt_max,
        *dt.stride(), *ddt.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=clamp,
        BLOCK_H=block_h, BLOCK_CS=triton.next_power_of_2(chunk_size),
    )  # fmt: skip
    ddt_bias = ddt_bias_part.sum((0, 1)) if dt_bias is not None else None
    return ddt, dA_part.sum((0, 1)), ddt_bias
