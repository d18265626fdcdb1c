"""Train a tokenizer folder for mambatron (sentencepiece BPE/unigram with byte fallback, or byte-level).

    python tools/train_tokenizer.py --input stdlib --vocab-size 8192 --out tok/
    python tools/train_tokenizer.py --input 'corpus/*.txt' --vocab-size 32000 --out tok/ --kind unigram
    python tools/train_tokenizer.py --kind bytes --out tok-bytes/

The folder loads with ``mambatron.data.load_tokenizer(dir)`` and with ``transformers.AutoTokenizer.from_pretrained``.
A vocabulary larger than the corpus supports is lowered to the largest it supports, with a warning; one smaller than
byte fallback and the corpus's characters need, an empty corpus or an input that matches nothing stop with one
``error:`` line (exit 2) and write nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from mambatron.data.tokenizers import META_FILE, TokenizerError, load_tokenizer, train_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=[], help="text files, globs, or 'stdlib' (Python's own sources)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (ignored for --kind bytes)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--kind", choices=["bpe", "unigram", "bytes"], default="bpe")
    p.add_argument("--max-train-bytes", type=int, default=200_000_000, help="train on at most this much text")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.kind != "bytes" and not args.input:
        p.error("--input is required for --kind bpe/unigram")
    t0 = time.perf_counter()
    try:
        out = train_tokenizer(args.input, args.vocab_size, args.out, args.kind, args.max_train_bytes, args.seed)
    except TokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    requested = json.loads((out / META_FILE).read_text()).get("requested_vocab_size")
    tok = load_tokenizer(out)
    if requested:
        print(f"warning: this corpus supports at most {tok.vocab_size} pieces, not --vocab-size {requested}; trained "
              f"{tok.vocab_size} (recorded in {META_FILE} as requested_vocab_size)", file=sys.stderr)  # fmt: skip
    print(f"wrote {args.out}: {tok} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
