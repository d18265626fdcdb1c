"""Attention layer of hybrid models: causal grouped-query attention with optional RoPE, over packed documents.

Shapes: hidden ``(batch, seqlen_local, d_model)``. Under tensor parallelism the query and KV heads are split over
ranks (q_proj, k_proj, v_proj column-parallel by heads, o_proj row-parallel), and under sequence parallelism the
column projections gather the sequence and o_proj reduce-scatters it, as for the Mamba mixers. No token attends
across a ``seq_idx`` document boundary. Generation keeps a KV cache beside the Mamba layers' states, through the same
``forward(cache=...)`` / ``step`` / ``empty_cache`` API.
"""

from __future__ import annotations

import torch
from torch import nn

from mambatron.config import ModelConfig
from mambatron.models.layers import LayerKind, register
from mambatron.models.mamba1 import init_linears
from mambatron.models.ops import get_op
from mambatron.parallel.layout import REPLICATED, Layout
from mambatron.parallel.projections import LocalProjections


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (rotate-half) of x (batch, heads, seqlen, head_dim) at ``positions`` (seqlen,),
    computed in fp32."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(0, half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]  # (seqlen, half)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half].float(), x[..., half : 2 * half].float()
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half :].float()], dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, proj: LocalProjections | None = None):
        super().__init__()
        proj = proj or LocalProjections()
        a = cfg.attention
        problem = _attention_tp_problem(cfg, proj.tp_size)
        if problem:
            raise ValueError(problem)
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim_value
        self.heads_local = a.num_heads // proj.tp_size
        self.kv_heads_local = a.num_kv_heads // proj.tp_size
        d, hd = cfg.d_model, self.head_dim
        self.q_proj = proj.column(d, a.num_heads * hd, bias=a.bias)
        self.k_proj = proj.column(d, a.num_kv_heads * hd, bias=a.bias)
        self.v_proj = proj.column(d, a.num_kv_heads * hd, bias=a.bias)
        self.o_proj = proj.row(a.num_heads * hd, d, bias=a.bias)
        self.cp = getattr(proj, "cp", None)  # context parallel (mambatron.parallel.context), None without

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Linears kaiming-uniform with zero biases; o_proj scaled by 1/sqrt(n_layer), like the mixers' out_proj."""
        init_linears((self.q_proj, self.k_proj, self.v_proj, self.o_proj), self.o_proj, self.cfg.n_layer, generator)

    def _qkv(self, hidden: torch.Tensor, start: int | None):
        """q (batch, heads, seqlen, head_dim), k, v (batch, kv_heads, seqlen, head_dim) for positions from start
        (None: this context-parallel slice's first position). The sequence is the projections' (gathered under
        sequence parallelism), not necessarily hidden's."""
        q = self.q_proj(hidden).unflatten(-1, (self.heads_local, self.head_dim)).transpose(1, 2)
        k = self.k_proj(hidden).unflatten(-1, (self.kv_heads_local, self.head_dim)).transpose(1, 2)
        v = self.v_proj(hidden).unflatten(-1, (self.kv_heads_local, self.head_dim)).transpose(1, 2)
        seqlen = q.shape[2]
        if start is None:
            start = self.cp.start(seqlen)
        theta = self.cfg.attention.rope_theta
        if theta is not None:
            positions = torch.arange(start, start + seqlen, device=hidden.device)
            q, k = rope(q, positions, theta), rope(k, positions, theta)
        return q, k, v

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None, cache: dict | None = None):
        """hidden: (batch, seqlen_local, d_model) → (batch, seqlen_local, d_model). ``cache`` (generation) is filled
        with the keys and values."""
        cp = self.cp
        if cp is None:
            q, k, v = self._qkv(hidden, 0)
        else:  # this slice's queries against the keys and values of every slice up to it
            q, k, v = self._qkv(hidden, None)
            k, v = cp.prefix(k, dim=2), cp.prefix(v, dim=2)
            seq_idx = cp.prefix(seq_idx, dim=1) if seq_idx is not None else None
        if cache is not None:
            cache["k"], cache["v"] = k, v
        attend = get_op("attention", self.cfg.kernels, q)
        out = attend(q, k, v, seq_idx=seq_idx)  # (batch, heads, seqlen, head_dim)
        batch, seqlen = out.shape[0], out.shape[2]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seqlen, self.heads_local * self.head_dim))

    def step(self, hidden: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token: hidden (batch, d_model) → (batch, d_model); appends its key and value to the cache."""
        q, k, v = self._qkv(hidden[:, None], cache["k"].shape[2])
        cache["k"] = torch.cat([cache["k"], k], dim=2)
        cache["v"] = torch.cat([cache["v"], v], dim=2)
        attend = get_op("attention", self.cfg.kernels, q)
        out = attend(q, cache["k"], cache["v"])  # (batch, heads, 1, head_dim)
        return self.o_proj(out.reshape(hidden.shape[0], self.heads_local * self.head_dim))

    def empty_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        empty = torch.zeros(batch, self.kv_heads_local, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone()}


# ----------------------------------------------------------------------------------------- the layer kind "attention"


def _attention_cp_exchange(c: ModelConfig, tp: int, seq_len: int, cp: int, act_b: int) -> int:
    # Every slice's keys and values (each rank keeps those up to its own).
    return seq_len * 2 * (c.attention.num_kv_heads // tp) * c.head_dim_value * act_b


def _attention_layouts(c: ModelConfig) -> dict[str, Layout]:
    hd, a = c.head_dim_value, c.attention
    q, kv = a.num_heads * hd, a.num_kv_heads * hd
    return {
        "q_proj.weight": Layout(0, (q,)),  # column-parallel by heads
        "q_proj.bias": Layout(0, (q,)),
        "k_proj.weight": Layout(0, (kv,)),
        "k_proj.bias": Layout(0, (kv,)),
        "v_proj.weight": Layout(0, (kv,)),
        "v_proj.bias": Layout(0, (kv,)),
        "o_proj.weight": Layout(1, (q,)),  # row-parallel
        "o_proj.bias": REPLICATED,
    }


def _attention_params(c: ModelConfig) -> int:
    hd, a, d = c.head_dim_value, c.attention, c.d_model
    q, kv = a.num_heads * hd, a.num_kv_heads * hd
    return d * (q + 2 * kv) + q * d + int(a.bias) * (q + 2 * kv + d)


def _attention_tp_problem(c: ModelConfig, tp: int) -> str | None:
    a = c.attention
    if a.num_heads % tp or a.num_kv_heads % tp:
        return (f"parallel.tp={tp} must divide model.attention.num_heads={a.num_heads} and num_kv_heads="
                f"{a.num_kv_heads} (attention is split over ranks by heads)")  # fmt: skip
    return None


def _attention_config_problem(c: ModelConfig) -> str | None:
    if c.attention.head_dim is None and c.d_model % c.attention.num_heads:
        return (f"model.attention.num_heads={c.attention.num_heads} does not divide model.d_model={c.d_model}; set "
                "model.attention.head_dim")  # fmt: skip
    if c.attention.rope_theta is not None and c.head_dim_value % 2:
        return f"RoPE needs an even head dim, got {c.head_dim_value}; set model.attention.head_dim or rope_theta: null"
    return None


ATTENTION = register(
    LayerKind(
        name="attention",
        build=Attention,
        tp_layouts=_attention_layouts,
        params=_attention_params,
        # q·kᵀ and p·v over the causal half of the sequence on average: 2 · 2 · heads · head_dim · seq_len / 2.
        mixing_flops=lambda c, seq_len: 2.0 * c.attention.num_heads * c.head_dim_value * seq_len,
        # q, k, v and the attention output (the softmax is recomputed by the fused kernels).
        activation_width=lambda c: (2 * c.attention.num_heads + 2 * c.attention.num_kv_heads) * c.head_dim_value,
        tp_problem=_attention_tp_problem,
        cp_exchange_bytes=_attention_cp_exchange,
        config_problem=_attention_config_problem,
        symbol="*",
    )
)
