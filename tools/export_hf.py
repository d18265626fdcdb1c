"""Export a mambatron checkpoint to a Hugging Face folder (MambaForCausalLM / Mamba2ForCausalLM) + tokenizer.

    python tools/export_hf.py --checkpoint DIR --out DIR [--tokenizer DIR] [--dtype bf16|fp32]

DIR is a model directory (config.yaml + model.safetensors, as written by tools/import_hf.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mambatron.hf import load_model_dir, to_hf

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model directory")
    ap.add_argument("--out", required=True, help="output folder for the HF model")
    ap.add_argument("--tokenizer", help="tokenizer folder to ship (default: data.tokenizer from the run config)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = ap.parse_args(argv)
    src = Path(args.checkpoint)
    if not src.is_dir():
        print(f"error: checkpoint {str(src)!r} is not a directory", file=sys.stderr)
        return 2
    model, config = load_model_dir(src)
    tokenizer = args.tokenizer or config.data.tokenizer or None
    if tokenizer and not Path(tokenizer).is_dir():
        print(f"warning: tokenizer folder {tokenizer!r} not found; exporting the model without it", file=sys.stderr)
        tokenizer = None
    out = to_hf(model, config.model, args.out, tokenizer_dir=tokenizer, dtype=DTYPES[args.dtype])
    print(f"exported {config.model.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
