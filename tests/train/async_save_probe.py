"""Run by test_async_save.py in its own process: asynchronous saves of a real (tiny, one-process, ZeRO-1) trainer.

``python tests/train/async_save_probe.py REPORT OVERRIDES...`` writes a JSON report:
- ``same_files``/``mismatches``: the staged files of a save are the files DeepSpeed writes itself, with equal
  contents (the contract mambatron.train.staging relies on);
- the second save is held back in the writer: whether it was complete or in flight when save() returned, and whether
  its weights and Adam moments are those of save time once written, although a step ran in between;
- ``reserved``/``first_save_allocations``/``scratch_left``: the first step reserved the host buffers, the first save
  allocated none, and sizing them left nothing in the checkpoint folder;
- with ``die``, a third save is started and the process SIGKILLs itself while the writer is held.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import torch

from mambatron.config import load_config
from mambatron.serialization import load as safe_load
from mambatron.train import checkpoint as ckpt
from mambatron.train import elastic
from mambatron.train.trainer import Trainer


def _equal(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b if not hasattr(a, "__dict__") else vars(a) == vars(b)


def _state_now(engine) -> dict[str, torch.Tensor]:
    """The ZeRO optimizer's flat fp32 master weights and Adam moments, per parameter group, as they are now."""
    zero = engine.optimizer
    out = {}
    for g, flat in enumerate(zero.single_partition_of_fp32_groups):
        out[f"fp32:{g}"] = flat.detach().clone()
        for key in elastic.MOMENT_KEYS:
            out[f"{key}:{g}"] = zero.optimizer.state[flat][key].clone()
    return out


def _state_saved(step_dir: Path) -> dict[str, torch.Tensor]:
    """The same, as the checkpoint's optimizer shard holds them."""
    osd = safe_load(step_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    base = osd["base_optimizer_state"]
    out = {}
    for g, flat in enumerate(osd["single_partition_of_fp32_groups"]):
        out[f"fp32:{g}"] = flat
        state = base["state"][base["param_groups"][g]["params"][0]]
        for key in elastic.MOMENT_KEYS:
            out[f"{key}:{g}"] = state[key]
    return out


def main() -> None:
    report_path, die, overrides = Path(sys.argv[1]), sys.argv[2] == "die", sys.argv[3:]
    trainer = Trainer(load_config("configs/tiny.yaml", overrides))
    trainer.build()
    report: dict = {}
    trainer.train_step()  # the first step reserves the host buffers of a save, in the background
    buffers = trainer.checkpointer.buffers
    buffers.wait_reserved()
    report["reserved"] = len(buffers._buffers)
    report["reserve_error"] = repr(buffers.reserve_error) if buffers.reserve_error else None
    report["scratch_left"] = [p.name for p in ckpt.checkpoint_root(trainer.out_dir).glob(".tmp_*")]
    first = trainer.save()
    report["first_save_allocations"] = buffers.allocations
    trainer.finish_saving()
    # The same state written by DeepSpeed itself, into another folder.
    with tempfile.TemporaryDirectory() as other:
        trainer.engine.save_checkpoint(other, tag="t", save_latest=False)
        theirs = {p.name: p for p in (Path(other) / "t").iterdir()}
        ours = {p.name: p for p in first.iterdir() if p.name != ckpt.MANIFEST and not p.name.startswith("rank_")}
        report["same_files"] = sorted(theirs) == sorted(ours)
        report["files"] = sorted(ours)
        report["mismatches"] = [n for n in ours if n in theirs and not _equal(safe_load(ours[n]), safe_load(theirs[n]))]

    # The second save's writer waits for a gate: save() must return, and the step after it must not leak in.
    gate = threading.Event()
    write_rank = ckpt._write_rank

    def held(job):
        gate.wait()
        write_rank(job)

    ckpt._write_rank = held
    trainer.train_step()
    at_save = _state_now(trainer.engine)
    second = trainer.save()
    report["complete_when_save_returned"] = ckpt.is_complete(second)
    report["in_flight_when_save_returned"] = trainer.checkpointer.in_flight
    trainer.train_step()
    after = _state_now(trainer.engine)
    report["step_changed_the_weights"] = all(not torch.equal(at_save[k], v) for k, v in after.items())
    if die:
        gate.set()
        trainer.finish_saving()
        gate.clear()
        trainer.save()  # step 3: held in the writer when the process dies
        report["died_during"] = trainer.step
        report_path.write_text(json.dumps(report))
        os.kill(os.getpid(), signal.SIGKILL)
    gate.set()
    trainer.finish_saving()
    report["complete_after_wait"] = ckpt.is_complete(second)
    report["verifies"] = ckpt.verify_files(second)
    saved = _state_saved(second)
    report["saved_equals_save_time"] = saved.keys() == at_save.keys() and all(
        torch.equal(saved[k], at_save[k]) for k in saved
    )
    report["stall_seconds"] = trainer.checkpointer.last_stall_seconds
    trainer.shutdown()
    report_path.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
