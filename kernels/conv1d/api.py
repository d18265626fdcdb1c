"""``causal_conv1d_fn`` and ``causal_conv1d_update``: Triton kernels as PyTorch ops, the reference as CPU fallback."""

import os

import torch
import triton

from mambatron.kernels._common import channel_last, new_output, new_output_like_layout, use_triton

from .reference import _check_args, causal_conv1d_fn_ref, causal_conv1d_update_ref, final_states_ref

_IO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# GPU launch configurations by pass and by layout (channel-last or time-contiguous): (BLOCK_D channels, BLOCK_L
# positions, warps, kernel, rows per load group), the fastest of the sweeps in docs/benchmarks.md (conv1d sections).
# Kernels: "shifted" reads each tap as a shifted load (forward only), "slots" shifts aligned tiles in registers,
# "rows" walks a channel-last tile one row of channels at a time (widths up to ROWS_MAX_WIDTH; the group size is
# only its own).
_GPU_FWD = {False: (8, 128, 2, "slots", 0), True: (128, 64, 2, "rows", 4)}
_GPU_BWD = {False: (4, 256, 2, "slots", 0), True: (64, 64, 1, "rows", 8)}
MAX_WIDTH = 9  # the slot kernels shift by at most one slot tile (8 positions)
ROWS_MAX_WIDTH = 4  # the row kernels keep three earlier (and later) rows


def _blocks(table: dict, dim: int, seqlen: int, channel_last: bool, width: int) -> tuple[int, int, int, str, int]:
    """(BLOCK_D, BLOCK_L, warps, kernel, group). The interpreter pays per program, so it takes the whole tensor in as
    few programs as it can, with the GPU's choice of kernel."""
    block_d, block_l, warps, kernel, group = table[channel_last]
    if kernel == "rows" and width > ROWS_MAX_WIDTH:
        kernel = "slots"
    if os.environ.get("TRITON_INTERPRET") == "1":
        block_l = max(min(triton.next_power_of_2(seqlen), 64), 8)
        return min(triton.next_power_of_2(dim), 64), block_l, 4, kernel, min(group, block_l) if group else 0
    return block_d, block_l, warps, kernel, group


def _check_width(width: int) -> None:
    if width > MAX_WIDTH:
        raise ValueError(f"the Triton conv1d kernels take a width of at most {MAX_WIDTH}, got {width}")


def _silu(activation) -> bool:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    return activation is not None


def conv_forward(x, weight, bias, seq_idx, initial_states, silu):
    """The Triton forward on x (batch, dim, seqlen) of any strides; out takes x's layout (channel-last or not)."""
    # Triton is imported on first use: the interpreter only works if TRITON_INTERPRET is set before triton is.
    from . import kernel as k

    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    _check_width(width)
    block_d, block_l, warps, name, group = _blocks(_GPU_FWD, dim, seqlen, channel_last(x), width)
    out = new_output_like_layout(x, x.dtype)
    grid = (batch, triton.cdiv(dim, block_d), triton.cdiv(seqlen, block_l))
    kernel = {"shifted": k._conv_fwd_kernel, "slots": k._conv_fwd_slots_kernel, "rows": k._conv_fwd_rows_kernel}[name]
    extra = dict(GROUP=group) if name == "rows" else {}
    kernel[grid](
        x,
        weight,
        bias,
        initial_states,
        seq_idx,
        out,
        *x.stride(),
        *out.stride(),
        dim,
        seqlen,
        HAS_BIAS=bias is not None,
        HAS_INIT=initial_states is not None,
        HAS_SEQ_IDX=seq_idx is not None,
        SILU=silu,
        WIDTH=width,
        BLOCK_D=block_d,
        BLOCK_L=block_l,
        num_warps=warps,
        **extra,
    )
    return out


def conv_backward(x, weight, bias, seq_idx, initial_states, silu, dout, dx=None):
    """Gradients of :func:`conv_forward`, one kernel launch; dx is written into ``dx`` (any strides) when given.
    Returns dx, dweight, dbias (or None), dinitial_states (or None)."""
    from . import kernel as k

    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    _check_width(width)
    block_d, block_l, warps, name, group = _blocks(_GPU_BWD, dim, seqlen, channel_last(x), width)
    nblocks_l = triton.cdiv(seqlen, block_l)
    dev, f32 = x.device, torch.float32
    dw_part = new_output((batch, nblocks_l, dim, width), f32, dev)
    dbias_part = new_output((batch, nblocks_l, dim), f32, dev) if bias is not None else None
    dx = new_output_like_layout(x, x.dtype) if dx is None else dx
    dinit = new_output(initial_states.shape, initial_states.dtype, dev) if initial_states is not None else None
    kernel = {"slots": k._conv_bwd_slots_kernel, "rows": k._conv_bwd_rows_kernel}[name]
    extra = dict(GROUP=group) if name == "rows" else dict(BLOCK_W=triton.next_power_of_2(width))
    kernel[(batch, triton.cdiv(dim, block_d), nblocks_l)](
        x,
        weight,
        bias,
        initial_states,
        seq_idx,
        dout,
        dx,
        dw_part,
        dbias_part,
        dinit,
        *x.stride(),
        *dout.stride(),
        *dx.stride(),
        dim,
        seqlen,
        HAS_BIAS=bias is not None,
        HAS_INIT=initial_states is not None,
        HAS_SEQ_IDX=seq_idx is not None,
        SILU=silu,
        WIDTH=width,
        BLOCK_D=block_d,
        BLOCK_L=block_l,
        num_warps=warps,
        **extra,
    )
    dweight = dw_part.sum((0, 1)).to(weight.dtype)
    dbias = dbias_part.sum((0, 1)).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias, dinit


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, initial_states, silu):
        out = conv_forward(x, weight, bias, seq_idx, initial_states, silu)
        ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
        dx, dweight, dbias, dinit = conv_backward(x, weight, bias, seq_idx, initial_states, ctx.silu, dout)
        return dx, dweight, dbias, None, dinit, None


