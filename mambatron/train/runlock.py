"""One run per ``train.out_dir``: an exclusive lock on ``<out_dir>/.lock`` held by rank 0 for the whole run.

The lock is ``fcntl.flock`` on an open file, so the kernel (or the file server) releases it when the holder dies,
however it dies: a requeued SLURM job, or a run restarted after ``kill -9``, takes it over. The file names its
holder (host, pid, SLURM job, start time), so a second run that finds it taken says who has it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO, Any


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock."""


class RunLock:
    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / ".lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise RunLockedError(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to finish, stop it, or set "
                "train.out_dir to another folder"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(holder_info()) + "\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def holder_info() -> dict[str, Any]:
    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    if os.environ.get("SLURM_JOB_ID"):
        info["slurm_job"] = os.environ["SLURM_JOB_ID"]
    info["since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return info


def _describe(text: str) -> str:
    try:
        info = json.loads(text)
    except ValueError:
        return "holder unknown"
    parts = [f"host {info.get('host', '?')}", f"pid {info.get('pid', '?')}"]
    if info.get("slurm_job"):
        parts.append(f"SLURM job {info['slurm_job']}")
    if info.get("since"):
        parts.append(f"since {info['since']}")
    return ", ".join(parts)
