"""Triton kernels of the Mamba1 selective scan, forward and backward.

One program owns (BLOCK_D channels of one group, one batch row) and walks the sequence in chunks of CHUNK steps,
carrying its (BLOCK_D, dstate) fp32 state from chunk to chunk in registers. Inside a chunk the whole
(BLOCK_D, dstate, CHUNK) block of the recurrence h_t = a_t * h_{t-1} + b_t is one ``tl.associative_scan`` on pairs
(a, b) along time: no loop over the state index, no per-step memory round trip, and every reduction over the state
(y = sum_n C h) or over the channels (dB, dC) is one ``tl.sum`` of the block. The forward stores only the state at
the start of each of the backward's chunks (a multiple of its own); the backward walks its chunks last to first,
recomputes each chunk's states from that, and runs the adjoint dh_t = C_t * dy_t + a_{t+1} * dh_{t+1} as a reverse
scan. dB and dC are summed over channel blocks with fp32 atomics spread over NSLOT copies of the buffer (block k adds
into copy k % NSLOT), so that no address sees more than P / (BLOCK_D * NSLOT) writers; the caller sums the copies.

Every (batch, dim, seqlen) tensor (u, delta, z, out, dout, du, ddelta, dz) and B, C (batch, groups, dstate, seqlen)
is addressed through its own strides, so channel-last views (a slice of an in_proj or x_proj output) are read and
written in place. Channel d of group g is g * P + p with P = dim // groups. Everything is computed in fp32 and cast on
store.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


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
def _decay(dt, A2, starts):
    """exp(dt * A) as a (BLOCK_D, BLOCK_N, CHUNK) block, zero where a document starts."""
    a = tl.exp2(dt[:, None, :] * A2[:, :, None])
    return tl.where(starts[None, None, :], 0.0, a)


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
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_z_b, s_z_d, s_z_l,
    s_o_b, s_o_d, s_o_l,
    s_B_b, s_B_g, s_B_n, s_B_l,
    s_C_b, s_C_g, s_C_n, s_C_l,
    dim,
    P,
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
    STATE_EVERY: tl.constexpr,
):  # fmt: skip
    # Channel blocks vary fastest, so the programs running together share a row's B and C in L2.
    pid_d = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_p = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_p < P
    d = pid_g * P + offs_p
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    offs_t = tl.arange(0, CHUNK)

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

    b64 = pid_b.to(tl.int64)
    d64 = d.to(tl.int64)
    u_row = b64 * s_u_b + d64 * s_u_d
    dt_row = b64 * s_dt_b + d64 * s_dt_d
    z_row = b64 * s_z_b + d64 * s_z_d
    o_row = b64 * s_o_b + d64 * s_o_d
    B_row = b64 * s_B_b + pid_g * s_B_g + offs_n * s_B_n  # (BLOCK_N,)
    C_row = b64 * s_C_b + pid_g * s_C_g + offs_n * s_C_n
    nstates = tl.cdiv(nchunks, STATE_EVERY)
    chunk_offs = (pid_b * dim + d).to(tl.int64)[:, None] * nstates * dstate + offs_n[None, :]
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    for c in range(nchunks):
        if c % STATE_EVERY == 0:  # the backward's chunks are STATE_EVERY of these
            tl.store(chunk_states_ptr + chunk_offs + (c // STATE_EVERY) * dstate, h, mask=mask_dn)
        t = c * CHUNK + offs_t
        mask_t = t < seqlen
        io_mask = mask_d[:, None] & mask_t[None, :]
        nt_mask = mask_n[:, None] & mask_t[None, :]
        t64 = t.to(tl.int64)
        u = tl.load(u_ptr + u_row[:, None] + t64[None, :] * s_u_l, mask=io_mask, other=0.0).to(tl.float32)
        dt, _ = _load_dt(delta_ptr, dt_row[:, None] + t64[None, :] * s_dt_l, io_mask, bias, HAS_DELTA_BIAS,
                         DELTA_SOFTPLUS)  # fmt: skip
        Bt = tl.load(B_ptr + B_row[:, None] + t64[None, :] * s_B_l, mask=nt_mask, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + C_row[:, None] + t64[None, :] * s_C_l, mask=nt_mask, other=0.0).to(tl.float32)
        starts = _doc_start(seq_ptr, t, seqlen, HAS_SEQ_IDX)
        a = _decay(dt, A2, starts)
        b = (dt * u)[:, None, :] * Bt[None, :, :]
        a_cum, b_cum = tl.associative_scan((a, b), 2, _first_order)
        hs = a_cum * h[:, :, None] + b_cum  # (BLOCK_D, BLOCK_N, CHUNK)
        y = tl.sum(hs * Ct[None, :, :], axis=1)
        # Padded steps have a = 1 and b = 0, so the last column is the state after the chunk.
        h = tl.sum(tl.where((offs_t == CHUNK - 1)[None, None, :], hs, 0.0), axis=2)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + z_row[:, None] + t64[None, :] * s_z_l, mask=io_mask, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(out_ptr + o_row[:, None] + t64[None, :] * s_o_l, y.to(out_ptr.dtype.element_ty), mask=io_mask)
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
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_z_b, s_z_d, s_z_l,
    s_g_b, s_g_d, s_g_l,
    s_du_b, s_du_d, s_du_l,
    s_ddt_b, s_ddt_d, s_ddt_l,
    s_dz_b, s_dz_d, s_dz_l,
    s_B_b, s_B_g, s_B_n, s_B_l,
    s_C_b, s_C_g, s_C_n, s_C_l,
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
    NSLOT: tl.constexpr,
):  # fmt: skip
    """Gradients of one (channel block, group, batch row).

    dA, dD, ddelta_bias are per-batch partial sums (batch, dim, ...) that the caller reduces; dB, dC
    (NSLOT, batch, groups, dstate, seqlen) fp32 must start at zero: channel blocks add their shares atomically.
    """
    pid_d = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_b = tl.program_id(2)
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

    b64 = pid_b.to(tl.int64)
    d64 = d.to(tl.int64)
    u_row = b64 * s_u_b + d64 * s_u_d
    dt_row = b64 * s_dt_b + d64 * s_dt_d
    z_row = b64 * s_z_b + d64 * s_z_d
    g_row = b64 * s_g_b + d64 * s_g_d
    du_row = b64 * s_du_b + d64 * s_du_d
    ddt_row = b64 * s_ddt_b + d64 * s_ddt_d
    dz_row = b64 * s_dz_b + d64 * s_dz_d
    B_row = b64 * s_B_b + pid_g * s_B_g + offs_n * s_B_n
    C_row = b64 * s_C_b + pid_g * s_C_g + offs_n * s_C_n
    # dB, dC: contiguous (NSLOT, batch, groups, dstate, seqlen); this block adds into copy pid_d % NSLOT.
    bc_row = ((((pid_d % NSLOT) * tl.num_programs(2) + pid_b) * groups + pid_g) * dstate + offs_n).to(tl.int64)
    bc_row = bc_row * seqlen
    chunk_offs = (pid_b * dim + d).to(tl.int64)[:, None] * nchunks * dstate + offs_n[None, :]
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    for i in range(nchunks):
        c = nchunks - 1 - i
        h0 = tl.load(chunk_states_ptr + chunk_offs + c * dstate, mask=mask_dn, other=0.0)
        t = c * CHUNK + offs_t
        mask_t = t < seqlen
        io_mask = mask_d[:, None] & mask_t[None, :]
        nt_mask = mask_n[:, None] & mask_t[None, :]
        t64 = t.to(tl.int64)
        u = tl.load(u_ptr + u_row[:, None] + t64[None, :] * s_u_l, mask=io_mask, other=0.0).to(tl.float32)
        dt_offs = dt_row[:, None] + t64[None, :] * s_dt_l
        dt, dt_raw = _load_dt(delta_ptr, dt_offs, io_mask, bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        # a_{t+1}: the next step's decay (1 past the end, so the last step receives dlast unchanged).
        next_mask = mask_d[:, None] & (t + 1 < seqlen)[None, :]
        dt_next, _ = _load_dt(delta_ptr, dt_offs + s_dt_l, next_mask, bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        Bt = tl.load(B_ptr + B_row[:, None] + t64[None, :] * s_B_l, mask=nt_mask, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + C_row[:, None] + t64[None, :] * s_C_l, mask=nt_mask, other=0.0).to(tl.float32)
        starts = _doc_start(seq_ptr, t, seqlen, HAS_SEQ_IDX)
        starts_next = _doc_start(seq_ptr, t + 1, seqlen, HAS_SEQ_IDX)
        dtu = dt * u
        dout = tl.load(dout_ptr + g_row[:, None] + t64[None, :] * s_g_l, mask=io_mask, other=0.0).to(tl.float32)
        dy = dout
        if HAS_Z:
            z = tl.load(z_ptr + z_row[:, None] + t64[None, :] * s_z_l, mask=io_mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            dy = dout * z * sig

        # Recompute the chunk's states from the state at its start.
        b = dtu[:, None, :] * Bt[None, :, :]
        a_cum, b_cum = tl.associative_scan((_decay(dt, A2, starts), b), 2, _first_order)
        hs = a_cum * h0[:, :, None] + b_cum  # (BLOCK_D, BLOCK_N, CHUNK)
        # Adjoint: dh_t = C_t * dy_t + a_{t+1} * dh_{t+1}, a reverse scan seeded with the next chunk's dh.
        a_next = _decay(dt_next, A2, starts_next)
        a_rev, dy_rev = tl.associative_scan((a_next, dy[:, None, :] * Ct[None, :, :]), 2, _first_order, reverse=True)
        dhs = dy_rev + a_rev * dh[:, :, None]
        dh = tl.sum(tl.where((offs_t == 0)[None, None, :], dhs, 0.0), axis=2)

        # Channel blocks of a group share B and C: their gradients meet in fp32 atomics.
        bc_offs = bc_row[:, None] + t64[None, :]
        tl.atomic_add(dC_ptr + bc_offs, tl.sum(dy[:, None, :] * hs, axis=0), mask=nt_mask, sem="relaxed")
        tl.atomic_add(dB_ptr + bc_offs, tl.sum(dhs * dtu[:, None, :], axis=0), mask=nt_mask, sem="relaxed")
        dhB = tl.sum(dhs * Bt[None, :, :], axis=1)  # (BLOCK_D, CHUNK)
        # d loss / d (dt * A) = dh_t * a_t * h_{t-1} = dh_t * (h_t - b_t): no need for the previous state.
        dA_term = tl.where(mask_t[None, None, :], dhs * (hs - b), 0.0)
        ddt_decay = tl.sum(dA_term * A[:, :, None], axis=1)
        dA_acc += tl.sum(dA_term * dt[:, None, :], axis=2)

        if HAS_Z:
            y = tl.sum(hs * Ct[None, :, :], axis=1)
            if HAS_D:
                y += Dv[:, None] * u
            dz = dout * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + dz_row[:, None] + t64[None, :] * s_dz_l, dz.to(dz_ptr.dtype.element_ty), mask=io_mask)
        du = dhB * dt
        if HAS_D:
            du += dy * Dv[:, None]
            dD_acc += tl.sum(dy * u, axis=1)
        ddt = dhB * u + ddt_decay
        if DELTA_SOFTPLUS:
            ddt = ddt * tl.sigmoid(dt_raw)
        ddt = tl.where(io_mask, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + du_row[:, None] + t64[None, :] * s_du_l, du.to(du_ptr.dtype.element_ty), mask=io_mask)
        tl.store(ddelta_ptr + ddt_row[:, None] + t64[None, :] * s_ddt_l, ddt.to(ddelta_ptr.dtype.element_ty),
                 mask=io_mask)  # fmt: skip

    # The initial state reaches step 0 through a_0.
    dt0, _ = _load_dt(delta_ptr, dt_row[:, None] + offs_t[None, :].to(tl.int64) * s_dt_l,
                      mask_d[:, None] & (offs_t == 0)[None, :], bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS)  # fmt: skip
    a0 = tl.exp2(tl.sum(dt0, axis=1)[:, None] * A2)
    tl.store(dh0_ptr + state_offs, dh * a0, mask=mask_dn)
    tl.store(dA_ptr + state_offs, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + d, dD_acc, mask=mask_d)
    if HAS_DELTA_BIAS:
        tl.store(ddelta_bias_ptr + pid_b * dim + d, dbias_acc, mask=mask_d)
