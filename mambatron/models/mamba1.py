"""Mamba1 mixer: in_proj → causal depthwise conv1d → SiLU → x_proj → (Δ, B, C) → selective scan → gate → out_proj.

Shapes: hidden ``(batch, seqlen, d_model)``; inside, channels-first ``(batch, d_inner, seqlen)`` for the conv and
the scan. Under tensor parallelism ``d_inner`` is split: every per-channel parameter holds this rank's slice and the
projections come from the factory (``in_proj`` column-parallel with local output ``[x | z]``, ``x_proj``
row-parallel with an all-reduce of its small output, ``out_proj`` row-parallel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mambatron.config import ModelConfig
from mambatron.models.layers import HFMapping, LayerKind, register
from mambatron.models.ops import get_op
from mambatron.parallel.layout import REPLICATED, Layout
from mambatron.parallel.projections import LocalProjections, feature_major, foldable


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """softplus⁻¹(x) = x + log(-expm1(-x)), stable for small x."""
    return x + torch.log(-torch.expm1(-x))


def sample_dt(n: int, cfg: ModelConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial Δ values, log-uniform in [dt_min, dt_max], floored at dt_init_floor: shape (n,), on the generator's
    device (a CUDA generator cannot sample into a CPU tensor)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=_device_of(generator))
    dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
    return dt.clamp_min(cfg.dt_init_floor)


class Mamba1Mixer(nn.Module):
    # Its forward reads its sub-layers' weights directly (the fused op): ZeRO-3 must gather them around this module.
    reads_submodule_params = True

    def __init__(self, cfg: ModelConfig, layer_idx: int, proj: LocalProjections | None = None):
        super().__init__()
        proj = proj or LocalProjections()
        if cfg.d_inner % proj.tp_size:
            raise ValueError(f"tensor-parallel size {proj.tp_size} does not divide d_inner={cfg.d_inner}")
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.d_inner_local = cfg.d_inner // proj.tp_size
        n, r, di = cfg.d_state, cfg.dt_rank_value, self.d_inner_local
        self.in_proj = proj.column(cfg.d_model, 2 * cfg.d_inner, bias=cfg.bias)
        self.conv1d = nn.Conv1d(di, di, cfg.d_conv, groups=di, bias=cfg.conv_bias, padding=cfg.d_conv - 1)
        self.x_proj = proj.row(cfg.d_inner, r + 2 * n, bias=False, scatter=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.empty(di, n))
        self.D = nn.Parameter(torch.empty(di))
        self.out_proj = proj.row(cfg.d_inner, cfg.d_model, bias=cfg.bias)
        if cfg.mamba1_inner_norm_weights:  # Jamba's weighted RMSNorms of dt, B and C (names as Jamba's)
            self.dt_layernorm, self.b_layernorm, self.c_layernorm = _NormWeight(r), _NormWeight(n), _NormWeight(n)
            # They act on x_proj's all-reduced output, but each TP rank's gradient comes through its own channels.
            for norm in (self.dt_layernorm, self.b_layernorm, self.c_layernorm):
                proj.sum_grad_over_tp(norm.weight)
        # x_proj's output is summed over this group inside the fused op (None on one rank).
        self.tp_group = getattr(proj, "tp_group", None) if proj.tp_size > 1 else None
        self.cp = getattr(proj, "cp", None)  # context parallel (mambatron.parallel.context), None without
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._no_weight_decay = True

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Mamba-paper init: S4D-real A, Δ log-uniform through the inverse softplus, D = 1."""
        cfg = self.cfg
        n, di = cfg.d_state, self.d_inner_local
        init_projections_and_conv(self, (self.in_proj, self.x_proj, self.out_proj), generator)
        std = cfg.dt_rank_value**-0.5
        self.dt_proj.weight.uniform_(-std, std, generator=generator)
        self.dt_proj.bias.copy_(inverse_softplus(sample_dt(di, cfg, generator)))
        for norm in self._norm_weights() or ():
            norm.fill_(1.0)
        a = torch.arange(1, n + 1, dtype=torch.float32).repeat(di, 1)
        self.A_log.copy_(torch.log(a))
        self.D.fill_(1.0)

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None, cache: dict | None = None):
        """hidden: (batch, seqlen_local, d_model) → (batch, seqlen_local, d_model). ``cache`` (generation) is
        filled with the final conv window and SSM state."""
        cfg = self.cfg
        sdt = state_dtype(hidden.dtype)
        kernels = cfg.kernels
        A = -torch.exp(self.A_log.to(sdt))
        if cache is None and self.cp is None:
            # Training and scoring: conv → x_proj → dt_proj → scan → gate as one op on the in_proj output, computed
            # feature-major (W·xᵀ) so that every sequence the kernels read is contiguous without a copy.
            # A single-device out_proj runs inside the op too, on the time-contiguous scan output.
            xz = feature_major(self.in_proj, hidden)
            fold = foldable(self.out_proj)
            out_w, out_b = (self.out_proj.weight, self.out_proj.bias) if fold else (None, None)
            fused = get_op("mamba1_conv_scan", kernels, xz)
            y = fused(
                xz, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.dt_proj.bias.to(sdt), A, self.D.to(sdt), seq_idx=seq_idx, tp_group=self.tp_group,
                out_proj_weight=out_w, out_proj_bias=out_b, inner_norm_eps=self._inner_eps,
                inner_norm_weights=self._norm_weights(),
            )  # fmt: skip
            return y if fold else self.out_proj(y)
        # Op by op: prefill for generation (keeping the conv window and the final SSM state) and context parallelism
        # (a conv halo from the previous rank, the SSM state passed between ranks).
        cp = self.cp
        xz = self.in_proj(hidden)  # (batch, seqlen, 2 * d_inner_local)
        x, z = xz.chunk(2, dim=-1)
        x = x.transpose(1, 2).contiguous()  # (batch, d_inner, seqlen) for the conv
        # The scan reads time-contiguous (batch, d_inner, seqlen) rows: Δ is computed in that layout by the matmul
        # below; z, B and C are channel-last views of the projections' outputs that the scan stages with one copy.
        z = z.transpose(1, 2)
        if cache is not None:
            cache["conv"] = _last_window(x, cfg.d_conv)
        conv = get_op("conv1d", kernels, x)
        conv_w, conv_b = self.conv1d.weight.squeeze(1), self.conv1d.bias
        if cp is None:
            x = conv(x, conv_w, conv_b, seq_idx=seq_idx, activation="silu")
        else:
            x = cp.causal_conv(conv, x, conv_w, conv_b, seq_idx)
        x_dbl = self._normed(self.x_proj(x.transpose(1, 2)).transpose(1, 2)).transpose(1, 2)  # (batch, seqlen, k)
        dt, B, C = torch.split(x_dbl, [cfg.dt_rank_value, cfg.d_state, cfg.d_state], dim=-1)
        delta = torch.matmul(self.dt_proj.weight, dt.transpose(1, 2))  # (batch, d_inner, seqlen), time-contiguous
        scan = get_op("selective_scan", kernels, x)
        B, C, bias = B.transpose(1, 2), C.transpose(1, 2), self.dt_proj.bias.to(sdt)
        initial = None
        if cp is not None:
            # This slice from a zero state gives its final state; with the slice's total decay exp(A·ΣΔ), the ranks
            # compose the state that truly enters each slice, and the scan below starts from it.
            _, last = scan(x, delta, A, B, C, None, delta_bias=bias, delta_softplus=True, return_last_state=True,
                           seq_idx=seq_idx)  # fmt: skip
            log_decay = A * F.softplus(delta.to(sdt) + bias[:, None]).sum(-1, keepdim=True)  # (batch, d_inner, N)
            initial = cp.incoming_state(last, log_decay, seq_idx)
        out, last = scan(x, delta, A, B, C, self.D.to(sdt), z=z, delta_bias=bias, delta_softplus=True,
                         return_last_state=True, initial_state=initial, seq_idx=seq_idx)  # fmt: skip
        if cache is not None:
            cache["ssm"] = last
        return self.out_proj(out.transpose(1, 2))

    @property
    def _inner_eps(self) -> float | None:
        return self.cfg.mamba1_inner_norm_eps if self.cfg.mamba1_inner_norms else None

    def _norm_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if not self.cfg.mamba1_inner_norm_weights:
            return None
        return self.dt_layernorm.weight, self.b_layernorm.weight, self.c_layernorm.weight

    def _normed(self, x_dbl: torch.Tensor) -> torch.Tensor:
        """x_proj's output (batch, dt_rank + 2 * d_state, ...) with FalconMamba's norms of dt, B, C when enabled."""
        if self._inner_eps is None:
            return x_dbl
        # Imported here: the kernels package imports triton, which models leave to the first kernel call.
        from mambatron.kernels.mamba1.reference import inner_norms

        return inner_norms(x_dbl, self.cfg.dt_rank_value, self.cfg.d_state, self._inner_eps, self._norm_weights())

    def step(self, hidden: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token: hidden (batch, d_model) → (batch, d_model); O(1) state in ``cache`` (conv window, SSM)."""
        cfg = self.cfg
        sdt = state_dtype(hidden.dtype)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (batch, d_inner) each
        update = get_op("conv1d_update", cfg.kernels, x)
        x = update(x, cache["conv"], self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        x_dbl = self._normed(self.x_proj(x)[..., None])[..., 0]
        dt, B, C = torch.split(x_dbl, [cfg.dt_rank_value, cfg.d_state, cfg.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt).to(sdt))  # (batch, d_inner)
        A = -torch.exp(self.A_log.to(sdt))
        state = cache["ssm"]  # (batch, d_inner, d_state), fp32
        state.mul_(torch.exp(delta.unsqueeze(-1) * A)).add_(
            delta.unsqueeze(-1) * B.to(sdt).unsqueeze(1) * x.to(sdt).unsqueeze(-1)
        )
        y = torch.einsum("bdn,bn->bd", state, C.to(sdt)) + self.D.to(sdt) * x.to(sdt)
        y = (y * F.silu(z.to(sdt))).to(hidden.dtype)
        return self.out_proj(y)

    def empty_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        di = self.d_inner_local
        return {
            "conv": torch.zeros(batch, di, self.cfg.d_conv, device=device, dtype=dtype),
            "ssm": torch.zeros(batch, di, self.cfg.d_state, device=device, dtype=state_dtype(dtype)),
        }


class _NormWeight(nn.Module):
    """The per-channel weight of one of Jamba's dt/B/C RMSNorms (the norm itself runs inside the mixer's op)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.weight._no_weight_decay = True


