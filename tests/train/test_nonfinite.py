"""A diverging run never replaces healthy checkpoints: non-finite steps are skipped without an update, the run stops
after train.max_bad_steps of them in a row (exit 3), non-finite weights are never saved, and export refuses them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from mambatron.train import checkpoint as ckpt
from tests.train.conftest import REPO, TINY, rehash, run_export, train_cmd, train_env


def _weights_finite(step_dir) -> bool:
    state, _ = ckpt.load_full_model_state(step_dir)
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def _resume_at_lr(ref_run, tmp_path, lr: str, max_steps: int, max_bad_steps: int):
    """A copy of the reference run resumed at a learning rate that ruins it, saving every step."""
    ref_dir, overrides = ref_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    proc = subprocess.run(
        train_cmd(2, [*overrides, f"train.out_dir={run_dir}", f"train.max_steps={max_steps}", f"optim.lr={lr}",
                      f"optim.min_lr={lr}", "train.save_every=1", f"train.max_bad_steps={max_bad_steps}"]),
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return run_dir, proc


def _workers_exited_3(proc: subprocess.CompletedProcess) -> bool:
    """torchrun exits 1 when a worker fails; its summary gives each worker's own exit code (3: diverged)."""
    return proc.returncode != 0 and "exitcode  : 3" in proc.stderr and "exitcode  : 1 " not in proc.stderr


def test_diverging_run_keeps_its_healthy_checkpoints(ref_run, tmp_path):
    run_dir, proc = _resume_at_lr(ref_run, tmp_path, lr="1e6", max_steps=60, max_bad_steps=3)
    out = proc.stdout + proc.stderr
    assert _workers_exited_3(proc), out[-3000:]
    assert "3 consecutive steps with a non-finite loss" in out and "lower optim.lr" in out, out[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert len(skipped) >= 3 and skipped[-3:] == list(range(skipped[-1] - 2, skipped[-1] + 1))
    # Every checkpoint left holds finite weights, and none was written from the first skipped step on.
    left = ckpt.list_checkpoints(run_dir)
    assert left
    for step_dir in left:
        assert _weights_finite(step_dir), step_dir.name
    assert not any(int(p.name.split("_")[1]) >= skipped[0] for p in left), "a checkpoint after the first skip"


def test_weights_that_gave_a_non_finite_loss_are_never_saved(ref_run, tmp_path):
    """At lr 1e30 the first step after the resume still has a finite loss (it saw the healthy weights); the update
    ruins the weights, the next steps are non-finite: skipped, not saved, and the run stops after two of them."""
    run_dir, proc = _resume_at_lr(ref_run, tmp_path, lr="1e30", max_steps=30, max_bad_steps=2)
    out = proc.stdout + proc.stderr
    assert _workers_exited_3(proc), out[-3000:]
    assert "non-finite loss at step 22: step skipped, weights not updated" in out, out[-3000:]
    assert "not saving step 22: its loss was not finite" in out, out[-3000:]
    assert "2 consecutive steps with a non-finite loss (steps 22-23); stopping without saving" in out, out[-3000:]
    names = [p.name for p in ckpt.list_checkpoints(run_dir)]
    assert names[-1] == "step_0000021" and "step_0000020" in names
    for step_dir in ckpt.list_checkpoints(run_dir):
        assert _weights_finite(step_dir), step_dir.name


def test_export_refuses_non_finite_weights(ref_run, tmp_path):
    ref_dir, _ = ref_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    step_dir = ckpt.checkpoint_root(run_dir) / "step_0000020"
    # Poison the fp32 master weights the export reads (ZeRO-1 partitions of both data-parallel ranks).
    for shard in step_dir.glob("*optim_states.pt"):
        state = torch.load(shard, map_location="cpu", weights_only=False)
        with torch.no_grad():
            state["optimizer_state_dict"]["single_partition_of_fp32_groups"][0][3] = float("nan")
        torch.save(state, shard)
    rehash(step_dir)  # a checkpoint saved with these weights, not a corrupted one
    out = tmp_path / "hf"
    proc = run_export(step_dir, out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "weight tensors are not finite" in proc.stderr and "refusing to export" in proc.stderr, proc.stderr
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("zero_stage", [0, 1, 3])
def test_skip_with_gradient_accumulation_is_exact(tiny_data, tmp_path, zero_stage):
    """A NaN in the second micro-batch of a step (after the first one's backward) skips the step exactly as a NaN in
    the first: the weights stay as they were and the following steps are bit-identical. (ZeRO-2 is left out: there
    the first micro-batch's gradients are already reduced into DeepSpeed's partition buffers and are not dropped;
    see docs/training.md.)"""
    rows = {}
    for bad_micro in (0, 1):
        report = tmp_path / f"report_{bad_micro}.json"
        overrides = [*TINY, *tiny_data, f"parallel.zero_stage={zero_stage}", f"train.out_dir={tmp_path / 'run'}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "tests/train/skip_probe.py", str(report), str(bad_micro), *overrides]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows[bad_micro] = json.loads(report.read_text())
    for run in rows.values():
        assert [r["skipped"] for r in run] == [False, False, False, True, False, False]
        assert run[3]["weights"] == run[2]["weights"], "a skipped step changed the weights"
    same = [{**r, "loss": repr(r["loss"])} for r in rows[0]] == [{**r, "loss": repr(r["loss"])} for r in rows[1]]
    assert same, rows
