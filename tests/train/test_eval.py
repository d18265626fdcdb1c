"""Evaluation under ZeRO-3 (partitioned parameters) with data-parallel ranks that hold different numbers of
validation batches: the trainer agrees on the smallest count, so every rank runs the same collectives, and the
run completes with one finite validation loss."""

from __future__ import annotations

import json

from mambatron.config import load_config
from mambatron.data import build_loader
from tests.train.conftest import TINY, run_train


def test_zero3_evaluation_with_uneven_validation_batches(tiny_data, tmp_path):
    overrides = [*TINY, *tiny_data, "train.max_steps=2", "train.eval_every=2", "train.eval_steps=100000"]
    cfg = load_config("configs/tiny.yaml", overrides).data
    counts = [sum(1 for _ in build_loader(cfg, split="val", rank=r, world_size=2)) for r in (0, 1)]
    assert counts[0] != counts[1] and min(counts) > 0, counts  # the case this test is about
    # Persistence threshold 0: even this tiny model's parameters are partitioned, so every forward is a collective.
    zero3 = ["parallel.zero_stage=3", "parallel.deepspeed_extra.zero_optimization.stage3_param_persistence_threshold=0"]
    proc = run_train(2, [*overrides, *zero3, f"train.out_dir={tmp_path}"], timeout=300)
    # Rank 0 says once how many validation sequences an evaluation averages over, and that the split is short.
    sequences = min(counts) * cfg.micro_batch * 2
    assert f"validation: {sequences} sequences of {cfg.seq_len} tokens per evaluation" in proc.stdout, proc.stdout
    assert proc.stdout.count("validation: ") == 1 and "--min-val-docs" in proc.stdout
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert len(val) == 1 and val[0]["step"] == 2 and 0 < val[0]["val_loss"] < 10, val
