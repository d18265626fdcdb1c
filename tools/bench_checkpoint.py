"""Measure what a checkpoint save costs training: synchronous against asynchronous (train.async_save).

    python tools/bench_checkpoint.py --config configs/tiny.yaml --set data.index=... data.tokenizer=...
    python tools/bench_checkpoint.py --config configs/mamba2-130m.yaml --set ... --steps 4 --json out.jsonl

Each mode runs in its own process (one rank, the config's device): build the trainer, take 2 warm-up steps (the
first one reserves an asynchronous save's host buffers in the background: ``reserve_s`` is how long that took; the
timing starts once it is done), time ``--steps`` steps (the baseline, median), then ``--saves`` times: save, time
``--steps`` more, wait for the save to be written. Reported per mode, for the first save and per save in the
``saves`` list: ``stall_s`` (how long save() blocked), ``extra_step_s`` (the steps after the save, less the baseline:
a background write competes for the machine), ``cost_s`` (their sum: what the save cost training), ``written_s``
(save start to durable checkpoint), ``allocations`` (host buffers the save had to allocate), and the checkpoint's
size. A save whose checkpoint does not verify (complete manifest, every file's size and sha256) gets no figures.
Prints one ``RESULT {json}`` line per mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _timed_steps(trainer, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        trainer.train_step()
        out.append(time.perf_counter() - started)
    return out


def _one_save(trainer, steps: int, baseline: float) -> dict:
    from mambatron.train import checkpoint as ckpt

    step = trainer.step
    path = trainer.save()
    stall = trainer.checkpointer.last_stall_seconds
    allocations = trainer.checkpointer.buffers.allocations
    after = _timed_steps(trainer, steps)
    trainer.finish_saving()
    problem = None if ckpt.is_complete(path) else f"{path.name} is not complete"
    problem = problem or ckpt.verify_files(path)
    if problem is not None:
        return dict(error=problem)
    extra = sum(t - baseline for t in after)
    return dict(step=step, checkpoint_GB=sum(p.stat().st_size for p in path.iterdir()) / 1e9, stall_s=stall,
                extra_step_s=extra, cost_s=stall + extra, written_s=ckpt.read_manifest(path)["save_seconds"],
                allocations=allocations, steps_after=after)  # fmt: skip


def run_mode(config: str, overrides: list[str], asynchronous: bool, steps: int, saves: int) -> dict:
    from mambatron.config import load_config
    from mambatron.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as out_dir:
        sets = [*overrides, f"train.out_dir={out_dir}", f"train.async_save={str(asynchronous).lower()}",
                "train.save_every=0", "train.eval_every=0", "train.keep_last=1",
                "train.wandb.mode=disabled"]  # fmt: skip
        trainer = Trainer(load_config(config, sets))
        trainer.build()
        try:
            _timed_steps(trainer, 2)
            reserve_s = None
            if trainer.checkpointer is not None:
                trainer.checkpointer.buffers.wait_reserved()
                reserve_s = trainer.checkpointer.buffers.reserve_seconds
            baseline = statistics.median(_timed_steps(trainer, steps))
            rows = [_one_save(trainer, steps, baseline) for _ in range(saves)]
        finally:
            trainer.shutdown()
    row = dict(what="checkpoint_save", config=config, mode="async" if asynchronous else "sync", device=str(
        trainer.dist.device), params=sum(p.numel() for p in trainer.model.parameters()))  # fmt: skip
    failed = [r["error"] for r in rows if "error" in r]
    if failed:
        return dict(row, ok=False, error="; ".join(failed), note="a checkpoint did not verify: no figures reported")
    first = rows[0]
    return dict(row, ok=True, baseline_step_s=baseline, reserve_s=reserve_s,
                **{k: first[k] for k in ("checkpoint_GB", "stall_s", "extra_step_s", "cost_s", "written_s",
                                         "allocations", "steps_after")},
                saves=[{k: r[k] for k in ("step", "stall_s", "extra_step_s", "cost_s", "written_s", "allocations")}
                       for r in rows])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=4, help="timed steps before and after the save")
    ap.add_argument("--saves", type=int, default=2, help="saves per mode (the first may allocate host buffers)")
    ap.add_argument("--json", help="append the RESULT records to this file")
    ap.add_argument("--mode", choices=("sync", "async"), help=argparse.SUPPRESS)  # one mode, in this process
    args = ap.parse_args(argv)
    if args.mode:
        row = run_mode(args.config, args.overrides, args.mode == "async", args.steps, args.saves)
        print("RESULT " + json.dumps(row), flush=True)
        return 0 if row["ok"] else 1
    code = 0
    for mode in ("sync", "async"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--steps", str(args.steps),
               "--saves", str(args.saves), "--mode", mode, "--set", *args.overrides]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        rows = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 and not rows:
            print(f"{mode}: exited {proc.returncode}\n{proc.stderr[-3000:]}", file=sys.stderr)
            code = 1
        for line in rows:
            print(line, flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(line[len("RESULT ") :] + "\n")
        code = code or proc.returncode
    return code


if __name__ == "__main__":
    sys.exit(main())
