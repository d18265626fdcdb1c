"""Raw text → tokenized WebDataset shards + ``index.json`` (the engine behind ``tools/prepare_data.py``).

Every document becomes one sample ``<key>.tokens.u16`` (or ``.tokens.u32`` when the vocabulary does not fit in 16
bits): the document's token ids followed by EOS, as raw little-endian integers, so reading a sample is a single
``np.frombuffer``. ``<key>`` is the document's position in the input (10 digits), so samples can be sorted back
into input order.

Inputs are read in argument order (globs sorted). Text files are one document each by default (``txt_docs="file"``),
or one per non-empty line (``"line"``, as Hugging Face's ``load_dataset("text")``) or per blank-line-separated
paragraph (``"paragraph"``); ``.jsonl``/``.jsonl.gz`` files hold one document per line (the ``field`` key). Bytes that
are not UTF-8 become U+FFFD and are counted (``replaced_bytes`` in the index). Bad input raises
:class:`PrepareError`, naming the file and line. Documents are tokenized in worker processes, results are consumed in
input order, and tars are written with fixed metadata (mtime 0, fixed owner, USTAR), so the same input gives
byte-identical shards whatever the number of workers.

Document ``i`` goes to the validation split when ``floor((i + 1) * f) > floor(i * f)``: an evenly spread,
deterministic ``f`` fraction of the documents.
"""

from __future__ import annotations

import codecs
import gzip
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tarfile
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mambatron.data.tokenizers import Tokenizer, expand_inputs, load_tokenizer, sha256_file

INDEX_FORMAT = "mambatron.shards.v1"
SPLITS = ("train", "val")
# Documents sent to a worker per task: big enough to amortise inter-process traffic, small enough to balance.
_TASK_DOCS = 32

_worker_tokenizer: Tokenizer | None = None
TXT_DOCS = ("file", "line", "paragraph")


class PrepareError(ValueError):
    """Bad input to :func:`prepare_data`; the message names the file (and line) and the fix."""


