"""Streaming token shards → packed ``(micro_batch, seq_len)`` batches with an exact, resumable position.

Layout of the stream
--------------------
The shards of a split (listed in ``index.json``) are dealt out to ``S`` *streams* (``data.streams``; 0 means
``world_size × max(1, num_workers)`` of the run's first start): stream ``k`` reads shards ``order[k::S]`` of the
epoch's shard order (a seeded permutation per epoch when shuffling, the index order otherwise), so streams read
disjoint shards and together cover the split once per epoch. Each stream independently:

1. reads documents (one WebDataset sample each: raw little-endian token ids ending with EOS),
2. shuffles them with a seeded buffer (``shuffle_buffer`` documents; drained at the end of each epoch),
3. packs them back to back into rows of ``seq_len + 1`` tokens — a document longer than a row continues in the next
   row — and emits ``micro_batch`` rows at a time as ``input_ids = row[:-1]``, ``labels = row[1:]`` and ``seq_idx``
   (the document index of every input token within its row: 0 at the row start, +1 after each EOS).

The micro-batches of all ranks form one global sequence that does not depend on the layout: global micro-batch
``j`` is the next micro-batch of stream ``j mod S``. With ``J`` micro-batches consumed when a loader starts, rank
``r`` of ``W`` takes ``j = J + r + t·W`` (t = 0, 1, ...): it owns the ``S / W`` streams ``(J + r + i·W) mod S`` and
serves them in that order, its DataLoader worker ``w`` the ones with ``i ≡ w`` (mod workers). ``S`` must be a multiple
of ``W × max(1, num_workers)``.

Exact resume, on any layout
---------------------------
A stream's position is small and positional: epoch, shard position and sample offset of the reader, the shuffle
RNG state, the shuffle buffer and the packing remainder described by sample references ``(shard, sample)``
(plus a token offset for the partly packed document). Restoring reads the referenced shards from their start up
to the last sample referenced (a tar is sequential; earlier samples are skipped undecoded). Every batch a
worker produces carries its stream's position *after* that batch; the loader in the main process keeps the latest
one per stream, so ``state_dict()`` is exact even though workers prefetch ahead. A loader's state holds ``J`` and the
positions of the streams it owns; the union over ranks (:func:`merge_states`) is the global position, which any
number of ranks and workers dividing ``S`` split again: nothing is read twice and nothing is skipped, and the global
sequence goes on as if uninterrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mambatron.config import ConfigError
from mambatron.data.prepare import INDEX_FORMAT
from mambatron.data.tokenizers import tokenizer_hash

log = logging.getLogger("mambatron.data")

STATE_VERSION = 2


class ShardError(RuntimeError):
    """A shard could not be read completely; the message names the shard."""


class DataIndexError(ValueError):
    """The index is unreadable or does not match the configuration (tokenizer, split, stream count)."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a split: where to read it and what it must contain."""

    url: str
    docs: int
    tokens: int
    # The index's sha256 of the shard's bytes ("" when it has none).
    sha256: str = ""


# Shards this process has read in full and found to match their index's sha256 (verified once, on first read).
_VERIFIED: set[tuple[str, str]] = set()


class _HashingReader:
    """A read-only stream that hashes the bytes as they pass (the tar reader reads it front to back)."""

    def __init__(self, raw: Any):
        self.raw = raw
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        return data

    def hexdigest_of_all(self) -> str:
        """The digest of the whole stream, reading what the tar reader left (end-of-archive padding)."""
        while self.read(1 << 20):
            pass
        return self.sha256.hexdigest()

    def close(self) -> None:
        self.raw.close()


def _is_url(name: str) -> bool:
    return name.startswith("pipe:") or "://" in name


# Where shards may come from. ``pipe:`` runs a shell command, so it is opt-in (``data.allow_pipe``), and never taken
# from an index that was fetched over the network.
_SHARD_SCHEMES = ("http://", "https://", "file://")


