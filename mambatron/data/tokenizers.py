"""Tokenizers: sentencepiece BPE/unigram with byte fallback, and a byte-level (MambaByte) tokenizer.

A tokenizer folder written by :func:`train_tokenizer` holds:

* ``mambatron_tokenizer.json`` — kind, vocab size, special ids and the tokenizer hash (what :func:`load_tokenizer`
  reads first);
* the model file the hash covers: ``tokenizer.model`` (sentencepiece) or ``bytes.json`` (the canonical description of
  the byte mapping);
* Hugging Face files, so the folder loads with ``transformers.AutoTokenizer.from_pretrained(dir)``:
  ``tokenizer_config.json`` (+ ``tokenizer.model`` read by ``LlamaTokenizer``) or ``tokenizer.json`` for bytes.

Special ids — sentencepiece: unk=0, bos=1, eos=2, pad=3 (Llama order, pad appended). Bytes: byte ``b`` is id ``b``,
then pad=256, bos=257, eos=258, unk=259 (vocab 260).

Round trip: ``decode(encode(text)) == text`` for any text, except that sentencepiece reserves U+2581 ("▁") as its
whitespace marker, so a literal U+2581 comes back as a space.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

META_FILE = "mambatron_tokenizer.json"
SPM_FILE = "tokenizer.model"
BYTES_FILE = "bytes.json"
# The one input name that is not a path: the Python standard library's own sources.
STDLIB = "stdlib"
# sentencepiece skips training lines longer than this many bytes; longer lines are cut rather than dropped.
_MAX_TRAIN_LINE = 4096

Kind = Literal["bpe", "unigram", "bytes"]


class TokenizerError(ValueError):
    """A tokenizer folder is missing, incomplete or does not match what it is used with."""


def stdlib_files() -> list[str]:
    """All ``*.py`` files of this Python's standard library, sorted: a corpus every machine has."""
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    # site-packages lives under the stdlib folder on some layouts; it is not part of the standard library.
    return sorted(f for f in files if "site-packages" not in f and "dist-packages" not in f)


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Expand ``stdlib`` and globs into a file list (globs sorted, order of arguments kept)."""
    files: list[str] = []
    for item in inputs:
        if item == STDLIB:
            files.extend(stdlib_files())
        elif any(c in item for c in "*?["):
            matched = sorted(glob.glob(item, recursive=True))
            if not matched:
                raise FileNotFoundError(f"input glob {item!r} matched no files")
            files.extend(matched)
        else:
            if not os.path.exists(item):
                raise FileNotFoundError(f"input {item!r} does not exist (pass files, globs or 'stdlib')")
            files.append(item)
    return files


def read_text(path: str) -> str:
    """Read a text file as UTF-8; undecodable bytes become U+FFFD so one bad file cannot stop a run."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return f.read()


