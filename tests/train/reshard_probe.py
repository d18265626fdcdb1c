"""Run under torchrun by test_reshard.py: resume a checkpoint on another TP/DP layout and check the loaded state.

Each rank compares its engine's fp32 weights and Adam moments with the checkpoint's, merged over the saved TP size
and re-split for this rank (the weights also against DeepSpeed's own zero_to_fp32 merge), then trains two steps.
Writes ``<report_dir>/rank_<r>.json``.
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
from mambatron.train import checkpoint as ckpt
from mambatron.train.trainer import Trainer


def main() -> None:
    report_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    trainer = Trainer(load_config("configs/tiny.yaml", overrides))
    trainer.build()
    step_dir = ckpt.latest_checkpoint(trainer.out_dir)
    manifest = ckpt.read_manifest(step_dir)
    assert trainer.resume()
    d, cfg = trainer.dist, trainer.config.model
    saved = [ckpt.read_full_state(step_dir, r) for r in range(manifest["tp"])]
    full_weights = consolidate.consolidate([w for w, _ in saved], cfg)
    by_deepspeed = consolidate.consolidate_zero_checkpoint(str(step_dir.parent), cfg, tag=step_dir.name)
    want = {"weights": consolidate.shard(full_weights, cfg, d.tp_size, d.tp_rank)}
    for key in ckpt.MOMENT_KEYS:
        merged = consolidate.consolidate([{n: s[key] for n, s in o.items()} for _, o in saved], cfg)
        want[key] = consolidate.shard(merged, cfg, d.tp_size, d.tp_rank)
    engine = trainer.engine
    if engine.zero_optimization():
        engine.optimizer._lazy_init_hp_params_optimizer_state()
        master, moment = safe_get_full_fp32_param, safe_get_full_optimizer_state
    else:  # fp32 without ZeRO: the parameters are the master weights, the torch optimizer holds the moments
        master, moment = (lambda p: p.detach()), (lambda p, key: engine.optimizer.state[p][key])
    mismatches = [n for n in full_weights if not torch.equal(full_weights[n], by_deepspeed[n])]
    for name, param in engine.module.named_parameters():
        if not torch.equal(master(param), want["weights"][name]):
            mismatches.append(f"weights:{name}")
        if not torch.equal(param.detach().float(), want["weights"][name]):
            mismatches.append(f"module:{name}")
        for key in ckpt.MOMENT_KEYS:
            if not torch.equal(moment(param, key), want[key][name]):
                mismatches.append(f"{key}:{name}")
    losses = [trainer.train_step().loss for _ in range(2)]
    report = {
        "rank": d.rank, "tp": d.tp_size, "dp": d.dp_size, "step": trainer.step, "mismatches": mismatches,
        "losses": losses, "finite": all(math.isfinite(x) for x in losses),
    }  # fmt: skip
    (report_dir / f"rank_{d.rank}.json").write_text(json.dumps(report))
    trainer.shutdown()


if __name__ == "__main__":
    main()
