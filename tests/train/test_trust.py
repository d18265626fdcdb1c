"""Checkpoint files never run code: a pickled object that would run a command is refused on resume and on export,
with one line naming the file, and the command never runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mambatron import serialization
from mambatron.train import checkpoint as ckpt
from tests.train.conftest import REPO, rehash, run_export, train_cmd, train_env


class _RunsACommand:
    """Unpickling this runs ``touch <marker>`` (what a hostile checkpoint would do with a worse command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    """Add a code-running object to a checkpoint file we wrote ourselves (so loading it unsafely here is fine)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "optimizer_state_dict" in state:
        state["optimizer_state_dict"]["extra"] = _RunsACommand(marker)
    else:
        state["extra"] = _RunsACommand(marker)
    torch.save(state, path)
    rehash(path.parent)  # past the integrity check: the manifest is no defence against someone who can write it


@pytest.fixture
def tampered_copy(ref_run, tmp_path):
    """A copy of the reference run whose newest checkpoint can be tampered with, and the marker path."""
    ref_dir, overrides = ref_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    return run_dir, ckpt.checkpoint_root(run_dir) / "step_0000020", overrides, tmp_path / "MARKER"


def test_safe_load_refuses_code_and_accepts_real_checkpoints(ref_run, tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    torch.save({"weights": torch.ones(3), "extra": _RunsACommand(marker)}, evil)
    with pytest.raises(serialization.UnsafeCheckpointError, match=r"refusing to load .*evil\.pt: it references"):
        serialization.load(evil)
    # A library that asks for weights_only=False inside the guard gets the safe loader too, and torch.load is
    # restored afterwards.
    original = torch.load
    with serialization.safe_torch_load(), pytest.raises(serialization.UnsafeCheckpointError):
        torch.load(evil, weights_only=False)
    assert torch.load is original
    assert not marker.exists()
    # Every file of a real checkpoint (DeepSpeed model and ZeRO optimizer states, rank files) loads safely.
    files = sorted((ckpt.checkpoint_root(ref_run[0]) / "step_0000020").glob("*.pt"))
    assert any("optim_states" in f.name for f in files) and any(f.name.startswith("rank_") for f in files)
    for f in files:
        assert isinstance(serialization.load(f), dict), f.name


@pytest.mark.parametrize(
    "victim", ["rank_00001.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
)
def test_resume_refuses_a_code_running_checkpoint(tampered_copy, victim):
    run_dir, step_dir, overrides, marker = tampered_copy
    _plant(step_dir / victim, marker)
    proc = subprocess.run(
        train_cmd(2, [*overrides, f"train.out_dir={run_dir}", "train.max_steps=22"]),
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert not marker.exists(), "unpickling the checkpoint ran a command"
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert f"refusing to load {step_dir / victim}" in proc.stderr, proc.stderr[-3000:]
    assert (step_dir / victim).exists()  # nothing was deleted or overwritten


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_export_refuses_a_code_running_checkpoint(tampered_copy, victim):
    run_dir, step_dir, _, marker = tampered_copy
    _plant(step_dir / victim, marker)
    out = run_dir.parent / "hf"
    proc = run_export(run_dir, out)
    assert not marker.exists(), "unpickling the checkpoint ran a command"
    assert proc.returncode == 2, proc.stderr[-3000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "refusing to load" in error_lines[0] and victim in error_lines[0], proc.stderr
    assert not (out / "model.safetensors").exists()