def _is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def read_index(index: str, allow_pipe: bool = False) -> dict[str, Any]:
    """Load ``index.json`` from a local path, an ``http(s)://``/``file://`` URL or (with ``allow_pipe``) a ``pipe:``
    command."""
    if index.startswith("pipe:") and not allow_pipe:
        raise DataIndexError(
            f"data.index {index!r} is a shell command; commands run only with data.allow_pipe=true (set it if you "
            "trust the command)"
        )
    try:
        if index.startswith("pipe:"):
            raw = subprocess.run(index[5:], shell=True, check=True, capture_output=True).stdout
        elif _is_url(index):
            with urllib.request.urlopen(index, timeout=60) as r:
                raw = r.read()
        else:
            with open(index, "rb") as f:
                raw = f.read()
        data = json.loads(raw)
    except (OSError, ValueError, subprocess.CalledProcessError) as e:
        reason = str(e).rstrip(".")
        if isinstance(e, subprocess.CalledProcessError) and e.stderr.strip():
            # The command's own stderr says why (no such object, access denied); it was captured, so show it.
            reason += ": " + e.stderr.decode(errors="replace").strip()[-500:]
        raise DataIndexError(
            f"cannot read the data index {index!r} ({reason}); set data.index to the index.json written by "
            "tools/prepare_data.py"
        ) from e
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise DataIndexError(f"{index!r} is not a mambatron shard index (format {got!r})")
    problem = _index_problem(data)
    if problem:
        raise DataIndexError(f"{index!r} is malformed: {problem}; re-create it with tools/prepare_data.py")
    return data


