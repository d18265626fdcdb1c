"""Streaming loader: exact tokens, rank/worker coverage, seq_idx, exact resume in a fresh process, HTTP and pipe
shards, and clear errors for bad shards and wrong tokenizers."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import logging
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mambatron.config import ConfigError
from mambatron.data import DataIndexError, DataPositionError, ShardError, build_loader, merge_states, read_index
from mambatron.data.shards import StreamSpec, _Packer

from .conftest import Prepared, as_sorted_keys, docs_of, rows_of

EOS = 258


def _check_batch(batch: dict, seq_len: int, micro_batch: int) -> None:
    ids, labels, seq_idx = (batch[k].numpy() for k in ("input_ids", "labels", "seq_idx"))
    assert ids.shape == labels.shape == seq_idx.shape == (micro_batch, seq_len)
    assert ids.dtype == labels.dtype == np.int64 and seq_idx.dtype == np.int32
    np.testing.assert_array_equal(labels[:, :-1], ids[:, 1:])
    for row_ids, row_seq in zip(ids, seq_idx):
        expected, doc = [], 0
        for token in row_ids:
            expected.append(doc)
            doc += int(token == EOS)
        np.testing.assert_array_equal(row_seq, expected)


def _stream_docs(batches: list[dict]) -> list[np.ndarray]:
    return docs_of(np.concatenate([rows_of(b).reshape(-1) for b in batches]), EOS)


def test_packer_splits_long_documents_and_numbers_them() -> None:
    spec = StreamSpec((), "tokens.u16", "<u2", EOS, seq_len=4, micro_batch=2, shuffle_buffer=0, seed=0,
                      infinite=True, skip_bad_shards=False, rank=0, n_local=1, n_streams=1)  # fmt: skip
    packer = _Packer(spec)
    packer.add(0, 0, np.array([1, 2, EOS], dtype="<u2"))
    assert not packer.ready()
    packer.add(0, 1, np.array([3, 4, 5, 6, 7, 8, 9, EOS], dtype="<u2"))
    batch = packer.pop()
    # rows (seq_len + 1 = 5): [1 2 E 3 4] [5 6 7 8 9]; the second row continues document 1, so it starts at 0.
    assert batch["input_ids"].tolist() == [[1, 2, EOS, 3], [5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[2, EOS, 3, 4], [6, 7, 8, 9]]
    assert batch["seq_idx"].tolist() == [[0, 0, 0, 1], [0, 0, 0, 0]]
    assert packer.refs() == [[0, 1, 7]] and packer.total == 1


def test_stream_reproduces_documents_each_epoch(prepared: Prepared) -> None:
    cfg = prepared.cfg(num_workers=0, shuffle_buffer=8, seq_len=48)
    expected = prepared.split_docs("train")
    n = len(expected)
    batches = []
    for batch in build_loader(cfg, "train"):
        _check_batch(batch, 48, 2)
        batches.append(batch)
        if len(_stream_docs(batches)) > 2 * n:
            break
    docs = _stream_docs(batches)
    first, second = docs[:n], docs[n : 2 * n]
    assert as_sorted_keys(first) == as_sorted_keys(expected)
    assert as_sorted_keys(second) == as_sorted_keys(expected)
    in_order = [d.tobytes() for d in expected]
    assert [d.astype("<u2").tobytes() for d in first] != in_order, "shuffling is on"
    assert [d.tobytes() for d in first] != [d.tobytes() for d in second], "each epoch is reshuffled"


def test_two_ranks_two_workers_cover_an_epoch_disjointly(prepared: Prepared) -> None:
    cfg = prepared.cfg(num_workers=2, shuffle_buffer=4, seed=5)
    all_docs, all_shards = [], []
    for rank in range(2):
        loader = build_loader(cfg, "train", rank=rank, world_size=2)
        spec = loader.spec
        need = {}
        for local, stream in enumerate(loader.cycle()):  # one stream per worker here, served in this order
            shards = spec.epoch_shards(0, stream).tolist()
            all_shards.extend(shards)
            need[local] = sum(spec.shards[s].docs for s in shards)
        per_stream: dict[int, list[dict]] = {0: [], 1: []}
        for i, batch in enumerate(loader):
            per_stream[i % 2].append(batch)  # the DataLoader serves its workers round-robin
            if all(len(_stream_docs(per_stream[w])) >= need[w] for w in (0, 1)) or i > 3000:
                break
        for local in (0, 1):
            all_docs.extend(_stream_docs(per_stream[local])[: need[local]])
    assert sorted(all_shards) == list(range(len(prepared.index()["splits"]["train"]["shards"])))
    assert as_sorted_keys(all_docs) == as_sorted_keys(prepared.split_docs("train"))


def test_resume_in_fresh_process_is_exact(prepared: Prepared, tmp_path: Path) -> None:
    cfg = prepared.cfg(num_workers=2, shuffle_buffer=6, seq_len=64, seed=3)
    total, stops = 180, (37, 157)  # two streams of ~70 batches per epoch each: the second stop is past an epoch end
    loader = build_loader(cfg, "train")
    full, states = [], {}
    for batch in loader:
        full.append(batch)
        if len(full) in stops:
            states[len(full)] = json.loads(json.dumps(loader.state_dict()))
        if len(full) == total:
            break
    stopped = build_loader(cfg, "train")
    for i, _ in enumerate(stopped):
        if i + 1 == stops[0]:
            break
    assert stopped.state_dict() == states[stops[0]], "a stopped loader's state equals the live snapshot"
    streams = states[stops[0]]["streams"].values()
    assert any(s["sample"] > 0 and len(s["buffer"]) == 6 and len(s["pending"]) > 0 for s in streams), "mid-shard"
    assert any(s["epoch"] >= 1 for s in states[stops[1]]["streams"].values())
    jobs = []
    for stop in stops:
        (tmp_path / f"s{stop}.json").write_text(json.dumps(states[stop]))
        jobs.append(f"{tmp_path / f's{stop}.json'}:{total - stop}:{tmp_path / f'r{stop}.npz'}")
    child = Path(__file__).with_name("resume_child.py")
    subprocess.run([sys.executable, str(child), json.dumps(dataclasses.asdict(cfg)), *jobs], check=True, timeout=120)
    for stop in stops:
        resumed = np.load(tmp_path / f"r{stop}.npz")
        for key in ("input_ids", "labels", "seq_idx"):
            np.testing.assert_array_equal(resumed[key], np.stack([b[key].numpy() for b in full[stop:]]), err_msg=key)


def test_resume_in_process_without_workers(prepared: Prepared) -> None:
    cfg = prepared.cfg(num_workers=0, shuffle_buffer=5, seed=9)
    loader = build_loader(cfg)
    reference = [b["input_ids"] for _, b in zip(range(300), loader)]
    loader = build_loader(cfg)
    head = [b["input_ids"] for _, b in zip(range(111), loader)]
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = build_loader(cfg)
    resumed.load_state_dict(state)
    tail = [b["input_ids"] for _, b in zip(range(189), resumed)]
    for a, b in zip(head + tail, reference, strict=True):
        assert a.equal(b)


def test_resume_between_zero_and_one_worker(prepared: Prepared) -> None:
    cfg = prepared.cfg(num_workers=0, shuffle_buffer=5, seed=4)
    reference = [b["input_ids"] for _, b in zip(range(120), build_loader(cfg))]
    one_worker = build_loader(prepared.cfg(num_workers=1, shuffle_buffer=5, seed=4))
    head = [b["input_ids"] for _, b in zip(range(50), one_worker)]
    resumed = build_loader(cfg)
    resumed.load_state_dict(one_worker.state_dict())
    tail = [b["input_ids"] for _, b in zip(range(70), resumed)]
    for a, b in zip(head + tail, reference, strict=True):
        assert a.equal(b)
    # One stream cannot be split over two workers: refused, naming the sizes.
    with pytest.raises(DataPositionError, match=r"saved with 1 streams.* 1 × 2: resume with"):
        build_loader(prepared.cfg(num_workers=2, shuffle_buffer=5, seed=4)).load_state_dict(resumed.state_dict())


def test_state_refuses_other_settings(prepared: Prepared) -> None:
    state = build_loader(prepared.cfg(num_workers=0)).state_dict()
    other = build_loader(prepared.cfg(num_workers=0, micro_batch=3))
    with pytest.raises(ValueError, match="micro_batch=2"):
        other.load_state_dict(state)


@pytest.fixture
def http_url(prepared: Prepared) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(prepared.data)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _take(cfg: object, n: int, split: str = "train") -> list[np.ndarray]:
    return [rows_of(b) for _, b in zip(range(n), build_loader(cfg, split))]


def test_http_and_pipe_shards_equal_disk(prepared: Prepared, http_url: str, tmp_path: Path) -> None:
    disk = _take(prepared.cfg(num_workers=0, shuffle_buffer=8), 300)
    over_http = _take(prepared.cfg(num_workers=0, shuffle_buffer=8, index=f"{http_url}/index.json"), 300)
    index = prepared.index()
    for shard in index["splits"]["train"]["shards"]:
        shard["name"] = f"pipe:cat {prepared.data / shard['name']}"
    (tmp_path / "index.json").write_text(json.dumps(index))
    pipe_cfg = prepared.cfg(num_workers=0, shuffle_buffer=8, index=str(tmp_path / "index.json"), allow_pipe=True)
    over_pipe = _take(pipe_cfg, 300)
    assert len(disk) == 300
    for a, b, c in zip(disk, over_http, over_pipe, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_val_is_one_pass_without_shuffle(prepared: Prepared) -> None:
    cfg = prepared.cfg(num_workers=0, micro_batch=1, seq_len=16)
    rows = _take(cfg, 10_000, "val")
    val = prepared.split_docs("val")
    expected = np.concatenate(val)
    n = sum(len(r.reshape(-1)) for r in rows)
    assert n == len(expected) // 17 * 17  # the partial final batch is dropped
    np.testing.assert_array_equal(np.concatenate([r.reshape(-1) for r in rows]), expected[:n])


def test_val_documents_are_dealt_to_every_rank(prepared: Prepared) -> None:
    cfg = prepared.cfg(num_workers=2, micro_batch=1, seq_len=8)
    counts = [sum(1 for _ in build_loader(cfg, "val", rank=r, world_size=2)) for r in range(2)]
    val_tokens = prepared.index()["splits"]["val"]["tokens"]
    assert all(c > 0 for c in counts) and sum(counts) * 9 <= val_tokens
    assert len(prepared.index()["splits"]["val"]["shards"]) < 4, "fewer val shards than streams"


def test_wrong_tokenizer_is_refused(prepared: Prepared, bpe_tokenizer: Path) -> None:
    with pytest.raises(DataIndexError, match="tokenizer mismatch") as err:
        build_loader(prepared.cfg(tokenizer=str(bpe_tokenizer)))
    message = str(err.value)
    assert str(bpe_tokenizer) in message and "prepare_data.py" in message
    assert prepared.index()["tokenizer_hash"][:16] in message


def test_failing_index_command_shows_its_stderr() -> None:
    with pytest.raises(DataIndexError, match="exit status 3: no such bucket"):
        read_index("pipe:echo no such bucket >&2; exit 3", allow_pipe=True)


def test_fewer_shards_than_streams_deals_documents(prepared: Prepared, caplog: pytest.LogCaptureFixture) -> None:
    """16 ranks and ~12 train shards: instead of refusing, every stream reads every shard and keeps one document in
    16 (with a warning about the extra reads); the streams are disjoint and together cover the epoch once."""
    n = 16
    total = prepared.index()["splits"]["train"]["docs"]
    assert len(prepared.index()["splits"]["train"]["shards"]) < n
    cfg = prepared.cfg(num_workers=0, shuffle_buffer=4, seed=2, micro_batch=1, seq_len=16)
    all_docs = []
    with caplog.at_level(logging.WARNING, logger="mambatron.data"):
        for rank in range(n):
            loader = build_loader(cfg, "train", rank=rank, world_size=n)
            assert loader.spec.split_documents
            need = len(range(rank, total, n))
            batches = []
            for batch in loader:
                batches.append(batch)
                if len(_stream_docs(batches)) >= need:
                    break
            all_docs.extend(_stream_docs(batches)[:need])
    assert as_sorted_keys(all_docs) == as_sorted_keys(prepared.split_docs("train"))
    assert caplog.text.count("every stream reads every shard") == 1  # rank 0 warns once


@pytest.fixture
def broken(prepared: Prepared, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(prepared.data, copy)
    return copy


@pytest.mark.parametrize("cut", ["middle", "member_boundary", "missing"])
def test_bad_shard_error_names_it(prepared: Prepared, broken: Path, cut: str) -> None:
    shard = broken / "train-000003.tar"
    data = shard.read_bytes()
    if cut == "missing":
        shard.unlink()
    else:
        # 1536 bytes: the first member's 512-byte header + data, then the end of the file, with no end-of-archive.
        shard.write_bytes(data[: len(data) // 2] if cut == "middle" else data[:1536])
    cfg = prepared.cfg(index=str(broken / "index.json"), num_workers=0, shuffle_buffer=0)
    # A missing local shard is found when the loader is built, before any step; a damaged one when it is read.
    with pytest.raises(DataIndexError if cut == "missing" else ShardError, match="train-000003.tar"):
        for _ in build_loader(cfg):
            pass


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_shard_skipped_and_counted(
    prepared: Prepared, broken: Path, caplog: pytest.LogCaptureFixture, workers: int
) -> None:
    shard = broken / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    cfg = prepared.cfg(index=str(broken / "index.json"), num_workers=workers, shuffle_buffer=0, skip_bad_shards=True)
    loader = build_loader(cfg)
    tokens = prepared.index()["splits"]["train"]["tokens"]
    with caplog.at_level(logging.WARNING, logger="mambatron.data"):
        for i, _ in enumerate(loader):
            if i * loader.spec.micro_batch * (loader.spec.seq_len + 1) > 1.5 * tokens:
                break
    assert loader.skipped_shards == 2  # once per epoch
    if workers == 0:  # worker processes log to their own stderr
        assert "train-000003.tar" in caplog.text and "skipping bad shard" in caplog.text


def test_uint32_shards_stream_the_same(prepared: Prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mambatron.data import prepare

    monkeypatch.setattr(prepare, "token_dtype", lambda vocab_size: np.dtype("<u4"))
    glob = str(prepared.corpus / "*.txt")
    index = prepare.prepare_data([glob], prepared.tokenizer, tmp_path, shard_tokens=1000, val_fraction=0.125, workers=1)
    assert index["dtype"] == "uint32" and index["tokens_key"] == "tokens.u32"
    wide = _take(prepared.cfg(num_workers=0, shuffle_buffer=8, index=str(tmp_path / "index.json")), 100)
    narrow = _take(prepared.cfg(num_workers=0, shuffle_buffer=8), 100)
    for a, b in zip(wide, narrow, strict=True):
        np.testing.assert_array_equal(a, b)


def _index_with_shard_names(prepared: Prepared, folder: Path, name_of) -> Path:
    index = prepared.index()
    for split in index["splits"].values():
        for shard in split["shards"]:
            shard["name"] = name_of(shard["name"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.json").write_text(json.dumps(index))
    return folder / "index.json"


def test_commands_in_an_index_need_allow_pipe(prepared: Prepared, tmp_path: Path) -> None:
    """A shard named ``pipe:...`` (a shell command) is refused before anything runs unless data.allow_pipe is set;
    so is a ``pipe:`` data.index."""
    marker = tmp_path / "MARKER"
    index = _index_with_shard_names(
        prepared, tmp_path / "idx", lambda name: f"pipe:touch {marker}; cat {prepared.data / name}"
    )
    with pytest.raises(DataIndexError, match=r"is a shell command; .*data\.allow_pipe=true") as err:
        build_loader(prepared.cfg(num_workers=0, index=str(index)))
    assert "pipe:touch" in str(err.value)
    with pytest.raises(DataIndexError, match=r"data\.index .* is a shell command; .*data\.allow_pipe=true"):
        build_loader(prepared.cfg(num_workers=0, index=f"pipe:touch {marker}; cat {prepared.index_path}"))
    assert not marker.exists()
    # Opted in, the same index streams (and its command runs).
    rows = _take(prepared.cfg(num_workers=0, index=str(index), allow_pipe=True), 3)
    assert len(rows) == 3 and marker.exists()


def test_a_remote_index_never_runs_commands(prepared: Prepared, http_url: str, tmp_path: Path) -> None:
    """An index fetched over http that names pipe: shards is refused even with data.allow_pipe=true."""
    marker = tmp_path / "MARKER"
    _index_with_shard_names(prepared, prepared.data / "evil", lambda name: f"pipe:touch {marker}; cat /dev/null")
    cfg = prepared.cfg(num_workers=0, index=f"{http_url}/evil/index.json", allow_pipe=True)
    with pytest.raises(DataIndexError, match="remote index .* may not run commands"):
        build_loader(cfg)
    assert not marker.exists()


def test_unsupported_shard_scheme_is_refused(prepared: Prepared, tmp_path: Path) -> None:
    index = _index_with_shard_names(prepared, tmp_path / "idx", lambda name: f"gs://bucket/{name}")
    with pytest.raises(DataIndexError, match="unsupported scheme"):
        build_loader(prepared.cfg(num_workers=0, index=str(index)))


def test_token_ids_outside_the_vocabulary_name_the_shard(prepared: Prepared, tmp_path: Path) -> None:
    """Token ids at or above the index's vocabulary (corrupt bytes, another tokenizer's shards) stop the stream with
    the shard and sample named, instead of an IndexError deep in the embedding."""
    index = prepared.index()
    index["vocab_size"] = 40  # every document of the test corpus has larger ids
    for split in index["splits"].values():
        for shard in split["shards"]:
            shard["name"] = str(prepared.data / shard["name"])
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"shard .*\.tar: sample .* holds token id \d+, outside the index's vocab"):
        _take(prepared.cfg(num_workers=0, index=str(tmp_path / "index.json")), 5)


def test_a_corrupted_shard_fails_its_sha256(prepared: Prepared, tmp_path: Path) -> None:
    """One flipped byte inside a document's tokens still parses as a tar; the streamed sha256 catches it, naming
    the shard. data.verify_shards=false reads it unchecked."""
    data = tmp_path / "data"
    shutil.copytree(prepared.data, data)
    index = json.loads((data / "index.json").read_text())
    first = data / index["splits"]["train"]["shards"][0]["name"]
    raw = bytearray(first.read_bytes())
    raw[512 + 2] ^= 0x01  # low byte of a token of the first member (after its 512-byte header): still in vocab
    first.write_bytes(bytes(raw))
    cfg = prepared.cfg(num_workers=0, shuffle_buffer=0, index=str(data / "index.json"))
    with pytest.raises(ShardError, match=rf"shard {first}: its sha256 .* differs from the index's"):
        _take(cfg, 10_000)
    rows = _take(prepared.cfg(num_workers=0, shuffle_buffer=0, index=str(data / "index.json"), verify_shards=False), 3)
    assert len(rows) == 3


def test_the_global_sequence_survives_any_data_parallel_layout(prepared: Prepared) -> None:
    """Streams fixed at 4 (data.streams): 5 steps on DP=2, then the merged position resumed on DP=4 (one worker
    each), on DP=1 with two workers and on DP=1 in-process. Every global micro-batch equals the uninterrupted DP=2
    run's — nothing read twice, nothing skipped, same order — and so do the stream positions they end at."""

    def cfg(workers: int):
        return prepared.cfg(num_workers=workers, shuffle_buffer=5, seed=7, streams=4)

    def run(loaders, steps: int, first: int) -> dict[int, np.ndarray]:
        """Global micro-batch index -> rows, for ``steps`` steps of one batch per rank."""
        its = [iter(loader) for loader in loaders]
        out = {}
        for step in range(steps):
            for r, it in enumerate(its):
                out[first + step * len(its) + r] = rows_of(next(it))
        return out

    def positions(loaders) -> dict:
        return merge_states([json.loads(json.dumps(loader.state_dict())) for loader in loaders])

    reference = [build_loader(cfg(1), "train", rank=r, world_size=2) for r in range(2)]
    want = run(reference, 9, 0)
    cut = [build_loader(cfg(1), "train", rank=r, world_size=2) for r in range(2)]
    head = run(cut, 5, 0)
    saved = positions(cut)
    # 10 micro-batches consumed: not a multiple of the 4 streams, so each new rank starts mid-cycle.
    assert saved["consumed"] == 10 and len(saved["streams"]) == 4
    for world, workers in ((4, 1), (1, 2), (1, 0)):
        resumed = [build_loader(cfg(workers), "train", rank=r, world_size=world) for r in range(world)]
        for loader in resumed:
            loader.load_state_dict(saved)
        tail = run(resumed, 8 // world, 10)
        got = {**head, **tail}
        assert sorted(got) == sorted(want) == list(range(18)), (world, workers)
        for j in want:
            np.testing.assert_array_equal(got[j], want[j], err_msg=f"global micro-batch {j} on DP={world}")
        assert positions(resumed)["streams"] == positions(reference)["streams"], (world, workers)


def test_a_position_that_cannot_be_split_again_is_refused(prepared: Prepared) -> None:
    """data.streams must be a multiple of ranks × workers; a saved position resumes only where that holds."""
    with pytest.raises(ConfigError, match=r"data.streams=3 is not a multiple of .* 2 × 1 = 2"):  # exit 2 in the CLI
        build_loader(prepared.cfg(num_workers=1, streams=3), "train", rank=0, world_size=2)
    saved = build_loader(prepared.cfg(num_workers=1, streams=4), "train", rank=0, world_size=1).state_dict()
    three = build_loader(prepared.cfg(num_workers=1), "train", rank=0, world_size=3)
    with pytest.raises(DataPositionError, match="saved with 4 streams.* 3 × 1"):
        three.load_state_dict(saved)
