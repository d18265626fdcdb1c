"""``selective_scan_fn``: the Triton selective scan as an autograd op, with the reference as the CPU fallback."""

import os

import torch
import triton

from mambatron.kernels._common import new_output, use_triton

from .reference import _check_args, selective_scan_fn_ref

_IO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _launch_config(P: int, dstate: int, backward: bool = False) -> dict:
    """Tile sizes: the kernels scan (BLOCK_D, CHUNK) fp32 tiles, one state index at a time."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter pays per program and per scanned element: one program per group, short chunks (the
        # backward's twice the forward's, as on a GPU, so that the forward saves only every other state).
        return dict(CHUNK=32 if backward else 16, BLOCK_D=min(triton.next_power_of_2(P), 64),
                    BLOCK_N=triton.next_power_of_2(dstate), num_warps=4)  # fmt: skip
    cfg = dict(_GPU_BWD if backward else _GPU_FWD)
    return dict(cfg, BLOCK_D=min(triton.next_power_of_2(P), cfg["BLOCK_D"]), BLOCK_N=triton.next_power_of_2(dstate))


# Swept on an H200 at batch 8, dim 4096, seqlen 2048, dstate 16 (bf16; docs/benchmarks.md, 33 variants): one warp
# per program, so that every reduction across channels or time stays inside the warp (shuffles, no shared-memory
# round trip or block barrier), and registers capped at 128 so that more programs are resident per SM (the few
# spills cost less than the idle issue slots did). The forward scans 4 channels × 64 steps; the backward, which
# holds about twice the live tiles, one channel × 256 steps, and it reads the state entering each of its chunks,
# which is all the forward keeps: 8 states per row here, 4 bytes × dstate × dim × batch each (17 MB per layer).
_GPU_FWD = dict(CHUNK=64, BLOCK_D=4, num_warps=1, maxnreg=128)
_GPU_BWD = dict(CHUNK=256, BLOCK_D=1, num_warps=1, maxnreg=128)


def _use_asm(cfg: dict, seqlen: int, *tensors: torch.Tensor | None) -> bool:
    """Whether the backward runs its inline-PTX adjoint (kernel.py): only at the GPU tiling where each lane holds 8
    consecutive steps of the one row of 256 (one warp, BLOCK_D 1). The compiler picks 8 steps per lane for 16-bit
    tiles whose rows it can prove 16-byte aligned, which it derives from the arguments it specializes: data pointers
    aligned to 16 bytes, strides and the length divisible by 16 (without that, Triton 3.9 gives each lane 8 steps 32
    apart). Elsewhere, and with ``MAMBATRON_SCAN_ASM=0``, the backward runs Triton's scan (same results). The PTX
    itself stops the kernel (``trap``) if a lane's 8 values are not consecutive steps, rather than scan them wrongly."""
    return (
        (cfg["CHUNK"], cfg["BLOCK_D"], cfg["num_warps"]) == (256, 1, 1)
        and _elementwise_ptx()
        and seqlen % 16 == 0
        and all(t is None or _aligned_16bit(t) for t in tensors)
    )


def _elementwise_ptx() -> bool:
    """Whether the kernels may run inline PTX at all, and so their per-element PTX (kernel._store_where, _log2, _silu,
    _sigmoid): on a GPU unless ``MAMBATRON_SCAN_ASM=0``. Unlike the backward's adjoint block (:func:`_use_asm`) it
    is correct at any tiling (each instruction works per element)."""
    return os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("MAMBATRON_SCAN_ASM", "1") != "0"


def _aligned_16bit(t: torch.Tensor) -> bool:
    return t.element_size() == 2 and t.data_ptr() % 16 == 0 and all(s % 16 == 0 for s in t.stride()[:-1])


