"""Triton kernels of the Mamba1 selective scan, forward and backward.

One program owns (one batch row, one group, BLOCK_D channels of that group) and walks the sequence in chunks of
CHUNK steps, carrying its (BLOCK_D, dstate) fp32 state from chunk to chunk in registers. Inside a chunk, the
recurrence h_t = a_t * h_{t-1} + b_t over a (BLOCK_D, dstate, CHUNK) register tile is one ``tl.associative_scan``
(a parallel prefix over time on pairs (a, b)), so every load and store is a coalesced (rows, CHUNK) tile and no step
waits on the previous one's memory latency. The forward stores only the state at each chunk start (1/CHUNK of a state
per step); the backward walks the chunks last to first, recomputes the chunk's states from that, and runs the adjoint
recurrence dh_t = C_t * dy_t + a_{t+1} * dh_{t+1} as a reverse scan.

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
def _first_order(a1, b1, a2, b2):
    """Compose h -> a1 * h + b1, then h -> a2 * h + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _load_dt(delta_ptr, offs, mask, bias, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr):
    """dt (and the pre-softplus value) at offs; zero where masked, so that a = 1 and b = 0 there."""
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        raw += bias[:, None]
    dt = raw
    if DELTA_SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _doc_start(seq_ptr, t, seqlen, HAS_SEQ_IDX: tl.constexpr):
    """(CHUNK,) whether a document starts at t (its state must not see the previous token's)."""
    if HAS_SEQ_IDX:
        in_seq = (t > 0) & (t < seqlen)
        doc = tl.load(seq_ptr + t, mask=in_seq, other=0)
        prev = tl.load(seq_ptr + t - 1, mask=in_seq, other=0)
        return doc != prev
    else:
        return t < 0


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
    offs_t = tl.arange(0, CHUNK)

    # A is pre-scaled by log2(e) so the decay is a single exp2.
    A2 = tl.load(A_ptr + d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    state_offs = (pid_b * dim + d)[:, None] * dstate + offs_n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)

    row = (pid_b * dim + d).to(tl.int64) * seqlen  # (BLOCK_D,)
    bc_row = ((pid_b * groups + pid_g) * dstate + offs_n).to(tl.int64) * seqlen  # (BLOCK_N,)
    chunk_offs = (pid_b * dim + d).to(tl.int64)[:, None] * nchunks * dstate + offs_n[None, :]
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    for c in range(nchunks):
        tl.store(chunk_states_ptr + chunk_offs + c * dstate, h, mask=mask_dn)
        t = c * CHUNK + offs_t
        mask_t = t < seqlen
        io_offs = row[:, None] + t[None, :]
        io_mask = mask_d[:, None] & mask_t[None, :]
        u = tl.load(u_ptr + io_offs, mask=io_mask, other=0.0).to(tl.float32)
        dt, _ = _load_dt(delta_ptr, io_offs, io_mask, bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        bc_offs = bc_row[:, None] + t[None, :]
        bc_mask = mask_n[:, None] & mask_t[None, :]
        Bt = tl.load(B_ptr + bc_offs, mask=bc_mask, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc_offs, mask=bc_mask, other=0.0).to(tl.float32)

        a = tl.exp2(dt[:, None, :] * A2[:, :, None])  # (BLOCK_D, BLOCK_N, CHUNK)
        a = tl.where(_doc_start(seq_ptr, t, seqlen, HAS_SEQ_IDX)[None, None, :], 0.0, a)
        b = (dt * u)[:, None, :] * Bt[None, :, :]
        a_cum, b_cum = tl.associative_scan((a, b), 2, _first_order)
        hs = a_cum * h[:, :, None] + b_cum
        y = tl.sum(hs * Ct[None, :, :], axis=1)  # (BLOCK_D, CHUNK)
        # Padded steps have a = 1 and b = 0, so the last column is the state after the chunk.
        h = tl.sum(tl.where((offs_t == CHUNK - 1)[None, None, :], hs, 0.0), axis=2)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + io_offs, mask=io_mask, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(out_ptr + io_offs, y.to(out_ptr.dtype.element_ty), mask=io_mask)
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
    offs_t = tl.arange(0, CHUNK)

    A = tl.load(A_ptr + d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    state_offs = (pid_b * dim + d)[:, None] * dstate + offs_n[None, :]
    # dh is the adjoint of the state at the first step of the chunk after the current one.
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
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    for i in range(nchunks):
        c = nchunks - 1 - i
        h0 = tl.load(chunk_states_ptr + chunk_offs + c * dstate, mask=mask_dn, other=0.0)
        t = c * CHUNK + offs_t
        mask_t = t < seqlen
        io_offs = row[:, None] + t[None, :]
        io_mask = mask_d[:, None] & mask_t[None, :]
        u = tl.load(u_ptr + io_offs, mask=io_mask, other=0.0).to(tl.float32)
        dt, dt_raw = _load_dt(delta_ptr, io_offs, io_mask, bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        bc_offs = bc_row[:, None] + t[None, :]
        bc_mask = mask_n[:, None] & mask_t[None, :]
        Bt = tl.load(B_ptr + bc_offs, mask=bc_mask, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc_offs, mask=bc_mask, other=0.0).to(tl.float32)

        # Recompute the chunk's states.
        a = tl.exp2(dt[:, None, :] * A2[:, :, None])
        a = tl.where(_doc_start(seq_ptr, t, seqlen, HAS_SEQ_IDX)[None, None, :], 0.0, a)
        b = (dt * u)[:, None, :] * Bt[None, :, :]
        a_cum, b_cum = tl.associative_scan((a, b), 2, _first_order)
        hs = a_cum * h0[:, :, None] + b_cum

        dy = tl.load(dout_ptr + io_offs, mask=io_mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + io_offs, mask=io_mask, other=0.0).to(tl.float32)
            y = tl.sum(hs * Ct[None, :, :], axis=1)
            if HAS_D:
                y += Dv[:, None] * u
            sig = tl.sigmoid(z)
            dz = dy * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + io_offs, dz.to(dz_ptr.dtype.element_ty), mask=io_mask)
            dy = dy * z * sig

        # a_{t+1}: the next step's decay (1 past the end, so the last step receives dlast unchanged).
        t_next = t + 1
        next_mask = mask_d[:, None] & (t_next < seqlen)[None, :]
        dt_next, _ = _load_dt(delta_ptr, io_offs + 1, next_mask, bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        a_next = tl.exp2(dt_next[:, None, :] * A2[:, :, None])
        a_next = tl.where(_doc_start(seq_ptr, t_next, seqlen, HAS_SEQ_IDX)[None, None, :], 0.0, a_next)
        a_rev, dy_rev = tl.associative_scan((a_next, dy[:, None, :] * Ct[None, :, :]), 2, _first_order, reverse=True)
        dhs = dy_rev + a_rev * dh[:, :, None]  # (BLOCK_D, BLOCK_N, CHUNK) adjoint of every state of the chunk
        dh = tl.sum(tl.where((offs_t == 0)[None, None, :], dhs, 0.0), axis=2)

        dC = tl.sum(dy[:, None, :] * hs, axis=0)  # (BLOCK_N, CHUNK)
        dB = tl.sum(dhs * (dt * u)[:, None, :], axis=0)
        tl.store(dC_ptr + dbc_row[:, None] + t[None, :], dC, mask=bc_mask)
        tl.store(dB_ptr + dbc_row[:, None] + t[None, :], dB, mask=bc_mask)
        dhB = tl.sum(dhs * Bt[None, :, :], axis=1)  # (BLOCK_D, CHUNK)
        du = dhB * dt
        if HAS_D:
            du += dy * Dv[:, None]
            dD_acc += tl.sum(dy * u, axis=1)
        # d loss / d (dt * A) = dh_t * a_t * h_{t-1} = dh_t * (h_t - b_t): no need for the previous state.
        dA_term = tl.where(mask_t[None, None, :], dhs * (hs - b), 0.0)
        ddt = dhB * u + tl.sum(dA_term * A[:, :, None], axis=1)
        dA_acc += tl.sum(dA_term * dt[:, None, :], axis=2)
        if DELTA_SOFTPLUS:
            ddt = ddt * tl.sigmoid(dt_raw)
        ddt = tl.where(io_mask, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + io_offs, du.to(du_ptr.dtype.element_ty), mask=io_mask)
        tl.store(ddelta_ptr + io_offs, ddt.to(ddelta_ptr.dtype.element_ty), mask=io_mask)

    # The initial state reaches step 0 through a_0.
    dt0, _ = _load_dt(delta_ptr, row[:, None] + offs_t[None, :], mask_d[:, None] & (offs_t == 0)[None, :], bias,
                      HAS_DELTA_BIAS, DELTA_SOFTPLUS)  # fmt: skip
    a0 = tl.exp2(tl.sum(dt0, axis=1)[:, None] * A2)
    tl.store(dh0_ptr + state_offs, dh * a0, mask=mask_dn)
    tl.store(dA_ptr + state_offs, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + d, dD_acc, mask=mask_d)
    if HAS_DELTA_BIAS:
        tl.store(ddelta_bias_ptr + pid_b * dim + d, dbias_acc, mask=mask_d)
