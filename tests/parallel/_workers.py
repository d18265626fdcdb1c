"""Tiny models, batches and the per-rank bodies of the multi-process tests (importable by spawned processes)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mambatron.config import (
    AttentionConfig,
    Config,
    DataConfig,
    MLPConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from mambatron.models import build_model
from mambatron.models.moe import moe_stats
from mambatron.parallel.consolidate import consolidate, consolidate_zero_checkpoint, shard
from mambatron.parallel.dist import DistInfo
from mambatron.parallel.zero import param_groups

SEQLEN = 12


def tiny_model_config(arch: str, **overrides) -> ModelConfig:
    """Mamba1: d_inner 32, dt_rank 4. Mamba2: 4 heads of 8, 2 groups. Vocab 60 padded to 64. "hybrid": Mamba2,
    attention (4 heads on 2 KV heads, RoPE, biases) and a SwiGLU MLP, pattern M*-M."""
    hybrid = arch == "hybrid"
    arch = "mamba2" if hybrid else arch
    fields = dict(
        arch=arch, d_model=16, n_layer=2, vocab_size=60, pad_vocab_multiple=16, d_state=4, d_conv=4, expand=2,
        dt_rank=4, kernels="reference",
    )  # fmt: skip
    if arch == "mamba2":
        fields.update(headdim=8, ngroups=2, chunk_size=8)
    if hybrid:
        fields.update(
            hybrid_pattern="M*-M", n_layer=4,
            attention=AttentionConfig(num_heads=4, num_kv_heads=2, rope_theta=10000.0, bias=True),
            mlp=MLPConfig(hidden=32, activation="swiglu", bias=True),
        )  # fmt: skip
    fields.update(overrides)
    return ModelConfig(**fields)


def full_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A TP=1 model's state from ``seed``, with norm weights moved off 1 so that their gradients matter."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    state = {}
    for name, t in model.state_dict().items():
        if "norm" in name:
            t = t + 0.2 * torch.randn(t.shape, generator=gen)
        state[name] = t.detach().clone()
    return state


def reference_model(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(cfg)
    model.load_state_dict(state)
    return model


def tp_model(
    cfg: ModelConfig, state: dict[str, torch.Tensor], sequence_parallel: bool, info: DistInfo, meta: bool = False
):
    """The TP model holding this rank's shard of ``state``; ``meta``: built on the meta device and materialised
    with ``to_empty``, as the trainer does."""
    from mambatron.parallel.megatron import MegatronProjections

    proj = MegatronProjections(sequence_parallel)
    model = build_model(cfg, projections=proj, device="meta" if meta else None)
    if meta:
        model.to_empty(device="cpu")
    model.load_state_dict(shard(state, cfg, info.tp_size, info.tp_rank))
    return model, proj


def batch(cfg: ModelConfig, seed: int, batch_size: int = 2, seqlen: int = SEQLEN):
    """input_ids, labels (batch, seqlen) and seq_idx marking two packed documents; some labels ignored (-100)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seqlen + 1), generator=gen)
    labels = tokens[:, 1:].clone()
    labels[0, :2] = -100
    seq_idx = torch.zeros(batch_size, seqlen, dtype=torch.int32)
    seq_idx[:, seqlen // 2 + 1 :] = 1
    return tokens[:, :-1], labels, seq_idx


def gather_states(states: dict[str, torch.Tensor], info: DistInfo) -> list[dict[str, torch.Tensor]]:
    """Every TP rank's tensors, in TP-rank order (all TP groups hold the same thing in these tests)."""
    from megatron.core import parallel_state

    out: list = [None] * info.tp_size
    dist.all_gather_object(out, states, group=parallel_state.get_tensor_model_parallel_group())
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def tp_suite(
    info: DistInfo,
    cases: list[tuple[str, bool, dict]],
    roundtrips: list[tuple[str, bool]],
    meta_cases: list[tuple[str, bool, dict]] = (),
) -> dict:
    """All TP checks in one launch (process start-up dominates on small CPUs)."""
    return {
        "info": (info.rank, info.world_size, info.tp_size, info.tp_rank, info.dp_size),
        "equivalence": tp_equivalence(info, cases),
        "meta_equivalence": tp_equivalence(info, meta_cases, meta=True),
        "roundtrip": {case: reshard_roundtrip(info, *case) for case in roundtrips},
        "meta_init": {arch: meta_init(info, arch) for arch in ("mamba1", "mamba2", "hybrid")},
        "steps": {arch: recurrent_steps(info, arch) for arch in ("mamba1", "mamba2", "hybrid")},
    }


def recurrent_steps(info: DistInfo, arch: str, steps: int = 4) -> float:
    """Token-by-token generation steps (single-token shapes through the TP layers) against TP=1: max logit diff."""
    cfg = tiny_model_config(arch)
    state = full_state(cfg)
    ids, _, _ = batch(cfg, seed=9)
    ref = reference_model(cfg, state)
    model, proj = tp_model(cfg, state, False, info)
    ref_caches, caches = ref.empty_caches(ids.shape[0]), model.empty_caches(ids.shape[0])
    worst = 0.0
    with torch.no_grad():
        for t in range(steps):
            expected = ref.step(ids[:, t], ref_caches)
            got = proj.gather_logits(model.step(ids[:, t], caches))
            worst = max(worst, max_diff(got, expected))
    return worst


def meta_init(info: DistInfo, arch: str) -> float:
    """Build the TP model on the meta device, materialise it and initialise it like the TP=1 model: the largest
    difference to this rank's shard of ``MambaLM.init_weights(seed)`` at TP=1."""
    from mambatron.parallel.consolidate import init_weights_like_tp1
    from mambatron.parallel.megatron import MegatronProjections

    cfg = tiny_model_config(arch, tie_embeddings=arch == "mamba1")
    model = build_model(cfg, projections=MegatronProjections(True), device="meta")
    model.to_empty(device="cpu")
    init_weights_like_tp1(model, cfg, seed=5, tp_size=info.tp_size, tp_rank=info.tp_rank)
    ref = build_model(cfg)
    ref.init_weights(seed=5)
    expected = shard(ref.state_dict(), cfg, info.tp_size, info.tp_rank)
    local = model.state_dict()
    assert set(local) == set(expected)
    return max(max_diff(local[k], v) for k, v in expected.items())


def tp_equivalence(info: DistInfo, cases: list[tuple[str, bool, dict]], meta: bool = False) -> dict:
    """For each (arch, sequence_parallel, model overrides): logits, loss and every consolidated gradient of the
    TP model (built on the meta device when ``meta``) against the TP=1 model built from the same full state."""
    results = {}
    for arch, sp, overrides in cases:
        cfg = tiny_model_config(arch, **overrides)
        state = full_state(cfg)
        ids, labels, seq_idx = batch(cfg, seed=7)
        ref = reference_model(cfg, state)
        ref_logits = ref(ids, seq_idx=seq_idx).detach()
        ref_loss = ref.loss(ids, labels, seq_idx=seq_idx)
        ref_loss.backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        ref_moe = moe_stats(ref)  # MoE metrics (empty without E layers)

        model, proj = tp_model(cfg, state, sp, info, meta=meta)
        logits_local = model(ids, seq_idx=seq_idx)
        logits = proj.gather_logits(logits_local).detach()
        loss = model.loss(ids, labels, seq_idx=seq_idx)
        loss.backward()
        grads = consolidate(gather_states({n: p.grad for n, p in model.named_parameters()}, info), cfg)
        moe = moe_stats(model)
        results[(arch, sp, tuple(sorted(overrides.items())))] = {
            "moe_stats": {k: abs(moe[k] - v) for k, v in ref_moe.items()} if set(moe) == set(ref_moe) else None,
            "logits_shape": tuple(logits_local.shape),
            "logits": max_diff(logits, ref_logits),
            "loss": abs(loss.item() - ref_loss.item()),
            "grads": {n: max_diff(grads[n], g) for n, g in ref_grads.items()},
            "grad_scale": {n: g.abs().max().item() for n, g in ref_grads.items()},
            "grad_names": sorted(grads),
            "no_decay": sorted(n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)),
            "ref_no_decay": sorted(n for n, p in ref.named_parameters() if getattr(p, "_no_weight_decay", False)),
        }
    return results


