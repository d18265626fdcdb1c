"""Exact resume: a run killed with SIGKILL and restarted reproduces the uninterrupted loss curve bit for bit."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

from mambatron.train import checkpoint as ckpt
from tests.train.conftest import REPO, kill_tree, losses, run_train, train_cmd, train_env


def test_kill9_and_resume_is_bit_exact(ref_run, tmp_path):
    ref_dir, common = ref_run
    cut_dir = tmp_path / "cut"

    # The same run, SIGKILLed (torchrun and its workers) right after its step-10 checkpoint is complete.
    proc = subprocess.Popen(
        train_cmd(2, [*common, f"train.out_dir={cut_dir}"]),
        cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    step10 = ckpt.checkpoint_root(cut_dir) / "step_0000010"
    deadline = time.time() + 240
    while not ckpt.is_complete(step10) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    kill_tree(proc)
    assert ckpt.is_complete(step10), "the interrupted run never wrote its step-10 checkpoint"
    # Had the run outrun the kill, its later checkpoints are dropped so the restart must come from step 10.
    for later in ckpt.list_checkpoints(cut_dir):
        if later != step10:
            shutil.rmtree(later)

    # Torn writes the restart must ignore: a step directory without a complete manifest and a temporary one.
    torn = step10.parent / "step_0000015"
    shutil.copytree(step10, torn)
    manifest = json.loads((torn / "manifest.json").read_text())
    (torn / "manifest.json").write_text(json.dumps({**manifest, "step": 15, "status": "writing"}))
    shutil.copytree(step10, step10.parent / ".tmp_step_0000016")

    out = run_train(2, [*common, f"train.out_dir={cut_dir}"])
    assert "resumed from" in out.stdout and "step_0000010" in out.stdout, out.stdout[-2000:]

    ref, cut = losses(ref_dir), losses(cut_dir)
    assert sorted(ref) == list(range(1, 21))
    assert [cut[s] for s in range(11, 21)] == [ref[s] for s in range(11, 21)]
    assert [p.name for p in ckpt.list_checkpoints(cut_dir)][-1] == "step_0000020"
