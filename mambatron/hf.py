"""Export to / import from Hugging Face ``MambaForCausalLM`` (Mamba1), ``FalconMambaForCausalLM`` (Mamba1 with
``model.mamba1_inner_norms``), ``Mamba2ForCausalLM`` (Mamba2), ``NemotronHForCausalLM`` (Mamba2 + attention + MLP +
MoE hybrids) and ``JambaForCausalLM`` (Mamba1 + attention + MLP / MoE hybrids).

Our full (TP=1) state-dict keys are HF's without the ``backbone.`` prefix (files may also use ``model.`` for
NemotronH), except the embedding (``embedding.weight`` ↔ ``backbone.embeddings.weight``), Jamba's layer numbering
(our blocks 2i and 2i+1 are its layer i) and MoE layers: our router and stacked experts (``experts.fc1``,
``experts.fc2``) are written one tensor per expert under the target's names, as transformers itself saves them, and
read back from either layout. A tied LM head is left out of the file, as HF does, except for NemotronH, whose loader
does not tie it.
The exported ``config.json`` also carries our own model config under ``"mambatron"`` so a round trip is exact.

A *model directory* (what ``tools/import_hf.py`` writes and ``tools/export_hf.py`` reads) holds
``config.yaml`` (a full run config) and ``model.safetensors`` (the full TP=1 state dict).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from mambatron.config import Config, ModelConfig, config_from_dict
from mambatron.models import MambaLM, build_model
from mambatron.models.layers import kind_for_hf, layer_kind

SHARD_BYTES = 4 * 1024**3


# NemotronH's hybrid_override_pattern uses our symbols; its newer layers_block_type names map to them too.
_NEMOTRON_H_BLOCKS = {
    "mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-", "moe": "E",
}  # fmt: skip
# A MoE layer's tensors: ours → NemotronH's (NemotronHMoE) and Jamba's (JambaSparseMoeBlock) names inside the layer.
_NEMOTRON_H_MOE = {
    "router.weight": "gate.weight",
    "expert_bias": "gate.e_score_correction_bias",  # auxiliary-loss-free balancing (model.moe.bias_update_rate)
    "experts.fc1": "experts.up_proj",
    "experts.fc2": "experts.down_proj",
    "shared_experts.linear_fc1.weight": "shared_experts.up_proj.weight",
    "shared_experts.linear_fc2.weight": "shared_experts.down_proj.weight",
}
_JAMBA_MOE = {
    "router.weight": "router.weight",
    "experts.fc1": "experts.gate_up_proj",
    "experts.fc2": "experts.down_proj",
}

_FROM_NEMOTRON_H_MOE = {theirs: ours for ours, theirs in _NEMOTRON_H_MOE.items()}
_FROM_JAMBA_MOE = {theirs: ours for ours, theirs in _JAMBA_MOE.items() if theirs != ours}


def _rename_leaf(key: str, table: dict[str, str]) -> str:
    """``key`` with its MoE leaf (one of ``table``'s keys, after ``mixer.``/``feed_forward.``) renamed."""
    for ours, theirs in table.items():
        if key.endswith("." + ours):
            return key.removesuffix(ours) + theirs
    return key


def _pad_multiple(vocab: int) -> int:
    """Keep an imported vocab exactly: pad to the largest power of two (≤ 16) that already divides it."""
    return next(m for m in (16, 8, 4, 2, 1) if vocab % m == 0)


def to_hf_key(key: str) -> str:
    if key == "embedding.weight":
        return "backbone.embeddings.weight"
    if key.startswith(("layers.", "norm_f.")):
        return "backbone." + _rename_leaf(key, _NEMOTRON_H_MOE)
    return key


def from_hf_key(key: str) -> str:
    """Our key for an HF one: ``backbone.`` is what the Mamba models and NVIDIA's NemotronH checkpoints use (and what
    transformers writes for NemotronH); ``model.`` is transformers' in-memory NemotronH naming."""
    for prefix in ("backbone.", "model."):
        if key == prefix + "embeddings.weight":
            return "embedding.weight"
        if key.startswith(prefix):
            return _rename_leaf(key.removeprefix(prefix), _FROM_NEMOTRON_H_MOE)
    return key


def _nemotron_h_config(cfg: ModelConfig) -> dict[str, Any]:
    """NemotronHForCausalLM's own config.json fields for a Mamba2 hybrid; a ValueError names what it cannot express."""
    a, m = cfg.attention, cfg.mlp
    problems = [
        (a.rope_theta is not None, f"model.attention.rope_theta={a.rope_theta} (NemotronH attention has no RoPE)"),
        (a.bias, "model.attention.bias=true (NemotronH's q/k/v/o projections have no bias)"),
        (m.activation != "relu2", f"model.mlp.activation={m.activation!r} (NemotronH's MLP is relu2)"),
    ]
    moe = "E" in cfg.hybrid_pattern
    if moe:
        problems += [
            (cfg.moe.router != "sigmoid", f"model.moe.router={cfg.moe.router!r} (NemotronH routes by sigmoid)"),
            (cfg.moe.num_experts < 2, "model.moe.num_experts=1 (NemotronH's router needs at least 2 experts)"),
        ]
    bad = [why for cond, why in problems if cond]
    if bad:
        raise ValueError("cannot export this hybrid to NemotronHForCausalLM: " + "; ".join(bad))
    experts = {}
    if moe:
        experts = {
            "n_routed_experts": cfg.moe.num_experts,
            "num_experts_per_tok": cfg.moe.top_k,
            "moe_intermediate_size": cfg.moe_hidden,
            # NemotronH always has shared experts; without ours it gets a width-1 one with zero weights (to_hf).
            "moe_shared_expert_intermediate_size": max(cfg.moe.shared_experts * cfg.moe_hidden, 1),
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": cfg.moe.top_k > 1,  # megatron-core renormalises the sigmoid top-k only when k > 1
            "routed_scaling_factor": 1.0,
            "moe_latent_size": None,
        }
    return {
        **experts,
        "hybrid_override_pattern": cfg.hybrid_pattern,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads,
        "head_dim": cfg.head_dim_value,
        "attention_bias": False,
        "intermediate_size": cfg.mlp_hidden,
        "mlp_hidden_act": "relu2",
        "mlp_bias": m.bias,
        "ssm_state_size": cfg.d_state,
        "mamba_num_heads": cfg.nheads,
        "mamba_head_dim": cfg.headdim,
        "mamba_hidden_act": "silu",
        "n_groups": cfg.ngroups,
        "chunk_size": cfg.chunk_size,
        "time_step_limit": [0.0, float("inf")],
        "rescale_prenorm_residual": False,
    }


def _jamba_config(cfg: ModelConfig) -> dict[str, Any]:
    """JambaForCausalLM's own config.json fields for a Mamba1 hybrid; a ValueError names what it cannot express.

    A Jamba layer is a mixer (Mamba or attention) then an MLP, each pre-normed, which is our pattern's symbol pairs
    ``M-`` / ``*-``; attention sits at every layer i with i % attn_layer_period == attn_layer_offset."""
    a, m, p = cfg.attention, cfg.mlp, cfg.hybrid_pattern
    mixers, ffns = p[0::2], p[1::2]
    moe = "E" in ffns
    problems = [
        (len(p) % 2 or set(ffns) - set("-E") or set(mixers) - set("M*"),
         f"model.hybrid_pattern={p!r} (Jamba layers pair a mixer with an MLP or MoE: M-, *-, ME or *E repeated)"),
        (not cfg.mamba1_inner_norm_weights, "model.mamba1_inner_norm_weights=false (Jamba normalises dt, B and C with "
                                            "weights; set mamba1_inner_norms and mamba1_inner_norm_weights)"),
        (cfg.mamba1_inner_norm_eps != cfg.norm_eps, "model.mamba1_inner_norm_eps differs from model.norm_eps (Jamba "
                                                    "has one rms_norm_eps)"),
        (a.rope_theta is not None, f"model.attention.rope_theta={a.rope_theta} (Jamba attention has no RoPE)"),
        (a.bias, "model.attention.bias=true (Jamba's attention projections have no bias)"),
        (cfg.head_dim_value * a.num_heads != cfg.d_model, "model.attention.head_dim (Jamba's is d_model / num_heads)"),
        (m.activation != "swiglu" or m.bias, "model.mlp (Jamba's MLP is SwiGLU without bias)"),
    ]  # fmt: skip
    if moe:
        problems += [
            (cfg.moe.router != "softmax", f"model.moe.router={cfg.moe.router!r} (Jamba routes by softmax)"),
            (cfg.moe.shared_experts, "model.moe.shared_experts (Jamba has no shared experts)"),
            ("-" in ffns and cfg.moe_hidden != cfg.mlp_hidden,
             "model.moe.hidden differs from model.mlp.hidden (Jamba's experts and MLPs share intermediate_size)"),
        ]  # fmt: skip
    bad = [why for cond, why in problems if cond]
    attention = [i for i, s in enumerate(mixers) if s == "*"]
    n = len(mixers)
    placement = _attention_period(attention, n)
    if not bad and placement is None:
        bad.append(f"attention at layers {attention} (Jamba places it at a fixed period and offset)")
    expert_layers = [i for i, s in enumerate(ffns) if s == "E"]
    expert_placement = _attention_period(expert_layers, n) if moe else (1, 0)
    if not bad and expert_placement is None:
        bad.append(f"MoE at layers {expert_layers} (Jamba places it at a fixed period and offset)")
    if bad:
        raise ValueError("cannot export this hybrid to JambaForCausalLM: " + "; ".join(bad))
    period, offset = placement
    return {
        "num_hidden_layers": n,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads,
        "intermediate_size": cfg.mlp_hidden if "-" in ffns else cfg.moe_hidden,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "attn_layer_period": period,
        "attn_layer_offset": offset,
        "num_experts": cfg.moe.num_experts if moe else 1,
        "num_experts_per_tok": cfg.moe.top_k if moe else 1,
        "expert_layer_period": expert_placement[0],
        "expert_layer_offset": expert_placement[1],
        "mamba_d_state": cfg.d_state,
        "mamba_d_conv": cfg.d_conv,
        "mamba_expand": cfg.expand,
        "mamba_dt_rank": cfg.dt_rank_value,
        "mamba_conv_bias": cfg.conv_bias,
        "mamba_proj_bias": cfg.bias,
        "use_mamba_kernels": False,
    }


def _attention_period(attention: list[int], n: int) -> tuple[int, int] | None:
    """(period, offset) such that layer i < n is attention exactly when i % period == offset, or None."""
    if not attention:
        return n + 1, n  # never
    offset = attention[0]
    for period in range(offset + 1, n + 1):
        if attention == [i for i in range(n) if i % period == offset]:
            return period, offset
    return None


def _jamba_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Our ModelConfig fields from a Jamba config.json."""
    n = hf["num_hidden_layers"]
    period, offset = hf.get("attn_layer_period", 8), hf.get("attn_layer_offset", 4)
    experts = hf.get("num_experts", 16)
    e_period, e_offset = hf.get("expert_layer_period", 2), hf.get("expert_layer_offset", 1)
    ffn = ["E" if experts > 1 and i % e_period == e_offset else "-" for i in range(n)]
    vocab = int(hf["vocab_size"])
    eps = hf.get("rms_norm_eps", 1e-6)
    return {
        "arch": "mamba1",
        "hybrid_pattern": "".join(("*" if i % period == offset else "M") + ffn[i] for i in range(n)),
        "n_layer": 2 * n,
        "d_model": hf["hidden_size"],
        "vocab_size": vocab,
        "pad_vocab_multiple": _pad_multiple(vocab),
        "d_state": hf.get("mamba_d_state", 16),
        "d_conv": hf.get("mamba_d_conv", 4),
        "expand": hf.get("mamba_expand", 2),
        "dt_rank": hf.get("mamba_dt_rank", "auto"),
        "conv_bias": hf.get("mamba_conv_bias", True),
        "bias": hf.get("mamba_proj_bias", False),
        "norm_eps": eps,
        "mamba1_inner_norms": True,
        "mamba1_inner_norm_weights": True,
        "mamba1_inner_norm_eps": eps,
        "residual_in_fp32": False,
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "attention": {
            "num_heads": hf.get("num_attention_heads", 32),
            "num_kv_heads": hf.get("num_key_value_heads", 8),
            "head_dim": None,
            "rope_theta": None,
            "bias": False,
        },  # fmt: skip
        "mlp": {"hidden": hf.get("intermediate_size", 14336), "activation": "swiglu", "bias": False},
        **({"moe": _jamba_moe_fields(hf)} if "E" in ffn else {}),  # fmt: skip
    }


def _jamba_moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """model.moe from a Jamba config.json: softmax routing, SwiGLU experts of intermediate_size, no shared ones."""
    return {
        "num_experts": hf["num_experts"],
        "top_k": hf.get("num_experts_per_tok", 2),
        "hidden": None,  # = model.mlp.hidden = intermediate_size
        "shared_experts": 0,
        "router": "softmax",
        "aux_loss_coef": hf.get("router_aux_loss_coef", 0.001),
        "capacity_factor": None,
    }


def _to_jamba_key(key: str, cfg: ModelConfig) -> str:
    """Our key → Jamba's: blocks 2i (mixer) and 2i+1 (MLP) are Jamba layer i."""
    fixed = {"embedding.weight": "model.embed_tokens.weight", "norm_f.weight": "model.final_layernorm.weight"}
    if key in fixed:
        return fixed[key]
    if not key.startswith("layers."):
        return key
    _, index, rest = key.split(".", 2)
    i, ffn = divmod(int(index), 2)
    if rest == "norm.weight":
        return f"model.layers.{i}.{'pre_ff_layernorm' if ffn else 'input_layernorm'}.weight"
    leaf = rest.removeprefix("mixer.")
    part = "feed_forward" if ffn else ("self_attn" if cfg.hybrid_pattern[2 * i] == "*" else "mamba")
    return _rename_leaf(f"model.layers.{i}.{part}.{leaf}", _JAMBA_MOE)


def _from_jamba_key(key: str) -> str:
    fixed = {"model.embed_tokens.weight": "embedding.weight", "model.final_layernorm.weight": "norm_f.weight"}
    if key in fixed or not key.startswith("model.layers."):
        return fixed.get(key, key)
    _, _, index, part, rest = key.split(".", 4)
    i = int(index)
    if part in ("input_layernorm", "pre_ff_layernorm"):
        return f"layers.{2 * i + (part == 'pre_ff_layernorm')}.norm.{rest}"
    key = f"layers.{2 * i + (part == 'feed_forward')}.mixer.{rest}"
    return _rename_leaf(key, _FROM_JAMBA_MOE)


def _nemotron_h_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Our ModelConfig fields from a NemotronH config.json (NVIDIA's or transformers' spelling of the layers)."""
    if hf.get("hybrid_override_pattern"):
        pattern = hf["hybrid_override_pattern"]
    else:
        blocks = hf.get("layers_block_type") or hf.get("layer_types") or []
        unknown = sorted({b for b in blocks if b not in _NEMOTRON_H_BLOCKS})
        if unknown:
            raise ValueError(f"NemotronH layer types {unknown} are not supported yet")
        pattern = "".join(_NEMOTRON_H_BLOCKS[b] for b in blocks)
    if set(pattern) - set("M*-E"):
        raise ValueError(f"NemotronH pattern {pattern!r}: only M, *, - and E layers import")
    if hf.get("mlp_hidden_act", "relu2") != "relu2":
        raise ValueError(f"NemotronH mlp_hidden_act={hf['mlp_hidden_act']!r}: only relu2 imports")
    mamba_heads, mamba_head_dim = hf.get("mamba_num_heads", 128), hf.get("mamba_head_dim", 64)
    expand = mamba_heads * mamba_head_dim // hf["hidden_size"]
    if expand * hf["hidden_size"] != mamba_heads * mamba_head_dim:
        raise ValueError("NemotronH config: mamba_num_heads * mamba_head_dim must be a multiple of hidden_size")
    vocab = int(hf["vocab_size"])
    return {
        "arch": "mamba2",
        "hybrid_pattern": pattern,
        "d_model": hf["hidden_size"],
        "n_layer": len(pattern),
        "vocab_size": vocab,
        "pad_vocab_multiple": _pad_multiple(vocab),
        "d_state": hf.get("ssm_state_size", 128),
        "d_conv": hf.get("conv_kernel", 4),
        "expand": expand,
        "headdim": mamba_head_dim,
        "ngroups": hf.get("n_groups", 8),
        "chunk_size": hf.get("chunk_size", 128),
        "conv_bias": hf.get("use_conv_bias", True),
        "bias": hf.get("use_bias", False),
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "residual_in_fp32": hf.get("residual_in_fp32", False),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "dt_min": hf.get("time_step_min", 0.001),
        "dt_max": hf.get("time_step_max", 0.1),
        "dt_init_floor": hf.get("time_step_floor", 1e-4),
        "attention": {
            "num_heads": hf.get("num_attention_heads", 32),
            "num_kv_heads": hf.get("num_key_value_heads") or hf.get("num_attention_heads", 32),
            "head_dim": hf.get("head_dim", 128),
            "rope_theta": None,
            "bias": False,
        },
        "mlp": {"hidden": hf.get("intermediate_size", 21504), "activation": "relu2", "bias": hf.get("mlp_bias", False)},
        **({"moe": _nemotron_h_moe_fields(hf)} if "E" in pattern else {}),
    }


def _nemotron_h_moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """model.moe from a NemotronH config.json; a ValueError names the routing options that do not import."""
    k = hf.get("num_experts_per_tok", 2)
    problems = [
        (hf.get("n_group", 1) != hf.get("topk_group", 1), "group-limited routing (n_group != topk_group)"),
        (hf.get("routed_scaling_factor", 1.0) != 1.0, f"routed_scaling_factor={hf.get('routed_scaling_factor')}"),
        (hf.get("norm_topk_prob", True) != (k > 1), f"norm_topk_prob={hf.get('norm_topk_prob')} with top-{k}"),
        (hf.get("moe_latent_size") is not None, "moe_latent_size (latent expert projections)"),
    ]
    bad = [why for cond, why in problems if cond]
    if bad:
        raise ValueError("NemotronH MoE routing that does not import yet: " + "; ".join(bad))
    hidden = hf.get("moe_intermediate_size", 7688)
    shared = hf.get("moe_shared_expert_intermediate_size", 7688)
    if shared % hidden and shared != 1:
        raise ValueError(f"NemotronH moe_shared_expert_intermediate_size={shared} is not a multiple of "
                         f"moe_intermediate_size={hidden}")  # fmt: skip
    return {
        "num_experts": hf.get("n_routed_experts", 8),
        "top_k": k,
        "hidden": hidden,
        "shared_experts": shared // hidden,
        "router": "sigmoid",
        "aux_loss_coef": 0.01,
        "capacity_factor": None,
    }


def hf_config_dict(cfg: ModelConfig, token_ids: dict[str, int | None] | None = None) -> dict[str, Any]:
    """The ``config.json`` contents of the HF model equivalent to ``cfg``."""
    common = {
        "vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.d_model,
        "state_size": cfg.d_state,
        "num_hidden_layers": cfg.n_layer,
        "layer_norm_epsilon": cfg.norm_eps,
        "expand": cfg.expand,
        "conv_kernel": cfg.d_conv,
        "use_bias": cfg.bias,
        "use_conv_bias": cfg.conv_bias,
        "residual_in_fp32": cfg.residual_in_fp32,
        "tie_word_embeddings": cfg.tie_embeddings,
        "time_step_min": cfg.dt_min,
        "time_step_max": cfg.dt_max,
        "time_step_floor": cfg.dt_init_floor,
        "time_step_rank": cfg.dt_rank_value,
        "torch_dtype": "float32",
        "mambatron": dataclasses.asdict(cfg),
    }
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        common[name] = (token_ids or {}).get(name)
    if cfg.hybrid_pattern and cfg.arch == "mamba1":
        own = _jamba_config(cfg)
        return {"model_type": "jamba", "architectures": ["JambaForCausalLM"], **common, **own}
    if cfg.hybrid_pattern:
        own = _nemotron_h_config(cfg)
        return {"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], **common, **own}
    hf = layer_kind(cfg.arch).hf
    if hf is None:
        raise ValueError(f"layer kind {cfg.arch!r} has no Hugging Face mapping yet")
    out = {"model_type": hf.model_type, "architectures": [hf.architecture], **hf.config(cfg), **common}
    if cfg.mamba1_inner_norm_weights:
        raise ValueError("model.mamba1_inner_norm_weights=true (Jamba's weighted dt/B/C norms) exports only as a "
                         "JambaForCausalLM hybrid; FalconMambaForCausalLM's norms have no weights")  # fmt: skip
    if cfg.mamba1_inner_norms:  # FalconMamba is Mamba1 with weightless RMSNorms of dt, B and C
        out.update(model_type="falcon_mamba", architectures=["FalconMambaForCausalLM"],
                   mixer_rms_eps=cfg.mamba1_inner_norm_eps)  # fmt: skip
    return out


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig from an HF ``config.json`` dict (exact if it was exported by us)."""
    if "mambatron" in hf:
        return config_from_dict({"model": hf["mambatron"]}).model
    model_type = hf.get("model_type")
    if model_type == "nemotron_h":
        return config_from_dict({"model": _nemotron_h_fields(hf)}).model
    if model_type == "jamba":
        return config_from_dict({"model": _jamba_fields(hf)}).model
    falcon = model_type == "falcon_mamba"
    kind = kind_for_hf("mamba" if falcon else model_type)
    vocab = int(hf["vocab_size"])
    fields: dict[str, Any] = {
        "arch": kind.name,
        "d_model": hf["hidden_size"],
        "n_layer": hf["num_hidden_layers"],
        "vocab_size": vocab,
        "pad_vocab_multiple": _pad_multiple(vocab),
        "d_state": hf.get("state_size", 16),
        "d_conv": hf.get("conv_kernel", 4),
        "expand": hf.get("expand", 2),
        "conv_bias": hf.get("use_conv_bias", True),
        "bias": hf.get("use_bias", False),
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "residual_in_fp32": hf.get("residual_in_fp32", True),
        "dt_min": hf.get("time_step_min", 0.001),
        "dt_max": hf.get("time_step_max", 0.1),
        "dt_init_floor": hf.get("time_step_floor", 1e-4),
    }
    fields.update(kind.hf.fields(hf))
    if falcon:
        fields.update(mamba1_inner_norms=True, mamba1_inner_norm_eps=hf.get("mixer_rms_eps", 1e-6))
    cfg = config_from_dict({"model": fields}).model
    return cfg


def to_hf(
    model_or_state: MambaLM | dict[str, torch.Tensor],
    model_config: ModelConfig,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write an HF folder (config.json + safetensors, sharded above 4 GiB) that ``AutoModelForCausalLM`` loads
    with no missing or unexpected keys. ``tokenizer_dir`` files (if given) are copied beside it."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    token_ids = _copy_tokenizer(tokenizer_dir, out) if tokenizer_dir else None
    hf_cfg = hf_config_dict(model_config, token_ids)
    tensors = {}
    for key, value in state.items():
        if model_config.tie_embeddings and key == "lm_head.weight":
            continue
        value = value.detach().to("cpu")
        hf_key = _to_jamba_key(key, model_config) if hf_cfg["model_type"] == "jamba" else to_hf_key(key)
        tensors[hf_key] = (value.to(dtype) if dtype is not None else value).contiguous()
    _unstack_experts(tensors, hf_cfg["model_type"])
    if hf_cfg["model_type"] == "nemotron_h":
        tensors.update(_nemotron_h_moe_extras(model_config))
    if hf_cfg["model_type"] == "nemotron_h" and model_config.tie_embeddings:
        # transformers' NemotronH does not tie its head to the embedding when loading, so the head is written out.
        tensors["lm_head.weight"] = tensors["backbone.embeddings.weight"].clone()
    if dtype is not None:
        hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    # Weights of an earlier export must not survive: a stale shard index would make from_pretrained load them.
    for stale in _weight_files(out):
        stale.unlink()
    _save_sharded(tensors, out)
    return out


def _unstack_experts(tensors: dict[str, torch.Tensor], model_type: str) -> None:
    """Stacked expert weights (HF names, in place) → one tensor per expert, the checkpoint layout transformers writes
    itself and that every transformers release reads: NemotronH ``experts.{e}.up_proj`` / ``down_proj``, Jamba
    ``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``."""
    fc1_name = "experts.gate_up_proj" if model_type == "jamba" else "experts.up_proj"
    for key in [k for k in tensors if k.endswith("." + fc1_name)]:
        prefix = key.removesuffix(fc1_name)
        fc1, fc2 = tensors.pop(key), tensors.pop(prefix + "experts.down_proj")
        for e in range(fc1.shape[0]):
            if model_type == "jamba":
                gate, up = fc1[e].chunk(2)
                tensors[f"{prefix}experts.{e}.gate_proj.weight"] = gate.contiguous()
                tensors[f"{prefix}experts.{e}.up_proj.weight"] = up.contiguous()
            else:
                tensors[f"{prefix}experts.{e}.up_proj.weight"] = fc1[e].contiguous()
            tensors[f"{prefix}experts.{e}.down_proj.weight"] = fc2[e].contiguous()


def _stack_experts(state: dict[str, torch.Tensor]) -> None:
    """One tensor per expert (our key prefixes, in place) → our stacked ``experts.fc1`` ([gate; up] for SwiGLU) and
    ``experts.fc2``; stacked HF tensors were already renamed to those by the key maps."""
    per_expert = {}
    for key in list(state):
        head, sep, tail = key.partition(".experts.")
        index, _, leaf = tail.partition(".")
        if sep and index.isdigit() and leaf in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
            per_expert.setdefault(head, {}).setdefault(int(index), {})[leaf] = state.pop(key)
    for head, experts in per_expert.items():
        order = [experts[e] for e in sorted(experts)]
        fc1 = [torch.cat([x["gate_proj.weight"], x["up_proj.weight"]]) if "gate_proj.weight" in x
               else x["up_proj.weight"] for x in order]  # fmt: skip
        state[f"{head}.experts.fc1"] = torch.stack(fc1)
        state[f"{head}.experts.fc2"] = torch.stack([x["down_proj.weight"] for x in order])


def _nemotron_h_moe_extras(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """What NemotronH's MoE layers hold and ours do not, with the values that make them do nothing: the router's
    score-correction bias when ours does not balance by bias (zero: no auxiliary-loss-free balancing) and, without
    shared experts, a width-1 shared expert with zero weights."""
    extras = {}
    for i, symbol in enumerate(cfg.hybrid_pattern):
        if symbol != "E":
            continue
        layer = f"backbone.layers.{i}.mixer"
        if cfg.moe.bias_update_rate <= 0:
            extras[f"{layer}.gate.e_score_correction_bias"] = torch.zeros(cfg.moe.num_experts)
        if not cfg.moe.shared_experts:
            extras[f"{layer}.shared_experts.up_proj.weight"] = torch.zeros(1, cfg.d_model)
            extras[f"{layer}.shared_experts.down_proj.weight"] = torch.zeros(cfg.d_model, 1)
    return extras


# megatron-core's default moe_router_bias_update_rate: what an imported model with a score-correction bias goes on
# training with (override with model.moe.bias_update_rate).
IMPORTED_BIAS_UPDATE_RATE = 1e-3


def _nemotron_h_bias(state: dict[str, torch.Tensor], cfg: ModelConfig) -> ModelConfig:
    """NemotronH's score-correction biases (imported as ``expert_bias``): kept when the config balances by bias (our
    export) or when any is non-zero (bias balancing turned on at megatron-core's default rate); otherwise dropped
    (they do nothing)."""
    keys = [k for k in state if k.endswith(".expert_bias")]
    if cfg.moe.bias_update_rate > 0:  # our own export: the config says how it balances
        return cfg
    if any(state[k].abs().max() > 0 for k in keys):
        return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, bias_update_rate=IMPORTED_BIAS_UPDATE_RATE))
    for key in keys:
        del state[key]
    return cfg


def _drop_nemotron_h_moe_extras(state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Remove from an imported state the zero-width-1 shared experts :func:`_nemotron_h_moe_extras` adds, after
    checking that they do nothing."""
    if cfg.moe.shared_experts:
        return
    for key in [k for k in state if ".mixer.shared_experts." in k]:
        if state[key].abs().max() > 0:
            raise ValueError(f"{key} is not zero but the model config has no shared experts")
        del state[key]


def _weight_files(folder: Path) -> list[Path]:
    """The files transformers reads weights from (safetensors or torch, single or sharded, and their indexes)."""
    patterns = (
        "model*.safetensors",
        "model.safetensors.index.json",
        "pytorch_model*.bin",
        "pytorch_model.bin.index.json",
    )
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def _save_sharded(tensors: dict[str, torch.Tensor], out: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _copy_tokenizer(tokenizer_dir: str | Path, out: Path) -> dict[str, int | None]:
    """Copy a tokenizer folder (tools/train_tokenizer.py) beside the model; returns its special ids for config.json
    (so transformers' generate stops at EOS and pads with the right id)."""
    from mambatron.data.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)  # validates the folder, with a message naming what is missing
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return {k: (v if v is not None and v >= 0 else None) for k, v in ids.items()}


def load_hf_state(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (single or sharded safetensors), with our key names."""
    d = Path(hf_dir)
    config = d / "config.json"
    jamba = config.is_file() and json.loads(config.read_text()).get("model_type") == "jamba"
    key = _from_jamba_key if jamba else from_hf_key
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{str(d)!r} has no model.safetensors(.index.json); is it an HF model folder?")
    state = {}
    for name in files:
        state.update({key(k): v for k, v in load_file(str(d / name)).items()})
    _stack_experts(state)
    return state


def from_hf(hf_dir: str | Path) -> tuple[MambaLM, ModelConfig]:
    """Build our model from an HF Mamba/Mamba2 folder; raises if any tensor is missing or unexpected."""
    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{str(d)!r} has no config.json; is it an HF model folder?")
    cfg = model_config_from_hf(json.loads((d / "config.json").read_text()))
    state = load_hf_state(d)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    if "E" in cfg.hybrid_pattern and cfg.arch != "mamba1":
        cfg = _nemotron_h_bias(state, cfg)
        _drop_nemotron_h_moe_extras(state, cfg)
    model = build_model(cfg)
    load_full_state(model, state)
    return model, cfg


def load_full_state(model: MambaLM, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict, naming every missing/unexpected key or shape mismatch in one error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"state does not match the model config: missing={missing[:8]} unexpected={unexpected[:8]} "
            f"shape mismatches={shapes[:8]}"
        )
    model.load_state_dict(state)


def save_model_dir(model_or_state, config: Config, out_dir: str | Path) -> Path:
    """Write a model directory: ``config.yaml`` + ``model.safetensors`` (full TP=1 state)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return out


def load_model_dir(model_dir: str | Path) -> tuple[MambaLM, Config]:
    d = Path(model_dir)
    for name in ("config.yaml", "model.safetensors"):
        if not (d / name).is_file():
            raise FileNotFoundError(
                f"{str(d / name)!r} not found; a model directory holds config.yaml and model.safetensors"
            )
    config = config_from_dict(yaml.safe_load((d / "config.yaml").read_text()))
    model = build_model(config.model)
    load_full_state(model, load_file(str(d / "model.safetensors")))
    return model, config
