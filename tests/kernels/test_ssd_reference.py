"""The chunked SSD reference against the sequential recurrence, in fp64."""

import pytest
import torch

from mambatron.kernels.ssd.reference import mamba_chunk_scan_combined_ref, ssd_sequential_ref

F64 = torch.float64


def make_inputs(batch=2, seqlen=50, nheads=4, headdim=8, ngroups=2, dstate=8, D_per_channel=False, seed=0, dtype=F64):
    """Every tensor argument of mamba_chunk_scan_combined, random with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    return dict(
        x=rand(batch, seqlen, nheads, headdim),
        dt=rand(batch, seqlen, nheads),
        A=-torch.rand(nheads, generator=g, dtype=dtype) * 2 - 0.1,
        B=rand(batch, seqlen, ngroups, dstate),
        C=rand(batch, seqlen, ngroups, dstate),
        D=rand(nheads, headdim) if D_per_channel else rand(nheads),
        z=rand(batch, seqlen, nheads, headdim),
        dt_bias=rand(nheads) * 0.5,
        initial_states=rand(batch, nheads, headdim, dstate),
    )


def packed_seq_idx(batch, seqlen, lengths):
    """Document ids for rows packed with documents of the given lengths (the last one fills the row)."""
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
    for row, row_lengths in enumerate(lengths):
        start = 0
        for doc, length in enumerate(row_lengths):
            seq_idx[row, start : start + length] = doc
            start += length
        seq_idx[row, start:] = len(row_lengths)
    return seq_idx


@pytest.mark.parametrize("chunk_size", [16, 7])
@pytest.mark.parametrize("D_per_channel", [False, True])
def test_chunked_matches_sequential(chunk_size, D_per_channel):
    inputs = make_inputs(D_per_channel=D_per_channel)
    seq_idx = packed_seq_idx(2, 50, [[5, 20], [16, 16, 1]])
    kwargs = dict(seq_idx=seq_idx, dt_softplus=True, dt_limit=(0.05, 2.0), return_final_states=True)
    y, final = mamba_chunk_scan_combined_ref(chunk_size=chunk_size, **inputs, **kwargs)
    y_seq, final_seq = ssd_sequential_ref(**inputs, **kwargs)
    torch.testing.assert_close(y, y_seq, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, final_seq, rtol=0, atol=1e-10)


def test_no_optional_inputs():
    inputs = make_inputs(seqlen=33)
    core = {k: inputs[k] for k in ("x", "A", "B", "C")}
    dt = torch.nn.functional.softplus(inputs["dt"])
    y = mamba_chunk_scan_combined_ref(dt=dt, chunk_size=8, **core)
    torch.testing.assert_close(y, ssd_sequential_ref(dt=dt, **core), rtol=0, atol=1e-10)


def test_seq_idx_equals_separate_documents():
    inputs = make_inputs(batch=1, seqlen=40)
    del inputs["initial_states"]
    seq_idx = packed_seq_idx(1, 40, [[13, 20]])
    y = mamba_chunk_scan_combined_ref(chunk_size=16, seq_idx=seq_idx, dt_softplus=True, **inputs)
    for start, end in [(0, 13), (13, 33), (33, 40)]:
        doc = {k: v[:, start:end] if v.dim() > 1 and v.shape[1] == 40 else v for k, v in inputs.items()}
        y_doc = mamba_chunk_scan_combined_ref(chunk_size=16, dt_softplus=True, **doc)
        torch.testing.assert_close(y[:, start:end], y_doc, rtol=0, atol=1e-10)


def test_seq_idx_resets_where_it_changes():
    """Ids need not increase: a row labelled 0, 1, 0 holds three documents."""
    inputs = make_inputs(batch=1, seqlen=30)
    reused = packed_seq_idx(1, 30, [[10, 10]]) % 2
    y = mamba_chunk_scan_combined_ref(chunk_size=8, seq_idx=reused, dt_softplus=True, **inputs)
    y_seq = ssd_sequential_ref(seq_idx=reused, dt_softplus=True, **inputs)
    y_increasing = mamba_chunk_scan_combined_ref(
        chunk_size=8, seq_idx=packed_seq_idx(1, 30, [[10, 10]]), dt_softplus=True, **inputs
    )
    torch.testing.assert_close(y, y_seq, rtol=0, atol=1e-10)
    torch.testing.assert_close(y, y_increasing, rtol=0, atol=1e-10)


def test_initial_and_final_states_split_the_sequence():
    """Running the second half from the first half's final state equals running the whole sequence."""
    inputs = make_inputs(seqlen=48)
    y, final = mamba_chunk_scan_combined_ref(chunk_size=16, dt_softplus=True, return_final_states=True, **inputs)
    first = {k: v[:, :20] if v.dim() > 1 and v.shape[1] == 48 else v for k, v in inputs.items()}
    second = {k: v[:, 20:] if v.dim() > 1 and v.shape[1] == 48 else v for k, v in inputs.items()}
    y1, mid = mamba_chunk_scan_combined_ref(chunk_size=16, dt_softplus=True, return_final_states=True, **first)
    second["initial_states"] = mid
    y2, final2 = mamba_chunk_scan_combined_ref(chunk_size=16, dt_softplus=True, return_final_states=True, **second)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, rtol=0, atol=1e-10)
    torch.testing.assert_close(final2, final, rtol=0, atol=1e-10)


def test_gradcheck_tiny():
    inputs = make_inputs(batch=1, seqlen=9, nheads=2, headdim=2, ngroups=1, dstate=2, D_per_channel=True)
    names = list(inputs)
    seq_idx = packed_seq_idx(1, 9, [[4]])

    def fn(*tensors):
        y, final = mamba_chunk_scan_combined_ref(
            chunk_size=4,
            seq_idx=seq_idx,
            dt_softplus=True,
            return_final_states=True,
            **dict(zip(names, tensors)),
        )
        return y, final

    tensors = [inputs[k].requires_grad_() for k in names]
    assert torch.autograd.gradcheck(fn, tensors)


def test_low_precision_output_dtype():
    inputs = {k: v.float() for k, v in make_inputs(seqlen=20).items()}
    inputs["x"] = inputs["x"].bfloat16()
    y, final = mamba_chunk_scan_combined_ref(chunk_size=8, return_final_states=True, **inputs)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
