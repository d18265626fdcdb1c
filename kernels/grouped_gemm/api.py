"""``grouped_linear_fn``: an expert layer's GEMM over all experts in one launch (forward, and both backward GEMMs).

The rows of x arrive sorted by expert (the dispatch's permutation), expert g's ``counts[g]`` rows contiguous. A
loop of one matmul per expert launches 3 × experts GEMMs per layer and step, most of them small; here:
- ``_segment_mm_kernel`` computes every expert's rows in one launch, for the forward (y = x · W[g]ᵀ) and for the
  input gradient (dx = dy · W[g]): its programs walk a schedule of row tiles, each tile inside one expert's rows,
  built on the host from ``counts`` (which the dispatch already has there) and sent to the device once per call;
- ``_segment_wgrad_kernel`` computes each expert's weight gradient dW[g] = dy_gᵀ · x_g, one program per (expert,
  output tile), summing over that expert's rows in fp32.
Weights are read in their own dtype (the fp32 masters) and cast to x's dtype in registers, as F.linear under
autocast would see them; products accumulate in fp32.
"""

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from mambatron.kernels._common import interpreting, new_output, use_triton

from .reference import check_args, grouped_linear_fn_ref

# Tile sizes (rows, output columns, reduction). Tests lower them to exercise many tiles at tiny shapes; tl.dot needs
# every dimension >= 16 on a GPU.
BLOCKS = {"m": 128, "n": 128, "k": 64}
LAUNCH = {"num_warps": 8, "num_stages": 3}


@triton.jit
def _segment_mm_kernel(
    a_ptr, b_ptr, c_ptr, tile_group_ptr, tile_row_ptr, group_end_ptr,
    kdim, ndim, stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_cm, stride_cn,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[rows of tile] = A[rows] · B[g] with B[g] read as a (kdim, ndim) matrix through its strides."""
    tile = tl.program_id(0)
    group = tl.load(tile_group_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.load(group_end_ptr + group)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = offs_m < row_end
    in_n = offs_n < ndim
    b_base = b_ptr + group.to(tl.int64) * stride_bg
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, kdim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < kdim
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)  # fmt: skip
        b = tl.load(b_base + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=in_k[:, None] & in_n[None, :], other=0.0)  # fmt: skip
        acc += tl.dot(a, b.to(a.dtype), input_precision=DOT_PRECISION)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=in_m[:, None] & in_n[None, :])  # fmt: skip


@triton.jit
def _segment_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, group_end_ptr, group_count_ptr,
    out_features, in_features, stride_xm, stride_xk, stride_dym, stride_dyn,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dW[g][n, k] = sum over g's rows m of dy[m, n] x[m, k]; dW is (groups, out_features, in_features) fp32."""
    group = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_n = offs_n < out_features
    in_k = offs_k < in_features
    row_end = tl.load(group_end_ptr + group)
    row_start = row_end - tl.load(group_count_ptr + group)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_m = offs_m < row_end
        dyT = tl.load(dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
                      mask=in_m[None, :] & in_n[:, None], other=0.0)  # fmt: skip
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)  # fmt: skip
        acc += tl.dot(dyT, x.to(dyT.dtype), input_precision=DOT_PRECISION)
    group_base = dw_ptr + group.to(tl.int64) * out_features * in_features
    tl.store(group_base + offs_n[:, None] * in_features + offs_k[None, :], acc,
             mask=in_n[:, None] & in_k[None, :])  # fmt: skip


