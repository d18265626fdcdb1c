"""The chunked LM-head loss against its spec (logits, then fp32 cross-entropy), and through the model."""

import pytest
import torch

from mambatron.kernels.cross_entropy import linear_cross_entropy_fn, linear_cross_entropy_fn_ref


def _inputs(dtype=torch.float32, rows=(3, 11), vocab=37, d=16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*rows, d, generator=g, dtype=dtype).to(device).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g) * 0.5).to(device).requires_grad_()
    labels = torch.randint(0, vocab, rows, generator=g).to(device)
    labels[0, :4] = -100  # ignored positions
    labels[2, -1] = -1
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, **kw):
    loss = fn(hidden, weight, labels, **kw)
    grads = torch.autograd.grad(loss * 1.7, [hidden, weight])  # a non-unit upstream gradient
    return loss, grads


@pytest.mark.parametrize("chunk_rows", [1, 5, 33, 4096])
def test_matches_reference_fp32(chunk_rows):
    """Uneven last chunks, one row per chunk and a single chunk: loss and both gradients to fp32 rounding."""
    hidden, weight, labels = _inputs()
    loss, (dh, dw) = _loss_and_grads(linear_cross_entropy_fn, hidden, weight, labels, chunk_rows=chunk_rows)
    loss_ref, (dh_ref, dw_ref) = _loss_and_grads(linear_cross_entropy_fn_ref, hidden, weight, labels)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-7)
    assert dw.dtype == weight.dtype and dh.dtype == hidden.dtype
    assert dh[0, :4].abs().max() == 0  # ignored positions get no gradient


def test_bf16_under_autocast_close_to_reference():
    """bf16 autocast as in training: the GEMMs in bf16, the softmax in fp32; gradients as accurate as the spec's."""
    hidden, weight, labels = _inputs(rows=(4, 64), vocab=300, d=32)
    truth, (dh_t, dw_t) = _loss_and_grads(linear_cross_entropy_fn_ref, hidden, weight, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, (dh, dw) = _loss_and_grads(linear_cross_entropy_fn, hidden, weight, labels, chunk_rows=50)
        ref, (dh_r, dw_r) = _loss_and_grads(linear_cross_entropy_fn_ref, hidden, weight, labels)
    assert loss.dtype == torch.float32
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert abs(loss.item() - truth.item()) < 1e-2 * truth.item()
    for ours, spec, t in ((dh, dh_r, dh_t), (dw, dw_r, dw_t)):
        assert rel(ours, t) < 2e-2
        assert rel(ours, t) <= 1.5 * rel(spec, t) + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_equals_the_pytorch_ops(dtype, monkeypatch):
    """The Triton kernel (logits → loss and gradient in place; it runs here in the interpreter) against the PyTorch ops
    it replaces, with a vocabulary over one 4096-wide block (a padded last block), ignored rows and a label in it."""
    from mambatron.kernels.cross_entropy import api

    # On a GPU machine the kernel runs compiled, on CUDA tensors; elsewhere in the interpreter on CPU tensors.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, labels = _inputs(dtype=dtype, rows=(3, 7), vocab=4100, d=8, seed=1, device=device)
    labels[1, 0] = 4099  # the last entry, in the padded block
    weight = weight.detach().to(dtype).requires_grad_()
    calls, real = [], api._logits_grad
    monkeypatch.setattr(api, "_logits_grad", lambda *a: calls.append(1) or real(*a))
    kernel = _loss_and_grads(linear_cross_entropy_fn, hidden, weight, labels, chunk_rows=7)
    assert calls == [1, 1, 1]
    monkeypatch.setattr(api, "use_triton", lambda *t: False)
    ops = _loss_and_grads(linear_cross_entropy_fn, hidden, weight, labels, chunk_rows=7)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    assert kernel[0].item() == pytest.approx(ops[0].item(), rel=1e-6)
    for a, b in zip(kernel[1], ops[1]):
        torch.testing.assert_close(a, b, **tol)


def test_all_positions_ignored_gives_zero():
    hidden, weight, labels = _inputs()
    labels[:] = -100
    loss, (dh, dw) = _loss_and_grads(linear_cross_entropy_fn, hidden, weight, labels, chunk_rows=4)
    assert loss.item() == 0.0 and dh.abs().max() == 0 and dw.abs().max() == 0


def test_clear_errors():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="labels of hidden's leading shape"):
        linear_cross_entropy_fn(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        linear_cross_entropy_fn(hidden, weight, labels, chunk_rows=0)


def test_model_loss_through_the_chunked_head(monkeypatch):
    """model.loss with the chunked head equals the logits path (the CPU default) in loss and every gradient."""
    from mambatron.config import load_config
    from mambatron.models import build_model, lm

    cfg = load_config("configs/tiny.yaml", ["model.n_layer=1", "model.kernels=reference"]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    labels = ids[:, 1:].clone()
    labels[1, :5] = -100

    def loss_and_grads():
        model.zero_grad()
        loss = model.loss(ids[:, :-1], labels)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    expected = loss_and_grads()  # the logits path
    calls, real = [], lm.get_op
    chunked_head = lambda h, w, y: calls.append(1) or linear_cross_entropy_fn(h, w, y, chunk_rows=7)
    # Only the head loss switches; the sequence ops stay the CPU references.
    monkeypatch.setattr(lm, "get_op", lambda op, k, like: chunked_head if op == "linear_cross_entropy"
                        else real(op, k, like))  # fmt: skip
    actual = loss_and_grads()
    assert calls == [1]
    for ref, ours in zip(expected, actual, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp32-output weight-gradient GEMM is CUDA-only")
def test_cuda_bf16_weight_grad_accumulates_in_fp32():
    """On CUDA the bf16 chunks' weight gradient is summed by the GEMM into the fp32 buffer: it must match the fp64
    sum over chunks of exact bf16-input products closer than the old per-chunk-rounded sum does."""
    from mambatron.kernels.cross_entropy import api

    g = torch.Generator(device="cuda").manual_seed(0)
    dw = torch.zeros(300, 64, device="cuda")
    chunks = [
        (
            torch.randn(96, 300, device="cuda", generator=g).bfloat16(),
            torch.randn(96, 64, device="cuda", generator=g).bfloat16(),
        )
        for _ in range(5)
    ]
    rounded = torch.zeros_like(dw)
    for grad, hc in chunks:
        api._add_weight_grad(dw, grad, hc)
        rounded += grad.t() @ hc
    exact = sum(grad.double().t() @ hc.double() for grad, hc in chunks)
    err = (dw.double() - exact).abs().max().item()
    assert err < 1e-3, err
    assert err < (rounded.double() - exact).abs().max().item() / 4
