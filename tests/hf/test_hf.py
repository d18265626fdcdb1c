"""Logits parity with Hugging Face transformers after export, and back after import (fp32, CPU)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from mambatron.hf import from_hf, to_hf
from mambatron.models import build_model, generate
from tests.models.conftest import tiny_model_config

TOL = 1e-4


def _perturbed(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.add_(0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):  # balancing biases large enough to change which experts are chosen
                b.normal_(0.0, 0.3)
    return model.eval()


def _hf_greedy(hf, prompt):
    """16 greedy tokens from transformers with no EOS handling (its configs default to an EOS id, which would stop
    or suppress tokens) and an explicit all-ones mask (else a prompt token equal to the pad id is masked out)."""
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 16
    return out


@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_in_transformers_with_equal_logits_and_generation(arch, tie, tmp_path):
    # A vocabulary with no padding rows: HF generates over its whole (padded) vocab, we never emit padding ids.
    _check_export(tiny_model_config(arch, tie_embeddings=tie, vocab_size=64), tmp_path)


def test_export_mamba2_with_groups(tmp_path):
    # transformers 5.x normalises the gated RMSNorm per group, as we do, so groups > 1 export with parity too.
    _check_export(tiny_model_config("mamba2", vocab_size=64, ngroups=2), tmp_path)


def _check_export(cfg, tmp_path, expected=None):
    """Export a perturbed model of ``cfg``: transformers loads it as ``expected`` (default: the pure Mamba class)
    with no missing or unexpected keys, fp32 logits within TOL and the same 16 greedy tokens.
    Returns (hf, ours, ids)."""
    expected = expected or ("MambaForCausalLM" if cfg.arch == "mamba1" else "Mamba2ForCausalLM")
    ours = _perturbed(build_model(cfg))
    to_hf(ours, cfg, tmp_path)
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf).__name__ == expected
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= TOL, diff
    prompt = ids[:, :5]
    with torch.no_grad():
        theirs = _hf_greedy(hf, prompt)
    assert torch.equal(theirs, generate(ours, prompt, max_new_tokens=16))
    return hf, ours, ids


def _check_import(hf, tmp_path, seqlen=19):
    """Save a transformers model (norms, D and conv biases moved off their init) and import it: equal logits.
    Returns (ours, cfg, ids)."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D", "conv1d.bias")):
                p.add_(0.3 * torch.randn_like(p))
    hf.eval().save_pretrained(tmp_path)
    ours, cfg = from_hf(tmp_path)
    ours.eval()
    ids = torch.randint(0, 64, (2, seqlen))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= TOL, diff
    return ours, cfg, ids


def _check_reimport(ours, cfg, tmp_path, ids):
    back, back_cfg = from_hf(tmp_path)
    assert back_cfg == cfg
    with torch.no_grad():
        assert torch.equal(back.eval()(ids), ours(ids))


def test_import_from_random_hf_model(arch, tmp_path):
    if arch == "mamba1":
        hf = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2))
    else:
        hf_cfg = Mamba2Config(
            vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=4, head_dim=16, n_groups=1,
            chunk_size=8,
        )  # fmt: skip
        hf = Mamba2ForCausalLM(hf_cfg)
    ours, cfg, ids = _check_import(hf, tmp_path)
    assert cfg.arch == arch and cfg.padded_vocab_size == 64
    with torch.no_grad():
        theirs = _hf_greedy(hf, ids[:, :4])
    assert torch.equal(theirs, generate(ours, ids[:, :4], max_new_tokens=16))


def test_round_trip_is_exact(arch, tmp_path):
    cfg = tiny_model_config(arch)
    ours = build_model(cfg)
    to_hf(ours, cfg, tmp_path)
    back, cfg2 = from_hf(tmp_path)
    assert cfg2 == cfg
    for key, value in ours.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_wrong_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf(tmp_path)


