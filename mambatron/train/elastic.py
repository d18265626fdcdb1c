"""Resume a checkpoint on another layout (TP, DP, ZeRO stage 0–3, bf16 or fp32): the one module that reads and
writes optimizer state outside DeepSpeed's own same-layout ``load_checkpoint``.

Reading: DeepSpeed's universal-checkpoint converter (``deepspeed.checkpoint.ds_to_universal``) turns the saved ZeRO
1/2/3 or bf16-optimizer files of each TP rank into whole (data-parallel-merged) tensors per parameter: fp32 master
weight, Adam moments, step. It runs once per saved TP rank on a view holding only that rank's files, so it never
merges TP slices itself; the TP merge and split are :mod:`mambatron.parallel.consolidate`'s, which knows every
layer's layout. A checkpoint without optimizer shards holds its optimizer state whole in its model-states file and
is read from there: fp32 without ZeRO, the torch optimizer's state per parameter; bf16 without ZeRO, DeepSpeed's
fp16-style optimizer, whose fp32 master weights and moments are one flat tensor per parameter group, the group's
parameters concatenated in order (the layout ``torch._utils._flatten_dense_tensors`` makes; the manifest names them).

Writing: DeepSpeed's public ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` (ZeRO 1/2/3 and the
bf16 optimizer), ``deepspeed.zero.GatheredParameters`` for ZeRO-3's partitioned module weights, the torch
optimizer's ``state`` for fp32 without ZeRO, and the fp16-style optimizer's ``fp32_groups_flat`` and its inner
optimizer's flat state for bf16 without ZeRO (slices located through its ``fp16_groups``). The optimizer states
those write into exist only after a first step, so they are made here by a step that changes nothing (zero
gradients, lr 0); for that, and for the step count, this module uses DeepSpeed internals:
``_lazy_init_hp_params_optimizer_state`` (ZeRO-1/2, bf16), ZeRO-3's ``fp32_partitioned_groups_flat`` /
``sub_group_to_group_id``, the fp16-style optimizer's ``fp16_groups`` / ``fp32_groups_flat`` and saved state-dict
keys, and the inner torch optimizer's ``state``. They are all here, pinned by tests/train/test_reshard.py to the
DeepSpeed versions pyproject.toml allows.

Everything is exact: the resumed run's consolidated fp32 weights and moments equal the saved run's.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mambatron.parallel.consolidate import link_mp_rank, mp_rank_files, saved_mp_ranks
from mambatron.serialization import load as safe_load
from mambatron.serialization import safe_torch_load


class ReshardError(RuntimeError):
    """A checkpoint could not be converted for another layout (its files are left as they are)."""


# Optimizer state tensors that have a parameter's shape (torch Adam/AdamW).
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
StateDict = dict[str, torch.Tensor]
# Where a saved fp16-style optimizer state (bf16 without ZeRO) keeps its fp32 masters: flat per group, or per parameter.
_FP16_STYLE_KEYS = {"fp32_groups_flat", "fp32_groups"}


def _fp16_style(optimizer: Any) -> bool:
    """DeepSpeed's fp16-style optimizers (bf16 without ZeRO): bf16 module parameters ``fp16_groups`` with fp32
    masters, one flat tensor per group (``FP16_Optimizer``, with a fused Adam) or one per parameter
    (``FP16_UnfusedOptimizer``, with any other torch optimizer)."""
    masters = hasattr(optimizer, "fp32_groups_flat") or hasattr(optimizer, "fp32_groups")
    return hasattr(optimizer, "fp16_groups") and masters


def optimizer_param_names(engine: Any) -> list[list[str]] | None:
    """The names of the parameters of each optimizer group, in the group's order, for a checkpoint whose optimizer
    state is saved whole and keyed by position (no ZeRO); None if a parameter is not the module's."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    optimizer = engine.optimizer
    groups = optimizer.fp16_groups if _fp16_style(optimizer) else [g["params"] for g in optimizer.param_groups]
    out = [[names.get(id(p)) for p in group] for group in groups]
    return out if all(n is not None for group in out for n in group) else None


def is_fp16_style_state(optimizer_state: dict[str, Any]) -> bool:
    """Whether a saved optimizer state is an fp16-style optimizer's (bf16 without ZeRO)."""
    return bool(_FP16_STYLE_KEYS & set(optimizer_state))


