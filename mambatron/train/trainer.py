"""The trainer: build → resume → (train_step, evaluate, save)* → exit, with named steps read top to bottom.

One process per device (torchrun or srun). Tensor parallelism comes from :mod:`mambatron.parallel` (projections
handed to the model), data parallelism and ZeRO from a DeepSpeed engine, the data from
:func:`mambatron.data.build_loader` (each TP group reads the stream of its data-parallel rank).

Preemption: SIGUSR1 or SIGTERM sets a flag; at the end of the current optimizer step every rank agrees on it (one
tiny all-reduce per step), the run saves a checkpoint and exits with :data:`EXIT_PREEMPTED`. After SIGUSR1 (the
time-limit warning that launch/train.sh asks SLURM for) rank 0 then requeues the job (``scontrol requeue
$SLURM_JOB_ID``), which resumes from that checkpoint; SIGTERM (scancel, node shutdown) only saves and exits.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import signal
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mambatron.config import Config, ConfigError
from mambatron.models.moe import AttachAuxLoss, moe_stats, update_expert_biases
from mambatron.plan import count_params, flops_per_token
from mambatron.serialization import UnsafeCheckpointError
from mambatron.train import checkpoint as ckpt
from mambatron.train import signals
from mambatron.train.metrics import MetricsLogger, Throughput, memory_gib
from mambatron.train.runlock import RunLock, RunLockedError
from mambatron.train.schedule import LRSchedule

EXIT_OK = 0
# EX_TEMPFAIL from sysexits.h: "try again later" — the run saved a checkpoint after a preemption signal.
EXIT_PREEMPTED = 75
# train.max_bad_steps consecutive steps had a non-finite loss: the run stopped without saving.
EXIT_DIVERGED = 3


@dataclass
class StepResult:
    """What one optimizer step reports."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    seconds: float
    # A micro-batch had a non-finite loss on some rank: no update was applied (see train_step).
    skipped: bool = False


