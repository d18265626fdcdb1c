"""``rms_norm_fn`` and ``rmsnorm_fn``: Triton RMSNorms as PyTorch ops, with the references as the CPU fallback."""

import os

import torch
import triton

from mambatron.kernels._common import new_output, use_triton

from .reference import _check_affine, rms_norm_fn_ref, rmsnorm_fn_ref

_IO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Programs per SM (0: one row per program) and warps (for rows of at least 4096 elements, and shorter) of each
# kernel. The backward walks several rows per program so that the weight-gradient partial sums stay small. From the
# H200 sweeps in docs/benchmarks.md (tools/sweep_norm.py; the backward's from its --bwd sweep of 2026-12-04 at
# Mamba2-2.7B's widths, where 2 programs per SM beat 4 and 8).
LAUNCH = {"fwd": (0, 8, 4), "bwd": (2, 16, 8)}
# The forward holds a group in one register tile padded to a power of two, except:
# - a group of more than FWD_SPLIT_ABOVE columns that is not a power of two is held in two tiles, the largest power
#   of two below its size and the rest padded (Mamba2-2.7B's d_inner 5120 as 4096 + 1024, d_model 2560 as 2048 +
#   512), where that holds fewer columns than the padded tile; 0 never splits;
# - otherwise, a group whose padded tile would hold more than FWD_CHUNK_ABOVE elements is normalised in
#   FWD_CHUNK-column chunks, read twice (the second time from cache), by FWD_CHUNK / 256 warps; FWD_CHUNK = 0 pads.
FWD_SPLIT_ABOVE = 2048
FWD_CHUNK, FWD_CHUNK_ABOVE = 2048, 4096
# The backward can split such groups the same way, above BWD_SPLIT_ABOVE columns (0: one padded tile); it never
# chunks. For groups of more than BWD_PREFETCH_ABOVE columns (0: never) a backward program loads its next row's
# inputs before the current row's reduction, so that its one program per SM still has loads in flight while it
# computes. H200, 8 x 2048 rows (docs/benchmarks.md, 2026-12-04 last): split tiles alone ran slower than the padded
# tile at every launch swept (the gated 5120: 0.44 against 0.39 ms), split and prefetched faster at every width:
# pre-norm 2048 / 2560 0.198 / 0.249 -> 0.167 / 0.221 ms, gated 4096 / 5120 0.283 / 0.388 -> 0.233 / 0.340 ms.
BWD_SPLIT_ABOVE = 2048
BWD_PREFETCH_ABOVE = 1


def _launch(rows: int, hidden: int, device: torch.device, kind: str) -> tuple[int, int, int]:
    """(programs, rows per program, warps). The interpreter pays per program, so it gets one."""
    if os.environ.get("TRITON_INTERPRET") == "1" and device.type != "cuda":
        return 1, rows, 4
    per_sm, wide_warps, warps = LAUNCH[kind]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = rows if per_sm == 0 else min(rows, per_sm * sms)
    per_program = triton.cdiv(rows, programs)
    return triton.cdiv(rows, per_program), per_program, wide_warps if hidden >= 4096 else warps


def _fwd_tiles(group_size: int, split_above: int, chunk: int, chunk_above: int) -> tuple[bool, int, int, int | None]:
    """(chunked, column block, tail block (0: none), warps or None for the launch table's) of the forward for groups
    of ``group_size`` (see FWD_SPLIT_ABOVE and FWD_CHUNK)."""
    block = triton.next_power_of_2(group_size)
    if block == group_size:
        return False, block, 0, None
    if split_above and group_size > split_above:
        head = block // 2
        tail = triton.next_power_of_2(group_size - head)
        if head + tail < block:
            return False, head, tail, None
    if chunk and block > chunk_above:
        block = min(chunk, block)
        return True, block, 0, max(1, block // 256)
    return False, block, 0, None


def row_stride(t: torch.Tensor) -> int | None:
    """The row stride of t seen as (rows, hidden) without a copy (unit-stride rows at a uniform stride), or None."""
    if t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1]).stride(0)
    except RuntimeError:
        return None


