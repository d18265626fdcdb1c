"""Preemption signals, caught from the first moment of the process.

:func:`install` runs before torch and DeepSpeed are imported (seconds on a busy node), so a SIGUSR1 that arrives
while the run is still starting is remembered instead of lost; the trainer polls :func:`received` once per step.
"""

from __future__ import annotations

import signal
from typing import Any

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_received = 0


def _remember(signum: int, frame: Any) -> None:
    global _received
    _received = signum


def install() -> None:
    """Catch SIGUSR1 and SIGTERM (idempotent); the process keeps running until the trainer acts on them."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _remember)


def received() -> int:
    """The last preemption signal number received, or 0."""
    return _received
