"""Settings that only the data shows to be wrong stop the run at start with one line and exit code 2."""

from __future__ import annotations

import subprocess

from tests.train.conftest import REPO, TINY, train_cmd, train_env


def test_model_vocab_smaller_than_the_tokenizer_is_refused(tiny_data, tmp_path):
    overrides = [*TINY, *tiny_data, "model.vocab_size=200", f"train.out_dir={tmp_path / 'run'}", "train.max_steps=2"]
    proc = subprocess.run(
        train_cmd(0, overrides), cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "model.vocab_size=200" in errors[0] and "at least 260" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
