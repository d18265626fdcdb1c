"""launch/*.sh against a real SLURM controller and two slurmd's on this machine (see slurm_cluster.sh).

- ``sbatch launch/train.sh`` on 2 nodes x 2 processes trains the tiny model to the end and leaves a checkpoint;
- the same job, made to reach its time-limit signal (--signal=B:USR1@...), saves, requeues itself, resumes and
  ends with the same final loss as the uninterrupted job;
- ``scancel`` of a training job (SIGTERM to every process of the job, DataLoader workers included) saves a complete
  checkpoint before the processes are killed;
- ``sbatch launch/train_7b.sh --dry-run`` prints the 7B plan.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from mambatron.train import checkpoint as ckpt
from tests.train.conftest import REPO, TINY, losses, train_env

NPROC_PER_NODE = 2


def sbatch(args: list[str], log: Path, env: dict[str, str] | None = None) -> str:
    full_env = {
        **train_env(),
        "MAMBATRON_PYTHON": sys.executable,
        "MAMBATRON_NPROC_PER_NODE": str(NPROC_PER_NODE),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    out = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", *args], cwd=REPO, env=full_env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(predicate, timeout: float, what: str, log: Path | None = None, poll: float = 0.5) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")
        time.sleep(poll)


def wait_done(job: str, timeout: float, log: Path) -> dict[str, str]:
    wait_for(lambda: job_info(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout,
             f"job {job} to finish", log)  # fmt: skip
    info = job_info(job)
    assert info["JobState"] == "COMPLETED", f"job {job}: {info.get('JobState')}\n{log.read_text()[-4000:]}"
    return info


def last_step(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (OSError, json.JSONDecodeError):
        return 0


def test_sbatch_dry_run_prints_7b_plan(slurm_cluster, tmp_path):
    log = tmp_path / "plan.log"
    job = sbatch(["--nodes=2", "--gpus-per-node=0", "launch/train_7b.sh", "--dry-run"], log)
    wait_done(job, 120, log)
    text = log.read_text()
    assert "mambatron plan: mamba1 d_model=4096 n_layer=64" in text, text
    assert re.search(r"world size\s+4 ", text), text  # 2 nodes x MAMBATRON_NPROC_PER_NODE=2
    for line in ("weights", "gradients", "optimizer", "activations", "tokens per step"):
        assert line in text, text


def test_sbatch_train_and_time_limit_requeue(slurm_cluster, tiny_data, tmp_path):
    steps = 500
    common = [*TINY, *tiny_data, f"train.max_steps={steps}", "train.save_every=200", "train.log_every=50",
              "parallel.zero_stage=1"]  # fmt: skip
    base = ["--nodes=2", "--gpus-per-node=0", "--open-mode=append"]
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_log, cut_log = tmp_path / "ref.log", tmp_path / "cut.log"
    # Uninterrupted job.
    ref = sbatch([*base, "--time=10", "launch/train.sh", "--config", "configs/tiny.yaml", "--set", *common,
                  f"train.out_dir={ref_dir}"], ref_log)  # fmt: skip
    # The same job with a signal 90 s before its time limit; once it is training, its limit is cut to 2 minutes,
    # so slurmctld sends SIGUSR1 at its next time-limit check (<= 30 s; the signal time is already past), well
    # before the hard limit and before the 500 steps are done.
    cut = sbatch([*base, "--time=10", "--signal=B:USR1@90", "launch/train.sh", "--config", "configs/tiny.yaml",
                  "--set", *common, f"train.out_dir={cut_dir}"], cut_log)  # fmt: skip
    wait_for(lambda: last_step(cut_dir) >= 1, 180, "the second job to start training", cut_log)
    subprocess.run(["scontrol", "update", f"JobId={cut}", "TimeLimit=2"], check=True)
    wait_for(lambda: int(job_info(cut).get("Restarts", "0")) >= 1, 150, "the job to requeue itself", cut_log)
    # Give the requeued run its full time back so that it finishes.
    subprocess.run(["scontrol", "update", f"JobId={cut}", "TimeLimit=10"], check=True)

    ref_info = wait_done(ref, 300, ref_log)
    cut_info = wait_done(cut, 300, cut_log)
    assert ref_info["Restarts"] == "0"
    assert int(cut_info["Restarts"]) >= 1
    text = cut_log.read_text()
    assert "got SIGUSR1" in text and "requeued" in text and "resumed from" in text, text[-4000:]
    saved = re.findall(r"got SIGUSR1: saving step (\d+)", text)
    assert saved and 0 < int(saved[0]) < steps, text[-4000:]

    assert ckpt.latest_checkpoint(ref_dir).name == f"step_{steps:07d}"
    assert ckpt.latest_checkpoint(cut_dir).name == f"step_{steps:07d}"
    manifest = ckpt.read_manifest(ckpt.latest_checkpoint(ref_dir))
    assert manifest["world_size"] == 2 * NPROC_PER_NODE and manifest["status"] == "complete"
    ref_losses, cut_losses = losses(ref_dir), losses(cut_dir)
    assert cut_losses[steps] == ref_losses[steps]
    assert [cut_losses[s] for s in range(1, steps + 1)] == [ref_losses[s] for s in range(1, steps + 1)]


def test_scancel_saves_a_checkpoint(slurm_cluster, tiny_data, tmp_path):
    """scancel sends SIGTERM to every process of the job (train.sh, srun, torchrun, the training processes and their
    DataLoader workers) and SIGKILL KillWait seconds later (30 s, SLURM's default). The training processes finish the
    step and save a complete checkpoint of all 4 ranks in that window."""
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    job = sbatch(["--nodes=2", "--gpus-per-node=0", "--time=10", "launch/train.sh", "--config", "configs/tiny.yaml",
                  "--set", *TINY, *tiny_data, f"train.out_dir={run_dir}", "data.num_workers=1",
                  "train.max_steps=100000", "train.save_every=0", "train.log_every=1"], log)  # fmt: skip
    wait_for(lambda: last_step(run_dir) >= 2, 180, "the job to start training", log)
    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: job_info(job).get("JobState") in ("CANCELLED", "COMPLETED", "FAILED"), 120, "the job to end", log)
    text = log.read_text()
    saved = re.findall(r"got SIGTERM: saving step (\d+)", text)
    assert saved, text[-4000:]
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest is not None and latest.name == f"step_{int(saved[0]):07d}", text[-4000:]
    manifest = ckpt.read_manifest(latest)
    assert manifest["world_size"] == 2 * NPROC_PER_NODE and manifest["status"] == "complete"
    assert "killed by signal" not in text, text[-4000:]


def test_harness_refuses_a_port_held_by_another_process(slurm_cluster, tmp_path):
    """The harness runs its own cluster (own slurm.conf, ports and state folder): when another process holds the
    port it would use, start fails and says so, instead of reporting 'slurmctld started' and testing someone else's
    cluster."""
    import os
    import socket

    from tests.launch.conftest import HARNESS

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "SLURM_BASE": str(tmp_path / "other"), "SLURMCTLD_PORT": str(port),
               "SLURMD_BASE_PORT": str(port + 1)}  # fmt: skip
        proc = subprocess.run(["bash", str(HARNESS), "start"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"port {port} is held by a process that is not this cluster's slurmctld" in proc.stderr, proc.stderr
    assert "slurmctld started" not in proc.stderr
    assert (tmp_path / "other" / "slurm.conf").is_file() and f"SlurmctldPort={port}" in (
        tmp_path / "other" / "slurm.conf"
    ).read_text()
