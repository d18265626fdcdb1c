"""The RMSNorm references: definitions, residual dtypes, gating order and gradients (fp64)."""

import pytest
import torch
import torch.nn.functional as F

from mambatron.kernels.rmsnorm.reference import rms_norm_fn_ref, rmsnorm_fn_ref

F64 = torch.float64


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_residual_add_norm():
    x, res, w, b = rand(3, 4, 8), rand(3, 4, 8, seed=1), rand(8, seed=2), rand(8, seed=3)
    out, s = rms_norm_fn_ref(x, w, b, residual=res, eps=1e-5, prenorm=True)
    torch.testing.assert_close(s, x + res)
    torch.testing.assert_close(out, s / (s.square().mean(-1, keepdim=True) + 1e-5).sqrt() * w + b)


@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_residual_dtypes(residual_in_fp32):
    x, res, w = rand(2, 8, dtype=torch.bfloat16), rand(2, 8, seed=1, dtype=torch.bfloat16), rand(8).float()
    out, s = rms_norm_fn_ref(x, w, residual=res, prenorm=True, residual_in_fp32=residual_in_fp32)
    assert out.dtype == torch.bfloat16
    assert s.dtype == (torch.float32 if residual_in_fp32 else torch.bfloat16)


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_group_norm(norm_before_gate):
    x, z, w, b = rand(2, 5, 12), rand(2, 5, 12, seed=1), rand(12, seed=2), rand(12, seed=3)
    out = rmsnorm_fn_ref(x, w, b, z=z, eps=1e-5, group_size=4, norm_before_gate=norm_before_gate)
    xg = x if norm_before_gate else x * F.silu(z)
    g = xg.reshape(2, 5, 3, 4)
    normed = (g / (g.square().mean(-1, keepdim=True) + 1e-5).sqrt()).reshape(2, 5, 12) * w + b
    torch.testing.assert_close(out, normed * F.silu(z) if norm_before_gate else normed)


def test_gradcheck():
    args = tuple(t.requires_grad_() for t in (rand(3, 6), rand(3, 6, seed=1), rand(6, seed=2), rand(6, seed=3)))
    assert torch.autograd.gradcheck(
        lambda x, z, w, b: rmsnorm_fn_ref(x, w, b, z=z, group_size=3, norm_before_gate=False), args
    )
    assert torch.autograd.gradcheck(lambda x, r, w, b: rms_norm_fn_ref(x, w, b, residual=r, prenorm=True), args)
