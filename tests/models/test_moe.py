"""The MoE layer (E in model.hybrid_pattern) against a per-token reference written from the routing rules, its
load-balancing loss's gradient, its metrics, the planner's total and active parameters, and its config errors.
Hugging Face export and import of MoE hybrids: tests/hf/test_hf.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mambatron.config import ConfigError, MLPConfig, ModelConfig, MoEConfig
from mambatron.models import build_model
from mambatron.models.moe import MoE, moe_stats
from mambatron.plan import count_params, flops_per_token


def moe_cfg(**moe) -> ModelConfig:
    mlp = MLPConfig(activation=moe.pop("activation", "relu2"))
    return ModelConfig(arch="mamba2", hybrid_pattern="ME", n_layer=2, d_model=16, vocab_size=64, headdim=8,
                       d_state=8, chunk_size=8, kernels="reference", mlp=mlp,
                       moe=MoEConfig(**{"num_experts": 4, "top_k": 2, "hidden": 24, **moe}))  # fmt: skip


def reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: score every expert, keep the top_k (Jamba: softmax over all, not renormalised; Nemotron-H:
    sigmoid, renormalised), sum the chosen experts' MLPs weighted by those probabilities, add the shared experts."""
    cfg = layer.cfg
    act = cfg.mlp.activation
    out = []
    for t in x.reshape(-1, x.shape[-1]):
        logits = layer.router.weight @ t
        if cfg.moe.router == "softmax":
            p = torch.softmax(logits, -1)
            weights, chosen = torch.topk(p, cfg.moe.top_k)
        else:
            weights, chosen = torch.topk(torch.sigmoid(logits), cfg.moe.top_k)
            if cfg.moe.top_k > 1:
                weights = weights / weights.sum()
        y = torch.zeros_like(t)
        for w, e in zip(weights, chosen, strict=True):
            h = layer.experts.fc1[e] @ t
            h = F.silu(h[: h.shape[0] // 2]) * h[h.shape[0] // 2 :] if act == "swiglu" else F.relu(h) ** 2
            y = y + w * (layer.experts.fc2[e] @ h)
        if cfg.moe.shared_experts:
            h = layer.shared_experts.linear_fc1.weight @ t
            h = F.silu(h[: h.shape[0] // 2]) * h[h.shape[0] // 2 :] if act == "swiglu" else F.relu(h) ** 2
            y = y + layer.shared_experts.linear_fc2.weight @ h
        out.append(y)
    return torch.stack(out).reshape(x.shape)


def grads(layer: MoE, fn, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    layer.zero_grad()
    x = x.detach().requires_grad_()
    (fn(x) * g).sum().backward()
    out = {name: p.grad.clone() for name, p in layer.named_parameters()}
    out["x"] = x.grad
    return out


@pytest.mark.parametrize(
    "router,top_k,activation,shared",
    [("softmax", 2, "relu2", 0), ("softmax", 1, "swiglu", 1), ("sigmoid", 2, "relu2", 1), ("sigmoid", 1, "relu2", 0)],
)
def test_moe_equals_per_token_reference(router, top_k, activation, shared):
    torch.manual_seed(0)
    cfg = moe_cfg(router=router, top_k=top_k, activation=activation, shared_experts=shared, aux_loss_coef=0.0)
    layer = MoE(cfg, 1).double()
    layer.init_weights(torch.Generator().manual_seed(1))
    x = torch.randn(3, 5, cfg.d_model, dtype=torch.float64)
    g = torch.randn_like(x)
    out = layer(x)
    torch.testing.assert_close(out, reference(layer, x), rtol=1e-12, atol=1e-12)
    ours, ref = grads(layer, layer, x, g), grads(layer, lambda v: reference(layer, v), x, g)
    assert set(ours) == set(ref) and all(v.abs().sum() > 0 for v in ours.values())
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("router,z_coef", [("softmax", 0.0), ("sigmoid", 0.0), ("softmax", 0.05)])
def test_load_balancing_loss_gradient_is_attached(router, z_coef):
    """In training the router's gradient is that of output·g plus the Switch loss coef·E/(k·T²)·Σ_e n_e·Σ_t s_te,
    with n_e the tokens routed to e and s the scores (softmax, or sigmoid normalised over the experts), plus the
    router z-loss z_coef·mean_t(logsumexp(logits_t)²) when it is on."""
    torch.manual_seed(0)
    coef = 0.3
    cfg = moe_cfg(router=router, aux_loss_coef=coef, z_loss_coef=z_coef)
    layer = MoE(cfg, 1).double()
    layer.init_weights(torch.Generator().manual_seed(2))
    x = torch.randn(2, 6, cfg.d_model, dtype=torch.float64)
    g = torch.randn_like(x)
    layer.train()
    ours = grads(layer, layer, x, g)

    def with_explicit_loss(v):
        logits = v.reshape(-1, cfg.d_model) @ layer.router.weight.T
        s = torch.softmax(logits, -1) if router == "softmax" else torch.sigmoid(logits)
        s = s if router == "softmax" else s / s.sum(-1, keepdim=True)
        chosen = torch.topk(s, cfg.moe.top_k).indices
        n = torch.bincount(chosen.flatten(), minlength=cfg.moe.num_experts).to(s.dtype)
        tokens = logits.shape[0]
        aux = coef * cfg.moe.num_experts / (cfg.moe.top_k * tokens**2) * (n * s.sum(0)).sum()
        aux = aux + z_coef * (torch.logsumexp(logits, -1) ** 2).mean()
        return reference(layer, v) + _with_gradient_of(aux, g)

    ref = grads(layer, with_explicit_loss, x, g)
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    layer.eval()
    no_aux = grads(layer, layer, x, g)
    assert not torch.allclose(no_aux["router.weight"], ours["router.weight"])


def _with_gradient_of(aux: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A zero-valued term whose (· g).sum() has aux's gradient: adds aux to the loss without changing the output."""
    return (aux - aux.detach()) / (g * g).sum() * g


def test_metrics_report_the_loss_and_the_load_once():
    cfg = moe_cfg(aux_loss_coef=0.01, z_loss_coef=0.001)
    model = build_model(cfg)
    model.train()
    ids = torch.randint(0, 64, (2, 9))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    stats = moe_stats(model)
    assert set(stats) == {"moe_aux_loss", "moe_z_loss", "moe_load_min", "moe_load_max"}
    # The router starts near zero (std 0.02), so every token's logsumexp is about log(E).
    assert abs(stats["moe_z_loss"] - math.log(cfg.moe.num_experts) ** 2) < 0.1 * math.log(cfg.moe.num_experts) ** 2
    # The loss without its coefficient is 1 when perfectly balanced and at most num_experts / top_k.
    assert 0.5 < stats["moe_aux_loss"] <= cfg.moe.num_experts / cfg.moe.top_k
    assert 0 <= stats["moe_load_min"] <= 1 / 4 <= stats["moe_load_max"] <= 1
    assert moe_stats(model) == {}  # read once, then reset


def reference_with_capacity(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The per-token reference with token dropping, written from the rule: an expert keeps at most
    ceil(T · top_k / E · capacity_factor) of the T tokens routed to it, those with the highest probability; a dropped
    token loses that expert's share (its other expert stays as it is)."""
    cfg = layer.cfg
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ layer.router.weight.t()
    if cfg.moe.router == "softmax":
        weights, chosen = torch.topk(torch.softmax(logits, -1), cfg.moe.top_k)
    else:
        weights, chosen = torch.topk(torch.sigmoid(logits), cfg.moe.top_k)
        weights = weights / weights.sum(-1, keepdim=True) if cfg.moe.top_k > 1 else weights
    capacity = math.ceil(flat.shape[0] * cfg.moe.top_k / cfg.moe.num_experts * cfg.moe.capacity_factor)
    kept = set()
    for e in range(cfg.moe.num_experts):
        routed = [(float(weights[t, j].detach()), t) for t in range(flat.shape[0]) for j in range(cfg.moe.top_k)
                  if chosen[t, j] == e]  # fmt: skip
        kept |= {(t, e) for _, t in sorted(routed, reverse=True)[:capacity]}
    act = cfg.mlp.activation
    out = []
    for t, v in enumerate(flat):
        y = torch.zeros_like(v)
        for w, e in zip(weights[t], chosen[t], strict=True):
            if (t, int(e)) in kept:
                h = layer.experts.fc1[e] @ v
                h = F.silu(h[: h.shape[0] // 2]) * h[h.shape[0] // 2 :] if act == "swiglu" else F.relu(h) ** 2
                y = y + w * (layer.experts.fc2[e] @ h)
        out.append(y)
    return torch.stack(out).reshape(x.shape), flat.shape[0] * cfg.moe.top_k - len(kept)


@pytest.mark.parametrize("router,top_k,factor", [("softmax", 2, 1.0), ("sigmoid", 2, 0.6), ("softmax", 1, 1.5)])
def test_token_dropping_over_capacity_equals_the_rule(router, top_k, factor):
    """capacity_factor in training: output and every gradient equal the rule's reference (float64), some pairs are
    dropped and counted in the metrics; in evaluation the same layer is dropless."""
    torch.manual_seed(0)
    cfg = moe_cfg(router=router, top_k=top_k, aux_loss_coef=0.0, capacity_factor=factor)
    layer = MoE(cfg, 1).double()
    layer.init_weights(torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.router.weight.mul_(40)  # unbalanced routing, so that capacity binds
    x = torch.randn(3, 7, cfg.d_model, dtype=torch.float64)
    g = torch.randn_like(x)
    want, dropped = reference_with_capacity(layer, x)
    assert dropped > 0
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    ours = grads(layer, layer, x, g)
    ref = grads(layer, lambda v: reference_with_capacity(layer, v)[0], x, g)
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    stats = moe_stats(layer)  # two training forwards: the output and the gradients
    assert stats["moe_dropped"] == pytest.approx(dropped / (x.shape[0] * x.shape[1] * top_k))
    layer.eval()
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-12, atol=1e-12)


def test_balancing_bias_chooses_experts_and_moves_towards_the_even_load():
    """bias_update_rate: the bias is added to the sigmoid scores for choosing the top_k only (the weights are the
    unbiased scores, renormalised), and after a step each bias moves by the rate towards the even load:
    +rate below the mean count, -rate above, 0 at it; a skipped step drops its counts and moves nothing."""
    from mambatron.models.moe import update_expert_biases

    torch.manual_seed(0)
    cfg = moe_cfg(router="sigmoid", top_k=2, aux_loss_coef=0.0, bias_update_rate=0.05)
    layer = MoE(cfg, 1).double()
    layer.init_weights(torch.Generator().manual_seed(1))
    assert torch.equal(layer.expert_bias, torch.zeros(4, dtype=torch.float64)) and "expert_bias" in layer.state_dict()
    x = torch.randn(4, 6, cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.0, 5.0, 0.0, -5.0]))  # expert 1 always chosen, expert 3 never
        out = layer(x)
    scores = torch.sigmoid(x.reshape(-1, cfg.d_model) @ layer.router.weight.t())
    assert bool(layer.step_tokens[1] == 24) and bool(layer.step_tokens[3] == 0)
    other = torch.where(scores[:, 0] >= scores[:, 2], 0, 2)  # the second choice: the better of experts 0 and 2
    chosen = torch.stack([torch.ones_like(other), other], 1)
    weights = scores.gather(1, chosen)
    weights = weights / weights.sum(1, keepdim=True)
    want = torch.zeros_like(x.reshape(-1, cfg.d_model))
    for t in range(want.shape[0]):
        for w, e in zip(weights[t], chosen[t], strict=True):
            h = F.relu(layer.experts.fc1[e] @ x.reshape(-1, cfg.d_model)[t]) ** 2
            want[t] += w * (layer.experts.fc2[e] @ h)
    torch.testing.assert_close(out, want.reshape(x.shape), rtol=1e-12, atol=1e-12)
    counts = layer.step_tokens.clone().double()
    before = layer.expert_bias.clone()
    update_expert_biases(layer)
    moved = layer.expert_bias - before
    assert layer.step_tokens is None
    torch.testing.assert_close(moved, torch.sign(counts.mean() - counts).double() * 0.05)
    assert moved[1] < 0 < moved[3]
    with torch.no_grad():
        layer(x)
    update_expert_biases(layer, skip=True)
    torch.testing.assert_close(layer.expert_bias, before + moved)
    with pytest.raises(ConfigError, match="bias_update_rate=0.1 balances sigmoid routers"):
        moe_cfg(router="softmax", bias_update_rate=0.1).validate()


def test_planner_counts_total_and_active_parameters():
    cfg = moe_cfg(num_experts=8, top_k=2, shared_experts=1, hidden=24)
    d, h = cfg.d_model, 24
    expert = 2 * d * h  # relu2: fc1 (h, d) and fc2 (d, h)
    pc = count_params(cfg)
    assert pc.total == sum(p.numel() for p in build_model(cfg).parameters())
    assert pc.total - pc.active == (8 - 2) * expert  # the six experts a token is not routed to
    fpt = flops_per_token(cfg, 8)
    dense = flops_per_token(moe_cfg(num_experts=3, top_k=2, shared_experts=1, hidden=24), 8)
    # FLOPs follow the active parameters: 8 experts top-2 cost what 3 experts top-2 do, plus the 5 router rows.
    assert math.isclose(fpt - dense, 3 * 2 * (8 - 3) * d, rel_tol=1e-12)


@pytest.mark.parametrize(
    "moe,match",
    [
        (dict(top_k=5), "top_k=5 exceeds model.moe.num_experts=4"),
        (dict(capacity_factor=0.0), "capacity_factor=0.0 must be a finite number > 0"),
        (dict(capacity_factor=float("nan")), "capacity_factor=nan must be"),
        (dict(router="switch"), "model.moe.router"),
    ],
)
def test_bad_moe_configs_are_named(moe, match):
    with pytest.raises(ConfigError, match=match):
        moe_cfg(**moe).validate()


def test_router_runs_in_fp32_under_bf16_autocast(monkeypatch):
    """Under bf16 autocast the router's logits stay fp32 (autocast used to run its matmul in bf16: on a GPU the top-k
    renormalisation then came out fp32 and could not be scattered into them), and a bf16 step trains."""
    import mambatron.models.moe as moe_module

    dtypes = []
    route = moe_module.route
    monkeypatch.setattr(moe_module, "route", lambda logits, *a: (dtypes.append(logits.dtype), route(logits, *a))[1])
    model = build_model(moe_cfg(router="sigmoid")).train()
    ids = torch.randint(0, 64, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert dtypes == [torch.float32]
    assert torch.isfinite(loss) and model.layers[1].mixer.router.weight.grad.abs().sum() > 0
