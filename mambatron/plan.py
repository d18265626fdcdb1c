"""Memory and throughput planner behind ``python -m mambatron.train --dry-run``.

Counts parameters from the model config (no model is built), then estimates bytes per GPU for weights, gradients,
optimizer state (per ZeRO stage and CPU offload) and activations (with and without activation checkpointing) for a
TP / DP / micro-batch / sequence-length layout, plus tokens per step and FLOPs per token. Needs neither GPUs nor an
initialised process group: the world size comes from the launcher's environment or an argument.

Estimates are deliberately simple and documented term by term; they are meant to catch a layout that cannot fit,
not to replace a profiler.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from mambatron.config import Config, ModelConfig
from mambatron.kernels.cross_entropy.api import default_chunk_rows
from mambatron.models.layers import LayerKind, layer_kinds

GIB = 1024**3


@dataclass
class ParamCount:
    """Parameters of the full (unsharded) model."""

    embedding: int
    blocks: int  # every layer with its block's pre-norm
    n_layer: int
    final_norm: int
    lm_head: int  # 0 when tied to the embedding
    # The blocks' parameters one token multiplies with (fewer than ``blocks`` with MoE layers: only routed experts).
    active_blocks: int | None = None

    @property
    def total(self) -> int:
        return self.embedding + self.blocks + self.final_norm + self.lm_head

    @property
    def active(self) -> int:
        """Parameters one token uses: all of them, less the experts a MoE layer does not route it to."""
        return self.total - self.blocks + self._active_blocks

    @property
    def _active_blocks(self) -> int:
        return self.blocks if self.active_blocks is None else self.active_blocks

    @property
    def matmul(self) -> int:
        """Parameters used in matrix multiplies per token (blocks' projections and the LM head, not the lookup): the
        active ones."""
        return self._active_blocks + self.embedding  # the (tied or untied) head multiplies by a vocab x d_model matrix


def count_params(m: ModelConfig) -> ParamCount:
    d = m.d_model
    kinds = layer_kinds(m)
    blocks = sum(kind.params(m) + d for kind in kinds)  # each layer and its block's pre-norm
    active = sum((kind.active_params or kind.params)(m) + d for kind in kinds)
    vocab = m.padded_vocab_size
    return ParamCount(
        embedding=vocab * d,
        blocks=blocks,
        active_blocks=active,
        n_layer=m.n_layer,
        final_norm=d,
        lm_head=0 if m.tie_embeddings else vocab * d,
    )


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x forward (forward + backward), forward = 2 x matmul params + each layer's mixing.

    The selective scan costs about 9 * d_inner * d_state per token per layer (Mamba1: discretise, update, read out);
    SSD adds its intra-chunk quadratic term of 2 * chunk * d_inner per token per layer on top of the state work;
    attention 2 * heads * head_dim * seq_len (causal q·kᵀ and p·v); an MLP nothing beyond its weights.
    """
    pc = count_params(m)
    mixing = sum(kind.mixing_flops(m, seq_len) for kind in layer_kinds(m))
    return 3.0 * (2.0 * pc.matmul + mixing)


@dataclass
class Plan:
    """The numbers the dry run prints. Bytes are per GPU."""

    world_size: int
    tp: int
    dp: int
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    precision: str
    micro_batch: int
    seq_len: int
    grad_accum: int
    activation_checkpointing: bool
    params_total: int
    params_active: int  # per token: fewer than params_total with MoE layers
    params_per_gpu: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    optimizer_cpu_bytes: int
    buckets_bytes: int
    activations_bytes: int
    activations_bytes_no_ckpt: int
    activations_bytes_ckpt: int
    logits_bytes: int
    # Generation: the attention layers' KV cache per token of context per sequence (0 for pure Mamba stacks, whose
    # state does not grow), per GPU in the compute dtype.
    kv_cache_bytes_per_token: int
    total_bytes: int
    gpu_memory_bytes: int
    tokens_per_step: int
    flops_per_token: float
    flops_per_step: float
    warnings: list[str]
    # Context parallel: slices per sequence, and the bytes one rank receives per micro-batch in a forward over all
    # layers (conv halos, SSM states, keys and values; the backward's all-reduces move as much again).
    cp: int = 1
    cp_exchange_bytes: int = 0
    # Expert parallel: ranks the experts are split over, this rank's expert parameters, and the bytes one rank sends
    # per micro-batch in a forward over all MoE layers (token dispatch and combine; the backward as much again).
    ep: int = 1
    expert_params_per_gpu: int = 0
    ep_exchange_bytes: int = 0

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu_memory_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits}


