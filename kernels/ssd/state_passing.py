"""Stage 3 of SSD: the inter-chunk recurrence S_{c+1} = exp(dA_cumsum[c, last]) · keep_c · S_c + states[c].

keep_c is 0 when chunk c ends in a different document than the one S_c belongs to (the initial state belongs to
the first document). Each program owns a slice of the flattened (headdim·dstate) state of one (batch, head) and walks
the chunks in order (forward) or in reverse (backward); the work per chunk is elementwise, so this stage is bound
by memory traffic of the (batch, nchunks, nheads, headdim, dstate) fp32 tensors.
"""

import torch
import triton
import triton.language as tl

from mambatron.kernels.ssd._common import new_output


@triton.jit
def _chunk_decay(dA_cumsum_ptr, batch, head, chunk, nheads, nchunks, chunk_size):
    """exp(dA_cumsum at the chunk's last position): how much of the entering state survives the chunk."""
    return tl.exp(tl.load(dA_cumsum_ptr + ((batch * nheads + head) * nchunks + chunk + 1) * chunk_size - 1))


@triton.jit
def _chunk_end_doc(seq_idx_ptr, batch, chunk, seqlen, chunk_size):
    return tl.load(seq_idx_ptr + batch * seqlen + tl.minimum((chunk + 1) * chunk_size, seqlen) - 1)


