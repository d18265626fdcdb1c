"""Stage 5 of SSD: the output, and the backward kernels of the whole scan.

Forward, per (batch, chunk, head) and tile of BLOCK_L positions l, over the whole head (headdim):
    y[l] = exp(dA_cumsum[l]) · prev_state C[l]                                  (entering state, a tl.dot over dstate)
         + sum_{s <= l} CB[l, s] exp(dA_cumsum[l] - dA_cumsum[s]) dt[s] x[s]   (diagonal block, a tl.dot over s)
         + D x[l],   out = y · silu(z)
The entering state only reaches positions of the document it belongs to; CB is already 0 across documents.

Backward (dy = dout · silu(z)). Most gradients of chunk_state and bmm are fused in here, so each large operand is
read by few kernels and no per-head (seqlen, dstate) gradient is materialised:
- `_gate_bwd_kernel` (only with z): dz and dy.
- `_chunk_scan_bwd_dstates_kernel`: dprev_states[c] = sum_l exp(dA_cumsum[l]) dy[l]^T C[l], for state passing.
- `_chunk_scan_bwd_dx_kernel`: per position s, G[s] = sum_{l >= s} CB[l, s] exp(dA_cumsum[l] - dA_cumsum[s]) dy[l]
  + exp(dA_cumsum[last] - dA_cumsum[s]) dstates[c] B[s] (the second term from chunk_state), then dx = dt G + D dy,
  ddt = x · G, dD. Gradient w.r.t. dA_cumsum: chunk_state's depends on dA_cumsum[s] through -dt[s] ddt_state[s]
  (and the chunk's last position collects the opposite total).
- `_chunk_scan_bwd_dcb_kernel`: dCB[l, s] = sum over the group's heads of (dy[l] · x[s]) exp(...) dt[s], per group
  (in parts over runs of heads, TILES["bwd_dcb"], added by the launcher), and per head the diagonal block's gradient
  w.r.t. dA_cumsum: with T = dCB_head · CB, row sums of T for dA_cumsum[l] minus column sums for dA_cumsum[s].
- `_chunk_scan_bwd_dbdc_kernel`: dC = dCB B + sum_h exp(dA_cumsum) dy prev_state, and
  dB = dCB^T C + sum_h exp(dA_cumsum[last] - dA_cumsum) dt x dstates (from chunk_state), per group; and the entering
  state's gradient w.r.t. dA_cumsum[l], exp(dA_cumsum[l]) (dy[l] prev_state) · C[l], from the product it has for dC
  (a bf16 copy of the output would cost dA its accuracy).
Every kernel numbers its programs tile-fastest (`_split_pid`).
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

_KEY = ["chunk_size", "headdim", "dstate", "BLOCK_L", "BLOCK_P", "BLOCK_N"]
# Launch tiles, upper bounds (the block helpers fit them to the shapes). The two largest kernels: output positions
# per program, positions per step of the inner loop, dstate per step of the entering-state product, and (forward
# only: the dx backward sums over the whole head) headdim per program. From the H200 sweeps in docs/benchmarks.md.
# The entering-state gradient (dstates): positions per step of its loop, dstate per program (one program over all of
# dstate reads dy once).
# The dCB backward: positions per side of its (l, s) tiles, into how many runs a group's heads are split, each
# run by its own programs into its own part of dCB that the launcher adds (1: one program walks all of the heads),
# and whether a program loads the next head's dA_cumsum and dt a head ahead (1) or when it reaches it (0).
TILES = {"fwd": (64, 32, 64, 1 << 30), "bwd_dx": (64, 32, 64), "bwd_dstates": (32, 128), "bwd_dcb": (64, 1, 0)}


@triton.jit
def _split_pid(pid, chunk_size, nheads, nchunks, BLOCK: tl.constexpr):
    """Programs are numbered tile-fastest, so the tiles of one (batch, chunk, head) run together and share its
    chunk-wide operands (CB, the chunk states) through L2. Returns (tile, head, chunk, batch)."""
    ntiles = tl.cdiv(chunk_size, BLOCK)
    tile = pid % ntiles
    pid = pid // ntiles
    return tile, pid % nheads, (pid // nheads) % nchunks, pid // (nheads * nchunks)


@triton.jit
def _load_D(D_ptr, head, offs_p, headdim, D_HAS_HDIM: tl.constexpr):
    """D of one head, shaped to scale a (positions, headdim) tile."""
    if D_HAS_HDIM:
        return tl.load(D_ptr + head * headdim + offs_p, mask=offs_p < headdim, other=0.0).to(tl.float32)[None, :]
    return tl.load(D_ptr + head).to(tl.float32)


@autotune_warps(key=_KEY + ["BLOCK_K"], stages=(2, 3, 4))
@triton.jit(do_not_specialize=["grid_bucket"])
def _chunk_scan_fwd_kernel(
    CB_ptr, x_ptr, z_ptr, dt_ptr, dA_cumsum_ptr, C_ptr, prev_states_ptr, D_ptr, seq_idx_ptr, out_ptr, out_x_ptr,
    seqlen, nheads, nchunks, chunk_size, headdim, dstate, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p, stride_z_b, stride_z_l, stride_z_h, stride_z_p,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    grid_bucket,
    HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    ntiles_p = tl.cdiv(headdim, BLOCK_P)
    pid = tl.program_id(0)
    pid_p = pid % ntiles_p
    pid_l, head, chunk, batch = _split_pid(pid // ntiles_p, chunk_size, nheads, nchunks, BLOCK_L)
    group = head // heads_per_group
    chunk_start = chunk * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    in_l = offs_l < chunk_len
    in_p = offs_p < headdim
    row = ((batch * nheads + head) * nchunks + chunk) * chunk_size
    dA_cumsum_l = tl.load(dA_cumsum_ptr + row + offs_l, mask=in_l, other=0.0)

    state_scale = tl.exp(dA_cumsum_l)
    if HAS_SEQ_IDX:
        owner = tl.load(seq_idx_ptr + batch * seqlen + tl.maximum(chunk_start - 1, 0))
        doc_l = tl.load(seq_idx_ptr + batch * seqlen + chunk_start + offs_l, mask=in_l, other=-1)
        state_scale = tl.where(doc_l == owner, state_scale, 0.0)
    C_base = C_ptr + batch * stride_C_b + chunk_start * stride_C_l + group * stride_C_g
    state_base = prev_states_ptr + ((batch * nchunks + chunk) * nheads + head) * headdim * dstate
    acc = tl.zeros((BLOCK_L, BLOCK_P), dtype=tl.float32)
    for n0 in range(0, dstate, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        C = tl.load(
            C_base + offs_l[:, None] * stride_C_l + offs_n[None, :] * stride_C_n,
            mask=in_l[:, None] & (offs_n[None, :] < dstate),
            other=0.0,
        )
        stateT = tl.load(
            state_base + offs_p[None, :] * dstate + offs_n[:, None],
            mask=in_p[None, :] & (offs_n[:, None] < dstate),
            other=0.0,
        )
        acc += tl.dot(C, stateT.to(C.dtype))
    acc *= state_scale[:, None]

    CB_base = CB_ptr + ((batch * nchunks + chunk) * (nheads // heads_per_group) + group) * chunk_size * chunk_size
    x_base = x_ptr + batch * stride_x_b + chunk_start * stride_x_l + head * stride_x_h
    for s0 in range(0, tl.minimum((pid_l + 1) * BLOCK_L, chunk_len), BLOCK_K):
        offs_s = s0 + tl.arange(0, BLOCK_K)
        in_s = offs_s < chunk_len
        causal = offs_s[None, :] <= offs_l[:, None]
        # Only bounds masks on loads (constant along 16 positions, so the loads stay vectorised); the causal mask
        # is applied to the values.
        CB = tl.load(CB_base + offs_l[:, None] * chunk_size + offs_s[None, :], mask=in_l[:, None] & in_s[None, :])
        dA_cumsum_s = tl.load(dA_cumsum_ptr + row + offs_s, mask=in_s, other=0.0)
        dt_s = tl.load(dt_ptr + row + offs_s, mask=in_s, other=0.0)
        decay = tl.exp(tl.minimum(dA_cumsum_l[:, None] - dA_cumsum_s[None, :], 0.0))
        x_s = tl.load(
            x_base + offs_s[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
            mask=in_s[:, None] & in_p[None, :],
            other=0.0,
        )
        acc += tl.dot(tl.where(causal, CB * decay * dt_s[None, :], 0.0).to(x_s.dtype), x_s)

    if HAS_D:
        x_l = tl.load(
            x_base + offs_l[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
            mask=in_l[:, None] & in_p[None, :],
            other=0.0,
        )
        acc += x_l.to(tl.float32) * _load_D(D_ptr, head, offs_p, headdim, D_HAS_HDIM)
    out_offs = ((batch * seqlen + chunk_start + offs_l[:, None]) * nheads + head) * headdim + offs_p[None, :]
    out_mask = in_l[:, None] & in_p[None, :]
    if HAS_Z:
        tl.store(out_x_ptr + out_offs, acc, mask=out_mask)
        z = tl.load(
            z_ptr
            + batch * stride_z_b
            + (chunk_start + offs_l[:, None]) * stride_z_l
            + head * stride_z_h
            + offs_p[None, :] * stride_z_p,
            mask=out_mask,
            other=0.0,
        ).to(tl.float32)
        acc *= z * tl.sigmoid(z)
    tl.store(out_ptr + out_offs, acc, mask=out_mask)


@triton.jit
def _gate_bwd_kernel(
    dout_ptr, z_ptr, out_x_ptr, dy_ptr, dz_ptr,
    seqlen, nheads, nchunks, chunk_size, headdim,
    stride_z_b, stride_z_l, stride_z_h, stride_z_p,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    head = pid % nheads
    chunk = (pid // nheads) % nchunks
    batch = pid // (nheads * nchunks)
    chunk_start = chunk * chunk_size
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_p = tl.arange(0, BLOCK_P)
    mask = (offs_l[:, None] < tl.minimum(chunk_size, seqlen - chunk_start)) & (offs_p[None, :] < headdim)
    offs = ((batch * seqlen + chunk_start + offs_l[:, None]) * nheads + head) * headdim + offs_p[None, :]
    z = tl.load(
        z_ptr
        + batch * stride_z_b
        + (chunk_start + offs_l[:, None]) * stride_z_l
        + head * stride_z_h
        + offs_p[None, :] * stride_z_p,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(out_x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    tl.store(dy_ptr + offs, dout * z * sig, mask=mask)
    tl.store(dz_ptr + offs, dout * y * sig * (1.0 + z * (1.0 - sig)), mask=mask)


@autotune_warps(key=_KEY)
@triton.jit(do_not_specialize=["grid_bucket"])
def _chunk_scan_bwd_dstates_kernel(
    dy_ptr, C_ptr, dA_cumsum_ptr, seq_idx_ptr, dprev_states_ptr,
    seqlen, nheads, nchunks, chunk_size, headdim, dstate, heads_per_group,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    grid_bucket,
    HAS_SEQ_IDX: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n, head, chunk, batch = _split_pid(tl.program_id(0), dstate, nheads, nchunks, BLOCK_N)
    group = head // heads_per_group
    chunk_start = chunk * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row = ((batch * nheads + head) * nchunks + chunk) * chunk_size
    if HAS_SEQ_IDX:
        owner = tl.load(seq_idx_ptr + batch * seqlen + tl.maximum(chunk_start - 1, 0))
    dy_base = dy_ptr + ((batch * seqlen + chunk_start) * nheads + head) * headdim
    C_base = C_ptr + batch * stride_C_b + chunk_start * stride_C_l + group * stride_C_g
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for l0 in range(0, chunk_len, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        in_l = offs_l < chunk_len
        scale = tl.exp(tl.load(dA_cumsum_ptr + row + offs_l, mask=in_l, other=0.0))
        if HAS_SEQ_IDX:
            doc_l = tl.load(seq_idx_ptr + batch * seqlen + chunk_start + offs_l, mask=in_l, other=-1)
            scale = tl.where(doc_l == owner, scale, 0.0)
        dyT = tl.load(
            dy_base + offs_l[None, :] * (nheads * headdim) + offs_p[:, None],
            mask=in_l[None, :] & (offs_p[:, None] < headdim),
            other=0.0,
        )
        C = tl.load(
            C_base + offs_l[:, None] * stride_C_l + offs_n[None, :] * stride_C_n,
            mask=in_l[:, None] & (offs_n[None, :] < dstate),
            other=0.0,
        )
        acc += tl.dot((dyT.to(tl.float32) * scale[None, :]).to(C.dtype), C)
    out_ptrs = dprev_states_ptr + (((batch * nchunks + chunk) * nheads + head) * headdim + offs_p[:, None]) * dstate
    tl.store(out_ptrs + offs_n[None, :], acc, mask=(offs_p[:, None] < headdim) & (offs_n[None, :] < dstate))


@autotune_warps(key=_KEY + ["BLOCK_K"], stages=(2, 3, 4), capped=(2, 3))
@triton.jit(do_not_specialize=["grid_bucket"])
def _chunk_scan_bwd_dx_kernel(
    CB_ptr, x_ptr, dy_ptr, dt_ptr, dA_cumsum_ptr, B_ptr, dstates_ptr, D_ptr, seq_idx_ptr,
    dx_ptr, ddt_ptr, ddA_cumsum_ptr, ddA_chunk_part_ptr, dD_part_ptr,
    seqlen, nheads, nchunks, chunk_size, headdim, dstate, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p, stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_dx_b, stride_dx_l, stride_dx_h, stride_dx_p,
    grid_bucket,
    HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_s, head, chunk, batch = _split_pid(tl.program_id(0), chunk_size, nheads, nchunks, BLOCK_L)
    ntiles = tl.cdiv(chunk_size, BLOCK_L)
    group = head // heads_per_group
    chunk_start = chunk * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    offs_s = pid_s * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_p = tl.arange(0, BLOCK_P)
    in_s = offs_s < chunk_len
    in_p = offs_p < headdim
    tile_mask = in_s[:, None] & in_p[None, :]
    row = ((batch * nheads + head) * nchunks + chunk) * chunk_size
    dA_cumsum_s = tl.load(dA_cumsum_ptr + row + offs_s, mask=in_s, other=0.0)
    dt_s = tl.load(dt_ptr + row + offs_s, mask=in_s, other=0.0)
    dy_base = dy_ptr + ((batch * seqlen + chunk_start) * nheads + head) * headdim
    dot_dtype = x_ptr.dtype.element_ty

    # chunk_state's share first: exp(dA_cumsum[last] - dA_cumsum[s]) dstates B[s], for the document ending the chunk.
    # It starts the accumulator that the diagonal block adds to (one accumulator: fewer live registers, one epilogue);
    # its own contribution to ddt (for chunk_state's dA_cumsum gradient) is taken before the diagonal block.
    B_base = B_ptr + batch * stride_B_b + chunk_start * stride_B_l + group * stride_B_g
    state_base = ((batch * nchunks + chunk) * nheads + head) * headdim * dstate
    acc = tl.zeros((BLOCK_L, BLOCK_P), dtype=tl.float32)
    for n0 in range(0, dstate, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        B = tl.load(
            B_base + offs_s[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
            mask=in_s[:, None] & (offs_n[None, :] < dstate),
            other=0.0,
        )
        dstatesT = tl.load(
            dstates_ptr + state_base + offs_p[None, :] * dstate + offs_n[:, None],
            mask=in_p[None, :] & (offs_n[:, None] < dstate),
            other=0.0,
        )
        acc += tl.dot(B.to(dot_dtype), dstatesT.to(dot_dtype))
    state_weight = tl.exp(tl.load(dA_cumsum_ptr + row + chunk_size - 1) - dA_cumsum_s)
    if HAS_SEQ_IDX:
        doc_last = tl.load(seq_idx_ptr + batch * seqlen + chunk_start + chunk_len - 1)
        doc_s = tl.load(seq_idx_ptr + batch * seqlen + chunk_start + offs_s, mask=in_s, other=-1)
        state_weight = tl.where(doc_s == doc_last, state_weight, 0.0)
    acc *= state_weight[:, None]

    x_ptrs = (
        x_ptr
        + batch * stride_x_b
        + (chunk_start + offs_s[:, None]) * stride_x_l
        + head * stride_x_h
        + offs_p[None, :] * stride_x_p
    )
    x = tl.load(x_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
    ddt_state = tl.sum(x * acc, axis=1)
    # Diagonal block: G[s] += sum_{l >= s} CB[l, s] exp(dA_cumsum[l] - dA_cumsum[s]) dy[l].
    CB_base = CB_ptr + ((batch * nchunks + chunk) * (nheads // heads_per_group) + group) * chunk_size * chunk_size
    for l0 in range(pid_s * BLOCK_L // BLOCK_K * BLOCK_K, chunk_len, BLOCK_K):
        offs_l = l0 + tl.arange(0, BLOCK_K)
        in_l = offs_l < chunk_len
        causal = offs_l[None, :] >= offs_s[:, None]
        # Bounds masks only on the load (it stays vectorised); the causal mask is applied to the values.
        CBT = tl.load(CB_base + offs_l[None, :] * chunk_size + offs_s[:, None], mask=in_s[:, None] & in_l[None, :])
        dA_cumsum_l = tl.load(dA_cumsum_ptr + row + offs_l, mask=in_l, other=0.0)
        decay = tl.exp(tl.minimum(dA_cumsum_l[None, :] - dA_cumsum_s[:, None], 0.0))
        dy_l = tl.load(
            dy_base + offs_l[:, None] * (nheads * headdim) + offs_p[None, :],
            mask=in_l[:, None] & in_p[None, :],
            other=0.0,
        )
        acc += tl.dot(tl.where(causal, CBT * decay, 0.0).to(dot_dtype), dy_l.to(dot_dtype))

    # x again (an L2 hit) rather than kept live through the loop: 40 fewer registers per thread on sm_90 (208 -> 167
    # at the 128 x 64 tile with 8 warps). The different eviction hint keeps the compiler from merging the two loads.
    x = tl.load(x_ptrs, mask=tile_mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    ddt = tl.sum(x * acc, axis=1)
    dx = dt_s[:, None] * acc
    if HAS_D:
        dy = tl.load(dy_base + offs_s[:, None] * (nheads * headdim) + offs_p[None, :], mask=tile_mask, other=0.0)
        dy = dy.to(tl.float32)
        D = _load_D(D_ptr, head, offs_p, headdim, D_HAS_HDIM)
        dx += D * dy
        part = ((batch * nchunks + chunk) * ntiles + pid_s) * nheads + head
        tl.store(dD_part_ptr + part * headdim + offs_p, tl.sum(dy * x, axis=0), mask=in_p)
    dx_offs = (
        batch * stride_dx_b + (chunk_start + offs_s[:, None]) * stride_dx_l + head * stride_dx_h
        + offs_p[None, :] * stride_dx_p
    )  # fmt: skip
    tl.store(dx_ptr + dx_offs, dx, mask=tile_mask)
    in_chunk = offs_s < chunk_size
    tl.store(ddt_ptr + row + offs_s, ddt, mask=in_chunk)
    tl.store(ddA_cumsum_ptr + row + offs_s, -dt_s * ddt_state, mask=in_chunk)
    part = ((batch * nheads + head) * nchunks + chunk) * ntiles + pid_s
    tl.store(ddA_chunk_part_ptr + part, tl.sum(dt_s * ddt_state))


@triton.jit
def _store_tile(base, tile, offs_l, offs_s, chunk_size):
    """tile into the (chunk_size, chunk_size) matrix at base, rows offs_l and columns offs_s."""
    mask = (offs_l[:, None] < chunk_size) & (offs_s[None, :] < chunk_size)
    tl.store(base + offs_l[:, None] * chunk_size + offs_s[None, :], tile, mask=mask)


@triton.jit
def _dcb_head_vectors(dA_cumsum_ptr, dt_ptr, row, offs_l, offs_s, in_l, in_s):
    """One head's dA_cumsum at the tile's rows and columns and dt at its columns, for the dCB backward."""
    dA_cumsum_l = tl.load(dA_cumsum_ptr + row + offs_l, mask=in_l, other=0.0)
    dA_cumsum_s = tl.load(dA_cumsum_ptr + row + offs_s, mask=in_s, other=0.0)
    dt_s = tl.load(dt_ptr + row + offs_s, mask=in_s, other=0.0)
    return dA_cumsum_l, dA_cumsum_s, dt_s


@autotune_warps(key=["chunk_size", "headdim", "heads_per_split", "BLOCK_L", "BLOCK_P"])
@triton.jit(do_not_specialize=["grid_bucket"])
def _chunk_scan_bwd_dcb_kernel(
    dy_ptr, x_ptr, dt_ptr, dA_cumsum_ptr, CB_ptr, seq_idx_ptr, dCB_ptr, ddA_diag_ptr,
    seqlen, nheads, nchunks, chunk_size, headdim, heads_per_group, heads_per_split, nsplits, stride_dCB_split,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    grid_bucket,
    HAS_SEQ_IDX: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    ngroups = nheads // heads_per_group
    ntiles = tl.cdiv(chunk_size, BLOCK_L)
    pid = tl.program_id(0)
    pid_s = pid % ntiles
    pid = pid // ntiles
    # A group's heads in nsplits runs of heads_per_split, each summing its own part of dCB (more programs, shorter
    # loops over heads); the caller adds the parts.
    split = pid % nsplits
    pid_l, group, chunk, batch = _split_pid(pid // nsplits, chunk_size, ngroups, nchunks, BLOCK_L)
    head_lo = group * heads_per_group + split * heads_per_split
    head_hi = tl.minimum(head_lo + heads_per_split, (group + 1) * heads_per_group)
    dCB_ptr += split.to(tl.int64) * stride_dCB_split
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_s = pid_s * BLOCK_L + tl.arange(0, BLOCK_L)
    # Partial sums of the diagonal block's gradient w.r.t. dA_cumsum, (batch, nheads, nchunks, 2 * ntiles, chunk_size):
    # row sums (for dA_cumsum[l]) at slot pid_s, negated column sums (for dA_cumsum[s]) at slot ntiles + pid_l.
    diag_stride_head = nchunks * 2 * ntiles * chunk_size
    diag_base = ddA_diag_ptr + (batch * nheads * nchunks + chunk) * 2 * ntiles * chunk_size
    rows_ptrs = diag_base + pid_s * chunk_size + offs_l
    cols_ptrs = diag_base + (ntiles + pid_l) * chunk_size + offs_s
    # dCB's tile is addressed where it is stored, so its 64-bit pointers are not live through the loop over heads.
    out_base = dCB_ptr + ((batch * nchunks + chunk) * ngroups + group) * chunk_size * chunk_size
    if pid_s > pid_l:
        for head in range(head_lo, head_hi):
            zeros = tl.zeros((BLOCK_L,), dtype=tl.float32)
            tl.store(rows_ptrs + head * diag_stride_head, zeros, mask=offs_l < chunk_size)
            tl.store(cols_ptrs + head * diag_stride_head, zeros, mask=offs_s < chunk_size)
        if nsplits > 1:  # the parts are added: each is 0 above the diagonal
            _store_tile(out_base, tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float32), offs_l, offs_s, chunk_size)
    else:
        chunk_start = chunk * chunk_size
        chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
        offs_p = tl.arange(0, BLOCK_P)
        in_l = offs_l < chunk_len
        in_s = offs_s < chunk_len
        in_p = offs_p < headdim
        dot_dtype = x_ptr.dtype.element_ty
        CB_base = CB_ptr + ((batch * nchunks + chunk) * ngroups + group) * chunk_size * chunk_size
        # The causal mask goes on the values, not the load, which then stays vectorised. It is the only causal mask:
        # above the diagonal, dCB is left undefined (its consumer masks it) and the products with the masked CB are 0.
        CB = tl.load(CB_base + offs_l[:, None] * chunk_size + offs_s[None, :], mask=in_l[:, None] & in_s[None, :])
        CB = tl.where(offs_s[None, :] <= offs_l[:, None], CB, 0.0)
        acc = tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float32)
        # A head's dA_cumsum and dt rows for this chunk start at vec_base + head * head_stride. PREFETCH: the next
        # head's load before this head's work, so their latency is not waited for in each step of the loop (the last
        # head loads itself again instead of branching).
        vec_base, head_stride = (batch * nheads * nchunks + chunk) * chunk_size, nchunks * chunk_size
        if PREFETCH:
            nxt_l, nxt_s, nxt_dt = _dcb_head_vectors(
                dA_cumsum_ptr, dt_ptr, vec_base + head_lo * head_stride, offs_l, offs_s, in_l, in_s
            )
        for head in range(head_lo, head_hi):
            if PREFETCH:
                cur_l, cur_s, cur_dt = nxt_l, nxt_s, nxt_dt
                nxt_l, nxt_s, nxt_dt = _dcb_head_vectors(
                    dA_cumsum_ptr, dt_ptr, vec_base + tl.minimum(head + 1, head_hi - 1) * head_stride, offs_l, offs_s,
                    in_l, in_s,
                )  # fmt: skip
            else:
                cur_l, cur_s, cur_dt = _dcb_head_vectors(
                    dA_cumsum_ptr, dt_ptr, vec_base + head * head_stride, offs_l, offs_s, in_l, in_s
                )
            dy = tl.load(
                dy_ptr + ((batch * seqlen + chunk_start + offs_l[:, None]) * nheads + head) * headdim + offs_p[None, :],
                mask=in_l[:, None] & in_p[None, :],
                other=0.0,
            )
            xT = tl.load(
                x_ptr
                + batch * stride_x_b
                + (chunk_start + offs_s[None, :]) * stride_x_l
                + head * stride_x_h
                + offs_p[:, None] * stride_x_p,
                mask=in_s[None, :] & in_p[:, None],
                other=0.0,
            )
            # dA_cumsum does not increase along the chunk (A < 0), so below the diagonal the exponent is <= 0 and
            # the clamp changes nothing; above it, it keeps the (unused) values finite, so no per-head mask is needed.
            decay = tl.exp(tl.minimum(cur_l[:, None] - cur_s[None, :], 0.0))
            dCB_head = tl.dot(dy.to(dot_dtype), xT.to(dot_dtype)) * decay * cur_dt[None, :]
            acc += dCB_head
            # Rows and columns are summed from the same fp32 products, so their totals (equal in exact arithmetic)
            # cancel to fp32 rounding; dA sums over the whole sequence and would otherwise inherit bf16 rounding.
            ddA_diag = dCB_head * CB
            tl.store(rows_ptrs + head * diag_stride_head, tl.sum(ddA_diag, axis=1), mask=offs_l < chunk_size)
            tl.store(cols_ptrs + head * diag_stride_head, -tl.sum(ddA_diag, axis=0), mask=offs_s < chunk_size)
        if HAS_SEQ_IDX:
            doc_base = seq_idx_ptr + batch * seqlen + chunk_start
            doc_l = tl.load(doc_base + offs_l, mask=in_l, other=-1)
            doc_s = tl.load(doc_base + offs_s, mask=in_s, other=-2)
            acc = tl.where(doc_l[:, None] == doc_s[None, :], acc, 0.0)
        _store_tile(out_base, acc, offs_l, offs_s, chunk_size)


@autotune_warps(key=_KEY)
@triton.jit(do_not_specialize=["grid_bucket"])
def _chunk_scan_bwd_dbdc_kernel(
    dCB_ptr, B_ptr, C_ptr, dy_ptr, x_ptr, dt_ptr, dA_cumsum_ptr, prev_states_ptr, dstates_ptr, seq_idx_ptr,
    dB_ptr, dC_ptr, ddA_prev_part_ptr,
    seqlen, nheads, nchunks, chunk_size, headdim, dstate, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p, stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n, stride_dB_b, stride_dB_l, stride_dB_g, stride_dB_n,
    stride_dC_b, stride_dC_l, stride_dC_g, stride_dC_n,
    grid_bucket,
    HAS_SEQ_IDX: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    ngroups = nheads // heads_per_group
    ntiles_n = tl.cdiv(dstate, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % ntiles_n
    pid_t, group, chunk, batch = _split_pid(pid // ntiles_n, chunk_size, ngroups, nchunks, BLOCK_L)
    chunk_start = chunk * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    offs_t = pid_t * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    in_t = offs_t < chunk_len
    in_n = offs_n < dstate
    in_p = offs_p < headdim
    dot_dtype = x_ptr.dtype.element_ty
    B_base = B_ptr + batch * stride_B_b + chunk_start * stride_B_l + group * stride_B_g
    C_base = C_ptr + batch * stride_C_b + chunk_start * stride_C_l + group * stride_C_g
    dCB_base = dCB_ptr + ((batch * nchunks + chunk) * ngroups + group) * chunk_size * chunk_size

    # Through CB: dC[t] = sum_{s <= t} dCB[t, s] B[s] and dB[t] = sum_{l >= t} dCB[l, t] C[l].
    acc_C = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
    for s0 in range(0, tl.minimum((pid_t + 1) * BLOCK_L, chunk_len), BLOCK_L):
        offs_s = s0 + tl.arange(0, BLOCK_L)
        in_s = offs_s < chunk_len
        # Causal masks go on the values, not the loads, which then stay vectorised.
        dCB = tl.load(dCB_base + offs_t[:, None] * chunk_size + offs_s[None, :], mask=in_t[:, None] & in_s[None, :])
        dCB = tl.where(offs_s[None, :] <= offs_t[:, None], dCB, 0.0)
        B = tl.load(
            B_base + offs_s[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
            mask=in_s[:, None] & in_n[None, :],
            other=0.0,
        )
        acc_C += tl.dot(dCB.to(dot_dtype), B.to(dot_dtype))
    acc_B = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
    for l0 in range(pid_t * BLOCK_L, chunk_len, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        in_l = offs_l < chunk_len
        dCBT = tl.load(dCB_base + offs_l[None, :] * chunk_size + offs_t[:, None], mask=in_t[:, None] & in_l[None, :])
        dCBT = tl.where(offs_l[None, :] >= offs_t[:, None], dCBT, 0.0)
        C = tl.load(
            C_base + offs_l[:, None] * stride_C_l + offs_n[None, :] * stride_C_n,
            mask=in_l[:, None] & in_n[None, :],
            other=0.0,
        )
        acc_B += tl.dot(dCBT.to(dot_dtype), C.to(dot_dtype))

    # Through the states, per head of the group: the entering state read by C, and chunk_state's use of B.
    if HAS_SEQ_IDX:
        doc_t = tl.load(seq_idx_ptr + batch * seqlen + chunk_start + offs_t, mask=in_t, other=-1)
        owner = tl.load(seq_idx_ptr + batch * seqlen + tl.maximum(chunk_start - 1, 0))
        doc_last = tl.load(seq_idx_ptr + batch * seqlen + chunk_start + chunk_len - 1)
    tile_mask = in_t[:, None] & in_p[None, :]
    state_mask = in_p[:, None] & in_n[None, :]
    C_t = tl.load(
        C_base + offs_t[:, None] * stride_C_l + offs_n[None, :] * stride_C_n,
        mask=in_t[:, None] & in_n[None, :],
        other=0.0,
    ).to(tl.float32)
    for i in range(heads_per_group):
        head = group * heads_per_group + i
        row = ((batch * nheads + head) * nchunks + chunk) * chunk_size
        dA_cumsum_t = tl.load(dA_cumsum_ptr + row + offs_t, mask=in_t, other=0.0)
        dt_t = tl.load(dt_ptr + row + offs_t, mask=in_t, other=0.0)
        scale_C = tl.exp(dA_cumsum_t)
        weight_B = tl.exp(tl.load(dA_cumsum_ptr + row + chunk_size - 1) - dA_cumsum_t) * dt_t
        if HAS_SEQ_IDX:
            scale_C = tl.where(doc_t == owner, scale_C, 0.0)
            weight_B = tl.where(doc_t == doc_last, weight_B, 0.0)
        state_offs = (((batch * nchunks + chunk) * nheads + head) * headdim + offs_p[:, None]) * dstate + offs_n[
            None, :
        ]
        dy = tl.load(
            dy_ptr + ((batch * seqlen + chunk_start + offs_t[:, None]) * nheads + head) * headdim + offs_p[None, :],
            mask=tile_mask,
            other=0.0,
        )
        prev_state = tl.load(prev_states_ptr + state_offs, mask=state_mask, other=0.0)
        dy_prev = tl.dot(dy.to(dot_dtype), prev_state.to(dot_dtype)) * scale_C[:, None]
        acc_C += dy_prev
        # The entering state's share of ddA_cumsum[t], exp(dA_cumsum[t]) dy[t] · (prev_state C[t]), over this tile
        # of dstate (partial sums, one per tile).
        part = ((batch * nheads + head) * nchunks + chunk) * ntiles_n + pid_n
        tl.store(
            ddA_prev_part_ptr + part * chunk_size + offs_t, tl.sum(dy_prev * C_t, axis=1), mask=offs_t < chunk_size
        )
        x = tl.load(
            x_ptr
            + batch * stride_x_b
            + (chunk_start + offs_t[:, None]) * stride_x_l
            + head * stride_x_h
            + offs_p[None, :] * stride_x_p,
            mask=tile_mask,
            other=0.0,
        )
        dstates = tl.load(dstates_ptr + state_offs, mask=state_mask, other=0.0)
        acc_B += tl.dot(x.to(dot_dtype), dstates.to(dot_dtype)) * weight_B[:, None]

    t_out = chunk_start + offs_t[:, None]
    dC_offs = batch * stride_dC_b + t_out * stride_dC_l + group * stride_dC_g + offs_n[None, :] * stride_dC_n
    tl.store(dC_ptr + dC_offs, acc_C, mask=in_t[:, None] & in_n[None, :])
    dB_offs = batch * stride_dB_b + t_out * stride_dB_l + group * stride_dB_g + offs_n[None, :] * stride_dB_n
    tl.store(dB_ptr + dB_offs, acc_B, mask=in_t[:, None] & in_n[None, :])


def _tiles(chunk_size, upper=64):
    block_l = chunk_block(chunk_size, upper)
    return block_l, triton.cdiv(chunk_size, block_l)


def chunk_scan_fwd(CB, x, dt, dA_cumsum, C, prev_states, D=None, z=None, seq_idx=None):
    """CB: (batch, nchunks, ngroups, chunk_size, chunk_size) fp32; x, z: (batch, seqlen, nheads, headdim);
    dt, dA_cumsum: (batch, nheads, nchunks, chunk_size) fp32; C: (batch, seqlen, ngroups, dstate);
    prev_states: (batch, nchunks, nheads, headdim, dstate) fp32; D: (nheads,) or (nheads, headdim) contiguous;
    seq_idx: (batch, seqlen) int32, nondecreasing.

    Returns out: (batch, seqlen, nheads, headdim) in x's dtype, and out_x, the output before the gate
    (None without z). As chunk_scan_ref.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = C.shape[2:]
    nchunks, chunk_size = dt.shape[2:]
    out = new_output((batch, seqlen, nheads, headdim), x.dtype, x.device)
    out_x = new_output(out.shape, x.dtype, x.device) if z is not None else None
    up_l, up_k, up_n, up_p = TILES["fwd"]
    block_l, ntiles = _tiles(chunk_size, up_l)
    block_p = headdim_block(headdim, up_p)
    grid = (triton.cdiv(headdim, block_p) * ntiles * batch * nchunks * nheads,)
    _chunk_scan_fwd_kernel[grid](
        CB, x, z, dt, dA_cumsum, C, prev_states, D, seq_idx, out, out_x,
        seqlen, nheads, nchunks, chunk_size, headdim, dstate, nheads // ngroups,
        *x.stride(), *(z.stride() if z is not None else (0, 0, 0, 0)), *C.stride(),
        grid_bucket=grid_bucket(*grid),
        HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_L=block_l, BLOCK_K=chunk_block(chunk_size, up_k), BLOCK_P=block_p, BLOCK_N=dstate_block(dstate, up_n),
    )  # fmt: skip
    return out, out_x


