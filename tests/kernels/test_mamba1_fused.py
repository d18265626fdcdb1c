"""The fused Mamba1 op (conv1d → x_proj → dt_proj → selective scan → gate on the in_proj output) against its reference
composition: the output and the gradient of every input, for both layouts of the in_proj output, and what it keeps
for backward.

Without a GPU the kernels run in Triton's interpreter in fp32 at tiny shapes (see conftest.py).
"""

import pytest
import torch

from mambatron.kernels.mamba1 import mamba1_conv_scan_fn, mamba1_conv_scan_fn_ref
from tests.kernels.conftest import assert_close, saved_words_per_token

pytestmark = pytest.mark.usefixtures("triton_interpreter")

# On the GPU the small GEMMs run in tf32 for fp32 operands, so the bf16 tolerance applies there; the interpreter
# computes in exact fp32.
TOLERANCE_DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32
D_INNER, DT_RANK, DSTATE, WIDTH, D_MODEL = 8, 3, 4, 4, 6


def make_inputs(batch, seqlen, device, feature_major, seed=0, out_proj=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)
    if feature_major:  # as feature_major(in_proj, hidden) lays it out: (features, batch, seqlen) in memory
        xz = r(2 * D_INNER, batch, seqlen).permute(1, 2, 0)
    else:
        xz = r(batch, seqlen, 2 * D_INNER)
    inputs = dict(
        xz=xz,
        conv_weight=r(D_INNER, WIDTH, scale=0.5),
        conv_bias=r(D_INNER, scale=0.1),
        x_proj_weight=r(DT_RANK + 2 * DSTATE, D_INNER, scale=0.4),
        dt_proj_weight=r(D_INNER, DT_RANK, scale=0.5),
        dt_proj_bias=r(D_INNER, scale=0.5) - 1.0,
        A=-(torch.rand(D_INNER, DSTATE, generator=g) * 2 + 0.2).to(device),
        D=r(D_INNER),
    )
    if out_proj:
        inputs.update(out_proj_weight=r(D_MODEL, D_INNER, scale=0.4), out_proj_bias=r(D_MODEL, scale=0.1))
    return {k: v.requires_grad_() for k, v in inputs.items()}


def call(fn, inputs, **kwargs):
    """The op on inputs (positional up to D, out_proj's weight and bias by keyword)."""
    positional = [v for k, v in inputs.items() if not k.startswith("out_proj")]
    folded = {k: v for k, v in inputs.items() if k.startswith("out_proj")}
    return fn(*positional, **folded, **kwargs)


def run(fn, inputs, seq_idx):
    out = call(fn, inputs, seq_idx=seq_idx)
    g = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=g).to(out.device)).sum()
    return out, dict(zip(inputs, torch.autograd.grad(loss, list(inputs.values()))))


@pytest.mark.parametrize(
    "feature_major,out_proj",
    [(True, False), (False, False), (True, True)],
    ids=["feature-major", "channel-last", "feature-major-out_proj-folded"],
)
@pytest.mark.parametrize("with_docs", [False, True])
def test_fused_equals_reference(with_docs, feature_major, out_proj, device):
    """Output and every gradient (in_proj output, conv weight and bias, x_proj and dt_proj weights, dt bias, A, D,
    and out_proj's weight and bias when it is folded in) over several scan chunks, with documents packed into one
    row (conv and state both reset where one starts). The in_proj-output gradient keeps the in_proj output's
    layout."""
    batch, seqlen = 2, 37
    inputs = make_inputs(batch, seqlen, device, feature_major, out_proj=out_proj)
    seq_idx = None
    if with_docs:
        seq_idx = torch.tensor([[0] * 16 + [1] * 21, [0] * 3 + [1] * 20 + [2] * 14], dtype=torch.int32, device=device)
    out, grads = run(mamba1_conv_scan_fn, inputs, seq_idx)
    ref_inputs = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    out_ref, grads_ref = run(mamba1_conv_scan_fn_ref, ref_inputs, seq_idx)
    assert out.shape == (batch, seqlen, D_MODEL if out_proj else D_INNER) and out.dtype == torch.float32
    assert_close(out, out_ref, "out", TOLERANCE_DTYPE)
    assert grads["xz"].stride() == inputs["xz"].stride()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f"d{name} is all zero"
        assert_close(grad, grads_ref[name], f"d{name}", TOLERANCE_DTYPE)