def _index_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with the structure of a shard index, or None."""
    splits = data.get("splits")
    if not isinstance(splits, dict):
        return f"'splits' must be an object of splits, got {type(splits).__name__}"
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list):
            return f"splits.{name}.shards must be a list of shard records, got {type(shards).__name__}"
        for i, shard in enumerate(shards):
            if not isinstance(shard, dict) or not isinstance(shard.get("name"), str):
                return f"splits.{name}.shards[{i}] must be an object with a 'name' string"
            for key in ("docs", "tokens"):
                if not isinstance(shard.get(key), int) or isinstance(shard.get(key), bool) or shard[key] < 0:
                    return f"splits.{name}.shards[{i}].{key} must be a count, got {shard.get(key)!r}"
    for key in ("dtype", "tokens_key", "tokenizer_hash"):
        if not isinstance(data.get(key), str):
            return f"{key!r} must be a string, got {data.get(key)!r}"
    for key in ("vocab_size", "eos_id"):
        if not isinstance(data.get(key), int):
            return f"{key!r} must be an integer, got {data.get(key)!r}"
    return None


def shard_infos(index_url: str, index: dict[str, Any], split: str, allow_pipe: bool = False) -> list[ShardInfo]:
    """The split's shards with URLs resolved relative to the index (absolute paths and URLs are kept).

    A ``pipe:`` shard (a shell command) is refused unless ``allow_pipe``, and always when the index itself was read
    over http(s); so are URL schemes other than http(s) and file."""
    if split not in index["splits"]:
        raise DataIndexError(f"split {split!r} not in {index_url!r}; it has {sorted(index['splits'])}")
    out = []
    for shard in index["splits"][split]["shards"]:
        name = shard["name"]
        if name.startswith("pipe:"):
            if _is_remote(index_url):
                raise DataIndexError(
                    f"shard {name!r} of the remote index {index_url!r} is a shell command; an index fetched over the "
                    "network may not run commands on this machine (data.allow_pipe does not change that)"
                )
            if not allow_pipe:
                raise DataIndexError(
                    f"shard {name!r} of {index_url!r} is a shell command; commands in an index run only with "
                    "data.allow_pipe=true (set it if you trust the index)"
                )
        elif "://" in name and not name.startswith(_SHARD_SCHEMES):
            raise DataIndexError(
                f"shard {name!r} of {index_url!r} has an unsupported scheme; use a path, file://, http:// or https://"
            )
        if _is_url(name) or os.path.isabs(name):
            url = name
        elif index_url.startswith("pipe:"):
            raise DataIndexError(
                f"shard {name!r} of an index read through {index_url!r} must be an absolute path or URL "
                "(a relative name has nothing to be relative to)"
            )
        elif _is_url(index_url):
            url = urllib.parse.urljoin(index_url, name)
        else:
            url = os.path.join(os.path.dirname(os.path.abspath(index_url)), name)
        out.append(
            ShardInfo(url=url, docs=int(shard["docs"]), tokens=int(shard["tokens"]), sha256=shard.get("sha256", ""))
        )
    return out


def iter_shard(
    shard: ShardInfo, key_ext: str, dtype: np.dtype, start: int = 0, vocab_size: int = 0, verify: bool = False
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(sample_index, tokens)`` for samples ``start..`` of one shard, read with webdataset.

    Samples before ``start`` are skipped without decoding. Raises :class:`ShardError` naming the shard when it cannot
    be opened, is corrupt (also: a token id >= ``vocab_size``, when given), or ends before the number of samples the
    index lists (a truncated tar). With ``verify``, the first full read of a shard in this process also hashes its
    bytes as they stream and raises, after its last sample, if they differ from the index's sha256.
    """
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = None
    count = 0
    try:
        stream = wds.gopen(shard.url, "rb")
        hashing = verify and shard.sha256 and (shard.url, shard.sha256) not in _VERIFIED
        if hashing:
            stream = _HashingReader(stream)
        files = tar_file_expander([{"url": shard.url, "stream": stream}])
        for sample in group_by_keys(files):
            if count >= start:
                data = sample.get(key_ext)
                if data is None or len(data) % dtype.itemsize:
                    raise ShardError(f"shard {shard.url}: sample {sample['__key__']!r} has no valid {key_ext} entry")
                tokens = np.frombuffer(data, dtype=dtype)
                if vocab_size and len(tokens) and int(tokens.max()) >= vocab_size:
                    raise ShardError(
                        f"shard {shard.url}: sample {sample['__key__']!r} holds token id {int(tokens.max())}, outside "
                        f"the index's vocabulary of {vocab_size} (corrupted bytes, or shards of another tokenizer)"
                    )
                yield count, tokens
            count += 1
        if count != shard.docs:
            raise ShardError(
                f"shard {shard.url} ended after {count} of its {shard.docs} samples (truncated or replaced?)"
            )
        if hashing:
            got = stream.hexdigest_of_all()
            if got != shard.sha256:
                raise ShardError(
                    f"shard {shard.url}: its sha256 {got[:16]}… differs from the index's {shard.sha256[:16]}… "
                    "(corrupted or replaced); copy it again, or set data.verify_shards=false to read it unchecked"
                )
            _VERIFIED.add((shard.url, shard.sha256))
    except ShardError:
        raise
    except Exception as e:
        raise ShardError(f"shard {shard.url} is unreadable after {count} samples: {type(e).__name__}: {e}") from e
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as e:  # a pipe killed early exits non-zero; that is not an error of the data
                log.debug("closing %s: %s", shard.url, e)


