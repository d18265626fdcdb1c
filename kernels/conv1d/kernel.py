"""Triton kernels of the causal depthwise conv1d: forward, backward and the one-token update.

x, out, dout, dx and the backward's fp32 buffer g: (batch, dim, seqlen), each addressed through its own strides (row
offsets b * stride_b + d * stride_d, then position * stride_l), so a channel-last view such as the xBC slice of
Mamba2's in_proj output is read in place; weight (dim, WIDTH); initial_states (batch, dim, WIDTH - 1) contiguous;
seq_idx (batch, seqlen). A program owns a (BLOCK_D channels, BLOCK_L positions) tile. Position p < 0 reads
initial_states[..., WIDTH - 1 + p]. A tap from s to t counts iff seq_idx is constant on [s, t], with seq_idx[p < 0]
taken as seq_idx[0] (initial states belong to the first document).

The backward runs in two passes: the first recomputes the pre-activation (nothing but x is saved), writes the
pre-activation gradient g in fp32 (only with SiLU; without, g is dout) and reduces the weight and bias gradients of
its tile; the second gathers dx[s] = sum_j weight[WIDTH - 1 - j] * g[s + j] from shifted loads of g, which hit L1.
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
def _conv_bwd_act_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    init_ptr,
    seq_idx_ptr,
    dout_ptr,
    g_ptr,
    dw_ptr,
    dbias_ptr,
    s_x_b, s_x_d, s_x_l,
    s_do_b, s_do_d, s_do_l,
    s_g_b, s_g_d, s_g_l,
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
    """g = d loss / d pre-activation (fp32, stored only with SILU: otherwise it is dout), and the weight and bias
    gradients of this tile as partial sums dweight (batch, nblocks_l, dim, WIDTH), dbias (batch, nblocks_l, dim)."""
    pid_b = tl.program_id(0)
    pid_l = tl.program_id(2)
    nblocks_l = tl.num_programs(2)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = d < dim
    mask = mask_d[:, None] & (t < seqlen)[None, :]
    b64 = pid_b.to(tl.int64)
    row = b64 * s_x_b + d.to(tl.int64) * s_x_d
    init_row = (pid_b * dim + d).to(tl.int64) * (WIDTH - 1)
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    dout_offs = (b64 * s_do_b + d.to(tl.int64) * s_do_d)[:, None] + t[None, :] * s_do_l
    g = tl.load(dout_ptr + dout_offs, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        pre = _pre_activation(
            x_ptr, init_ptr, w_ptr, bias_ptr, seq_ptr, row, init_row, d, t, s_x_l, seqlen, mask_d,
            HAS_BIAS, HAS_INIT, HAS_SEQ_IDX, WIDTH,
        )  # fmt: skip
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
        g_offs = (b64 * s_g_b + d.to(tl.int64) * s_g_d)[:, None] + t[None, :] * s_g_l
        tl.store(g_ptr + g_offs, g, mask=mask)
    part = (pid_b * nblocks_l + pid_l) * dim + d
    # The taps are the ones the forward read; loading them again hits L1.
    for k in tl.static_range(WIDTH):
        src = t - (WIDTH - 1 - k)
        xs = _load_x(x_ptr, init_ptr, row, init_row, src, s_x_l, seqlen, mask_d, HAS_INIT, WIDTH)
        if HAS_SEQ_IDX:
            xs = tl.where(_same_doc(seq_ptr, src, WIDTH - 1 - k, seqlen)[None, :], xs, 0.0)
        tl.store(dw_ptr + part * WIDTH + k, tl.sum(g * xs, axis=1), mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + part, tl.sum(g, axis=1), mask=mask_d)


@triton.jit
def _input_grad(g_ptr, w_ptr, seq_ptr, row, d, s, s_l, seqlen, mask_d, HAS_SEQ_IDX: tl.constexpr, WIDTH: tl.constexpr):
    """d loss / d input at positions s (BLOCK_D, BLOCK_L): input s feeds outputs s + j through tap WIDTH - 1 - j."""
    dx = tl.zeros((row.shape[0], s.shape[0]), dtype=tl.float32)
    for j in tl.static_range(WIDTH):
        t = s + j
        valid = (t >= 0) & (t < seqlen)
        if HAS_SEQ_IDX:
            valid = valid & _same_doc(seq_ptr, s, j, seqlen)
        g = tl.load(g_ptr + row[:, None] + t[None, :] * s_l, mask=mask_d[:, None] & valid[None, :], other=0.0)
        w = tl.load(w_ptr + d * WIDTH + (WIDTH - 1 - j), mask=mask_d, other=0.0).to(tl.float32)
        dx += w[:, None] * g.to(tl.float32)
    return dx


@triton.jit
def _conv_bwd_dx_kernel(
    g_ptr,
    w_ptr,
    seq_idx_ptr,
    dx_ptr,
    dinit_ptr,
    s_g_b, s_g_d, s_g_l,
    s_dx_b, s_dx_d, s_dx_l,
    dim,
    seqlen,
    HAS_INIT: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_W: tl.constexpr,
):  # fmt: skip
    """dx from g (the pre-activation gradient, (batch, dim, seqlen)), and dinitial_states in the first tile."""
    pid_b = tl.program_id(0)
    pid_l = tl.program_id(2)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = d < dim
    b64 = pid_b.to(tl.int64)
    row = b64 * s_g_b + d.to(tl.int64) * s_g_d
    seq_ptr = seq_idx_ptr
    if HAS_SEQ_IDX:
        seq_ptr += pid_b * seqlen
    dx = _input_grad(g_ptr, w_ptr, seq_ptr, row, d, s, s_g_l, seqlen, mask_d, HAS_SEQ_IDX, WIDTH)
    mask = mask_d[:, None] & (s < seqlen)[None, :]
    dx_offs = (b64 * s_dx_b + d.to(tl.int64) * s_dx_d)[:, None] + s[None, :] * s_dx_l
    tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_INIT:
        if pid_l == 0:
            p = tl.arange(0, BLOCK_W) - (WIDTH - 1)  # the initial-state positions -(WIDTH - 1) .. -1, padded
            dinit = _input_grad(g_ptr, w_ptr, seq_ptr, row, d, p, s_g_l, seqlen, mask_d, HAS_SEQ_IDX, WIDTH)
            init_row = (pid_b * dim + d).to(tl.int64) * (WIDTH - 1)
            ptrs = dinit_ptr + init_row[:, None] + (p + WIDTH - 1)[None, :]
            tl.store(ptrs, dinit.to(dinit_ptr.dtype.element_ty), mask=mask_d[:, None] & (p < 0)[None, :])


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
