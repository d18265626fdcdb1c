"""The registry of layer kinds: everything the rest of mambatron needs to know about one kind of layer, in one place.

A kind declares its module, its tensor-parallel layout (which parameter splits along which dim, used to consolidate
and reshard checkpoints), its parameter count, sequence-mixing FLOPs and saved activations (used by the planner),
its Hugging Face mapping and its constraints on the config and on the tensor-parallel size. ``models/lm.py``,
``parallel/``, ``plan.py``, ``hf.py`` and ``config.py`` look kinds up here instead of switching on ``model.arch``, and
an unknown kind is an error everywhere. A new kind (attention, MLP, MoE, Mamba3) is its own module plus one
:func:`register` call in it, and one import in :func:`_load_builtin_kinds`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mambatron.config import ConfigError, ModelConfig
from mambatron.parallel.layout import Layout


@dataclass(frozen=True)
class HFMapping:
    """How a pure stack of this kind maps to a Hugging Face model."""

    model_type: str  # config.json's model_type
    architecture: str  # config.json's architectures[0]
    config: Callable[[ModelConfig], dict[str, Any]]  # this kind's own config.json fields
    fields: Callable[[dict[str, Any]], dict[str, Any]]  # this kind's own ModelConfig fields from a config.json


@dataclass(frozen=True)
class LayerKind:
    name: str
    # (cfg, layer_idx, projections) -> the layer's module (the block adds the pre-norm and the residual).
    build: Callable[[ModelConfig, int, Any], Any]
    # Full-size layouts of the module's parameters, by name inside the module (e.g. "in_proj.weight").
    tp_layouts: Callable[[ModelConfig], dict[str, Layout]]
    # Parameters of the module (without the block's pre-norm).
    params: Callable[[ModelConfig], int]
    # Forward FLOPs per token of everything that is not a matmul with a weight (the scan), at seq_len.
    mixing_flops: Callable[[ModelConfig, int], float]
    # Width of what one layer keeps per token for backward, in elements, that tensor parallelism splits.
    activation_width: Callable[[ModelConfig], int]
    # A problem with tp for this model (a one-line message naming the fix), or None.
    tp_problem: Callable[[ModelConfig, int], str | None]
    # A problem with the model config for this kind, or None.
    config_problem: Callable[[ModelConfig], str | None] = field(default=lambda cfg: None)
    # Bytes one rank receives per sequence in one layer's forward under context parallelism, for
    # (cfg, tp, seq_len, cp, activation bytes); the backward's all-reduces move as much again.
    cp_exchange_bytes: Callable[[ModelConfig, int, int, int, int], int] = field(default=lambda *args: 0)
    hf: HFMapping | None = None
    # Parameters one token multiplies with when that is fewer than all of them (a MoE layer's routed experts); None =
    # params. FLOPs per token and MFU count these.
    active_params: Callable[[ModelConfig], int] | None = None
    # Parameters split over the expert-parallel ranks (a MoE layer's routed experts); 0 for every other kind.
    expert_params: Callable[[ModelConfig], int] = field(default=lambda cfg: 0)
    # Bytes one rank sends per micro-batch in one layer's forward under expert parallelism, for (cfg, tokens on the
    # rank, ep, activation bytes); the backward sends as much again.
    ep_exchange_bytes: Callable[[ModelConfig, int, int, int], int] = field(default=lambda *args: 0)
    # Its symbol in model.hybrid_pattern; "M" for the Mamba mixers (model.arch says which).
    symbol: str | None = None


_KINDS: dict[str, LayerKind] = {}


def register(kind: LayerKind) -> LayerKind:
    if kind.name in _KINDS and _KINDS[kind.name] is not kind:
        raise ValueError(f"layer kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def _load_builtin_kinds() -> None:
    # Each kind registers itself when its module is imported.
    import mambatron.models.attention  # noqa: F401
    import mambatron.models.mamba1  # noqa: F401
    import mambatron.models.mamba2  # noqa: F401
    import mambatron.models.mlp  # noqa: F401
    import mambatron.models.moe  # noqa: F401


def kinds() -> dict[str, LayerKind]:
    _load_builtin_kinds()
    return dict(_KINDS)


def layer_kind(name: str) -> LayerKind:
    """The registered kind ``name``; a :class:`ConfigError` naming the known kinds otherwise."""
    _load_builtin_kinds()
    if name not in _KINDS:
        raise ConfigError(f"unknown layer kind {name!r} (model.arch); known kinds: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def layer_kinds(cfg: ModelConfig) -> list[LayerKind]:
    """The kind of every layer: model.hybrid_pattern's symbols, or n_layer times model.arch when it is empty. A
    :class:`ConfigError` names a symbol no kind has, with its position."""
    mixer = layer_kind(cfg.arch)
    if not cfg.hybrid_pattern:
        return [mixer] * cfg.n_layer
    by_symbol = {k.symbol: k for k in kinds().values() if k.symbol not in (None, "M")}
    by_symbol["M"] = mixer
    out = []
    for i, symbol in enumerate(cfg.hybrid_pattern):
        if symbol not in by_symbol:
            names = {s: "Mamba (model.arch)" if s == "M" else k.name for s, k in by_symbol.items()}
            known = ", ".join(f"{s!r} {name}" for s, name in sorted(names.items()))
            raise ConfigError(f"model.hybrid_pattern[{i}]={symbol!r} is not a layer symbol; known: {known}")
        out.append(by_symbol[symbol])
    return out


def kind_for_hf(model_type: str) -> LayerKind:
    """The kind whose Hugging Face model_type is ``model_type``; ValueError naming the importable ones otherwise."""
    for kind in kinds().values():
        if kind.hf is not None and kind.hf.model_type == model_type:
            return kind
    known = sorted(k.hf.model_type for k in kinds().values() if k.hf is not None)
    raise ValueError(f"config.json has model_type={model_type!r}; importable: {', '.join(known)}")
