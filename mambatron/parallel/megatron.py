"""Tensor- and sequence-parallel projections built on megatron-core (the ``Projections`` contract, TP > 1).

Models keep the (batch, seqlen, hidden) layout; megatron's sequence-parallel collectives work on dim 0, so under
sequence parallelism every layer here transposes to (seqlen, batch, hidden) around the megatron call and back. The
residual stream between layers is then (batch, seqlen / tp, d_model): a contiguous block of the sequence per rank.

Weights are created with megatron's CPU initialisation (a full master weight from the global torch RNG, then the
rank's slice). A TP=N model equal to a TP=1 one is obtained by loading shards of its full state dict
(:func:`mambatron.parallel.consolidate.shard`) or by :func:`mambatron.parallel.consolidate.init_weights_like_tp1`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn

from mambatron.parallel import cpu_shims
from mambatron.parallel.context import ContextParallel


def _to_megatron(x: torch.Tensor, sequence_parallel: bool) -> tuple[torch.Tensor, str]:
    """Lay ``x`` out for a megatron layer; returns the tensor and how to undo it (see :func:`_from_megatron`).

    Sequence-parallel collectives split and gather dim 0, so (batch, seqlen, hidden) becomes (seqlen, batch,
    hidden); without SP the layers are plain matmuls over the last dim and the batch-first tensor is passed as is.
    A single token (batch, hidden), as in recurrent generation, becomes (1, batch, hidden).
    """
    if x.dim() == 2:
        if sequence_parallel:
            raise ValueError("single-token (recurrent) steps need parallel.sequence_parallel=false")
        return x.unsqueeze(0), "token"
    if sequence_parallel:
        return x.transpose(0, 1).contiguous(), "seq_first"
    return x, "batch_first"


def _from_megatron(out: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "token":
        return out.squeeze(0)
    return out.transpose(0, 1) if layout == "seq_first" else out


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands a contiguous gradient on.

    megatron's in-place all-reduce (``_reduce``) reduces ``grad.contiguous()`` and returns the original tensor, so
    a non-contiguous gradient (e.g. arriving through our transposes) would silently skip the reduction.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _normal_init(std: float) -> Callable[[torch.Tensor], None]:
    def init(weight: torch.Tensor) -> None:
        nn.init.normal_(weight, mean=0.0, std=std)

    return init


def _drop_extra_state_hook(module: nn.Module) -> None:
    # megatron's layers add an ``_extra_state`` entry on load (and save) for Transformer Engine compatibility;
    # our state dicts hold exactly the parameter names, so strict loading must not see it.
    module._load_state_dict_pre_hooks.clear()


class TPColumnLinear(ColumnParallelLinear):
    """megatron-core ColumnParallelLinear on batch-first tensors.

    x: (batch, seqlen_local, in_features) — sequence-sharded under SP and all-gathered inside —
    → (batch, seqlen, out_features // tp).
    """

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _drop_extra_state_hook(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, layout = _to_megatron(x, self.sequence_parallel)
        out, _ = super().forward(x)
        return _from_megatron(out, layout)


class TPRowLinear(RowParallelLinear):
    """megatron-core RowParallelLinear (``input_is_parallel=True``) on batch-first tensors.

    x: (batch, seqlen, in_features // tp) → (batch, seqlen_local, out_features): summed over TP, reduce-scattered
    along the sequence under SP.

    With ``replicated_consumer=False`` (``scatter=False`` in the contract) the output is all-reduced and its
    gradient is summed over TP as well: Mamba1's x_proj output (Δ, B, C) is consumed by every rank's own channels,
    so each rank only holds part of its gradient.
    """

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, *args, replicated_consumer: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _drop_extra_state_hook(self)
        self.replicated_consumer = replicated_consumer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, layout = _to_megatron(x, self.sequence_parallel)
        out, _ = super().forward(x)
        if not self.replicated_consumer:
            out = tensor_parallel.copy_to_tensor_model_parallel_region(out, group=self.tp_group)
            out = _ContiguousGrad.apply(out)
        return _from_megatron(out, layout)


class TPEmbedding(VocabParallelEmbedding):
    """megatron-core VocabParallelEmbedding: ids (batch, seqlen) → (batch, seqlen_local, dim).

    The weight is the rank's vocab slice ``(vocab // tp, dim)``; under SP the summed lookup is reduce-scattered
    along the sequence.
    """

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _drop_extra_state_hook(self)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.reduce_scatter_embeddings and (input_ids.dim() != 2 or input_ids.shape[1] % self.tp_group.size()):
            raise ValueError(
                f"sequence parallelism needs input_ids (batch, seqlen) with seqlen divisible by tp="
                f"{self.tp_group.size()}, got shape {tuple(input_ids.shape)}"
            )
        out = super().forward(input_ids)
        # megatron returns (seqlen_local, batch, dim) when it reduce-scatters, else (batch, seqlen, dim).
        return out.transpose(0, 1) if self.reduce_scatter_embeddings else out


class MegatronProjections:
    """The projection factory at TP > 1 (see :mod:`mambatron.parallel.projections` for the contract).

    Requires megatron's parallel_state to be initialised (:func:`mambatron.parallel.dist.setup`).
    ``init_std`` is the std of the normal init of linear and embedding weights (models may re-initialise).
    """

    def __init__(
        self,
        sequence_parallel: bool = False,
        *,
        init_std: float = 0.02,
        params_dtype: torch.dtype = torch.float32,
        tp_group: dist.ProcessGroup | None = None,
        cp: ContextParallel | None = None,
        ep: int = 1,
    ) -> None:
        if cpu_shims.needed():
            cpu_shims.apply()
        self.cp = cp  # context parallel, for the layers that mix along the sequence (None: no CP)
        self.ep_size = ep  # expert parallel: MoE layers split their experts over each TP group (EP = TP)
        self.tp_group = tp_group or parallel_state.get_tensor_model_parallel_group()
        self.tp_size = dist.get_world_size(self.tp_group)
        self.tp_rank = dist.get_rank(self.tp_group)
        self.sequence_parallel = bool(sequence_parallel) and self.tp_size > 1
        self.init_std = init_std
        self.config = self._config(self.sequence_parallel, params_dtype)
        # x_proj-style row layers never reduce-scatter, whatever the SP setting.
        self._no_sp_config = self._config(False, params_dtype)

    def _config(self, sequence_parallel: bool, params_dtype: torch.dtype) -> ModelParallelConfig:
        return ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size,
            sequence_parallel=sequence_parallel,
            use_cpu_initialization=True,
            perform_initialization=True,
            params_dtype=params_dtype,
            gradient_accumulation_fusion=False,
        )

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return TPColumnLinear(
            in_features,
            out_features,
            config=self.config,
            init_method=_normal_init(self.init_std),
            bias=bias,
            gather_output=False,
            skip_bias_add=False,
            tp_group=self.tp_group,
        )

    def row(self, in_features: int, out_features: int, bias: bool = False, scatter: bool = True) -> nn.Module:
        layer = TPRowLinear(
            in_features,
            out_features,
            config=self.config if scatter else self._no_sp_config,
            init_method=_normal_init(self.init_std),
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=self.tp_group,
            replicated_consumer=scatter,
        )
        if bias and scatter and self.sequence_parallel:
            # The bias is added to the sequence-sharded output: each rank sees part of its gradient.
            self.mark_sequence_parallel(layer.bias)
        return layer

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return TPEmbedding(
            vocab_size,
            dim,
            init_method=_normal_init(self.init_std),
            reduce_scatter_embeddings=self.sequence_parallel,
            config=self.config,
            tp_group=self.tp_group,
        )

    def lm_head(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden: (batch, seqlen_local, dim); weight: the vocab slice (vocab // tp, dim) →
        vocab-local logits (batch, seqlen, vocab // tp). Column-parallel: SP all-gathers the sequence first."""
        hidden, layout = _to_megatron(hidden, self.sequence_parallel)
        out = tensor_parallel.linear_with_grad_accumulation_and_async_allreduce(
            input=hidden,
            weight=weight.to(hidden.dtype),
            bias=None,
            gradient_accumulation_fusion=False,
            allreduce_dgrad=self.tp_size > 1 and not self.sequence_parallel,
            sequence_parallel=self.sequence_parallel,
            tp_group=self.tp_group,
        )
        return _from_megatron(out, layout)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits: (batch, seqlen, vocab // tp); labels: (batch, seqlen), ``< 0`` ignored → loss (batch, seqlen)."""
        # megatron subtracts the max in place from an fp32 input (keep the caller's logits intact) and views it 2-D.
        logits = (
            logits.float().contiguous()
            if logits.dtype != torch.float32
            else logits.clone(memory_format=torch.contiguous_format)
        )
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.clamp_min(0).long())
        return loss * (labels >= 0)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen, vocab // tp) → (batch, seqlen, vocab)."""
        return tensor_parallel.gather_from_tensor_model_parallel_region(logits.contiguous(), group=self.tp_group)

    def mark_sequence_parallel(self, param: nn.Parameter) -> None:
        """Tag a parameter used on sequence-sharded activations and sum its gradient over TP as it is produced."""
        if not self.sequence_parallel:
            return
        param.sequence_parallel = True
        install_sequence_parallel_grad_hook(param, self.tp_group)

    def sum_grad_over_tp(self, param: nn.Parameter) -> None:
        """Sum ``param``'s gradient over TP as it is produced (a replicated weight whose gradient is partial)."""
        install_sequence_parallel_grad_hook(param, self.tp_group)


def install_sequence_parallel_grad_hook(param: nn.Parameter, tp_group: dist.ProcessGroup | None = None) -> None:
    """Sum ``param``'s gradient over the TP group as autograd produces it (idempotent).

    Each TP rank sees only its block of the sequence, so its gradient is partial. DeepSpeed's ZeRO reduces over
    data parallel only, so without this the replicas drift apart; a tensor hook runs before the gradient is
    accumulated into ``.grad`` and before any ZeRO reduction hook, and works for every stage.
    """
    if getattr(param, "_sp_grad_hook", False):
        return
    group = tp_group or parallel_state.get_tensor_model_parallel_group()

    def all_reduce_over_tp(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    param.register_hook(all_reduce_over_tp)
    param._sp_grad_hook = True


def install_sequence_parallel_grad_hooks(module: nn.Module, tp_group: dist.ProcessGroup | None = None) -> int:
    """Install :func:`install_sequence_parallel_grad_hook` on every parameter tagged ``sequence_parallel``.

    Returns how many parameters carry the hook.
    """
    count = 0
    for param in module.parameters():
        if getattr(param, "sequence_parallel", False):
            install_sequence_parallel_grad_hook(param, tp_group)
            count += 1
    return count
