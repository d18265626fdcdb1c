"""Triton kernels of the RMSNorms, forward and backward; one pair serves both ``rms_norm_fn`` and ``rmsnorm_fn``.

Rows are (M, hidden) contiguous, except z and dz, whose rows may sit at any row stride (columns of a wider tensor,
such as the z slice of Mamba2's in_proj output). A row is held as a (BLOCK_G, BLOCK_GS) tile of GROUPS groups of
GROUP_SIZE channels, each group normalised on its own (GROUPS = 1 for the plain norm). A program walks
ROWS_PER_PROGRAM rows so that the weight/bias gradients accumulate in registers and only (programs, hidden) partial sums
reach memory.

    s     = x (+ residual)                     the residual add, in fp32
    xg    = s * silu(z) if gated before the norm, else s
    y     = xg * rstd(group) * weight + bias   rstd = 1 / sqrt(mean over the group of xg^2 + eps)
    out   = y * silu(z) if gated after the norm, else y
"""

import triton
import triton.language as tl


@triton.jit
def _row_tile(GROUPS, GROUP_SIZE, BLOCK_G: tl.constexpr, BLOCK_GS: tl.constexpr, c0=0):
    """Columns and mask of a (BLOCK_G, BLOCK_GS) tile: columns c0 .. c0 + BLOCK_GS of every group."""
    g = tl.arange(0, BLOCK_G)
    c = c0 + tl.arange(0, BLOCK_GS)
    cols = g[:, None] * GROUP_SIZE + c[None, :]
    mask = (g < GROUPS)[:, None] & (c < GROUP_SIZE)[None, :]
    return cols, mask


