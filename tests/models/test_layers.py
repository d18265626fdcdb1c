"""The registry of layer kinds (mambatron/models/layers.py): an unknown kind is an error everywhere, and a new kind
registered in its own module is built, counted, planned, sharded and checked without touching any other module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mambatron.config import ConfigError, load_config
from mambatron.models import build_model
from mambatron.models import layers as registry
from mambatron.models.layers import LayerKind, kinds, layer_kind
from mambatron.parallel import validate_parallel
from mambatron.parallel.consolidate import param_layout
from mambatron.parallel.layout import Layout
from mambatron.plan import count_params, flops_per_token, make_plan
from tests.models.conftest import tiny_model_config


def test_builtin_kinds_are_registered():
    assert {"mamba1", "mamba2"} <= set(kinds())
    assert layer_kind("mamba2").hf.architecture == "Mamba2ForCausalLM"


def test_an_unknown_kind_is_an_error_everywhere():
    with pytest.raises(ConfigError, match="unknown layer kind 'mamba9'.*known kinds: .*mamba1, mamba2"):
        load_config("configs/tiny.yaml", ["model.arch=mamba9"])
    cfg = tiny_model_config("mamba1")
    cfg.arch = "mamba9"  # past validation, as a hand-built config could be
    for use in (
        lambda: count_params(cfg),
        lambda: flops_per_token(cfg, 64),
        lambda: param_layout("layers.0.mixer.in_proj.weight", cfg),
        lambda: validate_parallel(cfg, load_config("configs/tiny.yaml", ["parallel.tp=2"]).parallel),
        lambda: build_model(cfg),
    ):
        with pytest.raises(ConfigError, match="unknown layer kind 'mamba9'"):
            use()


class _Toy(nn.Module):
    """A minimal layer kind: one column-parallel-style projection of the hidden state."""

    def __init__(self, cfg, layer_idx, proj=None):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    @torch.no_grad()
    def init_weights(self, generator=None):
        self.proj.weight.normal_(0.0, 0.02, generator=generator)

    def forward(self, hidden, seq_idx=None, cache=None):
        return self.proj(hidden)


@pytest.fixture
def toy_kind():
    kind = registry.register(
        LayerKind(
            name="toy",
            build=_Toy,
            tp_layouts=lambda c: {"proj.weight": Layout(1, (c.d_model,))},
            params=lambda c: c.d_model * c.d_model,
            mixing_flops=lambda c, seq_len: 0.0,
            activation_width=lambda c: c.d_model,
            tp_problem=lambda c, tp: None if c.d_model % tp == 0 else f"tp={tp} does not divide d_model",
            symbol="T",
        )
    )
    yield kind
    del registry._KINDS["toy"]


def test_a_new_kind_needs_only_its_registration(toy_kind):
    """A kind registered with a pattern symbol is built, counted, sharded and planned in a hybrid pattern."""
    cfg = tiny_model_config("mamba2", hybrid_pattern="TMT", n_layer=3)
    model = build_model(cfg)
    model.init_weights(seed=0)
    assert [block.kind for block in model.layers] == ["toy", "mamba2", "toy"]
    logits = model(torch.randint(0, cfg.vocab_size, (2, 5)))
    assert logits.shape == (2, 5, cfg.padded_vocab_size) and torch.isfinite(logits).all()
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())
    for name in model.state_dict():
        layout = param_layout(name, cfg)
        if name.startswith(("layers.0.mixer", "layers.2.mixer")):
            assert layout == Layout(1, (cfg.d_model,))
    overrides = ["model.hybrid_pattern=TT", "model.n_layer=2", "model.d_model=32", "parallel.tp=2"]
    full = load_config("configs/tiny.yaml", overrides)
    assert make_plan(full, 2).params_total == count_params(full.model).total
    with pytest.raises(ConfigError, match="tp=3 does not divide d_model"):
        validate_parallel(cfg, load_config("configs/tiny.yaml", ["parallel.tp=3"]).parallel)
    with pytest.raises(ConfigError, match="model.arch='toy' is not a Mamba mixer"):
        tiny_model_config("toy")
    with pytest.raises(ValueError, match="twice"):
        registry.register(LayerKind(**{**toy_kind.__dict__, "params": lambda c: 0}))
