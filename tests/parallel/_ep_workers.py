"""Workers of tests/parallel/test_expert_parallel.py (run on every rank of a 2-process gloo group)."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from mambatron.config import MLPConfig, ModelConfig, MoEConfig
from mambatron.models.moe import MoE, moe_stats, update_expert_biases
from mambatron.parallel.experts import ExpertParallelMoE


def _cfg(
    router: str, top_k: int, activation: str, shared: int, aux: float, z: float, capacity=None, bias: float = 0.0
) -> ModelConfig:  # fmt: skip
    moe = MoEConfig(num_experts=4, top_k=top_k, hidden=24, shared_experts=shared, router=router, aux_loss_coef=aux,
                    z_loss_coef=z, capacity_factor=capacity, bias_update_rate=bias)  # fmt: skip
    return ModelConfig(arch="mamba2", hybrid_pattern="ME", n_layer=2, d_model=16, vocab_size=64, headdim=8, d_state=8,
                       mlp=MLPConfig(activation=activation), moe=moe, kernels="reference")  # fmt: skip


def _run(layer, x, g):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * g).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    grads["x"] = x.grad
    return out.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def ep_parity(info, cases):
    """Per case: the EP=2 layer against the one-process layer (same init) on this rank's tokens. Returns the relative
    errors of the output and of every gradient (an expert's against the sum over ranks of the one-process layer's
    gradient, which is what routing every rank's tokens to one holder produces), and whether the weights agree.
    At TP = EP = 2 (sequence parallel) both layers see this rank's block of the sequence through megatron-core's
    projections, and the one-process layer's gradients are already summed over TP (its sequence-parallel hooks); at
    CP = EP = 2 each holds a slice of the sequence."""
    rank = dist.get_rank()
    proj = ep_proj = None
    if info.tp_size > 1:
        from mambatron.parallel.megatron import MegatronProjections

        proj, ep_proj = MegatronProjections(sequence_parallel=True), MegatronProjections(sequence_parallel=True, ep=2)
    elif info.cp_size > 1:  # each rank holds a slice of the sequence: the losses and metrics span the CP group
        from mambatron.parallel import LocalProjections
        from mambatron.parallel.dist import context_parallel

        cp = context_parallel(info)
        proj, ep_proj = LocalProjections(cp), LocalProjections(cp, ep=2)
    results = {}
    for case in cases:
        cfg = _cfg(*case)
        local, ep = MoE(cfg, 1, proj), ExpertParallelMoE(cfg, 1, ep_proj)
        local.init_weights(torch.Generator().manual_seed(3))
        ep.init_weights(torch.Generator().manual_seed(3))
        first, n = ep.first_expert, ep.num_local_experts
        same_init = torch.equal(ep.router.weight, local.router.weight) and torch.equal(
            ep.experts.fc1, local.experts.fc1[first : first + n]
        )
        # Dropping and the balancing biases' token counts happen in training only.
        training = case[4] > 0 or case[5] > 0 or cfg.moe.capacity_factor is not None or cfg.moe.bias_update_rate > 0
        local.train(training)
        ep.train(training)
        if cfg.moe.bias_update_rate > 0:  # biases that change the top-k choice
            for layer in (local, ep):
                layer.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
        x = torch.randn(3, 10, cfg.d_model, generator=torch.Generator().manual_seed(10 + rank))
        g = torch.randn(3, 10, cfg.d_model, generator=torch.Generator().manual_seed(20 + rank))
        out_local, grads_local = _run(local, x, g)
        out_ep, grads_ep = _run(ep, x, g)
        errors = {"out": _rel(out_ep, out_local)}
        for name, grad in grads_ep.items():
            want = grads_local[name]
            if name.startswith("experts."):
                if info.tp_size == 1:  # (under TP the one-process layer's own hooks already summed it)
                    dist.all_reduce(want)  # every rank's tokens reach the holder of an expert
                want = want[first : first + n]
            errors[name] = _rel(grad, want)
        stats = (moe_stats(local), {k: v for k, v in moe_stats(ep).items()}) if training else None
        if cfg.moe.bias_update_rate > 0:
            errors["step_tokens"] = _rel(ep.step_tokens.float(), local.step_tokens.float())
            group = dist.group.WORLD if info.tp_size == 1 else None  # data x context parallel: the world at TP 1
            for layer in (local, ep):
                update_expert_biases(layer, group)
            errors["expert_bias"] = _rel(ep.expert_bias, local.expert_bias)
            assert not torch.equal(local.expert_bias, torch.tensor([0.3, -0.2, 0.1, 0.0])), "the biases must move"
        if cfg.moe.capacity_factor is not None:  # evaluation is dropless (tests/models/test_moe.py), here too
            local.eval()
            ep.eval()
            with torch.no_grad():
                errors["eval_out"] = _rel(ep(x), local(x))
        results[case] = {"errors": errors, "same_init": same_init, "local_experts": (first, n), "stats": stats}
    return results


EP_TRAIN_STEPS = 4


def ep_training_config(stage: int, ep: int, precision: str = "fp32", tp: int = 1):
    """A Mamba2 + MoE LM (4 experts, top-2, dropless, a shared expert, the load-balancing loss) trained by DeepSpeed
    with a clip threshold small enough to clip on every step (sequence parallel at TP > 1)."""
    from mambatron.config import Config, DataConfig, OptimConfig, ParallelConfig, TrainConfig

    model = dataclasses.replace(_cfg("softmax", 2, "swiglu", 1, 0.1, 0.0), vocab_size=60, pad_vocab_multiple=16,
                                ngroups=tp)  # fmt: skip
    extra = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {}
    return Config(
        model=model,
        parallel=ParallelConfig(tp=tp, ep=ep, sequence_parallel=tp > 1, zero_stage=stage, deepspeed_extra=extra),
        data=DataConfig(micro_batch=2, seq_len=8),
        optim=OptimConfig(lr=1e-2, min_lr=0.0, weight_decay=0.1, grad_clip=0.05, warmup_steps=0),
        train=TrainConfig(precision=precision, grad_accum=2),
    )


def ep_training(info, stages: list[int], ep: int) -> dict:
    """DeepSpeed training of :func:`ep_training_config` for each ZeRO stage on this launch's EP size, from the same
    initial full state: per-step losses and clipping norms, and every parameter after the last step, experts
    gathered over the EP group (so EP=2 and EP=1 runs compare name by name)."""
    from megatron.core import parallel_state

    from mambatron.models import build_model
    from mambatron.parallel import build_projections, consolidate
    from mambatron.parallel.zero import build_engine, forward_loss, is_expert_param

    results = {}
    for stage in stages:
        config = ep_training_config(stage, ep, tp=info.tp_size)
        torch.manual_seed(0)
        full = build_model(config.model).state_dict()  # TP=1, EP=1 weights from seed 0, every expert
        model = build_model(config.model, projections=build_projections(config.parallel))
        local = consolidate.shard(full, config.model, info.tp_size, info.tp_rank)
        if ep > 1:
            local = consolidate.expert_parallel_slice(local, ep, parallel_state.get_expert_model_parallel_rank())
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(local[name])
        engine = build_engine(model, config, info)
        gen = torch.Generator().manual_seed(5)
        data = torch.randint(0, 60, (EP_TRAIN_STEPS, info.dp_size, 2, 2, 9), generator=gen)
        losses, norms = [], []
        for step in range(EP_TRAIN_STEPS):
            total = 0.0
            for a in range(config.train.grad_accum):
                x = data[step, info.dp_rank, a]
                loss = forward_loss(engine, x[:, :-1], x[:, 1:])
                engine.backward(loss)
                engine.step()
                total += loss.item()
            mean = torch.tensor(total / config.train.grad_accum, dtype=torch.float64)
            dist.all_reduce(mean)
            losses.append(mean.item() / dist.get_world_size())
            norm = engine.get_global_grad_norm()
            norms.append(float("nan") if norm is None else float(norm))
        params = {}
        gathered_params = _gathered(engine, stage)
        for name, value in gathered_params.items():
            if is_expert_param(name) and ep > 1:
                parts = [torch.empty_like(value) for _ in range(ep)]
                dist.all_gather(parts, value.contiguous(), group=parallel_state.get_expert_model_parallel_group())
                value = torch.cat(parts)
            params[name] = value.detach().clone()
        results[stage] = {"losses": losses, "norms": norms, "params": params}
        del engine
    return results


def _gathered(engine, stage: int) -> dict:
    if stage != 3:
        return dict(engine.module.named_parameters())
    import deepspeed

    out = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            out[name] = param.detach().clone()
    return out


def ep_initial_params() -> dict:
    """The EP=1 initial weights that :func:`ep_training` starts from."""
    from mambatron.models import build_model

    torch.manual_seed(0)
    return {k: v for k, v in build_model(ep_training_config(1, 1).model).named_parameters()}
