"""DeepSpeed ZeRO (stages 0-3) over the data-parallel group, composed with megatron-core tensor parallelism.

The DeepSpeed JSON is generated from the run's YAML config (:func:`deepspeed_config`); ``parallel.deepspeed_extra``
(a mapping, when the config has it) is merged on top for knobs we do not model. The optimizer is torch's AdamW (its
state resumes bit-exactly; DeepSpeed's fused CPU Adam does not in fp32) with weight decay only on matrices. There
is no DeepSpeed scheduler: the trainer writes ``param_group["lr"]`` itself each step.

Tensor parallelism reaches DeepSpeed through :class:`MegatronMPU`. Two things DeepSpeed relies on but cannot know:

- which parameters are TP-partitioned (for the global gradient norm, so a replicated parameter counts once and a
  sharded one on every rank): :func:`mark_tensor_parallel_params` tags them from the layouts in
  :mod:`.consolidate`;
- that gradients of parameters used in sequence-parallel regions are partial per TP rank: hooks from
  :mod:`.megatron` sum them over TP (DeepSpeed only reduces over data parallel).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mambatron.config import Config, ConfigError, ModelConfig
from mambatron.parallel.consolidate import is_expert_param, param_layout
from mambatron.parallel.dist import DistInfo


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface over megatron-core's parallel_state (model parallel = tensor parallel).

    DeepSpeed's "data parallel" is every replica of the model: the data-parallel ranks and, within each, the
    context-parallel ranks (which hold the same weights and see different slices of the same sequences), so the
    gradient average and the ZeRO partitions span data × context parallel.
    """

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self._ps = parallel_state

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())


class ExpertParallelMPU(MegatronMPU):
    """DeepSpeed's view of a run with ``parallel.ep`` > 1 over data- and context-parallel ranks (TP = 1; under
    EP = TP the plain :class:`MegatronMPU` is right, see :func:`build_engine`).

    The ranks of one expert-parallel group hold different experts: to DeepSpeed they are model parallel (its
    checkpoint files are per EP rank, its gradient norm sums the experts over them). The ranks that hold the same
    experts (megatron-core's expert-data-parallel group) are its data parallel: ZeRO partitions and averages over
    them. What DeepSpeed cannot know, :func:`install_expert_parallel_grad_hooks` supplies: the weights outside the
    experts are replicated over the EP group but see different tokens on each rank, so their gradients are averaged
    over it first.
    """

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_expert_model_parallel_world_size()

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_expert_model_parallel_rank()

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._ps.get_expert_model_parallel_group()

    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_process_group_ranks(self.get_model_parallel_group())[0]

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_expert_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_expert_data_parallel_rank()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._ps.get_expert_data_parallel_group()


def install_expert_parallel_grad_hooks(model: nn.Module, ep_group: dist.ProcessGroup) -> tuple[int, int]:
    """Gradient hooks that make DeepSpeed's average over the expert-data-parallel ranks the average over every
    data-parallel rank. An expert's gradient already sums what every rank of the EP group's tokens contributed
    (through the all-to-all), so it is divided by the EP size; every other gradient is averaged over the EP group.
    Experts are tagged ``tensor_model_parallel`` so that the clipping norm counts each on its own rank, everything
    else untagged so that it counts once. Tensor hooks run before the gradient is accumulated and before any ZeRO
    hook. Returns (expert, other) parameter counts."""
    ep = dist.get_world_size(ep_group)
    counts = [0, 0]
    for name, param in model.named_parameters():
        if not param.requires_grad or getattr(param, "_ep_grad_hook", False):
            continue
        # Counted by DeepSpeed's clipping norm on every EP rank (experts) or once (the rest; megatron-core's layers
        # tag their weights tensor-parallel even at TP = 1, which would count the shared experts once per EP rank).
        param.tensor_model_parallel = is_expert_param(name)
        if is_expert_param(name):
            param.partition_dim = 0
            param.partition_stride = 1
            param.register_hook(lambda grad: grad * (1.0 / ep))
            counts[0] += 1
        else:

            def average_over_ep(grad: torch.Tensor) -> torch.Tensor:
                total = grad.float()  # summed in fp32 (a copy either way), as DeepSpeed reduces bf16 gradients
                if total is grad:
                    total = grad.clone()
                dist.all_reduce(total, group=ep_group)
                return total.mul_(1.0 / ep).to(grad.dtype)

            param.register_hook(average_over_ep)
            counts[1] += 1
        param._ep_grad_hook = True
    return counts[0], counts[1]


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights, biases, A_log, D and dt_bias (everything below 2-D, or tagged ``_no_weight_decay``)."""
    return param.dim() < 2 or getattr(param, "_no_weight_decay", False) or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay on ≥2-D weights only. Empty groups are dropped."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """torch AdamW over :func:`param_groups` with the run's lr, betas, eps and weight decay."""
    o = config.optim
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
    )


def mark_tensor_parallel_params(model: nn.Module, model_cfg: ModelConfig) -> int:
    """Tag every TP-partitioned parameter ``tensor_model_parallel=True`` (with its ``partition_dim``), so
    DeepSpeed's global gradient norm sums it on every TP rank and replicated ones once. Returns how many."""
    count = 0
    for name, param in model.named_parameters():
        layout = param_layout(name, model_cfg)
        if layout.replicated:
            continue
        param.tensor_model_parallel = True
        param.partition_dim = layout.dim
        param.partition_stride = 1
        count += 1
    return count