def fp16_style_masters(optimizer_state: dict[str, Any], group_names: list[list[str]], shapes: dict[str, torch.Size]):
    """{name: {"weights": fp32, and each moment}} from a saved fp16-style optimizer state (bf16 without ZeRO), and
    its step. A group's masters are one flat tensor (cut into its parameters in order; their sizes must add up
    exactly) or one tensor per parameter; the inner optimizer's state is keyed like its masters."""
    inner = optimizer_state["optimizer_state_dict"]
    flat = "fp32_groups_flat" in optimizer_state
    groups = optimizer_state["fp32_groups_flat" if flat else "fp32_groups"]
    out, step = {}, 0
    for index, (masters, names) in enumerate(zip(groups, group_names, strict=True)):
        keys = inner["param_groups"][index]["params"]
        if flat:
            masters, keys = [masters], keys[:1] * len(names)
        offset = 0
        for i, name in enumerate(names):
            state = inner["state"].get(keys[i], {})
            step = state.get("step", step)
            tensors = {"weights": masters[0 if flat else i], **{k: state[k] for k in MOMENT_KEYS if k in state}}
            numel = math.prod(shapes[name])
            begin = offset if flat else 0
            out[name] = {k: t.reshape(-1)[begin : begin + numel].float().view(shapes[name]) for k, t in tensors.items()}
            offset += numel
        if flat and offset != masters[0].numel():
            raise ValueError(f"optimizer group {index} holds {masters[0].numel()} values, its parameters {offset}")
    return out, step