def gate_bwd(dout, z, out_x, chunk_size):
    """dout, z, out_x: (batch, seqlen, nheads, headdim), dout and out_x contiguous.

    Returns dy = dout · silu(z) (fp32, the gradient w.r.t. the output before the gate) and dz (in z's dtype).
    """
    batch, seqlen, nheads, headdim = z.shape
    nchunks = triton.cdiv(seqlen, chunk_size)
    dy = new_output(z.shape, torch.float32, z.device)
    dz = new_output(z.shape, z.dtype, z.device)
    block_l, ntiles = _tiles(chunk_size)
    _gate_bwd_kernel[(batch * nchunks * nheads, ntiles)](
        dout, z, out_x, dy, dz,
        seqlen, nheads, nchunks, chunk_size, headdim,
        *z.stride(),
        BLOCK_L=block_l, BLOCK_P=headdim_block(headdim),
    )  # fmt: skip
    return dy, dz


def chunk_scan_bwd_dstates(dy, C, dA_cumsum, seq_idx=None):
    """dy: (batch, seqlen, nheads, headdim) contiguous; C: (batch, seqlen, ngroups, dstate);
    dA_cumsum: (batch, nheads, nchunks, chunk_size).

    Returns dprev_states: (batch, nchunks, nheads, headdim, dstate) fp32, the gradient w.r.t. chunk_scan's
    prev_states.
    """
    batch, seqlen, nheads, headdim = dy.shape
    ngroups, dstate = C.shape[2:]
    nchunks, chunk_size = dA_cumsum.shape[2:]
    dprev_states = new_output((batch, nchunks, nheads, headdim, dstate), torch.float32, dy.device)
    up_l, up_n = TILES["bwd_dstates"]
    block_n = dstate_block(dstate, up_n)
    grid = (triton.cdiv(dstate, block_n) * batch * nchunks * nheads,)
    _chunk_scan_bwd_dstates_kernel[grid](
        dy, C, dA_cumsum, seq_idx, dprev_states,
        seqlen, nheads, nchunks, chunk_size, headdim, dstate, nheads // ngroups,
        *C.stride(),
        grid_bucket=grid_bucket(*grid),
        HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_L=chunk_block(chunk_size, up_l), BLOCK_P=headdim_block(headdim), BLOCK_N=block_n,
    )  # fmt: skip
    return dprev_states


