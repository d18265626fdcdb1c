"""Shard preparation: deterministic bytes, webdataset-readable tars, index contents, JSONL input, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mambatron.data.prepare import PrepareError, prepare_data, read_shard_tokens, token_dtype, verify_shards
from mambatron.data.tokenizers import load_tokenizer

from .conftest import Prepared, as_sorted_keys

REPO = Path(__file__).resolve().parents[2]


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_index_describes_shards(prepared: Prepared) -> None:
    index = prepared.index()
    tok = load_tokenizer(prepared.tokenizer)
    assert index["dtype"] == "uint16" and index["tokens_key"] == "tokens.u16"
    assert index["tokenizer_hash"] == tok.hash and index["vocab_size"] == 260 and index["eos_id"] == 258
    train = index["splits"]["train"]
    assert len(train["shards"]) >= 8, "fixture should give several shards"
    for split in ("train", "val"):
        docs = []
        for shard in index["splits"][split]["shards"]:
            found = read_shard_tokens(prepared.data / shard["name"])
            assert len(found) == shard["docs"]
            assert sum(len(v) for v in found.values()) == shard["tokens"]
            docs.extend(found.values())
        assert as_sorted_keys(docs) == as_sorted_keys(prepared.split_docs(split))
    assert index["splits"]["val"]["docs"] == len(prepared.texts) // 8


def test_shards_readable_by_webdataset(prepared: Prepared) -> None:
    import webdataset as wds

    names = [s["name"] for s in prepared.index()["splits"]["train"]["shards"]]
    urls = [str(prepared.data / n) for n in names]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == prepared.index()["splits"]["train"]["docs"]
    tokens = np.frombuffer(samples[0]["tokens.u16"], dtype="<u2")
    assert tokens[-1] == 258
    assert samples[0]["__key__"] == "0000000000"


def test_prepare_is_deterministic_across_worker_counts(prepared: Prepared, tmp_path: Path) -> None:
    glob = str(prepared.corpus / "*.txt")
    kw = dict(shard_tokens=1000, val_fraction=0.125, progress=False)
    prepare_data([glob], prepared.tokenizer, tmp_path / "a", workers=2, **kw)
    prepare_data([glob], prepared.tokenizer, tmp_path / "b", workers=2, **kw)
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b") == _shard_bytes(prepared.data)


def test_jsonl_field_and_max_docs(prepared: Prepared, tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for i, text in enumerate(prepared.texts):
            f.write(json.dumps({"id": i, "body": text}) + "\n")
    index = prepare_data(
        [str(path)],
        prepared.tokenizer,
        tmp_path / "j",
        field_name="body",
        val_fraction=0,
        max_docs=10,
        workers=1,
        progress=False,
    )
    assert index["documents"] == 10 and index["splits"]["val"]["docs"] == 0
    tok = load_tokenizer(prepared.tokenizer)
    found = read_shard_tokens(tmp_path / "j" / index["splits"]["train"]["shards"][0]["name"])
    assert tok.decode(found["0000000003"]) == prepared.texts[3]


def test_jsonl_null_text_is_an_empty_document(prepared: Prepared, tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["abc", None, "", "de"]) + "\n")
    index = prepare_data([str(path)], prepared.tokenizer, tmp_path / "j", val_fraction=0, workers=1, progress=False)
    assert (index["documents"], index["empty_documents"], index["splits"]["train"]["tokens"]) == (4, 2, 4 + 3)
    tok = load_tokenizer(prepared.tokenizer)
    found = read_shard_tokens(tmp_path / "j" / index["splits"]["train"]["shards"][0]["name"])
    assert {k: tok.decode(v) for k, v in found.items()} == {"0000000000": "abc", "0000000003": "de"}
    path.write_text(json.dumps(["text"]) + "\n")
    with pytest.raises(ValueError, match="JSONL record is a list, not an object with a 'text' field"):
        prepare_data([str(path)], prepared.tokenizer, tmp_path / "k", workers=1, progress=False)


def test_failed_run_leaves_the_earlier_dataset_intact(prepared: Prepared, tmp_path: Path) -> None:
    """A re-run into an existing dataset that fails (a bad --field on the first record, or a bad record half way)
    leaves the earlier index and shards exactly as they were, and no temporary files."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(100)))
    out = tmp_path / "out"
    prepare_data([str(path)], prepared.tokenizer, out, workers=1, progress=False, shard_tokens=200)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "index.json" in before and len(before) > 2
    with pytest.raises(PrepareError, match="docs.jsonl:1: the JSONL record has no field 'body'"):
        prepare_data([str(path)], prepared.tokenizer, out, field_name="body", workers=1, progress=False)
    path.write_text("".join(json.dumps({"text": f"other {i}"}) + "\n" for i in range(50)) + '{"body": 1}\n')
    with pytest.raises(PrepareError, match="docs.jsonl:51: the JSONL record has no field 'text'"):
        prepare_data([str(path)], prepared.tokenizer, out, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert verify_shards(out / "index.json") == []
    # A successful re-run with fewer shards replaces the dataset and leaves none of the old shards behind.
    path.write_text("".join(json.dumps({"text": f"short {i}"}) + "\n" for i in range(5)))
    index = prepare_data([str(path)], prepared.tokenizer, out, workers=1, progress=False, val_fraction=0)
    listed = {shard["name"] for split in index["splits"].values() for shard in split["shards"]}
    assert {p.name for p in out.iterdir()} == listed | {"index.json"}


def test_token_dtype() -> None:
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")


def test_cli_on_stdlib(tmp_path: Path, bpe_tokenizer: Path) -> None:
    cmd = [sys.executable, str(REPO / "tools/prepare_data.py"), "--input", "stdlib", "--tokenizer", str(bpe_tokenizer)]
    cmd += ["--max-docs", "40", "--shard-tokens", "20000", "--val-fraction", "0.1", "--workers", "2", "--quiet"]
    subprocess.run([*cmd, "--out", str(tmp_path / "s")], check=True, capture_output=True)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["documents"] == 40 and index["splits"]["val"]["docs"] == 4
    assert index["splits"]["train"]["tokens"] > 20000 and len(index["splits"]["train"]["shards"]) >= 2


def test_verify_finds_corrupt_shards(prepared: Prepared, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared.data, copy)
    assert verify_shards(copy / "index.json") == []
    data = bytearray((copy / "train-000001.tar").read_bytes())
    data[600] ^= 1
    (copy / "train-000001.tar").write_bytes(bytes(data))
    (copy / "val-000000.tar").unlink()
    problems = verify_shards(copy / "index.json")
    assert len(problems) == 2 and "train-000001.tar" in problems[0] and "val-000000.tar: missing" in problems[1]
    run = subprocess.run(
        [sys.executable, str(REPO / "tools/prepare_data.py"), "--verify", str(copy / "index.json")], capture_output=True
    )
    assert run.returncode == 1 and b"2 bad shard(s)" in run.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools/prepare_data.py"), *args, "--workers", "1", "--quiet"],
                          capture_output=True, text=True)  # fmt: skip