def reshard_roundtrip(info: DistInfo, arch: str, sequence_parallel: bool) -> dict:
    """Train the TP=2 model one step, consolidate it to TP=1, reshard back to TP=2: logits must not change."""
    from mambatron.parallel.consolidate import reshard

    cfg = tiny_model_config(arch)
    ids, labels, seq_idx = batch(cfg, seed=3)
    model, proj = tp_model(cfg, full_state(cfg), sequence_parallel, info)
    model.loss(ids, labels, seq_idx=seq_idx).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.05 * p.grad.sign())
    logits_tp2 = proj.gather_logits(model(ids, seq_idx=seq_idx)).detach()

    shards = gather_states({k: v.detach().clone() for k, v in model.state_dict().items()}, info)
    full = consolidate(shards, cfg)
    logits_tp1 = reference_model(cfg, full)(ids, seq_idx=seq_idx).detach()

    back, proj_back = tp_model(cfg, full, sequence_parallel, info)
    logits_back = proj_back.gather_logits(back(ids, seq_idx=seq_idx)).detach()
    same_shards = all(torch.equal(a, b) for a, b in zip(reshard(shards, cfg, 2)[info.tp_rank].values(),
                                                          shards[info.tp_rank].values()))  # fmt: skip
    return {
        "tp1_vs_tp2": max_diff(logits_tp1, logits_tp2),
        "back_vs_tp2": max_diff(logits_back, logits_tp2),
        "reshard_identity": same_shards,
    }


