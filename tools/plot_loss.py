"""Plot training (and validation) loss curves of one or more runs from their ``metrics.jsonl``.

    python tools/plot_loss.py runs/tiny runs/tiny-bf16 --out loss.png [--x tokens] [--smooth 20]

A resumed run appends to the same file; for every step the last record wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """``(train, val)`` records of a run keyed by step (the last record of a step wins)."""
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "loss" in rec:
            train[rec["step"]] = rec
        if "val_loss" in rec:
            val[rec["step"]] = rec
    return train, val


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (1 = unchanged)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    ap.add_argument("--out", required=True, help="output image (.png, .pdf, .svg)")
    ap.add_argument("--x", choices=["step", "tokens"], default="step", help="x axis")
    ap.add_argument("--smooth", type=int, default=1, help="moving-average window for the training loss")
    ap.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in args.runs:
        run_dir = Path(run)
        try:
            train, val = read_metrics(run_dir)
        except FileNotFoundError:
            print(f"error: no metrics.jsonl in {run_dir}", file=sys.stderr)
            return 2
        label = run_dir.name if run_dir.is_dir() else run_dir.parent.name
        steps = sorted(train)
        xs = [train[s]["tokens"] if args.x == "tokens" else s for s in steps]
        line = ax.plot(xs, smooth([train[s]["loss"] for s in steps], max(args.smooth, 1)), label=f"{label} train")[0]
        if val:
            tokens_at = {s: r.get("tokens", s) for s, r in train.items()}
            vsteps = sorted(val)
            vx = [tokens_at.get(s, s) if args.x == "tokens" else s for s in vsteps]
            ax.plot(vx, [val[s]["val_loss"] for s in vsteps], "o--", color=line.get_color(), label=f"{label} val")
    ax.set_xlabel("tokens" if args.x == "tokens" else "step")
    ax.set_ylabel("loss")
    if args.log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
