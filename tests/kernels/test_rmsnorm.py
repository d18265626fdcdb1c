"""The Triton RMSNorms against the references: outputs, the pre-norm residual, and every gradient.

Without a GPU the kernels run in Triton's interpreter in fp32 at tiny shapes (see conftest.py); on a GPU the same
cases also run in bf16.
"""

import pytest
import torch

from mambatron.kernels.rmsnorm import rms_norm_fn, rms_norm_fn_ref, rmsnorm_fn, rmsnorm_fn_ref
from tests.kernels.conftest import assert_close

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def dtypes():
    return [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]


def rand(*shape, seed, dtype, device):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device).requires_grad_()


def grads_of(outputs, inputs, seed=1):
    """Gradients of a fixed random linear loss of ``outputs`` w.r.t. every tensor in ``inputs`` (None-safe)."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outputs)
    names = [k for k, v in inputs.items() if v is not None]
    return dict(zip(names, torch.autograd.grad(loss, [inputs[k] for k in names])))


def upcast(inputs):
    return {k: (None if v is None else v.detach().float().requires_grad_()) for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("residual_in_fp32", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_residual_add_norm(dtype, residual_in_fp32, with_residual, device):
    inputs = dict(
        x=rand(2, 5, 48, seed=0, dtype=dtype, device=device),
        weight=rand(48, seed=2, dtype=torch.float32, device=device),
        bias=rand(48, seed=3, dtype=torch.float32, device=device),
        residual=rand(2, 5, 48, seed=1, dtype=dtype, device=device) if with_residual else None,
    )
    kw = dict(eps=1e-5, prenorm=True, residual_in_fp32=residual_in_fp32)
    out, res = rms_norm_fn(**inputs, **kw)
    inputs_ref = upcast(inputs)
    out_ref, res_ref = rms_norm_fn_ref(**inputs_ref, **kw)
    assert out.dtype == dtype and res.dtype == (torch.float32 if residual_in_fp32 else dtype)
    assert_close(out, out_ref, "out", dtype)
    assert_close(res, res_ref, "residual_out", dtype)
    grads, grads_ref = grads_of((out, res), inputs), grads_of((out_ref, res_ref), inputs_ref)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_close(grad, grads_ref[name], f"d{name}", dtype)


def test_norm_without_prenorm_or_bias(device):
    x, w = rand(3, 20, seed=0, dtype=torch.float32, device=device), rand(20, seed=1, dtype=torch.float32, device=device)
    out = rms_norm_fn(x, w)
    out_ref = rms_norm_fn_ref(x, w)
    assert_close(out, out_ref, "out")
    (dx, dw), (dx_ref, dw_ref) = (torch.autograd.grad(o.square().sum(), (x, w)) for o in (out, out_ref))
    assert_close(dx, dx_ref, "dx")
    assert_close(dw, dw_ref, "dweight")


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [None, 12])
def test_gated_group_norm(dtype, norm_before_gate, group_size, device):
    inputs = dict(
        x=rand(3, 4, 36, seed=0, dtype=dtype, device=device),
        weight=rand(36, seed=2, dtype=torch.float32, device=device),
        bias=rand(36, seed=3, dtype=torch.float32, device=device),
        z=rand(3, 4, 36, seed=1, dtype=dtype, device=device),
    )
    kw = dict(eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    out = rmsnorm_fn(**inputs, **kw)
    inputs_ref = upcast(inputs)
    out_ref = rmsnorm_fn_ref(**inputs_ref, **kw)
    assert out.dtype == dtype
    assert_close(out, out_ref, "out", dtype)
    grads, grads_ref = grads_of((out,), inputs), grads_of((out_ref,), inputs_ref)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_close(grad, grads_ref[name], f"d{name}", dtype)


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gate_read_in_place_from_a_wider_tensor(norm_before_gate, device, monkeypatch):
    """z as Mamba2 passes it, a column slice of its in_proj output: read in place (never copied), with the same values
    and gradients as the reference; a z whose rows are not uniformly strided is still accepted (copied)."""
    from mambatron.kernels.rmsnorm import api

    wide = rand(3, 4, 50, seed=1, dtype=torch.float32, device=device)
    x, w = (
        rand(3, 4, 36, seed=0, dtype=torch.float32, device=device),
        rand(36, seed=2, dtype=torch.float32, device=device),
    )
    z = wide[..., 7:43]
    assert api.row_stride(z) == 50 and api.row_stride(z.transpose(0, 1)) is None
    seen = []
    forward = api.norm_forward
    monkeypatch.setattr(api, "norm_forward", lambda *a: seen.append(a[2]) or forward(*a))
    kw = dict(eps=1e-5, group_size=12, norm_before_gate=norm_before_gate)
    for gate in (z, z.transpose(0, 1)):
        out = rmsnorm_fn(x if gate is z else x.transpose(0, 1), w, z=gate, **kw)
        ref = rmsnorm_fn_ref(x if gate is z else x.transpose(0, 1), w, z=gate, **kw)
        assert_close(out, ref, "out")
        grads, grads_ref = (torch.autograd.grad(o.square().sum(), (x, w, wide)) for o in (out, ref))
        for name, g, g_ref in zip(("dx", "dweight", "dz"), grads, grads_ref):
            assert_close(g, g_ref, name)
    assert seen[0].data_ptr() == z.data_ptr(), "a uniformly strided z must be read in place"
    assert seen[1].is_contiguous() and seen[1].data_ptr() != z.data_ptr()


def test_forward_tiles_choice():
    from mambatron.kernels.rmsnorm import api

    assert api._fwd_tiles(5120, 2048, 2048, 4096) == (False, 4096, 1024, None), "Mamba2-2.7B's gated norm, split"
    assert api._fwd_tiles(2560, 2048, 2048, 4096) == (False, 2048, 512, None), "its d_model, split"
    assert api._fwd_tiles(5120, 0, 2048, 4096) == (True, 2048, 0, 8), "no split: chunked"
    assert api._fwd_tiles(2560, 0, 2048, 4096) == (False, 4096, 0, None), "a padded tile of 4096 is still one tile"
    assert api._fwd_tiles(7000, 2048, 2048, 4096) == (True, 2048, 0, 8), "4096 + 4096 saves nothing: chunked"
    assert api._fwd_tiles(1536, 2048, 0, 4096) == (False, 2048, 0, None), "at or below FWD_SPLIT_ABOVE: padded"
    assert api._fwd_tiles(4096, 2048, 2048, 1024) == (False, 4096, 0, None), "power-of-two groups keep one tile"


@pytest.mark.parametrize("mode", ["chunk4", "chunk8", "split"])
def test_forward_in_split_or_chunked_tiles(mode, device, monkeypatch):
    """Groups whose size is not a power of two, held as two tiles (api.FWD_SPLIT_ABOVE: 12 = 8 + 4, 36 = 32 + 4) or
    walked in column chunks (api.FWD_CHUNK): the same outputs and residual sums as the whole-row kernel and the
    reference, with a gate read from a wider tensor, several groups, chunks that do not divide the group (a masked
    tail), and the pre-norm residual add."""
    from mambatron.kernels.rmsnorm import api

    chunk = int(mode[5:]) if mode.startswith("chunk") else 0
    if mode == "split":
        assert api._fwd_tiles(12, 8, 0, 8) == (False, 8, 4, None)
        assert api._fwd_tiles(36, 8, 0, 8) == (False, 32, 4, None)
    else:
        assert api._fwd_tiles(12, 0, chunk, 8)[:3] == (True, chunk, 0)
    monkeypatch.setattr(api, "FWD_CHUNK_ABOVE", 8)
    x = rand(3, 4, 36, seed=0, dtype=torch.float32, device=device)
    w, b = (rand(36, seed=s, dtype=torch.float32, device=device) for s in (2, 3))
    z = rand(3, 4, 50, seed=1, dtype=torch.float32, device=device)[..., 7:43]
    residual = rand(3, 4, 36, seed=4, dtype=torch.float32, device=device)
    cases = [
        ("gated groups of 12", lambda: rmsnorm_fn(x, w, b, z=z, eps=1e-5, group_size=12, norm_before_gate=False),
         lambda: rmsnorm_fn_ref(x, w, b, z=z, eps=1e-5, group_size=12, norm_before_gate=False)),
        ("gated after the norm, one group of 36", lambda: rmsnorm_fn(x, w, z=z, eps=1e-5),
         lambda: rmsnorm_fn_ref(x, w, z=z, eps=1e-5)),
        ("pre-norm residual add", lambda: rms_norm_fn(x, w, b, residual, 1e-5, prenorm=True, residual_in_fp32=True),
         lambda: rms_norm_fn_ref(x, w, b, residual, 1e-5, prenorm=True, residual_in_fp32=True)),
    ]  # fmt: skip
    for name, run, ref in cases:
        monkeypatch.setattr(api, "FWD_CHUNK", 0)
        monkeypatch.setattr(api, "FWD_SPLIT_ABOVE", 0)
        whole = run()
        monkeypatch.setattr(api, "FWD_CHUNK", chunk)
        monkeypatch.setattr(api, "FWD_SPLIT_ABOVE", 8 if mode == "split" else 0)
        chunked = run()
        expected = ref()
        for got, one_tile, want in zip(*(o if isinstance(o, tuple) else (o,) for o in (chunked, whole, expected))):
            assert_close(got, want, name)
            torch.testing.assert_close(got, one_tile, rtol=1e-6, atol=1e-6, msg=name)
        grads, grads_ref = (torch.autograd.grad(o[0].square().sum() if isinstance(o, tuple) else o.square().sum(),
                                                (x, w)) for o in (chunked, expected))  # fmt: skip
        for g, g_ref, what in zip(grads, grads_ref, ("dx", "dweight")):
            assert_close(g, g_ref, f"{name}: {what}")


def test_gated_without_gate_or_bias(device):
    x, w = rand(2, 16, seed=0, dtype=torch.float32, device=device), rand(16, seed=1, dtype=torch.float32, device=device)
    out = rmsnorm_fn(x, w, group_size=4)
    assert_close(out, rmsnorm_fn_ref(x, w, group_size=4), "out")


def test_clear_errors(device):
    x, w = torch.randn(2, 12, device=device), torch.randn(12, device=device)
    with pytest.raises(ValueError, match="group_size=5 must divide hidden=12"):
        rmsnorm_fn(x, w, group_size=5)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm_fn(x, w[:6])
    with pytest.raises(ValueError, match="residual must have x's shape"):
        rms_norm_fn(x, w, residual=x[:1])


@pytest.mark.parametrize("hidden", [2048, 4096])
@pytest.mark.parametrize("group_size", [64, None])
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gated_fp32_agrees_with_fp64_to_1e5(hidden, group_size, norm_before_gate, with_bias, device):
    """fp32 gated RMSNorm at Mamba2's widths: output and every gradient within 1e-5 (atol and rtol) of the fp64
    reference, with the gate before and after the norm, one group or groups of 64, with and without bias."""
    rows = 256 if device == "cuda" else 3
    g = torch.Generator().manual_seed(hidden + (group_size or 0))
    x, z = torch.randn(2, rows, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(hidden, generator=g, dtype=torch.float64)
    b = torch.randn(hidden, generator=g, dtype=torch.float64) if with_bias else None
    dout = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    kw = dict(eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    exact = dict(x=x, weight=w, bias=b, z=z)
    exact = {k: None if v is None else v.clone().requires_grad_() for k, v in exact.items()}
    fp32 = {k: None if v is None else v.detach().float().to(device).requires_grad_() for k, v in exact.items()}
    ref = rmsnorm_fn_ref(**exact, **kw)
    out = rmsnorm_fn(**fp32, **kw)
    assert out.dtype == torch.float32
    names = [k for k, v in exact.items() if v is not None]
    ref_grads = torch.autograd.grad((ref * dout).sum(), [exact[k] for k in names])
    grads = torch.autograd.grad((out * dout.float().to(device)).sum(), [fp32[k] for k in names])
    torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=1e-5, rtol=1e-5)
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        torch.testing.assert_close(
            grad.double().cpu(), ref_grad, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"d{n}: {m}"
        )


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize(
    "gated, with_bias, with_residual", [(True, True, False), (True, False, False), (False, True, True)]
)
def test_backward_writes_the_forward_output_again(norm_before_gate, gated, with_bias, with_residual, device):
    """norm_backward(out_dtype=...) returns the forward's output as a sixth value (the fused Mamba2 op feeds it to
    out_proj's weight gradient instead of running the forward twice): equal to norm_forward's, gradients unchanged."""
    from mambatron.kernels.rmsnorm.api import norm_backward, norm_forward

    x, w, z, b, res, dout = (rand(6, 48, seed=i, dtype=torch.float32, device=device).detach() for i in range(6))
    z, b, res = (z if gated else None), (b if with_bias else None), (res if with_residual else None)
    out, _, rstd = norm_forward(x, res, z, w[0], b[0] if b is not None else None, 1e-5, 16, norm_before_gate, False,
                                None)  # fmt: skip
    args = (x, res, z, w[0], b[0] if b is not None else None, rstd, norm_before_gate, dout)
    plain = norm_backward(*args)
    *grads, again = norm_backward(*args, out_dtype=torch.float32)
    assert len(plain) == 5 and again.dtype == torch.float32
    torch.testing.assert_close(again, out, rtol=1e-6, atol=1e-6)
    assert again.abs().max() > 0.1
    for got, want in zip(grads, plain):
        assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("with_residual", [False, True])
def test_prenorm_keeps_only_the_fp32_sum_for_backward(with_residual, device):
    """With an fp32 residual stream the norm keeps residual_out (= x + residual, exact in fp32) for its backward, not x
    and residual: the mixer output x is then freed once the norm has read it (one x-sized tensor per layer less at
    the memory peak). The gradients are bit-identical to the backward from x and residual, in x's and residual's
    dtypes."""
    from mambatron.kernels.rmsnorm.api import norm_backward, norm_forward

    x = rand(4, 48, seed=0, dtype=torch.float16, device=device)
    residual = rand(4, 48, seed=1, dtype=torch.float32, device=device) if with_residual else None
    w = rand(48, seed=2, dtype=torch.float32, device=device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, res = rms_norm_fn(x, w, residual=residual, eps=1e-5, prenorm=True, residual_in_fp32=True)
    kept = {t.data_ptr() for t in saved if t is not None}
    assert res.data_ptr() in kept
    assert x.data_ptr() not in kept
    if with_residual:
        assert residual.data_ptr() not in kept
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device, out.dtype)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), [x, w] + ([residual] if with_residual else []))
    assert grads[0].dtype == torch.float16 and (not with_residual or grads[2].dtype == torch.float32)
    # The same backward from x and residual, as before.
    _, _, rstd = norm_forward(x.detach(), None if residual is None else residual.detach(), None, w.detach(), None,
                              1e-5, 48, True, True, torch.float32)  # fmt: skip
    dx, dres, _, dw, _ = norm_backward(x.detach(), None if residual is None else residual.detach(), None, w.detach(),
                                       None, rstd, True, dout, None)  # fmt: skip
    assert torch.equal(grads[0], dx) and torch.equal(grads[1], dw)
    if with_residual:
        assert torch.equal(grads[2], dres)
    assert dx.abs().max() > 0.01


@pytest.mark.parametrize("group_size", [12, 36])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_backward_in_split_tiles_matches_the_reference(group_size, norm_before_gate, device, monkeypatch):
    """The backward can hold a group that is not a power of two as two tiles (api.BWD_SPLIT_ABOVE: 12 = 8 + 4,
    36 = 32 + 4, as Mamba2-2.7B's 5120 = 4096 + 1024): every gradient of the gated norm, with bias and a gate read
    from a wider tensor, equals the reference's."""
    from mambatron.kernels.rmsnorm import api

    monkeypatch.setattr(api, "BWD_SPLIT_ABOVE", 8)
    assert api._fwd_tiles(group_size, 8, 0, 0)[1:3] == ((8, 4) if group_size == 12 else (32, 4))
    inputs = dict(
        x=rand(3, 4, 36, seed=0, dtype=torch.float32, device=device),
        weight=rand(36, seed=2, dtype=torch.float32, device=device),
        bias=rand(36, seed=3, dtype=torch.float32, device=device),
        z=rand(3, 4, 50, seed=1, dtype=torch.float32, device=device)[..., 7:43],
    )
    kw = dict(eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    out = rmsnorm_fn(**inputs, **kw)
    inputs_ref = upcast(inputs)
    grads, grads_ref = grads_of((out,), inputs), grads_of((rmsnorm_fn_ref(**inputs_ref, **kw),), inputs_ref)
    assert set(grads) == {"x", "weight", "bias", "z"}
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], f"d{name}")


