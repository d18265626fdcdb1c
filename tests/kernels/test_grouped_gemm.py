"""The grouped linear of the experts: Triton (the interpreter on CPU) against the per-group reference, forward and
both gradients, with uneven, empty and single-row groups."""

import pytest
import torch

from mambatron.kernels import grouped_gemm
from mambatron.kernels.grouped_gemm import api, grouped_linear_fn, grouped_linear_fn_ref
from tests.kernels.conftest import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 so that tiny shapes still span several row, column and reduction tiles per group."""
    monkeypatch.setitem(api.BLOCKS, "m", 16)
    monkeypatch.setitem(api.BLOCKS, "n", 16)
    monkeypatch.setitem(api.BLOCKS, "k", 16)


def _case(counts, in_features, out_features, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), in_features, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(len(counts), out_features, in_features, generator=g) / in_features**0.5).to(DEVICE)
    w.requires_grad_()
    dy = torch.randn(sum(counts), out_features, generator=g).to(DEVICE, dtype)
    return x, w, dy


def _run(fn, x, w, dy, counts):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, counts)
    y.backward(dy)
    return y, x.grad, w.grad


@pytest.mark.parametrize(
    "counts",
    [
        [5, 0, 33, 1, 17],  # uneven, an empty group, a single row, tiles that end mid-group
        [0, 0, 40],  # every row in the last group
        [16, 16],  # exactly one tile each
    ],
)
def test_triton_matches_reference(triton_interpreter, small_tiles, counts):
    x, w, dy = _case(counts, in_features=40, out_features=24)
    y, dx, dw = _run(grouped_linear_fn, x, w, dy, counts)
    y_ref, dx_ref, dw_ref = _run(grouped_linear_fn_ref, x, w, dy, counts)
    assert_close(y, y_ref, "y")
    assert_close(dx, dx_ref, "dx")
    assert_close(dw, dw_ref, "dw")
    # An empty group's weight gets an exact zero gradient (the kernel writes it; outputs start as NaN here).
    for g, c in enumerate(counts):
        if c == 0:
            assert torch.equal(dw[g], torch.zeros_like(dw[g]))


def test_reference_is_one_linear_per_group():
    counts = [3, 0, 2]
    x, w, _ = _case(counts, 8, 4, seed=1)
    y = grouped_linear_fn_ref(x, w, counts)
    rows = torch.cat([x[:3] @ w[0].t(), x[3:] @ w[2].t()])
    torch.testing.assert_close(y, rows)


def test_weights_are_cast_to_the_input_dtype(triton_interpreter, small_tiles):
    """fp32 weights (the masters) with lower-precision rows: the product is in the rows' dtype, from the weights
    rounded to it, and the weight gradient comes back in the weights' dtype."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter has no bf16 arithmetic
    counts = [7, 20]
    x, w, dy = _case(counts, 32, 16, dtype=dtype, seed=2)
    y, dx, dw = _run(grouped_linear_fn, x, w, dy, counts)
    y_ref, dx_ref, dw_ref = _run(grouped_linear_fn_ref, x, w, dy, counts)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    assert_close(y, y_ref, "y", dtype)
    assert_close(dx, dx_ref, "dx", dtype)
    assert_close(dw, dw_ref, "dw", dtype)


def test_bad_counts_are_refused():
    x, w, _ = _case([2, 2], 8, 4)
    with pytest.raises(ValueError, match="one non-negative row count per group"):
        grouped_linear_fn(x, w, [1, 2])
    with pytest.raises(ValueError, match=r"need x \(rows, in_features\)"):
        grouped_linear_fn(x, w[:, :, :4], [2, 2])


def test_exported_from_the_package():
    assert grouped_gemm.grouped_linear_fn is grouped_linear_fn


def test_autocast_runs_in_the_autocast_dtype(triton_interpreter, small_tiles):
    """fp32 rows under autocast: multiplied in the autocast dtype, as the reference's F.linear is (the interpreter
    has no bf16 arithmetic, so CPU checks fp16)."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    counts = [10, 0, 27]
    x, w, dy = _case(counts, 32, 16, seed=3)
    with torch.autocast(DEVICE, dtype=dtype):
        y, dx, dw = _run(grouped_linear_fn, x, w, dy.to(dtype), counts)
        y_ref, dx_ref, dw_ref = _run(grouped_linear_fn_ref, x, w, dy.to(dtype), counts)
    assert y.dtype == y_ref.dtype == dtype
    assert dx.dtype == torch.float32 and dw.dtype == torch.float32
    assert_close(y, y_ref, "y", dtype)
    assert_close(dx, dx_ref, "dx", dtype)
    assert_close(dw, dw_ref, "dw", dtype)
