"""Tokenizer folders: exact round trip, special ids, stable hash, and loading as a Hugging Face tokenizer."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mambatron.data.tokenizers import (
    META_FILE,
    TokenizerError,
    expand_inputs,
    load_tokenizer,
    stdlib_files,
    tokenizer_hash,
    train_tokenizer,
)

SAMPLES = [
    "def  foo(x):\n\treturn x  # ünïcødé 日本語 🙂\n\n  end ",
    " leading space",
    "",
    "\x00\x01 control\r\n",
    "x" * 500,
]
REPO = Path(__file__).resolve().parents[2]


def test_bytes_tokenizer(tmp_path: Path) -> None:
    tok = load_tokenizer(train_tokenizer([], 0, tmp_path / "tok", kind="bytes"))
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (260, 256, 257, 258)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_round_trip(tmp_path: Path, kind: str) -> None:
    corpus = tmp_path / "c.txt"
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(600)]
    corpus.write_text("\n".join(SAMPLES * 5 + lines))
    tok = load_tokenizer(train_tokenizer([str(corpus)], 320, tmp_path / "tok", kind=kind))
    assert tok.kind == kind
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 320
    for text in SAMPLES + ["never seen: ☃ Ω ≈ ∑ \U0001f680"]:
        assert tok.decode(tok.encode(text)) == text


def test_hash_is_of_model_file_and_detects_edits(tmp_path: Path, bpe_tokenizer: Path) -> None:
    import shutil

    tok = load_tokenizer(bpe_tokenizer)
    assert len(tok.hash) == 64 and tok.hash == tokenizer_hash(bpe_tokenizer)
    copy = tmp_path / "copy"
    shutil.copytree(bpe_tokenizer, copy)
    assert tokenizer_hash(copy) == tok.hash
    with open(copy / "tokenizer.model", "ab") as f:
        f.write(b"\0")
    with pytest.raises(TokenizerError, match="retrain"):
        load_tokenizer(copy)
    with pytest.raises(TokenizerError, match="train_tokenizer.py"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_metadata_ids_must_match_the_model(tmp_path: Path, bpe_tokenizer: Path, kind: str) -> None:
    import json
    import shutil

    copy = tmp_path / "copy"
    if kind == "bytes":
        train_tokenizer([], 0, copy, kind="bytes")
    else:
        shutil.copytree(bpe_tokenizer, copy)
    meta = json.loads((copy / "mambatron_tokenizer.json").read_text())
    eos = meta["eos_id"]
    assert load_tokenizer(copy).eos_id == eos
    meta["eos_id"] = meta["pad_id"]  # the hash covers the model file only: this edit keeps it
    (copy / "mambatron_tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(TokenizerError, match=f"eos_id \\({meta['pad_id']} vs {eos}\\)"):
        load_tokenizer(copy)


def test_hf_loads_sentencepiece_folder(bpe_tokenizer: Path) -> None:
    from transformers import AutoTokenizer, LlamaTokenizer

    ours = load_tokenizer(bpe_tokenizer)
    for hf in (AutoTokenizer.from_pretrained(bpe_tokenizer), LlamaTokenizer.from_pretrained(bpe_tokenizer)):
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 3, 0)
        for text in SAMPLES:
            ids = hf.encode(text, add_special_tokens=False)
            assert ids == ours.encode(text)
            assert hf.decode(ids) == text


def test_hf_loads_bytes_folder(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = train_tokenizer([], 0, tmp_path / "tok", kind="bytes")
    hf = AutoTokenizer.from_pretrained(folder)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (256, 257, 258, 259)
    assert len(hf) == 260
    for text in SAMPLES:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == list(text.encode("utf-8"))
        assert hf.decode(ids) == text


def test_stdlib_corpus_is_sorted_python_sources() -> None:
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.endswith(".py") and "site-packages" not in f for f in files)
    assert any(f.endswith("/json/__init__.py") for f in files)
    assert expand_inputs(["stdlib"]) == files


def test_cli_trains_on_stdlib(tmp_path: Path) -> None:
    out = tmp_path / "tok"
    cmd = [sys.executable, str(REPO / "tools/train_tokenizer.py"), "--input", "stdlib", "--vocab-size", "512"]
    subprocess.run([*cmd, "--out", str(out), "--max-train-bytes", "300000"], check=True, capture_output=True)
    tok = load_tokenizer(out)
    text = "import os\n\nprint(os.getcwd())  # ok\n"
    assert tok.vocab_size == 512 and tok.decode(tok.encode(text)) == text
    # Same input, same model file.
    subprocess.run([*cmd, "--out", str(tmp_path / "again"), "--max-train-bytes", "300000"], check=True)
    assert tokenizer_hash(tmp_path / "again") == tok.hash


def test_cli_vocabulary_errors_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    """Too small a vocabulary (names the minimum), an empty corpus, an input that matches nothing: exit 2, one
    'error:' line, no output folder. Too large a vocabulary: a warning, the largest the corpus supports, recorded."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200)))
    (tmp_path / "empty.txt").write_text("")

    def cli(inputs: str, vocab: int, out: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(REPO / "tools/train_tokenizer.py"), "--input", inputs, "--vocab-size", str(vocab)]
        return subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)

    for inputs, vocab, message in [
        (str(corpus), 40, "vocab_size=40 is too small for this corpus"),
        (str(tmp_path / "empty.txt"), 300, "holds no text to train a tokenizer on"),
        (str(tmp_path / "nothing*.txt"), 300, "matched no files; check --input"),
    ]:
        out = tmp_path / f"out-{vocab}-{len(inputs)}"
        run = cli(inputs, vocab, out)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
        assert message in lines[0], lines[0]
        assert not out.exists()
    minimum = int(cli(str(corpus), 40, tmp_path / "x").stderr.split("at least ")[1].split(";")[0])
    assert 260 < minimum < 400  # 256 byte pieces + 4 specials + the corpus's characters
    assert cli(str(corpus), minimum, tmp_path / "min").returncode == 0

    run = cli(str(corpus), 32000, tmp_path / "big")
    assert run.returncode == 0, run.stderr
    tok = load_tokenizer(tmp_path / "big")
    assert minimum < tok.vocab_size < 32000
    assert f"supports at most {tok.vocab_size} pieces, not --vocab-size 32000" in run.stderr
    meta = json.loads((tmp_path / "big" / META_FILE).read_text())
    assert meta["requested_vocab_size"] == 32000 and meta["vocab_size"] == tok.vocab_size
