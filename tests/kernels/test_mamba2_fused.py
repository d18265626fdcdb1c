"""The fused Mamba2 op (conv1d → SSD → gated RMSNorm on the in_proj output) against its reference composition: the
output and the gradient of every input, and what it keeps for backward.

Without a GPU the kernels run in Triton's interpreter in fp32 at tiny shapes (see conftest.py).
"""

import pytest
import torch

from mambatron.kernels.mamba2 import mamba2_split_conv_scan_fn, mamba2_split_conv_scan_fn_ref
from tests.kernels.conftest import assert_close, saved_words_per_token

pytestmark = pytest.mark.usefixtures("triton_interpreter")

# fp32 tensors: on the GPU, SSD's tl.dot multiplies fp32 operands in tf32 (10-bit mantissa), so the bf16 tolerance
# applies there (as in test_ssd.py); the interpreter computes in exact fp32.
TOLERANCE_DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32
DIMS = dict(d_inner=8, ngroups=2, dstate=4, chunk_size=8, norm_group_size=4, eps=1e-5)
NHEADS, WIDTH = 4, 4
FEATURES = 2 * 8 + 2 * 2 * 4 + NHEADS
CONV_DIM = 8 + 2 * 2 * 4


D_MODEL = 6


def make_inputs(batch, seqlen, device, seed=0, out_proj=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device).requires_grad_()
    inputs = dict(
        zxbcdt=r(batch, seqlen, FEATURES),
        conv_weight=r(CONV_DIM, WIDTH, scale=0.5),
        conv_bias=r(CONV_DIM, scale=0.1),
        dt_bias=r(NHEADS, scale=0.5),
        A=(-torch.rand(NHEADS, generator=g) * 2 - 0.2).to(device).requires_grad_(),
        D=r(NHEADS),
        norm_weight=r(8, scale=0.2),
    )
    if out_proj:
        inputs.update(out_proj_weight=r(D_MODEL, 8, scale=0.4), out_proj_bias=r(D_MODEL, scale=0.1))
    return inputs


def call(fn, inputs, **kwargs):
    """The op on inputs (positional up to norm_weight, out_proj's weight and bias by keyword)."""
    positional = [v for k, v in inputs.items() if not k.startswith("out_proj")]
    folded = {k: v for k, v in inputs.items() if k.startswith("out_proj")}
    return fn(*positional, **DIMS, **folded, **kwargs)


def run(fn, inputs, seq_idx):
    out = call(fn, inputs, seq_idx=seq_idx)
    g = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=g).to(out.device)).sum()
    return out, dict(zip(inputs, torch.autograd.grad(loss, list(inputs.values()))))


@pytest.mark.parametrize("out_proj", [False, True], ids=["norm-out", "out_proj-folded"])
@pytest.mark.parametrize("with_docs", [False, True])
def test_fused_equals_reference(with_docs, out_proj, device):
    """Output and every gradient (in_proj output, conv weight and bias, dt_bias, A, D, norm weight, and out_proj's
    weight and bias when it is folded in), over several chunks, 2 groups, and documents packed into one row (the conv
    and the state both reset where one starts)."""
    batch, seqlen = 2, 21
    inputs = make_inputs(batch, seqlen, device, out_proj=out_proj)
    seq_idx = None
    if with_docs:
        seq_idx = torch.tensor([[0] * 9 + [1] * 12, [0] * 3 + [1] * 10 + [2] * 8], dtype=torch.int32, device=device)
    out, grads = run(mamba2_split_conv_scan_fn, inputs, seq_idx)
    ref_inputs = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    out_ref, grads_ref = run(mamba2_split_conv_scan_fn_ref, ref_inputs, seq_idx)
    assert out.shape == (batch, seqlen, D_MODEL if out_proj else 8) and out.dtype == torch.float32
    assert_close(out, out_ref, "out", TOLERANCE_DTYPE)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f"d{name} is all zero"
        assert_close(grad, grads_ref[name], f"d{name}", TOLERANCE_DTYPE)


