"""Plain-PyTorch selective scan (Mamba1): the specification the Triton kernel is tested against.

Shapes (mamba_ssm's layout):
    u, delta, z:        (batch, dim, seqlen)
    A:                  (dim, dstate), real and negative
    B, C:               (batch, dstate, seqlen) shared by all channels, or (batch, groups, dstate, seqlen) with the
                        channels split evenly over the groups (channel d uses group d // (dim // groups))
    D, delta_bias:      (dim,)
    initial_state, last_state: (batch, dim, dstate), fp32
    seq_idx:            (batch, seqlen) int32, document index of every token in a packed row

Recurrence, per channel d and state n (dt = softplus(delta + delta_bias) when delta_softplus):
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t = sum_n C_t * h_t + D * u_t;   out_t = y_t * silu(z_t) when z is given
The state is reset to zero where seq_idx[t] != seq_idx[t-1], so ``initial_state`` only reaches the tokens of the first
document of a row and ``last_state`` is the state of the last document. Compute is fp32 (fp64 for fp64 inputs); the
output has u's dtype.

``selective_scan_sequential_ref`` is the literal loop over time. ``selective_scan_chunked_ref`` computes the same
thing with two loops of about sqrt(seqlen) steps (inside chunks, then across chunks). ``selective_scan_fn_ref`` picks
whichever is faster on CPU for the state size.
"""

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_fn_ref", "selective_scan_sequential_ref", "selective_scan_chunked_ref"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx) -> int:
    """Validate shapes; return the number of B/C groups."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, seqlen), got shape {tuple(u.shape)}")
    batch, dim, seqlen = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"A must be real (dim={dim}, dstate), got {tuple(A.shape)} {A.dtype}")
    dstate = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 3:
            M = M.unsqueeze(1)
        if M.dim() != 4 or M.shape[0] != batch or M.shape[2] != dstate or M.shape[3] != seqlen:
            raise ValueError(
                f"{name} must be (batch, dstate, seqlen) or (batch, groups, dstate, seqlen) with batch={batch}, "
                f"dstate={dstate}, seqlen={seqlen}; got {tuple(M.shape)}"
            )
    groups = B.shape[1] if B.dim() == 4 else 1
    if (C.shape[1] if C.dim() == 4 else 1) != groups:
        raise ValueError(f"B and C must have the same number of groups, got {tuple(B.shape)} and {tuple(C.shape)}")
    if dim % groups != 0:
        raise ValueError(f"dim={dim} must be divisible by the number of groups={groups}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (dim,):
            raise ValueError(f"{name} must be (dim={dim},), got {tuple(v.shape)}")
    if initial_state is not None and initial_state.shape != (batch, dim, dstate):
        raise ValueError(
            f"initial_state must be (batch, dim, dstate)={(batch, dim, dstate)}, got {initial_state.shape}"
        )
    if seq_idx is not None and seq_idx.shape != (batch, seqlen):
        raise ValueError(f"seq_idx must be (batch, seqlen)={(batch, seqlen)}, got {tuple(seq_idx.shape)}")
    return groups


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """Upcast and split channels into groups: u, dt (batch, G, P, L); A (G, P, N); B, C (batch, G, N, L)."""
    cdt = _compute_dtype(u)
    batch, dim, seqlen = u.shape
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    groups = B.shape[1]
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    split = (batch, groups, dim // groups, seqlen)
    return (
        u.to(cdt).reshape(split),
        dt.reshape(split),
        A.to(cdt).reshape(groups, dim // groups, -1),
        B.to(cdt),
        C.to(cdt),
    )


def _finish(y, u, D, z, out_dtype):
    """y: (batch, dim, seqlen) in the compute dtype -> out with the skip connection and the gate applied."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_sequential_ref(
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
    """The selective scan as a loop over time (the spec). Same arguments and result as ``selective_scan_fn_ref``."""
    _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    batch, dim, seqlen = u.shape
    uc, dt, Ac, Bc, Cc = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    groups, dstate = Bc.shape[1], Ac.shape[-1]
    h = uc.new_zeros(batch, groups, dim // groups, dstate)
    if initial_state is not None:
        h = h + initial_state.to(uc.dtype).reshape(h.shape)
    keep = torch.ones(batch, seqlen, dtype=uc.dtype, device=u.device)
    if seq_idx is not None:
        keep[:, 1:] = (seq_idx[:, 1:] == seq_idx[:, :-1]).to(uc.dtype)
    steps = zip(
        dt.unbind(-1), uc.unbind(-1), Bc.unbind(-1), Cc.unbind(-1), keep.reshape(batch, 1, 1, 1, seqlen).unbind(-1)
    )
    # unbind (not indexing in the loop) keeps the backward from materialising a full-size zero tensor per step.
    ys = []
    for dt_t, u_t, B_t, C_t, keep_t in steps:
        dt_t = dt_t[..., None]  # (batch, G, P, 1)
        h = torch.exp(dt_t * Ac) * keep_t * h + (dt_t * u_t[..., None]) * B_t[:, :, None]
        ys.append((h * C_t[:, :, None]).sum(-1))
    y = torch.stack(ys, dim=-1).reshape(batch, dim, seqlen)
    out = _finish(y, u, D, z, u.dtype)
    return (out, h.reshape(batch, dim, dstate)) if return_last_state else out


def selective_scan_chunked_ref(
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
    chunk_size=None,
):
    """Chunked selective scan; same arguments and result as ``selective_scan_fn_ref``.

    The sequence is cut into chunks of T steps (default about sqrt(seqlen)). Two short loops replace the loop over
    seqlen: one over the T positions of a chunk, run for all chunks at once from a zero state, and one over the chunks
    that passes the chunk-end states along. The decay from a chunk's start to step t is exp(cs_t), cs being the
    cumulative sum of the log-decays dt * A <= 0, masked to -inf *before* the exp where a document boundary
    intervenes, so no exponent is ever positive. Memory stays O(batch * dim * seqlen * dstate), like the loop.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    batch, dim, seqlen = u.shape
    uc, dt, Ac, Bc, Cc = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    groups, P, dstate = Ac.shape
    T = chunk_size or max(1, round(seqlen**0.5))
    nchunks = -(-seqlen // T)
    pad = nchunks * T - seqlen
    # Padding with dt = 0 and u = 0 leaves the state untouched (decay 1, input 0), so the last state is exact.
    uc, dt, Bc, Cc = (F.pad(x, (0, pad)) for x in (uc, dt, Bc, Cc))
    if seq_idx is None:
        doc = torch.zeros(batch, nchunks * T, dtype=torch.long, device=u.device)
    else:
        changed = torch.zeros_like(seq_idx, dtype=torch.long)
        changed[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
        # doc counts the boundaries seen so far: two tokens share a state iff their counts are equal.
        doc = F.pad(changed.cumsum(-1)[:, None], (0, pad), mode="replicate")[:, 0]
    doc = doc.reshape(batch, 1, 1, nchunks, T, 1)
    doc_prev = F.pad(doc[..., -1, :], (0, 0, 1, 0))[..., :-1, None, :]  # count just before each chunk

    chunked = lambda x: x.reshape(*x.shape[:-1], nchunks, T)
    uc, dt, Bc, Cc = chunked(uc), chunked(dt), chunked(Bc), chunked(Cc)  # (batch, G, P|N, nchunks, T)
    log_decay = dt[..., None] * Ac[:, :, None, None, :]  # (batch, G, P, nchunks, T, N)
    Bx = (dt * uc)[..., None] * Bc.movedim(2, -1)[:, :, None]  # (batch, G, P, nchunks, T, N)
    keep = F.pad(doc[..., 1:, :] == doc[..., :-1, :], (0, 0, 1, 0)).to(uc.dtype)  # no boundary before step t

    # States inside each chunk as if it started from zero; all chunks advance together.
    # unbind (not indexing in the loop) keeps the backward from materialising a full-size zero tensor per step.
    h = uc.new_zeros(batch, groups, P, nchunks, dstate)
    local_states = []
    for decay_t, Bx_t in zip((torch.exp(log_decay) * keep).unbind(-2), Bx.unbind(-2)):
        h = decay_t * h + Bx_t
        local_states.append(h)
    local_states = torch.stack(local_states, dim=-2)  # (batch, G, P, nchunks, T, N)

    neg_inf = torch.tensor(float("-inf"), dtype=uc.dtype, device=uc.device)
    decay_from_start = torch.exp(torch.where(doc == doc_prev, torch.cumsum(log_decay, dim=-2), neg_inf))
    h = uc.new_zeros(batch, groups, P, dstate)
    if initial_state is not None:
        h = h + initial_state.to(uc.dtype).reshape(h.shape)
    states_before = []
    for decay_c, state_c in zip(decay_from_start[..., -1, :].unbind(-2), local_states[..., -1, :].unbind(-2)):
        states_before.append(h)
        h = decay_c * h + state_c
    states_before = torch.stack(states_before, dim=-2)  # (batch, G, P, nchunks, N)

    Ct = Cc.movedim(2, -1)[:, :, None]  # (batch, G, 1, nchunks, T, N)
    y = (Ct * local_states).sum(-1) + torch.einsum("bgpctn,bgpctn,bgpcn->bgpct", Ct, decay_from_start, states_before)
    y = y.reshape(batch, dim, nchunks * T)[..., :seqlen]
    out = _finish(y, u, D, z, u.dtype)
    return (out, h.reshape(batch, dim, dstate)) if return_last_state else out


def selective_scan_fn_ref(
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
    """Selective scan in plain PyTorch (differentiable); drop-in for mamba_ssm's ``selective_scan_fn``.

    Args:
        u, delta: (batch, dim, seqlen); A: (dim, dstate); B, C: (batch, dstate, seqlen) or
        (batch, groups, dstate, seqlen); D, delta_bias: (dim,); z: (batch, dim, seqlen) gate;
        initial_state: (batch, dim, dstate); seq_idx: (batch, seqlen) int32 document ids.
    Returns:
        out (batch, dim, seqlen) in u's dtype, or (out, last_state (batch, dim, dstate) fp32) when return_last_state.
    """
    # Both forms agree to rounding. On CPU, Python overhead dominates small states and the chunked form's fewer steps
    # win (4x at batch 1, dim 64, dstate 16, seqlen 512); large states are memory-bound and the loop's per-step working
    # set stays in cache (5x faster at batch 2, dim 1024). The crossover was near 8192 state elements.
    # With autograd recording, the loop's per-step graph dominates instead: the chunked form trains a tiny Mamba1
    # (8 x 256 tokens, dim 256, dstate 16) about 3x faster, so it is used whenever gradients are needed.
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)
    )
    small = u.shape[0] * u.shape[1] * A.shape[-1] <= 8192
    scan = selective_scan_chunked_ref if needs_grad or small else selective_scan_sequential_ref
    return scan(
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
