"""Shared fixtures: a small synthetic corpus, tokenizers and prepared shards (built once per test session)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mambatron.config import DataConfig
from mambatron.data.prepare import prepare_data
from mambatron.data.tokenizers import load_tokenizer, train_tokenizer

WORDS = "state space model selective scan token shard pack resume epoch worker rank ünï 日本 🙂 tab\tnew\nline".split(
    " "
)


def make_corpus(root: Path, n_docs: int = 64, seed: int = 0) -> list[str]:
    """Unique documents of 5..600 characters (some longer than a row), one text file each; returns the texts."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n_docs):
        n_words = rng.choice([1, 3, 10, 40, 80, 120])
        body = " ".join(rng.choice(WORDS) for _ in range(n_words))
        text = f"doc {i}: {body}"
        texts.append(text)
        (root / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return texts


@dataclass
class Prepared:
    corpus: Path
    texts: list[str]
    tokenizer: Path
    data: Path

    @property
    def index_path(self) -> Path:
        return self.data / "index.json"

    def index(self) -> dict:
        return json.loads(self.index_path.read_text())

    def cfg(self, **kw: object) -> DataConfig:
        base = dict(index=str(self.index_path), tokenizer=str(self.tokenizer), seq_len=32, micro_batch=2)
        base.update(kw)
        return DataConfig(**base)

    def split_docs(self, split: str) -> list[np.ndarray]:
        """Expected token arrays (with EOS) of the split's documents, in input order."""
        tok = load_tokenizer(self.tokenizer)
        index = self.index()
        n = len(self.texts)
        frac_docs = []
        for i, text in enumerate(self.texts):
            is_val = int((i + 1) * VAL_FRACTION) > int(i * VAL_FRACTION)
            if (split == "val") == is_val:
                frac_docs.append(np.append(tok.encode_array(text), tok.eos_id))
        assert index["documents"] == n
        return frac_docs


VAL_FRACTION = 0.125


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """Byte-level tokenizer (fast) and ~12 train shards of ~1000 tokens."""
    root = tmp_path_factory.mktemp("bytes")
    texts = make_corpus(root / "corpus")
    tok = train_tokenizer([], 0, root / "tok", kind="bytes")
    prepare_data(
        [str(root / "corpus" / "*.txt")],
        tok,
        root / "data",
        shard_tokens=1000,
        val_fraction=VAL_FRACTION,
        workers=1,
        progress=False,
    )
    return Prepared(root / "corpus", texts, tok, root / "data")


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bpe")
    make_corpus(root / "corpus", n_docs=200, seed=1)
    return train_tokenizer([str(root / "corpus" / "*.txt")], 400, root / "tok", kind="bpe")


def rows_of(batch: dict) -> np.ndarray:
    """The packed ``seq_len + 1`` rows a batch was cut from."""
    return np.concatenate([batch["input_ids"].numpy(), batch["labels"].numpy()[:, -1:]], axis=1)


def docs_of(token_stream: np.ndarray, eos: int) -> list[np.ndarray]:
    """Complete documents (ending with EOS) of a token stream; a trailing partial document is dropped."""
    ends = np.flatnonzero(token_stream == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [token_stream[s : e + 1] for s, e in zip(starts, ends)]


def as_sorted_keys(docs: list[np.ndarray]) -> list[bytes]:
    return sorted(d.astype(np.int64).tobytes() for d in docs)
