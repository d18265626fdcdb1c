"""Step-directory checkpoints: DeepSpeed's sharded states plus a JSON manifest, written atomically.

Layout of one checkpoint::

    <out_dir>/checkpoints/step_0000100/
        manifest.json                           # config, step, tokens, data positions, schedule, sizes, status
        rank_00000.pt ...                       # per-rank RNG states and data-loader position
        mp_rank_00_model_states.pt ...          # DeepSpeed: module weights per TP rank
        zero_pp_rank_0_mp_rank_00_optim_states.pt ...   # DeepSpeed: ZeRO optimizer shards per (DP, TP) rank

A checkpoint is first written to ``checkpoints/.tmp_step_0000100`` and renamed to its final name by rank 0 only
after every rank has finished writing, its files are flushed to disk and ``manifest.json`` (with
``"status": "complete"``) is on disk. Resume looks
only at ``step_*`` directories whose manifest says complete, so a torn checkpoint is never loaded.

Resuming on the same TP and DP sizes (and ZeRO format) goes through ``engine.load_checkpoint`` and is bit-exact. On
a different layout :mod:`mambatron.train.elastic` rebuilds the full fp32 weights and Adam moments of every TP rank
with DeepSpeed's universal-checkpoint converter, merges and re-splits them over the new TP size and sets them through
DeepSpeed's public optimizer-state API: any ZeRO stage, bf16 or fp32, to any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mambatron.serialization import load as safe_load
from mambatron.serialization import safe_torch_load

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{7,})$")
_TMP_PREFIX = ".tmp_"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def rank_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rank_{rank:05d}.pt"


def read_manifest(step_dir: str | Path) -> dict[str, Any]:
    with open(Path(step_dir) / MANIFEST) as f:
        return json.load(f)


def is_complete(step_dir: Path) -> bool:
    """True when ``step_dir`` has a readable manifest marked complete (anything else is a torn write)."""
    try:
        return read_manifest(step_dir).get("status") == "complete"
    except (OSError, ValueError):
        return False


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    complete = list_checkpoints(out_dir)
    return complete[-1] if complete else None


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file does not match the size or sha256 its manifest recorded."""


def file_digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def verify_files(step_dir: Path, names: list[str] | None = None) -> str | None:
    """None when the (given) files of a checkpoint match its manifest's sizes and sha256, else what is wrong.

    A checkpoint written before the manifest recorded files (no ``files`` entry) cannot be verified and passes."""
    recorded = read_manifest(step_dir).get("files")
    if recorded is None:
        return None
    for name in sorted(recorded) if names is None else names:
        want = recorded[name]
        path = step_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} has {size:,} bytes, the manifest recorded {want['bytes']:,} (truncated or replaced?)"
        if file_digest(path)["sha256"] != want["sha256"]:
            return f"{path} does not match the sha256 its manifest recorded (corrupted)"
    if names is None:
        extra = {p.name for p in step_dir.iterdir() if p.is_file() and p.name != MANIFEST} - set(recorded)
        if extra:
            return f"{step_dir} holds files its manifest does not list: {sorted(extra)[:3]}"
    return None


def newest_verified(
    out_dir: str | Path, verify: Callable[[Path], str | None] = verify_files
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint whose files verify, and the newer ones it passed over with what is wrong."""
    bad = []
    for step_dir in reversed(list_checkpoints(out_dir)):
        problem = verify(step_dir)
        if problem is None:
            return step_dir, bad
        bad.append((step_dir, problem))
    return None, bad


def resolve_checkpoint(path: str | Path, warn: Callable[[str], None] | None = None) -> Path:
    """Accept a step directory, a ``checkpoints/`` folder or a run directory; return a complete step directory whose
    files verify. For a run, the newest such one (``warn`` is told about newer ones passed over); a step directory
    that does not verify raises :class:`CorruptCheckpointError`."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is an incomplete checkpoint (manifest status is not 'complete')")
        if (problem := verify_files(path)) is not None:
            raise CorruptCheckpointError(f"{problem}; use an earlier checkpoint of the run")
        return path
    for run_dir in (path, path.parent):
        if list_checkpoints(run_dir):
            found, bad = newest_verified(run_dir)
            for _, problem in bad:
                (warn or print)(f"skipping a checkpoint that does not verify: {problem}")
            if found is not None:
                return found
            raise CorruptCheckpointError(f"no checkpoint of {run_dir} verifies: {bad[0][1]}")
    raise FileNotFoundError(f"no complete checkpoint in {path}; pass <out_dir>/checkpoints/step_XXXXXXX")