def _time_major(t: torch.Tensor | None) -> torch.Tensor | None:
    """t itself when its time axis (the last) has unit stride, else a time-contiguous copy.

    The kernels load (BLOCK_D, CHUNK) tiles along time. Through a channel-last view each of those loads strides by
    dim, and a Mamba1-1.4B step on an H200 ran its scan 3x slower that way than after one copy per tensor
    (docs/benchmarks.md), so strided inputs are staged here and the kernels only ever see time-contiguous rows.
    """
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _bdl_strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else tuple(t.stride())


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx):
    """The Triton forward on time-contiguous u, delta, z (batch, dim, seqlen) and B, C (batch, groups, dstate,
    seqlen). Returns out (time-contiguous, u's dtype), last_state (batch, dim, dstate) fp32 and the fp32 state at
    every chunk start, which is all :func:`scan_backward` needs besides the inputs."""
    # Triton is imported on first use, not with the package: the interpreter only works if TRITON_INTERPRET is
    # set before triton itself is imported, and CPU-only users of the reference should not pay for the import.
    from .kernel import _scan_fwd_kernel

    batch, dim, seqlen = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    P = dim // groups
    cfg = _launch_config(P, dstate)
    bwd_chunk = _launch_config(P, dstate, backward=True)["CHUNK"]
    assert bwd_chunk % cfg["CHUNK"] == 0, "the backward's chunk must be a multiple of the forward's"
    nchunks = triton.cdiv(seqlen, cfg["CHUNK"])
    out = new_output((batch, dim, seqlen), u.dtype, u.device)
    last_state = new_output((batch, dim, dstate), torch.float32, u.device)
    # Only the states the backward starts its chunks from are kept (every bwd_chunk steps).
    chunk_states = new_output((batch, dim, triton.cdiv(seqlen, bwd_chunk), dstate), torch.float32, u.device)
    h_buf = new_output((2, batch, dim, dstate), torch.float32, u.device)
    grid = (batch, groups, triton.cdiv(P, cfg["BLOCK_D"]))
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, out, last_state, chunk_states, h_buf,
        *u.stride(), *delta.stride(), *_bdl_strides(z), *out.stride(), *B.stride(), *C.stride(),
        dim, P, seqlen, dstate, nchunks,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus,
        HAS_H0=initial_state is not None,
        HAS_SEQ_IDX=seq_idx is not None,
        SAVE_EVERY=bwd_chunk // cfg["CHUNK"],
        PTX=_elementwise_ptx(),
        **cfg,
    )  # fmt: skip
    return out, last_state, chunk_states


def scan_backward(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx, chunk_states, dout, dlast, dz=None
):  # fmt: skip
    """Gradients of :func:`scan_forward` for a time-contiguous dout (dlast may be None). dz is written into ``dz``
    (any strides) when given. Returns du, ddelta (time-contiguous), dA, dB, dC, dD, dz, ddelta_bias, dinitial_state,
    with dA, dD, ddelta_bias, dinitial_state in fp32 and dB, dC fp32 (batch, groups, dstate, seqlen)."""
    from .kernel import _scan_bwd_kernel

    batch, dim, seqlen = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    P = dim // groups
    cfg = _launch_config(P, dstate, backward=True)
    nblocks = triton.cdiv(P, cfg["BLOCK_D"])
    nchunks = triton.cdiv(seqlen, cfg["CHUNK"])
    assert chunk_states.shape[2] == nchunks, "chunk_states must hold the state entering each backward chunk"
    dev, f32 = u.device, torch.float32
    dlast = None if dlast is None else dlast.contiguous()
    du = new_output(u.shape, u.dtype, dev)
    ddelta = new_output(delta.shape, delta.dtype, dev)
    if z is not None and dz is None:
        dz = new_output(z.shape, z.dtype, dev)
    dA_part = new_output((batch, dim, dstate), f32, dev)
    dB = torch.zeros((batch, groups, dstate, seqlen), dtype=f32, device=dev)
    dC = torch.zeros((batch, groups, dstate, seqlen), dtype=f32, device=dev)
    dD_part = new_output((batch, dim), f32, dev) if D is not None else None
    dbias_part = new_output((batch, dim), f32, dev) if delta_bias is not None else None
    dh0 = new_output((batch, dim, dstate), f32, dev)
    dh_buf = new_output((2, batch, dim, dstate), f32, dev)
    _scan_bwd_kernel[(batch, groups, nblocks)](
        u, delta, A, B, C, D, z, delta_bias, seq_idx, chunk_states, dout, dlast, dh_buf,
        du, ddelta, dz, dA_part, dB, dC, dD_part, dbias_part, dh0,
        *u.stride(), *delta.stride(), *_bdl_strides(z), *dout.stride(), *du.stride(), *ddelta.stride(),
        *_bdl_strides(dz), *B.stride(), *C.stride(),
        dim, P, groups, seqlen, dstate, nchunks,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus,
        HAS_DLAST=dlast is not None,
        HAS_SEQ_IDX=seq_idx is not None,
        USE_ASM=_use_asm(cfg, seqlen, u, delta, B, C, z, dout, du, ddelta),
        PTX=_elementwise_ptx(),
        **cfg,
    )  # fmt: skip
    dD = dD_part.sum(0) if D is not None else None
    ddelta_bias = dbias_part.sum(0) if delta_bias is not None else None
    return du, ddelta, dA_part.sum(0), dB, dC, dD, dz, ddelta_bias, dh0


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx):
        out, last_state, chunk_states = scan_forward(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, chunk_states)
        ctx.delta_softplus = delta_softplus
        ctx.set_materialize_grads(False)
        return out, last_state

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, chunk_states = ctx.saved_tensors
        dout = torch.zeros_like(u) if dout is None else _time_major(dout)
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0 = scan_backward(
            u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, seq_idx, chunk_states, dout, dlast
        )
        cast = lambda g, like: None if g is None or like is None else g.to(like.dtype)
        return (du, ddelta, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), dz, cast(ddelta_bias, delta_bias),
                None, cast(dh0, initial_state), None)  # fmt: skip