def norm_forward(x, residual, z, weight, bias, eps, group_size, norm_before_gate, prenorm, residual_dtype):
    """The Triton forward: x, residual, weight, bias contiguous; z with unit-stride rows (see :func:`row_stride`).
    Returns out, residual_out (or None) and rstd (rows, groups) fp32."""
    from .kernel import _norm_fwd_kernel

    shape, hidden = x.shape, x.shape[-1]
    rows = x.numel() // hidden
    groups = hidden // group_size
    programs, per_program, warps = _launch(rows, hidden, x.device, "fwd")
    chunked, block, tail, chunk_warps = _fwd_tiles(group_size, FWD_SPLIT_ABOVE, FWD_CHUNK, FWD_CHUNK_ABOVE)
    out = new_output(shape, x.dtype, x.device)
    residual_out = new_output(shape, residual_dtype, x.device) if prenorm else None
    rstd = new_output((rows, groups), torch.float32, x.device)
    _norm_fwd_kernel[(programs,)](
        x, residual, z, weight, bias, out, residual_out, rstd,
        rows, groups, group_size, eps, per_program, row_stride(z) if z is not None else 0,
        HAS_RESIDUAL=residual is not None,
        STORE_RESIDUAL=prenorm,
        HAS_Z=z is not None,
        NORM_BEFORE_GATE=norm_before_gate,
        HAS_BIAS=bias is not None,
        CHUNKED=chunked,
        BLOCK_G=triton.next_power_of_2(groups),
        BLOCK_GS=block,
        BLOCK_TAIL=tail,
        num_warps=chunk_warps or warps,
    )  # fmt: skip
    return out, residual_out, rstd


def norm_backward(
    x, residual, z, weight, bias, rstd, norm_before_gate, dout, dresidual_out=None, dz=None, out_dtype=None,
    summed_dtypes=None,
):  # fmt: skip
    """Gradients of :func:`norm_forward`; dz is written into ``dz`` (unit-stride rows, any row stride) when given.
    Returns dx, dresidual (or None), dz (or None), dweight, dbias (or None) in the inputs' dtypes. Given
    ``out_dtype``, also the forward's output recomputed in that dtype (from the same kernel pass), as a sixth value.
    Given ``summed_dtypes`` = (x's dtype, residual's dtype or None), ``x`` is the forward's fp32 sum x + residual
    (its residual_out) and ``residual`` is None: the gradients are the same, in those dtypes."""
    from .kernel import _norm_bwd_kernel

    shape, hidden = x.shape, x.shape[-1]
    rows, groups = rstd.shape
    programs, per_program, warps = _launch(rows, hidden, x.device, "bwd")
    _, block, tail, _ = _fwd_tiles(hidden // groups, BWD_SPLIT_ABOVE, 0, 0)
    dev = x.device
    dout = torch.zeros_like(x) if dout is None else dout.contiguous()
    dresidual_out = None if dresidual_out is None else dresidual_out.contiguous()
    if summed_dtypes is None:
        summed_dtypes = (x.dtype, None if residual is None else residual.dtype)
    else:
        assert residual is None, "x is already the sum x + residual"
    dx = new_output(shape, summed_dtypes[0], dev)
    dresidual = new_output(shape, summed_dtypes[1], dev) if summed_dtypes[1] is not None else None
    if z is not None and dz is None:
        dz = new_output(shape, z.dtype, dev)
    dw_part = new_output((programs, hidden), torch.float32, dev)
    out = new_output(shape, out_dtype, dev) if out_dtype is not None else None
    db_part = new_output((programs, hidden), torch.float32, dev) if bias is not None else None
    _norm_bwd_kernel[(programs,)](
        x, residual, z, weight, bias, rstd, dout, dresidual_out, dx, dresidual, dz, dw_part, db_part, out,
        rows, groups, hidden // groups, per_program,
        row_stride(z) if z is not None else 0, row_stride(dz) if dz is not None else 0,
        STORE_OUTPUT=out is not None,
        HAS_RESIDUAL=residual is not None,
        STORE_DRESIDUAL=dresidual is not None,
        HAS_DRESIDUAL_OUT=dresidual_out is not None,
        HAS_Z=z is not None,
        NORM_BEFORE_GATE=norm_before_gate,
        HAS_BIAS=bias is not None,
        BLOCK_G=triton.next_power_of_2(groups),
        BLOCK_GS=block,
        BLOCK_TAIL=tail,
        PREFETCH=bool(BWD_PREFETCH_ABOVE) and hidden // groups > BWD_PREFETCH_ABOVE,
        num_warps=warps,
    )  # fmt: skip
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    if out_dtype is not None:
        return dx, dresidual, dz, dweight, dbias, out
    return dx, dresidual, dz, dweight, dbias


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, z, weight, bias, eps, group_size, norm_before_gate, prenorm, residual_dtype):
        out, residual_out, rstd = norm_forward(
            x, residual, z, weight, bias, eps, group_size, norm_before_gate, prenorm, residual_dtype
        )
        # The backward needs x + residual only. An fp32 residual_out is that sum exactly (added in fp32), and the
        # next layer holds it anyway as its residual input: keeping it instead of x and residual saves one x-sized
        # tensor per layer (the mixer's output, which is then freed as soon as this norm has read it).
        ctx.summed_dtypes = None
        if residual_out is not None and residual_out.dtype == torch.float32:
            ctx.summed_dtypes = (x.dtype, None if residual is None else residual.dtype)
            x, residual = residual_out, None
        ctx.save_for_backward(x, residual, z, weight, bias, rstd)
        ctx.norm_before_gate = norm_before_gate
        ctx.set_materialize_grads(False)
        return (out, residual_out) if prenorm else out

    @staticmethod
    def backward(ctx, dout, dresidual_out=None):
        x, residual, z, weight, bias, rstd = ctx.saved_tensors
        dx, dresidual, dz, dweight, dbias = norm_backward(
            x, residual, z, weight, bias, rstd, ctx.norm_before_gate, dout, dresidual_out,
            summed_dtypes=ctx.summed_dtypes,
        )  # fmt: skip
        return dx, dresidual, dz, dweight, dbias, None, None, None, None, None