# ----------------------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA generator states of this process."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # Plain values, not an ndarray: a rank file must load with weights_only=True and no NumPy types.
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]
    key = key.numpy() if torch.is_tensor(key) else np.asarray(key)  # older rank files hold the ndarray
    np.random.set_state((name, key.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------- save


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank (a collective; ``[obj]`` without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk (whichever process wrote them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_MARKER = ".written_rank_"  # rank r's <_MARKER>r.json: its files are durable, with their digests
_MARKER_TIMEOUT_S = 3 * 3600.0


class Checkpointer:
    """Writes checkpoints, in the background when ``asynchronous``.

    :meth:`save` is a collective. It stages everything the checkpoint holds (DeepSpeed's files via
    :func:`mambatron.train.staging.staged_save`, the rank state) in host memory and returns; a background thread of
    each rank then writes its files, flushes them to disk and records their digests in a marker file. Rank 0's thread
    waits for every rank's marker, then writes the manifest, renames the directory and prunes, exactly as a
    synchronous save does: a checkpoint is complete, and resumable, only once every file is durable. A save waits for
    the previous one to finish first (so host memory holds one staged copy). With ``asynchronous=False`` the save
    returns once the checkpoint is complete on every rank.
    """

    def __init__(self, asynchronous: bool = True, log: Callable[[str], None] | None = None) -> None:
        from mambatron.train.staging import HostBuffers

        self.asynchronous = asynchronous
        self.log = log
        self.buffers = HostBuffers()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_stall_seconds = 0.0  # how long the last save blocked its caller

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the save in flight (if any) is written; re-raise what went wrong in it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing the last checkpoint failed: {error}") from error

    def reserve(self, engine: Any, out_dir: str | Path, rank_state: dict[str, Any], rank: int) -> None:
        """Allocate the host buffers of an asynchronous save ahead of it, in a background thread (a collective).

        Allocating gigabytes of pinned memory, not copying into it, is most of a first save's stall. DeepSpeed's
        save runs once into a :class:`~mambatron.train.staging.SizeRecorder` (nothing copied; the only thing
        written is an empty scratch folder, removed again) to learn the sizes. Call it once the optimizer state
        exists (after a step)."""
        from mambatron.train.staging import SizeRecorder, stage, staged_save

        if not self.asynchronous:
            return
        root = checkpoint_root(out_dir)
        scratch = root / f"{_TMP_PREFIX}sizing"
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(scratch, ignore_errors=True)
        _barrier()
        recorder = SizeRecorder()
        with staged_save(engine, recorder):
            engine.save_checkpoint(str(root), tag=scratch.name, save_latest=False)
        stage(rank_state, recorder)
        _barrier()
        if rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
        self.buffers.reserve(recorder.specs)

    def save(
        self,
        engine: Any,
        out_dir: str | Path,
        step: int,
        manifest: dict[str, Any],
        rank_state: dict[str, Any],
        rank: int,
        keep_last: int,
    ) -> Path:
        """Checkpoint ``checkpoints/step_<step>`` (all ranks must call it); returns the directory it will have.

        ``manifest`` (identical on every rank) is completed with the data positions gathered from all ranks;
        ``rank_state`` (RNG, data position, anything per rank) goes to ``rank_XXXXX.pt``."""
        from mambatron.train.staging import stage, staged_save

        self.wait()
        started = time.perf_counter()
        root = checkpoint_root(out_dir)
        name = step_dir_name(step)
        tmp = root / f"{_TMP_PREFIX}{name}"
        final = root / name
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left over from a run that died while saving
                shutil.rmtree(tmp)
        _barrier()
        with staged_save(engine, self.buffers) as files:
            engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
        files = [*files, (str(rank_file(tmp, rank)), stage(rank_state, self.buffers))]
        data_positions = gather_objects(rank_state.get("data"))
        world = len(data_positions)
        body = None
        if rank == 0:
            body = dict(manifest)
            body.update(
                format_version=FORMAT_VERSION,
                step=step,
                data={str(r): pos for r, pos in enumerate(data_positions)},
                rank_files=[rank_file(tmp, r).name for r in range(world)],
            )
        job = dict(files=files, tmp=tmp, final=final, rank=rank, world=world, body=body, keep_last=keep_last,
                   started=started)  # fmt: skip
        self._thread = threading.Thread(target=self._write, args=(job,), name=f"checkpoint-{name}", daemon=True)
        self._thread.start()
        if not self.asynchronous:
            self.wait()
            _barrier()  # every rank returns once rank 0 has made the checkpoint complete
        self.last_stall_seconds = time.perf_counter() - started
        return final

    def _write(self, job: dict[str, Any]) -> None:
        try:
            _write_rank(job)
            if job["rank"] == 0:
                _commit(job)
                if self.log is not None and self.asynchronous:
                    seconds = time.perf_counter() - job["started"]
                    self.log(f"checkpoint {job['final']} written in the background in {seconds:.1f}s")
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
            self._error = e


def _write_rank(job: dict[str, Any]) -> None:
    """This rank's files: write, flush to disk, digest; then its marker (written last, flushed)."""
    tmp: Path = job["tmp"]
    digests = {}
    for path, state in job["files"]:
        path = Path(path)
        torch.save(state, path)
        _fsync(path)
        digests[str(path.relative_to(tmp))] = file_digest(path)
    job["files"] = None  # let the host copies go
    marker = tmp / f"{_MARKER}{job['rank']:05d}.json"
    _fsync_write(marker.with_suffix(".part"), json.dumps(digests))
    os.replace(marker.with_suffix(".part"), marker)
    _fsync(tmp)


def _commit(job: dict[str, Any]) -> None:
    """Rank 0, once every rank's files are durable: the manifest, the rename, the pruning."""
    tmp: Path = job["tmp"]
    final: Path = job["final"]
    markers = [tmp / f"{_MARKER}{r:05d}.json" for r in range(job["world"])]
    deadline = time.monotonic() + _MARKER_TIMEOUT_S
    while not all(m.is_file() for m in markers):
        if time.monotonic() > deadline:
            missing = [m.name for m in markers if not m.is_file()]
            raise TimeoutError(f"{tmp}: ranks did not finish writing within {_MARKER_TIMEOUT_S:.0f}s: {missing[:4]}")
        time.sleep(0.02)
    files = {}
    for marker in markers:
        files.update(json.loads(marker.read_text()))
    for marker in markers:
        marker.unlink()
    # Files that did not go through the staging (DeepSpeed's recovery script, an engine that writes itself).
    for path in sorted(tmp.rglob("*")):
        rel = str(path.relative_to(tmp))
        if path.is_dir():
            _fsync(path)
        elif rel not in files:
            _fsync(path)
            files[rel] = file_digest(path)
    body = job["body"]
    body.update(
        files=dict(sorted(files.items())),
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        save_seconds=round(time.perf_counter() - job["started"], 3),
        status="complete",
    )
    _fsync_write(tmp / MANIFEST, json.dumps(body, indent=1, default=str))
    _fsync(tmp)
    if final.exists():  # an older save of the same step (e.g. saved again after a resume)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    _prune(final.parent, job["keep_last"])


def _prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and the temporary directories of saves that
    died (called once the current save is renamed, so every ``.tmp_step_*`` left is stale)."""
    for stale in root.glob(f"{_TMP_PREFIX}step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    complete = list_checkpoints(root.parent)
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------- load


def same_zero_format(saved_stage: int, stage: int) -> bool:
    """Whether DeepSpeed can load a ZeRO-``saved_stage`` optimizer state into a ZeRO-``stage`` engine itself (stages 1
    and 2 share one format). For any other pair it would find no files it knows and silently keep fresh Adam
    moments, so such a checkpoint goes through :func:`mambatron.train.elastic.load_into_engine`."""
    return saved_stage == stage or {saved_stage, stage} <= {1, 2}


def load_same_layout(engine: Any, step_dir: Path) -> None:
    """Load module, optimizer and ZeRO shards saved with the current TP and DP sizes and ZeRO format (bit-exact)."""
    with safe_torch_load():  # DeepSpeed's checkpoint engine would unpickle with weights_only=False
        path, _ = engine.load_checkpoint(
            str(step_dir.parent),
            tag=step_dir.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {step_dir}")


def load_rank_state(step_dir: Path, rank: int) -> dict[str, Any] | None:
    path = rank_file(step_dir, rank)
    return safe_load(path) if path.is_file() else None


def load_trained_model(path: str | Path) -> tuple[Any, Any]:
    """``(model, Config)`` from a model directory (config.yaml + model.safetensors, as tools/import_hf.py writes) or
    a training checkpoint (anything :func:`load_full_model_state` takes)."""
    from mambatron.hf import load_full_state, load_model_dir
    from mambatron.models import build_model

    if (Path(path) / "model.safetensors").is_file():
        return load_model_dir(path)
    state, config = load_full_model_state(path)
    model = build_model(config.model)
    load_full_state(model, state)
    return model, config


def load_full_model_state(path: str | Path) -> tuple[dict[str, torch.Tensor], Any]:
    """Full (TP=1) fp32 model weights and the run :class:`~mambatron.config.Config` of a training checkpoint.

    ``path`` is a step directory, a run's ``checkpoints/`` folder or a run directory (then its newest complete
    checkpoint is used). TP shards are merged and ZeRO partitions gathered by :mod:`mambatron.parallel.consolidate`.
    """
    from mambatron.config import config_from_dict
    from mambatron.parallel import consolidate

    step_dir = resolve_checkpoint(path, warn=lambda message: print(f"warning: {message}", file=sys.stderr))
    config = config_from_dict(read_manifest(step_dir)["config"])
    state = consolidate.consolidate_zero_checkpoint(str(step_dir.parent), config.model, tag=step_dir.name)
    return state, config
