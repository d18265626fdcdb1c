"""Plain-PyTorch causal depthwise conv1d: the specification the Triton kernels are tested against.

Shapes (causal-conv1d's layout):
    x:               (batch, dim, seqlen)
    weight:          (dim, width)
    bias:            (dim,)
    seq_idx:         (batch, seqlen) int32, document index of every token in a packed row
    initial_states:  (batch, dim, width - 1), the inputs just before x[..., 0]
    final_states:    (batch, dim, width - 1), the last width - 1 inputs

out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k]) with act None or SiLU, where inputs
before t = 0 come from initial_states (zeros when absent). With seq_idx, a token only sees taps of its own document:
a tap s < t counts iff seq_idx is constant on [s, t], and initial_states only reach the first document. Likewise
final_states only keeps inputs of the row's last document (zeros elsewhere), so decoding can continue that document.
Compute is fp32 (fp64 for fp64 inputs); outputs have x's dtype.
"""

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d_fn_ref", "causal_conv1d_update_ref", "final_states_ref"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _activate(y: torch.Tensor, activation) -> torch.Tensor:
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"activation must be None or 'silu', got {activation!r}")


def _check_args(x, weight, bias, seq_idx, initial_states):
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, dim, seqlen), got {tuple(x.shape)}")
    batch, dim, seqlen = x.shape
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight must be (dim={dim}, width), got {tuple(weight.shape)}")
    width = weight.shape[1]
    if bias is not None and bias.shape != (dim,):
        raise ValueError(f"bias must be (dim={dim},), got {tuple(bias.shape)}")
    if seq_idx is not None and seq_idx.shape != (batch, seqlen):
        raise ValueError(f"seq_idx must be (batch, seqlen)={(batch, seqlen)}, got {tuple(seq_idx.shape)}")
    if initial_states is not None and initial_states.shape != (batch, dim, width - 1):
        raise ValueError(
            f"initial_states must be (batch, dim, width - 1)={(batch, dim, width - 1)}, got {initial_states.shape}"
        )


def causal_conv1d_fn_ref(
    x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False, activation=None
):
    """Causal depthwise conv1d in plain PyTorch (differentiable); drop-in for causal-conv1d's ``causal_conv1d_fn``.

    Args:
        x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,); seq_idx: (batch, seqlen) int32;
        initial_states: (batch, dim, width - 1); activation: None or "silu".
    Returns:
        out (batch, dim, seqlen) in x's dtype, or (out, final_states (batch, dim, width - 1)) when
        return_final_states.
    """
    _check_args(x, weight, bias, seq_idx, initial_states)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    cdt = _compute_dtype(x)
    xp = _with_initial_states(x, initial_states, width, cdt)
    doc = _doc_counts(seq_idx, x, width)
    w = weight.to(cdt)
    y = x.new_zeros(batch, dim, seqlen, dtype=cdt)
    for k in range(width):
        # Tap k reads x[t - (width - 1) + k], i.e. xp[t + k].
        same_doc = (doc[:, k : k + seqlen] == doc[:, width - 1 :]).to(cdt)[:, None]
        y = y + w[:, k, None] * xp[..., k : k + seqlen] * same_doc
    if bias is not None:
        y = y + bias.to(cdt)[:, None]
    out = _activate(y, activation).to(x.dtype)
    if not return_final_states:
        return out
    return out, final_states_ref(x, initial_states, seq_idx, width)


def _with_initial_states(x, initial_states, width, dtype):
    """(batch, dim, width - 1 + seqlen): the initial states (zeros when absent) followed by x."""
    batch, dim, _ = x.shape
    prev = x.new_zeros(batch, dim, width - 1, dtype=dtype) if initial_states is None else initial_states.to(dtype)
    return torch.cat([prev, x.to(dtype)], dim=-1)


def _doc_counts(seq_idx, x, width):
    """(batch, width - 1 + seqlen): document boundaries seen so far; taps count iff both ends have equal counts."""
    batch, _, seqlen = x.shape
    if seq_idx is None:
        return torch.zeros(batch, width - 1 + seqlen, dtype=torch.long, device=x.device)
    changed = torch.zeros_like(seq_idx, dtype=torch.long)
    changed[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    # The initial states belong to the first document (count 0).
    return F.pad(changed.cumsum(-1), (width - 1, 0))


def final_states_ref(x, initial_states, seq_idx, width):
    """The last width - 1 inputs (batch, dim, width - 1) in x's dtype, zero where they precede the last document."""
    seqlen = x.shape[-1]
    tail = _with_initial_states(x, initial_states, width, _compute_dtype(x))[..., seqlen:]
    doc = _doc_counts(seq_idx, x, width)
    in_last_doc = (doc[:, seqlen:] == doc[:, -1:]).to(tail.dtype)[:, None]
    return (tail * in_last_doc).to(x.dtype)


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None):
    """One decoding step: shift ``conv_state`` left by one, append x, and convolve.

    Args:
        x: (batch, dim) the new input; conv_state: (batch, dim, width), updated in place;
        weight: (dim, width); bias: (dim,); activation: None or "silu".
    Returns:
        out: (batch, dim) in x's dtype.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, dim), got {tuple(x.shape)}")
    batch, dim = x.shape
    width = weight.shape[-1]
    if weight.shape != (dim, width) or conv_state.shape != (batch, dim, width):
        raise ValueError(
            f"expected weight (dim, width) and conv_state (batch, dim, width) with batch={batch}, dim={dim}; got "
            f"{tuple(weight.shape)} and {tuple(conv_state.shape)}"
        )
    cdt = _compute_dtype(x)
    window = torch.cat([conv_state[..., 1:].to(cdt), x.to(cdt)[..., None]], dim=-1)
    conv_state.copy_(window)
    y = (window * weight.to(cdt)).sum(-1)
    if bias is not None:
        y = y + bias.to(cdt)
    return _activate(y, activation).to(x.dtype)