def test_export_ships_the_tokenizer_and_its_special_ids(tmp_path):
    from transformers import AutoTokenizer

    from mambatron.data.tokenizers import load_tokenizer, train_tokenizer

    tok_dir = train_tokenizer([], 0, tmp_path / "tok", kind="bytes")
    tok = load_tokenizer(tok_dir)
    cfg = tiny_model_config("mamba2", vocab_size=tok.vocab_size)
    out = to_hf(build_model(cfg), cfg, tmp_path / "hf", tokenizer_dir=tok_dir)
    hf_cfg = AutoModelForCausalLM.from_pretrained(out).config
    assert (hf_cfg.bos_token_id, hf_cfg.eos_token_id, hf_cfg.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x + 1  # é"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)


def test_export_over_an_earlier_sharded_export_leaves_no_stale_weights(tmp_path, monkeypatch):
    """A sharded export followed by an unsharded one into the same folder: the old shards and their index are removed,
    so transformers loads the new weights (a stale index would win otherwise)."""
    import mambatron.hf as hf_module

    cfg = tiny_model_config("mamba2")
    old, new = build_model(cfg), build_model(cfg)
    new.init_weights(seed=7)
    monkeypatch.setattr(hf_module, "SHARD_BYTES", 4096)
    to_hf(old, cfg, tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    monkeypatch.setattr(hf_module, "SHARD_BYTES", 4 * 1024**3)
    to_hf(new, cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = new.eval()(ids)[..., : cfg.vocab_size]
        got = hf.eval()(ids).logits[..., : cfg.vocab_size]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _hybrid(**overrides):
    fields = dict(
        hybrid_pattern="M*M-M-", n_layer=6, vocab_size=64, ngroups=2, attention=dict(num_heads=4, num_kv_heads=2),
        mlp=dict(hidden=48, activation="relu2"),
    )  # fmt: skip
    fields.update(overrides)
    return tiny_model_config("mamba2", **fields)


@pytest.mark.parametrize("tie", [True, False])
def test_hybrid_export_loads_as_nemotron_h_with_equal_logits_and_generation(tie, tmp_path):
    """A Mamba2 + attention + MLP hybrid exports to NemotronHForCausalLM: no missing or unexpected keys, fp32 logits
    within 1e-4, the same greedy tokens (through its KV cache and Mamba states and ours); and it imports back."""
    cfg = _hybrid(tie_embeddings=tie)
    _, ours, ids = _check_export(cfg, tmp_path, "NemotronHForCausalLM")
    _check_reimport(ours, cfg, tmp_path, ids)


def test_import_from_random_nemotron_h_model(tmp_path):
    """A NemotronH model that we did not write (no "mambatron" key in its config) imports with equal logits."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    hf_cfg = NemotronHConfig(
        vocab_size=64, hidden_size=32, hybrid_override_pattern="M-*M", num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=40, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=2,
        chunk_size=8, tie_word_embeddings=False,
    )  # fmt: skip
    _, cfg, _ = _check_import(NemotronHForCausalLM(hf_cfg), tmp_path)
    assert cfg.hybrid_pattern == "M-*M" and cfg.attention.num_kv_heads == 2 and cfg.mlp_hidden == 40


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(arch="mamba1", headdim=16), "cannot export this hybrid to JambaForCausalLM: model.hybrid_pattern="),
        (dict(attention=dict(num_heads=4, num_kv_heads=2, rope_theta=10000.0)), "NemotronH attention has no RoPE"),
        (dict(mlp=dict(hidden=48, activation="swiglu")), "NemotronH's MLP is relu2"),
    ],
)
def test_hybrid_export_names_what_nemotron_h_cannot_express(overrides, message, tmp_path):
    overrides = dict(overrides)
    cfg = _hybrid(**overrides) if "arch" not in overrides else tiny_model_config(
        overrides.pop("arch"), hybrid_pattern="M*M-M-", n_layer=6, attention=dict(num_heads=4, num_kv_heads=2)
    )  # fmt: skip
    with pytest.raises(ValueError, match=message):
        to_hf(build_model(cfg), cfg, tmp_path)


@pytest.mark.parametrize("tie", [True, False])
def test_falcon_mamba_export_and_import(tie, tmp_path):
    """Mamba1 with FalconMamba's dt/B/C norms exports as FalconMambaForCausalLM (logits within 1e-4, the same greedy
    tokens, no missing or unexpected keys), and a transformers-initialised FalconMamba imports with equal logits."""
    cfg = tiny_model_config("mamba1", vocab_size=64, tie_embeddings=tie, mamba1_inner_norms=True)
    _, ours, ids = _check_export(cfg, tmp_path / "ours", "FalconMambaForCausalLM")
    with torch.no_grad():
        plain = build_model(tiny_model_config("mamba1", vocab_size=64, tie_embeddings=tie))
        plain.load_state_dict(ours.state_dict())
        assert (plain.eval()(ids) - ours(ids)).abs().max() > 1e-3  # the norms matter

    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    theirs = FalconMambaForCausalLM(FalconMambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2))
    _, back_cfg, _ = _check_import(theirs, tmp_path / "theirs", seqlen=23)
    assert back_cfg.mamba1_inner_norms and back_cfg.arch == "mamba1"


def _jamba_like(**overrides):
    fields = dict(
        hybrid_pattern="M-M-*-M-", n_layer=8, vocab_size=64, mamba1_inner_norms=True, mamba1_inner_norm_weights=True,
        mamba1_inner_norm_eps=1e-5, attention=dict(num_heads=4, num_kv_heads=2), tie_embeddings=False,
        mlp=dict(hidden=48, activation="swiglu"),
    )  # fmt: skip
    fields.update(overrides)
    return tiny_model_config("mamba1", **fields)


@pytest.mark.parametrize("tie", [True, False])
def test_mamba1_hybrid_export_loads_as_jamba_with_equal_logits_and_generation(tie, tmp_path):
    """A Mamba1 hybrid of Jamba's layout (mixer + SwiGLU MLP pairs, weighted dt/B/C norms, attention at a fixed
    period) exports to JambaForCausalLM with no missing or unexpected keys, fp32 logits within 1e-4 and the same
    greedy tokens, and imports back exactly."""
    cfg = _jamba_like(tie_embeddings=tie)
    hf, ours, ids = _check_export(cfg, tmp_path, "JambaForCausalLM")
    assert hf.config.layers_block_type == ["mamba", "mamba", "attention", "mamba"]
    _check_reimport(ours, cfg, tmp_path, ids)


def test_import_from_random_jamba_model(tmp_path):
    from transformers import JambaConfig, JambaForCausalLM

    hf_cfg = JambaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, num_experts=1, mamba_d_state=8,
        mamba_dt_rank=4, use_mamba_kernels=False,
    )  # fmt: skip
    _, cfg, _ = _check_import(JambaForCausalLM(hf_cfg), tmp_path)
    assert cfg.hybrid_pattern == "M-*-M-*-" and cfg.mamba1_inner_norm_weights


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(hybrid_pattern="M*M-", n_layer=4), "Jamba layers pair a mixer with an MLP"),
        (dict(mamba1_inner_norm_weights=False), "Jamba normalises dt, B and C with weights"),
        (dict(hybrid_pattern="*-M-*-*-", n_layer=8), r"attention at layers \[0, 2, 3\]"),
        (dict(mlp=dict(hidden=48, activation="relu2")), "Jamba's MLP is SwiGLU"),
    ],
)
def test_jamba_export_names_what_it_cannot_express(overrides, message, tmp_path):
    cfg = _jamba_like(**overrides)
    with pytest.raises(ValueError, match=message):
        to_hf(build_model(cfg), cfg, tmp_path)


@pytest.mark.parametrize("shared,bias_rate", [(0, 0.0), (1, 0.0), (0, 0.01)])
def test_moe_hybrid_export_loads_as_nemotron_h_and_imports_back(shared, bias_rate, tmp_path):
    """Mamba2 + attention + MoE (sigmoid routing, top-2 of 4, with or without a shared expert, with or without
    balancing biases, which become NemotronH's e_score_correction_bias) exports to NemotronHForCausalLM (block type
    moe) with no missing or unexpected keys, fp32 logits within 1e-4 and the same greedy tokens, and imports back
    exactly."""
    moe = dict(num_experts=4, top_k=2, hidden=24, shared_experts=shared, router="sigmoid", bias_update_rate=bias_rate)
    cfg = _hybrid(hybrid_pattern="ME*M-E", moe=moe)
    hf, ours, ids = _check_export(cfg, tmp_path, "NemotronHForCausalLM")
    assert hf.config.layers_block_type[1] == "moe"
    bias = hf.state_dict()["model.layers.1.mixer.gate.e_score_correction_bias"]
    assert (bias.abs().max() > 0) == (bias_rate > 0)
    _check_reimport(ours, cfg, tmp_path, ids)


def test_import_from_random_nemotron_h_moe_model(tmp_path):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    hf_cfg = NemotronHConfig(
        vocab_size=64, hidden_size=32, hybrid_override_pattern="ME*E", num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=40, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=2,
        chunk_size=8, tie_word_embeddings=False, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=48, norm_topk_prob=True,
    )  # fmt: skip
    hf = NemotronHForCausalLM(hf_cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("gate.weight"):  # spread the router's scores (an init of zeros ties every expert)
                p.normal_(0.0, 0.5)
    ours, cfg, _ = _check_import(hf, tmp_path)
    assert cfg.hybrid_pattern == "ME*E" and cfg.moe.shared_experts == 2 and cfg.moe.router == "sigmoid"


def test_moe_mamba1_hybrid_export_loads_as_jamba_and_imports_back(tmp_path):
    """Mamba1 + attention + MoE of Jamba's layout (softmax top-2 of 4 SwiGLU experts every other layer) exports to
    JambaForCausalLM with no missing or unexpected keys, fp32 logits within 1e-4 and the same greedy tokens, and
    imports back exactly."""
    moe = dict(num_experts=4, top_k=2, hidden=48, router="softmax")
    cfg = _jamba_like(hybrid_pattern="M-MEM-*E", moe=moe)
    hf, ours, ids = _check_export(cfg, tmp_path, "JambaForCausalLM")
    assert hf.config.num_experts == 4 and (hf.config.expert_layer_period, hf.config.expert_layer_offset) == (2, 1)
    _check_reimport(ours, cfg, tmp_path, ids)


def test_import_from_random_jamba_moe_model(tmp_path):
    from transformers import JambaConfig, JambaForCausalLM

    hf_cfg = JambaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2, num_experts=4, num_experts_per_tok=2,
        expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=4, use_mamba_kernels=False,
    )  # fmt: skip
    _, cfg, _ = _check_import(JambaForCausalLM(hf_cfg), tmp_path)
    assert cfg.hybrid_pattern == "M-ME*-ME" and cfg.moe.num_experts == 4 and cfg.moe_hidden == 40


@pytest.mark.parametrize(
    "target,overrides,message",
    [
        ("nemotron_h", dict(router="softmax"), "NemotronH routes by sigmoid"),
        ("jamba", dict(router="sigmoid"), "Jamba routes by softmax"),
        ("jamba", dict(shared_experts=1), "Jamba has no shared experts"),
        ("jamba", dict(hidden=32), "share intermediate_size"),
    ],
)
def test_moe_export_names_what_the_target_cannot_express(target, overrides, message, tmp_path):
    moe = dict(num_experts=4, top_k=2, hidden=48, router="sigmoid" if target == "nemotron_h" else "softmax")
    moe.update(overrides)
    cfg = _hybrid(hybrid_pattern="ME*M-E", moe=moe) if target == "nemotron_h" else _jamba_like(
        hybrid_pattern="M-MEM-*E", moe=moe
    )  # fmt: skip
    with pytest.raises(ValueError, match=message):
        to_hf(build_model(cfg), cfg, tmp_path)