@dataclass(frozen=True)
class StreamSpec:
    """Everything a stream needs, picklable for DataLoader workers."""

    shards: tuple[ShardInfo, ...]
    key_ext: str
    dtype: str
    eos_id: int
    seq_len: int
    micro_batch: int
    shuffle_buffer: int
    seed: int
    infinite: bool
    skip_bad_shards: bool
    rank: int
    n_local: int
    n_streams: int

    # Deal documents instead of shards to streams (every stream reads every shard and keeps document
    # ``i % n_streams == stream``): used for validation, whose few shards could otherwise leave ranks without data.
    split_documents: bool = False
    # Token ids must be below this (the index's tokenizer vocabulary); 0 checks nothing.
    vocab_size: int = 0
    # Check each shard's sha256 against the index on its first full read.
    verify_shards: bool = True

    def epoch_shards(self, epoch: int, stream: int) -> np.ndarray:
        """Shard ids read by ``stream`` in ``epoch``."""
        n = len(self.shards)
        order = np.random.default_rng([self.seed, epoch, 7]).permutation(n) if self.shuffle_buffer else np.arange(n)
        return order if self.split_documents else order[stream :: self.n_streams]

    def first_documents(self) -> list[int]:
        """Global index of each shard's first document (shards in index order)."""
        return np.concatenate([[0], np.cumsum([s.docs for s in self.shards])]).astype(int).tolist()


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGUSR1. ``scancel`` signals the whole process group; a worker that
    died of it would take the main process down before it could save. The main process shuts its workers down
    itself, and they exit on their own if it dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def plain(obj: Any) -> Any:
    """A deep copy of a state with numpy arrays turned into lists (JSON-serialisable)."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


def fresh_stream_state() -> dict[str, Any]:
    return {
        "epoch": 0,
        "shard_pos": 0,
        "sample": 0,
        "rng": None,
        "buffer": [],
        "pending": [],
        "skipped": 0,
        "epoch_docs": 0,
    }


class _Packer:
    """Concatenates documents and cuts ``rows × (seq_len + 1)`` token blocks; remembers where each piece came from."""

    def __init__(self, spec: StreamSpec) -> None:
        self.row = spec.seq_len + 1
        self.rows = spec.micro_batch
        self.need = self.row * self.rows
        self.eos = spec.eos_id
        self.pending: deque[list[Any]] = deque()  # [shard, sample, tokens, offset]
        self.total = 0

    def add(self, shard: int, sample: int, tokens: np.ndarray, offset: int = 0) -> None:
        self.pending.append([shard, sample, tokens, offset])
        self.total += len(tokens) - offset

    def ready(self) -> bool:
        return self.total >= self.need

    def pop(self) -> dict[str, torch.Tensor]:
        pieces = []
        remaining = self.need
        while remaining:
            item = self.pending[0]
            tokens, offset = item[2], item[3]
            take = min(len(tokens) - offset, remaining)
            pieces.append(tokens[offset : offset + take])
            remaining -= take
            if offset + take == len(tokens):
                self.pending.popleft()
            else:
                item[3] = offset + take
        self.total -= self.need
        rows = np.concatenate(pieces).reshape(self.rows, self.row).astype(np.int64)
        seq_idx = np.zeros((self.rows, self.row - 1), dtype=np.int32)
        np.cumsum(rows[:, :-2] == self.eos, axis=1, dtype=np.int32, out=seq_idx[:, 1:])
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(rows[:, :-1])),
            "labels": torch.from_numpy(np.ascontiguousarray(rows[:, 1:])),
            "seq_idx": torch.from_numpy(seq_idx),
        }

    def refs(self) -> list[list[int]]:
        return [[int(s), int(i), int(o)] for s, i, _, o in self.pending]


class _Stream:
    """One stream's reader → shuffle buffer → packer, resumable from a position dict."""

    def __init__(self, spec: StreamSpec, stream: int, state: dict[str, Any] | None) -> None:
        self.spec = spec
        self.stream = stream
        self.dtype = np.dtype(spec.dtype)
        st = fresh_stream_state() if state is None else plain(state)
        self.epoch, self.shard_pos, self.sample = st["epoch"], st["shard_pos"], st["sample"]
        self.skipped = st["skipped"]
        self.epoch_docs = st["epoch_docs"]
        self.rng = self._new_rng()
        if st["rng"] is not None:
            self.rng.bit_generator.state = st["rng"]
        self.ids = spec.epoch_shards(self.epoch, stream)
        self.first_docs = spec.first_documents()
        self.reader: Iterator[tuple[int, np.ndarray]] | None = None
        self.buffer: list[np.ndarray] = []
        self.buffer_refs = np.zeros((max(spec.shuffle_buffer, 1), 2), dtype=np.int64)
        self.packer = _Packer(spec)
        self._restore(st["buffer"], st["pending"])

    def _new_rng(self) -> np.random.Generator:
        return np.random.default_rng([self.spec.seed, self.epoch, self.stream, 11])

    def _restore(self, buffer: list[list[int]], pending: list[list[int]]) -> None:
        wanted: dict[int, set[int]] = {}
        for shard, sample, *_ in buffer + pending:
            wanted.setdefault(shard, set()).add(sample)
        found: dict[tuple[int, int], np.ndarray] = {}
        for shard, samples in sorted(wanted.items()):
            last = max(samples)
            for idx, tokens in iter_shard(
                self.spec.shards[shard],
                self.spec.key_ext,
                self.dtype,
                vocab_size=self.spec.vocab_size,
                verify=self.spec.verify_shards,
            ):
                if idx in samples:
                    found[shard, idx] = tokens
                if idx == last:
                    break
        for i, (shard, sample) in enumerate(buffer):
            self.buffer.append(found[shard, sample])
            self.buffer_refs[i] = shard, sample
        for shard, sample, offset in pending:
            self.packer.add(shard, sample, found[shard, sample], offset)

    def state(self) -> dict[str, Any]:
        """Position after everything produced so far (JSON-serialisable)."""
        return {
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "sample": self.sample,
            "rng": self.rng.bit_generator.state,
            # An array, not a list: a batch's state is made per batch, and thousands of small lists per batch cost
            # more (allocation, garbage collection) than the packing itself. state_dict() converts it.
            "buffer": self.buffer_refs[: len(self.buffer)].copy(),
            "pending": self.packer.refs(),
            "skipped": self.skipped,
            "epoch_docs": self.epoch_docs,
        }

    def _next_sample(self) -> tuple[int, int, np.ndarray] | None:
        """The next document of this epoch as ``(shard, sample, tokens)``, or None when the epoch's shards are done."""
        spec = self.spec
        while self.shard_pos < len(self.ids):
            shard = int(self.ids[self.shard_pos])
            if self.reader is None:
                self.reader = iter_shard(
                    spec.shards[shard],
                    spec.key_ext,
                    self.dtype,
                    start=self.sample,
                    vocab_size=spec.vocab_size,
                    verify=spec.verify_shards,
                )
            try:
                idx, tokens = next(self.reader)
            except StopIteration:
                idx = None
            except ShardError as e:
                if not spec.skip_bad_shards:
                    raise
                self.skipped += 1
                log.warning("skipping bad shard (%d skipped so far on this stream): %s", self.skipped, e)
                idx = None
            if idx is None:
                self.reader = None
                self.shard_pos += 1
                self.sample = 0
                continue
            self.sample = idx + 1
            if spec.split_documents and (self.first_docs[shard] + idx) % spec.n_streams != self.stream:
                continue
            self.epoch_docs += 1
            return shard, idx, tokens
        return None

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        spec = self.spec
        size = spec.shuffle_buffer
        packer = self.packer
        while True:
            while packer.ready():
                yield packer.pop(), self.state()
            item = self._next_sample()
            if item is not None:
                shard, idx, tokens = item
                if size == 0:
                    packer.add(shard, idx, tokens)
                elif len(self.buffer) < size:
                    self.buffer_refs[len(self.buffer)] = shard, idx
                    self.buffer.append(tokens)
                else:
                    j = int(self.rng.integers(size))
                    out_shard, out_idx = self.buffer_refs[j]
                    packer.add(int(out_shard), int(out_idx), self.buffer[j])
                    self.buffer[j] = tokens
                    self.buffer_refs[j] = shard, idx
            elif self.buffer:
                j = int(self.rng.integers(len(self.buffer)))
                last = len(self.buffer) - 1
                out_shard, out_idx = self.buffer_refs[j]
                packer.add(int(out_shard), int(out_idx), self.buffer[j])
                self.buffer[j] = self.buffer[last]
                self.buffer_refs[j] = self.buffer_refs[last]
                self.buffer.pop()
            else:
                # A partial final batch is dropped: every batch has the same shape.
                if not spec.infinite:
                    return
                if self.epoch_docs == 0:
                    raise ShardError(
                        f"stream {self.stream} read no document in epoch {self.epoch}: all of its "
                        f"{len(self.ids)} shards were unreadable or empty"
                    )
                self.epoch += 1
                self.shard_pos = self.sample = self.epoch_docs = 0
                self.rng = self._new_rng()
                self.ids = spec.epoch_shards(self.epoch, self.stream)


