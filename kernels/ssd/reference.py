"""Plain-PyTorch reference of Mamba2's SSD (state space duality) scan: the spec for the Triton kernels.

Shapes:
    x, z:            (batch, seqlen, nheads, headdim)
    dt:              (batch, seqlen, nheads)
    A, dt_bias:      (nheads,)
    B, C:            (batch, seqlen, ngroups, dstate); head h reads group h // (nheads // ngroups)
    D:               (nheads,) or (nheads, headdim)
    states:          (batch, nheads, headdim, dstate), fp32 (fp64 for fp64 inputs)
    seq_idx:         (batch, seqlen) int32, the document of each token

Per head, with dt already processed (bias, softplus, limits):
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        (headdim, dstate)
    y_t = h_t C_t + D x_t,   then y_t *= silu(z_t) when z is given
with h reset to zero where seq_idx changes and h before the first token = initial_states (so they reach only the
first document). `ssd_sequential_ref` runs exactly this recurrence, one step at a time.

The chunked (dual) form of the Mamba2 paper splits seqlen into chunks of chunk_size (padded with dt = 0, which
neither decays nor feeds the state) and runs in the same stages as the Triton kernels:
    chunk_cumsum_ref   dt processing and the running sum of dt·A inside each chunk
    chunk_state_ref    the state each chunk builds from zero
    state_passing_ref  the inter-chunk recurrence: the state entering each chunk, and the final state
    bmm_chunk_ref      C_l · B_s for every pair of positions inside a chunk
    chunk_scan_ref     the output: intra-chunk diagonal block (a masked matmul) + entering state read through C
Intermediate layouts follow mamba_ssm: dA_cumsum and dt are (batch, nheads, nchunks, chunk_size), chunk states are
(batch, nchunks, nheads, headdim, dstate), CB is (batch, nchunks, ngroups, chunk_size, chunk_size).
"""

import torch
import torch.nn.functional as F

NO_DT_LIMIT = (0.0, float("inf"))


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for fp32 and narrower inputs; fp64 inputs stay fp64 so tests can compare to 1e-10."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def document_index(seq_idx: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen) document ids → nondecreasing ids starting at 0 that change exactly where seq_idx changes.

    The chunked form compares ids at chunk ends, which is only right for nondecreasing ids; renumbering makes any
    labelling (e.g. ids reused across a row) mean "reset where it changes".
    """
    changes = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int32)
    return torch.cat([torch.zeros_like(changes[:, :1]), changes.cumsum(1, dtype=torch.int32)], dim=1)


def pad_to_chunks(t: torch.Tensor, chunk_size: int, replicate: bool = False) -> torch.Tensor:
    """Pads dim 1 (seqlen) up to a multiple of chunk_size, with zeros or (replicate) the last element."""
    pad = -t.shape[1] % chunk_size
    if pad == 0:
        return t
    if replicate:
        fill = t[:, -1:].expand(t.shape[0], pad, *t.shape[2:])
    else:
        fill = t.new_zeros(t.shape[0], pad, *t.shape[2:])
    return torch.cat([t, fill], dim=1)


def _chunked(t: torch.Tensor, chunk_size: int, replicate: bool = False) -> torch.Tensor:
    """(batch, seqlen, ...) → (batch, nchunks, chunk_size, ...), padded."""
    t = pad_to_chunks(t, chunk_size, replicate)
    return t.reshape(t.shape[0], t.shape[1] // chunk_size, chunk_size, *t.shape[2:])


def _per_head(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """(batch, seqlen, ngroups, dstate) → (batch, seqlen, nheads, dstate): each group serves a block of heads."""
    return t.repeat_interleave(nheads // t.shape[2], dim=2)


def segsum(dA_cumsum: torch.Tensor) -> torch.Tensor:
    """(..., T) running sums → (..., T, T) with [l, s] = sum of dA over (s, l] for s <= l, -inf above the diagonal.

    exp() of it is the causal decay matrix L of the dual form. Masking before exp keeps the unused upper triangle
    from overflowing (and from sending NaN gradients back).
    """
    T = dA_cumsum.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=dA_cumsum.device).tril()
    diff = dA_cumsum[..., :, None] - dA_cumsum[..., None, :]
    return diff.masked_fill(~causal, -torch.inf)


def chunk_cumsum_ref(
    dt: torch.Tensor,
    A: torch.Tensor,
    chunk_size: int,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Processes dt and sums dt·A inside each chunk.

    dt: (batch, seqlen, nheads); A, dt_bias: (nheads,).
    Returns dA_cumsum, dt_out: (batch, nheads, nchunks, chunk_size) in the compute dtype, where
    dt_out = clamp(softplus(dt + dt_bias)) (each step optional; the clamp only for a non-default dt_limit, as in
    mamba_ssm) and is 0 past seqlen, and dA_cumsum[..., l] = sum_{s <= l} dt_out[..., s] · A.
    """
    batch, seqlen, nheads = dt.shape
    dtype = compute_dtype(dt)
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != NO_DT_LIMIT:
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    dt = _chunked(dt, chunk_size).permute(0, 3, 1, 2)
    dA_cumsum = (dt * A.to(dtype)[:, None, None]).cumsum(-1)
    return dA_cumsum, dt