def test_saves_the_in_proj_output_and_x_proj_output_only(device):
    """Per token the fused op keeps the in_proj output (2·d_inner) and x_proj's output (dt_rank + 2·dstate), plus one
    fp32 state per backward scan chunk; the conv output and Δ are recomputed in backward. The op-by-op composition
    keeps the conv output and Δ as well. Folding out_proj in keeps the scan output (d_inner) for its weight gradient,
    which out_proj applied outside keeps as its input anyway."""
    batch, seqlen = 2, 64
    inputs = make_inputs(batch, seqlen, device, feature_major=True, out_proj=True)
    params = [v for k, v in inputs.items() if k != "xz"]
    plain = {k: v for k, v in inputs.items() if not k.startswith("out_proj")}

    def saved_per_token(fn, fold=False):
        run = (lambda: call(fn, inputs)) if fold else (lambda: fn(*plain.values()))
        return saved_words_per_token(run, params, batch * seqlen)

    fused = saved_per_token(mamba1_conv_scan_fn)
    # One fp32 (d_inner, dstate) state per backward chunk of each row; that chunk is 32 steps
    # in the interpreter and 256 on a GPU (the forward's chunks are shorter; it keeps only these states).
    chunk = 256 if torch.cuda.is_available() else 32
    states_per_token = -(-seqlen // chunk) / seqlen
    assert fused == 2 * D_INNER + DT_RANK + 2 * DSTATE + D_INNER * DSTATE * states_per_token, fused
    assert saved_per_token(mamba1_conv_scan_fn, fold=True) == fused + D_INNER
    assert saved_per_token(mamba1_conv_scan_fn_ref) > fused + 2 * D_INNER


def test_bad_widths_are_named(device):
    inputs = make_inputs(1, 4, device, feature_major=False)
    inputs["x_proj_weight"] = inputs["x_proj_weight"][:, :5]
    with pytest.raises(ValueError, match="needs 2·d_inner features"):
        call(mamba1_conv_scan_fn, inputs)


@pytest.mark.parametrize("weights", [False, True], ids=["weightless (FalconMamba)", "weighted (Jamba)"])
def test_inner_norms_equal_reference(weights, device):
    """With RMSNorms of dt, B and C (FalconMamba's weightless or Jamba's weighted): output and every gradient,
    the norm weights' included, against the reference; and the norms change the result (they are applied)."""
    batch, seqlen = 2, 37
    inputs = make_inputs(batch, seqlen, device, feature_major=True, out_proj=True)
    norm_weights = {}
    if weights:
        g = torch.Generator().manual_seed(3)
        for name, width in (("dt_norm", DT_RANK), ("b_norm", DSTATE), ("c_norm", DSTATE)):
            norm_weights[name] = (1 + 0.3 * torch.randn(width, generator=g)).to(device).requires_grad_()
    seq_idx = torch.tensor([[0] * 16 + [1] * 21, [0] * 37], dtype=torch.int32, device=device)

    def run_normed(fn, ins, norms):
        ws = tuple(norms.values()) or None
        out = call(fn, ins, seq_idx=seq_idx, inner_norm_eps=1e-6, inner_norm_weights=ws)
        g = torch.Generator().manual_seed(7)
        loss = (out * torch.randn(out.shape, generator=g).to(out.device)).sum()
        every = {**ins, **norms}
        return out, dict(zip(every, torch.autograd.grad(loss, list(every.values()))))

    out, grads = run_normed(mamba1_conv_scan_fn, inputs, norm_weights)
    double = lambda d: {k: v.detach().double().requires_grad_() for k, v in d.items()}
    ref_inputs, ref_norms = double(inputs), double(norm_weights)
    out_ref, grads_ref = run_normed(mamba1_conv_scan_fn_ref, ref_inputs, ref_norms)
    assert_close(out, out_ref, "out", TOLERANCE_DTYPE)
    assert grads.keys() == {*inputs, *norm_weights}
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f"d{name} is all zero"
        assert_close(grad, grads_ref[name], f"d{name}", TOLERANCE_DTYPE)
    plain = call(mamba1_conv_scan_fn_ref, ref_inputs, seq_idx=seq_idx)
    assert (plain - out_ref).abs().max() > 1e-2
