"""Triton kernels of the Mamba1 selective scan, forward and backward.

One program owns (one batch row, one group, BLOCK_D channels of that group) and walks the sequence in chunks of
CHUNK steps. Inside a chunk it loops over the state index n; for each, the recurrence h_t = a_t * h_{t-1} + b_t over
a (BLOCK_D, CHUNK) tile is one ``tl.associative_scan`` on pairs (a, b) along time, so every load and store is a
coalesced (rows, CHUNK) tile, no step waits on the previous one's memory latency, and registers stay bounded for long
chunks. The fp32 state passes from chunk to chunk through a small two-half buffer in global memory (written by the
lanes that hold the chunk's edge, read by all after a barrier). The forward keeps the state entering each of the
backward's chunks (SAVE_EVERY of its own, which may be shorter); the backward walks its chunks last to first,
recomputes each chunk's states from that, and runs the adjoint dh_t = C_t * dy_t + a_{t+1} * dh_{t+1} as a reverse
scan.

Every (batch, dim, seqlen) tensor (u, delta, z, out, dout, du, ddelta, dz) and B, C (batch, groups, dstate, seqlen)
is addressed through its own strides (``api.py`` hands them over time-contiguous: strided time axes were measured 3x
slower); A is (dim, dstate) contiguous. Channel d of group g is g * P + p with P = dim // groups. Everything
is computed in fp32 and cast on store.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


# Inline PTX for the backward's adjoint at its GPU tiling (one warp, one channel, 256 steps: 8 consecutive steps per
# lane). ``pack=8`` hands each lane's 8 registers of a (1, 256) tile to one asm block in time order; outputs come
# first, then each input's 8 registers. Triton lowers a reverse ``tl.associative_scan`` by reversing the lanes of its
# inputs and outputs (32 shuffles per state index on top of the scan's own) and needs a_{t+1} as a second tile (a
# second exponential per step). This block scans in-lane backwards, then over lanes with ``shfl.down``, takes a_{t+1}
# from the neighbouring lane's a_t, and has lane 0 store the adjoint at the tile's first step for the previous chunk.
# The lane's position comes from the time offsets ($48: 8 * lane), not from %laneid: that special-register read sat
# on the dependency chain of every state index and made the first version slower than Triton's scan
# (docs/benchmarks.md, 2026-12-03).
#   $0-$7 dh (out); $8-$15 a_t; $16-$23 c_t = C_t * dy_t; $24-$31 a past the tile's end; $32-$39 dh past the end;
#   $40-$47 the address for dh at the first step; $48-$55 the time offsets 0..255.
def _adjoint_ptx() -> str:
    """The block's text: A_r, B_r hold the in-lane suffix (the map from the adjoint past the lane's last step to the one
    at its step r), (sa, sb) the suffix over lanes, e the adjoint entering the lane from its right."""
    in_lane = [
        f"fma.rn.f32 B{r}, ${9 + r}, B{r + 1}, ${16 + r};\nmul.f32 A{r}, ${9 + r}, A{r + 1};" for r in range(6, -1, -1)
    ]
    over_lanes = [
        f"shfl.sync.down.b32 ta|ok, sa, {d}, 31, -1;\nshfl.sync.down.b32 tb, sb, {d}, 31, -1;\n"
        "@ok fma.rn.f32 sb, sa, tb, sb;\n@ok mul.f32 sa, sa, ta;"
        for d in (1, 2, 4, 8, 16)
    ]
    lines = [
        "{",
        ".reg .f32 A<8>, B<8>, sa, sb, ta, tb, x, e;",
        ".reg .pred last, ok, first, apart;",
        ".reg .u32 span;",
        "sub.u32 span, $55, $48;",  # a lane's 8 values are consecutive steps, or the kernel stops (api._use_asm)
        "setp.ne.u32 apart, span, 7;",
        "@apart trap;",
        "setp.eq.u32 last, $48, 248;",
        "setp.eq.u32 first, $48, 0;",
        "shfl.sync.down.b32 x, $8, 1, 31, -1;",  # a_{t+1} at the lane's last step: the next lane's first a
        "selp.f32 A7, $24, x, last;",
        "mov.f32 B7, $23;",
        *in_lane,
        "mov.f32 sa, A0;",
        "mov.f32 sb, B0;",
        *over_lanes,
        "shfl.sync.down.b32 ta|ok, sa, 1, 31, -1;",  # exclusive: the suffix of the lanes to the right
        "shfl.sync.down.b32 tb, sb, 1, 31, -1;",
        "fma.rn.f32 e, ta, $32, tb;",
        "selp.f32 e, e, $32, ok;",
        *(f"fma.rn.f32 ${r}, A{r}, e, B{r};" for r in range(8)),
        "@first st.global.f32 [$40], $0;",
        "}",
    ]
    return "\n".join(lines)


_ADJOINT_PTX = tl.constexpr(_adjoint_ptx())
_ADJOINT_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 8 + ["f"] * 32 + ["l"] * 8 + ["r"] * 8))


@triton.jit
def _adjoint_asm(a, c, a_edge, dh_seed, dh_first_ptr, offs):
    """dh_t = c_t + a_{t+1} * dh_{t+1} over a (1, 256) tile, seeded with dh_seed one step past the end, where a_{t+1}
    past the tile's last step is a_edge. Lane 0 also stores dh at the tile's first step to dh_first_ptr."""
    return tl.inline_asm_elementwise(
        _ADJOINT_PTX,
        _ADJOINT_CONSTRAINTS,
        [a, c, a_edge, dh_seed, dh_first_ptr, offs],
        dtype=tl.float32,
        is_pure=False,
        pack=8,
    )


@triton.jit
def _store_where(ptrs, values, keep):
    """``@keep st.global.f32 [ptrs], values`` per element, in the values' own register layout (GPU only).

    The forward stores a chunk's last state through a tile whose addresses repeat along each row (every step of a row
    points at the same slot, only the last is kept). Given to ``tl.store`` with a mask, Triton assigns that store a
    layout of its own and moves the tile into it through shared memory, with a barrier per state index; here each
    element is stored where it is. ``keep`` is checked per element, so the result does not depend on how the compiler
    lays out the tile (where it can prove an element never kept, the store is compiled away)."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p st.global.f32 [$3], $1; mov.u32 $0, 0; }",
        "=r,f,r,l",
        [values, keep, ptrs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _softplus(x, PTX: tl.constexpr):
    # log1p(exp(x)) written with exp2/log2; above 20 softplus(x) == x in fp32, and exp would overflow.
    return tl.where(x > 20.0, x, _log2(1.0 + tl.exp2(x * 1.4426950408889634), PTX) * 0.6931471805599453)


@triton.jit
def _log2(x, PTX: tl.constexpr):
    """log2 of x > 0. ``tl.log2`` compiles to libdevice's accurate log2 (about 12 FMAs after range reduction); with PTX
    (GPU only) it is the SFU's ``lg2.approx`` (relative error ~2^-22), one instruction."""
    if PTX:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _sigmoid(x, PTX: tl.constexpr):
    """1 / (1 + exp(-x)); with PTX (GPU only) the reciprocal is the SFU's ``rcp.approx.ftz`` (1 ulp; 0 where the exact
    value is below 2^-126) instead of ``tl.sigmoid``'s full-range division."""
    if PTX:
        e = tl.exp2(x * -1.4426950408889634)
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.sigmoid(x)


@triton.jit
def _silu(z, PTX: tl.constexpr):
    """z * sigmoid(z). ``tl.sigmoid`` divides with ``div.full`` (a reciprocal and a correction); with PTX (GPU only)
    ``div.approx`` (2 ulp; 0 once 1 + exp(-z) passes 2^126, where the exact value is below 2^-126 * |z|)."""
    e = tl.exp2(z * -1.4426950408889634)
    if PTX:
        return tl.inline_asm_elementwise(
            "div.approx.f32 $0, $1, $2;", "=f,f,f", [z, 1.0 + e], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return z / (1.0 + e)


@triton.jit
def _first_order(a1, b1, a2, b2):
    """Compose h -> a1 * h + b1, then h -> a2 * h + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _load_dt(ptrs, mask, bias, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr, PTX: tl.constexpr):
    """dt (and the pre-softplus value) at ptrs; zero where masked, so that a = 1 and b = 0 there."""
    raw = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        raw += bias[:, None]
    dt = raw
    if DELTA_SOFTPLUS:
        dt = _softplus(raw, PTX)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _doc_start(seq_ptr, t, seqlen, HAS_SEQ_IDX: tl.constexpr):
    """(CHUNK,) whether a document starts at t (its state must not see the previous token's); never without seq_idx."""
    if HAS_SEQ_IDX:
        in_seq = (t > 0) & (t < seqlen)
        doc = tl.load(seq_ptr + t, mask=in_seq, other=0)
        prev = tl.load(seq_ptr + t - 1, mask=in_seq, other=0)
        return doc != prev
    else:
        return t < 0


@triton.jit
def _decay(x2, starts, HAS_SEQ_IDX: tl.constexpr):
    """2^x2, zero where a document starts. Without seq_idx there is no select at all (``starts`` is then unused and
    compiled away): a select per element and state index the compiler cannot drop by itself."""
    a = tl.exp2(x2)
    if HAS_SEQ_IDX:
        a = tl.where(starts, 0.0, a)
    return a


@triton.jit
def _bcast_rows(ptr, offs_t, mask, BLOCK_D: tl.constexpr):
    """A (CHUNK,) row shared by every channel, loaded straight into the (BLOCK_D, CHUNK) tile layout.

    Every row reads the same addresses (one transaction per warp), which costs less than loading a (CHUNK,) vector and
    moving it into the tile's layout through shared memory once per state index.
    Returned in the tensor's own dtype: a load issued one state index ahead holds half the registers that way.
    """
    rows = tl.zeros((BLOCK_D,), dtype=tl.int32)
    return tl.load(ptr + rows[:, None] + offs_t[None, :], mask=mask, other=0.0)


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
    h_buf_ptr,
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
    SAVE_EVERY: tl.constexpr,
    PTX: tl.constexpr,
):  # fmt: skip
    """chunk_states (batch, dim, cdiv(nchunks, SAVE_EVERY), dstate) fp32 receives the state entering every
    SAVE_EVERY-th chunk (the backward's chunks), last_state (batch, dim, dstate) the final one. The state passes from
    one chunk to the next through h_buf (2, batch, dim, dstate) fp32: stored by the lanes that hold the chunk's last
    step, read back by all of them after a barrier, in two halves so that no lane overwrites a value another lane
    of the same chunk still has to read. PTX (GPU only) stores those states with :func:`_store_where` and takes
    softplus' log2 and the gate's division from the SFU's approximations (:func:`_log2`, :func:`_silu`)."""
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
    nstates = tl.cdiv(nchunks, SAVE_EVERY)
    cs_row = chunk_states_ptr + (pid_b * dim + d).to(tl.int64) * nstates * dstate  # (BLOCK_D,) pointers
    state_offs = (pid_b * dim + d)[:, None] * dstate + offs_n[None, :]
    half = dim.to(tl.int64) * dstate * tl.num_programs(0)
    hbuf_row = h_buf_ptr + (pid_b * dim + d) * dstate  # chunk c reads half c % 2 and writes the other
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    tl.store(cs_row[:, None] + offs_n[None, :], h, mask=mask_dn)
    tl.store(hbuf_row[:, None] + offs_n[None, :], h, mask=mask_dn)
    tl.debug_barrier()

    b64 = pid_b.to(tl.int64)
    d64 = d.to(tl.int64)
    u_row = u_ptr + b64 * s_u_b + d64 * s_u_d  # (BLOCK_D,) pointers
    dt_row = delta_ptr + b64 * s_dt_b + d64 * s_dt_d
    if HAS_Z:
        z_row = z_ptr + b64 * s_z_b + d64 * s_z_d
    o_row = out_ptr + b64 * s_o_b + d64 * s_o_d
    B_bg = B_ptr + b64 * s_B_b + pid_g * s_B_g  # B[b, g, 0, 0]
    C_bg = C_ptr + b64 * s_C_b + pid_g * s_C_g
    A_row = A_ptr + d * dstate
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    keep_last = (mask_d[:, None] & (offs_t == CHUNK - 1)[None, :]).to(tl.int32)
    for c in range(nchunks):
        t = c * CHUNK + offs_t
        mask_t = t < seqlen
        io_mask = mask_d[:, None] & mask_t[None, :]
        dt, _ = _load_dt(dt_row[:, None] + t[None, :] * s_dt_l, io_mask, bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS, PTX)
        u = tl.load(u_row[:, None] + t[None, :] * s_u_l, mask=io_mask, other=0.0).to(tl.float32)
        starts = _doc_start(seq_ptr, t, seqlen, HAS_SEQ_IDX)[None, :]
        dtu = dt * u
        y = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)
        h_here = hbuf_row + (c % 2) * half
        h_next = hbuf_row + ((c + 1) % 2) * half
        # One state index at a time: (BLOCK_D, CHUNK) tiles keep registers low enough for long chunks. B and C of
        # the next state index are loaded one iteration ahead, so their latency hides behind this one's scan.
        B_next = _bcast_rows(B_bg, t * s_B_l, io_mask, BLOCK_D)
        C_next = _bcast_rows(C_bg, t * s_C_l, io_mask, BLOCK_D)
        for n in range(dstate):
            A2_n = tl.load(A_row + n, mask=mask_d, other=0.0).to(tl.float32) * LOG2E
            B_n = B_next.to(tl.float32)
            C_n = C_next.to(tl.float32)
            n_next = (n + 1) % dstate  # the last iteration reloads row 0 (an L1 hit) rather than branch
            B_next = _bcast_rows(B_bg + n_next * s_B_n, t * s_B_l, io_mask, BLOCK_D)
            C_next = _bcast_rows(C_bg + n_next * s_C_n, t * s_C_l, io_mask, BLOCK_D)
            a = _decay(dt * A2_n[:, None], starts, HAS_SEQ_IDX)
            h_n = tl.load(h_here + n, mask=mask_d, other=0.0)
            a_cum, b_cum = tl.associative_scan((a, dtu * B_n), 1, _first_order)
            hs = a_cum * h_n[:, None] + b_cum
            # Padded steps have a = 1 and b = 0, so the last column is the state after the chunk. Only the lanes
            # holding the last step store; a tile store is cheaper than reducing the tile to it.
            if PTX:
                _store_where((h_next[:, None] + n + offs_t[None, :] * 0).to(tl.int64), hs, keep_last)
            else:
                tl.store(h_next[:, None] + n + offs_t[None, :] * 0, hs, mask=keep_last != 0)
            y += hs * C_n
        tl.debug_barrier()  # the states just stored are read by other lanes in the next chunk
        # The backward reads the state entering each of its chunks, SAVE_EVERY of ours: copied from the state buffer
        # once per such chunk (a masked tile store per state index cost more, measured on an H200).
        if ((c + 1) % SAVE_EVERY == 0) & (c + 1 < nchunks):
            h = tl.load(h_next[:, None] + offs_n[None, :], mask=mask_dn, other=0.0)
            tl.store(cs_row[:, None] + ((c + 1) // SAVE_EVERY) * dstate + offs_n[None, :], h, mask=mask_dn)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            z = tl.load(z_row[:, None] + t[None, :] * s_z_l, mask=io_mask, other=0.0).to(tl.float32)
            y *= _silu(z, PTX)
        tl.store(o_row[:, None] + t[None, :] * s_o_l, y.to(out_ptr.dtype.element_ty), mask=io_mask)
    h = tl.load(hbuf_row[:, None] + (nchunks % 2) * half + offs_n[None, :], mask=mask_dn, other=0.0)
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
    dh_buf_ptr,
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
    USE_ASM: tl.constexpr,
    PTX: tl.constexpr,
):  # fmt: skip
    """Gradients of one (batch row, group, channel block).

    dA, dD, ddelta_bias are per-batch partial sums (batch, dim, ...) that the caller reduces; dB, dC (batch, groups,
    dstate, seqlen) fp32 must start at zero: every channel block adds its share atomically. dh_buf (2, batch, dim,
    dstate) fp32 is scratch: the adjoint state passes between chunks through it as the state does in the forward,
    in two halves so that no lane overwrites a value another lane of the same chunk still has to read.
    Values that are cheap to load again (u, z, dout, the pre-softplus dt) are reloaded after the loop over state
    indices instead of being held in registers across it.
    USE_ASM (GPU only: one warp, BLOCK_D 1, CHUNK 256, 16-bit inputs so that each lane holds 8 consecutive steps,
    seqlen a multiple of 8) runs the adjoint scan as the inline PTX above; a_{t+1} is then a
    neighbour's a_t (one shuffle) instead of a second exponential of a second dt tile. PTX (GPU only) takes softplus'
    log2 and the sigmoids from the SFU, as in the forward (so the recomputed dt is the forward's).
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

    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    state_offs = (pid_b * dim + d)[:, None] * dstate + offs_n[None, :]
    half = dim.to(tl.int64) * dstate * tl.num_programs(0)
    dh_row = dh_buf_ptr + (pid_b * dim + d) * dstate  # (BLOCK_D,) pointers into the first half
    # The adjoint of the state entering the chunk after the current one; chunk c reads half (c + 1) % 2.
    if HAS_DLAST:
        dh = tl.load(dlast_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        dh = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    tl.store(dh_row[:, None] + (nchunks % 2) * half + offs_n[None, :], dh, mask=mask_dn)
    tl.debug_barrier()
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    b64 = pid_b.to(tl.int64)
    d64 = d.to(tl.int64)
    u_row = u_ptr + b64 * s_u_b + d64 * s_u_d
    dt_row = delta_ptr + b64 * s_dt_b + d64 * s_dt_d
    if HAS_Z:
        z_row = z_ptr + b64 * s_z_b + d64 * s_z_d
        dz_row = dz_ptr + b64 * s_dz_b + d64 * s_dz_d
    g_row = dout_ptr + b64 * s_g_b + d64 * s_g_d
    du_row = du_ptr + b64 * s_du_b + d64 * s_du_d
    ddt_row = ddelta_ptr + b64 * s_ddt_b + d64 * s_ddt_d
    B_bg = B_ptr + b64 * s_B_b + pid_g * s_B_g
    C_bg = C_ptr + b64 * s_C_b + pid_g * s_C_g
    bc_base = ((pid_b * groups + pid_g) * dstate).to(tl.int64) * seqlen  # dB, dC: contiguous fp32
    dB_bg = dB_ptr + bc_base
    dC_bg = dC_ptr + bc_base
    A_row = A_ptr + d * dstate
    cs_row = chunk_states_ptr + (pid_b * dim + d).to(tl.int64) * nchunks * dstate
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    is_first = (offs_t == 0)[None, :]
    for i in range(nchunks):
        c = nchunks - 1 - i
        t = c * CHUNK + offs_t
        mask_t = t < seqlen
        io_mask = mask_d[:, None] & mask_t[None, :]
        dt_ptrs = dt_row[:, None] + t[None, :] * s_dt_l
        dt, _ = _load_dt(dt_ptrs, io_mask, bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS, PTX)
        starts = _doc_start(seq_ptr, t, seqlen, HAS_SEQ_IDX)[None, :]
        if USE_ASM:
            # dt at the next chunk's first step (0 past the end, so the last step receives dlast unchanged).
            t_edge = (c + 1) * CHUNK + tl.zeros((1,), dtype=tl.int32)
            edge_mask = mask_d[:, None] & (t_edge < seqlen)[None, :]
            dt_edge, _ = _load_dt(dt_row[:, None] + t_edge[None, :] * s_dt_l, edge_mask, bias, HAS_DELTA_BIAS,
                                  DELTA_SOFTPLUS, PTX)  # fmt: skip
            starts_edge = _doc_start(seq_ptr, t_edge, seqlen, HAS_SEQ_IDX)[None, :]
        else:
            # a_{t+1}: the next step's decay (1 past the end, so the last step receives dlast unchanged).
            next_mask = mask_d[:, None] & (t + 1 < seqlen)[None, :]
            dt_next, _ = _load_dt(dt_ptrs + s_dt_l, next_mask, bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS, PTX)
            starts_next = _doc_start(seq_ptr, t + 1, seqlen, HAS_SEQ_IDX)[None, :]
        u = tl.load(u_row[:, None] + t[None, :] * s_u_l, mask=io_mask, other=0.0).to(tl.float32)
        dtu = dt * u
        dy = tl.load(g_row[:, None] + t[None, :] * s_g_l, mask=io_mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_row[:, None] + t[None, :] * s_z_l, mask=io_mask, other=0.0).to(tl.float32)
            dy *= z * _sigmoid(z, PTX)

        y = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)
        dhB = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # sum_n dh * B
        ddt_decay = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # sum_n d loss / d (dt * A_n) * A_n
        h_here = cs_row + c * dstate
        dh_in = dh_row + ((c + 1) % 2) * half
        dh_out = dh_row + (c % 2) * half
        # Everything a state index reads (B, C, A, the chunk's entering state and adjoint) is loaded one index
        # ahead, as in the forward.
        B_next = _bcast_rows(B_bg, t * s_B_l, io_mask, BLOCK_D)
        C_next = _bcast_rows(C_bg, t * s_C_l, io_mask, BLOCK_D)
        A_next = tl.load(A_row, mask=mask_d, other=0.0).to(tl.float32)
        h_next = tl.load(h_here, mask=mask_d, other=0.0)
        dh_next = tl.load(dh_in, mask=mask_d, other=0.0)
        for n in range(dstate):
            A_n, h_n, dh_n = A_next, h_next, dh_next
            B_n = B_next.to(tl.float32)
            C_n = C_next.to(tl.float32)
            n_next = (n + 1) % dstate  # the last iteration reloads index 0 (L1 hits) rather than branch
            B_next = _bcast_rows(B_bg + n_next * s_B_n, t * s_B_l, io_mask, BLOCK_D)
            C_next = _bcast_rows(C_bg + n_next * s_C_n, t * s_C_l, io_mask, BLOCK_D)
            A_next = tl.load(A_row + n_next, mask=mask_d, other=0.0).to(tl.float32)
            h_next = tl.load(h_here + n_next, mask=mask_d, other=0.0)
            dh_next = tl.load(dh_in + n_next, mask=mask_d, other=0.0)
            # Recompute the chunk's states for this n.
            a = _decay(dt * (A_n * LOG2E)[:, None], starts, HAS_SEQ_IDX)
            b = dtu * B_n
            a_cum, b_cum = tl.associative_scan((a, b), 1, _first_order)
            hs = a_cum * h_n[:, None] + b_cum
            if HAS_Z:
                y += hs * C_n
            # Adjoint: dh_t = C_t * dy_t + a_{t+1} * dh_{t+1}, a reverse scan seeded with the next chunk's dh; the
            # adjoint at the chunk's first step is handed to the previous chunk. Channel blocks of a group share B
            # and C: their gradients meet in fp32 atomics.
            if USE_ASM:
                a_edge = _decay(dt_edge * (A_n * LOG2E)[:, None], starts_edge, HAS_SEQ_IDX)
                dhs = _adjoint_asm(a, dy * C_n, a_edge, dh_n[:, None], (dh_out + n).to(tl.int64), offs_t[None, :])
            else:
                a_next = _decay(dt_next * (A_n * LOG2E)[:, None], starts_next, HAS_SEQ_IDX)
                a_rev, dy_rev = tl.associative_scan((a_next, dy * C_n), 1, _first_order, reverse=True)
                dhs = dy_rev + a_rev * dh_n[:, None]
                tl.store(dh_out + n, tl.sum(tl.where(is_first, dhs, 0.0), axis=1), mask=mask_d)
            bc_offs = n * seqlen + t
            tl.atomic_add(dC_bg + bc_offs, tl.sum(dy * hs, axis=0), mask=mask_t, sem="relaxed")
            tl.atomic_add(dB_bg + bc_offs, tl.sum(dhs * dtu, axis=0), mask=mask_t, sem="relaxed")
            dhB += dhs * B_n
            # d loss / d (dt * A) = dh_t * a_t * h_{t-1} = dh_t * (h_t - b_t): no need for the previous state.
            # Padded steps contribute nothing: there dt = 0 and their ddelta is never stored.
            dA_term = dhs * (hs - b)
            ddt_decay += dA_term * A_n[:, None]
            dA_n = tl.sum(dA_term * dt, axis=1)
            dA_acc = tl.where((offs_n == n)[None, :], dA_acc + dA_n[:, None], dA_acc)
        tl.debug_barrier()  # the adjoint states just stored are read by other lanes in the next chunk

        u = tl.load(u_row[:, None] + t[None, :] * s_u_l, mask=io_mask, other=0.0).to(tl.float32)
        dout = tl.load(g_row[:, None] + t[None, :] * s_g_l, mask=io_mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_row[:, None] + t[None, :] * s_z_l, mask=io_mask, other=0.0).to(tl.float32)
            sig = _sigmoid(z, PTX)
            if HAS_D:
                y += Dv[:, None] * u
            dz = dout * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_row[:, None] + t[None, :] * s_dz_l, dz.to(dz_ptr.dtype.element_ty), mask=io_mask)
            dy = dout * z * sig
        du = dhB * dt
        if HAS_D:
            du += dy * Dv[:, None]
            dD_acc += tl.sum(dy * u, axis=1)
        ddt = dhB * u + ddt_decay
        if DELTA_SOFTPLUS:
            _, dt_raw = _load_dt(dt_row[:, None] + t[None, :] * s_dt_l, io_mask, bias, HAS_DELTA_BIAS, False, PTX)
            ddt = ddt * _sigmoid(dt_raw, PTX)
        ddt = tl.where(io_mask, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_row[:, None] + t[None, :] * s_du_l, du.to(du_ptr.dtype.element_ty), mask=io_mask)
        tl.store(ddt_row[:, None] + t[None, :] * s_ddt_l, ddt.to(ddelta_ptr.dtype.element_ty), mask=io_mask)

    # The initial state reaches step 0 through a_0.
    A2 = tl.load(A_ptr + d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
    dt0, _ = _load_dt(dt_row[:, None] + offs_t[None, :] * s_dt_l, mask_d[:, None] & (offs_t == 0)[None, :], bias,
                      HAS_DELTA_BIAS, DELTA_SOFTPLUS, PTX)  # fmt: skip
    a0 = tl.exp2(tl.sum(dt0, axis=1)[:, None] * A2)
    dh = tl.load(dh_row[:, None] + offs_n[None, :], mask=mask_dn, other=0.0)  # chunk 0 wrote the first half
    tl.store(dh0_ptr + state_offs, dh * a0, mask=mask_dn)
    tl.store(dA_ptr + state_offs, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + d, dD_acc, mask=mask_d)
    if HAS_DELTA_BIAS:
        tl.store(ddelta_bias_ptr + pid_b * dim + d, dbias_acc, mask=mask_d)
