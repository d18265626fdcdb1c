"""Triton kernels of the causal depthwise conv1d: forward, backward and the one-token update.

x, out, dout and dx: (batch, dim, seqlen), each addressed through its own strides (row
offsets b * stride_b + d * stride_d, then position * stride_l), so a channel-last view such as the xBC slice of
Mamba2's in_proj output is read in place; weight (dim, WIDTH); initial_states (batch, dim, WIDTH - 1) contiguous;
seq_idx (batch, seqlen). A program owns a (BLOCK_D channels, BLOCK_L positions) tile. Position p < 0 reads
initial_states[..., WIDTH - 1 + p]. A tap from s to t counts iff seq_idx is constant on [s, t], with seq_idx[p < 0]
taken as seq_idx[0] (initial states belong to the first document).

Two forward kernels: _conv_fwd_kernel reads each tap as a shifted load, which is aligned (vectorised, an L1 hit)
when positions are rows of a channel-last tensor; _conv_fwd_slots_kernel loads only aligned tiles and shifts by
register renaming (below), which is what a time-contiguous tensor needs: there a tap shifted by one position is a
misaligned load that Triton splits into one 2-byte load per element, and the kernel turns L1-bound.

The backward (_conv_bwd_slots_kernel, every layout) is one pass over x and dout; nothing but x is saved. It recomputes
the pre-activation and g = d loss / d pre-activation (dout times SiLU's derivative; dout itself without SiLU) at its
own positions, which give the tile's weight and bias gradients, and at the WIDTH - 1 positions after the tile, and
gathers dx[s] = sum_j weight[WIDTH - 1 - j] * g[s + j] in registers. Nothing is written to memory but dx and the
per-tile weight/bias partial sums.
"""

import triton
import triton.language as tl


@triton.jit
def _load_x(x_ptr, init_ptr, row, init_row, pos, s_l, seqlen, mask_d, HAS_INIT: tl.constexpr, WIDTH: tl.constexpr):
    """x at positions pos (BLOCK_L,) for rows (BLOCK_D,), from initial_states where pos < 0; zero elsewhere."""
    in_x = (pos >= 0) & (pos < seqlen)
    val = tl.load(x_ptr + row[:, None] + pos[None, :] * s_l, mask=mask_d[:, None] & in_x[None, :], other=0.0)
    val = val.to(tl.float32)
    if HAS_INIT:
        in_init = (pos < 0) & (pos >= 1 - WIDTH)
        init = tl.load(
            init_ptr + init_row[:, None] + (pos + WIDTH - 1)[None, :],
            mask=mask_d[:, None] & in_init[None, :],
            other=0.0,
        )
        val += init.to(tl.float32)
    return val


@triton.jit
def _same_doc(seq_ptr, pos, span: tl.constexpr, seqlen):
    """Whether seq_idx is constant on [pos, pos + span] (BLOCK_L,), positions clamped into [0, seqlen)."""
    ok = pos == pos
    for i in tl.static_range(span):
        a = tl.load(seq_ptr + tl.minimum(tl.maximum(pos + i, 0), seqlen - 1))
        b = tl.load(seq_ptr + tl.minimum(tl.maximum(pos + i + 1, 0), seqlen - 1))
        ok = ok & (a == b)
    return ok


