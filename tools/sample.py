"""Generate text from an exported Hugging Face folder (or a model directory) with the recurrent step mode.

python tools/sample.py --hf DIR --prompt "def main(" [--max-new-tokens 64] [--temperature 0.8] [--top-k 50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mambatron.data.tokenizers import load_tokenizer
from mambatron.hf import from_hf
from mambatron.models import generate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF folder written by tools/export_hf.py (with its tokenizer)")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the one shipped in --hf)")
    ap.add_argument("--prompt", default="")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model, cfg = from_hf(args.hf)
    tok = load_tokenizer(Path(args.tokenizer or args.hf))
    ids = [tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []
    ids += tok.encode(args.prompt)
    if not ids:
        ids = [tok.eos_id]
    gen = torch.Generator().manual_seed(args.seed)
    out = generate(
        model, torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        eos_id=tok.eos_id, generator=gen,
    )  # fmt: skip
    print(tok.decode(out[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
