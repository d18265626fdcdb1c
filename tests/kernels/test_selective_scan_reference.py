"""The selective scan references: chunked against the sequential loop, gradients, documents and states (fp64)."""

import pytest
import torch

from mambatron.kernels.selective_scan.reference import selective_scan_chunked_ref, selective_scan_sequential_ref

F64 = torch.float64


def make_inputs(batch=2, dim=6, seqlen=37, dstate=4, groups=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)
    bc_shape = (batch, dstate, seqlen) if groups is None else (batch, groups, dstate, seqlen)
    return dict(
        u=rand(batch, dim, seqlen),
        delta=rand(batch, dim, seqlen),
        A=-torch.rand(dim, dstate, generator=g, dtype=F64) * 3 - 0.1,
        B=rand(*bc_shape),
        C=rand(*bc_shape),
        D=rand(dim),
        z=rand(batch, dim, seqlen),
        delta_bias=rand(dim) * 0.5,
    )


def packed_seq_idx(lengths_per_row, seqlen):
    """(batch, seqlen) int32 document ids of rows packed with documents of the given lengths (the last fills up)."""
    seq_idx = torch.zeros(len(lengths_per_row), seqlen, dtype=torch.int32)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for doc, length in enumerate(lengths):
            seq_idx[row, start + length :] = doc + 1
            start += length
    return seq_idx


@pytest.mark.parametrize("groups", [None, 1, 3])
@pytest.mark.parametrize("chunk_size", [None, 5, 64])
def test_chunked_matches_sequential(groups, chunk_size):
    inputs = make_inputs(groups=groups)
    seq_idx = packed_seq_idx([[10, 20], [17]], 37)
    h0 = torch.randn(2, 6, 4, dtype=F64)
    kw = dict(delta_softplus=True, return_last_state=True, initial_state=h0, seq_idx=seq_idx)
    out_seq, last_seq = selective_scan_sequential_ref(**inputs, **kw)
    out_chk, last_chk = selective_scan_chunked_ref(**inputs, **kw, chunk_size=chunk_size)
    torch.testing.assert_close(out_chk, out_seq, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(last_chk, last_seq, atol=1e-10, rtol=1e-10)


def test_documents_match_separate_runs():
    inputs = make_inputs(batch=1, seqlen=30, groups=2)
    lengths = [7, 11, 12]
    seq_idx = packed_seq_idx([lengths[:-1]], 30)
    h0 = torch.randn(1, 6, 4, dtype=F64)
    out, last = selective_scan_chunked_ref(
        **inputs, delta_softplus=True, return_last_state=True, initial_state=h0, seq_idx=seq_idx, chunk_size=4
    )
    start = 0
    for i, length in enumerate(lengths):
        part = {
            k: (v[..., start : start + length] if k in ("u", "delta", "z", "B", "C") else v) for k, v in inputs.items()
        }
        out_doc, last_doc = selective_scan_sequential_ref(
            **part, delta_softplus=True, return_last_state=True, initial_state=h0 if i == 0 else None
        )
        torch.testing.assert_close(out[..., start : start + length], out_doc, atol=1e-10, rtol=1e-10)
        start += length
    torch.testing.assert_close(last, last_doc, atol=1e-10, rtol=1e-10)


def test_state_carries_across_a_split():
    inputs = make_inputs(seqlen=40)
    full, last_full = selective_scan_chunked_ref(**inputs, return_last_state=True)
    first = {k: (v[..., :23] if k in ("u", "delta", "z", "B", "C") else v) for k, v in inputs.items()}
    second = {k: (v[..., 23:] if k in ("u", "delta", "z", "B", "C") else v) for k, v in inputs.items()}
    out1, h = selective_scan_chunked_ref(**first, return_last_state=True)
    out2, last = selective_scan_chunked_ref(**second, return_last_state=True, initial_state=h)
    torch.testing.assert_close(torch.cat([out1, out2], -1), full, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(last, last_full, atol=1e-10, rtol=1e-10)


def test_no_overflow_with_strong_decay():
    inputs = make_inputs(seqlen=40)
    inputs["A"] = inputs["A"] * 1e4  # per-step log-decays of about -1e4: exp(-cs) would overflow
    out = selective_scan_chunked_ref(**inputs, delta_softplus=True, chunk_size=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, selective_scan_sequential_ref(**inputs, delta_softplus=True))


@pytest.mark.parametrize("fn", [selective_scan_chunked_ref, selective_scan_sequential_ref])
def test_gradcheck(fn):
    inputs = make_inputs(batch=1, dim=2, seqlen=7, dstate=2, groups=2)
    seq_idx = packed_seq_idx([[3]], 7)
    h0 = torch.randn(1, 2, 2, dtype=F64, requires_grad=True)
    names = list(inputs)
    for v in inputs.values():
        v.requires_grad_()

    def f(*args):
        kw = dict(zip(names, args))
        kw = {**kw, "chunk_size": 3} if fn is selective_scan_chunked_ref else kw
        return fn(**kw, delta_softplus=True, return_last_state=True, initial_state=args[-1], seq_idx=seq_idx)

    assert torch.autograd.gradcheck(f, (*inputs.values(), h0))


def test_output_dtype_follows_u():
    inputs = {k: v.float() for k, v in make_inputs().items()}
    inputs["u"] = inputs["u"].bfloat16()
    out, last = selective_scan_chunked_ref(**inputs, return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