def zero_config(arch: str, stage: int, variant: str = "fp32", tp: int = 2) -> Config:
    """``variant``: "fp32"; "bf16-offload" (bf16 compute, fp32 master weights, optimizer state on CPU);
    "fp32-offload-all" (ZeRO-3 with optimizer state and parameters offloaded)."""
    bf16 = variant == "bf16-offload"
    offload_all = variant == "fp32-offload-all"
    parallel = ParallelConfig(
        tp=tp,
        sequence_parallel=True,
        zero_stage=stage,
        offload_optimizer=bf16 or offload_all,
        offload_params=offload_all,
        # ZeRO-3 partitions every parameter, however small (by default it keeps those under 100k elements whole), as
        # it does a large model's: the weights the fused mixer ops read outside their own modules must be gathered.
        deepspeed_extra={"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {},
    )
    return Config(
        model=tiny_model_config(arch),
        parallel=parallel,
        data=DataConfig(micro_batch=2, seq_len=8),
        # A small clip threshold so that clipping by the global (TP x DP) norm is active on every step.
        optim=OptimConfig(lr=1e-2, min_lr=0.0, weight_decay=0.1, grad_clip=0.05, warmup_steps=0),
        train=TrainConfig(precision="bf16" if bf16 else "fp32", grad_accum=2),
    )


STEPS = 5


def lr_at(config: Config, step: int) -> float:
    """A warm-up ramp, written into the optimizer's param groups every step."""
    return config.optim.lr * (step + 1) / STEPS


def training_batches(config: Config, dp_size: int, seed: int = 11) -> torch.Tensor:
    """Token ids (steps, dp, grad_accum, micro_batch, seq_len + 1): one global batch per step."""
    gen = torch.Generator().manual_seed(seed)
    shape = (STEPS, dp_size, config.train.grad_accum, config.data.micro_batch, config.data.seq_len + 1)
    return torch.randint(0, config.model.vocab_size, shape, generator=gen)


def reference_training(config: Config, dp_size: int) -> dict:
    """Single-process AdamW on the whole global batch: per-step losses and gradient norms (before clipping), and
    the final full state."""
    model = reference_model(config.model, full_state(config.model))
    o = config.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    data = training_batches(config, dp_size)
    losses, norms = [], []
    n_micro = dp_size * config.train.grad_accum
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(config, step)
        opt.zero_grad()
        total = 0.0
        for dp in range(dp_size):
            for a in range(config.train.grad_accum):
                x = data[step, dp, a]
                loss = model.loss(x[:, :-1], x[:, 1:])
                (loss / n_micro).backward()
                total += loss.item()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip).item())
        opt.step()
        losses.append(total / n_micro)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "grad_norms": norms, "full_state": state}


def zero_training(info: DistInfo, runs: list[tuple[str, int, str]], checkpoint_root: str) -> dict:
    """TP x DP training with DeepSpeed ZeRO for each (arch, stage, variant); per-step global-mean losses and
    gradient norms, parameter/master dtypes, and the full state consolidated from the saved (TP-sharded,
    ZeRO-partitioned) checkpoint."""
    from megatron.core import parallel_state

    from mambatron.parallel import build_projections
    from mambatron.parallel.zero import build_engine, forward_loss

    results = {}
    for run in runs:
        config = zero_config(*run, tp=info.tp_size)
        torch.manual_seed(0)
        model = build_model(config.model, projections=build_projections(config.parallel))
        model.load_state_dict(shard(full_state(config.model), config.model, info.tp_size, info.tp_rank))
        engine = build_engine(model, config, info)
        data = training_batches(config, info.dp_size)
        losses, norms = [], []
        for step in range(STEPS):
            for group in engine.optimizer.param_groups:  # as the trainer sets its schedule
                group["lr"] = lr_at(config, step)
            total = 0.0
            for a in range(config.train.grad_accum):
                x = data[step, info.dp_rank, a]
                loss = forward_loss(engine, x[:, :-1], x[:, 1:])
                engine.backward(loss)
                engine.step()
                total += loss.item()
            mean = torch.tensor(total / config.train.grad_accum, dtype=torch.float64)
            dist.all_reduce(mean, group=parallel_state.get_data_parallel_group())
            losses.append(mean.item() / info.dp_size)
            norm = engine.get_global_grad_norm()  # None without ZeRO in fp32 (DeepSpeed does not report it)
            norms.append(float("nan") if norm is None else float(norm))
        ckpt = os.path.join(checkpoint_root, "-".join(map(str, run)))
        engine.save_checkpoint(ckpt, tag="step_5")
        dist.barrier()
        full = consolidate_zero_checkpoint(ckpt, config.model, tag="step_5") if info.rank == 0 else None
        dist.barrier()
        results[run] = {
            "losses": losses,
            "grad_norms": norms,
            "full_state": full,
            "param_dtype": next(engine.module.parameters()).dtype,
            "master_dtypes": {p.dtype for g in _inner_optimizer(engine).param_groups for p in g["params"]},
            "hooked": sorted(n for n, p in engine.module.named_parameters() if getattr(p, "_sp_grad_hook", False)),
        }
        del engine
    return results


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that updates the master weights (ZeRO wraps it; without ZeRO it is the engine's)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)
