"""Mixture-of-experts layer of hybrid models (``E`` in model.hybrid_pattern): MoE-Mamba, Jamba, Nemotron-H MoE.

A router scores every token against ``num_experts`` MLPs; each token goes to its ``top_k`` experts and their outputs
are summed, weighted by the router's probabilities; ``shared_experts`` MLPs of the same width see every token. The
routing is megatron-core's ``TopKRouter``'s, with the two Hugging Face targets' settings:

- ``router: softmax`` (Jamba): probabilities = softmax over all experts, the top_k kept as they are;
- ``router: sigmoid`` (Nemotron-H): scores = sigmoid, the top_k renormalised to sum to 1 (when top_k > 1).

Routing is dropless (``capacity_factor: null``), or in training each expert takes at most ``ceil(T · top_k /
num_experts · capacity_factor)`` of a micro-batch's T tokens, those routed to it with the highest probabilities
(megatron-core's drop policy "probs"); a dropped token loses that expert's share of its output. Evaluation and
generation are dropless, as the Hugging Face targets are. Load balancing uses the Switch
Transformer loss, ``aux_loss_coef · E / (top_k · T²) · Σ_e tokens_e · Σ_t score_te`` over the T tokens of the
micro-batch; as in megatron-core, its gradient is attached to the routing probabilities (:class:`AttachAuxLoss`, so
the language-model loss is unchanged and the trainer sets its scale), and its value
and each expert's share of the routed tokens are kept for the metrics (:func:`moe_stats`). An optional router z-loss
(``z_loss_coef``, ST-MoE's mean squared logsumexp of the logits) is attached to the logits the same way.

Under context parallelism each rank routes the tokens of its slice; only the losses span the whole sequence. The
z-loss is a mean over tokens, which the gradient average over data × context parallel ranks already makes whole.
The load-balancing loss is not a mean: each rank computes it with the tokens per expert of the whole sequence (summed
over the CP group, no gradient) and ``T`` its length, times the CP size (the gradient average divides by it), so the
averaged gradient is the whole sequence's; the metrics are reduced over the group the same way.

Under tensor parallelism the layer is replicated on every TP rank (no expert is split). Without sequence parallelism
every TP rank sees the same tokens and computes the same; with it each holds a block of the sequence, like a CP
slice, except that its parameters' gradients are summed over TP as they are produced (as the norms' are): so there
the load-balancing loss takes the whole sequence's counts and length without the TP factor, and the z-loss is
divided by the TP size.

The experts' weights are stacked: ``experts.fc1`` (experts, hidden or 2·hidden for SwiGLU as [gate; up], d_model)
and ``experts.fc2`` (experts, d_model, hidden). This module computes them on one process, one matmul per expert
over its tokens; expert parallelism (``parallel.ep``) runs the same ``Experts`` inside megatron-core's MoE layer
(see :mod:`mambatron.parallel.experts`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mambatron.config import ModelConfig
from mambatron.models.layers import LayerKind, register
from mambatron.models.ops import get_op
from mambatron.parallel.layout import REPLICATED, Layout


def _uniform_fan_in(w: torch.Tensor, fan_in: int, generator: torch.Generator | None) -> None:
    bound = 1 / math.sqrt(fan_in)
    w.uniform_(-bound, bound, generator=generator)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """relu2: relu(h)²; swiglu: silu(gate) · up with h = [gate | up] along the last dim."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return torch.square(F.relu(h))