def _dot_precision(t: torch.Tensor) -> str:
    """fp32 inputs multiply as fp32 (the op matches F.linear), not as TF32; the setting is moot for 16-bit inputs."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


class _Schedule:
    """Row tiles of BLOCKS['m'] rows, each inside one group, and each group's row count and end, on x's device."""

    def __init__(self, counts: list[int], device: torch.device):
        block_m = BLOCKS["m"]
        c = torch.tensor(counts, dtype=torch.int64)
        ends = torch.cumsum(c, 0)
        tiles = (c + block_m - 1) // block_m
        group = torch.repeat_interleave(torch.arange(len(counts)), tiles)
        first_tile = torch.cumsum(tiles, 0) - tiles
        rows = (ends - c)[group] + (torch.arange(int(tiles.sum())) - first_tile[group]) * block_m
        packed = torch.stack([ends, c]).to(torch.int32)
        self.ntiles = int(tiles.sum())
        self.tile_group = group.to(torch.int32).to(device, non_blocking=True)
        self.tile_row = rows.to(torch.int32).to(device, non_blocking=True)
        self.group_end, self.group_count = packed.to(device, non_blocking=True).unbind(0)


def _segment_mm(a: torch.Tensor, b: torch.Tensor, b_strides: tuple[int, int, int], ndim: int, sched: _Schedule):
    rows, kdim = a.shape
    c = new_output((rows, ndim), a.dtype, a.device)
    if sched.ntiles == 0 or ndim == 0:
        return c.zero_()
    grid = (sched.ntiles, triton.cdiv(ndim, BLOCKS["n"]))
    _segment_mm_kernel[grid](
        a, b, c, sched.tile_group, sched.tile_row, sched.group_end,
        kdim, ndim, *a.stride(), *b_strides, *c.stride(),
        DOT_PRECISION=_dot_precision(a), BLOCK_M=BLOCKS["m"], BLOCK_N=BLOCKS["n"], BLOCK_K=BLOCKS["k"],
        **({} if interpreting() else LAUNCH),
    )  # fmt: skip
    return c


def _segment_wgrad(x: torch.Tensor, dy: torch.Tensor, groups: int, sched: _Schedule) -> torch.Tensor:
    out_features, in_features = dy.shape[1], x.shape[1]
    dw = new_output((groups, out_features, in_features), torch.float32, x.device)
    grid = (groups, triton.cdiv(out_features, BLOCKS["n"]), triton.cdiv(in_features, BLOCKS["k"]))
    _segment_wgrad_kernel[grid](
        x, dy, dw, sched.group_end, sched.group_count,
        out_features, in_features, *x.stride(), *dy.stride(),
        DOT_PRECISION=_dot_precision(x), BLOCK_M=BLOCKS["m"], BLOCK_N=BLOCKS["n"], BLOCK_K=BLOCKS["k"],
        **({} if interpreting() else LAUNCH),
    )  # fmt: skip
    return dw


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, counts):
        sched = _Schedule(counts, x.device)
        groups, out_features, in_features = weight.shape
        # y = x · W[g]ᵀ: B[g] as (in_features, out_features) is W[g] transposed.
        y = _segment_mm(x, weight, (weight.stride(0), weight.stride(2), weight.stride(1)), out_features, sched)
        ctx.save_for_backward(x, weight)
        ctx.sched = sched
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        sched = ctx.sched
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # dx = dy · W[g]: B[g] as (out_features, in_features) is W[g] itself.
            dx = _segment_mm(dy, weight, (weight.stride(0), weight.stride(1), weight.stride(2)), weight.shape[2],
                             sched)  # fmt: skip
        if ctx.needs_input_grad[1]:
            dw = _segment_wgrad(x, dy, weight.shape[0], sched).to(weight.dtype)
        return dx, dw, None


def grouped_linear_fn(x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """As :func:`grouped_linear_fn_ref` (the spec), in Triton on CUDA tensors or under TRITON_INTERPRET=1; the
    reference otherwise, and for fp64."""
    counts = check_args(x, weight, counts)
    if x.dtype == torch.float64 or not use_triton(x, weight):
        return grouped_linear_fn_ref(x, weight, counts)
    if torch.is_autocast_enabled(x.device.type):  # the reference's F.linear would run in the autocast dtype
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if max(x.numel(), x.shape[0] * weight.shape[1], weight.numel()) >= 2**31:
        raise ValueError("grouped_linear: 2**31 elements or more overflow the kernels' 32-bit offsets; split the rows")
    return _GroupedLinear.apply(x.contiguous(), weight, tuple(counts))
