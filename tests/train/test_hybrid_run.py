"""A hybrid model (Mamba2 + attention + MLP) through the trainer: TP=2 with sequence parallelism and ZeRO-1 on two
processes, checkpointed and resumed bit-exactly."""

from __future__ import annotations

from mambatron.train import checkpoint as ckpt
from tests.train.conftest import TINY, copy_checkpoint, losses, run_train

HYBRID = [
    "model.hybrid_pattern=M*-M", "model.n_layer=4", "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
    "model.mlp.hidden=64", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=1",
    "train.save_every=3",
]  # fmt: skip


def test_hybrid_trains_under_tp_and_resumes_bit_exactly(tiny_data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = [*TINY, *tiny_data, *HYBRID]
    run_train(2, [*common, "train.max_steps=6", f"train.out_dir={full}"])
    reference = losses(full)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6] and reference[6] < reference[1]
    step3 = copy_checkpoint(full, 3, cut)
    assert ckpt.is_complete(step3)
    assert ckpt.read_manifest(step3)["config"]["model"]["hybrid_pattern"] == "M*-M"
    run_train(2, [*common, "train.max_steps=6", f"train.out_dir={cut}"])
    resumed = losses(cut)
    assert {s: resumed[s] for s in (4, 5, 6)} == {s: reference[s] for s in (4, 5, 6)}
