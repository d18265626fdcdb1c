"""Run under torchrun by test_reshard.py, in two modes.

``dump REPORT overrides...``: resume the newest checkpoint on the layout it was saved with (DeepSpeed's own
``load_checkpoint``, exact) and write every TP rank's fp32 master weights and Adam moments, whole over data
parallelism (DeepSpeed's public ``safe_get_full_*`` API), to ``REPORT/oracle_tp<r>.pt``: the saved run's state.

``check REPORT overrides...``: resume the same checkpoint on another layout (TP, DP, ZeRO stage, precision) and
compare this rank's weights, module weights and moments with the oracle's, merged over the saved TP size and re-split
for this rank (the weights also against DeepSpeed's zero_to_fp32 merge); then train two steps. Writes
``REPORT/rank_<r>.json``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from mambatron.config import load_config
from mambatron.parallel import consolidate
from mambatron.serialization import load as safe_load
from mambatron.train import checkpoint as ckpt
from mambatron.train import elastic
from mambatron.train.trainer import Trainer


def flat_states(engine) -> dict[int, dict[str, torch.Tensor]]:
    """bf16 without ZeRO (DeepSpeed's fp16-style optimizers): {id(param): {"weights" | moment: fp32 tensor}}: the
    per-parameter masters and their state, or (fused) cut out of each group's flat tensors the way the optimizer
    itself maps its bf16 parameters onto its flat buffer (torch's _unflatten_dense_tensors)."""
    from torch._utils import _unflatten_dense_tensors

    opt, out = engine.optimizer, {}
    if not hasattr(opt, "fp32_groups_flat"):
        for params, masters in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
            for p, m in zip(params, masters, strict=True):
                out[id(p)] = {"weights": m, **{k: opt.optimizer.state[m][k] for k in elastic.MOMENT_KEYS}}
        return out
    for params, master in zip(opt.fp16_groups, opt.fp32_groups_flat, strict=True):
        state = opt.optimizer.state[master]
        views = {"weights": _unflatten_dense_tensors(master, params)}
        views.update({k: _unflatten_dense_tensors(state[k], params) for k in elastic.MOMENT_KEYS})
        for i, p in enumerate(params):
            out[id(p)] = {k: v[i] for k, v in views.items()}
    return out


def full_states(engine) -> dict[str, dict[str, torch.Tensor]]:
    """{"weights" | moment key: {name: whole-over-DP fp32 tensor}} of this TP rank."""
    if not engine.zero_optimization() and engine.bfloat16_enabled():
        flat = flat_states(engine)
        master, moment = (lambda p: flat[id(p)]["weights"]), (lambda p, key: flat[id(p)][key])
    elif engine.zero_optimization() or engine.bfloat16_enabled():
        if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
            engine.optimizer._lazy_init_hp_params_optimizer_state()
        master, moment = safe_get_full_fp32_param, safe_get_full_optimizer_state
    else:  # fp32 without ZeRO: the parameters are the master weights, the torch optimizer holds the moments
        master, moment = (lambda p: p.detach()), (lambda p, key: engine.optimizer.state[p][key])
    out: dict[str, dict[str, torch.Tensor]] = {"weights": {}, **{k: {} for k in elastic.MOMENT_KEYS}}
    for name, param in engine.module.named_parameters():
        out["weights"][name] = master(param).float().clone().view(param.ds_shape if hasattr(param, "ds_shape")
                                                                  else param.shape)  # fmt: skip
        for key in elastic.MOMENT_KEYS:
            out[key][name] = moment(param, key).float().clone().view_as(out["weights"][name])
    return out


def optimizer_steps(engine) -> list[float]:
    """The distinct step counts in the (inner) torch optimizer's state."""
    opt = engine.optimizer
    inner = opt.optimizer if engine.zero_optimization() or engine.bfloat16_enabled() else opt
    return sorted({float(s["step"]) for s in inner.state.values() if "step" in s})


def main() -> None:
    mode, report_dir, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    trainer = Trainer(load_config("configs/tiny.yaml", overrides))
    trainer.build()
    step_dir = ckpt.latest_checkpoint(trainer.out_dir)
    assert trainer.resume()
    d, cfg, engine = trainer.dist, trainer.config.model, trainer.engine
    states = full_states(engine)
    if mode == "dump":
        if d.dp_rank == 0:
            torch.save(states, report_dir / f"oracle_tp{d.tp_rank}.pt")
            (report_dir / "oracle_steps.json").write_text(json.dumps(optimizer_steps(engine)))
        trainer.shutdown()
        return
    saved_tp = ckpt.read_manifest(step_dir)["tp"]
    oracle = [safe_load(report_dir / f"oracle_tp{r}.pt") for r in range(saved_tp)]
    steps, saved_steps = optimizer_steps(engine), json.loads((report_dir / "oracle_steps.json").read_text())
    want = {k: consolidate.shard(consolidate.consolidate([o[k] for o in oracle], cfg), cfg, d.tp_size, d.tp_rank)
            for k in oracle[0]}  # fmt: skip
    by_deepspeed = consolidate.consolidate_zero_checkpoint(str(step_dir.parent), cfg, tag=step_dir.name)
    full_oracle = consolidate.consolidate([o["weights"] for o in oracle], cfg)
    mismatches = [f"zero_to_fp32:{n}" for n in full_oracle if not torch.equal(full_oracle[n], by_deepspeed[n])]
    if steps != saved_steps or len(steps) != 1:
        mismatches.append(f"optimizer steps {steps} != saved {saved_steps}")
    if engine.zero_optimization_partition_weights():
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            module = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    else:
        module = {n: p.detach() for n, p in engine.module.named_parameters()}
    for key, values in states.items():
        for name, value in values.items():
            if not torch.equal(value, want[key][name]):
                mismatches.append(f"{key}:{name}")
    for name, value in module.items():
        if not torch.equal(value, want["weights"][name].to(value.dtype).view_as(value)):
            mismatches.append(f"module:{name}")
    losses = [trainer.train_step().loss for _ in range(2)]
    report = {
        "rank": d.rank, "tp": d.tp_size, "dp": d.dp_size, "step": trainer.step, "mismatches": mismatches,
        "losses": losses, "finite": all(math.isfinite(x) for x in losses),
    }  # fmt: skip
    (report_dir / f"rank_{d.rank}.json").write_text(json.dumps(report))
    trainer.shutdown()


if __name__ == "__main__":
    main()