def chunk_scan_bwd_dx(CB, x, dy, dt, dA_cumsum, B, dstates, D=None, seq_idx=None, dx=None):
    """CB: from bmm_chunk_fwd; x: (batch, seqlen, nheads, headdim); dy: like x, contiguous (the gradient w.r.t. the
    output before the gate); dt, dA_cumsum: (batch, nheads, nchunks, chunk_size); B: (batch, seqlen, ngroups,
    dstate); dstates: (batch, nchunks, nheads, headdim, dstate) from state_passing_bwd.

    Returns dx (like x, in x's dtype); ddt_out, ddA_cumsum: (batch, nheads, nchunks, chunk_size) fp32 (ddA_cumsum
    of chunk_state only: chunk_scan_bwd_dcb returns the diagonal block's, chunk_scan_bwd_dbdc the entering
    state's); ddA_chunk: (batch, nheads, nchunks)
    fp32, the extra gradient w.r.t. each chunk's last dA_cumsum; dD (like D, fp32) or None. ``dx``, if given, is the
    tensor (any strides) that dx is written into.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    nchunks, chunk_size = dt.shape[2:]
    up_l, up_k, up_n = TILES["bwd_dx"]
    block_l, ntiles = _tiles(chunk_size, up_l)
    dx = new_output(x.shape, x.dtype, x.device) if dx is None else dx
    ddt_out = new_output(dt.shape, torch.float32, x.device)
    ddA_cumsum = new_output(dt.shape, torch.float32, x.device)
    ddA_chunk_part = new_output((batch, nheads, nchunks, ntiles), torch.float32, x.device)
    dD_part = new_output((batch, nchunks, ntiles, nheads, headdim), torch.float32, x.device) if D is not None else None
    grid = (ntiles * batch * nchunks * nheads,)
    _chunk_scan_bwd_dx_kernel[grid](
        CB, x, dy, dt, dA_cumsum, B, dstates, D, seq_idx,
        dx, ddt_out, ddA_cumsum, ddA_chunk_part, dD_part,
        seqlen, nheads, nchunks, chunk_size, headdim, dstate, nheads // ngroups,
        *x.stride(), *B.stride(), *dx.stride(),
        grid_bucket=grid_bucket(*grid),
        HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2, HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_L=block_l, BLOCK_K=chunk_block(chunk_size, up_k), BLOCK_P=headdim_block(headdim),
        BLOCK_N=dstate_block(dstate, up_n),
    )  # fmt: skip
    dD = None
    if D is not None:
        dD = dD_part.sum((0, 1, 2))
        if D.dim() == 1:
            dD = dD.sum(-1)
    return dx, ddt_out, ddA_cumsum, ddA_chunk_part.sum(-1), dD


def chunk_scan_bwd_dcb(dy, x, dt, dA_cumsum, CB, seq_idx=None):
    """dy: (batch, seqlen, nheads, headdim) contiguous; x: like dy; dt, dA_cumsum: (batch, nheads, nchunks, chunk_size);
    CB: (batch, nchunks, ngroups, chunk_size, chunk_size) from bmm_chunk_fwd.

    Returns dCB: like CB, the gradient w.r.t. it (valid where s <= l), and ddA_diag: (batch, nheads, nchunks,
    chunk_size), the gradient w.r.t. dA_cumsum of the diagonal block, both fp32.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups = CB.shape[2]
    nchunks, chunk_size = dt.shape[2:]
    up_l, splits, prefetch = TILES["bwd_dcb"]
    block_l, ntiles = _tiles(chunk_size, up_l)
    heads_per_group = nheads // ngroups
    per_split = triton.cdiv(heads_per_group, max(1, min(splits, heads_per_group)))
    nsplits = triton.cdiv(heads_per_group, per_split)
    dCB = new_output((nsplits, batch, nchunks, ngroups, chunk_size, chunk_size), torch.float32, x.device)
    # Partial row and column sums, one per tile; the tiles above the diagonal write zeros.
    ddA_diag = new_output((batch, nheads, nchunks, 2 * ntiles, chunk_size), torch.float32, x.device)
    grid = (ntiles * ntiles * nsplits * batch * nchunks * ngroups,)
    _chunk_scan_bwd_dcb_kernel[grid](
        dy, x, dt, dA_cumsum, CB, seq_idx, dCB, ddA_diag,
        seqlen, nheads, nchunks, chunk_size, headdim, heads_per_group, per_split, nsplits, dCB.stride(0),
        *x.stride(),
        grid_bucket=grid_bucket(*grid),
        HAS_SEQ_IDX=seq_idx is not None, BLOCK_L=block_l, BLOCK_P=headdim_block(headdim), PREFETCH=bool(prefetch),
    )  # fmt: skip
    return (dCB[0] if nsplits == 1 else dCB.sum(0)), ddA_diag.sum(3)


