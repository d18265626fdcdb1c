"""Triton kernels of the Mamba1 selective scan, forward and backward.

One program owns (one batch row, one group, BLOCK_D channels of that group) and walks the sequence in chunks of
CHUNK steps, carrying its (BLOCK_D, dstate) fp32 state from chunk to chunk in registers. Inside a chunk it loops over
the state index n; for each, the recurrence h_t = a_t * h_{t-1} + b_t over a (BLOCK_D, CHUNK) tile is one
``tl.associative_scan`` on pairs (a, b) along time, so every load and store is a coalesced (rows, CHUNK) tile, no step
waits on the previous one's memory latency, and registers stay bounded for long chunks. The forward stores only the
state at each chunk start (1/CHUNK of a state per step); the backward walks the chunks last to first, recomputes each
chunk's states from that, and runs the adjoint dh_t = C_t * dy_t + a_{t+1} * dh_{t+1} as a reverse scan.

Every (batch, dim, seqlen) tensor (u, delta, z, out, dout, du, ddelta, dz) and B, C (batch, groups, dstate, seqlen)
is addressed through its own strides (``api.py`` hands them over time-contiguous: strided time axes were measured 3x
slower); A is (dim, dstate) contiguous. Channel d of group g is g * P + p with P = dim // groups. Everything
is computed in fp32 and cast on store.
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
):  # fmt: skip
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
    u_row = b64 * s_u_b + d64 * s_u_d  # (BLOCK_D,)
    dt_row = b64 * s_dt_b + d64 * s_dt_d
    z_row = b64 * s_z_b + d64 * s_z_d
    o_row = b64 * s_o_b + d64 * s_o_d
    B_base = b64 * s_B_b + pid_g * s_B_g  # B[b, g, 0, 0]
    C_base = b64 * s_C_b + pid_g * s_C_g
    chunk_offs = (pid_b * dim + d).to(tl.int64)[:, None] * nchunks * dstate + offs_n[None, :]
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    for c in range(nchunks):
        tl.store(chunk_states_ptr + chunk_offs + c * dstate, h, mask=mask_dn)
        t = c * CHUNK + offs_t
        mask_t = t < seqlen
        t64 = t.to(tl.int64)
        io_mask = mask_d[:, None] & mask_t[None, :]
        u = tl.load(u_ptr + u_row[:, None] + t64[None, :] * s_u_l, mask=io_mask, other=0.0).to(tl.float32)
        dt_offs = dt_row[:, None] + t64[None, :] * s_dt_l
        dt, _ = _load_dt(delta_ptr, dt_offs, io_mask, bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        starts = _doc_start(seq_ptr, t, seqlen, HAS_SEQ_IDX)[None, :]
        dtu = dt * u
        y = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)
        h_next = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        # One state index at a time: (BLOCK_D, CHUNK) tiles keep registers low enough for long chunks.
        for n in range(dstate):
            A2_n = tl.load(A_ptr + d * dstate + n, mask=mask_d, other=0.0).to(tl.float32) * LOG2E
            B_n = tl.load(B_ptr + B_base + n * s_B_n + t64 * s_B_l, mask=mask_t, other=0.0).to(tl.float32)
            C_n = tl.load(C_ptr + C_base + n * s_C_n + t64 * s_C_l, mask=mask_t, other=0.0).to(tl.float32)
            a = tl.where(starts, 0.0, tl.exp2(dt * A2_n[:, None]))
            a_cum, b_cum = tl.associative_scan((a, dtu * B_n[None, :]), 1, _first_order)
            is_n = (offs_n == n)[None, :]
            h_n = tl.sum(tl.where(is_n, h, 0.0), axis=1)
            hs = a_cum * h_n[:, None] + b_cum
            y += hs * C_n[None, :]
            # Padded steps have a = 1 and b = 0, so the last column is the state after the chunk.
            h_last = tl.sum(tl.where((offs_t == CHUNK - 1)[None, :], hs, 0.0), axis=1)
            h_next = tl.where(is_n, h_last[:, None], h_next)
        h = h_next
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
):  # fmt: skip
    """Gradients of one (batch row, group, channel block).

    dA, dD, ddelta_bias are per-batch partial sums (batch, dim, ...) that the caller reduces; dB, dC (batch, groups,
    dstate, seqlen) fp32 must start at zero: every channel block adds its share atomically.
    """
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
    B_base = b64 * s_B_b + pid_g * s_B_g
    C_base = b64 * s_C_b + pid_g * s_C_g
    bc_base = ((pid_b * groups + pid_g) * dstate).to(tl.int64) * seqlen  # dB, dC: contiguous fp32
    chunk_offs = (pid_b * dim + d).to(tl.int64)[:, None] * nchunks * dstate + offs_n[None, :]
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    for i in range(nchunks):
        c = nchunks - 1 - i
        h0 = tl.load(chunk_states_ptr + chunk_offs + c * dstate, mask=mask_dn, other=0.0)
        t = c * CHUNK + offs_t
        mask_t = t < seqlen
        t64 = t.to(tl.int64)
        io_mask = mask_d[:, None] & mask_t[None, :]
        u = tl.load(u_ptr + u_row[:, None] + t64[None, :] * s_u_l, mask=io_mask, other=0.0).to(tl.float32)
        dt_offs = dt_row[:, None] + t64[None, :] * s_dt_l
        dt, dt_raw = _load_dt(delta_ptr, dt_offs, io_mask, bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        starts = _doc_start(seq_ptr, t, seqlen, HAS_SEQ_IDX)[None, :]
        # a_{t+1}: the next step's decay (1 past the end, so the last step receives dlast unchanged).
        next_mask = mask_d[:, None] & (t + 1 < seqlen)[None, :]
        dt_next, _ = _load_dt(delta_ptr, dt_offs + s_dt_l, next_mask, bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        starts_next = _doc_start(seq_ptr, t + 1, seqlen, HAS_SEQ_IDX)[None, :]
        dtu = dt * u
        dout = tl.load(dout_ptr + g_row[:, None] + t64[None, :] * s_g_l, mask=io_mask, other=0.0).to(tl.float32)
        dy = dout
        if HAS_Z:
            z = tl.load(z_ptr + z_row[:, None] + t64[None, :] * s_z_l, mask=io_mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            dy = dout * z * sig

        y = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)
        dhB = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # sum_n dh * B
        ddt_decay = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # sum_n d loss / d (dt * A_n) * A_n
        dh_next = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for n in range(dstate):
            A_n = tl.load(A_ptr + d * dstate + n, mask=mask_d, other=0.0).to(tl.float32)
            B_n = tl.load(B_ptr + B_base + n * s_B_n + t64 * s_B_l, mask=mask_t, other=0.0).to(tl.float32)
            C_n = tl.load(C_ptr + C_base + n * s_C_n + t64 * s_C_l, mask=mask_t, other=0.0).to(tl.float32)
            is_n = (offs_n == n)[None, :]
            # Recompute the chunk's states for this n.
            a = tl.where(starts, 0.0, tl.exp2(dt * (A_n * LOG2E)[:, None]))
            b = dtu * B_n[None, :]
            a_cum, b_cum = tl.associative_scan((a, b), 1, _first_order)
            hs = a_cum * tl.sum(tl.where(is_n, h0, 0.0), axis=1)[:, None] + b_cum
            if HAS_Z:
                y += hs * C_n[None, :]
            # Adjoint: dh_t = C_t * dy_t + a_{t+1} * dh_{t+1}, a reverse scan seeded with the next chunk's dh.
            a_next = tl.where(starts_next, 0.0, tl.exp2(dt_next * (A_n * LOG2E)[:, None]))
            a_rev, dy_rev = tl.associative_scan((a_next, dy * C_n[None, :]), 1, _first_order, reverse=True)
            dhs = dy_rev + a_rev * tl.sum(tl.where(is_n, dh, 0.0), axis=1)[:, None]
            dh_first = tl.sum(tl.where((offs_t == 0)[None, :], dhs, 0.0), axis=1)
            dh_next = tl.where(is_n, dh_first[:, None], dh_next)

            # Channel blocks of a group share B and C: their gradients meet in fp32 atomics.
            bc_offs = bc_base + n * seqlen + t
            tl.atomic_add(dC_ptr + bc_offs, tl.sum(dy * hs, axis=0), mask=mask_t, sem="relaxed")
            tl.atomic_add(dB_ptr + bc_offs, tl.sum(dhs * dtu, axis=0), mask=mask_t, sem="relaxed")
            dhB += dhs * B_n[None, :]
            # d loss / d (dt * A) = dh_t * a_t * h_{t-1} = dh_t * (h_t - b_t): no need for the previous state.
            dA_term = tl.where(mask_t[None, :], dhs * (hs - b), 0.0)
            ddt_decay += dA_term * A_n[:, None]
            dA_n = tl.sum(dA_term * dt, axis=1)
            dA_acc = tl.where(is_n, dA_acc + dA_n[:, None], dA_acc)
        dh = dh_next

        if HAS_Z:
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
        ddt_ptrs = ddelta_ptr + ddt_row[:, None] + t64[None, :] * s_ddt_l
        tl.store(ddt_ptrs, ddt.to(ddelta_ptr.dtype.element_ty), mask=io_mask)

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
