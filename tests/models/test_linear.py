"""The single-device Linear: under autocast it equals nn.Linear's forward and backward, with its weight and bias
gradients produced in the parameters' fp32 (on CUDA by an fp32-output GEMM, closer to the exact sum)."""

import pytest
import torch
from torch import nn

from mambatron.parallel.projections import Linear, LocalProjections, foldable


def _pair(bias: bool, device: str):
    torch.manual_seed(0)
    ours = Linear(48, 40, bias=bias).to(device)
    theirs = nn.Linear(48, 40, bias=bias).to(device)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _run(layer, x, dy, device):
    x = x.clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
    y.backward(dy)
    return y, x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


@pytest.mark.parametrize("bias", [False, True])
def test_autocast_matches_nn_linear_with_fp32_gradients(bias):
    ours, theirs = _pair(bias, "cpu")
    x, dy = torch.randn(3, 7, 48), torch.randn(3, 7, 40, dtype=torch.bfloat16)
    got, want = _run(ours, x, dy, "cpu"), _run(theirs, x, dy, "cpu")
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    assert torch.equal(got[0], want[0])
    assert got[1].dtype == torch.float32 and torch.equal(got[1], want[1])
    assert got[2].dtype == torch.float32 and torch.equal(got[2], want[2])
    if bias:
        # fp32 sum of the rows against autocast's bf16 sum cast up: equal to bf16 rounding.
        assert got[3].dtype == torch.float32
        torch.testing.assert_close(got[3], want[3], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got[3], dy.float().sum((0, 1)), rtol=1e-6, atol=1e-5)


def test_without_autocast_is_nn_linear():
    ours, theirs = _pair(True, "cpu")
    x = torch.randn(5, 48)
    assert torch.equal(ours(x), theirs(x))


def test_local_projections_build_foldable_linears():
    proj = LocalProjections()
    col, row = proj.column(8, 16), proj.row(16, 8)
    assert type(col) is Linear and type(row) is Linear
    assert foldable(col) and foldable(row)
    assert list(col.state_dict()) == ["weight"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp32-output GEMM runs on CUDA only")
def test_cuda_weight_gradient_is_the_fp32_gemm_output():
    ours, theirs = _pair(True, "cuda")
    x = torch.randn(4, 512, 48, device="cuda")
    dy = torch.randn(4, 512, 40, device="cuda", dtype=torch.bfloat16)
    got, want = _run(ours, x, dy, "cuda"), _run(theirs, x, dy, "cuda")
    exact = dy.double().flatten(0, 1).t() @ x.to(torch.bfloat16).double().flatten(0, 1)
    err_ours = (got[2].double() - exact).abs().max().item()
    err_theirs = (want[2].double() - exact).abs().max().item()
    assert got[2].dtype == torch.float32
    assert err_ours < 1e-3 * exact.abs().max().item()
    assert err_ours <= err_theirs  # no bf16 rounding of the product
    torch.testing.assert_close(got[1], want[1])