@triton.jit
def _fwd_input(x_ptr, residual_ptr, z_ptr, base, z_base, cols, mask, HAS_RESIDUAL, HAS_Z, NORM_BEFORE_GATE):
    """s = x (+ residual), the gate silu(z) (s itself without z) and the normalised input xg, in fp32. Addresses are
    a row's scalar base (int64) plus int32 columns."""
    s = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(residual_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    gate = s
    xg = s
    if HAS_Z:
        z = tl.load(z_ptr + z_base + cols, mask=mask, other=0.0).to(tl.float32)
        gate = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            xg = s * gate
    return s, gate, xg


@triton.jit
def _fwd_tile(
    x_ptr, residual_ptr, z_ptr, residual_out_ptr, base, z_base, cols, mask,
    HAS_RESIDUAL, STORE_RESIDUAL, HAS_Z, NORM_BEFORE_GATE,
):  # fmt: skip
    """:func:`_fwd_input` on one tile, whose residual sum x + residual is stored for the pre-norm; returns the gate,
    xg and xg's sum of squares per group."""
    s, gate, xg = _fwd_input(
        x_ptr, residual_ptr, z_ptr, base, z_base, cols, mask, HAS_RESIDUAL, HAS_Z, NORM_BEFORE_GATE
    )
    if STORE_RESIDUAL:
        tl.store(residual_out_ptr + base + cols, s.to(residual_out_ptr.dtype.element_ty), mask=mask)
    return gate, xg, tl.sum(xg * xg, axis=1)


@triton.jit
def _fwd_output(w_ptr, b_ptr, out_ptr, base, cols, mask, xg, gate, rstd, HAS_Z, NORM_BEFORE_GATE, HAS_BIAS):
    """out = xg * rstd * weight (+ bias) (* gate); the weight and bias are read here, after the row's sum of squares
    (from cache after the first row), not held across it: at 4096 columns and 8 warps that keeps a program at 32
    registers per thread instead of 48, 8 programs per SM instead of 5."""
    y = xg * rstd[:, None] * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        if NORM_BEFORE_GATE:
            y *= gate
    tl.store(out_ptr + base + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_kernel(
    x_ptr,
    residual_ptr,
    z_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    residual_out_ptr,
    rstd_ptr,
    M,
    GROUPS,
    GROUP_SIZE,
    eps,
    ROWS_PER_PROGRAM,
    stride_z_row,
    HAS_RESIDUAL: tl.constexpr,
    STORE_RESIDUAL: tl.constexpr,
    HAS_Z: tl.constexpr,
    NORM_BEFORE_GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CHUNKED: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_GS: tl.constexpr,
    BLOCK_TAIL: tl.constexpr = 0,
):
    """rstd: (M, GROUPS) fp32, kept for the backward. A group is one register tile of BLOCK_GS >= GROUP_SIZE columns;
    or two, BLOCK_TAIL > 0: columns [0, BLOCK_GS) and the rest in a tile of BLOCK_TAIL (Mamba2-2.7B's 5120 as 4096 +
    1024 instead of one tile padded to 8192), still one pass; or, CHUNKED, walked in BLOCK_GS-column chunks twice:
    first for the sum of squares, then for the output, the second pass reading the row again from cache."""
    g = tl.arange(0, BLOCK_G)
    g_mask = g < GROUPS
    hidden = GROUPS * GROUP_SIZE
    row_start = tl.program_id(0) * ROWS_PER_PROGRAM
    for row in range(row_start, tl.minimum(row_start + ROWS_PER_PROGRAM, M)):
        row64 = tl.full((), 0, tl.int64) + row  # int64: rows * hidden may pass 2**31
        base, z_base = row64 * hidden, row64 * stride_z_row
        if CHUNKED:
            sum_sq = tl.zeros((BLOCK_G,), dtype=tl.float32)
            for c0 in range(0, GROUP_SIZE, BLOCK_GS):
                cols, mask = _row_tile(GROUPS, GROUP_SIZE, BLOCK_G, BLOCK_GS, c0)
                _, _, chunk_sum_sq = _fwd_tile(
                    x_ptr, residual_ptr, z_ptr, residual_out_ptr, base, z_base, cols, mask,
                    HAS_RESIDUAL, STORE_RESIDUAL, HAS_Z, NORM_BEFORE_GATE,
                )  # fmt: skip
                sum_sq += chunk_sum_sq
            rstd = 1.0 / tl.sqrt(sum_sq / GROUP_SIZE + eps)
            tl.store(rstd_ptr + row * GROUPS + g, rstd, mask=g_mask)
            for c0 in range(0, GROUP_SIZE, BLOCK_GS):
                cols, mask = _row_tile(GROUPS, GROUP_SIZE, BLOCK_G, BLOCK_GS, c0)
                s, gate, xg = _fwd_input(
                    x_ptr, residual_ptr, z_ptr, base, z_base, cols, mask, HAS_RESIDUAL, HAS_Z, NORM_BEFORE_GATE
                )
                _fwd_output(w_ptr, b_ptr, out_ptr, base, cols, mask, xg, gate, rstd, HAS_Z, NORM_BEFORE_GATE, HAS_BIAS)
        else:
            cols, mask = _row_tile(GROUPS, GROUP_SIZE, BLOCK_G, BLOCK_GS)
            gate, xg, sum_sq = _fwd_tile(
                x_ptr, residual_ptr, z_ptr, residual_out_ptr, base, z_base, cols, mask,
                HAS_RESIDUAL, STORE_RESIDUAL, HAS_Z, NORM_BEFORE_GATE,
            )  # fmt: skip
            if BLOCK_TAIL > 0:
                cols_t, mask_t = _row_tile(GROUPS, GROUP_SIZE, BLOCK_G, BLOCK_TAIL, BLOCK_GS)
                gate_t, xg_t, tail_sum_sq = _fwd_tile(
                    x_ptr, residual_ptr, z_ptr, residual_out_ptr, base, z_base, cols_t, mask_t,
                    HAS_RESIDUAL, STORE_RESIDUAL, HAS_Z, NORM_BEFORE_GATE,
                )  # fmt: skip
                sum_sq += tail_sum_sq
            rstd = 1.0 / tl.sqrt(sum_sq / GROUP_SIZE + eps)
            tl.store(rstd_ptr + row * GROUPS + g, rstd, mask=g_mask)
            _fwd_output(w_ptr, b_ptr, out_ptr, base, cols, mask, xg, gate, rstd, HAS_Z, NORM_BEFORE_GATE, HAS_BIAS)
            if BLOCK_TAIL > 0:
                _fwd_output(
                    w_ptr, b_ptr, out_ptr, base, cols_t, mask_t, xg_t, gate_t, rstd, HAS_Z, NORM_BEFORE_GATE, HAS_BIAS
                )


@triton.jit
def _bwd_tile_setup(w_ptr, b_ptr, GROUPS, GROUP_SIZE, HAS_BIAS, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, c0):
    """A backward tile's columns, mask, weight and bias (the weight again without bias) and its zeroed weight- and
    bias-gradient accumulators: columns c0 .. c0 + BLOCK of every group."""
    cols, mask = _row_tile(GROUPS, GROUP_SIZE, BLOCK_G, BLOCK, c0)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = w
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return cols, mask, w, b, tl.zeros((BLOCK_G, BLOCK), dtype=tl.float32), tl.zeros((BLOCK_G, BLOCK), dtype=tl.float32)


@triton.jit
def _bwd_tile_load(x_ptr, residual_ptr, z_ptr, dout_ptr, offs, z_offs, mask, HAS_RESIDUAL, HAS_Z):
    """A backward tile's inputs as stored: x, residual, z, dy (x again in place of an absent residual or z). The loads
    alone, so that the next row's can be issued before this row's reduction."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    res = x
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + offs, mask=mask, other=0.0)
    z = x
    if HAS_Z:
        z = tl.load(z_ptr + z_offs, mask=mask, other=0.0)
    return x, res, z, tl.load(dout_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _bwd_row_load(
    x_ptr, residual_ptr, z_ptr, dout_ptr, rstd_ptr, row, hidden, stride_z_row, cols, mask, cols_t, mask_t, GROUPS,
    HAS_RESIDUAL, HAS_Z, BLOCK_G: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):  # fmt: skip
    """Row ``row`` (int64)'s inputs: :func:`_bwd_tile_load` of the tile and of the tail tile (the tile's again when
    there is none), and its rstd per group."""
    x, res, z, dy = _bwd_tile_load(
        x_ptr, residual_ptr, z_ptr, dout_ptr, row * hidden + cols, row * stride_z_row + cols, mask, HAS_RESIDUAL, HAS_Z
    )
    offs_g = tl.arange(0, BLOCK_G)
    rstd = tl.load(rstd_ptr + row * GROUPS + offs_g, mask=offs_g < GROUPS, other=0.0)
    x_t, res_t, z_t, dy_t = x, res, z, dy
    if BLOCK_TAIL > 0:
        x_t, res_t, z_t, dy_t = _bwd_tile_load(
            x_ptr, residual_ptr, z_ptr, dout_ptr, row * hidden + cols_t, row * stride_z_row + cols_t, mask_t,
            HAS_RESIDUAL, HAS_Z,
        )  # fmt: skip
    return x, res, z, dy, x_t, res_t, z_t, dy_t, rstd


@triton.jit
def _bwd_tile_in(
    x, res, z, dy, dz_ptr, out_ptr, offs, dz_offs, mask, w, b, rstd,
    STORE_OUTPUT, HAS_RESIDUAL, HAS_Z, NORM_BEFORE_GATE, HAS_BIAS,
):  # fmt: skip
    """The backward's first half on one tile of a row, from its inputs (:func:`_bwd_tile_load`): s = x + residual;
    stores dz when the gate follows the norm, and the recomputed output when STORE_OUTPUT. Returns s times the gate's
    derivative, the gate, xhat (= xg * rstd), dy (through the gate) and w * dy, whose dot with xhat over the group
    the second half needs."""
    s = x.to(tl.float32)
    if HAS_RESIDUAL:
        s += res.to(tl.float32)
    dy = dy.to(tl.float32)
    xg, gate, dgate = s, s, s
    if HAS_Z:
        z = z.to(tl.float32)
        sig = tl.sigmoid(z)
        gate = z * sig
        dgate = sig * (1.0 + z * (1.0 - sig))
        if NORM_BEFORE_GATE:
            y = s * rstd[:, None] * w
            if HAS_BIAS:
                y += b
            tl.store(dz_ptr + dz_offs, (dy * y * dgate).to(dz_ptr.dtype.element_ty), mask=mask)
            if STORE_OUTPUT:
                tl.store(out_ptr + offs, (y * gate).to(out_ptr.dtype.element_ty), mask=mask)
            dy = dy * gate
        else:
            xg = s * gate
    xhat = xg * rstd[:, None]
    if STORE_OUTPUT:
        if not (HAS_Z and NORM_BEFORE_GATE):
            y = xhat * w
            if HAS_BIAS:
                y += b
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    # After the group's reduction the gate-before-norm path needs s and dgate only as their product: one tensor live
    # across it instead of two.
    return s * dgate, gate, xhat, dy, dy * w


@triton.jit
def _bwd_tile_out(
    dresidual_out_ptr, dx_ptr, dresidual_ptr, dz_ptr, offs, dz_offs, mask, sdg, gate, xhat, wdy, dot, rstd,
    STORE_DRESIDUAL, HAS_DRESIDUAL_OUT, HAS_Z, NORM_BEFORE_GATE,
):  # fmt: skip
    """The second half: dx (and dresidual, and dz when the gate comes before the norm) from the group's mean of
    w * dy * xhat (``dot``)."""
    dxg = (wdy - xhat * dot[:, None]) * rstd[:, None]
    ds = dxg
    if HAS_Z:
        if not NORM_BEFORE_GATE:
            tl.store(dz_ptr + dz_offs, (dxg * sdg).to(dz_ptr.dtype.element_ty), mask=mask)
            ds = dxg * gate
    if HAS_DRESIDUAL_OUT:
        ds += tl.load(dresidual_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, ds.to(dx_ptr.dtype.element_ty), mask=mask)
    if STORE_DRESIDUAL:
        tl.store(dresidual_ptr + offs, ds.to(dresidual_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    x_ptr,
    residual_ptr,
    z_ptr,
    w_ptr,
    b_ptr,
    rstd_ptr,
    dout_ptr,
    dresidual_out_ptr,
    dx_ptr,
    dresidual_ptr,
    dz_ptr,
    dw_ptr,
    db_ptr,
    out_ptr,
    M,
    GROUPS,
    GROUP_SIZE,
    ROWS_PER_PROGRAM,
    stride_z_row,
    stride_dz_row,
    STORE_OUTPUT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    STORE_DRESIDUAL: tl.constexpr,
    HAS_DRESIDUAL_OUT: tl.constexpr,
    HAS_Z: tl.constexpr,
    NORM_BEFORE_GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_GS: tl.constexpr,
    BLOCK_TAIL: tl.constexpr = 0,
    PREFETCH: tl.constexpr = False,
):
    """dx (and dresidual, dz) per row; dw, db as (programs, hidden) fp32 partial sums that the caller reduces.
    x may be the forward's sum s = x + residual itself (its fp32 residual_out), with no residual to add: dresidual,
    which equals dx, is then still written when STORE_DRESIDUAL.
    With STORE_OUTPUT, also the forward's output ``out`` again, from the values the gradients need anyway (cheaper
    than a second forward pass when a following linear layer needs it for its weight gradient).
    A group is one register tile of BLOCK_GS >= GROUP_SIZE columns, or two as in the forward (BLOCK_TAIL > 0:
    columns [0, BLOCK_GS) and the rest in a tile of BLOCK_TAIL), each with its own weight-gradient accumulators."""
    hidden = GROUPS * GROUP_SIZE
    cols, mask, w, b, dw, db = _bwd_tile_setup(w_ptr, b_ptr, GROUPS, GROUP_SIZE, HAS_BIAS, BLOCK_G, BLOCK_GS, 0)
    cols_t, mask_t = cols, mask
    if BLOCK_TAIL > 0:
        cols_t, mask_t, w_t, b_t, dw_t, db_t = _bwd_tile_setup(
            w_ptr, b_ptr, GROUPS, GROUP_SIZE, HAS_BIAS, BLOCK_G, BLOCK_TAIL, BLOCK_GS
        )
    row_start = tl.program_id(0) * ROWS_PER_PROGRAM
    row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, M)
    if PREFETCH:  # the first row's inputs; each row then loads the next one's before its own reduction
        x_n, res_n, z_n, dy_n, x_nt, res_nt, z_nt, dy_nt, rstd_n = _bwd_row_load(
            x_ptr, residual_ptr, z_ptr, dout_ptr, rstd_ptr, tl.full((), 0, tl.int64) + row_start, hidden,
            stride_z_row, cols, mask, cols_t, mask_t, GROUPS, HAS_RESIDUAL, HAS_Z, BLOCK_G, BLOCK_TAIL,
        )  # fmt: skip
    for row in range(row_start, row_end):
        row64 = tl.full((), 0, tl.int64) + row  # int64: rows * hidden may pass 2**31
        base, dz_base = row64 * hidden, row64 * stride_dz_row
        if PREFETCH:
            x, res, z, dy, x_t, res_t, z_t, dy_t, rstd = x_n, res_n, z_n, dy_n, x_nt, res_nt, z_nt, dy_nt, rstd_n
            # The last row loads itself again rather than branch.
            x_n, res_n, z_n, dy_n, x_nt, res_nt, z_nt, dy_nt, rstd_n = _bwd_row_load(
                x_ptr, residual_ptr, z_ptr, dout_ptr, rstd_ptr, tl.minimum(row64 + 1, row_end - 1), hidden,
                stride_z_row, cols, mask, cols_t, mask_t, GROUPS, HAS_RESIDUAL, HAS_Z, BLOCK_G, BLOCK_TAIL,
            )  # fmt: skip
        else:
            x, res, z, dy, x_t, res_t, z_t, dy_t, rstd = _bwd_row_load(
                x_ptr, residual_ptr, z_ptr, dout_ptr, rstd_ptr, row64, hidden, stride_z_row, cols, mask, cols_t,
                mask_t, GROUPS, HAS_RESIDUAL, HAS_Z, BLOCK_G, BLOCK_TAIL,
            )  # fmt: skip
        sdg, gate, xhat, dy, wdy = _bwd_tile_in(
            x, res, z, dy, dz_ptr, out_ptr, base + cols, dz_base + cols, mask, w, b, rstd, STORE_OUTPUT, HAS_RESIDUAL,
            HAS_Z, NORM_BEFORE_GATE, HAS_BIAS,
        )  # fmt: skip
        dot = tl.sum(wdy * xhat, axis=1)
        if BLOCK_TAIL > 0:
            sdg_t, gate_t, xhat_t, dy_t, wdy_t = _bwd_tile_in(
                x_t, res_t, z_t, dy_t, dz_ptr, out_ptr, base + cols_t, dz_base + cols_t, mask_t, w_t, b_t, rstd,
                STORE_OUTPUT, HAS_RESIDUAL, HAS_Z, NORM_BEFORE_GATE, HAS_BIAS,
            )  # fmt: skip
            dot += tl.sum(wdy_t * xhat_t, axis=1)
        dot = dot / GROUP_SIZE
        dw += dy * xhat
        db += dy
        _bwd_tile_out(
            dresidual_out_ptr, dx_ptr, dresidual_ptr, dz_ptr, base + cols, dz_base + cols, mask,
            sdg, gate, xhat, wdy, dot, rstd, STORE_DRESIDUAL, HAS_DRESIDUAL_OUT, HAS_Z, NORM_BEFORE_GATE,
        )  # fmt: skip
        if BLOCK_TAIL > 0:
            dw_t += dy_t * xhat_t
            db_t += dy_t
            _bwd_tile_out(
                dresidual_out_ptr, dx_ptr, dresidual_ptr, dz_ptr, base + cols_t, dz_base + cols_t, mask_t,
                sdg_t, gate_t, xhat_t, wdy_t, dot, rstd, STORE_DRESIDUAL, HAS_DRESIDUAL_OUT, HAS_Z,
                NORM_BEFORE_GATE,
            )  # fmt: skip
    part = tl.program_id(0).to(tl.int64) * hidden
    tl.store(dw_ptr + part + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(db_ptr + part + cols, db, mask=mask)
    if BLOCK_TAIL > 0:
        tl.store(dw_ptr + part + cols_t, dw_t, mask=mask_t)
        if HAS_BIAS:
            tl.store(db_ptr + part + cols_t, db_t, mask=mask_t)