def _training_lines(files: list[str], max_bytes: int) -> Iterator[str]:
    seen = 0
    for path in files:
        for line in read_text(path).split("\n"):
            if not line.strip():
                continue
            line = line[:_MAX_TRAIN_LINE]
            seen += len(line)
            yield line
            if max_bytes and seen >= max_bytes:
                return


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def byte_to_unicode() -> dict[int, str]:
    """The reversible byte → printable character map used by byte-level BPE tokenizers (GPT-2 convention)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    mapping: dict[int, str] = {}
    shifted = 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eos: int
    unk: int


SPM_SPECIALS = SpecialIds(pad=3, bos=1, eos=2, unk=0)
BYTE_SPECIALS = SpecialIds(pad=256, bos=257, eos=258, unk=259)
_SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def train_tokenizer(
    inputs: Iterable[str],
    vocab_size: int,
    out_dir: str | Path,
    kind: Kind = "bpe",
    max_train_bytes: int = 200_000_000,
    seed: int = 0,
) -> Path:
    """Train (or, for ``kind="bytes"``, write) a tokenizer into ``out_dir`` and return the folder.

    ``inputs`` are files, globs or ``stdlib``. ``vocab_size`` is ignored for bytes (always 260). Training reads at
    most ``max_train_bytes`` characters of text (whole corpus order, deterministic).
    """
    out = Path(out_dir)
    if kind == "bytes":
        out.mkdir(parents=True, exist_ok=True)
        _write_bytes_tokenizer(out)
    elif kind in ("bpe", "unigram"):
        try:
            files = expand_inputs(inputs)
        except FileNotFoundError as e:
            raise TokenizerError(f"{e}; check --input") from None
        if not files:
            raise TokenizerError("no input files to train the tokenizer on; check --input")
        _train_sentencepiece(files, vocab_size, out, kind, max_train_bytes, seed)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use bpe, unigram or bytes")
    return out


def _train_sentencepiece(files: list[str], vocab_size: int, out: Path, kind: str, max_bytes: int, seed: int) -> None:
    if next(_training_lines(files, max_bytes), None) is None:
        raise TokenizerError(f"the input ({len(files)} file(s)) holds no text to train a tokenizer on; check --input")
    requested = vocab_size
    try:
        model = _sentencepiece_model(files, vocab_size, kind, max_bytes, seed)
    except RuntimeError as e:
        # sentencepiece reports these as "INTERNAL" errors; turn them into what the user can do about them.
        message = str(e)
        small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
        large = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
        if small:
            raise TokenizerError(
                f"vocab_size={vocab_size} is too small for this corpus: byte fallback (256 byte pieces), the special "
                f"tokens and the corpus's own characters need at least {small.group(1)}; use {small.group(1)} or more"
            ) from None
        if not large:
            raise TokenizerError(f"sentencepiece could not train on this input: {message.strip()[:300]}") from None
        # More pieces than the corpus has merges for: train the largest vocabulary it supports, and record both.
        vocab_size = int(large.group(1))
        model = _sentencepiece_model(files, vocab_size, kind, max_bytes, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / SPM_FILE).write_bytes(model)
    hf_config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "model_max_length": 1_000_000_000,
        **{f"{name}_token": tok for name, tok in _SPECIAL_TOKENS.items()},
    }
    _write_json(out / "tokenizer_config.json", hf_config)
    _write_json(out / "special_tokens_map.json", {f"{n}_token": t for n, t in _SPECIAL_TOKENS.items()})
    extra = {"requested_vocab_size": requested} if requested != vocab_size else {}
    _write_meta(out, "bpe" if kind == "bpe" else "unigram", vocab_size, SPM_SPECIALS, [SPM_FILE], extra)


def _sentencepiece_model(files: list[str], vocab_size: int, kind: str, max_bytes: int, seed: int) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    s = SPM_SPECIALS
    # Written from memory rather than via model_prefix, which would embed the output path in the model file and
    # make the hash depend on where the folder was written.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(files, max_bytes),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=kind,
        byte_fallback=True,
        unk_id=s.unk,
        bos_id=s.bos,
        eos_id=s.eos,
        pad_id=s.pad,
        # Exact round trip of code and prose: no normalisation, keep every space, no invented leading space.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=_MAX_TRAIN_LINE * 4,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _write_bytes_tokenizer(out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    s = BYTE_SPECIALS
    chars = byte_to_unicode()
    spec = {
        "kind": "bytes",
        "bytes": "id b = byte b (0..255)",
        "specials": {name: getattr(s, name) for name in ("pad", "bos", "eos", "unk")},
    }
    _write_json(out / BYTES_FILE, spec)
    tk = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    ordered = sorted(("pad", "bos", "eos", "unk"), key=lambda n: getattr(s, n))
    tk.add_special_tokens([AddedToken(_SPECIAL_TOKENS[n], special=True, normalized=False) for n in ordered])
    tk.save(str(out / "tokenizer.json"))
    hf_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000_000,
        **{f"{name}_token": tok for name, tok in _SPECIAL_TOKENS.items()},
    }
    _write_json(out / "tokenizer_config.json", hf_config)
    _write_meta(out, "bytes", 260, s, [BYTES_FILE])


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _hash_files(folder: Path, files: list[str]) -> str:
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0" + bytes.fromhex(sha256_file(folder / name)))
    return h.hexdigest() if len(files) > 1 else sha256_file(folder / files[0])


def _write_meta(out: Path, kind: str, vocab_size: int, s: SpecialIds, files: list[str], extra=None) -> None:
    meta = {
        **(extra or {}),
        "kind": kind,
        "vocab_size": vocab_size,
        "pad_id": s.pad,
        "bos_id": s.bos,
        "eos_id": s.eos,
        "unk_id": s.unk,
        "files": files,
        "hash": _hash_files(out, files),
    }
    _write_json(out / META_FILE, meta)


def _read_meta(folder: Path) -> dict:
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise TokenizerError(
            f"{folder} is not a mambatron tokenizer folder ({META_FILE} missing); "
            "create one with tools/train_tokenizer.py"
        )
    return json.loads(meta_path.read_text())


def tokenizer_hash(folder: str | Path) -> str:
    """sha256 of the tokenizer's model file(s), recomputed from disk (not trusted from the metadata)."""
    folder = Path(folder)
    meta = _read_meta(folder)
    return _hash_files(folder, meta["files"])