def _validate(x, weight, bias, **others):
    _check_affine(x, weight, bias)
    named = dict(x=x, weight=weight, bias=bias, **others)
    for name, t in named.items():
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
        if t.dtype not in _IO_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if name not in ("weight", "bias") and t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")


def rms_norm_fn(x, weight, bias=None, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False):
    """Fused residual-add + RMSNorm; drop-in for mamba_ssm's ``rms_norm_fn`` (see ``reference.py`` for the math).

    Args:
        x: (..., hidden) fp16/bf16/fp32; weight, bias: (hidden,); residual: (..., hidden) or None.
        Non-contiguous inputs are copied.
    Returns:
        out (..., hidden) in x's dtype, or (out, residual_out) when prenorm: residual_out = x + residual in fp32 when
        residual_in_fp32, else in residual's (or x's) dtype. Differentiable in x, residual, weight and bias.
    Runs the Triton kernels on CUDA tensors or under TRITON_INTERPRET=1, the PyTorch reference otherwise.
    """
    _validate(x, weight, bias, residual=residual)
    if not use_triton(x):
        return rms_norm_fn_ref(x, weight, bias, residual, eps, prenorm, residual_in_fp32)
    if residual_in_fp32:
        residual_dtype = torch.float32
    else:
        residual_dtype = x.dtype if residual is None else residual.dtype
    contig = lambda t: None if t is None else t.contiguous()
    hidden = x.shape[-1]
    return _Norm.apply(
        x.contiguous(), contig(residual), None, weight.contiguous(), contig(bias), eps, hidden, True, prenorm,
        residual_dtype,
    )  # fmt: skip


def rmsnorm_fn(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Gated group-wise RMSNorm; drop-in for mamba_ssm's ``layernorm_gated.rmsnorm_fn``.

    Args:
        x: (..., hidden) fp16/bf16/fp32; weight, bias: (hidden,); z: (..., hidden) gate or None; group_size divides
        hidden (None: one group); norm_before_gate: norm(x) * silu(z) if True, norm(x * silu(z)) if False (Mamba2).
        Non-contiguous inputs are copied, except a z whose rows are unit-stride at a uniform row stride (such as
        a column slice of Mamba2's in_proj output), which is read in place.
    Returns:
        out: (..., hidden) in x's dtype; differentiable in x, z, weight and bias.
    Runs the Triton kernels on CUDA tensors or under TRITON_INTERPRET=1, the PyTorch reference otherwise.
    """
    _validate(x, weight, bias, z=z)
    hidden = x.shape[-1]
    group_size = hidden if group_size is None else group_size
    if hidden % group_size != 0:
        raise ValueError(f"group_size={group_size} must divide hidden={hidden}")
    if not use_triton(x):
        return rmsnorm_fn_ref(x, weight, bias, z, eps, group_size, norm_before_gate)
    contig = lambda t: None if t is None else t.contiguous()
    if z is not None and row_stride(z) is None:
        z = z.contiguous()
    return _Norm.apply(
        x.contiguous(), None, z, weight.contiguous(), contig(bias), eps, group_size, norm_before_gate, False, None
    )
