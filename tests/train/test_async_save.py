"""Asynchronous checkpoints: staged in host memory, written in the background, complete only once durable."""

from __future__ import annotations

import json
import subprocess
import sys

from mambatron.train import checkpoint as ckpt
from tests.train.conftest import REPO, TINY, losses, run_train, train_env

PROBE_SETTINGS = ["parallel.zero_stage=1", "data.num_workers=0", "train.async_save=true"]


def _probe(tmp_path, tiny_data, mode: str) -> tuple[dict, subprocess.CompletedProcess]:
    report = tmp_path / "report.json"
    overrides = [*TINY, *tiny_data, *PROBE_SETTINGS, f"train.out_dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [sys.executable, "tests/train/async_save_probe.py", str(report), mode, *overrides],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if not report.is_file():
        raise AssertionError(f"probe exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(report.read_text()), proc


def test_async_save_writes_the_state_of_save_time_in_the_background(tmp_path, tiny_data):
    """Every file DeepSpeed writes goes through the staging (same names, equal contents: the contract pinned for the
    installed DeepSpeed); save() returns before the files are written, the checkpoint is complete only after, and
    it holds the weights and Adam moments of save time although a step ran while it was written. Allocating (pinned)
    host memory is most of a first save's stall: the first step sizes a save without writing it and allocates its
    buffers in the background, so the first save copies into buffers that exist."""
    report, proc = _probe(tmp_path, tiny_data, "live")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["same_files"] and report["mismatches"] == [], report
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(report["files"])
    assert report["in_flight_when_save_returned"] and not report["complete_when_save_returned"]
    assert report["step_changed_the_weights"]
    assert report["complete_after_wait"] and report["verifies"] is None
    assert report["saved_equals_save_time"]
    assert report["reserve_error"] is None
    assert report["reserved"] > 10  # module weights, fp32 masters, both moments, RNG states
    assert report["first_save_allocations"] == 0
    assert report["scratch_left"] == []


def test_killed_during_an_async_save_resumes_from_the_previous_checkpoint(tmp_path, tiny_data):
    """SIGKILL while the step-3 save is still being written: its folder stays a torn temporary one, the run resumes
    from step 2, and its next save clears the torn folder."""
    report, proc = _probe(tmp_path, tiny_data, "die")
    assert proc.returncode == -9 and report["died_during"] == 3
    run = tmp_path / "run"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000001", "step_0000002"]
    assert (ckpt.checkpoint_root(run) / ".tmp_step_0000003").is_dir()
    out = run_train(0, [*TINY, *tiny_data, *PROBE_SETTINGS, f"train.out_dir={run}", "train.max_steps=4"])
    assert "resumed from" in out.stdout and "(step 2," in out.stdout
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000001", "step_0000002", "step_0000004"]
    assert not list(ckpt.checkpoint_root(run).glob(".tmp_*"))
    assert set(losses(run)) >= {3, 4}


def test_a_preemption_signal_finishes_the_save_in_flight_before_exiting(monkeypatch):
    """SIGTERM/SIGUSR1: the loop saves and returns; run() waits for that save to be written, then shuts down."""
    import signal

    from tests.train.test_units import _signalled_trainer

    trainer, calls = _signalled_trainer(monkeypatch, signal.SIGTERM, max_steps=5)

    class Writer:
        in_flight = True

        def wait(self):
            calls.append(("written", trainer.step))
            self.in_flight = False

    trainer.checkpointer = Writer()
    trainer.run()
    assert calls == [("save", 1), ("written", 1), ("shutdown", 1)]


def test_a_failed_background_write_is_reported_and_never_completes_the_checkpoint(tmp_path, monkeypatch):
    """A write that fails in the background raises at the next wait (the next save or the end of the run), and
    leaves no complete checkpoint behind."""
    import pytest

    class Engine:  # a test double that writes its file itself, like DeepSpeed without the staging
        def save_checkpoint(self, root, tag, save_latest):
            (tmp_path / "checkpoints" / tag).mkdir(exist_ok=True)
            (tmp_path / "checkpoints" / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    writer = ckpt.Checkpointer(asynchronous=True)
    writer.save(Engine(), tmp_path, 5, {"config": {}}, {"data": None}, rank=0, keep_last=2)
    with pytest.raises(RuntimeError, match="No space left on device"):
        writer.wait()
    assert ckpt.list_checkpoints(tmp_path) == []
    writer.wait()  # reported once


def test_bench_checkpoint_reports_verified_saves_of_both_modes(tmp_path, tiny_data):
    """tools/bench_checkpoint.py (the tool behind the save figures in docs/benchmarks.md), both modes in their own
    processes: every save verified, the asynchronous saves copying into reserved buffers, the synchronous ones
    blocking until their checkpoint is written."""
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run(
        [sys.executable, "tools/bench_checkpoint.py", "--config", "configs/tiny.yaml", "--steps", "1", "--saves", "2",
         "--json", str(out), "--set", *TINY, *tiny_data, "data.num_workers=0", "parallel.zero_stage=1"],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["mode"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows.keys() == {"sync", "async"}
    for row in rows.values():
        assert row["ok"] and row["checkpoint_GB"] > 0, row
        assert [s["step"] for s in row["saves"]] == [3, 4], row  # the step each save was of (after 2 + 1 steps)
        assert all(s["stall_s"] >= 0 and s["written_s"] > 0 for s in row["saves"]), row
    assert rows["async"]["reserve_s"] is not None and [s["allocations"] for s in rows["async"]["saves"]] == [0, 0]
    assert rows["sync"]["reserve_s"] is None and rows["sync"]["saves"][0]["allocations"] > 0
