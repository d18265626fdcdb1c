"""Tokenize raw text into WebDataset shards + index.json for mambatron training.

    python tools/prepare_data.py --input stdlib --tokenizer tok/ --out data/stdlib --shard-tokens 1000000
    python tools/prepare_data.py --input 'dump/*.jsonl.gz' --field text --tokenizer tok/ --out data/web

Text files are one document each (``--txt-docs file``, the default), or one per non-empty line (``line``) or per
blank-line-separated paragraph (``paragraph``); ``.jsonl`` / ``.jsonl.gz`` files hold one document per line
(``--field``). Bad input (malformed JSON, a missing field, an input with no text) stops with one line naming the file
and line, exit status 2, and leaves an earlier dataset in ``--out`` as it was.
Point ``data.index`` at ``OUT/index.json`` to train on the result. ``--verify OUT/index.json`` checks shards copied
elsewhere against the sizes and sha256 checksums in the index.
"""

from __future__ import annotations

import argparse
import sys
import time

from mambatron.data.prepare import TXT_DOCS, PrepareError, prepare_data, verify_shards
from mambatron.data.tokenizers import TokenizerError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", help="text/JSONL files, globs, or 'stdlib'")
    p.add_argument("--tokenizer", help="tokenizer folder from tools/train_tokenizer.py")
    p.add_argument("--out", help="output folder for the shards and index.json")
    p.add_argument("--verify", metavar="INDEX", help="only check the shards of INDEX against their checksums")
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=50_000_000,
        help="start a new shard after this many tokens (50M: ~100 MB with 16-bit ids)",
    )
    p.add_argument("--field", default="text", help="JSONL key holding the document text")
    p.add_argument(
        "--txt-docs",
        choices=TXT_DOCS,
        default="file",
        help="one document per text file (default), per non-empty line, or per blank-line paragraph",
    )
    p.add_argument("--val-fraction", type=float, default=0.001, help="fraction of documents held out for validation")
    p.add_argument(
        "--min-val-docs",
        type=int,
        default=50,
        help="hold out at least this many documents (at most a tenth of the corpus) when --val-fraction > 0",
    )
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
    try:
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
            txt_docs=args.txt_docs,
            min_val_docs=args.min_val_docs,
        )
    except (PrepareError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    if index["replaced_bytes"]:
        print(
            f"warning: {index['replaced_documents']} document(s) held {index['replaced_bytes']} byte(s) that are not "
            "UTF-8; each was replaced with U+FFFD (re-encode the input as UTF-8 to keep them)",
            file=sys.stderr,
        )
    for split, info in index["splits"].items():
        print(f"{split}: {len(info['shards'])} shards, {info['docs']} docs, {info['tokens']} tokens", file=sys.stderr)
    total = sum(info["tokens"] for info in index["splits"].values())
    print(f"wrote {args.out}/index.json in {dt:.1f}s ({total / dt:,.0f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
