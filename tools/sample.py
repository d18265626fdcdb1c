"""Generate text with the recurrent step mode from an exported Hugging Face folder, a model directory
(config.yaml + model.safetensors, as tools/import_hf.py writes) or a training run / checkpoint directory.

python tools/sample.py --hf DIR --prompt "def main(" [--max-new-tokens 64] [--temperature 0.8] [--top-k 50]

The tokenizer is --tokenizer, else the one shipped in an HF folder, else the run config's data.tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mambatron.data.tokenizers import TokenizerError, load_tokenizer
from mambatron.hf import from_hf
from mambatron.models import generate
from mambatron.serialization import UnsafeCheckpointError
from mambatron.train.checkpoint import CorruptCheckpointError, load_trained_model


def load_model(path: Path):
    """(model, tokenizer folder or None) from an HF folder, a model directory or a run/checkpoint directory."""
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a directory")
    if (path / "config.json").is_file():
        model, _ = from_hf(path)
        return model, path
    model, config = load_trained_model(path)
    return model, (Path(config.data.tokenizer) if config.data.tokenizer else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = "HF folder (tools/export_hf.py), model directory, or training run/checkpoint directory"
    ap.add_argument("--hf", "--model", dest="model", required=True, help=where)
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the one shipped with --hf, or the run's)")
    ap.add_argument("--prompt", default="")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        model, tokenizer = load_model(Path(args.model))
        if args.tokenizer:
            tokenizer = Path(args.tokenizer)
        if tokenizer is None:
            raise TokenizerError(f"{args.model!r} names no tokenizer; pass --tokenizer DIR")
        tok = load_tokenizer(tokenizer)
    except (FileNotFoundError, TokenizerError, UnsafeCheckpointError, CorruptCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.eval()
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