def _validate(**named):
    x = named["x"]
    for name, t in named.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
    for name in ("x", "conv_state", "initial_states"):
        t = named.get(name)
        if t is not None and t.dtype not in _IO_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    for name in ("weight", "bias"):
        t = named.get(name)
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    seq_idx = named.get("seq_idx")
    if seq_idx is not None and seq_idx.dtype != torch.int32:
        raise TypeError(f"seq_idx must be int32, got {seq_idx.dtype}")


def causal_conv1d_fn(
    x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False, activation=None
):
    """Causal depthwise conv1d; drop-in for causal-conv1d's ``causal_conv1d_fn`` (see ``reference.py`` for the math).

    Args:
        x: (batch, dim, seqlen) fp16/bf16/fp32; weight: (dim, width); bias: (dim,); seq_idx: (batch, seqlen) int32
        document ids (no tap crosses a document boundary); initial_states: (batch, dim, width - 1);
        activation: None or "silu". x is read through its strides: a channel-last view (``t.transpose(1, 2)`` of a
        (batch, seqlen, dim) slice) is not copied, and out and dx are then channel-last too.
    Returns:
        out (batch, dim, seqlen) in x's dtype, or (out, final_states (batch, dim, width - 1)) when
        return_final_states; differentiable in x, weight, bias and initial_states.
    Runs the Triton kernels on CUDA tensors or under TRITON_INTERPRET=1 for widths up to MAX_WIDTH (9), the PyTorch
    reference otherwise.
    """
    _check_args(x, weight, bias, seq_idx, initial_states)
    _validate(x=x, weight=weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states)
    silu = _silu(activation)
    if not use_triton(x) or weight.shape[1] > MAX_WIDTH:
        return causal_conv1d_fn_ref(x, weight, bias, seq_idx, initial_states, return_final_states, activation)
    contig = lambda t: None if t is None else t.contiguous()
    out = _CausalConv1d.apply(x, weight.contiguous(), contig(bias), contig(seq_idx), contig(initial_states), silu)
    if not return_final_states:
        return out
    # A gather of at most width - 1 inputs per channel: PyTorch ops, differentiable as they are.
    return out, final_states_ref(x, initial_states, seq_idx, weight.shape[1])


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """One decoding step; drop-in for causal-conv1d's ``causal_conv1d_update`` with a width-long state.

    Args:
        x: (batch, dim); conv_state: (batch, dim, width), contiguous, updated in place (shifted left, x appended);
        weight: (dim, width); bias: (dim,); activation: None or "silu".
    Returns:
        out: (batch, dim) in x's dtype. Not differentiable (inference only).
    """
    if x.dim() != 2 or conv_state.dim() != 3 or weight.dim() != 2:
        raise ValueError(
            f"expected x (batch, dim), conv_state (batch, dim, width), weight (dim, width); got {tuple(x.shape)}, "
            f"{tuple(conv_state.shape)}, {tuple(weight.shape)}"
        )
    _validate(x=x, conv_state=conv_state, weight=weight, bias=bias)
    silu = _silu(activation)
    if not use_triton(x):
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
    batch, dim = x.shape
    width = weight.shape[1]
    if weight.shape != (dim, width) or conv_state.shape != (batch, dim, width):
        raise ValueError(
            f"expected weight (dim, width) and conv_state (batch, dim, width) with batch={batch}, dim={dim}; got "
            f"{tuple(weight.shape)} and {tuple(conv_state.shape)}"
        )
    if not conv_state.is_contiguous():
        raise ValueError("conv_state must be contiguous: it is updated in place")
    from .kernel import _conv_update_kernel

    out = new_output(x.shape, x.dtype, x.device)
    block_d = min(triton.next_power_of_2(dim), 256)
    _conv_update_kernel[(batch, triton.cdiv(dim, block_d))](
        x.contiguous(),
        conv_state,
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        out,
        dim,
        HAS_BIAS=bias is not None,
        SILU=silu,
        WIDTH=width,
        BLOCK_D=block_d,
        BLOCK_W=triton.next_power_of_2(width),
    )
    return out