@torch.no_grad()
def init_linears(linears, residual_out: nn.Module, n_layer: int, generator: torch.Generator | None) -> None:
    """The init every layer kind shares: linears kaiming-uniform with zero bias, and the one writing into the
    residual stream (``residual_out``, among ``linears``) scaled by 1/sqrt(n_layer), since the stream sums n_layer of
    them."""
    for lin in linears:
        _kaiming_uniform(lin.weight, generator)
        if getattr(lin, "bias", None) is not None:
            lin.bias.zero_()
    residual_out.weight.div_(math.sqrt(n_layer))


@torch.no_grad()
def init_projections_and_conv(mixer: nn.Module, linears, generator: torch.Generator | None) -> None:
    """The init both mixers share: linears kaiming-uniform with zero bias, out_proj scaled by 1/sqrt(n_layer)
    (the residual stream sums n_layer of them), depthwise conv as nn.Conv1d's default."""
    cfg = mixer.cfg
    init_linears(linears, mixer.out_proj, cfg.n_layer, generator)
    _kaiming_uniform(mixer.conv1d.weight, generator)
    if mixer.conv1d.bias is not None:
        bound = 1 / math.sqrt(cfg.d_conv)
        mixer.conv1d.bias.uniform_(-bound, bound, generator=generator)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent states are kept in fp32 (fp64 for fp64 models, used by exactness tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _last_window(x: torch.Tensor, width: int) -> torch.Tensor:
    """The last ``width`` inputs along the sequence, zero-padded on the left: (batch, dim, width)."""
    seqlen = x.shape[-1]
    if seqlen >= width:
        return x[..., seqlen - width :].clone()
    return F.pad(x, (width - seqlen, 0))


def _device_of(generator: torch.Generator | None) -> torch.device | None:
    return None if generator is None else generator.device


def _kaiming_uniform(w: torch.Tensor, generator: torch.Generator | None) -> None:
    """nn.Linear's default init (kaiming-uniform with a=sqrt(5)), reproducible through ``generator``."""
    fan_in = w[0].numel() if w.dim() > 1 else w.numel()
    bound = 1 / math.sqrt(fan_in)
    w.uniform_(-bound, bound, generator=generator)


# ------------------------------------------------------------------------------------------ the layer kind "mamba1"


def _mamba1_layouts(c: ModelConfig) -> dict[str, Layout]:
    di = c.d_inner
    return {
        "in_proj.weight": Layout(0, (di, di)),  # [x | z]
        "in_proj.bias": Layout(0, (di, di)),
        "conv1d.weight": Layout(0, (di,)),
        "conv1d.bias": Layout(0, (di,)),
        "x_proj.weight": Layout(1, (di,)),  # row-parallel: its [dt | B | C] output is all-reduced
        "x_proj.bias": REPLICATED,
        "dt_proj.weight": Layout(0, (di,)),
        "dt_proj.bias": Layout(0, (di,)),
        "A_log": Layout(0, (di,)),
        "D": Layout(0, (di,)),
        "out_proj.weight": Layout(1, (di,)),
        "out_proj.bias": REPLICATED,
        "dt_layernorm.weight": REPLICATED,
        "b_layernorm.weight": REPLICATED,
        "c_layernorm.weight": REPLICATED,
    }


def _mamba1_params(c: ModelConfig) -> int:
    d, di, r = c.d_model, c.d_inner, c.dt_rank_value
    bias = int(c.bias)
    return (
        d * 2 * di + di * (r + 2 * c.d_state) + r * di + di * d  # in_proj, x_proj, dt_proj, out_proj
        + bias * (2 * di + d)  # in_proj, out_proj biases
        + di * c.d_conv + int(c.conv_bias) * di  # depthwise conv1d
        + di  # dt_proj bias
        + di * c.d_state + di  # A_log, D
        + int(c.mamba1_inner_norm_weights) * (r + 2 * c.d_state)  # Jamba's dt/B/C norm weights
    )  # fmt: skip


def _mamba1_tp_problem(c: ModelConfig, tp: int) -> str | None:
    if c.d_inner % tp:
        return f"parallel.tp={tp} does not divide d_inner={c.d_inner} (model.expand*model.d_model); pick a tp that " \
            f"divides {c.d_inner}"  # fmt: skip
    return None


def _mamba1_cp_exchange(c: ModelConfig, tp: int, seq_len: int, cp: int, act_b: int) -> int:
    # Every rank's conv tail (d_conv - 1 steps of x) and its slice's final fp32 state and decay.
    di = c.d_inner // tp
    return cp * ((c.d_conv - 1) * di * act_b + 2 * di * c.d_state * 4)


def _mamba1_hf_config(c: ModelConfig) -> dict:
    return {"intermediate_size": c.d_inner}


def _mamba1_hf_fields(hf: dict) -> dict:
    return {"dt_rank": hf.get("time_step_rank", "auto"), "tie_embeddings": hf.get("tie_word_embeddings", True)}


MAMBA1 = register(
    LayerKind(
        name="mamba1",
        build=Mamba1Mixer,
        tp_layouts=_mamba1_layouts,
        params=_mamba1_params,
        # The selective scan: about 9 · d_inner · d_state per token (discretise, update, read out).
        mixing_flops=lambda c, seq_len: 9.0 * c.d_inner * c.d_state,
        # x and z (in_proj), the conv output, Δ, the scan output and the gate: ~7 d_inner-wide tensors per token.
        activation_width=lambda c: 7 * c.d_inner,
        tp_problem=_mamba1_tp_problem,
        cp_exchange_bytes=_mamba1_cp_exchange,
        symbol="M",
        hf=HFMapping("mamba", "MambaForCausalLM", _mamba1_hf_config, _mamba1_hf_fields),
    )
)