def test_bad_input_is_one_line_naming_file_and_line(prepared: Prepared, tmp_path: Path) -> None:
    """Malformed JSON, a record without the field and an input with no text: exit 2 and one line that names the
    file and line (no traceback); the earlier dataset in --out stays as it was."""
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)))
    out = tmp_path / "out"
    assert run_cli("--input", str(good), "--tokenizer", str(prepared.tokenizer), "--out", str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cases = {
        "broken.jsonl": ('{"text": "ok"}\n\n{"text": "unterminated\n', "broken.jsonl:3: not valid JSON"),
        "list.jsonl": ('["a", "b"]\n', "list.jsonl:1: the JSONL record is a list"),
        "empty.jsonl": ('{"text": ""}\n{"text": null}\n', "the input holds no text (2 document(s), all empty)"),
        "blank.txt": ("", "the input holds no text (1 document(s), all empty)"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        run = run_cli("--input", str(tmp_path / name), "--tokenizer", str(prepared.tokenizer), "--out", str(out))
        assert run.returncode == 2, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], run.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    run = run_cli("--input", str(tmp_path / "nothing*.txt"), "--tokenizer", str(prepared.tokenizer), "--out", str(out))
    assert run.returncode == 2 and "matched no files; check --input" in run.stderr, run.stderr


def test_non_utf8_bytes_are_counted_and_reported(prepared: Prepared, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait \xff\xfe and more text")
    (tmp_path / "b.txt").write_bytes("clean text, \u00e9t\u00e9".encode())
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "bad \xc3 byte"}\n{"text": "fine"}\n')
    out = tmp_path / "out"
    run = run_cli("--input", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), str(tmp_path / "c.jsonl"),
                  "--tokenizer", str(prepared.tokenizer), "--out", str(out), "--val-fraction", "0")  # fmt: skip
    assert run.returncode == 0, run.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["replaced_bytes"] == 4 and index["replaced_documents"] == 2
    assert "warning: 2 document(s) held 4 byte(s) that are not UTF-8" in run.stderr


@pytest.mark.parametrize(
    "mode, docs", [("file", ["one\ntwo\n\nthree four\n"]), ("line", ["one", "two", "three four"]),
                   ("paragraph", ["one\ntwo", "three four"])],
)  # fmt: skip
def test_txt_docs(mode: str, docs: list[str], prepared: Prepared, tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("one\ntwo\n\nthree four\n")
    out = tmp_path / mode
    index = prepare_data([str(path)], prepared.tokenizer, out, workers=1, progress=False, val_fraction=0,
                         txt_docs=mode)  # fmt: skip
    assert index["documents"] == len(docs)
    tok = load_tokenizer(prepared.tokenizer)
    samples = read_shard_tokens(out / index["splits"]["train"]["shards"][0]["name"], index["tokens_key"])
    got = [tok.decode([int(t) for t in samples[k][:-1]]) for k in sorted(samples)]
    assert got == docs
    with pytest.raises(PrepareError, match="txt_docs='lines' must be one of file, line, paragraph"):
        prepare_data([str(path)], prepared.tokenizer, out, txt_docs="lines")


VAL_CASES = [(1000, 0.001, 50, 50), (400, 0.001, 50, 40), (40, 0.001, 50, 4), (400, 0.5, 50, 200), (400, 0.0, 50, 0)]


@pytest.mark.parametrize("docs, fraction, minimum, expected", VAL_CASES)
def test_validation_split_has_a_minimum(docs, fraction, minimum, expected, prepared: Prepared, tmp_path: Path) -> None:
    """A small fraction of a small corpus would leave one validation document or none: the split holds at least
    --min-val-docs (at most a tenth of the corpus), unless --val-fraction is 0; the index records the fraction used."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(docs)))
    index = prepare_data([str(path)], prepared.tokenizer, tmp_path / "out", workers=1, progress=False,
                         val_fraction=fraction, min_val_docs=minimum)  # fmt: skip
    assert index["splits"]["val"]["docs"] == expected
    assert index["documents"] == docs and index["val_fraction"] >= fraction
