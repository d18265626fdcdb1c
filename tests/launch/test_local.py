"""launch/local.sh: torchrun on one machine with MAMBATRON_NPROC_PER_NODE CPU processes, and its --dry-run."""

from __future__ import annotations

import subprocess

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