def test_saves_only_the_in_proj_output_and_the_scan_output(device):
    """Per token the fused op keeps the in_proj output and the SSD output (d_inner) plus per-head fp32 scalars: the
    conv output is recomputed in backward and z is never copied; with out_proj folded in, the norm's output is
    recomputed too. The op-by-op composition keeps the conv output as well."""
    batch, seqlen = 2, 16
    inputs = make_inputs(batch, seqlen, device, out_proj=True)
    params = [v for k, v in inputs.items() if k != "zxbcdt"]
    plain = {k: v for k, v in inputs.items() if not k.startswith("out_proj")}
    weight, bias = inputs["out_proj_weight"], inputs["out_proj_bias"]

    def saved_per_token(fn, fold):
        if fold:
            run = lambda: call(fn, inputs)  # noqa: E731
        else:
            run = lambda: torch.nn.functional.linear(call(fn, plain), weight, bias)  # noqa: E731
        return saved_words_per_token(run, params, batch * seqlen)

    fused = saved_per_token(mamba2_split_conv_scan_fn, fold=True)
    # in_proj output + SSD output + rstd (2 groups) + dt_out/dA_cumsum (nheads each).
    assert fused == FEATURES + 8 + 2 + 2 * NHEADS, fused
    # out_proj applied outside keeps the norm's output (d_inner) as its input.
    assert saved_per_token(mamba2_split_conv_scan_fn, fold=False) == fused + 8
    assert saved_per_token(mamba2_split_conv_scan_fn_ref, fold=True) > fused + CONV_DIM


def test_bad_widths_are_named(device):
    inputs = make_inputs(1, 4, device)
    with pytest.raises(ValueError, match="needs 2·d_inner"):
        mamba2_split_conv_scan_fn(*inputs.values(), **{**DIMS, "dstate": 8})


def test_kept_chunk_states_are_not_recomputed_and_change_nothing(device, monkeypatch):
    """keep_states: SSD's per-chunk entering states are kept from the forward (their words per token are what the op
    keeps more) and the backward runs chunk_state once less; the output and every gradient are bit-identical."""
    from mambatron.kernels.ssd import combined

    batch, seqlen = 2, 16  # two chunks of 8
    inputs = make_inputs(batch, seqlen, device, out_proj=True)
    seq_idx = torch.tensor([[0] * 5 + [1] * 11, [0] * 16], dtype=torch.int32, device=device)
    calls, real = [], combined.chunk_state_fwd
    monkeypatch.setattr(combined, "chunk_state_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    results, saved = {}, {}
    for keep in (False, True):
        calls.clear()
        out = call(mamba2_split_conv_scan_fn, inputs, seq_idx=seq_idx, keep_states=keep)
        g = torch.Generator().manual_seed(3)
        grads = torch.autograd.grad((out * torch.randn(out.shape, generator=g).to(device)).sum(), list(inputs.values()))
        results[keep] = (out, grads, len(calls))
        params = [v for k, v in inputs.items() if k != "zxbcdt"]
        run = lambda keep=keep: call(mamba2_split_conv_scan_fn, inputs, seq_idx=seq_idx, keep_states=keep)
        saved[keep] = saved_words_per_token(run, params, batch * seqlen)
    assert results[False][2] == 2 and results[True][2] == 1
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    for name, a, b in zip(inputs, results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"d{name}")
    headdim = DIMS["d_inner"] // NHEADS
    words = NHEADS * headdim * DIMS["dstate"] / DIMS["chunk_size"]  # one fp32 state per chunk, per token
    assert saved[True] == saved[False] + words, (saved, words)


def test_folded_out_proj_gradients_come_in_the_parameters_dtype(device):
    """bf16 activations with fp32 out_proj parameters (autocast's mixed precision): the folded projection runs in
    bf16, as F.linear would under autocast, and returns its weight and bias gradients in fp32 itself. Autograd would
    cast a wrong dtype silently, so what this checks is the values: those of the projection applied outside the op."""
    inputs = make_inputs(2, 16, device, out_proj=True)
    zxbcdt = inputs["zxbcdt"].detach().to(torch.bfloat16).requires_grad_()
    inputs = {**inputs, "zxbcdt": zxbcdt}
    weight, bias = inputs["out_proj_weight"], inputs["out_proj_bias"]
    plain = {k: v for k, v in inputs.items() if not k.startswith("out_proj")}
    dy = torch.randn(2, 16, D_MODEL, generator=torch.Generator().manual_seed(5)).to(device, torch.bfloat16)

    folded = call(mamba2_split_conv_scan_fn, inputs)
    dw, db = torch.autograd.grad((folded.float() * dy.float()).sum(), [weight, bias])
    outside = torch.nn.functional.linear(
        call(mamba2_split_conv_scan_fn, plain), weight.to(torch.bfloat16), bias.to(torch.bfloat16)
    )
    dw_ref, db_ref = torch.autograd.grad((outside.float() * dy.float()).sum(), [weight, bias])
    assert folded.dtype == torch.bfloat16 and dw.dtype == db.dtype == torch.float32
    assert_close(folded, outside, "out", torch.bfloat16)
    assert_close(dw, dw_ref, "dout_proj_weight", torch.bfloat16)
    assert_close(db, db_ref, "dout_proj_bias", torch.bfloat16)
