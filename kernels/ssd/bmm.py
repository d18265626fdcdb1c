"""Stage 4 of SSD: CB[b, c, g, l, s] = C[l] · B[s] for the positions l, s of each chunk, per group.

Computed once per group and shared by its heads (with one group, 1/nheads of the matmul work of a per-head product).
Only tiles with s <= l are computed, since the scan is causal; the upper tiles of the output are left unwritten and
never read. Entries across documents are 0. Its gradient is produced by `_chunk_scan_bwd_dbdc_kernel` in
chunk_scan.py, fused with the other gradients w.r.t. B and C.
"""

import torch
import triton
import triton.language as tl

from mambatron.kernels.ssd._common import autotune_warps, chunk_block, dstate_block, grid_bucket, new_output


@autotune_warps(key=["chunk_size", "dstate", "BLOCK_L", "BLOCK_N"])
@triton.jit(do_not_specialize=["grid_bucket"])
def _bmm_chunk_fwd_kernel(
    C_ptr, B_ptr, seq_idx_ptr, CB_ptr,
    seqlen, ngroups, nchunks, chunk_size, dstate,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n, stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    grid_bucket,
    HAS_SEQ_IDX: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_l = tl.program_id(1)
    pid_s = tl.program_id(2)
    if pid_s <= pid_l:
        group = pid % ngroups
        chunk = (pid // ngroups) % nchunks
        batch = pid // (ngroups * nchunks)
        chunk_start = chunk * chunk_size
        chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
        offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_s = pid_s * BLOCK_L + tl.arange(0, BLOCK_L)
        C_base = C_ptr + batch * stride_C_b + chunk_start * stride_C_l + group * stride_C_g
        B_base = B_ptr + batch * stride_B_b + chunk_start * stride_B_l + group * stride_B_g
        acc = tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float32)
        for n0 in range(0, dstate, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            C = tl.load(
                C_base + offs_l[:, None] * stride_C_l + offs_n[None, :] * stride_C_n,
                mask=(offs_l[:, None] < chunk_len) & (offs_n[None, :] < dstate),
                other=0.0,
            )
            BT = tl.load(
                B_base + offs_s[None, :] * stride_B_l + offs_n[:, None] * stride_B_n,
                mask=(offs_s[None, :] < chunk_len) & (offs_n[:, None] < dstate),
                other=0.0,
            )
            acc += tl.dot(C, BT.to(C.dtype))
        if HAS_SEQ_IDX:
            doc_base = seq_idx_ptr + batch * seqlen + chunk_start
            doc_l = tl.load(doc_base + offs_l, mask=offs_l < chunk_len, other=-1)
            doc_s = tl.load(doc_base + offs_s, mask=offs_s < chunk_len, other=-2)
            acc = tl.where(doc_l[:, None] == doc_s[None, :], acc, 0.0)
        out_ptrs = CB_ptr + ((batch * nchunks + chunk) * ngroups + group) * chunk_size * chunk_size
        out_ptrs += offs_l[:, None] * chunk_size + offs_s[None, :]
        tl.store(out_ptrs, acc, mask=(offs_l[:, None] < chunk_size) & (offs_s[None, :] < chunk_size))


def bmm_chunk_fwd(C, B, chunk_size, seq_idx=None):
    """C, B: (batch, seqlen, ngroups, dstate); seq_idx: (batch, seqlen) int32.

    Returns CB: (batch, nchunks, ngroups, chunk_size, chunk_size) fp32, valid where s <= l (as bmm_chunk_ref there).
    """
    batch, seqlen, ngroups, dstate = C.shape
    nchunks = triton.cdiv(seqlen, chunk_size)
    block_l = chunk_block(chunk_size)
    CB = new_output((batch, nchunks, ngroups, chunk_size, chunk_size), torch.float32, C.device)
    ntiles = triton.cdiv(chunk_size, block_l)
    grid = (batch * nchunks * ngroups, ntiles, ntiles)
    _bmm_chunk_fwd_kernel[grid](
        C, B, seq_idx, CB,
        seqlen, ngroups, nchunks, chunk_size, dstate,
        *C.stride(), *B.stride(),
        grid_bucket=grid_bucket(*grid),
        HAS_SEQ_IDX=seq_idx is not None, BLOCK_L=block_l, BLOCK_N=dstate_block(dstate),
    )  # fmt: skip
    return CB
