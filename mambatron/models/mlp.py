"""MLP layer of hybrid models: down(relu(up(x))²) (Nemotron-H) or down(silu(gate(x)) · up(x)) (SwiGLU).

Under tensor parallelism up_proj and gate_proj are column-parallel and down_proj row-parallel (the hidden width is
split), with the sequence gathered and reduce-scattered around them under sequence parallelism. It has no state, so
generation passes through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambatron.config import ModelConfig
from mambatron.models.layers import LayerKind, register
from mambatron.models.mamba1 import init_linears
from mambatron.parallel.layout import REPLICATED, Layout
from mambatron.parallel.projections import LocalProjections


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, proj: LocalProjections | None = None):
        super().__init__()
        proj = proj or LocalProjections()
        problem = _mlp_tp_problem(cfg, proj.tp_size)
        if problem:
            raise ValueError(problem)
        self.cfg = cfg
        self.layer_idx = layer_idx
        hidden, bias = cfg.mlp_hidden, cfg.mlp.bias
        self.up_proj = proj.column(cfg.d_model, hidden, bias=bias)
        if cfg.mlp.activation == "swiglu":
            self.gate_proj = proj.column(cfg.d_model, hidden, bias=bias)
        self.down_proj = proj.row(hidden, cfg.d_model, bias=bias)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Linears kaiming-uniform with zero biases; down_proj scaled by 1/sqrt(n_layer)."""
        linears = [self.up_proj, getattr(self, "gate_proj", None), self.down_proj]
        init_linears([lin for lin in linears if lin is not None], self.down_proj, self.cfg.n_layer, generator)

    def _act(self, hidden: torch.Tensor) -> torch.Tensor:
        up = self.up_proj(hidden)
        if self.cfg.mlp.activation == "swiglu":
            return F.silu(self.gate_proj(hidden)) * up
        return torch.square(F.relu(up))

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None, cache: dict | None = None):
        """hidden: (batch, seqlen_local, d_model) → (batch, seqlen_local, d_model); position-wise, so documents and
        the cache do not matter."""
        return self.down_proj(self._act(hidden))

    def step(self, hidden: torch.Tensor, cache: dict) -> torch.Tensor:
        return self.down_proj(self._act(hidden))

    def empty_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        return {}


# ------------------------------------------------------------------------------------------- the layer kind "mlp"


def _mlp_layouts(c: ModelConfig) -> dict[str, Layout]:
    h = c.mlp_hidden
    return {
        "up_proj.weight": Layout(0, (h,)),
        "up_proj.bias": Layout(0, (h,)),
        "gate_proj.weight": Layout(0, (h,)),
        "gate_proj.bias": Layout(0, (h,)),
        "down_proj.weight": Layout(1, (h,)),
        "down_proj.bias": REPLICATED,
    }


def _mlp_params(c: ModelConfig) -> int:
    h, d = c.mlp_hidden, c.d_model
    ins = 2 if c.mlp.activation == "swiglu" else 1
    return ins * d * h + h * d + int(c.mlp.bias) * (ins * h + d)


def _mlp_tp_problem(c: ModelConfig, tp: int) -> str | None:
    if c.mlp_hidden % tp:
        return f"parallel.tp={tp} does not divide the MLP hidden width {c.mlp_hidden} (model.mlp.hidden)"
    return None


MLP_KIND = register(
    LayerKind(
        name="mlp",
        build=MLP,
        tp_layouts=_mlp_layouts,
        params=_mlp_params,
        mixing_flops=lambda c, seq_len: 0.0,  # all of it is matmuls with weights
        # The up (and gate) outputs and the activation fed to down_proj.
        activation_width=lambda c: (3 if c.mlp.activation == "swiglu" else 2) * c.mlp_hidden,
        tp_problem=_mlp_tp_problem,
        symbol="-",
    )
)
