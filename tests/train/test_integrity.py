"""Checkpoint integrity: the manifest records every file's size and sha256; a corrupted or truncated file makes resume
fall back to the newest checkpoint that verifies (naming the bad file, keeping it aside), and export refuses it."""

from __future__ import annotations

import json
import shutil

import pytest

from mambatron.train import checkpoint as ckpt
from tests.train.conftest import losses, run_export, run_train


def _corrupt(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


def test_manifest_records_every_file(ref_run):
    step_dir = ckpt.checkpoint_root(ref_run[0]) / "step_0000020"
    files = ckpt.read_manifest(step_dir)["files"]
    on_disk = sorted(p.name for p in step_dir.iterdir() if p.name != "manifest.json")
    assert sorted(files) == on_disk and any("optim_states" in n for n in on_disk)
    for name, recorded in files.items():
        assert recorded == ckpt.file_digest(step_dir / name), name
    assert ckpt.verify_files(step_dir) is None


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_resume_falls_back_past_a_corrupt_checkpoint(ref_run, tmp_path, how):
    ref_dir, overrides = ref_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    # Keep only the metrics up to step 10, so the losses of steps 11-20 compared below are the resumed run's own.
    kept = [line for line in (ref_dir / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 10]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    bad = ckpt.checkpoint_root(run_dir) / "step_0000020" / "mp_rank_00_model_states.pt"
    _corrupt(bad, how)
    out = run_train(2, [*overrides, f"train.out_dir={run_dir}"])
    text = out.stdout + out.stderr
    assert f"checkpoint does not verify, resuming from an earlier one: {bad}" in text, text[-3000:]
    assert "resumed from" in out.stdout and "step_0000010" in out.stdout, out.stdout[-2000:]
    assert (bad.parent.with_name("step_0000020.corrupt") / bad.name).exists()  # kept aside, not deleted
    # Resumed exactly from step 10: steps 11-20 repeat the reference run bit for bit, and a healthy step 20 is saved.
    ref, resumed = losses(ref_dir), losses(run_dir)
    assert [resumed[s] for s in range(11, 21)] == [ref[s] for s in range(11, 21)]
    assert ckpt.verify_files(ckpt.checkpoint_root(run_dir) / "step_0000020") is None


def test_export_verifies_the_checkpoint(ref_run, tmp_path):
    ref_dir, _ = ref_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    bad = ckpt.checkpoint_root(run_dir) / "step_0000020" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _corrupt(bad, "flip")

    proc = run_export(bad.parent, tmp_path / "hf_bad")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "sha256" in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "hf_bad" / "model.safetensors").exists()
    # Given the run directory, export takes the newest checkpoint that verifies and says which one it skipped.
    proc = run_export(run_dir, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping a checkpoint that does not verify: {bad}" in proc.stderr
    assert (tmp_path / "hf" / "model.safetensors").exists()
