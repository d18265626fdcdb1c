"""Export a mambatron checkpoint to a Hugging Face folder (MambaForCausalLM / Mamba2ForCausalLM) + tokenizer.

    python tools/export_hf.py --checkpoint DIR --out DIR [--tokenizer DIR] [--dtype bf16|fp32] [--overwrite]

DIR is a training checkpoint (a ``checkpoints/step_XXXXXXX`` directory, or a run directory: its newest complete
checkpoint is used; TP shards and ZeRO partitions are merged) or a model directory (config.yaml +
model.safetensors, as written by tools/import_hf.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mambatron.hf import to_hf
from mambatron.serialization import UnsafeCheckpointError
from mambatron.train.checkpoint import CorruptCheckpointError, load_trained_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="training step/run directory or model directory")
    ap.add_argument("--out", required=True, help="output folder for the HF model")
    ap.add_argument("--tokenizer", help="tokenizer folder to ship (default: data.tokenizer from the run config)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--overwrite", action="store_true", help="export into a folder that is not empty (its weights go)")
    args = ap.parse_args(argv)
    src = Path(args.checkpoint)
    out_dir = Path(args.out)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        print(
            f"error: --out {str(out_dir)!r} is not empty; pass --overwrite to replace its model files", file=sys.stderr
        )
        return 2
    if not src.is_dir():
        print(f"error: checkpoint {str(src)!r} is not a directory", file=sys.stderr)
        return 2
    try:
        model, config = load_trained_model(src)
    except (FileNotFoundError, UnsafeCheckpointError, CorruptCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        print(
            f"error: {src}: {len(bad)} weight tensors are not finite (first: {bad[0]}); refusing to export them. "
            "Export an earlier checkpoint (a checkpoints/step_* directory of the run)",
            file=sys.stderr,
        )
        return 2
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        print(f"error: --tokenizer {args.tokenizer!r} is not a directory", file=sys.stderr)
        return 2
    tokenizer = args.tokenizer or config.data.tokenizer or None
    if tokenizer and not Path(tokenizer).is_dir():  # the run's own tokenizer may not have travelled with it
        print(f"warning: tokenizer folder {tokenizer!r} not found; exporting the model without it", file=sys.stderr)
        tokenizer = None
    out = to_hf(model, config.model, args.out, tokenizer_dir=tokenizer, dtype=DTYPES[args.dtype])
    print(f"exported {config.model.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