def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx):
    _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    named.update(initial_state=initial_state, seq_idx=seq_idx)
    for name, t in named.items():
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}; all tensors must share a device")
    for name in ("u", "delta", "z", "B", "C"):
        t = named[name]
        if t is not None and t.dtype not in _IO_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    for name in ("A", "D", "delta_bias", "initial_state"):
        t = named[name]
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if seq_idx is not None and seq_idx.dtype != torch.int32:
        raise TypeError(f"seq_idx must be int32, got {seq_idx.dtype}")


def selective_scan_fn(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    *,
    initial_state=None,
    seq_idx=None,
):
    """Mamba1 selective scan; drop-in for mamba_ssm's ``selective_scan_fn`` (see ``reference.py`` for the math).

    Args:
        u, delta: (batch, dim, seqlen) fp16/bf16/fp32; A: (dim, dstate) real; B, C: (batch, dstate, seqlen) or
        (batch, groups, dstate, seqlen); D, delta_bias: (dim,); z: (batch, dim, seqlen) gate;
        initial_state: (batch, dim, dstate); seq_idx: (batch, seqlen) int32 document ids (state reset where it
        changes). Any strides are accepted: u, delta, z, B and C whose time axis is strided (a channel-last view
        such as ``x.transpose(1, 2)`` of a (batch, seqlen, dim) tensor) are copied to time-contiguous first, which
        is faster than scanning them in place. ``out``, ``du``, ``ddelta`` and ``dz`` are time-contiguous.
    Returns:
        out (batch, dim, seqlen) in u's dtype, or (out, last_state (batch, dim, dstate) fp32) when return_last_state.
        Differentiable in every tensor argument except seq_idx.
    Runs the Triton kernels on CUDA tensors or under TRITON_INTERPRET=1, the PyTorch reference otherwise.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    if not use_triton(u):
        return selective_scan_fn_ref(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            delta_softplus,
            return_last_state,
            initial_state=initial_state,
            seq_idx=seq_idx,
        )
    grouped_bc = B.dim() == 4
    contig = lambda t: None if t is None else t.contiguous()
    B4 = _time_major(B if grouped_bc else B.unsqueeze(1))
    C4 = _time_major(C if grouped_bc else C.unsqueeze(1))
    out, last_state = _SelectiveScan.apply(
        _time_major(u),
        _time_major(delta),
        contig(A),
        B4,
        C4,
        contig(D),
        _time_major(z),
        contig(delta_bias),
        bool(delta_softplus),
        contig(initial_state),
        contig(seq_idx),
    )
    return (out, last_state) if return_last_state else out
