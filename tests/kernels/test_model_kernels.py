"""A tiny Mamba1, Mamba2 and Mamba2+MoE LM: loss and every parameter gradient through the Triton kernels equal the
reference path.

Packed documents (seq_idx) and a length that is not a multiple of the chunk size are included, so every op of both
mixers (conv1d, selective scan / SSD, fused add+RMSNorm, gated RMSNorm) runs with its state resets; the MoE layer's
experts run as grouped GEMMs.
"""

import pytest
import torch

import mambatron.kernels.grouped_gemm as grouped_gemm
import mambatron.kernels.selective_scan as scan_ops
import mambatron.kernels.ssd as ssd_ops
from mambatron.models import build_model
from mambatron.models.ops import get_op
from tests.kernels.conftest import assert_close
from tests.models.conftest import tiny_model_config

MOE = dict(hybrid_pattern="ME", moe={"num_experts": 4, "top_k": 2, "hidden": 24, "shared_experts": 1},
           mlp={"activation": "swiglu"})  # fmt: skip


@pytest.mark.parametrize("arch", ["mamba1", "mamba2", "mamba2+moe", "mamba2+recompute"])
def test_tiny_lm_triton_equals_reference(arch, device, triton_interpreter, monkeypatch):
    """Mamba2's Triton path computes each layer's chunk states once (forward; model.ssd_keep_states, the default);
    +recompute (ssd_keep_states=false) computes them again in backward."""
    from mambatron.kernels.ssd import combined

    x = torch.zeros(1, device=device)
    assert get_op("ssd", "triton", x) is ssd_ops.mamba_chunk_scan_combined
    assert get_op("selective_scan", "triton", x) is scan_ops.selective_scan_fn
    assert get_op("ssd", "reference", x) is ssd_ops.mamba_chunk_scan_combined_ref
    assert get_op("grouped_linear", "triton", x) is grouped_gemm.grouped_linear_fn
    torch.manual_seed(0)
    ids = torch.randint(0, 61, (2, 21), device=device)
    labels = ids.roll(-1, 1)
    seq_idx = torch.tensor([[0] * 9 + [1] * 12, [0] * 21], dtype=torch.int32, device=device)
    results = {}
    state_calls, real = [], combined.chunk_state_fwd
    monkeypatch.setattr(combined, "chunk_state_fwd", lambda *a, **k: state_calls.append(1) or real(*a, **k))
    for kernels in ("reference", "triton"):
        extra = {"mamba2+moe": MOE, "mamba2+recompute": dict(ssd_keep_states=False)}.get(arch, {})
        cfg = tiny_model_config(arch.split("+")[0], kernels=kernels, d_model=16, ngroups=2, headdim=8, **extra)
        model = build_model(cfg).to(device)
        model.init_weights(seed=1)
        with torch.no_grad():  # move the near-identity parameters off their init so every path matters
            for name, p in model.named_parameters():
                if name.endswith(("norm.weight", ".D")):
                    p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)).to(device))
        loss = model.loss(ids, labels, seq_idx=seq_idx)
        loss.backward()
        results[kernels] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    if arch.startswith("mamba2"):
        mamba_layers = sum(type(block.mixer).__name__ == "Mamba2Mixer" for block in model.layers)
        assert len(state_calls) == mamba_layers * (2 if arch.endswith("+recompute") else 1)
    ref_loss, ref_grads = results["reference"]
    loss, grads = results["triton"]
    assert_close(loss, ref_loss, "loss")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        assert_close(grad, ref_grads[name], name)