def convert(step_dir: Path, work_dir: Path) -> None:
    """Run DeepSpeed's converter on every saved TP rank that has optimizer shards (ZeRO 1/2/3), each on a view of
    its own files, into ``work_dir/mp_rank_XX/universal``."""
    from deepspeed.checkpoint import ds_to_universal

    for mp in saved_mp_ranks(step_dir):
        if not any(p.endswith("_optim_states.pt") for p in mp_rank_files(step_dir, mp)):
            continue  # fp32 without ZeRO: the files hold everything whole
        view = work_dir / f"mp_rank_{mp:02d}" / "view"
        link_mp_rank(step_dir, mp, view)
        args = types.SimpleNamespace(
            input_folder=str(view), output_folder=str(view.parent / "universal"), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
        )  # fmt: skip
        quiet = io.StringIO()
        with safe_torch_load(), _one_tp_rank(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            ds_to_universal.main(args)


@contextlib.contextmanager
def _one_tp_rank():
    """The view holds one TP rank's files, so its model-state file must say TP 1: DeepSpeed (0.19+) records the run's
    TP degree in each model-state file and checks the file count against it. Its module state loses the entries that
    hold no tensor. Patched on load, nothing is written."""
    try:
        from deepspeed.checkpoint.constants import CHECKPOINT_PARALLEL_DIMS, CHECKPOINT_TP_DEGREE
    except ImportError:  # older DeepSpeed infers the degree from the files present
        yield
        return
    load = torch.load

    def load_as_one_rank(f, *args, **kwargs):
        state = load(f, *args, **kwargs)
        if str(f).endswith("_model_states.pt") and isinstance(state.get(CHECKPOINT_PARALLEL_DIMS), dict):
            state[CHECKPOINT_PARALLEL_DIMS] = {**state[CHECKPOINT_PARALLEL_DIMS], CHECKPOINT_TP_DEGREE: 1}
        if str(f).endswith("_model_states.pt") and isinstance(state.get("module"), dict):
            # megatron-core modules (the expert-parallel MoE layer's shared experts) save an empty ``_extra_state``
            # (None), which the converter would try to write as a tensor.
            state["module"] = {k: v for k, v in state["module"].items() if v is not None}
        return state

    torch.load = load_as_one_rank
    try:
        yield
    finally:
        torch.load = load


class _SavedRank:
    """One saved TP rank's fp32 weights, Adam moments and step, read one parameter at a time: from the converter's
    per-parameter files, or (fp32 without ZeRO) from the torch optimizer state kept whole in the model-states file,
    whose parameters the manifest names."""

    def __init__(self, step_dir: Path, work_dir: Path, mp: int):
        model_states = safe_load(next(p for p in mp_rank_files(step_dir, mp) if p.endswith("_model_states.pt")))
        self.root = work_dir / f"mp_rank_{mp:02d}" / "universal" / "zero"
        self.whole: dict[str, dict[str, torch.Tensor]] | None = None
        if self.root.is_dir():
            self.shapes: dict[str, torch.Size] = {}
            for group in model_states.get("param_shapes") or []:  # ZeRO-3's converted tensors are flat
                self.shapes.update(group)
            self.names = {p.name for p in self.root.iterdir() if p.is_dir()}
            self.step = self._step()
        else:
            self._read_whole(step_dir, model_states)
        # The module's persistent buffers (state that is not a parameter, e.g. MoE balancing biases), whole.
        module = model_states.get("module") or {}
        buffer_names = model_states.get("buffer_names") or [k for k in module if k not in self.names]
        self.buffers = {k: module[k].float() for k in buffer_names if k in module and not k.endswith("_extra_state")}

    def _step(self) -> Any:
        for name in sorted(self.names):
            if (self.root / name / "step.pt").is_file():
                return safe_load(self.root / name / "step.pt")
        common = safe_load(self.root / "optimizer_state.pt")  # ZeRO-3 sources keep it only here
        return next(iter(common["optimizer_state_dict"]["state"].values()))["step"]

    def _read_whole(self, step_dir: Path, model_states: dict[str, Any]) -> None:
        from mambatron.train.checkpoint import read_manifest

        group_names = read_manifest(step_dir).get("optimizer_param_names")
        optimizer = model_states.get("optimizer")
        if not group_names or not optimizer or not ("state" in optimizer or is_fp16_style_state(optimizer)):
            raise FileNotFoundError(f"{step_dir} has neither optimizer shards nor a whole optimizer state")
        module = {k: v.float() for k, v in model_states["module"].items() if not k.endswith("_extra_state")}
        self.whole = {name: {"weights": t} for name, t in module.items()}
        self.names, self.step = set(module), 0
        if is_fp16_style_state(optimizer):  # bf16 without ZeRO: the fp16-style optimizer's fp32 masters
            masters, self.step = fp16_style_masters(optimizer, group_names, {n: t.shape for n, t in module.items()})
            self.whole.update(masters)
            return
        for group, names in zip(optimizer["param_groups"], group_names):
            for index, name in zip(group["params"], names):
                state = optimizer["state"].get(index, {})
                self.step = state.get("step", self.step)
                self.whole[name].update({k: state[k].float() for k in MOMENT_KEYS if k in state})

    def get(self, name: str) -> dict[str, torch.Tensor]:
        """{"weights": fp32, and each moment present}, in the saved rank's shape."""
        if self.whole is not None:
            return self.whole[name]
        weights = _param(self.root / name / "fp32.pt")
        weights = weights.view(self.shapes[name]) if name in self.shapes else weights
        out = {"weights": weights}
        for key in MOMENT_KEYS:
            if (self.root / name / f"{key}.pt").is_file():
                out[key] = _param(self.root / name / f"{key}.pt").view_as(weights)
        return out


def _param(path: Path) -> torch.Tensor:
    value = safe_load(path)
    return (value["param"] if isinstance(value, dict) else value).float()


def load_into_engine(
    engine: Any,
    step_dir: Path,
    work_dir: Path,
    merge_tp: Callable[[list[StateDict]], StateDict],
    split_tp: Callable[[StateDict], StateDict],
    gather: Callable[[Any], list[Any]],
) -> None:
    """Load the checkpoint in ``step_dir`` (any layout) into ``engine``, one parameter at a time (host memory: one
    parameter's full tensors). Rank 0 converts into ``work_dir`` while the others wait (``gather``: every rank's
    object, a collective) and removes it at the end; a failed conversion is raised on every rank."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    problem = None
    if rank == 0:
        shutil.rmtree(work_dir, ignore_errors=True)
        try:
            convert(step_dir, work_dir)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            problem = f"{type(e).__name__}: {e}"
    try:
        problems = [p for p in gather(problem) if p]
        if problems:
            size_gb = sum(f.stat().st_size for f in step_dir.iterdir() if f.is_file()) / 1e9
            raise ReshardError(
                f"converting {step_dir} for another layout failed ({problems[0]}); the checkpoint is untouched: "
                f"resume it on the layout it was saved with, or make sure {work_dir} can be created with about "
                f"{size_gb:.1f} GB free beside it"
            )
        saved = [_SavedRank(step_dir, work_dir, mp) for mp in saved_mp_ranks(step_dir)]
        _set_engine_state(engine, saved, merge_tp, split_tp)
    finally:
        gather(None)
        if rank == 0:
            shutil.rmtree(work_dir, ignore_errors=True)


def _set_engine_state(engine: Any, saved: list[_SavedRank], merge_tp, split_tp) -> None:
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    named = dict(engine.module.named_parameters())
    missing = sorted(set(named) - saved[0].names)
    if missing:
        raise KeyError(f"checkpoint lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
    optimizer = engine.optimizer
    zero3 = engine.zero_optimization_partition_weights()
    fp32_without_zero = not engine.zero_optimization() and not engine.bfloat16_enabled()
    masters = _master_slices(optimizer) if not engine.zero_optimization() and engine.bfloat16_enabled() else None
    with torch.no_grad():
        # First the optimizer's state tensors, which its first step would create (that step also moves weights).
        if zero3:
            _materialize_zero3_state(optimizer)
        elif not fp32_without_zero:
            _materialize_state(optimizer.optimizer)
            if masters is None:
                optimizer._lazy_init_hp_params_optimizer_state()  # links each parameter to its optimizer fragments
        for name, param in named.items():
            parts = [rank.get(name) for rank in saved]
            local = {key: split_tp(merge_tp([{name: p[key]} for p in parts]))[name] for key in parts[0]}
            if zero3:  # the module weight is partitioned: set it whole, DeepSpeed re-partitions it
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    param.data.copy_(local["weights"].to(param.dtype).view_as(param))
            else:
                param.data.copy_(local["weights"].to(param.dtype).view_as(param))
            moments = {k: local[k] for k in MOMENT_KEYS if k in local}
            if fp32_without_zero:  # a torch optimizer, whose parameters are the master weights
                if moments:
                    optimizer.state[param] = {"step": _step_like(saved[0].step, None), **moments}
                continue
            if masters is not None:  # bf16 without ZeRO: this parameter's slice of its fp32 master
                master, begin = masters[id(param)]
                end = begin + param.numel()
                master.view(-1)[begin:end].copy_(local["weights"].reshape(-1))
                for key, value in moments.items():
                    optimizer.optimizer.state[master][key].view(-1)[begin:end].copy_(value.reshape(-1))
                continue
            safe_set_full_fp32_param(param, local["weights"])
            for key, value in moments.items():
                safe_set_full_optimizer_state(param, value, key)
        if not fp32_without_zero:
            for state in optimizer.optimizer.state.values():
                if "step" in state:
                    state["step"] = _step_like(saved[0].step, state["step"])
        for name, buffer in _persistent_buffers(engine.module):
            if name not in saved[0].buffers:
                raise KeyError(f"checkpoint lacks the module buffer {name}")
            full = merge_tp([{name: rank.buffers[name]} for rank in saved])
            buffer.copy_(split_tp(full)[name].to(buffer.dtype).view_as(buffer))


def _persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) of every buffer that the module's state dict holds."""
    out = []
    for prefix, sub in module.named_modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, buffer))
    return out


