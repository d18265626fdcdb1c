"""Learning-rate schedules: linear warmup, then cosine, WSD (warmup-stable-decay) or constant.

The schedule is a pure function of the optimizer step, so resuming needs only the step number; the manifest still
records the schedule's parameters, and a resumed run warns when they changed (e.g. a raised ``train.max_steps``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from mambatron.config import OptimConfig


@dataclass(frozen=True)
class LRSchedule:
    """``lr_at(step)`` for 0-based optimizer steps ``0 .. max_steps-1``.

    - warmup: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (never 0, so step 0 learns);
    - cosine: from ``lr`` down to ``min_lr`` at the last step;
    - wsd: ``lr`` until the last ``decay_frac * max_steps`` steps, then linear down to ``min_lr``;
    - constant: ``lr``.
    """

    kind: str
    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    decay_frac: float = 0.2

    @classmethod
    def from_config(cls, optim: OptimConfig, max_steps: int) -> LRSchedule:
        return cls(optim.schedule, optim.lr, optim.min_lr, optim.warmup_steps, max_steps, optim.decay_frac)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        last = max(self.max_steps - 1, 1)
        if self.kind == "cosine":
            span = max(last - self.warmup_steps, 1)
            progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
        if self.kind == "wsd":
            decay_steps = round(self.decay_frac * self.max_steps)
            decay_start = max(self.max_steps - decay_steps, self.warmup_steps)
            if step < decay_start or decay_steps == 0:
                return self.lr
            progress = min((step - decay_start + 1) / max(self.max_steps - decay_start, 1), 1.0)
            return self.lr + (self.min_lr - self.lr) * progress
        raise ValueError(f"unknown schedule {self.kind!r}; use cosine, wsd or constant")

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def change_since(self, saved: dict[str, Any], step: int) -> str | None:
        """Describe how this schedule differs from ``saved`` (a checkpoint's :meth:`state_dict`) at ``step``, or None
        when it is the same. Raising ``max_steps`` stretches cosine/WSD, so the next step's lr jumps."""
        current = self.state_dict()
        changed = [f"{k} {v} -> {current[k]}" for k, v in saved.items() if current.get(k) != v]
        if not changed:
            return None
        return (
            f"the LR schedule changed since the checkpoint ({', '.join(changed)}): lr at step {step} is now "
            f"{self.lr_at(step):.3e} (was {LRSchedule(**saved).lr_at(step):.3e})"
        )
