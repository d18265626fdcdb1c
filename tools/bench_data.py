"""Measure the data path on one CPU core: tokenize → shards (prepare), and stream → shuffle → pack (loader).

    python tools/bench_data.py                                 # stdlib corpus, BPE 8192 trained on the fly
    python tools/bench_data.py --tokenizer tok/ --input 'corpus/*.txt' --seconds 20

Both stages run in this one process (prepare with ``--workers 1``, the loader with ``num_workers=0``), so tokens/s is
per core; multiply by cores for a node. ``*_tokens_per_cpu_s`` divides by the process's CPU time (what one core
delivers even on a shared machine); ``*_tokens_per_s_per_core`` divides by wall time. The loader is checked before it
is timed: without shuffling, its packed rows must equal the shard documents in order, with ``labels`` the shifted
inputs and ``seq_idx`` counting EOS; no speed is reported if that fails. Prints one JSON object (and a Markdown table
row with ``--markdown``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mambatron.config import DataConfig
from mambatron.data import build_loader, load_tokenizer, train_tokenizer
from mambatron.data.prepare import prepare_data, read_shard_tokens
from mambatron.data.tokenizers import expand_inputs, read_text


def check_loader(index_path: Path, seq_len: int, micro_batch: int, n_batches: int = 20) -> None:
    """Raise AssertionError unless the unshuffled stream equals the shards' documents, packed, with right seq_idx."""
    index = json.loads(index_path.read_text())
    eos = index["eos_id"]
    cfg = DataConfig(index=str(index_path), seq_len=seq_len, micro_batch=micro_batch, num_workers=0, shuffle_buffer=0)
    loader = build_loader(cfg, "train")
    rows = []
    for batch in loader:
        ids, labels, seq_idx = (batch[k].numpy() for k in ("input_ids", "labels", "seq_idx"))
        assert (labels[:, :-1] == ids[:, 1:]).all(), "labels are not the inputs shifted by one"
        expected = np.zeros_like(seq_idx)
        expected[:, 1:] = np.cumsum(ids[:, :-1] == eos, axis=1)
        assert (seq_idx == expected).all(), "seq_idx does not count the EOS before each token"
        rows.append(np.concatenate([ids, labels[:, -1:]], axis=1).reshape(-1))
        if len(rows) == n_batches:
            break
    got = np.concatenate(rows)
    docs = []
    for shard_id in loader.spec.epoch_shards(0, 0):
        path = index_path.parent / index["splits"]["train"]["shards"][shard_id]["name"]
        docs.extend(v for _, v in sorted(read_shard_tokens(path, index["tokens_key"]).items()))
        if sum(map(len, docs)) >= len(got):
            break
    want = np.concatenate(docs)[: len(got)]
    assert len(want) == len(got) and (want == got).all(), "packed stream differs from the shard documents"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=["stdlib"], help="corpus (files, globs, or 'stdlib')")
    p.add_argument("--tokenizer", help="tokenizer folder; default: BPE --vocab-size trained on the input")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-docs", type=int, default=0, help="prepare at most this many documents (0 = all)")
    p.add_argument(
        "--doc-chars", type=int, default=0, help="cut the input into documents of this many characters (JSONL)"
    )
    p.add_argument("--shard-tokens", type=int, default=1_000_000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.0, help="stream for at least this long")
    p.add_argument("--work-dir", help="keep the shards here (default: a temporary folder)")
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table row")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tok_dir = args.tokenizer
        if tok_dir is None:
            tok_dir = str(work / "tokenizer")
            train_tokenizer(args.input, args.vocab_size, tok_dir, "bpe", max_train_bytes=20_000_000)
        tok = load_tokenizer(tok_dir)
        inputs = args.input
        if args.doc_chars:
            inputs = [str(work / "docs.jsonl")]
            with open(inputs[0], "w") as f:
                for path in expand_inputs(args.input):
                    text = read_text(path)
                    for i in range(0, len(text), args.doc_chars):
                        f.write(json.dumps({"text": text[i : i + args.doc_chars]}) + "\n")

        c0, t0 = time.process_time(), time.perf_counter()
        index = prepare_data(
            inputs, tok_dir, work / "shards", shard_tokens=args.shard_tokens, workers=1, max_docs=args.max_docs,
            val_fraction=0.001, progress=False,
        )  # fmt: skip
        prep_wall, prep_cpu = time.perf_counter() - t0, time.process_time() - c0
        prep_tokens = sum(s["tokens"] for s in index["splits"].values())

        index_path = work / "shards" / "index.json"
        check_loader(index_path, args.seq_len, args.micro_batch)

        cfg = DataConfig(
            index=str(index_path), seq_len=args.seq_len, micro_batch=args.micro_batch, num_workers=0,
            shuffle_buffer=args.shuffle_buffer, seed=0,
        )  # fmt: skip
        loader = build_loader(cfg, "train")
        tokens = 0
        c0, t0 = time.process_time(), time.perf_counter()
        for batch in loader:
            tokens += batch["input_ids"].numel()
            if time.perf_counter() - t0 >= args.seconds:
                break
        stream_wall, stream_cpu = time.perf_counter() - t0, time.process_time() - c0

    result = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "tokenizer": f"{tok.kind} {tok.vocab_size}",
        "prepare_docs": index["documents"],
        "mean_doc_tokens": round(prep_tokens / max(1, index["documents"])),
        "prepare_tokens": prep_tokens,
        "prepare_tokens_per_s_per_core": round(prep_tokens / prep_wall),
        "prepare_tokens_per_cpu_s": round(prep_tokens / prep_cpu),
        "stream_tokens": tokens,
        "stream_epochs": next(iter(loader.state_dict()["streams"].values()))["epoch"],
        "stream_tokens_per_s_per_core": round(tokens / stream_wall),
        "stream_tokens_per_cpu_s": round(tokens / stream_cpu),
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "shuffle_buffer": args.shuffle_buffer,
        "command": "python tools/bench_data.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(result, indent=1))
    if args.markdown:
        print(
            f"| {result['date']} | {result['machine']} | {result['tokenizer']} | {result['mean_doc_tokens']:,} | "
            f"{result['prepare_tokens_per_cpu_s']:,} ({result['prepare_tokens_per_s_per_core']:,}) | "
            f"{result['stream_tokens_per_cpu_s']:,} ({result['stream_tokens_per_s_per_core']:,}) | "
            f"`{result['command']}` |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
