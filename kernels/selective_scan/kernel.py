"""Triton kernels of the Mamba1 selective scan, forward and backward.

One program owns (one batch row, one group, BLOCK_D channels of that group) and walks the sequence in time order
with its (BLOCK_D, dstate) fp32 state in registers; each step costs one exp, a few FMAs per state element, and one
reduction over dstate. The forward stores the state at the start of every chunk of CHUNK steps (batch * dim *
seqlen / CHUNK * dstate fp32), nothing per step. The backward walks the chunks last to first: it recomputes the
chunk's states from the stored chunk-start state into a per-program scratch buffer (CHUNK + 1 states, small enough to
stay in L1/L2), then runs the adjoint recurrence backwards in time over the chunk.

Tensors are contiguous: u, delta, z, out (batch, dim, seqlen); A (dim, dstate); B, C (batch, groups, dstate, seqlen);
channel d of group g is g * P + p with P = dim // groups. Everything is computed in fp32 and cast on store.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _softplus(x):
    # log1p(exp(x)) written with exp2/log2; above 20 softplus(x) == x in fp32, and exp would overflow.
    return tl.where(x > 20.0, x, tl.log2(1.0 + tl.exp2(x * 1.4426950408889634)) * 0.6931471805599453)


@triton.jit
def _scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    delta_bias_ptr,
    h0_ptr,
    seq_idx_ptr,
    out_ptr,
    last_state_ptr,
    chunk_states_ptr,
    dim,
    P,
    groups,
    seqlen,
    dstate,
    nchunks,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_p = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_p < P
    d = pid_g * P + offs_p
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]

    # A is pre-scaled by log2(e) so the decay is a single exp2.
    A = tl.load(A_ptr + d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    state_offs = (pid_b * dim + d)[:, None] * dstate + offs_n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)

    row = (pid_b * dim + d).to(tl.int64) * seqlen  # (BLOCK_D,) start of each channel's sequence
    bc_row = ((pid_b * groups + pid_g) * dstate + offs_n).to(tl.int64) * seqlen  # (BLOCK_N,)
    chunk_offs = (pid_b * dim + d).to(tl.int64)[:, None] * nchunks * dstate + offs_n[None, :]
    if HAS_SEQ_IDX:
        prev_doc = tl.load(seq_idx_ptr + pid_b * seqlen)
    for c in range(nchunks):
        tl.store(chunk_states_ptr + chunk_offs + c * dstate, h, mask=mask_dn)
        for t in range(c * CHUNK, tl.minimum(seqlen, (c + 1) * CHUNK)):
            u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_DELTA_BIAS:
                dt += bias
            if DELTA_SOFTPLUS:
                dt = _softplus(dt)
            B_t = tl.load(B_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            C_t = tl.load(C_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            decay = tl.exp2(dt[:, None] * A)
            if HAS_SEQ_IDX:
                doc = tl.load(seq_idx_ptr + pid_b * seqlen + t)
                decay = tl.where(doc == prev_doc, decay, 0.0)
                prev_doc = doc
            h = decay * h + (dt * u_t)[:, None] * B_t[None, :]
            y = tl.sum(h * C_t[None, :], axis=1)
            if HAS_D:
                y += Dv * u_t
            if HAS_Z:
                z_t = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                y *= z_t * tl.sigmoid(z_t)
            tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(last_state_ptr + state_offs, h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    delta_bias_ptr,
    seq_idx_ptr,
    chunk_states_ptr,
    dout_ptr,
    dlast_ptr,
    scratch_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dA_ptr,
    dB_ptr,
    dC_ptr,
    dD_ptr,
    ddelta_bias_ptr,
    dh0_ptr,
    dim,
    P,
    groups,
    seqlen,
    dstate,
    nchunks,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Gradients of one (batch row, group, channel block).

    dA, dD, ddelta_bias are per-batch partial sums (batch, dim, ...); dB, dC are per-channel-block partial sums
    (batch, groups, nblocks, dstate, seqlen). The caller reduces them, which keeps the kernel free of atomics and
    deterministic.
    """
    pid_b = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_d = tl.program_id(2)
    nblocks = tl.num_programs(2)
    offs_p = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_p < P
    d = pid_g * P + offs_p
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]

    A = tl.load(A_ptr + d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    state_offs = (pid_b * dim + d)[:, None] * dstate + offs_n[None, :]
    if HAS_DLAST:
        dh = tl.load(dlast_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        dh = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    row = (pid_b * dim + d).to(tl.int64) * seqlen
    bc_row = ((pid_b * groups + pid_g) * dstate + offs_n).to(tl.int64) * seqlen
    dbc_row = (((pid_b * groups + pid_g) * nblocks + pid_d) * dstate + offs_n).to(tl.int64) * seqlen
    chunk_offs = (pid_b * dim + d).to(tl.int64)[:, None] * nchunks * dstate + offs_n[None, :]
    # Scratch slot j holds the state after step chunk_start + j - 1 (slot 0: the chunk-start state).
    pid = (pid_b * groups + pid_g) * nblocks + pid_d
    scratch_offs = pid.to(tl.int64) * (CHUNK + 1) * BLOCK_D * BLOCK_N
    scratch_offs += tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]
    for c_rev in range(nchunks):
        c = nchunks - 1 - c_rev
        start = c * CHUNK
        end = tl.minimum(seqlen, start + CHUNK)
        h = tl.load(chunk_states_ptr + chunk_offs + c * dstate, mask=mask_dn, other=0.0)
        tl.store(scratch_ptr + scratch_offs, h)
        if HAS_SEQ_IDX:
            prev_doc = tl.load(seq_idx_ptr + pid_b * seqlen + tl.maximum(start - 1, 0))
        for t in range(start, end):
            u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_DELTA_BIAS:
                dt += bias
            if DELTA_SOFTPLUS:
                dt = _softplus(dt)
            B_t = tl.load(B_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            decay = tl.exp2(dt[:, None] * A2)
            if HAS_SEQ_IDX:
                doc = tl.load(seq_idx_ptr + pid_b * seqlen + t)
                decay = tl.where(doc == prev_doc, decay, 0.0)
                prev_doc = doc
            h = decay * h + (dt * u_t)[:, None] * B_t[None, :]
            tl.store(scratch_ptr + scratch_offs + (t - start + 1) * BLOCK_D * BLOCK_N, h)
        # The states were written by other threads of this program.
        tl.debug_barrier()
        for t_rev in range(start, end):
            t = end - 1 - t_rev + start
            j = t - start
            h = tl.load(scratch_ptr + scratch_offs + (j + 1) * BLOCK_D * BLOCK_N)
            h_prev = tl.load(scratch_ptr + scratch_offs + j * BLOCK_D * BLOCK_N)
            u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            dt_raw = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_DELTA_BIAS:
                dt_raw += bias
            if DELTA_SOFTPLUS:
                dt = _softplus(dt_raw)
            else:
                dt = dt_raw
            B_t = tl.load(B_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            C_t = tl.load(C_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            dy = tl.load(dout_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_Z:
                z_t = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                y = tl.sum(h * C_t[None, :], axis=1)
                if HAS_D:
                    y += Dv * u_t
                sig = tl.sigmoid(z_t)
                dz = dy * y * sig * (1.0 + z_t * (1.0 - sig))
                tl.store(dz_ptr + row + t, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                dy = dy * z_t * sig
            decay = tl.exp2(dt[:, None] * A2)
            if HAS_SEQ_IDX:
                doc = tl.load(seq_idx_ptr + pid_b * seqlen + t)
                doc_prev = tl.load(seq_idx_ptr + pid_b * seqlen + tl.maximum(t - 1, 0))
                decay = tl.where(doc == doc_prev, decay, 0.0)
            dh += dy[:, None] * C_t[None, :]
            dC_t = tl.sum(dy[:, None] * h, axis=0)
            dB_t = tl.sum(dh * (dt * u_t)[:, None], axis=0)
            tl.store(dC_ptr + dbc_row + t, dC_t, mask=mask_n)
            tl.store(dB_ptr + dbc_row + t, dB_t, mask=mask_n)
            dhB = tl.sum(dh * B_t[None, :], axis=1)
            du = dhB * dt
            if HAS_D:
                du += dy * Dv
                dD_acc += dy * u_t
            dA_term = dh * h_prev * decay  # d loss / d (dt * A)
            ddt = dhB * u_t + tl.sum(dA_term * A, axis=1)
            dA_acc += dA_term * dt[:, None]
            if DELTA_SOFTPLUS:
                ddt = ddt * tl.sigmoid(dt_raw)
            dbias_acc += ddt
            tl.store(du_ptr + row + t, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddelta_ptr + row + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
            dh = dh * decay
        # The next chunk overwrites the scratch states that this chunk's threads were reading.
        tl.debug_barrier()
    tl.store(dh0_ptr + state_offs, dh, mask=mask_dn)
    tl.store(dA_ptr + state_offs, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + d, dD_acc, mask=mask_d)
    if HAS_DELTA_BIAS:
        tl.store(ddelta_bias_ptr + pid_b * dim + d, dbias_acc, mask=mask_d)
