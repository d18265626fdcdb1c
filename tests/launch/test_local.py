"""launch/local.sh: torchrun on one machine with MAMBATRON_NPROC_PER_NODE CPU processes, and its --dry-run."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from mambatron.train import checkpoint as ckpt
from tests.train.conftest import REPO, TINY, losses, train_env


def test_local_sh_trains_and_plans(tiny_data, tmp_path):
    env = {**train_env(), "MAMBATRON_NPROC_PER_NODE": "2"}
    plan = subprocess.run(["bash", "launch/local.sh", "--config", "configs/mamba2-130m.yaml", "--dry-run"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert plan.returncode == 0 and "world size      2 " in plan.stdout, plan.stdout + plan.stderr
    run = subprocess.run(
        ["bash", "launch/local.sh", "--config", "configs/tiny.yaml", "--set", *TINY, *tiny_data,
         "train.max_steps=3", f"train.out_dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "TP 1 x DP 2" in run.stdout
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    assert ckpt.read_manifest(ckpt.latest_checkpoint(tmp_path))["world_size"] == 2


@pytest.mark.parametrize("target", ["process group", "script"])
def test_sigterm_under_local_sh_saves_and_exits_75(target, tiny_data, tmp_path):
    """SIGTERM to the whole process group (what scancel and a cluster's preemption do) or to local.sh alone, with
    DataLoader workers: the training processes finish the step and save, and local.sh exits 75 as documented, not
    torchrun's 1."""
    run_dir = tmp_path / "run"
    env = {**train_env(), "MAMBATRON_NPROC_PER_NODE": "2"}
    proc = subprocess.Popen(
        ["bash", "launch/local.sh", "--config", "configs/tiny.yaml", "--set", *TINY, *tiny_data,
         f"train.out_dir={run_dir}", "data.num_workers=1", "train.max_steps=100000", "train.save_every=0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    if target == "script":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, out[-3000:] + err[-3000:]
    assert "got SIGTERM: saving step" in out, out[-3000:] + err[-3000:]
    saved = ckpt.latest_checkpoint(run_dir)
    assert saved is not None and ckpt.read_manifest(saved)["world_size"] == 2


def test_bad_input_under_local_sh_exits_2_with_the_error_last(tiny_data, tmp_path):
    """A layout error under torchrun: local.sh exits 2 (not torchrun's 1) and its last line is rank 0's one-line
    error, below torchrun's own failure report; no rank prints a traceback of it."""
    env = {**train_env(), "MAMBATRON_NPROC_PER_NODE": "2"}
    run = subprocess.run(
        ["bash", "launch/local.sh", "--config", "configs/tiny.yaml", "--set", *TINY, *tiny_data, "parallel.tp=3",
         f"train.out_dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: ") and "parallel.tp=3" in last, run.stderr[-3000:]
    assert run.stderr.count("config error: ") == 2  # rank 0's line, and its repetition at the end
    assert "Traceback (most recent call last)" not in run.stderr.split("config error: ")[0]
