"""Hybrid models from model.hybrid_pattern: Mamba ("M"), attention ("*") and MLP ("-") layers, each a pre-norm
residual block built from the layer registry.

Checks the pattern and field errors, attention against its reference (grouped-query, packed documents, a query
window shorter than the keys), document isolation through a whole hybrid LM, generation with the KV cache beside the
Mamba states, both MLP activations, and the planner's counts against the built model.
"""

import pytest
import torch
import torch.nn.functional as F

from mambatron.config import ConfigError
from mambatron.hf import hf_config_dict
from mambatron.kernels.attention import attention_fn, attention_fn_ref
from mambatron.models import build_model
from mambatron.plan import count_params, flops_per_token
from tests.models.conftest import tiny_model_config

ATTN = dict(num_heads=4, num_kv_heads=2, rope_theta=10000.0)


def hybrid_config(arch, pattern="M*M-", attention=None, mlp=None, **overrides):
    return tiny_model_config(
        arch, hybrid_pattern=pattern, n_layer=len(pattern), attention=attention or ATTN,
        mlp=mlp or dict(hidden=48, activation="swiglu"), **overrides,
    )  # fmt: skip


def test_pattern_builds_each_kind_in_order_and_the_planner_counts_them(arch):
    cfg = hybrid_config(arch, "M*M-*")
    model = build_model(cfg)
    assert [block.kind for block in model.layers] == [arch, "attention", arch, "mlp", "attention"]
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg).total
    pure = tiny_model_config(arch, n_layer=5)
    assert [block.kind for block in build_model(pure).layers] == [arch] * 5
    # Attention adds 2 · heads · head_dim · seq_len forward FLOPs per token (×3 for training) on top of its weights.
    at_1k, at_2k = flops_per_token(cfg, 1024), flops_per_token(cfg, 2048)
    mamba_terms = flops_per_token(pure, 2048) - flops_per_token(pure, 1024)  # SSD's chunk term does not grow
    assert at_2k - at_1k == pytest.approx(2 * 3 * 2.0 * 4 * 8 * 1024 + 2 * mamba_terms / 5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(hybrid_pattern="M*xM", n_layer=4), r"model.hybrid_pattern\[2\]='x' is not a layer symbol; known: '\*'"),
        (dict(hybrid_pattern="M*M", n_layer=4), "model.n_layer=4 but model.hybrid_pattern has 3 symbols"),
        (dict(arch="attention"), "model.arch='attention' is not a Mamba mixer"),
        (dict(hybrid_pattern="M*", n_layer=2, attention=dict(num_kv_heads=3)), "num_kv_heads=3 must divide"),
        (dict(hybrid_pattern="M*", n_layer=2, attention=dict(num_heads=5, num_kv_heads=5)), "5 does not divide"),
        (dict(hybrid_pattern="M-", n_layer=2, mlp=dict(activation="gelu")), r"model.mlp.activation='gelu' is not one"),
        (dict(attention=dict(num_heads=0)), r"model.attention.num_heads=0 must be a positive number"),
    ],
)
def test_bad_pattern_or_field_is_named(overrides, message):
    overrides = dict(overrides)
    with pytest.raises(ConfigError, match=message):
        tiny_model_config(overrides.pop("arch", "mamba2"), **overrides)


@pytest.mark.parametrize("q_len", [13, 4])
def test_attention_equals_reference(q_len):
    """SDPA against the explicit softmax: grouped-query (4 query heads on 2 KV heads), three packed documents, and
    queries that are the last q_len positions of the keys (as in cached generation)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 13, 8, generator=g, dtype=torch.float64) for _ in range(2))
    seq_idx = torch.tensor([[0] * 5 + [1] * 6 + [2] * 2, [0] * 13], dtype=torch.int32)
    for docs in (None, seq_idx):
        torch.testing.assert_close(attention_fn(q, k, v, seq_idx=docs), attention_fn_ref(q, k, v, seq_idx=docs))
    # The reference itself: the first query of document 1 sees only its own key, so it returns that value.
    if q_len == 13:
        out = attention_fn_ref(q, k, v, seq_idx=seq_idx)
        torch.testing.assert_close(out[0, :, 5], v[0].repeat_interleave(2, dim=0)[:, 5])


def test_no_token_sees_another_document(arch):
    """Through a whole hybrid LM (Mamba, attention and MLP layers): changing the tokens of the first document of a
    packed row leaves the logits of the second one unchanged, and does change the first one's."""
    model = build_model(hybrid_config(arch, "*M-*M"))
    ids = torch.randint(0, 61, (1, 20))
    seq_idx = torch.tensor([[0] * 8 + [1] * 12], dtype=torch.int32)
    other = ids.clone()
    other[0, :8] = (ids[0, :8] + 7) % 61
    with torch.no_grad():
        a, b = model(ids, seq_idx=seq_idx), model(other, seq_idx=seq_idx)
    torch.testing.assert_close(a[:, 8:], b[:, 8:], rtol=0, atol=1e-6)
    assert (a[:, :8] - b[:, :8]).abs().max() > 1e-2


