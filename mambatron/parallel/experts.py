"""Expert parallelism on megatron-core: the E layer as megatron-core's ``MoELayer`` (its ``TopKRouter`` and its
all-to-all token dispatcher) around our :class:`~mambatron.models.moe.Experts`.

With ``parallel.ep`` = N each rank of an expert-parallel group (N consecutive ranks, megatron-core's
``expert_model_parallel`` group: data-parallel ranks at TP 1, the TP group itself when EP = TP under sequence
parallelism) holds num_experts / N experts. A rank routes its own tokens, sends each to the rank
holding its expert (all-to-all), computes its experts on what it received, and sends the results back; in backward
the same exchange runs in reverse, so an expert's gradient sums the contributions of every rank's tokens.

The layer has the parameter names of the one-process :class:`~mambatron.models.moe.MoE` (``router.weight``,
``experts.fc1`` / ``experts.fc2`` holding this rank's slice of the experts, ``shared_experts.linear_fc1/2.weight``)
and the same math: megatron-core's router is configured as ours (fp32, pre-softmax top-k for ``softmax``,
renormalised sigmoid top-k, the Switch loss attached to the probabilities), and :func:`init_weights` draws the same
numbers from the same generator as the one-process layer and keeps this rank's experts. Under EP = TP each rank
routes its block of the sequence; the router and the shared experts are replicated (whole linears) and their
gradients summed over TP by sequence-parallel hooks, as the one-process layer's are under sequence parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from mambatron.config import ModelConfig
from mambatron.models.moe import (
    AttachAuxLoss,
    Experts,
    MoE,
    MoEStats,
    record_routing,
    route,
    router_losses,
    sequence_split,
)  # fmt: skip
from mambatron.parallel import cpu_shims

# megatron-core refers to Transformer Engine's router GEMM by a name that exists only when TE is installed.
if not hasattr(moe_utils, "te_general_gemm"):
    moe_utils.te_general_gemm = None


class _MegatronExperts(Experts):
    """:class:`Experts` built the way megatron-core's MoELayer builds its expert module."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection=None, model_cfg=None):
        super().__init__(num_local_experts, model_cfg)


class _ReplicatedLinear(torch.nn.Module):
    """A shared expert's linear as megatron-core's MLP calls its TP linears, ``(out, bias) = layer(x)``, but whole on
    every rank: under EP = TP the layer keeps the one-process layer's replicated shared experts (and names)."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, **kwargs):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor):
        return F.linear(x, self.weight), None


def _transformer_config(
    cfg: ModelConfig, ep: int, tp: int = 1, sequence_parallel: bool = False, cp: int = 1
) -> TransformerConfig:  # fmt: skip
    m = cfg.moe
    swiglu = cfg.mlp.activation == "swiglu"
    return TransformerConfig(
        num_layers=cfg.n_layer,
        hidden_size=cfg.d_model,
        num_attention_heads=tp,  # unused (the layer is only the MoE); megatron-core wants a multiple of TP
        ffn_hidden_size=cfg.moe_hidden,
        num_moe_experts=m.num_experts,
        moe_ffn_hidden_size=cfg.moe_hidden,
        moe_router_topk=m.top_k,
        moe_router_score_function=m.router,
        moe_router_pre_softmax=m.router == "softmax",  # Jamba: softmax over all experts, top-k not renormalised
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if m.aux_loss_coef > 0 else "none",
        moe_aux_loss_coeff=m.aux_loss_coef,
        moe_z_loss_coeff=m.z_loss_coef or None,
        moe_expert_capacity_factor=m.capacity_factor,  # training only: forward() clears it in evaluation
        moe_token_drop_policy="probs",
        moe_pad_expert_input_to_capacity=False,
        moe_token_dispatcher_type="alltoall",
        moe_permute_fusion=False,
        moe_shared_expert_intermediate_size=m.shared_experts * cfg.moe_hidden if m.shared_experts else None,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1,
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else (lambda h: torch.square(F.relu(h))),
        add_bias_linear=False,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        perform_initialization=False,  # init_weights draws every weight
    )


_AUX_SCALE_SET: list = [None]  # (scale, device) last handed to megatron-core, so that no step reads it back


def _sync_aux_loss_scale(device: torch.device, cp: int = 1) -> None:
    """megatron-core's router scales its auxiliary losses' gradient by its own class-level factor; keep it equal to
    the one-process layer's (``AttachAuxLoss.scale``, 1 / grad_accum in training), so both train alike. Under context
    parallelism it is ``cp`` times that: megatron-core's load-balancing loss is each rank's share of the whole
    sequence's and its z-loss is divided by the CP size, where ours are ``cp`` times those (our gradients are
    averaged over CP, megatron's summed)."""
    scale = AttachAuxLoss.scale * cp
    if _AUX_SCALE_SET[0] != (scale, device):
        moe_utils.MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(scale, device=device))
        _AUX_SCALE_SET[0] = (scale, device)


