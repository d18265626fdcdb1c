"""Training: ``python -m mambatron.train`` (:mod:`.__main__`) over :class:`~mambatron.train.trainer.Trainer`.

- :mod:`.trainer`: build → resume → train_step / evaluate / save → run.
- :mod:`.checkpoint`: atomic step-directory checkpoints (DeepSpeed shards + manifest), resume and resharding.
- :mod:`.schedule`: warmup + cosine / WSD / constant learning rate.
- :mod:`.metrics`: metrics.jsonl, console progress, wandb, tokens/s and MFU.
- :mod:`.signals`: preemption signals caught from process start.

Kept free of heavy imports so that the entry point can install its signal handlers before torch loads.
"""
