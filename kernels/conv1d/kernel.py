"""Triton kernels of the causal depthwise conv1d: forward, backward and the one-token update.

x, out, dout and dx: (batch, dim, seqlen), each addressed through its own strides (row
offsets b * stride_b + d * stride_d, then position * stride_l), so a channel-last view such as the xBC slice of
Mamba2's in_proj output is read in place; weight (dim, WIDTH); initial_states (batch, dim, WIDTH - 1) contiguous;
seq_idx (batch, seqlen). A program owns a (BLOCK_D channels, BLOCK_L positions) tile. Position p < 0 reads
initial_states[..., WIDTH - 1 + p]. A tap from s to t counts iff seq_idx is constant on [s, t], with seq_idx[p < 0]
taken as seq_idx[0] (initial states belong to the first document).

Three forward kernels: _conv_fwd_kernel reads each tap as a shifted load, which is aligned (vectorised, an L1 hit)
when positions are rows of a channel-last tensor; _conv_fwd_slots_kernel loads only aligned tiles and shifts by
register renaming (below), which is what a time-contiguous tensor needs: there a tap shifted by one position is a
misaligned load that Triton splits into one 2-byte load per element, and the kernel turns L1-bound;
_conv_fwd_rows_kernel (channel-last, widths up to 4) walks the positions one row of channels at a time and loads
every element once (below).

The backward is one pass over x and dout; nothing but x is saved. It recomputes the pre-activation and g = d loss /
d pre-activation (dout times SiLU's derivative; dout itself without SiLU) at its own positions, which give the tile's
weight and bias gradients, and at the WIDTH - 1 positions after the tile, and gathers
dx[s] = sum_j weight[WIDTH - 1 - j] * g[s + j] in registers. Nothing is written to memory but dx and the per-tile
weight/bias partial sums. _conv_bwd_slots_kernel does it for any layout from aligned tiles; _conv_bwd_rows_kernel
(channel-last) one row at a time from the tile's end. Which kernel runs per layout is api.py's launch table.
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


# Row kernels, for channel-last tensors: a program owns BLOCK_D channels over BLOCK_L positions and walks the
# positions one row at a time (a row is BLOCK_D contiguous channels, one vector load per thread), keeping the last
# WIDTH - 1 rows of x, and in the backward the next WIDTH - 1 rows of g, in registers. Every element of x and dout is
# loaded once, and the weight and bias gradients are per-thread sums over the tile, with no reduction across threads.
# Rows are loaded GROUP at a time, one group ahead of the rows being computed, so that a thread has loads in flight
# while it computes and stores (a load cannot be moved above a store that might alias it).
#
# A lag j in [0, WIDTH) is the tap that reads x[t - j] for out[t]: weight[:, WIDTH - 1 - j]. It counts iff seq_idx
# is constant on [t - j, t]; e_t = (seq_idx[t] == seq_idx[t - 1]) and lag j's validity is e_t & ... & e_{t - j + 1}.


@triton.jit
def _load_row(ptr, row, pos, s_l, seqlen, mask_d):
    """The row at position pos (a scalar in [0, seqlen) or past the end: zero there), as stored."""
    # The position's condition is a scalar: it selects the channel mask rather than being and-ed into it.
    return tl.load(ptr + row + pos * s_l, mask=tl.where(pos < seqlen, mask_d, False), other=0.0)


@triton.jit
def _row(x_ptr, init_ptr, row, init_row, pos, s_l, seqlen, mask_d, HAS_INIT: tl.constexpr, WIDTH: tl.constexpr):
    """x at position pos (a scalar, possibly negative) for rows (BLOCK_D,), fp32; initial_states where pos < 0."""
    ok = (pos >= 0) & (pos < seqlen)
    val = tl.load(x_ptr + row + pos * s_l, mask=tl.where(ok, mask_d, False), other=0.0).to(tl.float32)
    if HAS_INIT:
        in_init = (pos < 0) & (pos >= 1 - WIDTH)
        val += tl.load(init_ptr + init_row + (pos + WIDTH - 1), mask=tl.where(in_init, mask_d, False), other=0.0).to(
            tl.float32
        )
    return val


@triton.jit
def _rows(ptr, row, pos, s_l, seqlen, mask_d, G: tl.constexpr):
    """G rows at positions pos .. pos + G - 1 (all >= 0), as loaded (not converted); zero past seqlen."""
    r0 = _load_row(ptr, row, pos, s_l, seqlen, mask_d)
    r1 = _load_row(ptr, row, pos + 1, s_l, seqlen, mask_d)
    r2 = _load_row(ptr, row, pos + 2, s_l, seqlen, mask_d)
    r3 = _load_row(ptr, row, pos + 3, s_l, seqlen, mask_d)
    if G == 4:
        return r0, r1, r2, r3
    else:
        r4 = _load_row(ptr, row, pos + 4, s_l, seqlen, mask_d)
        r5 = _load_row(ptr, row, pos + 5, s_l, seqlen, mask_d)
        r6 = _load_row(ptr, row, pos + 6, s_l, seqlen, mask_d)
        r7 = _load_row(ptr, row, pos + 7, s_l, seqlen, mask_d)
        return r0, r1, r2, r3, r4, r5, r6, r7


@triton.jit
def _seq_at(seq_ptr, pos, seqlen):
    """seq_idx at pos clamped into [0, seqlen) (positions before the start belong to the first document)."""
    return tl.load(seq_ptr + tl.minimum(tl.maximum(pos, 0), seqlen - 1))


@triton.jit
def _lag_weight(w_ptr, d, mask_d, j: tl.constexpr, WIDTH: tl.constexpr):
    """weight[:, WIDTH - 1 - j] (fp32), zero for lags past the kernel."""
    if j < WIDTH:
        return tl.load(w_ptr + d * WIDTH + (WIDTH - 1 - j), mask=mask_d, other=0.0).to(tl.float32)
    else:
        return tl.zeros_like(d).to(tl.float32)


@triton.jit
def _lag_weights_and_bias(w_ptr, bias_ptr, d, mask_d, HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr):
    """The weights at lags 0 .. 3 and the bias (zero without one), fp32 (BLOCK_D,) each."""
    bias = tl.zeros_like(d).to(tl.float32)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    return (
        _lag_weight(w_ptr, d, mask_d, 0, WIDTH),
        _lag_weight(w_ptr, d, mask_d, 1, WIDTH),
        _lag_weight(w_ptr, d, mask_d, 2, WIDTH),
        _lag_weight(w_ptr, d, mask_d, 3, WIDTH),
        bias,
    )


@triton.jit
def _pre_row(bias, w0, w1, w2, w3, x0, x1, x2, x3, v1, v2, v3, HAS_SEQ_IDX: tl.constexpr, WIDTH: tl.constexpr):
    """bias + sum_j weight at lag j * x[t - j] over the valid lags (x0 = x[t], ..., v_j: lag j counts)."""
    pre = bias + w0 * x0
    if WIDTH > 1:
        pre += w1 * (tl.where(v1, x1, 0.0) if HAS_SEQ_IDX else x1)
    if WIDTH > 2:
        pre += w2 * (tl.where(v2, x2, 0.0) if HAS_SEQ_IDX else x2)
    if WIDTH > 3:
        pre += w3 * (tl.where(v3, x3, 0.0) if HAS_SEQ_IDX else x3)
    return pre


@triton.jit
def _conv_fwd_rows_kernel(
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
    GROUP: tl.constexpr,
):  # fmt: skip
    """:func:`_conv_fwd_kernel` one row at a time; needs WIDTH <= 4 and GROUP (4 or 8) dividing BLOCK_L."""
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t0 = tl.program_id(2) * BLOCK_L
    mask_d = d < dim
    row = pid_b.to(tl.int64) * s_x_b + d.to(tl.int64) * s_x_d
    out_row = pid_b.to(tl.int64) * s_o_b + d.to(tl.int64) * s_o_d
    init_row = (pid_b * dim + d).to(tl.int64) * (WIDTH - 1)
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    w0, w1, w2, w3, bias = _lag_weights_and_bias(w_ptr, bias_ptr, d, mask_d, HAS_BIAS, WIDTH)
    # x[t - 1], x[t - 2], x[t - 3] for t = t0, and the validity flags e at t0 - 1, t0 - 2.
    x1 = _row(x_ptr, init_ptr, row, init_row, t0 - 1, s_x_l, seqlen, mask_d, HAS_INIT, WIDTH)
    x2 = _row(x_ptr, init_ptr, row, init_row, t0 - 2, s_x_l, seqlen, mask_d, HAS_INIT, WIDTH)
    x3 = _row(x_ptr, init_ptr, row, init_row, t0 - 3, s_x_l, seqlen, mask_d, HAS_INIT, WIDTH)
    s1 = 0
    e1 = t0 == t0
    e2 = e1
    if HAS_SEQ_IDX:
        s1 = _seq_at(seq_ptr, t0 - 1, seqlen)
        e1 = s1 == _seq_at(seq_ptr, t0 - 2, seqlen)
        e2 = _seq_at(seq_ptr, t0 - 2, seqlen) == _seq_at(seq_ptr, t0 - 3, seqlen)
    cur = _rows(x_ptr, row, t0, s_x_l, seqlen, mask_d, GROUP)
    for gi in tl.static_range(BLOCK_L // GROUP):
        if gi + 1 < BLOCK_L // GROUP:
            nxt = _rows(x_ptr, row, t0 + (gi + 1) * GROUP, s_x_l, seqlen, mask_d, GROUP)
        for i in tl.static_range(GROUP):
            t = t0 + gi * GROUP + i
            x0 = cur[i].to(tl.float32)
            e0 = e1
            if HAS_SEQ_IDX:
                s0 = _seq_at(seq_ptr, t, seqlen)
                e0 = s0 == s1
                s1 = s0
            v2 = e0 & e1
            y = _pre_row(bias, w0, w1, w2, w3, x0, x1, x2, x3, e0, v2, v2 & e2, HAS_SEQ_IDX, WIDTH)
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(
                out_ptr + out_row + t * s_o_l, y.to(out_ptr.dtype.element_ty), mask=tl.where(t < seqlen, mask_d, False)
            )
            x3 = x2
            x2 = x1
            x1 = x0
            e2 = e1
            e1 = e0
        if gi + 1 < BLOCK_L // GROUP:
            cur = nxt


@triton.jit
def _conv_bwd_rows_kernel(
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
    GROUP: tl.constexpr,
):  # fmt: skip
    """The backward one row at a time, from the tile's last position down to its first (WIDTH <= 4).

    At position t it loads x[t - 3] and dout[t], recomputes the pre-activation and g[t], and forms
    dx[t] = sum_j weight at lag j * g[t + j] over the lags that count at output t + j; gv_j below is g masked by lag
    j's validity, kept for the WIDTH - 1 positions after t. g past the tile comes from a prologue at the tile's end.
    """
    pid_b = tl.program_id(0)
    pid_l = tl.program_id(2)
    nblocks_l = tl.num_programs(2)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t0 = pid_l * BLOCK_L
    t_end = t0 + BLOCK_L
    mask_d = d < dim
    b64 = pid_b.to(tl.int64)
    d64 = d.to(tl.int64)
    row = b64 * s_x_b + d64 * s_x_d
    do_row = b64 * s_do_b + d64 * s_do_d
    dx_row = b64 * s_dx_b + d64 * s_dx_d
    init_row = (pid_b * dim + d).to(tl.int64) * (WIDTH - 1)
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    w0, w1, w2, w3, bias = _lag_weights_and_bias(w_ptr, bias_ptr, d, mask_d, HAS_BIAS, WIDTH)

    # Prologue: g at t_end, t_end + 1, t_end + 2 (zero past seqlen, where dout is), from x[t_end - 3 .. t_end + 2].
    # xa..xf are x[t_end - 3] .. x[t_end + 2]; positions here are >= 0 except in a tile shorter than 3 rows.
    xa = _row(x_ptr, init_ptr, row, init_row, t_end - 3, s_x_l, seqlen, mask_d, HAS_INIT, WIDTH)
    xb = _row(x_ptr, init_ptr, row, init_row, t_end - 2, s_x_l, seqlen, mask_d, HAS_INIT, WIDTH)
    xc = _row(x_ptr, init_ptr, row, init_row, t_end - 1, s_x_l, seqlen, mask_d, HAS_INIT, WIDTH)
    xd = _row(x_ptr, init_ptr, row, init_row, t_end, s_x_l, seqlen, mask_d, HAS_INIT, WIDTH)
    xe = _row(x_ptr, init_ptr, row, init_row, t_end + 1, s_x_l, seqlen, mask_d, HAS_INIT, WIDTH)
    xf = _row(x_ptr, init_ptr, row, init_row, t_end + 2, s_x_l, seqlen, mask_d, HAS_INIT, WIDTH)
    # e at t_end - 2 .. t_end + 2 (e_t compares t with t - 1).
    ea = t0 == t0
    eb = ea
    ec = ea
    ed = ea
    ee = ea
    s_hi = 0
    if HAS_SEQ_IDX:
        sa = _seq_at(seq_ptr, t_end - 3, seqlen)
        sb = _seq_at(seq_ptr, t_end - 2, seqlen)
        sc = _seq_at(seq_ptr, t_end - 1, seqlen)
        sd = _seq_at(seq_ptr, t_end, seqlen)
        se = _seq_at(seq_ptr, t_end + 1, seqlen)
        sf = _seq_at(seq_ptr, t_end + 2, seqlen)
        ea = sb == sa
        eb = sc == sb
        ec = sd == sc
        ed = se == sd
        ee = sf == se
        s_hi = sa  # seq_idx at t - 2 when the loop reaches t = t_end - 1
    # g at u = t_end + 2 (lags over e at u .. u - 2: ee, ed, ec), u = t_end + 1 (ed, ec, eb), u = t_end (ec, eb, ea).
    gf = _g_row(dout_ptr, do_row, t_end + 2, s_do_l, seqlen, mask_d, bias, w0, w1, w2, w3, xf, xe, xd, xc, ee,
                ee & ed, ee & ed & ec, HAS_SEQ_IDX, SILU, WIDTH)  # fmt: skip
    ge = _g_row(dout_ptr, do_row, t_end + 1, s_do_l, seqlen, mask_d, bias, w0, w1, w2, w3, xe, xd, xc, xb, ed,
                ed & ec, ed & ec & eb, HAS_SEQ_IDX, SILU, WIDTH)  # fmt: skip
    gd = _g_row(dout_ptr, do_row, t_end, s_do_l, seqlen, mask_d, bias, w0, w1, w2, w3, xd, xc, xb, xa, ec,
                ec & eb, ec & eb & ea, HAS_SEQ_IDX, SILU, WIDTH)  # fmt: skip
    # gv_j at the positions after t, for t = t_end - 1: g1 = gv_1[t + 1]; g2a, g2b = gv_2[t + 1], gv_2[t + 2];
    # g3a, g3b, g3c = gv_3[t + 1 .. t + 3].
    g1 = tl.where(ec, gd, 0.0)
    g2a = tl.where(ec & eb, gd, 0.0)
    g2b = tl.where(ed & ec, ge, 0.0)
    g3a = tl.where(ec & eb & ea, gd, 0.0)
    g3b = tl.where(ed & ec & eb, ge, 0.0)
    g3c = tl.where(ee & ed & ec, gf, 0.0)
    # Rolling x[t], x[t - 1], x[t - 2] and e at t, t - 1 (e_{t - 2} comes with the new row) for t = t_end - 1.
    x0 = xc
    x1 = xb
    x2 = xa
    e0 = eb
    e1 = ea
    dw0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dw3 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)

    NG: tl.constexpr = BLOCK_L // GROUP
    # Group k holds positions t_end - (k + 1) * GROUP .. t_end - k * GROUP - 1; it needs x 3 rows earlier.
    cur_do = _rows(dout_ptr, do_row, t_end - GROUP, s_do_l, seqlen, mask_d, GROUP)
    cur_x = _rows_x(x_ptr, init_ptr, row, init_row, t_end - GROUP - 3, s_x_l, seqlen, mask_d, HAS_INIT, WIDTH,
                    NG == 1, GROUP)  # fmt: skip
    for k in tl.static_range(NG):
        if k + 1 < NG:
            nxt_do = _rows(dout_ptr, do_row, t_end - (k + 2) * GROUP, s_do_l, seqlen, mask_d, GROUP)
            nxt_x = _rows_x(x_ptr, init_ptr, row, init_row, t_end - (k + 2) * GROUP - 3, s_x_l, seqlen, mask_d,
                            HAS_INIT, WIDTH, k + 2 == NG, GROUP)  # fmt: skip
        for i in tl.static_range(GROUP - 1, -1, -1):  # the group from its last row down
            t = t_end - (k + 1) * GROUP + i
            x3 = cur_x[i].to(tl.float32)
            e2 = e1
            if HAS_SEQ_IDX:
                s3 = _seq_at(seq_ptr, t - 3, seqlen)
                e2 = s_hi == s3
                s_hi = s3
            v2 = e0 & e1
            v3 = v2 & e2
            pre = _pre_row(bias, w0, w1, w2, w3, x0, x1, x2, x3, e0, v2, v3, HAS_SEQ_IDX, WIDTH)
            g = cur_do[i].to(tl.float32)
            if SILU:
                sig = tl.sigmoid(pre)
                g = g * sig * (1.0 + pre * (1.0 - sig))
            dx = w0 * g
            dw0 += g * x0
            dbias += g
            if WIDTH > 1:
                dx += w1 * g1
                g1 = tl.where(e0, g, 0.0) if HAS_SEQ_IDX else g
                dw1 += g1 * x1
            if WIDTH > 2:
                dx += w2 * g2b
                g2b = g2a
                g2a = tl.where(v2, g, 0.0) if HAS_SEQ_IDX else g
                dw2 += g2a * x2
            if WIDTH > 3:
                dx += w3 * g3c
                g3c = g3b
                g3b = g3a
                g3a = tl.where(v3, g, 0.0) if HAS_SEQ_IDX else g
                dw3 += g3a * x3
            tl.store(
                dx_ptr + dx_row + t * s_dx_l, dx.to(dx_ptr.dtype.element_ty), mask=tl.where(t < seqlen, mask_d, False)
            )
            x0 = x1
            x1 = x2
            x2 = x3
            e0 = e1
            e1 = e2
        if k + 1 < NG:
            cur_do = nxt_do
            cur_x = nxt_x
    part = (pid_b * nblocks_l + pid_l) * dim + d
    tl.store(dw_ptr + part * WIDTH + (WIDTH - 1), dw0, mask=mask_d)
    if WIDTH > 1:
        tl.store(dw_ptr + part * WIDTH + (WIDTH - 2), dw1, mask=mask_d)
    if WIDTH > 2:
        tl.store(dw_ptr + part * WIDTH + (WIDTH - 3), dw2, mask=mask_d)
    if WIDTH > 3:
        tl.store(dw_ptr + part * WIDTH + (WIDTH - 4), dw3, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + part, dbias, mask=mask_d)
    if HAS_INIT:
        if pid_l == 0:
            # Position p < 0 feeds outputs p + j >= 0 through lag j: gv_j at 0 .. 2 are g1, g2a, g2b, g3a .. g3c.
            base = dinit_ptr + init_row
            ty = dinit_ptr.dtype.element_ty
            if WIDTH > 1:
                dm1 = w1 * g1
                if WIDTH > 2:
                    dm1 += w2 * g2b
                if WIDTH > 3:
                    dm1 += w3 * g3c
                tl.store(base + (WIDTH - 2), dm1.to(ty), mask=mask_d)
            if WIDTH > 2:
                dm2 = w2 * g2a
                if WIDTH > 3:
                    dm2 += w3 * g3b
                tl.store(base + (WIDTH - 3), dm2.to(ty), mask=mask_d)
            if WIDTH > 3:
                tl.store(base + (WIDTH - 4), (w3 * g3a).to(ty), mask=mask_d)


@triton.jit
def _rows_x(x_ptr, init_ptr, row, init_row, pos, s_l, seqlen, mask_d, HAS_INIT: tl.constexpr, WIDTH: tl.constexpr,
            MAY_BE_NEGATIVE: tl.constexpr, G: tl.constexpr):  # fmt: skip
    """G rows of x from pos, the first three through :func:`_row` (initial states) where pos may be negative."""
    if MAY_BE_NEGATIVE:
        r0 = _row(x_ptr, init_ptr, row, init_row, pos, s_l, seqlen, mask_d, HAS_INIT, WIDTH)
        r1 = _row(x_ptr, init_ptr, row, init_row, pos + 1, s_l, seqlen, mask_d, HAS_INIT, WIDTH)
        r2 = _row(x_ptr, init_ptr, row, init_row, pos + 2, s_l, seqlen, mask_d, HAS_INIT, WIDTH)
        r3 = _load_row(x_ptr, row, pos + 3, s_l, seqlen, mask_d).to(tl.float32)
        if G == 4:
            return r0, r1, r2, r3
        else:
            r4 = _load_row(x_ptr, row, pos + 4, s_l, seqlen, mask_d).to(tl.float32)
            r5 = _load_row(x_ptr, row, pos + 5, s_l, seqlen, mask_d).to(tl.float32)
            r6 = _load_row(x_ptr, row, pos + 6, s_l, seqlen, mask_d).to(tl.float32)
            r7 = _load_row(x_ptr, row, pos + 7, s_l, seqlen, mask_d).to(tl.float32)
            return r0, r1, r2, r3, r4, r5, r6, r7
    else:
        return _rows(x_ptr, row, pos, s_l, seqlen, mask_d, G)


@triton.jit
def _g_row(dout_ptr, do_row, pos, s_l, seqlen, mask_d, bias, w0, w1, w2, w3, x0, x1, x2, x3, v1, v2, v3,
           HAS_SEQ_IDX: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    """g = d loss / d pre-activation at position pos (zero where pos >= seqlen), fp32."""
    g = _load_row(dout_ptr, do_row, pos, s_l, seqlen, mask_d).to(tl.float32)
    if SILU:
        pre = _pre_row(bias, w0, w1, w2, w3, x0, x1, x2, x3, v1, v2, v3, HAS_SEQ_IDX, WIDTH)
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g
