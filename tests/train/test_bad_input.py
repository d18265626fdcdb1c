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


def test_a_second_run_on_the_same_out_dir_is_refused_and_a_dead_ones_lock_is_taken_over(tiny_data, tmp_path):
    """Run A holds out_dir's lock; run B on the same folder stops at start naming A (host, pid) without touching A's
    files; once A is killed (-9, like a preempted job) its lock is released and a restart resumes."""
    import json
    import time

    from mambatron.train import checkpoint as ckpt
    from tests.train.conftest import kill_tree

    run_dir = tmp_path / "run"
    overrides = [*TINY, *tiny_data, f"train.out_dir={run_dir}", "train.save_every=2", "data.num_workers=0"]
    a = subprocess.Popen(
        train_cmd(0, [*overrides, "train.max_steps=100000"]), cwd=REPO, env=train_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while ckpt.latest_checkpoint(run_dir) is None and a.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ckpt.latest_checkpoint(run_dir) is not None, "run A never saved"
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == a.pid
        metrics_before = (run_dir / "metrics.jsonl").stat().st_size
        b = subprocess.run(
            train_cmd(0, [*overrides, "train.max_steps=3"]), cwd=REPO, env=train_env(), capture_output=True,
            text=True, timeout=240,
        )  # fmt: skip
        assert b.returncode == 2, b.stdout[-2000:] + b.stderr[-2000:]
        errors = [line for line in b.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "is in use by another run" in errors[0] and f"pid {a.pid}" in errors[0], b.stderr
        assert (run_dir / "metrics.jsonl").stat().st_size >= metrics_before  # B wrote nothing over A's metrics
        assert a.poll() is None, "run A was disturbed"
    finally:
        kill_tree(a)
    step = int(ckpt.latest_checkpoint(run_dir).name.split("_")[1])
    c = subprocess.run(
        train_cmd(0, [*overrides, f"train.max_steps={step + 1}"]), cwd=REPO, env=train_env(), capture_output=True,
        text=True, timeout=240,
    )  # fmt: skip
    assert c.returncode == 0, c.stdout[-2000:] + c.stderr[-2000:]
    assert "resumed from" in c.stdout


def test_sigterm_to_the_process_group_with_loader_workers_saves(tiny_data, tmp_path):
    """scancel signals the whole process group. DataLoader workers leave SIGTERM to the main process, which finishes
    the step, saves and exits 75, instead of dying of "DataLoader worker is killed by signal"."""
    import os
    import signal
    import time

    from mambatron.train import checkpoint as ckpt

    run_dir = tmp_path / "run"
    overrides = [*TINY, *tiny_data, f"train.out_dir={run_dir}", "data.num_workers=1", "train.max_steps=100000",
                 "train.save_every=0"]  # fmt: skip
    proc = subprocess.Popen(
        train_cmd(0, overrides), cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-2000:] + err[-2000:]
    assert "got SIGTERM: saving step" in out and "killed by signal" not in err, out[-2000:] + err[-2000:]
    assert ckpt.latest_checkpoint(run_dir) is not None


def test_malformed_index_and_missing_shards_are_one_line(tiny_data, tmp_path):
    """An index whose shard list is not a list, and an index listing shards that are not there (found at start,
    every one named, not at the step that first reads one): exit 2 with one 'data error:' line, no traceback."""
    import json
    import shutil
    from pathlib import Path

    index_path = Path(next(o for o in tiny_data if o.startswith("data.index=")).split("=", 1)[1])
    cases = {}
    bad = json.loads(index_path.read_text())
    bad["splits"]["train"]["shards"] = "oops"
    cases["oops"] = (bad, "splits.train.shards must be a list of shard records, got str")
    copy = tmp_path / "copy"
    shutil.copytree(index_path.parent, copy)
    for shard in json.loads(index_path.read_text())["splits"]["train"]["shards"]:
        (copy / shard["name"]).unlink()
    cases["missing"] = (None, "train shards in")
    for name, (index, message) in cases.items():
        path = copy / "index.json" if index is None else tmp_path / f"{name}.json"
        if index is not None:
            path.write_text(json.dumps(index))
        overrides = [*TINY, *tiny_data, f"data.index={path}", f"train.out_dir={tmp_path / name}", "train.max_steps=2"]
        proc = subprocess.run(
            train_cmd(0, overrides), cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("data error:")]
        assert len(errors) == 1 and message in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
        if name == "missing":
            assert "train-000000.tar" in errors[0] and "do not exist" in errors[0]


def test_resume_with_another_model_names_the_changed_settings(tiny_data, tmp_path):
    """A checkpoint of a 2-layer model resumed with 3 layers and another d_state: exit 2 with one line naming both
    settings and their two values, instead of a raw 'Missing key(s) in state_dict'; the checkpoint is untouched."""
    from mambatron.train import checkpoint as ckpt

    run_dir = tmp_path / "run"
    base = [*TINY, *tiny_data, f"train.out_dir={run_dir}", "train.save_every=2", "data.num_workers=0"]
    first = subprocess.run(train_cmd(0, [*base, "train.max_steps=2"]), cwd=REPO, env=train_env(),
                           capture_output=True, text=True, timeout=240)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    saved = ckpt.latest_checkpoint(run_dir)
    files = {p: p.read_bytes() for p in saved.iterdir()}
    proc = subprocess.run(
        train_cmd(0, [*base, "model.n_layer=3", "model.d_state=8", "train.max_steps=4"]), cwd=REPO,
        env=train_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1, proc.stderr
    assert "model.n_layer=2 in the checkpoint, 3 now" in errors[0] and "model.d_state=" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in saved.iterdir()} == files
    # Implementation settings may change: the same model resumes with the reference kernels.
    ok = subprocess.run(train_cmd(0, [*base, "model.kernels=reference", "train.max_steps=3"]), cwd=REPO,
                        env=train_env(), capture_output=True, text=True, timeout=240)  # fmt: skip
    assert ok.returncode == 0 and "resumed from" in ok.stdout, ok.stderr[-2000:]


def test_model_vocab_larger_than_the_tokenizer_is_noted(tiny_data, tmp_path):
    """A model vocabulary larger than the tokenizer's trains, with one note saying how many rows stay unused; equal
    vocabularies (up to the pad_vocab_multiple rounding) print no note."""
    outs = {}
    for vocab in (260, 512):
        overrides = [*TINY, *tiny_data, f"model.vocab_size={vocab}", f"train.out_dir={tmp_path / str(vocab)}",
                     "train.max_steps=1", "data.num_workers=0"]  # fmt: skip
        proc = subprocess.run(
            train_cmd(0, overrides), cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[vocab] = proc.stdout
    assert "note: model.vocab_size" not in outs[260]
    assert "note: model.vocab_size=512 is larger than the tokenizer's 260: 252 embedding" in outs[512], outs[512]
