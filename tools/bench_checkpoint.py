"""Measure what a checkpoint save costs training: synchronous against asynchronous (train.async_save).

    python tools/bench_checkpoint.py --config configs/tiny.yaml --set data.index=... data.tokenizer=...
    python tools/bench_checkpoint.py --config configs/mamba2-130m.yaml --set ... --steps 4 --json out.jsonl

Each mode runs in its own process (one rank, the config's device): build the trainer, take 2 warm-up steps, time
``--steps`` steps (the baseline, median), save, time ``--steps`` more, wait for the save to be written. Reported per
mode: ``stall_s`` (how long save() blocked), ``extra_step_s`` (the steps after the save, less the baseline: a
background write competes for the machine), ``cost_s`` (their sum: what the save cost training), ``written_s`` (save
start to durable checkpoint) and the checkpoint's size. A save whose checkpoint does not verify (complete manifest,
every file's size and sha256) gets no figures. Prints one ``RESULT {json}`` line per mode.
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


def run_mode(config: str, overrides: list[str], asynchronous: bool, steps: int) -> dict:
    from mambatron.config import load_config
    from mambatron.train import checkpoint as ckpt
    from mambatron.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as out_dir:
        sets = [*overrides, f"train.out_dir={out_dir}", f"train.async_save={str(asynchronous).lower()}",
                "train.save_every=0", "train.eval_every=0", "train.wandb.mode=disabled"]  # fmt: skip
        trainer = Trainer(load_config(config, sets))
        trainer.build()
        try:
            _timed_steps(trainer, 2)
            baseline = statistics.median(_timed_steps(trainer, steps))
            path = trainer.save()
            stall = trainer.checkpointer.last_stall_seconds
            after = _timed_steps(trainer, steps)
            trainer.finish_saving()
            problem = None if ckpt.is_complete(path) else "the checkpoint is not complete"
            problem = problem or ckpt.verify_files(path)
            manifest = ckpt.read_manifest(path) if problem is None else {}
            size = sum(p.stat().st_size for p in path.iterdir()) if problem is None else 0
        finally:
            trainer.shutdown()
    row = dict(what="checkpoint_save", config=config, mode="async" if asynchronous else "sync", device=str(
        trainer.dist.device), params=sum(p.numel() for p in trainer.model.parameters()))  # fmt: skip
    if problem is not None:
        return dict(row, ok=False, error=problem, note="the checkpoint did not verify: no figures reported")
    extra = sum(t - baseline for t in after)
    return dict(row, ok=True, checkpoint_GB=size / 1e9, baseline_step_s=baseline, stall_s=stall, extra_step_s=extra,
                cost_s=stall + extra, written_s=manifest["save_seconds"], steps_after=after)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=4, help="timed steps before and after the save")
    ap.add_argument("--json", help="append the RESULT records to this file")
    ap.add_argument("--mode", choices=("sync", "async"), help=argparse.SUPPRESS)  # one mode, in this process
    args = ap.parse_args(argv)
    if args.mode:
        row = run_mode(args.config, args.overrides, args.mode == "async", args.steps)
        print("RESULT " + json.dumps(row), flush=True)
        return 0 if row["ok"] else 1
    code = 0
    for mode in ("sync", "async"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--steps", str(args.steps),
               "--mode", mode, "--set", *args.overrides]  # fmt: skip
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