def deepspeed_config(config: Config, dist_info: DistInfo, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, generated from the YAML config; ``extra`` (default
    ``parallel.deepspeed_extra``) is deep-merged on top."""
    p, t = config.parallel, config.train
    if p.zero_stage == 0 and t.precision == "bf16" and (dist_info.tp_size > 1 or p.ep > 1):
        # Without ZeRO, DeepSpeed's bf16 optimizer tests is_model_parallel_parameter on the gradients (which carry
        # no tensor_model_parallel tag), so TP (or EP) ranks > 0 leave out their shards: the clipping norm is too
        # small.
        layout = f"parallel.tp={dist_info.tp_size}" if dist_info.tp_size > 1 else f"parallel.ep={p.ep}"
        raise ConfigError(
            f"parallel.zero_stage=0 with train.precision=bf16 and {layout} clips by a wrong gradient norm in "
            "DeepSpeed; set parallel.zero_stage to 1 or more (or train.precision=fp32)"
        )
    on_gpu = dist_info.device.type == "cuda"
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage > 0:
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu, reduce_scatter=True)
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.data.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        # DeepSpeed counts every model replica (data × context parallel); the CP ranks of one data-parallel rank
        # hold slices of the same sequences, so the tokens of a step are those of dp_size replicas. Under EP over
        # data-parallel ranks its data parallel is the expert-data-parallel group (ExpertParallelMPU): dp_size / ep
        # replicas; under EP = TP it is the data-parallel group itself.
        "train_batch_size": config.data.micro_batch
        * t.grad_accum
        * dist_info.dp_size
        * dist_info.cp_size
        // (p.ep if dist_info.tp_size == 1 else 1),
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": False},
        # torch AdamW is deliberate (exact resume); DeepSpeed would otherwise insist on its own optimizers.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    extra = p.deepspeed_extra if extra is None else extra
    if extra:
        ds = _deep_merge(ds, extra)
    return ds


def build_engine(
    model: nn.Module,
    config: Config,
    dist_info: DistInfo,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Any:
    """Wrap ``model`` (already on ``dist_info.device``) in a DeepSpeed engine: ZeRO ``parallel.zero_stage`` over the
    data-parallel group, bf16 with fp32 master weights (or fp32 when ``train.precision=fp32``), gradient clipping by
    the global norm over TP and DP, optional CPU offload. Returns the engine (``engine.optimizer.param_groups``
    carries the lr the trainer sets)."""
    import deepspeed

    from mambatron.parallel import cpu_shims
    from mambatron.parallel.megatron import install_sequence_parallel_grad_hooks

    if dist_info.device.type != "cuda":
        cpu_shims.apply()
    if dist_info.tp_size > 1:
        mark_tensor_parallel_params(model, config.model)
        install_sequence_parallel_grad_hooks(model)
    mpu = MegatronMPU()
    if config.parallel.ep > 1 and dist_info.tp_size > 1:
        # EP = TP (validate_parallel): each TP group holds every expert once, so to DeepSpeed an expert stack is one
        # more TP-split weight (model parallel = TP, data parallel as without EP). Its gradient already sums the
        # group's tokens (all-to-all), as a TP weight's does; the replicated ones are summed over TP by their
        # sequence-parallel hooks.
        for name, param in model.named_parameters():
            if is_expert_param(name):
                param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, 0, 1
    elif config.parallel.ep > 1:
        from megatron.core import parallel_state

        install_expert_parallel_grad_hooks(model, parallel_state.get_expert_model_parallel_group())
        mpu = ExpertParallelMPU()
    ds_config = deepspeed_config(config, dist_info, extra)
    if config.parallel.zero_stage == 3:
        register_direct_reads(model)
    optimizer = optimizer or build_optimizer(model, config)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=ds_config,
        mpu=mpu,
        dist_init_required=False,
    )
    return engine


def register_direct_reads(model: nn.Module) -> int:
    """ZeRO-3 gathers a module's own parameters around its forward only. A module whose forward reads its
    sub-layers' weights directly (``reads_submodule_params = True``: the mixers' fused ops) gets them registered as
    its external parameters, so they are gathered around its forward and backward too. Returns how many."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    count = 0
    for module in model.modules():
        if getattr(module, "reads_submodule_params", False):
            for child in module.children():
                for param in child.parameters():
                    register_external_parameter(module, param)
                    count += 1
    return count


def forward_loss(
    engine: Any, input_ids: torch.Tensor, labels: torch.Tensor, seq_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token loss over ``labels >= 0`` of one micro-batch, through ``engine``'s forward.

    input_ids, labels: (batch, seqlen). Going through ``engine(...)`` (not ``engine.module.loss``) lets DeepSpeed
    hook the output for its backward bookkeeping; the model's forward computes the loss itself when given labels.
    Follow with ``engine.backward(loss)`` and ``engine.step()``.
    """
    return engine(input_ids, seq_idx=seq_idx, labels=labels)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
