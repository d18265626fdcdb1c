"""Stage 2 of SSD: the state each chunk builds from zero.

states[b, c, h] = sum over positions l of chunk c of exp(dA_cumsum[last] - dA_cumsum[l]) · dt[l] · x[l] B[l]^T,
restricted to the document current at the chunk's last position; one (headdim, dstate) tile per program, a tl.dot
over the chunk's positions. Its gradients are computed by the fused backward kernels of chunk_scan.py
(dx and ddt in `_chunk_scan_bwd_dx_kernel`, dB in `_chunk_scan_bwd_dbdc_kernel`).
"""

import torch
import triton
import triton.language as tl

from mambatron.kernels.ssd._common import (
    autotune_warps,
    chunk_block,
    dstate_block,
    grid_bucket,
    headdim_block,
    new_output,
)

# Tile upper bounds (positions per inner-loop step, dstate per program); tools/sweep_ssd.py --state sweeps them.
TILES = {"fwd": (64, 64)}


@autotune_warps(key=["chunk_size", "headdim", "dstate", "BLOCK_L", "BLOCK_P", "BLOCK_N"], stages=(2, 3, 4))
@triton.jit(do_not_specialize=["grid_bucket"])
def _chunk_state_fwd_kernel(
    x_ptr, B_ptr, dt_ptr, dA_cumsum_ptr, seq_idx_ptr, states_ptr,
    seqlen, nheads, nchunks, chunk_size, headdim, dstate, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p, stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    grid_bucket,
    HAS_SEQ_IDX: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    head = pid % nheads
    chunk = (pid // nheads) % nchunks
    batch = pid // (nheads * nchunks)
    group = head // heads_per_group
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_start = chunk * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    row = ((batch * nheads + head) * nchunks + chunk) * chunk_size
    dA_cumsum_last = tl.load(dA_cumsum_ptr + row + chunk_size - 1)
    if HAS_SEQ_IDX:
        doc_last = tl.load(seq_idx_ptr + batch * seqlen + chunk_start + chunk_len - 1)
    x_base = x_ptr + batch * stride_x_b + chunk_start * stride_x_l + head * stride_x_h
    B_base = B_ptr + batch * stride_B_b + chunk_start * stride_B_l + group * stride_B_g
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for l0 in range(0, chunk_len, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        in_seq = offs_l < chunk_len
        xT = tl.load(
            x_base + offs_l[None, :] * stride_x_l + offs_p[:, None] * stride_x_p,
            mask=(offs_p[:, None] < headdim) & in_seq[None, :],
            other=0.0,
        )
        B = tl.load(
            B_base + offs_l[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
            mask=in_seq[:, None] & (offs_n[None, :] < dstate),
            other=0.0,
        )
        dt = tl.load(dt_ptr + row + offs_l, mask=in_seq, other=0.0)
        dA_cumsum = tl.load(dA_cumsum_ptr + row + offs_l, mask=in_seq, other=0.0)
        weight = tl.exp(dA_cumsum_last - dA_cumsum) * dt
        if HAS_SEQ_IDX:
            doc = tl.load(seq_idx_ptr + batch * seqlen + chunk_start + offs_l, mask=in_seq, other=-1)
            weight = tl.where(doc == doc_last, weight, 0.0)
        xT = (xT.to(tl.float32) * weight[None, :]).to(x_ptr.dtype.element_ty)
        acc += tl.dot(xT, B.to(x_ptr.dtype.element_ty))
    out_ptrs = states_ptr + (((batch * nchunks + chunk) * nheads + head) * headdim + offs_p[:, None]) * dstate
    tl.store(out_ptrs + offs_n[None, :], acc, mask=(offs_p[:, None] < headdim) & (offs_n[None, :] < dstate))


def chunk_state_fwd(B, x, dt, dA_cumsum, seq_idx=None):
    """B: (batch, seqlen, ngroups, dstate); x: (batch, seqlen, nheads, headdim);
    dt, dA_cumsum: (batch, nheads, nchunks, chunk_size) fp32; seq_idx: (batch, seqlen) int32, nondecreasing.

    Returns states: (batch, nchunks, nheads, headdim, dstate) fp32 (as chunk_state_ref).
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    _, _, nchunks, chunk_size = dt.shape
    states = new_output((batch, nchunks, nheads, headdim, dstate), torch.float32, x.device)
    up_l, up_n = TILES["fwd"]
    block_p, block_n = headdim_block(headdim), dstate_block(dstate, up_n)
    grid = (batch * nchunks * nheads, triton.cdiv(headdim, block_p), triton.cdiv(dstate, block_n))
    _chunk_state_fwd_kernel[grid](
        x, B, dt, dA_cumsum, seq_idx, states,
        seqlen, nheads, nchunks, chunk_size, headdim, dstate, nheads // ngroups,
        *x.stride(), *B.stride(),
        grid_bucket=grid_bucket(*grid),
        HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_L=chunk_block(chunk_size, up_l), BLOCK_P=block_p, BLOCK_N=block_n,
    )  # fmt: skip
    return states
