"""Shared fixtures for trainer tests: a tiny byte-level corpus and helpers that launch the training CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A model and batch small enough that a 2-process CPU run takes seconds.
TINY = [
    "model.vocab_size=260",
    "model.d_model=32",
    "model.n_layer=2",
    "data.seq_len=64",
    "data.micro_batch=2",
    "data.num_workers=1",
    "data.shuffle_buffer=16",
    "optim.warmup_steps=3",
    "train.log_every=1",
    "train.eval_every=0",
    "train.wandb.mode=disabled",
    "train.precision=fp32",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Byte tokenizer + WebDataset shards of 60 stdlib files; returns the ``--set`` items that point at them."""
    root = tmp_path_factory.mktemp("tiny_data")
    tok, data = root / "tok", root / "data"
    py = sys.executable
    subprocess.run([py, "tools/train_tokenizer.py", "--kind", "bytes", "--out", str(tok)], cwd=REPO, check=True)
    subprocess.run(
        [py, "tools/prepare_data.py", "--input", "stdlib", "--tokenizer", str(tok), "--out", str(data),
         "--max-docs", "60", "--shard-tokens", "100000", "--val-fraction", "0.1", "--workers", "1", "--quiet"],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    return [f"data.index={data / 'index.json'}", f"data.tokenizer={tok}"]


@pytest.fixture(scope="session")
def ref_run(tiny_data: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """20 uninterrupted steps on 2 processes (TP 1 x DP 2, ZeRO 1, fp32), checkpoints at 10 and 20.

    Returns the run directory and the overrides it was trained with (without ``train.out_dir``)."""
    run_dir = tmp_path_factory.mktemp("ref_run")
    overrides = [*TINY, *tiny_data, "train.max_steps=20", "parallel.zero_stage=1", "train.save_every=10"]
    run_train(2, [*overrides, f"train.out_dir={run_dir}"])
    return run_dir, overrides


def train_env() -> dict[str, str]:
    """The environment of a training subprocess: like a user's, without the suite's Triton-interpreter switch."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TORCH_CPP_LOG_LEVEL="ERROR")
    return env


def train_cmd(nproc: int, overrides: list[str], config: str = "configs/tiny.yaml") -> list[str]:
    """``torchrun --standalone --nproc-per-node N -m mambatron.train --config C --set ...`` (plain python for N=0)."""
    launch = [sys.executable]
    if nproc:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*launch, "-m", "mambatron.train", "--config", config, "--set", *overrides]


def run_train(nproc: int, overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        train_cmd(nproc, overrides), cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"training exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process below it (torchrun puts its workers in their own process groups)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        victims = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        victims = []
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(victims, timeout=10)


def copy_checkpoint(src_run: Path, step: int, dst_run: Path) -> Path:
    """Put ``src_run``'s checkpoint of ``step`` into the fresh run folder ``dst_run``, for a run there to resume from;
    returns the source step folder."""
    from mambatron.train import checkpoint as ckpt

    step_dir = ckpt.checkpoint_root(src_run) / ckpt.step_dir_name(step)
    shutil.copytree(step_dir, ckpt.checkpoint_root(dst_run) / step_dir.name)
    return step_dir


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step from ``metrics.jsonl`` (the last record of a step wins, as after a resume)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def rehash(step_dir: Path) -> None:
    """Record a checkpoint's current file digests in its manifest, as a checkpoint written that way would have (the
    trust tests model someone who can write the files, and so the manifest too)."""
    from mambatron.train import checkpoint as ckpt

    manifest = ckpt.read_manifest(step_dir)
    manifest["files"] = {name: ckpt.file_digest(step_dir / name) for name in manifest["files"]}
    (step_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))


def run_export(src: Path, out: Path) -> subprocess.CompletedProcess:
    """``tools/export_hf.py --checkpoint SRC --out OUT`` in a subprocess (the exit code is checked by the caller)."""
    return subprocess.run(
        [sys.executable, "tools/export_hf.py", "--checkpoint", str(src), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