@pytest.mark.parametrize("case", ["gated-before", "gated-after", "prenorm"])
def test_backward_split_tiles_and_prefetch_equal_one_padded_tile(case, device, monkeypatch):
    """norm_backward with two tiles per group, with each row's inputs loaded during the row before (prefetch), with
    both, and with one padded tile: the same dx, dresidual, dz, dweight, dbias and recomputed output (the pre-norm
    case with an incoming residual gradient). Several rows per program, so the prefetched rows are the ones used."""
    from mambatron.kernels.rmsnorm import api

    x, w, z, b, res, dout, dres = (rand(6, 36, seed=i, dtype=torch.float32, device=device).detach() for i in range(7))
    gated = case != "prenorm"
    args = (x, None if gated else res, z if gated else None, w[0], b[0], None, case == "gated-before", dout)
    _, _, rstd = api.norm_forward(*args[:5], 1e-5, 12 if gated else 36, args[6], False, None)
    args = args[:5] + (rstd,) + args[6:]
    runs = []
    for split, prefetch in ((0, 0), (8, 0), (0, 8), (8, 8)):
        monkeypatch.setattr(api, "BWD_SPLIT_ABOVE", split)
        monkeypatch.setattr(api, "BWD_PREFETCH_ABOVE", prefetch)
        runs.append(api.norm_backward(*args, None if gated else dres, out_dtype=torch.float32))
    for run in runs[1:]:
        for name, got, want in zip(("dx", "dresidual", "dz", "dweight", "dbias", "out"), run, runs[0]):
            assert (got is None) == (want is None) == (name == ("dresidual" if gated else "dz")), name
            if got is not None:
                assert want.abs().max() > 0.05, name
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)
