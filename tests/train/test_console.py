"""What a user sees in the console of a plain CPU run: our progress lines, and none of the libraries' notices."""

from __future__ import annotations

import subprocess
import sys

from tests.train.conftest import REPO, TINY, train_cmd, train_env


def test_console_is_free_of_library_notices(tiny_data, tmp_path):
    """megatron-core's Transformer-Engine/Apex warnings, DeepSpeed's start-up logging and wandb's banner and summary
    stay out of the console; the wandb run directory is named in one line of ours; on CPU the progress line has no
    MFU or memory figures. MAMBATRON_VERBOSE=1 brings the megatron notices back."""
    overrides = [*TINY, *tiny_data, f"train.out_dir={tmp_path / 'run'}", "train.max_steps=2",
                 "train.wandb.mode=offline", "parallel.zero_stage=1", "data.num_workers=0"]  # fmt: skip
    proc = subprocess.run(train_cmd(0, overrides), cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip() == "", proc.stderr[-2000:]
    out = proc.stdout
    assert "wandb offline run " in out and "wandb sync " in out and "wandb:" not in out, out
    step_lines = [line for line in out.splitlines() if "| loss " in line]
    assert step_lines and all("mfu" not in line and "GiB" not in line for line in step_lines), out
    # Exporting that DeepSpeed checkpoint prints no DeepSpeed accelerator notice either (without the test's own
    # DS_ACCELERATOR, as a user runs it).
    env = {k: v for k, v in train_env().items() if k != "DS_ACCELERATOR"}
    export_cmd = [sys.executable, "tools/export_hf.py", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path)]
    export = subprocess.run([*export_cmd[:-1], str(tmp_path / "hf")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=240)  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    assert "WARNING" not in export.stderr and "accelerator" not in export.stderr, export.stderr[-2000:]
    verbose = subprocess.run(train_cmd(0, [*overrides, f"train.out_dir={tmp_path / 'verbose'}"]), cwd=REPO,
                             env={**train_env(), "MAMBATRON_VERBOSE": "1"}, capture_output=True, text=True,
                             timeout=240)  # fmt: skip
    assert verbose.returncode == 0 and "Transformer Engine and Apex are not installed" in verbose.stderr