class DataPositionError(ValueError):
    """A saved data position that this loader cannot continue exactly (another stream count, an older format)."""


class _StreamDataset(IterableDataset):
    """Runs this rank's streams: DataLoader worker ``w`` serves ``cycle[w::n_local]`` in turn (all of them in the main
    process without workers), so that the rank's t-th batch comes from ``cycle[t % len(cycle)]``."""

    def __init__(self, spec: StreamSpec, cycle: list[int], states: dict[int, dict[str, Any] | None]) -> None:
        self.spec = spec
        self.cycle = cycle
        self.states = states

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        mine = self.cycle if info is None else self.cycle[worker :: self.spec.n_local]
        streams = [iter(_Stream(self.spec, k, self.states.get(k))) for k in mine]
        while True:
            for k, stream in zip(mine, streams):
                try:
                    batch, state = next(stream)
                except StopIteration:
                    return
                batch["_stream"] = k
                batch["_state"] = state
                yield batch


def _keep(batch: Any) -> Any:
    return batch


class ShardLoader:
    """Iterable over packed batches of one split for one rank; see the module docstring.

    ``for batch in loader`` yields dicts with ``input_ids``/``labels`` ``(micro_batch, seq_len)`` int64 and
    ``seq_idx`` ``(micro_batch, seq_len)`` int32 — forever for ``train`` (multi-epoch), one pass for ``val``.
    Iterating again continues where the last batch handed out left off.
    """

    def __init__(self, cfg: Any, split: str = "train", rank: int = 0, world_size: int = 1) -> None:
        if hasattr(cfg, "validate"):
            cfg.validate()
        if not cfg.index:
            raise DataIndexError("data.index is empty; point it at the index.json written by tools/prepare_data.py")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.cfg = cfg
        self.split = split
        self.rank = rank
        self.world_size = world_size
        allow_pipe = bool(getattr(cfg, "allow_pipe", False))
        self.index = read_index(cfg.index, allow_pipe)
        if cfg.tokenizer:
            have = tokenizer_hash(cfg.tokenizer)
            want = self.index["tokenizer_hash"]
            if have != want:
                raise DataIndexError(
                    f"tokenizer mismatch: data.tokenizer={cfg.tokenizer!r} has hash {have[:16]}, but the shards of "
                    f"{cfg.index!r} were made with tokenizer hash {want[:16]} ({self.index['tokenizer_kind']}). "
                    "Set data.tokenizer to the folder given to tools/prepare_data.py, or re-run tools/prepare_data.py "
                    "with this tokenizer."
                )
        shards = shard_infos(cfg.index, self.index, split, allow_pipe)
        missing = [s.url for s in shards if not _is_url(s.url) and not os.path.isfile(s.url)]  # pipe: is a URL here
        if missing:
            listed = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            problem = f"{len(missing)} of the {len(shards)} {split} shards in {cfg.index!r} do not exist: {listed}"
            if not getattr(cfg, "skip_bad_shards", False):
                raise DataIndexError(
                    f"{problem}; copy them next to the index, re-run tools/prepare_data.py, or set "
                    "data.skip_bad_shards=true to train without them"
                )
            log.warning("%s; they will be skipped (data.skip_bad_shards)", problem)
        self.num_workers = int(cfg.num_workers)
        n_local = max(1, self.num_workers)
        n_streams = world_size * n_local
        configured = int(getattr(cfg, "streams", 0) or 0)
        if split == "train" and configured:
            if configured % n_streams:
                raise ConfigError(
                    f"data.streams={configured} is not a multiple of world_size × max(1, data.num_workers) = "
                    f"{world_size} × {n_local} = {n_streams}; set data.streams to a multiple of every such product "
                    "the run will use (e.g. 64), or 0 for exactly this one"
                )
            n_streams = configured
        # Shards are dealt to streams; with fewer shards than streams, documents are dealt instead (every stream
        # reads every shard and keeps one document in n_streams), as the validation split always does.
        split_documents = split != "train" or len(shards) < n_streams
        if split == "train" and split_documents and rank == 0:
            log.warning(
                "%r has %d train shards for world_size×max(1, data.num_workers) = %d×%d = %d streams: every stream "
                "reads every shard and keeps 1 document in %d, so each shard is read %d times per epoch; at scale, "
                "re-run tools/prepare_data.py with a smaller --shard-tokens (or lower data.num_workers)",
                cfg.index, len(shards), world_size, n_local, n_streams, n_streams, n_streams,
            )  # fmt: skip
        self.spec = StreamSpec(
            shards=tuple(shards),
            key_ext=self.index["tokens_key"],
            dtype=np.dtype(self.index["dtype"]).newbyteorder("<").str,
            eos_id=int(self.index["eos_id"]),
            seq_len=int(cfg.seq_len),
            micro_batch=int(cfg.micro_batch),
            shuffle_buffer=int(cfg.shuffle_buffer) if split == "train" else 0,
            seed=int(cfg.seed),
            infinite=split == "train",
            split_documents=split_documents,
            skip_bad_shards=bool(cfg.skip_bad_shards),
            rank=rank,
            n_local=n_local,
            n_streams=n_streams,
            vocab_size=int(self.index.get("vocab_size", 0)),
            verify_shards=bool(getattr(cfg, "verify_shards", True)),
        )
        self._fingerprint = hashlib.sha256(
            json.dumps([[s.get("name"), s.get("sha256")] for s in self.index["splits"][split]["shards"]]).encode()
        ).hexdigest()
        self._states: dict[int, dict[str, Any] | None] = {}
        self.consumed = 0  # global micro-batches (all ranks) before this rank's next one, at a step boundary
        self.batches = 0  # batches this rank handed out (information only)

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens in one batch of this rank: ``micro_batch × seq_len``."""
        return self.spec.micro_batch * self.spec.seq_len

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer the shards were made with."""
        return int(self.index["vocab_size"])

    @property
    def skipped_shards(self) -> int:
        """Bad shards skipped so far (with ``skip_bad_shards``) by this rank's streams, as of the last batch."""
        return sum(self._states[k]["skipped"] for k in self.cycle() if self._states.get(k) is not None)

    def cycle(self) -> list[int]:
        """The streams this rank owns from its next batch on, in the order it serves them (see the module docstring)."""
        n, w = self.spec.n_streams, self.world_size
        return [(self.consumed + self.rank + i * w) % n for i in range(n // w)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dataset = _StreamDataset(self.spec, self.cycle(), dict(self._states))
        if self.num_workers == 0:
            batches: Any = iter(dataset)
        else:
            batches = DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_keep,
                pin_memory=torch.cuda.is_available(),
                prefetch_factor=2,
                worker_init_fn=_leave_signals_to_the_main_process,
            )
        for batch in batches:
            self._states[int(batch.pop("_stream"))] = batch.pop("_state")
            self.consumed += self.world_size
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Exact position after the last batch handed out: the global count of micro-batches consumed and the
        positions of the streams this rank owns (JSON-serialisable; :func:`merge_states` joins the ranks')."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "n_streams": self.spec.n_streams,
            "seq_len": self.spec.seq_len,
            "micro_batch": self.spec.micro_batch,
            "shuffle_buffer": self.spec.shuffle_buffer,
            "seed": self.spec.seed,
            "shards": self._fingerprint,
            "consumed": self.consumed,
            "batches": self.batches,
            "streams": {str(k): plain(self._states[k]) for k in self.cycle() if self._states.get(k) is not None},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: one rank's :meth:`state_dict`, or :func:`merge_states` of all ranks' (then on any
        number of ranks and workers that divides its stream count). Raises :class:`DataPositionError` for a position
        that cannot be continued exactly, ValueError for other data settings."""
        if state.get("version") != STATE_VERSION:
            raise DataPositionError(
                f"the data position has format {state.get('version')}, this loader reads format {STATE_VERSION}"
            )
        mine = self.state_dict()
        for key in ("split", "seq_len", "micro_batch", "shuffle_buffer", "seed"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume the data position: it was saved with {key}={state[key]!r} but this loader has "
                    f"{key}={mine[key]!r}; resume with the same data settings"
                )
        if state["shards"] != self._fingerprint:
            raise ValueError(
                f"cannot resume the data position: the {self.split} shards listed in {self.cfg.index!r} changed "
                "since it was saved"
            )
        saved = int(state["n_streams"])
        configured = int(getattr(self.cfg, "streams", 0) or 0)
        per_step = self.world_size * self.spec.n_local
        if (configured and configured != saved) or saved % per_step:
            raise DataPositionError(
                f"the data position was saved with {saved} streams; this run has world_size × max(1, "
                f"data.num_workers) = {self.world_size} × {self.spec.n_local}"
                + (f" and data.streams={configured}" if configured else "")
                + f": resume with a data-parallel size and worker count whose product divides {saved}"
                + (" and data.streams=0" if configured else "")
            )
        if saved != self.spec.n_streams:
            self.spec = dataclasses.replace(
                self.spec, n_streams=saved, split_documents=self.split != "train" or len(self.spec.shards) < saved
            )
        self._states = {int(k): v for k, v in plain(state["streams"]).items()}
        self.consumed = int(state["consumed"])
        self.batches = int(state["batches"])


def merge_states(states: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The global data position from every rank's :meth:`ShardLoader.state_dict` at the same step (ranks that share a
    data-parallel rank, e.g. tensor-parallel peers, give the same one): the union of their streams."""
    present = [s for s in states if s is not None]
    if not present:
        raise DataPositionError("no rank saved a data position")
    first = present[0]
    if any(s.get("version") != STATE_VERSION for s in present):
        raise DataPositionError(f"a rank's data position is not format {STATE_VERSION}")
    for key in ("consumed", "n_streams", "shards", "seed", "seq_len", "micro_batch", "shuffle_buffer", "split"):
        values = {json.dumps(s[key]) for s in present}
        if len(values) > 1:
            raise DataPositionError(f"the ranks' data positions disagree on {key}: {sorted(values)[:4]}")
    streams: dict[str, Any] = {}
    for s in present:
        for k, v in s["streams"].items():
            if k in streams and streams[k] != v:
                raise DataPositionError(f"two ranks saved different positions for data stream {k}")
            streams[k] = v
    return {**first, "rank": None, "streams": streams, "batches": max(int(s["batches"]) for s in present)}


def build_loader(data_cfg: Any, split: str = "train", rank: int = 0, world_size: int = 1) -> ShardLoader:
    """The batches of ``split`` for ``rank`` of ``world_size`` (``data_cfg``: :class:`mambatron.config.DataConfig`)."""
    return ShardLoader(data_cfg, split=split, rank=rank, world_size=world_size)
