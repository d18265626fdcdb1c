"""``python -m mambatron.train --config C [--set k=v ...] [--dry-run]``: train (or plan) one run.

Launched by torchrun or srun (one process per device); a single process works too. Resumes automatically from the
newest complete checkpoint in ``train.out_dir``. ``--dry-run`` prints the memory/throughput plan and exits without
initialising anything distributed (the world size comes from the launcher's environment or ``--world-size``).
Exit codes: 0 done, 75 preempted (checkpoint saved; after SIGUSR1 under SLURM the job was requeued), 2 bad
configuration, data (index, tokenizer, shards) or a checkpoint that was refused (one line on rank 0 names it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mambatron.config import ConfigError, load_config
from mambatron.train import signals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mambatron.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config fields, e.g. --set train.max_steps=100 data.micro_batch=4 (repeatable)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the memory/throughput plan and exit")
    parser.add_argument("--world-size", type=int, default=None, help="world size to plan for (with --dry-run)")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                        help="with --dry-run: GPU memory to plan for (default: train.gpu_memory_gb, else this "
                        "machine's GPU, else 80)")  # fmt: skip
    return parser.parse_args(argv)


def dry_run(args: argparse.Namespace) -> int:
    from mambatron.parallel import validate_parallel
    from mambatron.plan import format_plan, make_plan, world_size_from_env

    overrides = list(args.overrides)
    if args.gpu_memory is not None:
        overrides.append(f"train.gpu_memory_gb={args.gpu_memory}")
    config = load_config(args.config, overrides)
    world = args.world_size or world_size_from_env()
    if not args.world_size and world == 1:
        world = config.parallel.tp  # no world size given anywhere: plan the smallest layout that can run
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one line of output per launch, not one per process
    # Every layout check the real run makes before it allocates anything.
    validate_parallel(config.model, config.parallel, world, config.data.seq_len)
    plan = make_plan(config, world)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan, config), flush=True)
    return 0


def quiet_library_notices() -> None:
    """Keep notices that need no action out of the console (MAMBATRON_VERBOSE=1 shows them): megatron-core's
    'Transformer Engine and Apex are not installed' (it falls back to plain torch, which is what runs) and DeepSpeed's
    info-level start-up logging."""
    if os.environ.get("MAMBATRON_VERBOSE") == "1":
        return
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    signals.install()
    quiet_library_notices()
    args = parse_args(argv)
    try:
        if args.dry_run:
            return dry_run(args)
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        return bad_input("config error", e)
    from mambatron.data.shards import DataIndexError, ShardError
    from mambatron.data.tokenizers import TokenizerError
    from mambatron.serialization import UnsafeCheckpointError
    from mambatron.train.checkpoint import CorruptCheckpointError
    from mambatron.train.elastic import ReshardError
    from mambatron.train.runlock import RunLockedError
    from mambatron.train.trainer import Trainer

    try:
        return Trainer(config).run()
    except (UnsafeCheckpointError, CorruptCheckpointError, ReshardError) as e:
        return bad_input("checkpoint error", e)
    except RunLockedError as e:
        return bad_input("error", e)
    except ConfigError as e:  # a setting that only the data or the layout shows to be wrong
        return bad_input("config error", e)
    except (DataIndexError, TokenizerError) as e:  # read the same way by every rank at start
        return bad_input("data error", e)
    except ShardError as e:  # a bad shard is met by the rank that reads it: that rank reports it
        return bad_input("data error", e, every_rank=True)


_reported: list[str] = []  # the one-line error of this process, for the launcher (see report_exit)


def bad_input(kind: str, e: BaseException, every_rank: bool = False) -> int:
    """Print ``kind: message`` on one line (rank 0 only, unless the error is this rank's own) and return exit code 2.

    Real bugs are not caught on their way here, and keep their tracebacks."""
    rank = int(os.environ.get("RANK", "0"))
    line = f"{kind}{f' (rank {rank})' if rank and every_rank else ''}: {_last_line(e)}"
    if rank == 0 or every_rank:
        print(line, file=sys.stderr, flush=True)
        _reported.append(line)
    return 2


def _last_line(e: BaseException) -> str:
    """The message of e; for an error re-raised from a DataLoader worker (whose message carries the worker's
    traceback), the original error's own last line."""
    text = str(e).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def report_exit(code: int) -> int:
    """Rank 0 writes its exit code (and its one-line error, if any) to ``$MAMBATRON_EXIT_FILE`` when set.

    torchrun exits 1 whenever a worker exits non-zero, so a launcher that wants the run's own code (75 after a
    preemption save, 2 for a bad input) reads it from there; launch/local.sh does.
    """
    path = os.environ.get("MAMBATRON_EXIT_FILE")
    if path and int(os.environ.get("RANK", "0")) == 0:
        try:
            with open(path, "w") as f:
                # The code, then the one-line error, which the launcher repeats after torchrun's own report.
                f.write(f"{code}\n" + "".join(f"{line}\n" for line in _reported[-1:]))
        except OSError as e:
            print(f"warning: could not write the exit code to {path}: {e}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(report_exit(main()))