def _block_activation_bytes(
    m: ModelConfig, kind: LayerKind, tokens: int, tp: int, sequence_parallel: bool, bytes_: int
) -> int:
    inner = kind.activation_width(m)
    outer = 3 * m.d_model
    outer_local = outer // tp if sequence_parallel else outer
    return tokens * bytes_ * (inner // tp + outer_local)


def activation_bytes_per_layer(m: ModelConfig, tokens: int, tp: int, sequence_parallel: bool, bytes_: int) -> int:
    """Tensors the largest block keeps for backward, for ``tokens`` = micro_batch x seq_len local tokens.

    Residual-stream tensors (fp32 residual, normed input; ~3 d_model-wide units) are split over TP only with
    sequence parallelism; the inner tensors (each kind's activation width: for Mamba1 the in_proj output x and z,
    conv output, delta, scan output, gate, ~7 d_inner-wide units; Mamba2 adds B, C and dt) are always split over TP.
    """
    return max(_block_activation_bytes(m, k, tokens, tp, sequence_parallel, bytes_) for k in layer_kinds(m))


def activation_bytes_all_layers(m: ModelConfig, tokens: int, tp: int, sequence_parallel: bool, bytes_: int) -> int:
    """What every block keeps for backward together (see :func:`activation_bytes_per_layer`)."""
    return sum(_block_activation_bytes(m, k, tokens, tp, sequence_parallel, bytes_) for k in layer_kinds(m))


def kv_cache_bytes_per_token(m: ModelConfig, tp: int, bytes_: int) -> int:
    """Keys and values of every attention layer for one token of one sequence, split over TP by KV heads."""
    attention_layers = sum(kind.name == "attention" for kind in layer_kinds(m))
    return attention_layers * 2 * (m.attention.num_kv_heads // tp) * m.head_dim_value * bytes_


def zero_bucket_bytes(zero_stage: int, deepspeed_extra: dict[str, Any], grad_bytes: int) -> int:
    """DeepSpeed's gradient-reduction buckets under ZeRO with contiguous gradients (mambatron's setting): buffers of
    ``reduce_bucket_size`` elements (default 5e8) in the gradient dtype, allocated whatever the model's size; ZeRO-1/2
    keep two with ``overlap_comm`` (on for GPUs). ``deepspeed_extra`` overrides are honoured."""
    zero = deepspeed_extra.get("zero_optimization", {})
    if zero_stage == 0 or not zero.get("contiguous_gradients", True):
        return 0
    buffers = 2 if zero_stage < 3 and zero.get("overlap_comm", True) else 1
    return buffers * int(float(zero.get("reduce_bucket_size", 5e8))) * grad_bytes


DEFAULT_GPU_MEMORY_GB = 80.0


def gpu_memory_gb(config: Config) -> tuple[float, str]:
    """The GPU memory to plan for and where it came from: ``train.gpu_memory_gb`` when set, else the memory of this
    machine's first GPU, else 80 GB."""
    if config.train.gpu_memory_gb is not None:
        return float(config.train.gpu_memory_gb), "train.gpu_memory_gb"
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.total_memory / GIB, f"this machine's {props.name}"
    except Exception:  # noqa: BLE001 - planning must work without a usable GPU
        pass
    return DEFAULT_GPU_MEMORY_GB, "default; set train.gpu_memory_gb or --gpu-memory"


def make_plan(config: Config, world_size: int) -> Plan:
    """Estimate per-GPU memory and throughput of ``config`` launched on ``world_size`` processes."""
    m, par, data, train = config.model, config.parallel, config.data, config.train
    tp, cp = par.tp, par.cp
    warnings: list[str] = []
    if world_size % (tp * cp):
        warnings.append(f"world size {world_size} is not a multiple of parallel.tp x parallel.cp = {tp * cp}")
    dp = max(world_size // (tp * cp), 1)
    replicas = dp * cp  # ZeRO partitions over every model replica: the data- and context-parallel ranks
    pc = count_params(m)
    # Sharded over TP: every block projection and the vocab dimension; replicated: norms and per-channel vectors
    # are small enough that dividing everything by TP is within a percent. Routed experts are never split by TP:
    # each rank holds 1/ep of them (EP over data-parallel ranks, or over the TP group when EP = TP).
    ep = par.ep
    experts = sum(k.expert_params(m) for k in layer_kinds(m))
    experts_local = experts // ep
    local = -(-(pc.total - experts) // tp) + experts_local
    bf16 = train.precision == "bf16"
    weight_b = 2 if bf16 else 4
    grad_b = 2 if bf16 else 4
    stage = par.zero_stage
    # Adam: exp_avg + exp_avg_sq in fp32 (8 bytes). DeepSpeed's bf16 optimizer (any stage) and its ZeRO optimizers
    # (fp32 too) add an fp32 copy of the weights and an fp32 gradient for the update (4 + 4); only fp32 without ZeRO
    # steps the torch optimizer on the parameters themselves.
    optim_b = 8 if not bf16 and stage == 0 else 16
    # ZeRO partitions each rank's experts over the ranks that hold the same ones (replicas / ep when EP spans data
    # parallel ranks, every replica when EP = TP), the rest over all.
    dense = local - experts_local
    expert_replicas = max(replicas // ep, 1) if tp == 1 else replicas

    def zero_split(nbytes: int, from_stage: int) -> int:
        if stage < from_stage:
            return (dense + experts_local) * nbytes
        return dense * nbytes // replicas + experts_local * nbytes // expert_replicas

    weights = zero_split(weight_b, 3)
    grads = zero_split(grad_b, 2)
    optim_full = zero_split(optim_b, 1)
    optim_gpu, optim_cpu = (0, optim_full) if par.offload_optimizer else (optim_full, 0)
    if par.offload_params:
        weights = 0
    tokens_local = data.micro_batch * data.seq_len // cp
    act_b = 2 if bf16 else 4
    per_layer = activation_bytes_per_layer(m, tokens_local, tp, par.sequence_parallel, act_b)
    no_ckpt = activation_bytes_all_layers(m, tokens_local, tp, par.sequence_parallel, act_b)
    # Checkpointing keeps each block's inputs, the previous block's output (compute dtype) and the residual stream
    # (fp32 with model.residual_in_fp32), and recomputes one block at a time.
    residual_local = m.d_model // tp if par.sequence_parallel else m.d_model
    block_input_b = act_b + (4 if m.residual_in_fp32 else act_b)
    ckpt = m.n_layer * tokens_local * block_input_b * residual_local + per_layer
    if tp == 1:
        # The head and its loss as one op, chunked over rows: one chunk's logits (compute dtype and fp32) and the
        # fp32 weight gradient it accumulates.
        rows = min(tokens_local, default_chunk_rows(m.padded_vocab_size))
        logits = rows * m.padded_vocab_size * (act_b + 4) + m.padded_vocab_size * m.d_model * 4
    else:
        # Vocab-parallel logits in the compute dtype plus their fp32 copy in the loss.
        logits = tokens_local * (m.padded_vocab_size // tp) * (act_b + 4)
    acts = (ckpt if train.activation_checkpointing else no_ckpt) + logits
    buckets = zero_bucket_bytes(par.zero_stage, par.deepspeed_extra, grad_b)
    total = weights + grads + optim_gpu + buckets + acts
    gpu_gb, gpu_source = gpu_memory_gb(config)
    gpu_bytes = int(gpu_gb * GIB)
    if total > gpu_bytes:
        hints = []
        if stage >= 1 and dp < 8:
            hints.append(f"more GPUs (plan for them with --world-size N: ZeRO-{stage} splits the optimizer state)")
        if not train.activation_checkpointing and no_ckpt > ckpt:
            hints.append("train.activation_checkpointing=true")
        if stage < 3:
            hints.append(f"parallel.zero_stage={stage + 1}")
        if not par.offload_optimizer and stage >= 1:
            hints.append("parallel.offload_optimizer=true")
        hints.append("a smaller data.micro_batch (raise train.grad_accum) or a larger parallel.tp")
        warnings.append(
            f"estimated {total / GIB:.1f} GiB per GPU exceeds the {gpu_gb:.0f} GiB of a GPU ({gpu_source}); "
            f"try {', '.join(hints)}"
        )
    tokens_per_step = data.micro_batch * data.seq_len * train.grad_accum * dp
    exchange = 0
    if cp > 1:
        exchange = data.micro_batch * sum(
            k.cp_exchange_bytes(m, tp, data.seq_len, cp, act_b) for k in layer_kinds(m)
        )  # fmt: skip
    ep_exchange = 0
    if ep > 1:
        tokens = data.micro_batch * data.seq_len // cp // (tp if par.sequence_parallel else 1)  # this rank's tokens
        ep_exchange = sum(k.ep_exchange_bytes(m, tokens, ep, act_b) for k in layer_kinds(m))
    fpt = flops_per_token(m, data.seq_len)
    return Plan(
        world_size=world_size,
        tp=tp,
        dp=dp,
        zero_stage=stage,
        offload_optimizer=par.offload_optimizer,
        offload_params=par.offload_params,
        precision=train.precision,
        micro_batch=data.micro_batch,
        seq_len=data.seq_len,
        grad_accum=train.grad_accum,
        activation_checkpointing=train.activation_checkpointing,
        params_total=pc.total,
        params_active=pc.active,
        params_per_gpu=local,
        weights_bytes=weights,
        grads_bytes=grads,
        optimizer_bytes=optim_gpu,
        optimizer_cpu_bytes=optim_cpu,
        buckets_bytes=buckets,
        activations_bytes=acts,
        activations_bytes_no_ckpt=no_ckpt + logits,
        activations_bytes_ckpt=ckpt + logits,
        logits_bytes=logits,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(m, tp, act_b),
        total_bytes=total,
        gpu_memory_bytes=gpu_bytes,
        tokens_per_step=tokens_per_step,
        flops_per_token=fpt,
        flops_per_step=fpt * tokens_per_step,
        warnings=warnings,
        cp=cp,
        cp_exchange_bytes=exchange,
        ep=ep,
        expert_params_per_gpu=experts_local,
        ep_exchange_bytes=ep_exchange,
    )


def world_size_from_env(environ: dict[str, str] | None = None) -> int:
    """World size without initialising anything: ``WORLD_SIZE`` (torchrun), else ``SLURM_NNODES`` x
    ``MAMBATRON_NPROC_PER_NODE`` (or ``SLURM_GPUS_PER_NODE``), else 1."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    nnodes = int(env.get("SLURM_NNODES", "1"))
    per_node = env.get("MAMBATRON_NPROC_PER_NODE") or env.get("SLURM_GPUS_PER_NODE") or "1"
    return nnodes * int(str(per_node).split(":")[-1])


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plan(plan: Plan, config: Config) -> str:
    """Human-readable table of a :class:`Plan`."""
    m = config.model
    lines = [
        f"mambatron plan: {m.arch}{f' hybrid {m.hybrid_pattern}' if m.hybrid_pattern else ''} d_model={m.d_model} "
        f"n_layer={m.n_layer} vocab={m.padded_vocab_size}",
        f"  world size      {plan.world_size}  (TP {plan.tp}{f' x CP {plan.cp}' if plan.cp > 1 else ''} x DP "
        f"{plan.dp}), ZeRO stage {plan.zero_stage}"
        f"{', optimizer offload' if plan.offload_optimizer else ''}{', param offload' if plan.offload_params else ''}",
        f"  precision       {plan.precision}, micro-batch {plan.micro_batch} x seq_len {plan.seq_len}, "
        f"grad_accum {plan.grad_accum}",
        f"  parameters      {plan.params_total:,} total ({plan.params_total / 1e9:.3f} B), "
        f"{plan.params_per_gpu:,} per TP shard"
        + (
            f", {plan.params_active:,} active per token ({plan.params_active / 1e9:.3f} B)"
            if plan.params_active != plan.params_total
            else ""
        ),  # fmt: skip
        "  memory per GPU:",
        f"    weights       {_gib(plan.weights_bytes)}",
        f"    gradients     {_gib(plan.grads_bytes)}",
        f"    optimizer     {_gib(plan.optimizer_bytes)}"
        + (f"   (+{plan.optimizer_cpu_bytes / GIB:.2f} GiB on CPU)" if plan.optimizer_cpu_bytes else ""),
        f"    buckets       {_gib(plan.buckets_bytes)}   (ZeRO gradient reduction)",
        f"    activations   {_gib(plan.activations_bytes)}   "
        f"(checkpointing {'on' if plan.activation_checkpointing else 'off'}; "
        f"with: {plan.activations_bytes_ckpt / GIB:.2f} GiB, without: {plan.activations_bytes_no_ckpt / GIB:.2f} GiB; "
        f"logits {plan.logits_bytes / GIB:.2f} GiB)",
        f"    total         {_gib(plan.total_bytes)}   of {plan.gpu_memory_bytes / GIB:.0f} GiB "
        f"-> {'fits' if plan.fits else 'DOES NOT FIT'}",
        f"  tokens per step {plan.tokens_per_step:,}",
        f"  FLOPs per token {plan.flops_per_token:.3e}  ({plan.flops_per_step:.3e} per step)",
    ]
    if plan.kv_cache_bytes_per_token:
        kv = plan.kv_cache_bytes_per_token
        lines.append(f"  KV cache        {kv / 1024:.1f} KiB per token per sequence for generation "
                     f"({kv * plan.seq_len / GIB:.2f} GiB at seq_len {plan.seq_len})")  # fmt: skip
    if plan.cp > 1:
        lines.append(f"  context par.    {plan.seq_len // plan.cp} tokens per slice; each rank receives "
                     f"{plan.cp_exchange_bytes / 2**20:.2f} MiB per micro-batch in a forward (halos, states, keys and "
                     "values), as much again in backward")  # fmt: skip
    if plan.expert_params_per_gpu:
        lines.append(f"  experts         {plan.expert_params_per_gpu:,} expert parameters per GPU"
                     + (f" (1/{plan.ep} of them, EP {plan.ep}); each rank sends {plan.ep_exchange_bytes / 2**20:.2f} "
                        "MiB per micro-batch in a forward by all-to-all, as much again in backward"
                        if plan.ep > 1 else " (every expert on every rank)"))  # fmt: skip
    lines += [f"  WARNING: {w}" for w in plan.warnings]
    return "\n".join(lines)
