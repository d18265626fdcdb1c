"""Mamba2 mixer: fused in_proj [z | xBC | dt] → causal conv over xBC → SSD → gated group-wise RMSNorm → out_proj.

Shapes: hidden ``(batch, seqlen, d_model)``; x ``(batch, seqlen, nheads, headdim)``; B, C ``(batch, seqlen,
ngroups, d_state)``; dt ``(batch, seqlen, nheads)``. Under tensor parallelism heads and groups are split; the local
in_proj output is ``[z_l | x_l | B_l | C_l | dt_l]`` and the gated norm is per group, so it stays local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambatron.config import ModelConfig, _positive
from mambatron.models.layers import HFMapping, LayerKind, register
from mambatron.models.mamba1 import (
    _device_of,
    _last_window,
    init_projections_and_conv,
    inverse_softplus,
    sample_dt,
    state_dtype,
)
from mambatron.models.ops import get_op
from mambatron.parallel.layout import REPLICATED, Layout
from mambatron.parallel.projections import LocalProjections, foldable


class Mamba2Mixer(nn.Module):
    # Its forward reads its sub-layers' weights directly (conv1d, the norm): ZeRO-3 must gather them around it.
    reads_submodule_params = True

    def __init__(self, cfg: ModelConfig, layer_idx: int, proj: LocalProjections | None = None):
        super().__init__()
        proj = proj or LocalProjections()
        tp = proj.tp_size
        if cfg.nheads % tp or cfg.ngroups % tp:
            raise ValueError(f"tensor-parallel size {tp} must divide nheads={cfg.nheads} and ngroups={cfg.ngroups}")
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.d_inner_local = cfg.d_inner // tp
        self.nheads_local = cfg.nheads // tp
        self.ngroups_local = cfg.ngroups // tp
        self.conv_dim = self.d_inner_local + 2 * self.ngroups_local * cfg.d_state
        in_features = 2 * cfg.d_inner + 2 * cfg.ngroups * cfg.d_state + cfg.nheads
        self.in_proj = proj.column(cfg.d_model, in_features, bias=cfg.bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=cfg.conv_bias, padding=cfg.d_conv - 1
        )
        self.dt_bias = nn.Parameter(torch.empty(self.nheads_local))
        self.A_log = nn.Parameter(torch.empty(self.nheads_local))
        self.D = nn.Parameter(torch.empty(self.nheads_local))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.empty(self.d_inner_local))
        self.out_proj = proj.row(cfg.d_inner, cfg.d_model, bias=cfg.bias)
        self.cp = getattr(proj, "cp", None)  # context parallel (mambatron.parallel.context), None without
        for p in (self.dt_bias, self.A_log, self.D, self.norm.weight):
            p._no_weight_decay = True

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Mamba2 init: A uniform in A_init_range (stored as log), Δ bias through the inverse softplus, D = 1."""
        cfg = self.cfg
        init_projections_and_conv(self, (self.in_proj, self.out_proj), generator)
        self.dt_bias.copy_(inverse_softplus(sample_dt(self.nheads_local, cfg, generator)))
        lo, hi = cfg.A_init_range
        A = torch.empty(self.nheads_local, device=_device_of(generator)).uniform_(lo, hi, generator=generator)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def _split_in(self, zxbcdt: torch.Tensor):
        di, gn = self.d_inner_local, self.ngroups_local * self.cfg.d_state
        return torch.split(zxbcdt, [di, di + 2 * gn, self.nheads_local], dim=-1)

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        norm = get_op("gated_rms_norm", self.cfg.kernels, y)
        group = self.d_inner_local // self.ngroups_local
        return norm(y, self.norm.weight, None, z=z, eps=self.cfg.norm_eps, group_size=group, norm_before_gate=False)

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None, cache: dict | None = None):
        """hidden: (batch, seqlen_local, d_model) → (batch, seqlen_local, d_model)."""
        cfg = self.cfg
        sdt = state_dtype(hidden.dtype)
        zxbcdt = self.in_proj(hidden)
        if cache is None and self.cp is None:
            # Training and scoring: conv → SSD → gated norm as one op that saves the in_proj output and recomputes
            # the conv in backward (kernels/mamba2); a single-device out_proj runs inside it too, so that the norm's
            # output is recomputed rather than kept for out_proj's backward.
            fold = foldable(self.out_proj)
            out_w, out_b = (self.out_proj.weight, self.out_proj.bias) if fold else (None, None)
            fused = get_op("mamba2_split_conv_scan", cfg.kernels, zxbcdt)
            y = fused(
                zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias.to(sdt),
                -torch.exp(self.A_log.to(sdt)), self.D.to(sdt), self.norm.weight, d_inner=self.d_inner_local,
                ngroups=self.ngroups_local, dstate=cfg.d_state, chunk_size=cfg.chunk_size,
                norm_group_size=self.d_inner_local // self.ngroups_local, eps=cfg.norm_eps, seq_idx=seq_idx,
                out_proj_weight=out_w, out_proj_bias=out_b, keep_states=cfg.ssd_keep_states,
            )  # fmt: skip
            return y if fold else self.out_proj(y)
        z, xbc, dt = self._split_in(zxbcdt)
        batch, seqlen, _ = xbc.shape
        # Op by op: prefill for generation (keeping the final conv window and SSM state) and context parallelism
        # (a conv halo from the previous rank, the SSM state passed between ranks). The conv reads the xBC columns
        # in place as a channel-last view; x, B, C and dt are views that SSD reads through strides.
        cp = self.cp
        xbc_t = xbc.transpose(1, 2)
        if cache is not None:
            cache["conv"] = _last_window(xbc_t, cfg.d_conv)
        conv = get_op("conv1d", cfg.kernels, xbc_t)
        conv_w, conv_b = self.conv1d.weight.squeeze(1), self.conv1d.bias
        if cp is None:
            xbc = conv(xbc_t, conv_w, conv_b, seq_idx=seq_idx, activation="silu").transpose(1, 2)
        else:
            xbc = cp.causal_conv(conv, xbc_t, conv_w, conv_b, seq_idx).transpose(1, 2)
        gn = self.ngroups_local * cfg.d_state
        x, B, C = torch.split(xbc, [self.d_inner_local, gn, gn], dim=-1)
        ssd = get_op("ssd", cfg.kernels, x)
        A, dt_bias = -torch.exp(self.A_log.to(sdt)), self.dt_bias.to(sdt)
        x = x.reshape(batch, seqlen, self.nheads_local, cfg.headdim)
        B = B.reshape(batch, seqlen, self.ngroups_local, cfg.d_state)
        C = C.reshape(batch, seqlen, self.ngroups_local, cfg.d_state)
        initial = None
        if cp is not None:
            # This slice from a zero state gives its final state; with the slice's total decay exp(A·ΣΔ) per head,
            # the ranks compose the state that truly enters each slice, and the scan below starts from it.
            _, last = ssd(x, dt, A, B, C, cfg.chunk_size, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True,
                          return_final_states=True)  # fmt: skip
            log_decay = (F.softplus(dt.to(sdt) + dt_bias) * A).sum(1)[:, :, None, None]  # (batch, nheads, 1, 1)
            initial = cp.incoming_state(last, log_decay, seq_idx)
        y, last = ssd(x, dt, A, B, C, cfg.chunk_size, D=self.D.to(sdt), dt_bias=dt_bias, initial_states=initial,
                      seq_idx=seq_idx, dt_softplus=True, return_final_states=True)  # fmt: skip
        if cache is not None:
            cache["ssm"] = last
        y = self._gated_norm(y.reshape(batch, seqlen, self.d_inner_local), z)
        return self.out_proj(y)

    def step(self, hidden: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token: hidden (batch, d_model) → (batch, d_model); O(1) state in ``cache``."""
        cfg = self.cfg
        sdt = state_dtype(hidden.dtype)
        h, p, g, n = self.nheads_local, cfg.headdim, self.ngroups_local, cfg.d_state
        z, xbc, dt = self._split_in(self.in_proj(hidden))
        update = get_op("conv1d_update", cfg.kernels, xbc)
        xbc = update(xbc, cache["conv"], self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        x, B, C = torch.split(xbc, [self.d_inner_local, g * n, g * n], dim=-1)
        batch = x.shape[0]
        x = x.to(sdt).view(batch, h, p)
        B = B.to(sdt).view(batch, g, 1, n).expand(batch, g, h // g, n).reshape(batch, h, n)
        C = C.to(sdt).view(batch, g, 1, n).expand(batch, g, h // g, n).reshape(batch, h, n)
        dt = F.softplus(dt.to(sdt) + self.dt_bias.to(sdt))  # (batch, nheads)
        dA = torch.exp(dt * -torch.exp(self.A_log.to(sdt)))
        state = cache["ssm"]  # (batch, nheads, headdim, d_state), fp32
        state.mul_(dA[..., None, None]).add_((dt[..., None] * x)[..., None] * B[:, :, None, :])
        y = torch.einsum("bhpn,bhn->bhp", state, C) + self.D.to(sdt)[:, None] * x
        y = y.reshape(batch, self.d_inner_local).to(hidden.dtype)
        return self.out_proj(self._gated_norm(y, z))

    def empty_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        cfg = self.cfg
        return {
            "conv": torch.zeros(batch, self.conv_dim, cfg.d_conv, device=device, dtype=dtype),
            "ssm": torch.zeros(
                batch, self.nheads_local, cfg.headdim, cfg.d_state, device=device, dtype=state_dtype(dtype)
            ),
        }


# ------------------------------------------------------------------------------------------ the layer kind "mamba2"


def _mamba2_layouts(c: ModelConfig) -> dict[str, Layout]:
    di, gn, h = c.d_inner, c.ngroups * c.d_state, c.nheads
    return {
        "in_proj.weight": Layout(0, (di, di, gn, gn, h)),  # [z | x | B | C | dt]
        "in_proj.bias": Layout(0, (di, di, gn, gn, h)),
        "conv1d.weight": Layout(0, (di, gn, gn)),  # over [x | B | C]
        "conv1d.bias": Layout(0, (di, gn, gn)),
        "dt_bias": Layout(0, (h,)),
        "A_log": Layout(0, (h,)),
        "D": Layout(0, (h,)),
        "norm.weight": Layout(0, (di,)),  # the gated norm is per group, so it stays local
        "out_proj.weight": Layout(1, (di,)),
        "out_proj.bias": REPLICATED,
    }


def _mamba2_params(c: ModelConfig) -> int:
    d, di, n, g, h = c.d_model, c.d_inner, c.d_state, c.ngroups, c.nheads
    conv_dim = di + 2 * g * n
    in_out = 2 * di + 2 * g * n + h
    return (
        d * in_out + int(c.bias) * in_out  # in_proj [z | x | B | C | dt]
        + conv_dim * c.d_conv + int(c.conv_bias) * conv_dim  # conv1d over xBC
        + 3 * h  # dt_bias, A_log, D
        + di  # gated RMSNorm
        + di * d + int(c.bias) * d  # out_proj
    )  # fmt: skip


def _mamba2_flops(c: ModelConfig, seq_len: int) -> float:
    # SSD: the intra-chunk quadratic term 2 · chunk · d_inner plus the state work, per token.
    return 2.0 * min(c.chunk_size, seq_len) * c.d_inner + 6.0 * c.d_inner * c.d_state


def _mamba2_cp_exchange(c: ModelConfig, tp: int, seq_len: int, cp: int, act_b: int) -> int:
    # Every rank's conv tail (d_conv - 1 steps of xBC), its slice's final fp32 state and one decay per head.
    conv_dim = (c.d_inner + 2 * c.ngroups * c.d_state) // tp
    return cp * ((c.d_conv - 1) * conv_dim * act_b + (c.nheads // tp) * (c.headdim * c.d_state + 1) * 4)


def _mamba2_tp_problem(c: ModelConfig, tp: int) -> str | None:
    if c.nheads % tp:
        return f"parallel.tp={tp} does not divide nheads={c.nheads} (d_inner / model.headdim); pick a tp that " \
            f"divides {c.nheads}"  # fmt: skip
    if c.ngroups % tp:
        return f"parallel.tp={tp} does not divide model.ngroups={c.ngroups}; set model.ngroups to a multiple of " \
            f"{tp} or pick a tp that divides {c.ngroups}"  # fmt: skip
    return None


def _mamba2_config_problem(c: ModelConfig) -> str | None:
    _positive(c, "headdim", "ngroups", "chunk_size")  # raises the config's own error for a non-positive size
    if c.d_inner % c.headdim:
        return f"model.headdim={c.headdim} does not divide d_inner={c.d_inner} (expand*d_model); pick a headdim " \
            f"that divides {c.d_inner}"  # fmt: skip
    if c.nheads % c.ngroups:
        return f"model.ngroups={c.ngroups} does not divide nheads={c.nheads}; pick a divisor of {c.nheads}"
    lo, hi = c.A_init_range
    if not 0 < lo <= hi:
        return f"model.A_init_range={c.A_init_range}: need 0 < low <= high"
    return None


def _mamba2_hf_config(c: ModelConfig) -> dict:
    return {
        "num_heads": c.nheads,
        "head_dim": c.headdim,
        "n_groups": c.ngroups,
        "chunk_size": c.chunk_size,
        "time_step_limit": [0.0, float("inf")],
    }


def _mamba2_hf_fields(hf: dict) -> dict:
    limit = hf.get("time_step_limit", [0.0, float("inf")])
    as_float = lambda v: float(v["__float__"]) if isinstance(v, dict) else float(v)  # transformers' JSON for inf
    if tuple(as_float(v) for v in limit) != (0.0, float("inf")):
        raise ValueError(f"time_step_limit={limit} is not supported yet; only (0.0, inf) imports exactly")
    if hf["hidden_size"] * hf.get("expand", 2) != hf["num_heads"] * hf["head_dim"]:
        raise ValueError(f"HF config: hidden_size*expand must equal num_heads*head_dim ({hf['num_heads']} heads)")
    return {
        "headdim": hf["head_dim"],
        "ngroups": hf.get("n_groups", 1),
        "chunk_size": hf.get("chunk_size", 256),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
    }


MAMBA2 = register(
    LayerKind(
        name="mamba2",
        build=Mamba2Mixer,
        tp_layouts=_mamba2_layouts,
        params=_mamba2_params,
        mixing_flops=_mamba2_flops,
        # Mamba1's ~7 d_inner-wide tensors, plus B and C (twice: in_proj output and conv output) and dt.
        activation_width=lambda c: 7 * c.d_inner + 2 * c.ngroups * c.d_state * 2 + c.nheads,
        tp_problem=_mamba2_tp_problem,
        cp_exchange_bytes=_mamba2_cp_exchange,
        symbol="M",
        config_problem=_mamba2_config_problem,
        hf=HFMapping("mamba2", "Mamba2ForCausalLM", _mamba2_hf_config, _mamba2_hf_fields),
    )
)
