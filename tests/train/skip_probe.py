"""Run under torchrun by test_nonfinite.py: six steps of two micro-batches each, with the loss of one micro-batch of
step 4 made NaN (the first or the second, from argv). Rank 0 writes, per step, whether it was skipped, its loss and a
digest of the weights, to ``<report>``."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from mambatron.config import load_config
from mambatron.train.trainer import Trainer


def main() -> None:
    report, bad_micro, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    trainer = Trainer(load_config("configs/tiny.yaml", [*overrides, "train.grad_accum=2", "train.max_steps=6"]))
    trainer.build()
    real_loss, calls = trainer.micro_loss, []

    def micro_loss(batch):
        loss = real_loss(batch)
        calls.append(trainer.step)
        if trainer.step == 3 and calls.count(3) == bad_micro + 1:
            loss = loss * float("nan")
        return loss

    trainer.micro_loss = micro_loss

    def digest() -> str:
        weights = b"".join(p.detach().cpu().numpy().tobytes() for p in trainer.engine.module.parameters())
        return hashlib.sha1(weights).hexdigest()

    rows = []
    for _ in range(6):
        result = trainer.train_step()
        rows.append(dict(step=result.step, skipped=result.skipped, loss=result.loss, weights=digest()))
    trainer.shutdown()
    if trainer.dist.rank == 0:
        report.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