@triton.jit
def _state_passing_fwd_kernel(
    states_ptr, dA_cumsum_ptr, initial_states_ptr, seq_idx_ptr, prev_states_ptr, final_states_ptr,
    seqlen, nheads, nchunks, chunk_size, state_size,
    HAS_INITIAL: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    head = pid % nheads
    batch = pid // nheads
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < state_size
    if HAS_INITIAL:
        state = tl.load(initial_states_ptr + pid * state_size + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_SEQ_IDX:
        owner = tl.load(seq_idx_ptr + batch * seqlen)
    for chunk in range(nchunks):
        chunk_offs = ((batch * nchunks + chunk) * nheads + head) * state_size + offs
        tl.store(prev_states_ptr + chunk_offs, state, mask=mask)
        decay = _chunk_decay(dA_cumsum_ptr, batch, head, chunk, nheads, nchunks, chunk_size)
        if HAS_SEQ_IDX:
            end = _chunk_end_doc(seq_idx_ptr, batch, chunk, seqlen, chunk_size)
            decay = tl.where(end == owner, decay, 0.0)
            owner = end
        state = decay * state + tl.load(states_ptr + chunk_offs, mask=mask, other=0.0)
    tl.store(final_states_ptr + pid * state_size + offs, state, mask=mask)


@triton.jit
def _state_passing_bwd_kernel(
    prev_states_ptr, dprev_states_ptr, dA_cumsum_ptr, dfinal_states_ptr, seq_idx_ptr,
    dstates_ptr, dinitial_states_ptr, ddA_chunk_part_ptr,
    seqlen, nheads, nchunks, chunk_size, state_size,
    HAS_DFINAL: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    head = pid % nheads
    batch = pid // nheads
    pid_block = tl.program_id(1)
    offs = pid_block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < state_size
    if HAS_DFINAL:
        grad = tl.load(dfinal_states_ptr + pid * state_size + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        grad = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(nchunks):
        chunk = nchunks - 1 - i
        decay = _chunk_decay(dA_cumsum_ptr, batch, head, chunk, nheads, nchunks, chunk_size)
        if HAS_SEQ_IDX:
            # The state entering the chunk belongs to the document of the token before it.
            owner = tl.load(seq_idx_ptr + batch * seqlen + tl.maximum(chunk * chunk_size - 1, 0))
            end = _chunk_end_doc(seq_idx_ptr, batch, chunk, seqlen, chunk_size)
            decay = tl.where(end == owner, decay, 0.0)
        chunk_offs = ((batch * nchunks + chunk) * nheads + head) * state_size + offs
        tl.store(dstates_ptr + chunk_offs, grad, mask=mask)
        prev_state = tl.load(prev_states_ptr + chunk_offs, mask=mask, other=0.0).to(tl.float32)
        part_offs = ((batch * nheads + head) * nchunks + chunk) * tl.num_programs(1) + pid_block
        tl.store(ddA_chunk_part_ptr + part_offs, decay * tl.sum(grad * prev_state))
        grad = decay * grad + tl.load(dprev_states_ptr + chunk_offs, mask=mask, other=0.0)
    tl.store(dinitial_states_ptr + pid * state_size + offs, grad, mask=mask)


def _block(state_size: int) -> int:
    return min(triton.next_power_of_2(state_size), 2048)


def state_passing_fwd(states, dA_cumsum, initial_states=None, seq_idx=None, out_dtype=torch.float32):
    """states: (batch, nchunks, nheads, headdim, dstate) fp32; dA_cumsum: (batch, nheads, nchunks, chunk_size) fp32;
    initial_states: (batch, nheads, headdim, dstate) contiguous; seq_idx: (batch, seqlen) int32, nondecreasing.

    Returns prev_states (the state entering each chunk, like states, in out_dtype) and final_states
    (batch, nheads, headdim, dstate) fp32 (as state_passing_ref). The recurrence runs in fp32 whatever out_dtype;
    the stored copies feed tl.dot operands that are rounded to the input dtype anyway.
    """
    batch, nchunks, nheads, headdim, dstate = states.shape
    chunk_size = dA_cumsum.shape[-1]
    seqlen = seq_idx.shape[1] if seq_idx is not None else nchunks * chunk_size
    state_size = headdim * dstate
    prev_states = new_output(states.shape, out_dtype, states.device)
    final_states = new_output((batch, nheads, headdim, dstate), torch.float32, states.device)
    block = _block(state_size)
    _state_passing_fwd_kernel[(batch * nheads, triton.cdiv(state_size, block))](
        states, dA_cumsum, initial_states, seq_idx, prev_states, final_states,
        seqlen, nheads, nchunks, chunk_size, state_size,
        HAS_INITIAL=initial_states is not None, HAS_SEQ_IDX=seq_idx is not None, BLOCK=block,
    )  # fmt: skip
    return prev_states, final_states


def state_passing_bwd(
    prev_states, dprev_states, dA_cumsum, dfinal_states=None, seq_idx=None, dstates_dtype=torch.float32
):
    """Gradients of state_passing_fwd.

    prev_states, dprev_states: (batch, nchunks, nheads, headdim, dstate) fp32 (the forward's output and its
    gradient); dA_cumsum: (batch, nheads, nchunks, chunk_size); dfinal_states: (batch, nheads, headdim, dstate) fp32.
    Returns dstates (like prev_states, in dstates_dtype, the gradient w.r.t. each chunk's own state), dinitial_states
    (batch, nheads, headdim, dstate) fp32 and ddA_chunk (batch, nheads, nchunks) fp32, the gradient w.r.t. the last
    dA_cumsum of each chunk.
    """
    batch, nchunks, nheads, headdim, dstate = prev_states.shape
    chunk_size = dA_cumsum.shape[-1]
    seqlen = seq_idx.shape[1] if seq_idx is not None else nchunks * chunk_size
    state_size = headdim * dstate
    block = _block(state_size)
    nblocks = triton.cdiv(state_size, block)
    dstates = new_output(prev_states.shape, dstates_dtype, prev_states.device)
    dinitial_states = new_output((batch, nheads, headdim, dstate), torch.float32, prev_states.device)
    ddA_chunk_part = new_output((batch, nheads, nchunks, nblocks), torch.float32, prev_states.device)
    _state_passing_bwd_kernel[(batch * nheads, nblocks)](
        prev_states, dprev_states, dA_cumsum, dfinal_states, seq_idx,
        dstates, dinitial_states, ddA_chunk_part,
        seqlen, nheads, nchunks, chunk_size, state_size,
        HAS_DFINAL=dfinal_states is not None, HAS_SEQ_IDX=seq_idx is not None, BLOCK=block,
    )  # fmt: skip
    return dstates, dinitial_states, ddA_chunk_part.sum(-1)
