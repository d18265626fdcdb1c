"""Tokenize raw text into WebDataset shards + index.json for mambatron training.

    python tools/prepare_data.py --input stdlib --tokenizer tok/ --out data/stdlib --shard-tokens 1000000
    python tools/prepare_data.py --input 'dump/*.jsonl.gz' --field text --tokenizer tok/ --out data/web

Text files are one document each; ``.jsonl`` / ``.jsonl.gz`` files hold one document per line (``--field``).
Point ``data.index`` at ``OUT/index.json`` to train on the result. ``--verify OUT/index.json`` checks shards copied
elsewhere against the sizes and sha256 checksums in the index.
"""

from __future__ import annotations

import argparse
import sys
import time

from mambatron.data.prepare import prepare_data, verify_shards


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", help="text/JSONL files, globs, or 'stdlib'")
    p.add_argument("--tokenizer", help="tokenizer folder from tools/train_tokenizer.py")
    p.add_argument("--out", help="output folder for the shards and index.json")
    p.add_argument("--verify", metavar="INDEX", help="only check the shards of INDEX against their checksums")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="start a new shard after this many tokens")
    p.add_argument("--field", default="text", help="JSONL key holding the document text")
    p.add_argument("--val-fraction", type=float, default=0.001, help="fraction of documents held out for validation")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = one per CPU core)")
    p.add_argument("--max-docs", type=int, default=0, help="stop after this many documents (0 = all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.verify:
        problems = verify_shards(args.verify)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{args.verify}: {'OK' if not problems else f'{len(problems)} bad shard(s)'}", file=sys.stderr)
        return 1 if problems else 0
    if not (args.input and args.tokenizer and args.out):
        p.error("--input, --tokenizer and --out are required (or --verify INDEX)")
    t0 = time.perf_counter()
    index = prepare_data(
        args.input,
        args.tokenizer,
        args.out,
        shard_tokens=args.shard_tokens,
        field_name=args.field,
        val_fraction=args.val_fraction,
        workers=args.workers,
        max_docs=args.max_docs,
        progress=not args.quiet,
    )
    dt = time.perf_counter() - t0
    for split, info in index["splits"].items():
        print(f"{split}: {len(info['shards'])} shards, {info['docs']} docs, {info['tokens']} tokens", file=sys.stderr)
    total = sum(info["tokens"] for info in index["splits"].values())
    print(f"wrote {args.out}/index.json in {dt:.1f}s ({total / dt:,.0f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