def chunk_scan_bwd_dbdc(dCB, B, C, dy, x, dt, dA_cumsum, prev_states, dstates, seq_idx=None, dB=None, dC=None):
    """dCB: from chunk_scan_bwd_dcb; B, C: (batch, seqlen, ngroups, dstate); dy, x: (batch, seqlen, nheads, headdim),
    dy contiguous; dt, dA_cumsum: (batch, nheads, nchunks, chunk_size); prev_states, dstates:
    (batch, nchunks, nheads, headdim, dstate) fp32.

    Returns dB, dC: like B and C, in their dtypes, written into ``dB``/``dC`` (any strides) when given, and
    ddA_prev: (batch, nheads, nchunks, chunk_size) fp32, the entering state's gradient w.r.t. dA_cumsum.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    nchunks, chunk_size = dt.shape[2:]
    block_l, ntiles = _tiles(chunk_size)
    block_n = dstate_block(dstate)
    dB = new_output((batch, seqlen, ngroups, dstate), B.dtype, B.device) if dB is None else dB
    dC = new_output((batch, seqlen, ngroups, dstate), C.dtype, C.device) if dC is None else dC
    ntiles_n = triton.cdiv(dstate, block_n)
    ddA_prev_part = new_output((batch, nheads, nchunks, ntiles_n, chunk_size), torch.float32, x.device)
    grid = (ntiles_n * ntiles * batch * nchunks * ngroups,)
    _chunk_scan_bwd_dbdc_kernel[grid](
        dCB, B, C, dy, x, dt, dA_cumsum, prev_states, dstates, seq_idx,
        dB, dC, ddA_prev_part,
        seqlen, nheads, nchunks, chunk_size, headdim, dstate, nheads // ngroups,
        *x.stride(), *B.stride(), *C.stride(), *dB.stride(), *dC.stride(),
        grid_bucket=grid_bucket(*grid),
        HAS_SEQ_IDX=seq_idx is not None, BLOCK_L=block_l, BLOCK_P=headdim_block(headdim), BLOCK_N=block_n,
    )  # fmt: skip
    return dB, dC, ddA_prev_part.sum(3)