_replaced = threading.local()


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _replaced.bytes += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("mambatron-count-replace", _count_and_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """``data`` decoded as UTF-8, undecodable bytes replaced by U+FFFD, and how many bytes were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        _replaced.bytes = 0
        return data.decode("utf-8", "mambatron-count-replace"), _replaced.bytes


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (always little-endian on disk)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def tokens_key(dtype: np.dtype) -> str:
    """The WebDataset extension that holds a document's raw token bytes."""
    return f"tokens.u{8 * np.dtype(dtype).itemsize}"


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz", ".ndjson"))


def _iter_docs(files: list[str], txt_docs: str) -> Iterator[tuple[str, bytes | str, str]]:
    """``(kind, payload, where)`` per document in input order: ``("file", path, path)`` for a whole text file (read
    by the worker), ``("json", line, "path:N")`` or ``("text", bytes, "path:N")``."""
    for path in files:
        if _is_jsonl(path):
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield "json", line, f"{path}:{lineno}"
        elif txt_docs == "file":
            yield "file", path, path
        else:
            with open(path, "rb") as f:
                data = f.read()
            lineno, start, paragraph = 0, 0, []
            for lineno, line in enumerate(data.split(b"\n"), 1):
                if txt_docs == "line":
                    if line.strip():
                        yield "text", line.rstrip(b"\r"), f"{path}:{lineno}"
                elif line.strip():
                    start = start or lineno
                    paragraph.append(line)
                elif paragraph:
                    yield "text", b"\n".join(paragraph), f"{path}:{start}"
                    start, paragraph = 0, []
            if paragraph:
                yield "text", b"\n".join(paragraph), f"{path}:{start}"


def _iter_tasks(files: list[str], max_docs: int, txt_docs: str) -> Iterator[list[tuple[str, bytes | str, str]]]:
    """Batches of :func:`_iter_docs` items, at most ``max_docs`` items in all (0: no limit)."""
    batch = []
    for count, item in enumerate(_iter_docs(files, txt_docs), 1):
        batch.append(item)
        if len(batch) == _TASK_DOCS or count == max_docs:
            yield batch
            batch = []
        if count == max_docs:
            return
    if batch:
        yield batch


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _document_text(kind: str, payload: bytes | str, where: str, field_name: str) -> tuple[str, int]:
    """The text of one :func:`_iter_docs` item and the number of non-UTF-8 bytes replaced in it."""
    if kind == "file":
        with open(payload, "rb") as f:
            return decode_utf8(f.read())
    text, replaced = decode_utf8(payload)
    if kind == "text":
        return text, replaced
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise PrepareError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix or remove that line") from None
    if not isinstance(obj, dict):
        raise PrepareError(
            f"{where}: the JSONL record is a {type(obj).__name__}, not an object with a {field_name!r} field"
        )
    if field_name not in obj:
        raise PrepareError(
            f"{where}: the JSONL record has no field {field_name!r} (keys: {sorted(obj)[:10]}); pass --field KEY"
        )
    # null is a missing text (an empty document), not the text "None".
    return ("" if obj[field_name] is None else str(obj[field_name])), replaced


def _tokenize_task(args: tuple[list[tuple[str, bytes | str, str]], str, str]) -> list[tuple[bytes, int, int, int]]:
    """Tokenize one batch → ``(raw token bytes incl. EOS, n_tokens, n_chars, replaced bytes)`` per document (empty
    documents: 0 tokens)."""
    task, field_name, dtype_str = args
    tok = _worker_tokenizer
    assert tok is not None
    dtype = np.dtype(dtype_str)
    out = []
    for kind, payload, where in task:
        text, replaced = _document_text(kind, payload, where, field_name)
        if not text:
            out.append((b"", 0, 0, replaced))
            continue
        ids = tok.encode_array(text)
        arr = np.empty(len(ids) + 1, dtype=dtype)
        arr[:-1] = ids
        arr[-1] = tok.eos_id
        out.append((arr.tobytes(), len(arr), len(text), replaced))
    return out


def _ordered_map(pool: Any, tasks: Iterable[Any], ahead: int) -> Iterator[list[tuple[bytes, int, int, int]]]:
    """``pool.imap`` in order, but with at most ``ahead`` tasks in flight: ``imap`` would read the whole input into
    its task queue at once, which a large JSONL corpus does not fit."""
    in_flight: deque[Any] = deque()
    for task in tasks:
        in_flight.append(pool.apply_async(_tokenize_task, (task,)))
        if len(in_flight) >= ahead:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


@dataclass
class _SplitWriter:
    """Writes one split's shards, starting a new tar once the current one holds ``shard_tokens`` tokens."""

    out_dir: Path
    split: str
    key_ext: str
    shard_tokens: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    _tar: Any = None
    _file: Any = None

    def add(self, key: str, data: bytes, n_tokens: int) -> None:
        import webdataset as wds

        if self._tar is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._file = open(self.out_dir / name, "wb")
            # Fixed mtime/owner/mode and USTAR: the tar's bytes depend only on its samples.
            self._tar = wds.TarWriter(self._file, user="mambatron", group="mambatron", mtime=0, encoder=False)
            self.shards.append({"name": name, "tokens": 0, "docs": 0})
        self._tar.write({"__key__": key, self.key_ext: data})
        self.shards[-1]["tokens"] += n_tokens
        self.shards[-1]["docs"] += 1
        if self.shards[-1]["tokens"] >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        self._tar = self._file = None
        shard = self.shards[-1]
        path = self.out_dir / shard["name"]
        shard["bytes"] = path.stat().st_size
        shard["sha256"] = sha256_file(path)


def prepare_data(
    inputs: Iterable[str],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    shard_tokens: int = 50_000_000,
    field_name: str = "text",
    val_fraction: float = 0.001,
    workers: int = 0,
    max_docs: int = 0,
    progress: bool = True,
    txt_docs: str = "file",
    min_val_docs: int = 50,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into shards under ``out_dir`` and write ``out_dir/index.json``; return the index.

    ``workers``: tokenizer processes (0 = one per CPU core, 1 = in this process). ``max_docs``: stop after this many
    documents (0 = all). ``txt_docs``: what one document of a text file is (:data:`TXT_DOCS`). With
    ``val_fraction > 0`` the validation split holds at least ``min_val_docs`` documents (at most a tenth of the
    corpus): the fraction is raised for small corpora, so that validation loss averages over more than a handful of
    documents; ``index["val_fraction"]`` records the fraction used.
    """
    if txt_docs not in TXT_DOCS:
        raise PrepareError(f"txt_docs={txt_docs!r} must be one of {', '.join(TXT_DOCS)}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens={shard_tokens} must be positive")
    try:
        files = expand_inputs(inputs)
    except FileNotFoundError as e:
        raise PrepareError(f"{e}; check --input") from None
    if not files:
        raise PrepareError("no input files: --input matched nothing")
    tok = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(tok.vocab_size)
    key_ext = tokens_key(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Everything is written into a temporary folder first: a run that fails (a bad --field, a malformed record, an
    # interrupt) leaves an earlier dataset in ``out`` exactly as it was.
    staging = Path(tempfile.mkdtemp(prefix=".tmp-prepare-", dir=out))
    try:
        if val_fraction > 0 and min_val_docs > 0:
            # Count the documents (reading is far faster than tokenizing), but only as far as it matters: from
            # min_val_docs / val_fraction documents on, the fraction alone holds out enough.
            enough = math.ceil(min_val_docs / val_fraction)
            n_docs = sum(1 for _ in zip(range(min(max_docs or enough, enough)), _iter_docs(files, txt_docs)))
            val_fraction = min(max(val_fraction, min_val_docs / max(n_docs, 1)), max(val_fraction, 0.1))
        index = _prepare_into(files, tok, dtype, key_ext, staging, shard_tokens, field_name, val_fraction, workers,
                              max_docs, tokenizer_dir, progress, txt_docs)  # fmt: skip
        index["val_fraction"] = val_fraction
        _publish(staging, out, index)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return index


def _publish(staging: Path, out: Path, index: dict[str, Any]) -> None:
    """Move a finished dataset from ``staging`` into ``out``, replacing an earlier one there. The old index goes
    first (so no index ever describes tars that changed), the new one last; old shards the new index does not list
    are removed."""
    (out / "index.json").unlink(missing_ok=True)
    names = {shard["name"] for split in index["splits"].values() for shard in split["shards"]}
    for name in sorted(names):
        os.replace(staging / name, out / name)
    for old in out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if old.name not in names and old.name.split("-")[0] in SPLITS:
            old.unlink()
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    tmp.replace(out / "index.json")


def _prepare_into(files, tok, dtype, key_ext, out, shard_tokens, field_name, val_fraction, workers, max_docs,
                  tokenizer_dir, progress, txt_docs) -> dict[str, Any]:  # fmt: skip
    writers = {s: _SplitWriter(out, s, key_ext, shard_tokens) for s in SPLITS}
    workers = workers or os.cpu_count() or 1
    tasks = ((t, field_name, dtype.str) for t in _iter_tasks(files, max_docs, txt_docs))

    from tqdm import tqdm

    bar = tqdm(
        total=None
        if txt_docs != "file" or any(_is_jsonl(f) for f in files)
        else (min(len(files), max_docs) if max_docs else len(files)),
        unit="doc",
        desc="prepare",
        disable=not progress,
        file=sys.stderr,
    )
    pool = None
    if workers > 1:
        pool = mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
            workers, initializer=_init_worker, initargs=(str(tokenizer_dir),)
        )
        results: Iterable[list[tuple[bytes, int, int, int]]] = _ordered_map(pool, tasks, ahead=4 * workers)
    else:
        _init_worker(str(tokenizer_dir))
        results = map(_tokenize_task, tasks)
    doc_index = 0
    empty = 0
    chars = 0
    replaced_bytes = replaced_docs = 0
    try:
        for batch in results:
            for data, n_tokens, n_chars, replaced in batch:
                index = doc_index
                doc_index += 1
                replaced_bytes += replaced
                replaced_docs += replaced > 0
                if n_tokens == 0:
                    empty += 1
                    continue
                chars += n_chars
                is_val = math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)
                writers["val" if is_val else "train"].add(f"{index:010d}", data, n_tokens)
            bar.update(len(batch))
            bar.set_postfix(tokens=sum(s["tokens"] for w in writers.values() for s in w.shards), refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    for w in writers.values():
        w.close()
    if not any(w.shards for w in writers.values()):
        what = f"{doc_index} document(s), all empty" if doc_index else "no documents"
        hint = " (is --field right?)" if any(_is_jsonl(f) for f in files) else ""
        raise PrepareError(f"the input holds no text ({what}){hint}; nothing was written")
    index = {
        "format": INDEX_FORMAT,
        "dtype": dtype.name,
        "tokens_key": key_ext,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "tokenizer_kind": tok.kind,
        "tokenizer_hash": tok.hash,
        "documents": doc_index,
        "empty_documents": empty,
        "characters": chars,
        "replaced_bytes": replaced_bytes,
        "replaced_documents": replaced_docs,
        "splits": {
            s: {
                "tokens": sum(x["tokens"] for x in w.shards),
                "docs": sum(x["docs"] for x in w.shards),
                "shards": w.shards,
            }
            for s, w in writers.items()
        },
    }
    return index


def read_shard_tokens(path: str | Path, key_ext: str = "tokens.u16") -> dict[str, np.ndarray]:
    """All documents of one local shard as ``{key: tokens}`` (a debugging helper; training streams instead)."""
    dtype = np.dtype("<u2") if key_ext.endswith("16") else np.dtype("<u4")
    docs = {}
    with tarfile.open(path) as tf:
        for member in tf:
            key, _, ext = member.name.partition(".")
            if ext == key_ext:
                docs[key] = np.frombuffer(tf.extractfile(member).read(), dtype=dtype)
    return docs


def verify_shards(index_path: str | Path) -> list[str]:
    """Check every local shard listed in ``index_path`` against its recorded size and sha256; return the problems."""
    index_path = Path(index_path)
    index = json.loads(index_path.read_text())
    problems = []
    for split in index["splits"].values():
        for shard in split["shards"]:
            path = index_path.parent / shard["name"]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: size or sha256 differs from the index (corrupt or replaced)")
    return problems
