"""Training metrics: one JSON line per optimizer step, console progress, wandb, throughput and MFU.

Only rank 0 writes. ``metrics.jsonl`` is append-only, so a resumed run continues the same file; a reader that wants
one value per step keeps the last line for each step (``tools/plot_loss.py`` does).
"""

from __future__ import annotations

import json
import math
import secrets
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch


def memory_gib(device: torch.device) -> float:
    """Peak accelerator memory of this process in GiB (0 on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return 0.0


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Throughput:
    """Tokens/s, MFU and ETA over a sliding window of recent steps. The first step of a process (kernel compilation,
    allocator warm-up) stands alone until the second arrives and is then dropped from the window."""

    def __init__(self, flops_per_token: float, peak_flops_total: float, window: int = 20) -> None:
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total
        self.window = window
        self._times: list[float] = []
        self._tokens: list[int] = []
        self._updates = 0
        self._total_seconds = 0.0  # every step after the first, for the ETA
        self._total_steps = 0

    def update(self, step_seconds: float, tokens: int) -> tuple[float, float]:
        """Record one step; return ``(tokens_per_s, mfu)`` over the window."""
        self._updates += 1
        if self._updates == 2:
            self._times.clear()
            self._tokens.clear()
        if self._updates >= 2:
            self._total_seconds += step_seconds
            self._total_steps += 1
        self._times.append(step_seconds)
        self._tokens.append(tokens)
        if len(self._times) > self.window:
            self._times.pop(0)
            self._tokens.pop(0)
        seconds = sum(self._times) or 1e-9
        tps = sum(self._tokens) / seconds
        mfu = tps * self.flops_per_token / self.peak_flops_total if self.peak_flops_total > 0 else 0.0
        return tps, mfu

    def seconds_per_step(self) -> float:
        return sum(self._times) / len(self._times) if self._times else float("nan")

    def eta_seconds_per_step(self) -> float:
        """Mean step time since the first step of the process (which compiles and warms up): steadier than the
        window for an ETA, which the occasional slow step (an evaluation, a save) would otherwise make jump."""
        if self._total_steps:
            return self._total_seconds / self._total_steps
        return self.seconds_per_step()


class MetricsLogger:
    """Writes ``metrics.jsonl``, prints progress lines and forwards to wandb; a no-op on ranks other than 0."""

    def __init__(
        self,
        out_dir: str | Path,
        enabled: bool,
        config: dict[str, Any],
        wandb_cfg: Any,
        max_steps: int,
        stream: TextIO | None = None,
        accelerator: bool = True,
    ) -> None:
        self.enabled = enabled
        self.accelerator = accelerator  # MFU and memory are printed only for GPUs
        self.max_steps = max_steps
        self.stream = stream or sys.stdout
        self._file = None
        self._wandb = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._file = open(out / "metrics.jsonl", "a", buffering=1)
        if wandb_cfg.mode != "disabled":
            self._wandb = _init_wandb(out, config, wandb_cfg)
            where = f"wandb sync {self._wandb.dir.removesuffix('/files')} uploads it" if wandb_cfg.mode == "offline" \
                else self._wandb.url  # fmt: skip
            self.print(f"wandb {wandb_cfg.mode} run {self._wandb.id} ({where})")

    def log_step(self, record: dict[str, Any], print_line: bool, seconds_per_step: float) -> None:
        """Append one optimizer step's record; print a progress line when ``print_line``."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])
        if print_line:
            eta = (self.max_steps - record["step"]) * seconds_per_step
            gpu = f"mfu {100 * record['mfu']:.1f}% | mem {record['memory_gib']:.1f} GiB | " if self.accelerator else ""
            self.print(
                f"step {record['step']:>7}/{self.max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
                f"gnorm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | {gpu}"
                f"eta {format_duration(eta)}"
            )

    def log_eval(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 50.0))
        self._file.write(json.dumps({"step": step, "val_loss": loss, "val_ppl": ppl}) + "\n")
        if self._wandb is not None:
            self._wandb.log({"val/loss": loss, "val/ppl": ppl}, step=step)
        self.print(f"step {step:>7}/{self.max_steps} | val loss {loss:.4f} | val ppl {ppl:.2f}")

    def print(self, line: str) -> None:
        if self.enabled:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _init_wandb(out_dir: Path, config: dict[str, Any], wandb_cfg: Any) -> Any:
    """Start a wandb run (offline by default) holding the full config; resumes the same run id across restarts."""
    import wandb

    id_file = out_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(
        settings=wandb.Settings(silent=not getattr(wandb_cfg, "verbose", False)),
        mode=wandb_cfg.mode,
        project=wandb_cfg.project,
        name=wandb_cfg.name or out_dir.name,
        entity=wandb_cfg.entity or None,
        dir=str(out_dir),
        id=run_id,
        resume="allow",
        config=config,
    )