def chunk_state_ref(
    B: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    dA_cumsum: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The state each chunk would end with if it started from zero.

    B: (batch, seqlen, ngroups, dstate); x: (batch, seqlen, nheads, headdim);
    dt, dA_cumsum: (batch, nheads, nchunks, chunk_size); seq_idx: (batch, seqlen), nondecreasing.
    Returns (batch, nchunks, nheads, headdim, dstate):
    sum over l in the chunk of exp(dA_cumsum[last] - dA_cumsum[l]) · dt[l] · x[l] B[l]^T, restricted to the
    positions of the document that is current at the chunk's last position.
    """
    chunk_size = dt.shape[-1]
    nheads = x.shape[2]
    x = _chunked(x.to(dt.dtype), chunk_size)
    B = _chunked(_per_head(B.to(dt.dtype), nheads), chunk_size)
    weight = torch.exp(dA_cumsum[..., -1:] - dA_cumsum) * dt
    if seq_idx is not None:
        doc = _chunked(seq_idx, chunk_size, replicate=True)
        weight = weight * (doc == doc[..., -1:])[:, None]
    return torch.einsum("bhcl,bclhp,bclhn->bchpn", weight, x, B)


def state_passing_ref(
    states: torch.Tensor,
    dA_chunk_cumsum: torch.Tensor,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inter-chunk recurrence.

    states: (batch, nchunks, nheads, headdim, dstate) from chunk_state_ref; dA_chunk_cumsum: (batch, nheads, nchunks)
    = dA_cumsum[..., -1]; initial_states: (batch, nheads, headdim, dstate); seq_idx: (batch, seqlen), nondecreasing,
    with chunk_size to find the chunk ends.
    Returns (prev_states, final_states): prev_states (batch, nchunks, nheads, headdim, dstate) is the state entering
    each chunk, final_states (batch, nheads, headdim, dstate) the state after the last token:
        S_0 = initial_states (or 0),  S_{c+1} = exp(dA_chunk_cumsum[c]) · S_c · keep_c + states[c]
    where keep_c is 0 when chunk c ends in a different document than the one S_c belongs to.
    """
    batch, nchunks, nheads, headdim, dstate = states.shape
    state = states.new_zeros(batch, nheads, headdim, dstate)
    if initial_states is not None:
        state = state + initial_states.to(states.dtype)
    decay = torch.exp(dA_chunk_cumsum)
    if seq_idx is not None:
        if chunk_size is None:
            raise ValueError("state_passing_ref needs chunk_size together with seq_idx")
        ends = pad_to_chunks(seq_idx, chunk_size, replicate=True)[:, chunk_size - 1 :: chunk_size]
        # The initial state belongs to the first document.
        owners = torch.cat([seq_idx[:, :1], ends[:, :-1]], dim=1)
        decay = decay * (ends == owners)[:, None]
    prev_states = []
    for c in range(nchunks):
        prev_states.append(state)
        state = decay[:, :, c, None, None] * state + states[:, c]
    return torch.stack(prev_states, dim=1), state


def bmm_chunk_ref(
    C: torch.Tensor, B: torch.Tensor, chunk_size: int, seq_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """C_l · B_s for every pair of positions in a chunk.

    C, B: (batch, seqlen, ngroups, dstate); seq_idx: (batch, seqlen).
    Returns (batch, nchunks, ngroups, chunk_size, chunk_size) in the compute dtype, 0 across documents.
    """
    dtype = compute_dtype(C)
    C = _chunked(C.to(dtype), chunk_size)
    B = _chunked(B.to(dtype), chunk_size)
    CB = torch.einsum("bclgn,bcsgn->bcgls", C, B)
    if seq_idx is not None:
        doc = _chunked(seq_idx, chunk_size, replicate=True)
        CB = CB * (doc[:, :, None, :, None] == doc[:, :, None, None, :])
    return CB


def chunk_scan_ref(
    CB: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    dA_cumsum: torch.Tensor,
    C: torch.Tensor,
    prev_states: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The output of every position.

    CB: (batch, nchunks, ngroups, chunk_size, chunk_size) from bmm_chunk_ref; x, z: (batch, seqlen, nheads, headdim);
    dt, dA_cumsum: (batch, nheads, nchunks, chunk_size); C: (batch, seqlen, ngroups, dstate);
    prev_states: (batch, nchunks, nheads, headdim, dstate) from state_passing_ref; D: (nheads,) or (nheads, headdim).
    Returns y: (batch, seqlen, nheads, headdim) in the compute dtype:
        y_l = sum_{s <= l in chunk} CB[l, s] exp(dA_cumsum[l] - dA_cumsum[s]) dt[s] x_s   (diagonal block)
            + exp(dA_cumsum[l]) · prev_state C_l        (only if l is in the document prev_state belongs to)
            + D x_l,   then · silu(z_l).
    """
    batch, seqlen, nheads, headdim = x.shape
    chunk_size = dt.shape[-1]
    dtype = dt.dtype
    x_chunks = _chunked(x.to(dtype), chunk_size)
    CB_heads = CB.to(dtype).repeat_interleave(nheads // CB.shape[2], dim=2)
    scores = CB_heads * torch.exp(segsum(dA_cumsum)).transpose(1, 2) * dt.transpose(1, 2)[:, :, :, None, :]
    y = torch.einsum("bchls,bcshp->bclhp", scores, x_chunks)

    state_decay = torch.exp(dA_cumsum).permute(0, 2, 3, 1)
    if seq_idx is not None:
        doc = _chunked(seq_idx, chunk_size, replicate=True)
        # The state entering chunk c belongs to the document of the token just before it.
        owners = torch.cat([doc[:, :1, :1], doc[:, :-1, -1:]], dim=1)
        state_decay = state_decay * (doc == owners)[..., None]
    C_heads = _chunked(_per_head(C.to(dtype), nheads), chunk_size)
    y = y + torch.einsum("bclhn,bchpn,bclh->bclhp", C_heads, prev_states.to(dtype), state_decay)

    y = y.reshape(batch, -1, nheads, headdim)[:, :seqlen]
    x = x.to(dtype)
    if D is not None:
        y = y + x * (D.to(dtype)[:, None] if D.dim() == 1 else D.to(dtype))
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y


def mamba_chunk_scan_combined_ref(
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
    """The SSD scan in its chunked dual form (shapes in the module docstring), composed of the stage references.

    Computes in fp32 (fp64 for fp64 x); y has x's dtype, final_states the compute dtype.
    Returns y: (batch, seqlen, nheads, headdim), or (y, final_states) when return_final_states.
    """
    dtype = compute_dtype(x)
    if seq_idx is not None:
        seq_idx = document_index(seq_idx)
    dA_cumsum, dt_chunks = chunk_cumsum_ref(dt.to(dtype), A, chunk_size, dt_bias, dt_softplus, dt_limit)
    states = chunk_state_ref(B, x, dt_chunks, dA_cumsum, seq_idx)
    prev_states, final_states = state_passing_ref(states, dA_cumsum[..., -1], initial_states, seq_idx, chunk_size)
    CB = bmm_chunk_ref(C.to(dtype), B.to(dtype), chunk_size, seq_idx)
    y = chunk_scan_ref(CB, x, dt_chunks, dA_cumsum, C, prev_states, D, z, seq_idx).to(x.dtype)
    return (y, final_states) if return_final_states else y


def ssd_sequential_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The recurrence of the module docstring, one token at a time: the spec the chunked form is tested against.

    Same arguments and results as mamba_chunk_scan_combined_ref, without chunk_size. Slow (a Python loop over seqlen).
    """
    batch, seqlen, nheads, headdim = x.shape
    dtype = compute_dtype(x)
    _, dt_steps = chunk_cumsum_ref(dt.to(dtype), A, seqlen, dt_bias, dt_softplus, dt_limit)
    dt_steps = dt_steps[:, :, 0].transpose(1, 2)  # (batch, seqlen, nheads)
    A = A.to(dtype)
    xs = x.to(dtype)
    Bs = _per_head(B.to(dtype), nheads)
    Cs = _per_head(C.to(dtype), nheads)
    state = xs.new_zeros(batch, nheads, headdim, B.shape[-1])
    if initial_states is not None:
        state = state + initial_states.to(dtype)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            same_doc = (seq_idx[:, t] == seq_idx[:, t - 1]).to(dtype)
            state = state * same_doc[:, None, None, None]
        decay = torch.exp(dt_steps[:, t] * A)[..., None, None]
        update = (dt_steps[:, t, :, None] * xs[:, t])[..., None] * Bs[:, t, :, None, :]
        state = decay * state + update
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Cs[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + xs * (D.to(dtype)[:, None] if D.dim() == 1 else D.to(dtype))
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y
