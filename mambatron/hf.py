"""Export to / import from Hugging Face ``MambaForCausalLM`` (Mamba1) and ``Mamba2ForCausalLM`` (Mamba2).

Our full (TP=1) state-dict keys are HF's without the ``backbone.`` prefix, except the embedding
(``embedding.weight`` ↔ ``backbone.embeddings.weight``). A tied LM head is left out of the file, as HF does.
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


def to_hf_key(key: str) -> str:
    if key == "embedding.weight":
        return "backbone.embeddings.weight"
    if key.startswith(("layers.", "norm_f.")):
        return "backbone." + key
    return key


def from_hf_key(key: str) -> str:
    if key == "backbone.embeddings.weight":
        return "embedding.weight"
    return key.removeprefix("backbone.")


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
    if cfg.hybrid_pattern:
        raise ValueError(
            f"model.hybrid_pattern={cfg.hybrid_pattern!r}: Hugging Face export of hybrid models (NemotronH, Jamba) is "
            "not supported yet; only pure Mamba1/Mamba2 stacks export"
        )
    hf = layer_kind(cfg.arch).hf
    if hf is None:
        raise ValueError(f"layer kind {cfg.arch!r} has no Hugging Face mapping yet")
    return {"model_type": hf.model_type, "architectures": [hf.architecture], **hf.config(cfg), **common}


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig from an HF ``config.json`` dict (exact if it was exported by us)."""
    if "mambatron" in hf:
        return config_from_dict({"model": hf["mambatron"]}).model
    model_type = hf.get("model_type")
    kind = kind_for_hf(model_type)
    vocab = int(hf["vocab_size"])
    fields: dict[str, Any] = {
        "arch": kind.name,
        "d_model": hf["hidden_size"],
        "n_layer": hf["num_hidden_layers"],
        "vocab_size": vocab,
        # Keep HF's vocab exactly: pad to the largest power of two (≤ 16) that already divides it.
        "pad_vocab_multiple": next(m for m in (16, 8, 4, 2, 1) if vocab % m == 0),
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
    tensors = {}
    for key, value in state.items():
        if model_config.tie_embeddings and key == "lm_head.weight":
            continue
        value = value.detach().to("cpu")
        tensors[to_hf_key(key)] = (value.to(dtype) if dtype is not None else value).contiguous()
    token_ids = _copy_tokenizer(tokenizer_dir, out) if tokenizer_dir else None
    hf_cfg = hf_config_dict(model_config, token_ids)
    if dtype is not None:
        hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    # Weights of an earlier export must not survive: a stale shard index would make from_pretrained load them.
    for stale in _weight_files(out):
        stale.unlink()
    _save_sharded(tensors, out)
    return out


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
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{str(d)!r} has no model.safetensors(.index.json); is it an HF model folder?")
    state = {}
    for name in files:
        state.update({from_hf_key(k): v for k, v in load_file(str(d / name)).items()})
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