@triton.jit
def _pre_activation(
    x_ptr,
    init_ptr,
    w_ptr,
    bias_ptr,
    seq_ptr,
    row,
    init_row,
    d,
    t,
    s_l,
    seqlen,
    mask_d,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    WIDTH: tl.constexpr,
):
    """bias + sum_k weight[:, k] * x[t - (WIDTH - 1) + k] over valid taps: (BLOCK_D, BLOCK_L) fp32."""
    acc = tl.zeros((row.shape[0], t.shape[0]), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(WIDTH):
        s = t - (WIDTH - 1 - k)
        xs = _load_x(x_ptr, init_ptr, row, init_row, s, s_l, seqlen, mask_d, HAS_INIT, WIDTH)
        if HAS_SEQ_IDX:
            xs = tl.where(_same_doc(seq_ptr, s, WIDTH - 1 - k, seqlen)[None, :], xs, 0.0)
        w = tl.load(w_ptr + d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += w[:, None] * xs
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    init_ptr,
    seq_idx_ptr,
    out_ptr,
    s_x_b, s_x_d, s_x_l,
    s_o_b, s_o_d, s_o_l,
    dim,
    seqlen,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    SILU: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = d < dim
    row = pid_b.to(tl.int64) * s_x_b + d.to(tl.int64) * s_x_d
    out_row = pid_b.to(tl.int64) * s_o_b + d.to(tl.int64) * s_o_d
    init_row = (pid_b * dim + d).to(tl.int64) * (WIDTH - 1)
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    y = _pre_activation(
        x_ptr, init_ptr, w_ptr, bias_ptr, seq_ptr, row, init_row, d, t, s_x_l, seqlen, mask_d,
        HAS_BIAS, HAS_INIT, HAS_SEQ_IDX, WIDTH,
    )  # fmt: skip
    if SILU:
        y = y * tl.sigmoid(y)
    mask = mask_d[:, None] & (t < seqlen)[None, :]
    tl.store(out_ptr + out_row[:, None] + t[None, :] * s_o_l, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pre_grad(
    x_ptr, init_ptr, w_ptr, bias_ptr, seq_ptr, dout_ptr, row, do_row, init_row, d, t, s_x_l, s_do_l, seqlen, mask_d,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr,
):  # fmt: skip
    """g = d loss / d pre-activation at positions t (BLOCK_L,) for rows (BLOCK_D,), fp32; zero outside [0, seqlen)."""
    mask = mask_d[:, None] & ((t >= 0) & (t < seqlen))[None, :]
    g = tl.load(dout_ptr + do_row[:, None] + t[None, :] * s_do_l, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        pre = _pre_activation(
            x_ptr, init_ptr, w_ptr, bias_ptr, seq_ptr, row, init_row, d, t, s_x_l, seqlen, mask_d,
            HAS_BIAS, HAS_INIT, HAS_SEQ_IDX, WIDTH,
        )  # fmt: skip
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _input_grad(
    x_ptr, init_ptr, w_ptr, bias_ptr, seq_ptr, dout_ptr, row, do_row, init_row, d, s, g0, s_x_l, s_do_l, seqlen,
    mask_d, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, SILU: tl.constexpr,
    WIDTH: tl.constexpr,
):  # fmt: skip
    """d loss / d input at positions s (BLOCK_D, BLOCK_L): input s feeds outputs s + j through tap WIDTH - 1 - j.
    g0 is g at s itself."""
    w = tl.load(w_ptr + d * WIDTH + (WIDTH - 1), mask=mask_d, other=0.0).to(tl.float32)
    dx = w[:, None] * g0
    for j in tl.static_range(1, WIDTH):
        g = _pre_grad(
            x_ptr, init_ptr, w_ptr, bias_ptr, seq_ptr, dout_ptr, row, do_row, init_row, d, s + j, s_x_l, s_do_l,
            seqlen, mask_d, HAS_BIAS, HAS_INIT, HAS_SEQ_IDX, SILU, WIDTH,
        )  # fmt: skip
        if HAS_SEQ_IDX:
            g = tl.where(_same_doc(seq_ptr, s, j, seqlen)[None, :], g, 0.0)
        w = tl.load(w_ptr + d * WIDTH + (WIDTH - 1 - j), mask=mask_d, other=0.0).to(tl.float32)
        dx += w[:, None] * g
    return dx


@triton.jit
def _conv_update_kernel(
    x_ptr,
    state_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    dim,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """One decoding step: state (batch, dim, WIDTH) <- [state[..., 1:], x]; out = act(bias + sum(weight * state))."""
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, BLOCK_W)
    mask_d = d < dim
    srow = (pid_b * dim + d).to(tl.int64) * WIDTH
    shifted = tl.load(
        state_ptr + srow[:, None] + (k + 1)[None, :], mask=mask_d[:, None] & (k < WIDTH - 1)[None, :], other=0.0
    ).to(tl.float32)
    x = tl.load(x_ptr + pid_b * dim + d, mask=mask_d, other=0.0).to(tl.float32)
    window = tl.where((k == WIDTH - 1)[None, :], x[:, None], shifted)
    mask_dk = mask_d[:, None] & (k < WIDTH)[None, :]
    w = tl.load(w_ptr + d[:, None] * WIDTH + k[None, :], mask=mask_dk, other=0.0).to(tl.float32)
    y = tl.sum(w * window, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(out_ptr + pid_b * dim + d, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    # Other threads of this program may still be reading the old state.
    tl.debug_barrier()
    tl.store(state_ptr + srow[:, None] + k[None, :], window.to(state_ptr.dtype.element_ty), mask=mask_dk)


# Slot kernels. A program loads its tile and the tiles 8 positions before and after it (aligned, L1 hits) and splits
# each into 8 "slots": slot v holds positions t0 + 8m + v (m < BLOCK_L / 8), all in one thread's registers. A tap
# shifted by k reads slot v - k of the same tile, or slot v - k + 8 of the tile before: register renaming. On a
# channel-last tensor the split costs one pass through shared memory (Triton converts the layout), still cheaper in the
# backward than the WIDTH x WIDTH shifted loads it replaces.


@triton.jit
def _split8(x, R: tl.constexpr, M: tl.constexpr):
    """(R, 8M) -> 8 tensors (R, M); slot v holds columns 8m + v."""
    x = tl.reshape(x, (R, M, 2, 2, 2))
    c0, c1 = tl.split(x)
    b00, b01 = tl.split(c0)
    b10, b11 = tl.split(c1)
    s0, s4 = tl.split(b00)
    s2, s6 = tl.split(b01)
    s1, s5 = tl.split(b10)
    s3, s7 = tl.split(b11)
    return s0, s1, s2, s3, s4, s5, s6, s7


@triton.jit
def _join8(s0, s1, s2, s3, s4, s5, s6, s7, R: tl.constexpr, M: tl.constexpr):
    """The inverse of :func:`_split8`."""
    k0 = tl.join(tl.join(s0, s4), tl.join(s2, s6))
    k1 = tl.join(tl.join(s1, s5), tl.join(s3, s7))
    return tl.reshape(tl.join(k0, k1), (R, M * 8))


@triton.jit
def _win(prev, cur, nxt, u: tl.constexpr):
    """Slot u in [-8, 16) of the window [prev | cur | next] of slot tuples."""
    if u < 0:
        return prev[u + 8]
    elif u < 8:
        return cur[u]
    else:
        return nxt[u - 8]


@triton.jit
def _same_doc_slots(sp, sc, sn, u0: tl.constexpr, u1: tl.constexpr):
    """Whether seq_idx is constant over slots u0 .. u1 (as (1, M) booleans)."""
    ok = _win(sp, sc, sn, u0) == _win(sp, sc, sn, u0)
    for i in tl.static_range(u0, u1):
        ok = ok & (_win(sp, sc, sn, i) == _win(sp, sc, sn, i + 1))
    return ok


@triton.jit
def _pre_slot(xp, xc, xn, sp, sc, sn, w_ptr, d, mask_d, bias, u: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
              WIDTH: tl.constexpr):  # fmt: skip
    """The pre-activation at slot u (R, M), fp32: bias + sum_k weight[:, k] * x[slot u - (WIDTH - 1 - k)]."""
    acc = bias
    for k in tl.static_range(WIDTH):
        xs = _win(xp, xc, xn, u - (WIDTH - 1 - k))
        if HAS_SEQ_IDX:
            xs = tl.where(_same_doc_slots(sp, sc, sn, u - (WIDTH - 1 - k), u), xs, 0.0)
        w = tl.load(w_ptr + d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += w[:, None] * xs
    return acc


@triton.jit
def _tile_slots(x_ptr, init_ptr, seq_ptr, row, init_row, t, s_l, seqlen, mask_d, HAS_INIT: tl.constexpr,
                HAS_SEQ_IDX: tl.constexpr, WIDTH: tl.constexpr, R: tl.constexpr, M: tl.constexpr):  # fmt: skip
    """x (fp32) and seq_idx at positions t, as slot tuples; seq_idx is clamped into [0, seqlen) like _same_doc."""
    xs = _split8(_load_x(x_ptr, init_ptr, row, init_row, t, s_l, seqlen, mask_d, HAS_INIT, WIDTH), R, M)
    if HAS_SEQ_IDX:
        ss = _split8(tl.load(seq_ptr + tl.minimum(tl.maximum(t, 0), seqlen - 1))[None, :], 1, M)  # (1, M) each
    else:
        ss = xs
    return xs, ss


@triton.jit
def _conv_fwd_slots_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    init_ptr,
    seq_idx_ptr,
    out_ptr,
    s_x_b, s_x_d, s_x_l,
    s_o_b, s_o_d, s_o_l,
    dim,
    seqlen,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    SILU: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    """:func:`_conv_fwd_kernel` from aligned tiles split into slots; needs WIDTH <= 9."""
    M: tl.constexpr = BLOCK_L // 8
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = d < dim
    row = pid_b.to(tl.int64) * s_x_b + d.to(tl.int64) * s_x_d
    init_row = (pid_b * dim + d).to(tl.int64) * (WIDTH - 1)
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    xc, sc = _tile_slots(x_ptr, init_ptr, seq_ptr, row, init_row, t, s_x_l, seqlen, mask_d, HAS_INIT, HAS_SEQ_IDX,
                         WIDTH, BLOCK_D, M)  # fmt: skip
    xp, sp = _tile_slots(x_ptr, init_ptr, seq_ptr, row, init_row, t - 8, s_x_l, seqlen, mask_d, HAS_INIT, HAS_SEQ_IDX,
                         WIDTH, BLOCK_D, M)  # fmt: skip
    bias = tl.zeros((BLOCK_D, M), dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    y0 = _pre_slot(xp, xc, xc, sp, sc, sc, w_ptr, d, mask_d, bias, 0, HAS_SEQ_IDX, WIDTH)
    y1 = _pre_slot(xp, xc, xc, sp, sc, sc, w_ptr, d, mask_d, bias, 1, HAS_SEQ_IDX, WIDTH)
    y2 = _pre_slot(xp, xc, xc, sp, sc, sc, w_ptr, d, mask_d, bias, 2, HAS_SEQ_IDX, WIDTH)
    y3 = _pre_slot(xp, xc, xc, sp, sc, sc, w_ptr, d, mask_d, bias, 3, HAS_SEQ_IDX, WIDTH)
    y4 = _pre_slot(xp, xc, xc, sp, sc, sc, w_ptr, d, mask_d, bias, 4, HAS_SEQ_IDX, WIDTH)
    y5 = _pre_slot(xp, xc, xc, sp, sc, sc, w_ptr, d, mask_d, bias, 5, HAS_SEQ_IDX, WIDTH)
    y6 = _pre_slot(xp, xc, xc, sp, sc, sc, w_ptr, d, mask_d, bias, 6, HAS_SEQ_IDX, WIDTH)
    y7 = _pre_slot(xp, xc, xc, sp, sc, sc, w_ptr, d, mask_d, bias, 7, HAS_SEQ_IDX, WIDTH)
    y = _join8(y0, y1, y2, y3, y4, y5, y6, y7, BLOCK_D, M)
    if SILU:
        y = y * tl.sigmoid(y)
    mask = mask_d[:, None] & (t < seqlen)[None, :]
    out_row = pid_b.to(tl.int64) * s_o_b + d.to(tl.int64) * s_o_d
    tl.store(out_ptr + out_row[:, None] + t[None, :] * s_o_l, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_slot(xp, xc, xn, sp, sc, sn, dos, w_ptr, d, mask_d, bias, u: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
               SILU: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    """g (the pre-activation gradient) at slot u in [0, 16), given dout's slots of the same tile (dos)."""
    g = dos[u % 8]
    if SILU:
        pre = _pre_slot(xp, xc, xn, sp, sc, sn, w_ptr, d, mask_d, bias, u, HAS_SEQ_IDX, WIDTH)
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _grads8(xp, xc, xn, sp, sc, sn, dos, w_ptr, d, mask_d, bias, base: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
            SILU: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    """g at slots base .. base + 7 (base 0: this tile, 8: the next one, given dout's slots of that tile). Of the next
    tile dx reads only the first WIDTH - 1 slots; the others are placeholders, never computed."""
    return (
        _grad_read(xp, xc, xn, sp, sc, sn, dos, w_ptr, d, mask_d, bias, base + 0, HAS_SEQ_IDX, SILU, WIDTH),
        _grad_read(xp, xc, xn, sp, sc, sn, dos, w_ptr, d, mask_d, bias, base + 1, HAS_SEQ_IDX, SILU, WIDTH),
        _grad_read(xp, xc, xn, sp, sc, sn, dos, w_ptr, d, mask_d, bias, base + 2, HAS_SEQ_IDX, SILU, WIDTH),
        _grad_read(xp, xc, xn, sp, sc, sn, dos, w_ptr, d, mask_d, bias, base + 3, HAS_SEQ_IDX, SILU, WIDTH),
        _grad_read(xp, xc, xn, sp, sc, sn, dos, w_ptr, d, mask_d, bias, base + 4, HAS_SEQ_IDX, SILU, WIDTH),
        _grad_read(xp, xc, xn, sp, sc, sn, dos, w_ptr, d, mask_d, bias, base + 5, HAS_SEQ_IDX, SILU, WIDTH),
        _grad_read(xp, xc, xn, sp, sc, sn, dos, w_ptr, d, mask_d, bias, base + 6, HAS_SEQ_IDX, SILU, WIDTH),
        _grad_read(xp, xc, xn, sp, sc, sn, dos, w_ptr, d, mask_d, bias, base + 7, HAS_SEQ_IDX, SILU, WIDTH),
    )


@triton.jit
def _grad_read(xp, xc, xn, sp, sc, sn, dos, w_ptr, d, mask_d, bias, u: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
               SILU: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    """:func:`_grad_slot` at slot u where dx reads it (u < 8 + WIDTH - 1); elsewhere a placeholder."""
    if u < 8 + WIDTH - 1:
        return _grad_slot(xp, xc, xn, sp, sc, sn, dos, w_ptr, d, mask_d, bias, u, HAS_SEQ_IDX, SILU, WIDTH)
    else:
        return bias


@triton.jit
def _dx_slot(gc, gn, sp, sc, sn, w_ptr, d, mask_d, v: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, WIDTH: tl.constexpr):
    """dx at slot v: sum_j weight[:, WIDTH - 1 - j] * g[slot v + j], taps within one document."""
    acc = tl.zeros_like(gc[0])
    for j in tl.static_range(WIDTH):
        g = _win(gc, gc, gn, v + j)
        if HAS_SEQ_IDX:
            g = tl.where(_same_doc_slots(sp, sc, sn, v, v + j), g, 0.0)
        w = tl.load(w_ptr + d * WIDTH + (WIDTH - 1 - j), mask=mask_d, other=0.0).to(tl.float32)
        acc += w[:, None] * g
    return acc


@triton.jit
def _dw_slots(gc, xp, xc, sp, sc, k: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, WIDTH: tl.constexpr):
    """sum over the tile of g[t] * x[t - (WIDTH - 1 - k)] per row (BLOCK_D,), taps within one document."""
    acc = tl.zeros_like(gc[0])
    for v in tl.static_range(8):
        xs = _win(xp, xc, xc, v - (WIDTH - 1 - k))
        if HAS_SEQ_IDX:
            xs = tl.where(_same_doc_slots(sp, sc, sc, v - (WIDTH - 1 - k), v), xs, 0.0)
        acc += gc[v] * xs
    return tl.sum(acc, axis=1)


@triton.jit
def _conv_bwd_slots_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    init_ptr,
    seq_idx_ptr,
    dout_ptr,
    dx_ptr,
    dw_ptr,
    dbias_ptr,
    dinit_ptr,
    s_x_b, s_x_d, s_x_l,
    s_do_b, s_do_d, s_do_l,
    s_dx_b, s_dx_d, s_dx_l,
    dim,
    seqlen,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    SILU: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_W: tl.constexpr,
):  # fmt: skip
    """:func:`_conv_bwd_kernel` from aligned tiles split into slots; needs WIDTH <= 9."""
    M: tl.constexpr = BLOCK_L // 8
    pid_b = tl.program_id(0)
    pid_l = tl.program_id(2)
    nblocks_l = tl.num_programs(2)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = d < dim
    b64 = pid_b.to(tl.int64)
    d64 = d.to(tl.int64)
    row = b64 * s_x_b + d64 * s_x_d
    do_row = b64 * s_do_b + d64 * s_do_d
    init_row = (pid_b * dim + d).to(tl.int64) * (WIDTH - 1)
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    xc, sc = _tile_slots(x_ptr, init_ptr, seq_ptr, row, init_row, s, s_x_l, seqlen, mask_d, HAS_INIT, HAS_SEQ_IDX,
                         WIDTH, BLOCK_D, M)  # fmt: skip
    xp, sp = _tile_slots(x_ptr, init_ptr, seq_ptr, row, init_row, s - 8, s_x_l, seqlen, mask_d, HAS_INIT, HAS_SEQ_IDX,
                         WIDTH, BLOCK_D, M)  # fmt: skip
    xn, sn = _tile_slots(x_ptr, init_ptr, seq_ptr, row, init_row, s + 8, s_x_l, seqlen, mask_d, HAS_INIT, HAS_SEQ_IDX,
                         WIDTH, BLOCK_D, M)  # fmt: skip
    # dout is zero past the end, so is g there.
    mask_c = mask_d[:, None] & (s < seqlen)[None, :]
    mask_n = mask_d[:, None] & (s + 8 < seqlen)[None, :]
    dout_c = tl.load(dout_ptr + do_row[:, None] + s[None, :] * s_do_l, mask=mask_c, other=0.0)
    dout_n = tl.load(dout_ptr + do_row[:, None] + (s + 8)[None, :] * s_do_l, mask=mask_n, other=0.0)
    doc = _split8(dout_c.to(tl.float32), BLOCK_D, M)
    don = _split8(dout_n.to(tl.float32), BLOCK_D, M)
    bias = tl.zeros((BLOCK_D, M), dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    gc = _grads8(xp, xc, xn, sp, sc, sn, doc, w_ptr, d, mask_d, bias, 0, HAS_SEQ_IDX, SILU, WIDTH)
    gn = _grads8(xp, xc, xn, sp, sc, sn, don, w_ptr, d, mask_d, bias, 8, HAS_SEQ_IDX, SILU, WIDTH)
    part = (pid_b * nblocks_l + pid_l) * dim + d
    for k in tl.static_range(WIDTH):
        tl.store(dw_ptr + part * WIDTH + k, _dw_slots(gc, xp, xc, sp, sc, k, HAS_SEQ_IDX, WIDTH), mask=mask_d)
    if HAS_BIAS:
        gsum = gc[0] + gc[1] + gc[2] + gc[3] + gc[4] + gc[5] + gc[6] + gc[7]
        tl.store(dbias_ptr + part, tl.sum(gsum, axis=1), mask=mask_d)
    dx = _join8(
        _dx_slot(gc, gn, sp, sc, sn, w_ptr, d, mask_d, 0, HAS_SEQ_IDX, WIDTH),
        _dx_slot(gc, gn, sp, sc, sn, w_ptr, d, mask_d, 1, HAS_SEQ_IDX, WIDTH),
        _dx_slot(gc, gn, sp, sc, sn, w_ptr, d, mask_d, 2, HAS_SEQ_IDX, WIDTH),
        _dx_slot(gc, gn, sp, sc, sn, w_ptr, d, mask_d, 3, HAS_SEQ_IDX, WIDTH),
        _dx_slot(gc, gn, sp, sc, sn, w_ptr, d, mask_d, 4, HAS_SEQ_IDX, WIDTH),
        _dx_slot(gc, gn, sp, sc, sn, w_ptr, d, mask_d, 5, HAS_SEQ_IDX, WIDTH),
        _dx_slot(gc, gn, sp, sc, sn, w_ptr, d, mask_d, 6, HAS_SEQ_IDX, WIDTH),
        _dx_slot(gc, gn, sp, sc, sn, w_ptr, d, mask_d, 7, HAS_SEQ_IDX, WIDTH),
        BLOCK_D,
        M,
    )
    dx_offs = (b64 * s_dx_b + d64 * s_dx_d)[:, None] + s[None, :] * s_dx_l
    tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask_c)
    if HAS_INIT:
        if pid_l == 0:
            p = tl.arange(0, BLOCK_W) - (WIDTH - 1)  # the initial-state positions -(WIDTH - 1) .. -1, padded
            zero = tl.zeros((BLOCK_D, BLOCK_W), dtype=tl.float32)  # no output sits at p < 0
            dinit = _input_grad(
                x_ptr, init_ptr, w_ptr, bias_ptr, seq_ptr, dout_ptr, row, do_row, init_row, d, p, zero, s_x_l, s_do_l,
                seqlen, mask_d, HAS_BIAS, HAS_INIT, HAS_SEQ_IDX, SILU, WIDTH,
            )  # fmt: skip
            ptrs = dinit_ptr + init_row[:, None] + (p + WIDTH - 1)[None, :]
            tl.store(ptrs, dinit.to(dinit_ptr.dtype.element_ty), mask=mask_d[:, None] & (p < 0)[None, :])