class ExpertParallelMoE(MoELayer):
    """The E layer under ``parallel.ep`` > 1 (see the module docstring); ``forward(hidden (batch, seqlen, d_model))``
    as the one-process layer's."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, proj=None):
        cpu_shims.apply_moe()
        ep = parallel_state.get_expert_model_parallel_world_size()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        sequence_parallel = bool(getattr(proj, "sequence_parallel", False))
        cp = getattr(proj, "cp", None)  # context parallel: each rank routes its slice of the sequence
        cp_size = cp.size if cp is not None else 1
        shared = None
        if cfg.moe.shared_experts:
            linear = (ColumnParallelLinear, RowParallelLinear) if tp == 1 else (_ReplicatedLinear, _ReplicatedLinear)
            mlp = MLPSubmodules(linear_fc1=linear[0], linear_fc2=linear[1])
            shared = ModuleSpec(module=SharedExpertMLP, submodules=mlp)
        experts = ModuleSpec(module=_MegatronExperts, params={"model_cfg": cfg})
        super().__init__(_transformer_config(cfg, ep, tp, sequence_parallel, cp_size),
                         MoESubmodules(experts=experts, shared_experts=shared), layer_number=layer_idx + 1)  # fmt: skip
        self.cfg = cfg
        self.cp_size = cp_size
        self.layer_idx = layer_idx
        self.first_expert = self.local_expert_indices[0]
        self.stats = MoEStats(cfg)
        self.split = sequence_split(cp, proj.tp_group if sequence_parallel else None)
        if cfg.moe.bias_update_rate > 0:  # auxiliary-loss-free balancing, as the one-process layer's (same name)
            self.register_buffer("expert_bias", torch.zeros(cfg.moe.num_experts, dtype=torch.float32))
            self.step_tokens: torch.Tensor | None = None
        self.router.register_forward_hook(self._record)
        if sequence_parallel:  # replicated weights that see a block of the sequence: gradients summed over TP
            for name, param in self.named_parameters():
                if not name.startswith("experts."):
                    proj.mark_sequence_parallel(param)

    def _record(self, router, args, out) -> None:
        """The metrics of the one-process layer; megatron's router keeps its logits to itself, so they are
        recomputed (one small matmul)."""
        if self.training:
            x = args[0].reshape(-1, self.cfg.d_model)
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x.float(), router.weight.float())
                _, routed = route(logits, self.cfg, getattr(self, "expert_bias", None))  # out[1]: after dropping
                # Under sequence parallelism each TP rank holds a block of the sequence: the metrics add up the
                # group's shares, as the one-process layer's do.
                record_routing(self, routed, out[1], *router_losses(logits, self.cfg, self.split))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The one-process layer's initial values: one is initialised with ``generator`` (every expert, briefly)
        and this rank keeps its router, its share of the experts and the shared ones."""
        with torch.device(self.router.weight.device):
            full = MoE(self.cfg, self.layer_idx)
        full.init_weights(generator)
        experts = slice(self.first_expert, self.first_expert + self.num_local_experts)
        state = full.state_dict()
        if self.cfg.moe.bias_update_rate > 0:
            self.expert_bias.zero_()
        for name, param in self.named_parameters():
            value = state[name]
            param.copy_(value[experts] if name.startswith("experts.") else value)

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None, cache: dict | None = None):
        shape = hidden.shape
        _sync_aux_loss_scale(hidden.device, self.cp_size)
        # Tokens are dropped over capacity in training only (the router and dispatcher read this per call).
        self.router.config.moe_expert_capacity_factor = self.cfg.moe.capacity_factor if self.training else None
        # megatron-core's routing adds its router's expert_bias (when not None) to the sigmoid scores for the top-k
        # choice, as ours does; it is this layer's buffer, handed over per call (``.to()`` replaces buffers), while
        # megatron's own bias bookkeeping stays off (its counts and updates are update_expert_biases').
        self.router.expert_bias = getattr(self, "expert_bias", None)
        # Token-wise: megatron's (seqlen, batch, d_model) layout is any (tokens, 1, d_model).
        out, _ = super().forward(hidden.reshape(-1, 1, shape[-1]))
        return out.reshape(shape)

    def step(self, hidden: torch.Tensor, cache: dict) -> torch.Tensor:
        return self.forward(hidden.unsqueeze(1)).squeeze(1)

    def empty_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        return {}
