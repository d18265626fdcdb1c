"""Resume a TP 1 x DP 2 ZeRO-1 checkpoint on a different data-parallel size and on a different TP size."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from mambatron.data import merge_states
from mambatron.train import checkpoint as ckpt
from tests.train.conftest import REPO, TINY, copy_checkpoint, losses, run_train, train_env


@pytest.mark.parametrize("nproc,tp", [(1, 1), (2, 2)], ids=["dp2-to-dp1", "tp1-to-tp2"])
def test_resume_on_another_layout(ref_run, tmp_path, nproc, tp):
    ref_dir, overrides = ref_run
    run_dir = tmp_path / "run"
    shutil.copytree(ckpt.checkpoint_root(ref_dir), ckpt.checkpoint_root(run_dir))
    report = tmp_path / "report"
    report.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "tests/train/reshard_probe.py", str(report), *overrides, f"train.out_dir={run_dir}", f"parallel.tp={tp}",
           "train.max_steps=22"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted(report.glob("rank_*.json"))]
    assert len(reports) == nproc
    for r in reports:
        assert (r["tp"], r["dp"], r["step"]) == (tp, nproc // tp, 22)
        assert r["mismatches"] == [], r["mismatches"][:10]
        assert r["finite"]
        # The global batch differs on a new layout, so the loss is not the reference's, but it continues from a
        # trained model, not from scratch (~5.6 at init).
        assert abs(r["losses"][0] - losses(ref_dir)[20]) < 0.5


def test_resume_fp32_without_zero_on_more_processes(tiny_data, tmp_path):
    """ZeRO stage 0 (the tiny config's default): a 1-process checkpoint resumes on TP 2 and on DP 2."""
    overrides = [*TINY, *tiny_data, "parallel.zero_stage=0", "train.max_steps=2"]
    run_dir = tmp_path / "run"
    run_train(0, [*overrides, f"train.out_dir={run_dir}"])
    assert "optimizer_param_names" in ckpt.read_manifest(ckpt.latest_checkpoint(run_dir))
    for tp in (2, 1):
        report = tmp_path / f"report_tp{tp}"
        report.mkdir()
        resumed = tmp_path / f"tp{tp}"
        shutil.copytree(ckpt.checkpoint_root(run_dir), ckpt.checkpoint_root(resumed))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "tests/train/reshard_probe.py", str(report), *overrides, f"train.out_dir={resumed}",
               f"parallel.tp={tp}", "train.max_steps=4"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        for r in (json.loads(p.read_text()) for p in sorted(report.glob("rank_*.json"))):
            assert r["mismatches"] == [] and r["finite"] and r["step"] == 4, r


def test_resume_without_zero_checkpoint_under_zero1(tiny_data, tmp_path):
    """Same TP and DP, ZeRO stage 0 -> 1: DeepSpeed would find no ZeRO shards and keep fresh Adam moments; the
    checkpoint is loaded through resharding instead, and weights and moments equal the saved ones."""
    overrides = [*TINY, *tiny_data, "parallel.zero_stage=0", "train.max_steps=2"]
    run_dir = tmp_path / "run"
    run_train(0, [*overrides, f"train.out_dir={run_dir}"])
    report = tmp_path / "report"
    report.mkdir()
    cmd = [sys.executable, "tests/train/reshard_probe.py", str(report), *overrides, f"train.out_dir={run_dir}",
           "parallel.zero_stage=1", "train.max_steps=4"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (r,) = [json.loads(p.read_text()) for p in report.glob("rank_*.json")]
    assert r["mismatches"] == [] and r["finite"] and r["step"] == 4, r


def test_tensor_parallel_run_matches_single_process(tiny_data, tmp_path):
    """A TP=2 run (CLI, meta-device build, vocab-parallel loss, eval) starts exactly like the TP=1 model and follows
    the same loss curve up to float reduction order."""
    common = [*TINY, *tiny_data, "train.max_steps=4", "train.eval_every=4", "train.eval_steps=2"]
    run_train(1, [*common, f"train.out_dir={tmp_path / 'tp1'}"])
    run_train(2, [*common, f"train.out_dir={tmp_path / 'tp2'}", "parallel.tp=2"])
    tp1, tp2 = losses(tmp_path / "tp1"), losses(tmp_path / "tp2")
    assert sorted(tp2) == [1, 2, 3, 4]
    for step in tp1:
        assert tp2[step] == pytest.approx(tp1[step], abs=1e-5), (step, tp1, tp2)
    val = [json.loads(x) for x in (tmp_path / "tp2" / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert len(val) == 1 and val[0]["step"] == 4


def test_the_data_position_survives_a_data_parallel_change(tiny_data, tmp_path):
    """data.streams=4: a DP=2 run's step-6 checkpoint (12 micro-batches consumed) resumed on DP=1 for 6 steps and on
    DP=4 for 2 steps ends with the stream positions of the uninterrupted DP=2 run at the same global count (its steps
    9 and 10): the global data sequence went on as if uninterrupted, without the restart warning."""
    common = [*TINY, *tiny_data, "parallel.zero_stage=1", "data.streams=4", "train.save_every=3", "train.keep_last=9"]
    ref = tmp_path / "ref"
    run_train(2, [*common, f"train.out_dir={ref}", "train.max_steps=10"])

    def position(run_dir, step):
        manifest = ckpt.read_manifest(ckpt.checkpoint_root(run_dir) / ckpt.step_dir_name(step))
        return merge_states(list(manifest["data"].values()))

    assert position(ref, 6)["consumed"] == 12
    for nproc, max_steps, same_as in ((1, 12, 9), (4, 8, 10)):
        run_dir = tmp_path / f"dp{nproc}"
        copy_checkpoint(ref, 6, run_dir)
        out = run_train(nproc, [*common, f"train.out_dir={run_dir}", f"train.max_steps={max_steps}"])
        assert "restart" not in out.stderr and "resumed from" in out.stdout
        got, want = position(run_dir, max_steps), position(ref, same_as)
        assert got["consumed"] == want["consumed"] == 12 + (max_steps - 6) * nproc
        assert got["streams"] == want["streams"], nproc
