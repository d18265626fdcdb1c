"""Context parallelism through the trainer (gloo): `--set parallel.cp=2` trains the same losses as CP=1, under ZeRO 1
and (a hybrid, with attention) ZeRO 3; a checkpoint resumes on its own CP size and refuses another in one line."""

from __future__ import annotations

import subprocess

from mambatron.train import checkpoint as ckpt
from tests.train.conftest import REPO, TINY, losses, run_train, train_cmd, train_env

HYBRID = [
    "model.hybrid_pattern=M*-M", "model.n_layer=4", "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
    "model.mlp.hidden=64",
]  # fmt: skip


def _close(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(b[step]), (step, a[step], b[step])


def test_cp2_trains_like_cp1_and_resumes_only_on_cp2(tiny_data, tmp_path):
    common = [*TINY, *tiny_data, "parallel.zero_stage=1", "train.max_steps=6", "train.save_every=3"]
    run_train(0, [*common, f"train.out_dir={tmp_path / 'cp1'}"])
    out = run_train(2, [*common, "parallel.cp=2", f"train.out_dir={tmp_path / 'cp2'}"])
    assert "TP 1 x CP 2 x DP 1" in out.stdout
    cp1, cp2 = losses(tmp_path / "cp1"), losses(tmp_path / "cp2")
    assert sorted(cp1) == [1, 2, 3, 4, 5, 6] and cp1[6] < cp1[1]
    _close(cp2, cp1)
    step6 = ckpt.latest_checkpoint(tmp_path / "cp2")
    assert ckpt.read_manifest(step6)["cp"] == 2
    # Resumed on CP=1: one line naming both sizes and the fix, nothing written.
    files = {p: p.read_bytes() for p in step6.iterdir()}
    proc = subprocess.run(
        train_cmd(0, [*common, "train.max_steps=8", f"train.out_dir={tmp_path / 'cp2'}"]), cwd=REPO, env=train_env(),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "saved with parallel.cp=2" in errors[0] and "resume with parallel.cp=2" in errors[0]
    assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in step6.iterdir()} == files


def test_cp2_hybrid_under_zero3_trains_like_cp1(tiny_data, tmp_path):
    common = [*TINY, *tiny_data, *HYBRID, "parallel.zero_stage=3", "train.max_steps=4", "train.save_every=0"]
    run_train(0, [*common, f"train.out_dir={tmp_path / 'cp1'}"])
    run_train(2, [*common, "parallel.cp=2", f"train.out_dir={tmp_path / 'cp2'}"])
    _close(losses(tmp_path / "cp2"), losses(tmp_path / "cp1"))
