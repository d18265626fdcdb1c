"""Worker of tests/parallel/test_expert_parallel.py (runs on every rank of an EP=2 gloo group)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mambatron.config import MLPConfig, ModelConfig, MoEConfig
from mambatron.models.moe import MoE, moe_stats
from mambatron.parallel.experts import ExpertParallelMoE


def _cfg(router: str, top_k: int, activation: str, shared: int, aux: float, z: float, capacity=None) -> ModelConfig:
    moe = MoEConfig(num_experts=4, top_k=top_k, hidden=24, shared_experts=shared, router=router, aux_loss_coef=aux,
                    z_loss_coef=z, capacity_factor=capacity)  # fmt: skip
    return ModelConfig(arch="mamba2", hybrid_pattern="ME", n_layer=2, d_model=16, vocab_size=64, headdim=8, d_state=8,
                       mlp=MLPConfig(activation=activation), moe=moe, kernels="reference")  # fmt: skip


def _run(layer, x, g):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * g).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    grads["x"] = x.grad
    return out.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def ep_parity(info, cases):
    """Per case: the EP=2 layer against the one-process layer (same init) on this rank's tokens. Returns the relative
    errors of the output and of every gradient (an expert's against the sum over ranks of the one-process layer's
    gradient, which is what routing every rank's tokens to one holder produces), and whether the weights agree."""
    rank = dist.get_rank()
    results = {}
    for case in cases:
        cfg = _cfg(*case)
        local, ep = MoE(cfg, 1), ExpertParallelMoE(cfg, 1)
        local.init_weights(torch.Generator().manual_seed(3))
        ep.init_weights(torch.Generator().manual_seed(3))
        first, n = ep.first_expert, ep.num_local_experts
        same_init = torch.equal(ep.router.weight, local.router.weight) and torch.equal(
            ep.experts.fc1, local.experts.fc1[first : first + n]
        )
        training = case[4] > 0 or case[5] > 0 or cfg.moe.capacity_factor is not None  # dropping: training only
        local.train(training)
        ep.train(training)
        x = torch.randn(3, 10, cfg.d_model, generator=torch.Generator().manual_seed(10 + rank))
        g = torch.randn(3, 10, cfg.d_model, generator=torch.Generator().manual_seed(20 + rank))
        out_local, grads_local = _run(local, x, g)
        out_ep, grads_ep = _run(ep, x, g)
        errors = {"out": _rel(out_ep, out_local)}
        for name, grad in grads_ep.items():
            want = grads_local[name]
            if name.startswith("experts."):
                dist.all_reduce(want)  # every rank's tokens reach the holder of an expert
                want = want[first : first + n]
            errors[name] = _rel(grad, want)
        stats = (moe_stats(local), {k: v for k, v in moe_stats(ep).items()}) if training else None
        if cfg.moe.capacity_factor is not None:  # evaluation is dropless (tests/models/test_moe.py), here too
            local.eval()
            ep.eval()
            with torch.no_grad():
                errors["eval_out"] = _rel(ep(x), local(x))
        results[case] = {"errors": errors, "same_init": same_init, "local_experts": (first, n), "stats": stats}
    return results