@pytest.mark.parametrize("rope_theta", [None, 10000.0])
def test_generation_with_kv_cache_equals_the_full_forward(arch, rope_theta):
    """Prefill, then one token at a time through the KV cache and the Mamba states: the same logits as one forward
    over the whole sequence."""
    cfg = hybrid_config(arch, "M*-*M", attention=dict(ATTN, rope_theta=rope_theta))
    model = build_model(cfg).eval()
    ids = torch.randint(0, 61, (2, 15))
    with torch.no_grad():
        full = model(ids)
        caches = model.empty_caches(2)
        prefill = model(ids[:, :6], caches=caches)
        steps = torch.stack([model.step(ids[:, t], caches) for t in range(6, 15)], dim=1)
    torch.testing.assert_close(prefill, full[:, :6], rtol=0, atol=1e-5)
    torch.testing.assert_close(steps, full[:, 6:], rtol=0, atol=1e-5)
    assert caches[1]["k"].shape == (2, 2, 15, 8)  # (batch, kv heads, tokens, head dim)


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_mlp_activations(activation):
    cfg = hybrid_config("mamba2", "-", mlp=dict(hidden=24, activation=activation, bias=True))
    mlp = build_model(cfg).layers[0].mixer
    x = torch.randn(2, 3, 32)
    up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
    if activation == "relu2":
        hidden = F.relu(up) ** 2
        assert not hasattr(mlp, "gate_proj")
    else:
        hidden = F.silu(F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)) * up
    torch.testing.assert_close(mlp(x), F.linear(hidden, mlp.down_proj.weight, mlp.down_proj.bias))


def test_hybrid_training_step_reaches_every_parameter(arch):
    model = build_model(hybrid_config(arch, "M*M-", attention=dict(ATTN, bias=True), mlp=dict(hidden=32, bias=True)))
    ids = torch.randint(0, 61, (2, 13))
    seq_idx = torch.tensor([[0] * 6 + [1] * 6, [0] * 12], dtype=torch.int32)
    model.loss(ids[:, :-1], ids[:, 1:], seq_idx=seq_idx).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_hybrid_export_that_nemotron_h_cannot_express_is_refused_clearly():
    # hybrid_config has RoPE and a SwiGLU MLP; tests/hf covers the exports that work.
    with pytest.raises(ValueError, match="NemotronH attention has no RoPE.*NemotronH's MLP is relu2"):
        hf_config_dict(hybrid_config("mamba2"))


def test_planner_counts_the_kv_cache_and_each_layers_activations():
    from mambatron.config import load_config
    from mambatron.plan import activation_bytes_all_layers, make_plan

    hybrid = load_config("configs/hybrid-8b.yaml")
    plan = make_plan(hybrid, 8)
    assert plan.kv_cache_bytes_per_token == 4 * 2 * 8 * 128 * 2  # 4 attention layers, K and V, 8 KV heads, bf16
    assert plan.params_total == count_params(hybrid.model).total
    assert make_plan(load_config("configs/mamba2-8b.yaml"), 8).kv_cache_bytes_per_token == 0
    # Every layer's own activation width counts: the hybrid keeps less per MLP or attention block than per Mamba one.
    m = hybrid.model
    all_mamba = load_config("configs/hybrid-8b.yaml", ["model.hybrid_pattern=", "model.n_layer=56"]).model
    assert activation_bytes_all_layers(m, 4096, 1, False, 2) < activation_bytes_all_layers(all_mamba, 4096, 1, False, 2)


def test_mamba1_inner_norms_settings():
    """Jamba's weighted dt/B/C norms add three per-channel weights per Mamba1 layer (counted by the planner) and are
    allowed under TP (tests/parallel checks their parity); the settings that make no sense are named."""
    from mambatron.config import ParallelConfig
    from mambatron.parallel import validate_parallel

    cfg = tiny_model_config("mamba1", mamba1_inner_norms=True, mamba1_inner_norm_weights=True)
    model = build_model(cfg)
    assert model.layers[0].mixer.dt_layernorm.weight.shape == (cfg.dt_rank_value,)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg).total
    validate_parallel(cfg, ParallelConfig(tp=2))
    with pytest.raises(ConfigError, match="needs model.mamba1_inner_norms=true"):
        tiny_model_config("mamba1", mamba1_inner_norm_weights=True)
    with pytest.raises(ConfigError, match="needs model.arch=mamba1"):
        tiny_model_config("mamba2", mamba1_inner_norms=True)
