"""Fixtures for the launch tests: the local SLURM cluster and the tiny corpus shared with tests/train."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.train.conftest import tiny_data  # noqa: F401  (re-exported fixture)

HARNESS = Path(__file__).resolve().parent / "slurm_cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[None]:
    """A running 2-node SLURM cluster on this machine. Fails (never skips) when it cannot be started: CI must
    provide root and the Debian packages slurm-wlm and munge (the harness installs them with apt-get if missing).
    A cluster this session started is stopped at the end; one that was already running is left alone."""
    proc = subprocess.run(["bash", str(HARNESS), "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or shutil.which("sbatch") is None:
        pytest.fail(f"could not start the local SLURM cluster:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    # The cluster has its own slurm.conf: every SLURM command of the tests (and of their jobs) must read it.
    conf = subprocess.run(["bash", str(HARNESS), "env"], capture_output=True, text=True, check=True).stdout
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf.strip().split("=", 1)[1]
    yield
    if "slurmctld started" in proc.stderr:
        subprocess.run(["bash", str(HARNESS), "stop"], capture_output=True, timeout=120)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