class Experts(nn.Module):
    """``num_local`` expert MLPs as stacked weights; the interface of megatron-core's expert modules.

    ``forward(x (tokens, d_model) sorted by expert, tokens_per_expert (num_local,), probs (tokens,))`` returns
    (Σ-ready outputs (tokens, d_model), None): each expert's MLP of its tokens, its hidden activation scaled by the
    token's routing probability (megatron's ``per_token_scale``, equal to scaling the output: fc2 has no bias).
    """

    def __init__(self, num_local: int, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.num_local = num_local
        h, d = cfg.moe_hidden, cfg.d_model
        width = 2 * h if cfg.mlp.activation == "swiglu" else h
        self.fc1 = nn.Parameter(torch.empty(num_local, width, d))
        self.fc2 = nn.Parameter(torch.empty(num_local, d, h))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Each expert kaiming-uniform (fc1 then fc2, expert by expert); fc2 then scaled by 1/sqrt(n_layer), as every
        layer's output into the residual stream is."""
        for e in range(self.num_local):
            _uniform_fan_in(self.fc1[e], self.cfg.d_model, generator)
            _uniform_fan_in(self.fc2[e], self.cfg.moe_hidden, generator)
        self.fc2.div_(math.sqrt(self.cfg.n_layer))

    def forward(self, x: torch.Tensor, tokens_per_expert, probs: torch.Tensor):
        counts = [int(c) for c in tokens_per_expert]
        # Every expert's fc1 (then fc2) as one grouped GEMM (`model.kernels` chooses Triton or a matmul per expert).
        grouped_linear = get_op("grouped_linear", self.cfg.kernels, x)
        hidden = activate(grouped_linear(x, self.fc1, counts), self.cfg.mlp.activation)
        hidden = hidden * probs.unsqueeze(-1).to(hidden.dtype)
        return grouped_linear(hidden, self.fc2, counts), None


class SharedExperts(nn.Module):
    """The always-on experts: one MLP of width shared_experts × hidden (megatron's ``SharedExpertMLP`` names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.moe.shared_experts * cfg.moe_hidden
        width = 2 * h if cfg.mlp.activation == "swiglu" else h
        self.linear_fc1 = nn.Linear(cfg.d_model, width, bias=False)
        self.linear_fc2 = nn.Linear(h, cfg.d_model, bias=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        _uniform_fan_in(self.linear_fc1.weight, self.cfg.d_model, generator)
        _uniform_fan_in(self.linear_fc2.weight, self.linear_fc2.in_features, generator)
        self.linear_fc2.weight.div_(math.sqrt(self.cfg.n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(activate(self.linear_fc1(x), self.cfg.mlp.activation))


def route(
    logits: torch.Tensor, cfg: ModelConfig, expert_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, experts) logits (fp32 or wider) → (routing probabilities (tokens, experts), zero off the top_k;
    routing map). ``expert_bias`` (sigmoid router) is added to the scores for choosing the top_k only, as Nemotron-H's
    ``e_score_correction_bias``."""
    k = cfg.moe.top_k
    if cfg.moe.router == "softmax":
        top, idx = torch.topk(torch.softmax(logits, dim=-1), k, dim=1)
    else:
        scores = torch.sigmoid(logits)
        if expert_bias is None:
            top, idx = torch.topk(scores, k, dim=1)
        else:
            idx = torch.topk(scores + expert_bias.to(scores.dtype), k, dim=1).indices
            top = scores.gather(1, idx)
        if k > 1:
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
    probs = torch.zeros_like(logits).scatter(1, idx, top)
    routing_map = torch.zeros_like(logits, dtype=torch.int32).scatter(1, idx, 1).bool()
    return probs, routing_map


def drop_over_capacity(
    probs: torch.Tensor, routing_map: torch.Tensor, cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token dropping (``capacity_factor``): each expert keeps the ``ceil(tokens · top_k / num_experts ·
    capacity_factor)`` routed tokens with the highest probabilities (megatron-core's ``apply_router_token_dropping``,
    policy "probs", no padding); the others lose it (probability 0, not routed)."""
    tokens, experts = probs.shape
    capacity = math.ceil((tokens * cfg.moe.top_k / experts) * cfg.moe.capacity_factor)
    if capacity > tokens:
        return probs, routing_map
    kept = torch.topk(probs, k=capacity, dim=0, sorted=False).indices
    routing_map = routing_map & torch.zeros_like(routing_map).scatter(0, kept, True)
    return probs * routing_map, routing_map


def aux_loss_scores(logits: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores (tokens, experts) and routing map the load-balancing loss is computed from."""
    if cfg.moe.router == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    idx = torch.topk(scores, cfg.moe.top_k, dim=1).indices
    return scores, torch.zeros_like(logits, dtype=torch.int32).scatter(1, idx, 1).bool()


def z_loss(logits: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Router z-loss of one micro-batch, times z_loss_coef: the mean squared logsumexp of the logits (megatron's
    ``z_loss_func``), which keeps them small."""
    return torch.square(torch.logsumexp(logits, dim=-1)).mean() * cfg.moe.z_loss_coef


def load_balancing_loss(
    scores: torch.Tensor, routing_map: torch.Tensor, cfg: ModelConfig, per_expert=None, tokens: int | None = None
) -> torch.Tensor:
    """Switch-Transformer loss of one micro-batch, times aux_loss_coef (megatron's ``switch_load_balancing_loss``).
    When this rank holds only part of the micro-batch's tokens, ``per_expert`` and ``tokens`` are the whole
    micro-batch's routed tokens per expert and token count (default: this rank's)."""
    tokens = scores.shape[0] if tokens is None else tokens
    per_expert = routing_map.sum(dim=0) if per_expert is None else per_expert
    scale = cfg.moe.num_experts * cfg.moe.aux_loss_coef / (cfg.moe.top_k * tokens * tokens)
    return torch.sum(scores.sum(dim=0) * per_expert.to(scores.dtype)) * scale


class AttachAuxLoss(torch.autograd.Function):
    """Identity on ``probs`` whose backward also sends ``scale`` into the auxiliary loss, as megatron-core's
    ``MoEAuxLossAutoScaler`` does: the loss's gradient joins the backward pass without changing the language-model
    loss. ``scale`` is set by the trainer (1 / grad_accum: DeepSpeed divides the main loss by it)."""

    scale = 1.0

    @staticmethod
    def forward(ctx, probs: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, AttachAuxLoss.scale)


class MoEStats:
    """What a MoE layer saw since the metrics last read it: its load-balancing and z-loss values and the routed tokens
    per expert, summed over micro-batches. Kept as device tensors: nothing here waits for the GPU; :func:`moe_stats`
    reads them once per step."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        self.aux_losses: list[torch.Tensor] = []
        self.z_losses: list[torch.Tensor] = []
        self.tokens: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None  # (token, expert) pairs dropped over capacity

    @torch.no_grad()
    def record(
        self,
        counts: torch.Tensor,
        aux: torch.Tensor | None,
        z: torch.Tensor | None,
        dropped: torch.Tensor | None = None,
    ) -> None:
        """One micro-batch: its routed tokens per expert, its losses (each times its coefficient, or None) and, with a
        capacity, how many (token, expert) pairs it dropped."""
        if dropped is not None:
            self.dropped = dropped if self.dropped is None else self.dropped + dropped
        self.tokens = counts if self.tokens is None else self.tokens + counts
        if aux is not None:
            self.aux_losses.append(aux.detach() / self.cfg.moe.aux_loss_coef)
        if z is not None:
            self.z_losses.append(z.detach() / self.cfg.moe.z_loss_coef)


class SequenceSplit:
    """How a micro-batch's tokens are split over ranks for the router's losses: over the context-parallel group
    (``cp``, gradients averaged) and over the tensor-parallel group under sequence parallelism (``sp_group``,
    gradients summed). ``sum`` adds a tensor over both, without gradient."""

    def __init__(self, cp=None, sp_group=None):
        self.cp, self.sp_group = cp, sp_group
        self.cp_size = cp.size if cp is not None else 1
        self.sp_size = torch.distributed.get_world_size(sp_group) if sp_group is not None else 1
        self.size = self.cp_size * self.sp_size

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().clone()
        if self.sp_group is not None:
            torch.distributed.all_reduce(tensor, group=self.sp_group)
        return self.cp.sum(tensor) if self.cp is not None else tensor


def sequence_split(cp=None, sp_group=None) -> SequenceSplit | None:
    """How an E layer's tokens are split over ranks (context and/or sequence parallel), None when it sees them all."""
    return SequenceSplit(cp, sp_group) if cp is not None or sp_group is not None else None


@torch.no_grad()
def record_routing(layer: nn.Module, routed: torch.Tensor, kept: torch.Tensor, aux, z) -> None:
    """What an E layer (``cfg``, ``split``, ``stats``; the one-process or the expert-parallel one) keeps of one
    training micro-batch's routing: the metrics of the whole sequence (routed tokens per expert before any dropping,
    the losses, the pairs dropped over capacity; under CP, counts summed and the losses averaged over the group, each
    rank's aux share averaging to the whole loss as its gradient does) and, with bias balancing, the tokens each
    expert took (``step_tokens``, for :func:`update_expert_biases`)."""
    cfg, split = layer.cfg, layer.split
    counts = routed.sum(dim=0)
    dropped = (counts.sum() - kept.sum()).reshape(1) if cfg.moe.capacity_factor is not None else None
    if split is not None:  # each rank's shares add up to the whole over TP and average over CP
        packed = [counts.to(torch.float64)]
        packed += [t.detach().reshape(1).to(torch.float64) for t in (aux, z, dropped) if t is not None]
        total = split.sum(torch.cat(packed))
        rest = iter(total[counts.numel() :])
        counts = total[: counts.numel()].round().to(counts.dtype)
        aux = next(rest) / split.cp_size if aux is not None else None
        z = next(rest) / split.cp_size if z is not None else None
        dropped = next(rest).round() if dropped is not None else None
    layer.stats.record(counts, aux, z, dropped)
    if cfg.moe.bias_update_rate > 0:
        taken = kept.sum(dim=0)
        layer.step_tokens = taken if layer.step_tokens is None else layer.step_tokens + taken


def router_losses(
    logits: torch.Tensor, cfg: ModelConfig, split: SequenceSplit | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(load-balancing loss, z-loss) of one micro-batch's router logits, each None when its coefficient is 0; with the
    tokens split over ranks (``split``), this rank's shares (module docstring)."""
    aux = z = None
    if cfg.moe.aux_loss_coef > 0:
        scores, routing_map = aux_loss_scores(logits, cfg)
        if split is None:
            aux = load_balancing_loss(scores, routing_map, cfg)
        else:
            whole = load_balancing_loss(
                scores, routing_map, cfg, split.sum(routing_map.sum(dim=0)), scores.shape[0] * split.size
            )
            aux = whole * split.cp_size  # gradients are averaged over CP (and summed over TP)
    if cfg.moe.z_loss_coef > 0:
        z = z_loss(logits, cfg) / (split.sp_size if split is not None else 1)
    return aux, z


class MoE(nn.Module):
    """The E layer on one process (LocalProjections); see the module docstring."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, proj=None):
        super().__init__()
        cp = getattr(proj, "cp", None)
        sp_group = proj.tp_group if getattr(proj, "sequence_parallel", False) else None
        # Tokens split over ranks (context or sequence parallel): only the losses and metrics span the sequence.
        self.split = sequence_split(cp, sp_group)
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.router = nn.Linear(cfg.d_model, cfg.moe.num_experts, bias=False)
        self.experts = Experts(cfg.moe.num_experts, cfg)
        if cfg.moe.shared_experts:
            self.shared_experts = SharedExperts(cfg)
        self.stats = MoEStats(cfg)
        if cfg.moe.bias_update_rate > 0:  # auxiliary-loss-free balancing: state, not a parameter (no gradient)
            self.register_buffer("expert_bias", torch.zeros(cfg.moe.num_experts, dtype=torch.float32))
            self.step_tokens: torch.Tensor | None = None  # tokens per expert since the last update
        if sp_group is not None:  # replicated weights that see a block of the sequence: gradients summed over TP
            for param in self.parameters():
                proj.mark_sequence_parallel(param)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        self.router.weight.normal_(0.0, self.cfg.init_std, generator=generator)
        if self.cfg.moe.bias_update_rate > 0:
            self.expert_bias.zero_()
        self.experts.init_weights(generator)
        if self.cfg.moe.shared_experts:
            self.shared_experts.init_weights(generator)

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None, cache: dict | None = None):
        """hidden: (batch, seqlen, d_model) → (batch, seqlen, d_model); token-wise, so documents and the cache do not
        matter."""
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        # The router runs in fp32 at least (megatron-core's moe_router_dtype=fp32): bf16 scores would tie and flip.
        router_dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # autocast would run this matmul in bf16
            logits = F.linear(x.to(router_dtype), self.router.weight.to(router_dtype))
        aux, z = router_losses(logits, self.cfg, self.split) if self.training else (None, None)
        attach = self.training and torch.is_grad_enabled()
        if attach and z is not None:
            logits = AttachAuxLoss.apply(logits, z)
        probs, routing_map = route(logits, self.cfg, getattr(self, "expert_bias", None))
        if attach and aux is not None:
            probs = AttachAuxLoss.apply(probs, aux)
        routed = routing_map
        if self.training and self.cfg.moe.capacity_factor is not None:
            probs, routing_map = drop_over_capacity(probs, routing_map, self.cfg)
        if self.training:
            record_routing(self, routed, routing_map, aux, z)
        # Dropless dispatch: (token, expert) pairs sorted by expert, each expert's tokens one contiguous block.
        token_idx, expert_idx = routing_map.nonzero(as_tuple=True)
        order = torch.argsort(expert_idx, stable=True)
        token_idx, expert_idx = token_idx[order], expert_idx[order]
        tokens_per_expert = torch.bincount(expert_idx, minlength=self.cfg.moe.num_experts).tolist()
        out, _ = self.experts(x[token_idx], tokens_per_expert, probs[token_idx, expert_idx])
        y = torch.zeros_like(x, dtype=out.dtype).index_add_(0, token_idx, out)
        if self.cfg.moe.shared_experts:
            y = y + self.shared_experts(x)
        return y.to(hidden.dtype).reshape(shape)

    def step(self, hidden: torch.Tensor, cache: dict) -> torch.Tensor:
        return self.forward(hidden.unsqueeze(1)).squeeze(1)

    def empty_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        return {}


@torch.no_grad()
def update_expert_biases(model: nn.Module, group=None, skip: bool = False) -> None:
    """After an optimizer step: each balanced E layer moves its expert bias by ``bias_update_rate`` towards the even
    load, ``bias += rate · sign(mean count − count)`` over the tokens the step routed on every rank of ``group``
    (the data × context parallel ranks; megatron-core's ``get_updated_expert_bias``). Every rank then holds the same
    bias. ``skip``: the step was not taken, so its counts are dropped and the biases stay."""
    for layer in model.modules():  # the one-process and the expert-parallel layer
        if not hasattr(layer, "step_tokens") or layer.cfg.moe.bias_update_rate <= 0:
            continue
        counts = layer.step_tokens
        layer.step_tokens = None
        if skip:
            continue
        counts = torch.zeros_like(layer.expert_bias) if counts is None else counts.to(layer.expert_bias.dtype)
        if layer.split is not None and layer.split.sp_group is not None:  # sequence parallel: TP ranks' blocks
            torch.distributed.all_reduce(counts, group=layer.split.sp_group)
        if group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(counts, group=group)
        layer.expert_bias += torch.sign(counts.mean() - counts) * layer.cfg.moe.bias_update_rate


def moe_stats(model: nn.Module) -> dict[str, float]:
    """The MoE metrics since the last call, then reset: mean load-balancing loss and router z-loss (each without its
    coefficient) over the E layers, the smallest and largest share of routed tokens any expert of any E layer got
    (1 / num_experts each when balanced) and, with a capacity, the share of routed (token, expert) pairs dropped.
    Empty for a model without E layers."""
    layers = [m.stats for m in model.modules() if isinstance(getattr(m, "stats", None), MoEStats)]
    if not layers:
        return {}
    losses = [float(v) for s in layers for v in s.aux_losses]
    z_losses = [float(v) for s in layers for v in s.z_losses]
    shares = [s.tokens.double() / s.tokens.sum() for s in layers if s.tokens is not None and s.tokens.sum() > 0]
    out = {}
    if losses:
        out["moe_aux_loss"] = sum(losses) / len(losses)
    if z_losses:
        out["moe_z_loss"] = sum(z_losses) / len(z_losses)
    if shares:
        out["moe_load_min"] = min(float(sh.min()) for sh in shares)
        out["moe_load_max"] = max(float(sh.max()) for sh in shares)
    dropped = [(float(s.dropped.sum()), float(s.tokens.sum())) for s in layers if s.dropped is not None]
    if dropped:
        out["moe_dropped"] = sum(d for d, _ in dropped) / max(sum(t for _, t in dropped), 1.0)
    for s in layers:
        s.reset()
    return out


# ------------------------------------------------------------------------------------------- the layer kind "moe"


def _moe_layouts(c: ModelConfig) -> dict[str, Layout]:
    return {
        "router.weight": REPLICATED,
        "expert_bias": REPLICATED,
        "experts.fc1": REPLICATED,
        "experts.fc2": REPLICATED,
        "shared_experts.linear_fc1.weight": REPLICATED,
        "shared_experts.linear_fc2.weight": REPLICATED,
    }


def _expert_params(c: ModelConfig) -> int:
    ins = 2 if c.mlp.activation == "swiglu" else 1
    return (ins + 1) * c.d_model * c.moe_hidden


def moe_params(c: ModelConfig) -> int:
    """Every parameter of one E layer: the router, all experts and the shared ones."""
    return c.d_model * c.moe.num_experts + (c.moe.num_experts + c.moe.shared_experts) * _expert_params(c)


def moe_active_params(c: ModelConfig) -> int:
    """The parameters one token multiplies with: the router, its top_k experts and the shared ones."""
    return c.d_model * c.moe.num_experts + (c.moe.top_k + c.moe.shared_experts) * _expert_params(c)


def build_moe(cfg: ModelConfig, layer_idx: int, proj=None) -> nn.Module:
    """The E layer for this run: on one process (every expert here), or expert-parallel on megatron-core."""
    if getattr(proj, "ep_size", 1) > 1:
        from mambatron.parallel.experts import ExpertParallelMoE

        return ExpertParallelMoE(cfg, layer_idx, proj)
    return MoE(cfg, layer_idx, proj)


MOE_KIND = register(
    LayerKind(
        name="moe",
        build=build_moe,
        tp_layouts=_moe_layouts,
        params=moe_params,
        active_params=moe_active_params,
        expert_params=lambda c: c.moe.num_experts * _expert_params(c),
        # Dispatch and combine: each token's top_k copies of d_model values, all but 1/ep of them to other ranks.
        ep_exchange_bytes=lambda c, tokens, ep, act_b: 2 * tokens * c.moe.top_k * c.d_model * act_b * (ep - 1) // ep,
        mixing_flops=lambda c, seq_len: 0.0,  # all of it is matmuls with weights (counted on the active ones)
        # Per token: the routed copies of its input, their hidden activations and outputs, top_k times.
        activation_width=lambda c: (
            c.moe.top_k * (2 * c.d_model + (3 if c.mlp.activation == "swiglu" else 2) * c.moe_hidden)
        ),  # fmt: skip
        tp_problem=lambda c, tp: None,  # replicated over TP (module docstring)
        symbol="E",
    )
)
