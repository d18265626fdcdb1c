"""The causal conv1d references: against torch's conv1d, documents, states, the decoding step and gradients (fp64)."""

import pytest
import torch
import torch.nn.functional as F

from mambatron.kernels.conv1d.reference import causal_conv1d_fn_ref, causal_conv1d_update_ref

F64 = torch.float64


def make_inputs(batch=2, dim=5, seqlen=13, width=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)
    return rand(batch, dim, seqlen), rand(dim, width), rand(dim), rand(batch, dim, width - 1)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_matches_torch_conv1d(activation):
    x, w, b, h0 = make_inputs()
    out, final = causal_conv1d_fn_ref(x, w, b, initial_states=h0, return_final_states=True, activation=activation)
    xp = torch.cat([h0, x], -1)
    expected = F.conv1d(xp, w[:, None], b, groups=x.shape[1])
    expected = F.silu(expected) if activation else expected
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(final, xp[..., -3:])


def test_documents_match_separate_runs():
    x, w, b, h0 = make_inputs(batch=1, seqlen=14)
    lengths = [5, 1, 6, 2]  # the last document is shorter than width - 1
    seq_idx = torch.repeat_interleave(torch.arange(4, dtype=torch.int32), torch.tensor(lengths))[None]
    out, final = causal_conv1d_fn_ref(
        x, w, b, seq_idx=seq_idx, initial_states=h0, return_final_states=True, activation="silu"
    )
    start = 0
    for i, length in enumerate(lengths):
        out_doc, final_doc = causal_conv1d_fn_ref(
            x[..., start : start + length],
            w,
            b,
            initial_states=h0 if i == 0 else None,
            return_final_states=True,
            activation="silu",
        )
        torch.testing.assert_close(out[..., start : start + length], out_doc, atol=1e-12, rtol=1e-12)
        start += length
    torch.testing.assert_close(final, final_doc)


def test_update_matches_full_sequence():
    x, w, b, _ = make_inputs(seqlen=9)
    full = causal_conv1d_fn_ref(x, w, b, activation="silu")
    state = torch.zeros(2, 5, 4, dtype=F64)
    steps = [causal_conv1d_update_ref(x[..., t], state, w, b, activation="silu") for t in range(9)]
    torch.testing.assert_close(torch.stack(steps, -1), full, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, x[..., -4:])


def test_gradcheck():
    x, w, b, h0 = make_inputs(batch=1, dim=2, seqlen=7, width=3)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2]], dtype=torch.int32)
    args = tuple(t.requires_grad_() for t in (x, w, b, h0))
    f = lambda x, w, b, h0: causal_conv1d_fn_ref(
        x, w, b, seq_idx=seq_idx, initial_states=h0, return_final_states=True, activation="silu"
    )
    assert torch.autograd.gradcheck(f, args)
