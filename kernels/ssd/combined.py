"""`mamba_chunk_scan_combined`: the SSD scan as one autograd op over the Triton stages.

Forward: chunk_cumsum → chunk_state → state_passing → bmm_chunk → chunk_scan (5 launches). Backward recomputes the chunk
states and CB instead of saving them (they are the largest intermediates; 3 launches; the fused Mamba2 op can keep the
states instead, ``keep_states``), then runs the fused gradient kernels of chunk_scan.py, state_passing's reverse
recurrence and chunk_cumsum's backward (6 launches, 7 with z), plus small torch reductions of per-tile partial sums
(kept instead of atomics, so results are deterministic). Saved for backward: the inputs, dt_out/dA_cumsum
(batch·nheads·seqlen fp32 each), and with z the output before the gate (for dz).
"""

import torch

from mambatron.kernels.ssd._common import interpreting
from mambatron.kernels.ssd.bmm import bmm_chunk_fwd
from mambatron.kernels.ssd.chunk_cumsum import chunk_cumsum_bwd, chunk_cumsum_fwd
from mambatron.kernels.ssd.chunk_scan import (
    chunk_scan_bwd_dbdc,
    chunk_scan_bwd_dcb,
    chunk_scan_bwd_dstates,
    chunk_scan_bwd_dx,
    chunk_scan_fwd,
    gate_bwd,
)
from mambatron.kernels.ssd.chunk_state import chunk_state_fwd
from mambatron.kernels.ssd.reference import NO_DT_LIMIT, document_index, mamba_chunk_scan_combined_ref
from mambatron.kernels.ssd.state_passing import state_passing_bwd, state_passing_fwd

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The kernels index memory with 32-bit offsets.
_MAX_ELEMENTS = 2**31 - 1


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    """Storage dtype of the per-chunk states and their gradients between kernels.

    Their consumers round them to x's dtype for tl.dot anyway, so bf16/fp16 storage halves the largest memory traffic
    of the scan at no cost in accuracy; the recurrences themselves run in fp32.
    """
    return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32


def ssd_forward(
    x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit, keep_states=False
):  # fmt: skip
    """The Triton forward (5 launches). Returns out, final_states (fp32) and ``saved``: what :func:`ssd_backward`
    needs besides the inputs (out_x before the gate or None, dt_out and dA_cumsum, fp32 batch·nheads·seqlen each, and
    with keep_states the states entering each chunk, which the backward otherwise recomputes; else None)."""
    dA_cumsum, dt_out = chunk_cumsum_fwd(dt, A, chunk_size, dt_bias, dt_softplus, dt_limit)
    states = chunk_state_fwd(B, x, dt_out, dA_cumsum, seq_idx)
    prev_states, final_states = state_passing_fwd(states, dA_cumsum, initial_states, seq_idx, _state_dtype(x))
    del states
    CB = bmm_chunk_fwd(C, B, chunk_size, seq_idx)
    out, out_x = chunk_scan_fwd(CB, x, dt_out, dA_cumsum, C, prev_states, D, z, seq_idx)
    return out, final_states, (out_x, dt_out, dA_cumsum, prev_states if keep_states else None)


def ssd_backward(
    x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit, saved, dout,
    dfinal_states, dx=None, dB=None, dC=None, ddt=None,
):  # fmt: skip
    """Gradients of :func:`ssd_forward`; dout or dfinal_states may be None. dx, dB, dC and ddt are written into the
    given tensors (any strides, e.g. slices of one in_proj gradient) when passed.

    Returns dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states (dA, dD, ddt_bias and dinitial_states fp32).
    """
    out_x, dt_out, dA_cumsum, prev_states = saved
    # The gradient kernels index dy as a contiguous (batch, seqlen, nheads, headdim) tensor.
    dout = torch.zeros(x.shape, device=x.device, dtype=x.dtype) if dout is None else dout.contiguous()
    if dfinal_states is not None:
        dfinal_states = dfinal_states.contiguous()
    if prev_states is None:
        states = chunk_state_fwd(B, x, dt_out, dA_cumsum, seq_idx)
        prev_states, _ = state_passing_fwd(states, dA_cumsum, initial_states, seq_idx, _state_dtype(x))
        del states
    CB = bmm_chunk_fwd(C, B, chunk_size, seq_idx)
    dy, dz = gate_bwd(dout, z, out_x, chunk_size) if z is not None else (dout, None)
    dprev_states = chunk_scan_bwd_dstates(dy, C, dA_cumsum, seq_idx)
    dstates, dinitial_states, ddA_chunk_passing = state_passing_bwd(
        prev_states, dprev_states, dA_cumsum, dfinal_states, seq_idx, _state_dtype(x)
    )
    del dprev_states
    dx, ddt_out, ddA_cumsum, ddA_chunk, dD = chunk_scan_bwd_dx(
        CB, x, dy, dt_out, dA_cumsum, B, dstates, D, seq_idx, dx=dx
    )
    dCB, ddA_diag = chunk_scan_bwd_dcb(dy, x, dt_out, dA_cumsum, CB, seq_idx)
    del CB
    dB, dC, ddA_prev = chunk_scan_bwd_dbdc(
        dCB, B, C, dy, x, dt_out, dA_cumsum, prev_states, dstates, seq_idx, dB=dB, dC=dC
    )
    ddt, dA, ddt_bias = chunk_cumsum_bwd(
        ddA_cumsum + ddA_diag + ddA_prev, ddA_chunk + ddA_chunk_passing, ddt_out, dt, A, dt_out, dt_bias,
        dt_softplus, dt_limit, ddt=ddt,
    )  # fmt: skip
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states