class Tokenizer:
    """Common interface: ``encode(text) -> list[int]``, ``decode(ids) -> str``, ids, ``vocab_size``, ``hash``."""

    kind: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int
    hash: str
    path: Path

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an int64 numpy array."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special ids are dropped."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, hash={self.hash[:12]})"


def _check_ids(folder: Path, meta: dict, model: dict[str, int]) -> None:
    wrong = [f"{k} ({meta.get(k)} vs {v})" for k, v in model.items() if meta.get(k) != v]
    if wrong:
        raise TokenizerError(
            f"{folder}: {META_FILE} disagrees with the model file on {', '.join(wrong)}; "
            "the folder was modified after training — retrain it with tools/train_tokenizer.py"
        )


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, folder: Path, meta: dict) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(folder / SPM_FILE))
        self.vocab_size = int(self._sp.get_piece_size())
        # The hash covers the model file only, so ids read from the metadata must agree with the model's own.
        sp = self._sp
        _check_ids(folder, meta, {"vocab_size": self.vocab_size, "pad_id": sp.pad_id(), "bos_id": sp.bos_id(),
                                  "eos_id": sp.eos_id(), "unk_id": sp.unk_id()})  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class ByteTokenizer(Tokenizer):
    def __init__(self, folder: Path, meta: dict) -> None:
        specials = json.loads((folder / BYTES_FILE).read_text())["specials"]
        _check_ids(folder, meta, {"vocab_size": 260, **{f"{name}_id": i for name, i in specials.items()}})
        self.vocab_size = int(meta["vocab_size"])

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        data = np.asarray(list(ids), dtype=np.int64)
        return data[data < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load a tokenizer folder written by :func:`train_tokenizer` (or ``tools/train_tokenizer.py``)."""
    folder = Path(folder)
    meta = _read_meta(folder)
    digest = tokenizer_hash(folder)
    if digest != meta["hash"]:
        raise TokenizerError(
            f"{folder}: model file hash {digest[:12]} differs from the recorded {meta['hash'][:12]}; "
            "the folder was modified after training — retrain it with tools/train_tokenizer.py"
        )
    cls = ByteTokenizer if meta["kind"] == "bytes" else SentencePieceTokenizer
    tok = cls(folder, meta)
    tok.kind = meta["kind"]
    tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id = (int(meta[k]) for k in ("pad_id", "bos_id", "eos_id", "unk_id"))
    tok.hash = digest
    tok.path = folder
    return tok