class Trainer:
    """Owns the run: ``Trainer(config).run()`` trains to ``train.max_steps`` (resuming if it can)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._last_step_skipped = False
        self._lock: RunLock | None = None
        self.out_dir = Path(config.train.out_dir)
        self.step = 0
        self.tokens_seen = 0
        self.last_saved_step = -1
        self._stop_signal = 0
        self.initialised_from = ""
        self.checkpointer: ckpt.Checkpointer | None = None

    # ------------------------------------------------------------------------------------------------- build

    def build(self) -> None:
        """Process groups, seeds, model (meta device, then materialised), DeepSpeed engine, data, schedule, metrics."""
        from mambatron.parallel import build_projections, validate_parallel
        from mambatron.parallel import dist as pdist

        cfg = self.config
        self.dist = pdist.setup(cfg.parallel)
        validate_parallel(cfg.model, cfg.parallel, self.dist.world_size, seq_len=cfg.data.seq_len)
        self.is_main = self.dist.rank == 0
        # One run per out_dir: rank 0 locks it before anything is read or written there; every rank stops if taken.
        self._lock = RunLock(self.out_dir) if self.is_main else None
        taken = None
        if self._lock is not None:
            try:
                self._lock.acquire()
            except RunLockedError as e:
                taken = str(e)
        self._raise_everywhere(taken, RunLockedError)
        self._seed_everything(cfg.train.seed)
        if cfg.train.deterministic:
            # cuBLAS is deterministic only with a fixed workspace; must be set before the first matmul.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.cp = pdist.context_parallel(self.dist)  # None at parallel.cp=1
        projections = build_projections(cfg.parallel, init_std=cfg.model.init_std, cp=self.cp)
        self.model = self.build_model(projections)
        # DeepSpeed insists on LOCAL_RANK, which a plain single-process run does not set.
        os.environ.setdefault("LOCAL_RANK", str(self.dist.local_rank))
        self.engine = self.build_engine(self.model)
        if "E" in cfg.model.hybrid_pattern:
            # MoE layers attach their load-balancing loss's gradient to the routing probabilities; DeepSpeed divides
            # the language-model loss by grad_accum before its backward, so that gradient must be divided too.
            AttachAuxLoss.scale = 1.0 / cfg.train.grad_accum
        self.train_loader = self.build_loader("train")
        if self.train_loader.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of the data's tokenizer "
                f"({self.train_loader.vocab_size}, from {cfg.data.index}); set model.vocab_size to at least "
                f"{self.train_loader.vocab_size}"
            )
        self._train_iter: Any = None
        self._eval_reported = False  # the first evaluation says how many sequences it averages over
        self.schedule = LRSchedule.from_config(cfg.optim, cfg.train.max_steps)
        self.tokens_per_step = cfg.data.micro_batch * cfg.data.seq_len * cfg.train.grad_accum * self.dist.dp_size
        peak = cfg.train.gpu_peak_tflops * 1e12 * self.dist.world_size
        self.throughput = Throughput(flops_per_token(cfg.model, cfg.data.seq_len), peak)
        self.metrics = MetricsLogger(self.out_dir, self.is_main, cfg.to_dict(), cfg.train.wandb, cfg.train.max_steps,
                                     accelerator=self.dist.device.type == "cuda")  # fmt: skip
        if self.initialised_from:
            self.metrics.print(f"initial weights from {self.initialised_from}")
        unused = cfg.model.padded_vocab_size - self.train_loader.vocab_size
        if unused >= cfg.model.pad_vocab_multiple:  # more than the rounding to pad_vocab_multiple
            self.metrics.print(
                f"note: model.vocab_size={cfg.model.vocab_size} is larger than the tokenizer's "
                f"{self.train_loader.vocab_size}: {unused} embedding and output rows will never see a token (set "
                f"model.vocab_size={self.train_loader.vocab_size} unless the model must match another tokenizer)"
            )
        self.metrics.print(
            f"world {self.dist.world_size} ({self._layout()}) on {self.dist.device}, "
            f"{count_params(cfg.model).total:,} parameters, "
            f"{self.tokens_per_step:,} tokens/step, ZeRO {cfg.parallel.zero_stage}, {cfg.train.precision}"
        )

    def _seed_everything(self, seed: int) -> None:
        from mambatron.parallel import dist as pdist

        random.seed(seed + self.dist.rank)
        np.random.seed(seed + self.dist.rank)
        torch.manual_seed(seed)
        pdist.seed_model_parallel(seed)

    def build_model(self, projections: Any) -> torch.nn.Module:
        """Build on the meta device (nothing allocated), then materialise this rank's shard and initialise it."""
        from mambatron.models import build_model

        model = build_model(self.config.model, projections, device="meta")
        model.to_empty(device=self.dist.device)
        if self.dist.tp_size > 1:
            from mambatron.parallel.consolidate import init_weights_like_tp1

            # Each shard gets exactly its slice of the TP=1 initialisation: a run starts the same at every TP size.
            d, ep = self.dist, self.config.parallel.ep
            init_weights_like_tp1(model, self.config.model, self.config.train.seed, d.tp_size, d.tp_rank, ep,
                                  self._ep_rank() if ep > 1 else 0)  # fmt: skip
        else:
            model.init_weights(seed=self.config.train.seed)
        init_from = self.config.train.init_from
        if init_from and ckpt.latest_checkpoint(self.out_dir) is None:
            self._load_initial_weights(model, init_from)
        model.activation_checkpointing = self.config.train.activation_checkpointing
        model.train()
        return model

    def _load_initial_weights(self, model: torch.nn.Module, model_dir: str) -> None:
        """Start from a model directory's full weights (e.g. from tools/import_hf.py), cut to this TP rank."""
        from safetensors.torch import load_file

        from mambatron.parallel import consolidate

        full = load_file(str(Path(model_dir) / "model.safetensors"))
        local = consolidate.shard(full, self.config.model, self.dist.tp_size, self.dist.tp_rank)
        if self.config.parallel.ep > 1:
            local = consolidate.expert_parallel_slice(local, self.config.parallel.ep, self._ep_rank())
        own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        missing, unexpected = sorted(set(own) - set(local)), sorted(set(local) - set(own))
        if missing or unexpected:
            raise ValueError(f"train.init_from={model_dir}: missing keys {missing[:5]}, unexpected {unexpected[:5]}")
        model.load_state_dict(local, strict=False)
        self.initialised_from = model_dir

    def build_engine(self, model: torch.nn.Module) -> Any:
        """The DeepSpeed engine (ZeRO stage, precision and clipping from the config; torch AdamW)."""
        from mambatron.parallel.zero import build_engine

        return build_engine(model, self.config, self.dist)

    def build_loader(self, split: str) -> Any:
        """The batches of ``split`` for this rank's data-parallel index (TP peers read the same stream)."""
        from mambatron.data import build_loader

        return build_loader(self.config.data, split=split, rank=self.dist.dp_rank, world_size=self.dist.dp_size)

    # ------------------------------------------------------------------------------------------------ resume

    # Model settings that change no parameter and no shape: they may differ between a checkpoint and its resume.
    _RESUMABLE_MODEL_CHANGES = frozenset({"kernels", "dt_min", "dt_max", "dt_init_floor", "A_init_range", "init_std",
                                          "chunk_size", "norm_eps"})  # fmt: skip

    def _check_same_model(self, step_dir, manifest: dict) -> None:
        """Refuse, naming every setting, a resume whose model differs from the checkpoint's in any setting that shapes
        the parameters or the computation (instead of a raw 'Missing key(s) in state_dict')."""
        saved = (manifest.get("config") or {}).get("model")
        if not isinstance(saved, dict):
            return
        now = self.config.to_dict()["model"]
        changed = [
            f"model.{k}={saved.get(k)!r} in the checkpoint, {now[k]!r} now"
            for k in now
            if k not in self._RESUMABLE_MODEL_CHANGES and k in saved and saved[k] != now[k]
        ]
        if changed:
            raise ConfigError(
                f"{step_dir} was saved by a different model ({'; '.join(changed)}); resume with the checkpoint's model "
                "settings, or start the new model in another train.out_dir"
            )

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint of ``train.out_dir`` whose files match its manifest; False
        when there is none. Newer ones that do not verify are renamed ``step_*.corrupt`` (kept, never loaded)."""
        step_dir, bad = ckpt.newest_verified(self.out_dir, self._verify_checkpoint)
        if bad and self.is_main:
            for bad_dir, problem in bad:
                warnings.warn(f"checkpoint does not verify, resuming from an earlier one: {problem}", stacklevel=1)
                bad_dir.rename(bad_dir.with_name(bad_dir.name + ".corrupt"))
                self.metrics.print(f"renamed {bad_dir.name} to {bad_dir.name}.corrupt: its files do not verify")
        if bad:
            ckpt.gather_objects(None)  # the renames are done before any rank looks at the directory again
        if step_dir is None:
            if bad:
                raise ckpt.CorruptCheckpointError(f"no checkpoint of {self.out_dir} verifies: {bad[0][1]}")
            return False
        manifest = ckpt.read_manifest(step_dir)
        self._check_same_model(step_dir, manifest)
        # Context parallelism splits sequences, not weights: the ZeRO partitions span data x context parallel ranks,
        # so another CP size is another partitioning, loaded like a data-parallel change.
        same_ranks = (manifest["tp"], manifest["dp"], int(manifest.get("cp", 1))) == (
            self.dist.tp_size, self.dist.dp_size, self.dist.cp_size,
        )  # fmt: skip
        # Expert parallelism changes which experts each file holds: another EP size is another layout.
        saved_ep = int(manifest.get("ep", 1))
        same_ranks = same_ranks and saved_ep == self.config.parallel.ep
        saved_stage = int(manifest.get("zero_stage", self.config.parallel.zero_stage))
        # Each rank reads its own rank file first; a refused one stops every rank here, before any collective of the
        # engine's load, and rank 0 names it. (Every rank reads the same DeepSpeed files, so they fail together.)
        rank_state, refused = None, None
        if same_ranks:
            try:
                rank_state = ckpt.load_rank_state(step_dir, self.dist.rank)
            except UnsafeCheckpointError as e:
                refused = str(e)
        self._raise_everywhere(refused, UnsafeCheckpointError)
        if same_ranks and ckpt.same_zero_format(saved_stage, self.config.parallel.zero_stage):
            ckpt.load_same_layout(self.engine, step_dir)
        else:
            self._load_resharded(step_dir)
        if rank_state is not None:
            ckpt.restore_rng(rank_state["rng"])
        else:
            self._seed_everything(self.config.train.seed + manifest["step"])
        self._resume_data(manifest)
        self.step = int(manifest["step"])
        self.tokens_seen = int(manifest["tokens"])
        self.last_saved_step = self.step
        change = self.schedule.change_since(manifest["schedule"], self.step) if "schedule" in manifest else None
        if change and self.is_main:
            warnings.warn(change, stacklevel=1)
        self.metrics.print(f"resumed from {step_dir} (step {self.step}, {self.tokens_seen:,} tokens)")
        return True

    def _resume_data(self, manifest: dict[str, Any]) -> None:
        """Continue the global data sequence where the checkpoint left it, on this run's data-parallel layout (from
        the positions every saved rank recorded); when that cannot be exact, restart the streams and say why."""
        from mambatron.data import DataPositionError, merge_states

        saved = [pos for _, pos in sorted((manifest.get("data") or {}).items(), key=lambda kv: int(kv[0]))]
        try:
            self.train_loader.load_state_dict(merge_states(saved))
        except DataPositionError as e:
            if self.is_main:
                warnings.warn(
                    f"resuming on TP {self.dist.tp_size} x DP {self.dist.dp_size} from a checkpoint saved on "
                    f"TP {manifest['tp']} x DP {manifest['dp']}: the data streams restart from the beginning "
                    f"({e})",
                    stacklevel=1,
                )

    def _verify_checkpoint(self, step_dir: Path) -> str | None:
        """Check a checkpoint's files against its manifest, each rank hashing its share (a collective)."""
        names = sorted(ckpt.read_manifest(step_dir).get("files") or [])
        mine = names[self.dist.rank :: self.dist.world_size]
        problem = ckpt.verify_files(step_dir, mine) if mine else None
        return next((p for p in ckpt.gather_objects(problem) if p), None)

    @staticmethod
    def _raise_everywhere(error: str | None, kind: type[Exception]) -> None:
        """Raise ``kind`` on every rank with the first rank's error, if any rank had one (a collective)."""
        first = next((e for e in ckpt.gather_objects(error) if e), None)
        if first:
            raise kind(first)

    def _load_resharded(self, step_dir: Path) -> None:
        """Another TP, DP, CP or EP size, or ZeRO format: every weight and Adam moment merged to the full (TP 1,
        EP 1) tensor and cut again for this rank. The saved files' model-parallel ranks are TP ranks, EP ranks (an
        expert-parallel run at TP 1) or both (EP = TP)."""
        from mambatron.parallel import consolidate
        from mambatron.train import elastic

        model_cfg, ep = self.config.model, self.config.parallel.ep
        manifest = ckpt.read_manifest(step_dir)
        saved_tp, saved_ep = int(manifest["tp"]), int(manifest.get("ep", 1))

        def merge(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
            return consolidate.merge_model_parallel(states, model_cfg, saved_tp, saved_ep)

        def split(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            local = consolidate.shard(full, model_cfg, self.dist.tp_size, self.dist.tp_rank)
            return consolidate.expert_parallel_slice(local, ep, self._ep_rank()) if ep > 1 else local

        elastic.load_into_engine(
            self.engine,
            step_dir,
            work_dir=step_dir.parent / f".reshard_{step_dir.name}",
            merge_tp=merge,
            split_tp=split,
            gather=ckpt.gather_objects,
        )

    # -------------------------------------------------------------------------------------------- train step

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._train_iter is None:
            self._train_iter = iter(self.train_loader)
        batch = next(self._train_iter)
        return {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}

    def micro_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token loss of one micro-batch over labels >= 0 (given labels, the engine's forward returns it).
        Under context parallelism this rank takes its slice of every sequence, and its loss is scaled so that the mean
        over the CP group is the micro-batch's mean (see ``MambaLM._head_loss``)."""
        if self.cp is not None:
            n = batch["input_ids"].shape[1] // self.cp.size
            part = slice(self.cp.rank * n, (self.cp.rank + 1) * n)
            batch = {k: v[:, part].contiguous() for k, v in batch.items()}
        return self.engine(batch["input_ids"], seq_idx=batch.get("seq_idx"), labels=batch["labels"])

    def _layout(self) -> str:
        d = self.dist
        cp = f" x CP {d.cp_size}" if d.cp_size > 1 else ""
        ep = self.config.parallel.ep
        over_tp = f" (EP {ep} over it)" if ep > 1 and d.tp_size > 1 else ""
        within_dp = f" (EP {ep} within {'DP x CP' if d.cp_size > 1 else 'it'})" if ep > 1 and d.tp_size == 1 else ""
        return f"TP {d.tp_size}{over_tp}{cp} x DP {d.dp_size}{within_dp}"

    def _ep_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_expert_model_parallel_rank()

    def _loss_group(self):
        """The ranks whose losses average to the global one: data parallel, and context parallel within it."""
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    def train_step(self) -> StepResult:
        """One optimizer step: ``grad_accum`` micro-batches forward/backward, clip, AdamW update at the scheduled LR."""
        started = time.perf_counter()
        lr = self.schedule.lr_at(self.step)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        accum = self.config.train.grad_accum
        grad_norm = None
        skipped = False
        for i in range(accum):
            batch = self.next_batch()  # consumed either way, so the data order does not depend on skips
            if skipped:
                continue
            loss = self.micro_loss(batch)
            if not self._finite_everywhere(loss):
                # Skip the step. No backward of a non-finite loss, no engine step: the weights and the optimizer
                # state stay as they were. Gradients of earlier micro-batches of this step (grad_accum > 1) are
                # dropped with the engine's accumulation state (exactly under ZeRO 0, 1 and 3; ZeRO-2 has already
                # reduced them into its partition buffers, and they reach the next step).
                skipped = True
                total += loss.detach().double()
                if i > 0:
                    self._drop_accumulated_gradients()
                continue
            self.engine.backward(loss)
            if i == accum - 1 and self._norm_before_step:
                grad_norm = self._grad_norm()
            self.engine.step()
            total += loss.detach().double()
        update_expert_biases(self.model, self._loss_group() if self.dist.world_size > 1 else None, skip=skipped)
        mean_loss = float("nan") if skipped else self._dp_mean(total / accum)
        if grad_norm is None and not skipped:
            grad_norm = self.engine.get_global_grad_norm()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        if self.config.train.async_save and self.checkpointer is None and not skipped:
            # Once the optimizer state exists: the first save's host buffers are allocated in the background now.
            self._checkpointer().reserve(self.engine, self.out_dir, self._rank_state(), self.dist.rank)
        return StepResult(
            step=self.step,
            loss=mean_loss,
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            seconds=time.perf_counter() - started,
            skipped=skipped,
        )

    def _finite_everywhere(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite on every rank (one all-reduce; every rank gets the same answer)."""
        flag = torch.isfinite(value.detach().float()).all().float().reshape(1)
        if self.dist.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _weights_finite(self) -> bool:
        """Whether every local parameter (its ZeRO-3 partition too) is finite on every rank."""
        local = (
            p.ds_tensor if getattr(p, "ds_tensor", None) is not None else p.data
            for p in self.engine.module.parameters()
        )
        ok = all(bool(torch.isfinite(t).all()) for t in local)
        return self._finite_everywhere(torch.tensor(0.0 if ok else float("nan"), device=self.dist.device))

    def _drop_accumulated_gradients(self) -> None:
        """Forget the gradients accumulated by the earlier micro-batches of a skipped step and restart the engine's
        micro-step count at an accumulation boundary."""
        optimizer = self.engine.optimizer
        optimizer.zero_grad()
        self.engine.zero_grad()
        # ZeRO-2 has already reduced them into this rank's flat gradient partition (DeepSpeed 0.16-0.19).
        partition = getattr(optimizer, "grads_in_partition", None)
        if torch.is_tensor(partition):
            partition.zero_()
        self.engine.micro_steps -= self.engine.micro_steps % self.config.train.grad_accum

    @property
    def _norm_before_step(self) -> bool:
        """Plain fp32 without ZeRO: DeepSpeed clips but does not report the norm, so it is measured here."""
        return not self.engine.zero_optimization() and not self.engine.bfloat16_enabled()

    def _grad_norm(self) -> float:
        """Global L2 norm of the (DP-averaged) gradients; TP-replicated parameters counted once."""
        from deepspeed.runtime.utils import is_model_parallel_parameter
        from megatron.core import parallel_state

        squares = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        for p in self.engine.module.parameters():
            if p.grad is not None and (self.dist.tp_rank == 0 or is_model_parallel_parameter(p)):
                squares += p.grad.detach().double().pow(2).sum()
        if self.dist.tp_size > 1:
            dist.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
        return math.sqrt(float(squares))

    def _dp_mean(self, value: torch.Tensor) -> float:
        ranks = self.dist.dp_size * self.dist.cp_size
        if ranks > 1:
            dist.all_reduce(value, group=self._loss_group())
            value = value / ranks
        return float(value)

    # -------------------------------------------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over ``train.eval_steps`` micro-batches of the validation split (the same ones every time);
        NaN when the split is empty.

        Ranks may hold different numbers of validation batches; every forward is a collective under TP and ZeRO-3,
        so all ranks first agree on the smallest count and evaluate exactly that many."""
        self.engine.eval()
        batches = list(itertools.islice(self.build_loader("val"), self.config.train.eval_steps))
        n = torch.tensor(len(batches), dtype=torch.int64, device=self.dist.device)
        if self.dist.world_size > 1:
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
        if not self._eval_reported:
            self._eval_reported = True
            cfg = self.config
            sequences = int(n) * cfg.data.micro_batch * self.dist.dp_size
            line = (f"validation: {sequences} sequences of {cfg.data.seq_len} tokens per evaluation ({int(n)} of "
                    f"train.eval_steps={cfg.train.eval_steps} micro-batches per rank)")  # fmt: skip
            if int(n) < cfg.train.eval_steps:
                line += (
                    "; the validation split is smaller than that: re-run tools/prepare_data.py with a larger "
                    "--val-fraction or --min-val-docs for a steadier validation loss"
                )
            self.metrics.print(line)
        total = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        for batch in batches[: int(n)]:
            batch = {k: v.to(self.dist.device) for k, v in batch.items()}
            total += self.micro_loss(batch).double()
        self.engine.train()
        if int(n) == 0:
            return float("nan")
        ranks = self.dist.dp_size * self.dist.cp_size
        if ranks > 1:
            dist.all_reduce(total, group=self._loss_group())
            total /= ranks
        return float(total / int(n))

    # -------------------------------------------------------------------------------------------------- save

    def save(self) -> Path | None:
        """Checkpoint the current step (a collective over all ranks); None, and nothing written or pruned, when the
        weights are not finite."""
        cfg = self.config
        # Weights that just gave a non-finite loss are not healthy either, even when every value is finite.
        why = "its loss was not finite" if self._last_step_skipped else None
        if why is None and not self._weights_finite():
            why = "the weights are not finite"
        if why:
            latest = ckpt.latest_checkpoint(self.out_dir)
            self.metrics.print(
                f"not saving step {self.step}: {why} (the newest checkpoint, {latest.name if latest else 'none'}, "
                "is kept)"
            )
            return None
        manifest = {
            "config": cfg.to_dict(),
            "tokens": self.tokens_seen,
            "schedule": self.schedule.state_dict(),
            "world_size": self.dist.world_size,
            "tp": self.dist.tp_size,
            "dp": self.dist.dp_size,
            "cp": self.dist.cp_size,
            "ep": cfg.parallel.ep,
            "zero_stage": cfg.parallel.zero_stage,
            "precision": cfg.train.precision,
        }
        if not self.engine.zero_optimization():
            # Without ZeRO the optimizer state is saved whole, keyed by position: name the parameters for resharding.
            from mambatron.train import elastic

            groups = elastic.optimizer_param_names(self.engine)
            if groups is not None:
                manifest["optimizer_param_names"] = groups
        path = self._checkpointer().save(
            self.engine, self.out_dir, self.step, manifest, self._rank_state(), self.dist.rank, cfg.train.keep_last
        )
        self.last_saved_step = self.step
        stall = self.checkpointer.last_stall_seconds
        if cfg.train.async_save:
            allocated = self.checkpointer.buffers.allocations
            note = f" ({allocated} host buffers allocated)" if allocated else ""
            self.metrics.print(f"staged step {self.step} in {stall:.1f}s{note}; writing {path} in the background")
        else:
            self.metrics.print(f"saved {path} in {stall:.1f}s")
        return path

    def _rank_state(self) -> dict:
        return {
            "rng": ckpt.capture_rng(),
            "data": self.train_loader.state_dict(),
            "rank": self.dist.rank,
            "tp_rank": self.dist.tp_rank,
            "dp_rank": self.dist.dp_rank,
        }

    def _checkpointer(self) -> ckpt.Checkpointer:
        if self.checkpointer is None:
            self.checkpointer = ckpt.Checkpointer(self.config.train.async_save, log=self.metrics.print)
        return self.checkpointer

    def finish_saving(self) -> None:
        """Wait for the checkpoint being written in the background, if any (raises if writing it failed)."""
        if self.checkpointer is not None:
            self.checkpointer.wait()

    # --------------------------------------------------------------------------------------------------- run

    def _should_stop(self) -> bool:
        """True on every rank once any rank got a preemption signal (agreed with one all-reduce)."""
        flag = torch.tensor([float(signals.received())], device=self.dist.device)
        if self.dist.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._stop_signal = int(flag.item())
        return bool(self._stop_signal)

    def run(self) -> int:
        """Build, resume, train to ``max_steps`` with periodic eval and saves; returns the process exit code."""
        signals.install()
        self.build()
        try:
            self.resume()
            code = self._loop()
            self.finish_saving()
        finally:
            if self.checkpointer is not None and self.checkpointer.in_flight:  # an error: still finish the save
                try:
                    self.finish_saving()
                except RuntimeError as e:
                    self.metrics.print(f"error: {e}")
            self.shutdown()
        if code == EXIT_PREEMPTED and self._stop_signal == signal.SIGUSR1:
            # Only for the time-limit signal: SIGTERM also comes from scancel, which must not bring the job back.
            # Last, once this process has let go of its workers and process group: requeueing kills the job.
            self._request_requeue()
        return code

    def shutdown(self) -> None:
        """Stop the data-loader workers, close the metrics, leave the process groups."""
        from mambatron.parallel import dist as pdist

        self._train_iter = None
        self.metrics.close()
        pdist.teardown()
        if self._lock is not None:
            self._lock.release()

    def _loop(self) -> int:
        tcfg = self.config.train
        bad_steps = 0
        while self.step < tcfg.max_steps:
            result = self.train_step()
            self._log(result)
            bad_steps = bad_steps + 1 if result.skipped else 0
            self._last_step_skipped = result.skipped
            if bad_steps >= tcfg.max_bad_steps:
                latest = ckpt.latest_checkpoint(self.out_dir)
                self.metrics.print(
                    f"error: {bad_steps} consecutive steps with a non-finite loss (steps {self.step - bad_steps + 1}"
                    f"-{self.step}); stopping without saving. The newest checkpoint "
                    f"({latest.name if latest else 'none'}) is kept as it is: lower optim.lr (now "
                    f"{self.config.optim.lr:g}) or check the data, then resume"
                )
                return EXIT_DIVERGED
            if tcfg.eval_every and self.step % tcfg.eval_every == 0:
                val_loss = self.evaluate()
                if math.isnan(val_loss):
                    self.metrics.print("the validation split has no batches: evaluation skipped")
                else:
                    self.metrics.log_eval(self.step, val_loss)
            # A signal during the last step needs no requeue: the run saves below and ends.
            if self.step < tcfg.max_steps and self._should_stop():
                name = signal.Signals(self._stop_signal).name
                self.metrics.print(f"got {name}: saving step {self.step} and exiting")
                self.save()
                return EXIT_PREEMPTED
            if tcfg.save_every and self.step % tcfg.save_every == 0:
                self.save()
        if self.last_saved_step != self.step:
            self.save()
        self.metrics.print(f"done: {self.step} steps, {self.tokens_seen:,} tokens")
        return EXIT_OK

    def _log(self, result: StepResult) -> None:
        tokens_per_s, mfu = self.throughput.update(result.seconds, self.tokens_per_step)
        record = {
            "step": result.step,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "step_seconds": result.seconds,
            "memory_gib": memory_gib(self.dist.device),
        }
        record.update(moe_stats(self.model))  # this rank's MoE layers since the last step (none without E layers)
        if result.skipped:
            record["skipped"] = True
            self.metrics.print(f"non-finite loss at step {result.step}: step skipped, weights not updated")
        print_line = result.step % self.config.train.log_every == 0 or result.step == 1
        self.metrics.log_step(record, print_line, self.throughput.eta_seconds_per_step())

    def _request_requeue(self) -> None:
        """Under SLURM, rank 0 requeues the job so that it restarts from the checkpoint just written."""
        job = os.environ.get("SLURM_JOB_ID")
        if not job or not self.is_main:
            return
        try:
            out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            if out.returncode == 0:
                status = "requeued"
            elif out.returncode in (-signal.SIGTERM, -signal.SIGKILL):
                # scontrol runs inside the job: the requeue it asked for can end it before it exits.
                status = "requeued (scontrol was ended by the requeue it requested)"
            else:
                status = f"requeue failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()}"
        except (OSError, subprocess.SubprocessError) as e:
            status = f"requeue failed: {e}"
        self.metrics.print(f"SLURM job {job} {status}")