class MambaChunkScanCombinedFn(torch.autograd.Function):
    """Returns (out, final_states); arguments as mamba_chunk_scan_combined, seq_idx already renumbered."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit):
        out, final_states, saved = ssd_forward(
            x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit
        )
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, *saved)
        ctx.chunk_size, ctx.dt_softplus, ctx.dt_limit = chunk_size, dt_softplus, dt_limit
        ctx.set_materialize_grads(False)
        return out, final_states

    @staticmethod
    def backward(ctx, dout, dfinal_states):
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, *saved = ctx.saved_tensors
        dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states = ssd_backward(
            x, dt, A, B, C, ctx.chunk_size, D, z, dt_bias, initial_states, seq_idx, ctx.dt_softplus, ctx.dt_limit,
            saved, dout, dfinal_states,
        )  # fmt: skip
        return (
            dx,
            ddt,
            dA.to(A.dtype),
            dB,
            dC,
            None,
            dD.to(D.dtype) if D is not None else None,
            dz,
            ddt_bias.to(dt_bias.dtype) if dt_bias is not None else None,
            dinitial_states.to(initial_states.dtype) if initial_states is not None else None,
            None,
            None,
            None,
        )


def _check_shape(name, t, shape):
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"mamba_chunk_scan_combined: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_limit):
    if x.dim() != 4:
        raise ValueError(f"mamba_chunk_scan_combined: x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    if B.dim() != 4:
        raise ValueError(f"mamba_chunk_scan_combined: B must be (batch, seqlen, ngroups, dstate), got {tuple(B.shape)}")
    ngroups, dstate = B.shape[2:]
    _check_shape("dt", dt, (batch, seqlen, nheads))
    _check_shape("A", A, (nheads,))
    _check_shape("B", B, (batch, seqlen, ngroups, dstate))
    _check_shape("C", C, (batch, seqlen, ngroups, dstate))
    _check_shape("z", z, x.shape)
    _check_shape("dt_bias", dt_bias, (nheads,))
    _check_shape("initial_states", initial_states, (batch, nheads, headdim, dstate))
    _check_shape("seq_idx", seq_idx, (batch, seqlen))
    if D is not None and tuple(D.shape) not in ((nheads,), (nheads, headdim)):
        raise ValueError(
            f"mamba_chunk_scan_combined: D must have shape ({nheads},) or ({nheads}, {headdim}), got {tuple(D.shape)}"
        )
    if nheads % ngroups != 0:
        raise ValueError(f"mamba_chunk_scan_combined: nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"mamba_chunk_scan_combined: chunk_size must be a positive int, got {chunk_size!r}")
    if len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"mamba_chunk_scan_combined: dt_limit must be (min, max) with min <= max, got {dt_limit}")
    tensors = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states)
    for name, t in tensors.items():
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"mamba_chunk_scan_combined: {name} must be fp16, bf16, fp32 or fp64, got {t.dtype}")
    if seq_idx is not None and seq_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"mamba_chunk_scan_combined: seq_idx must be int32 or int64, got {seq_idx.dtype}")
    for name, t in {**tensors, "seq_idx": seq_idx}.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"mamba_chunk_scan_combined: {name} is on {t.device} but x is on {x.device}")


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Mamba2 SSD scan (mamba_ssm's function of the same name and arguments).

    x, z: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); A, dt_bias: (nheads,);
    B, C: (batch, seqlen, ngroups, dstate); D: (nheads,) or (nheads, headdim);
    initial_states: (batch, nheads, headdim, dstate); seq_idx: (batch, seqlen) int, state reset where it changes.
    Semantics in `reference.py`. Any strides are accepted. Returns y: (batch, seqlen, nheads, headdim) in x's dtype,
    or (y, final_states) with final_states (batch, nheads, headdim, dstate) fp32.

    Runs the Triton kernels (computing in fp32) when x is on CUDA or TRITON_INTERPRET=1, and
    mamba_chunk_scan_combined_ref otherwise or for fp64 inputs.
    """
    _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_limit)
    if x.dtype == torch.float64 or not (x.is_cuda or interpreting()):
        return mamba_chunk_scan_combined_ref(
            x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
            return_final_states,
        )  # fmt: skip
    batch, seqlen, nheads, headdim = x.shape
    nchunks = -(-seqlen // chunk_size)
    states_numel = batch * nchunks * nheads * headdim * B.shape[-1]
    if max(x.numel(), B.numel(), states_numel, batch * nchunks * chunk_size * nheads) > _MAX_ELEMENTS:
        raise ValueError(
            "mamba_chunk_scan_combined: tensors of 2**31 elements or more (x, B/C, or the per-chunk states "
            f"batch·nchunks·nheads·headdim·dstate = {states_numel}) overflow the kernels' 32-bit offsets; "
            "split the batch"
        )
    if seq_idx is not None:
        seq_idx = document_index(seq_idx).contiguous()
    out, final_states = MambaChunkScanCombinedFn.apply(
        x, dt, A.contiguous(), B, C, chunk_size,
        D.contiguous() if D is not None else None, z,
        dt_bias.contiguous() if dt_bias is not None else None,
        initial_states.contiguous() if initial_states is not None else None,
        seq_idx, dt_softplus, tuple(dt_limit),
    )  # fmt: skip
    return (out, final_states) if return_final_states else out