def _master_slices(optimizer: Any) -> dict[int, tuple[torch.Tensor, int]]:
    """id(module parameter) -> (the fp32 master tensor holding it, the parameter's offset in it when flattened)."""
    if not _fp16_style(optimizer):
        raise TypeError(f"bf16 without ZeRO: expected DeepSpeed's fp16-style optimizer, got {type(optimizer).__name__}")
    out = {}
    if hasattr(optimizer, "fp32_groups_flat"):
        for params, master in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat, strict=True):
            offset = 0
            for param in params:
                out[id(param)] = (master, offset)
                offset += param.numel()
    else:
        for params, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True):
            out.update({id(param): (master, 0) for param, master in zip(params, masters, strict=True)})
    return out


def _materialize_state(inner: torch.optim.Optimizer) -> None:
    """Create a torch optimizer's per-tensor state, which it makes lazily at its first step, by one step with zero
    gradients at lr 0: AdamW then multiplies each tensor by exactly 1 and adds exactly 0. The states' values are
    overwritten next; ZeRO-1/2 and the bf16 optimizer have no state before their first step, ZeRO-3 makes its own."""
    params = [p for g in inner.param_groups for p in g["params"]]
    if all(p in inner.state and inner.state[p] for p in params):
        return
    lrs = [g["lr"] for g in inner.param_groups]
    grads = [p.grad for p in params]
    try:
        for group in inner.param_groups:
            group["lr"] = 0.0
        for p in params:
            p.grad = torch.zeros_like(p)
        inner.step()
    finally:
        for group, lr in zip(inner.param_groups, lrs):
            group["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad


def _materialize_zero3_state(optimizer: Any) -> None:
    """ZeRO-3 hands its inner optimizer one fp32 sub-group at a time, only inside its step: do the same here."""
    inner = optimizer.optimizer
    for index, flat in enumerate(optimizer.fp32_partitioned_groups_flat):
        group = inner.param_groups[optimizer.sub_group_to_group_id[index]]
        params = group["params"]
        group["params"] = [flat]
        try:
            _materialize_state(inner)
        finally:
            group["params"] = params


def _step_like(step: Any, like: Any) -> Any:
    value = float(step.item() if torch.is_tensor(step) else step)
    if torch.is_tensor(like):
        return torch.full_like(like, value)
    return torch.tensor(value)
