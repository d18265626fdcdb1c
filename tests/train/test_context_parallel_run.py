"""Context parallelism through the trainer (gloo): `--set parallel.cp=2` trains the same losses as CP=1, under ZeRO 1
and (a hybrid, with attention) ZeRO 3; a CP=2 checkpoint resumes on CP=1 and continues like an uninterrupted run."""

from __future__ import annotations

from mambatron.train import checkpoint as ckpt
from tests.train.conftest import TINY, copy_checkpoint, losses, run_train

HYBRID = [
    "model.hybrid_pattern=M*-M", "model.n_layer=4", "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
    "model.mlp.hidden=64",
]  # fmt: skip


def _close(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(b[step]), (step, a[step], b[step])


def test_cp2_trains_like_cp1_and_resumes_on_cp1(tiny_data, tmp_path):
    """CP=2 trains CP=1's losses; its step-6 checkpoint resumed on CP=1 (another ZeRO partitioning, loaded like a
    data-parallel change) continues the data and the loss curve of the uninterrupted runs."""
    common = [*TINY, *tiny_data, "parallel.zero_stage=1", "train.max_steps=8", "train.save_every=3"]
    common += ["train.keep_last=9"]
    run_train(0, [*common, f"train.out_dir={tmp_path / 'cp1'}"])
    out = run_train(2, [*common, "parallel.cp=2", f"train.out_dir={tmp_path / 'cp2'}"])
    assert "TP 1 x CP 2 x DP 1" in out.stdout
    cp1, cp2 = losses(tmp_path / "cp1"), losses(tmp_path / "cp2")
    assert sorted(cp1) == [1, 2, 3, 4, 5, 6, 7, 8] and cp1[6] < cp1[1]
    _close(cp2, cp1)
    copy_checkpoint(tmp_path / "cp2", 6, tmp_path / "resumed")
    assert ckpt.read_manifest(ckpt.latest_checkpoint(tmp_path / "resumed"))["cp"] == 2
    resumed = run_train(0, [*common, f"train.out_dir={tmp_path / 'resumed'}"])
    assert "resumed from" in resumed.stdout and "restart" not in resumed.stderr
    _close(losses(tmp_path / "resumed"), {7: cp1[7], 8: cp1[8]})


def test_cp2_hybrid_under_zero3_trains_like_cp1(tiny_data, tmp_path):
    common = [*TINY, *tiny_data, *HYBRID, "parallel.zero_stage=3", "train.max_steps=4", "train.save_every=0"]
    run_train(0, [*common, f"train.out_dir={tmp_path / 'cp1'}"])
    run_train(2, [*common, "parallel.cp=2", f"train.out_dir={tmp_path / 'cp2'}"])
    _close(losses(tmp_path / "cp2"), losses(tmp_path / "cp1"))
