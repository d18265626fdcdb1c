"""Resume a checkpoint on another layout (TP, DP, ZeRO stage 0–3, bf16 or fp32; not bf16 without ZeRO): the one
module that reads and writes optimizer state outside DeepSpeed's own same-layout ``load_checkpoint``.

Reading: DeepSpeed's universal-checkpoint converter (``deepspeed.checkpoint.ds_to_universal``) turns the saved ZeRO
1/2/3 or bf16-optimizer files of each TP rank into whole (data-parallel-merged) tensors per parameter: fp32 master
weight, Adam moments, step. It runs once per saved TP rank on a view holding only that rank's files, so it never
merges TP slices itself; the TP merge and split are :mod:`mambatron.parallel.consolidate`'s, which knows every
layer's layout. A checkpoint without optimizer shards (fp32 without ZeRO) holds the torch optimizer's state whole in
its model-states file and is read from there.

Writing: DeepSpeed's public ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` (ZeRO 1/2/3 and the
bf16 optimizer), ``deepspeed.zero.GatheredParameters`` for ZeRO-3's partitioned module weights, and the torch
optimizer's ``state`` without ZeRO. The optimizer states those functions write into exist only after a first step,
so they are made here by a step that changes nothing (zero gradients, lr 0); for that, and for the step count, this
module uses DeepSpeed internals: ``_lazy_init_hp_params_optimizer_state`` (ZeRO-1/2, bf16), ZeRO-3's
``fp32_partitioned_groups_flat`` / ``sub_group_to_group_id``, and the inner torch optimizer's ``state``. They are
all here, pinned by tests/train/test_reshard.py to the DeepSpeed versions pyproject.toml allows.

Everything is exact: the resumed run's consolidated fp32 weights and moments equal the saved run's.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mambatron.serialization import load as safe_load
from mambatron.serialization import safe_torch_load

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
StateDict = dict[str, torch.Tensor]
# Per TP rank: (fp32 weights, {key: moments} for the MOMENT_KEYS, step).
RankState = tuple[StateDict, dict[str, StateDict], Any]


def refusal(saved_stage: int, saved_precision: str, stage: int, precision: str) -> str | None:
    """Why a checkpoint cannot be resharded between these settings, or None. bf16 without ZeRO keeps its fp32
    master weights in DeepSpeed's fp16-style optimizer, which neither the converter reads nor the state API writes."""
    for where, (s, p) in (("saved", (saved_stage, saved_precision)), ("resumed", (stage, precision))):
        if s == 0 and p == "bf16":
            return (
                f"a checkpoint cannot be resharded when the {where} run is bf16 without ZeRO: resume it on its own "
                "layout, or use parallel.zero_stage 1, 2 or 3 for bf16 runs that may change layout"
            )
    return None


def saved_mp_ranks(step_dir: Path) -> list[int]:
    found = {int(m.group(1)) for p in step_dir.glob("*mp_rank_*_model_states.pt") if (m := _MP.search(p.name))}
    return sorted(found)


_MP = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


def read_rank_states(step_dir: Path, work_dir: Path) -> list[RankState]:
    """Whole fp32 weights, Adam moments and step of every saved TP rank (in rank order). ``work_dir`` receives
    DeepSpeed's per-parameter files (created here; the caller removes it)."""
    states = []
    for mp in saved_mp_ranks(step_dir):
        own = sorted(step_dir.glob(f"*mp_rank_{mp:02d}_*states.pt"))
        if any(p.name.endswith("_optim_states.pt") for p in own):
            states.append(_read_universal(step_dir, own, work_dir / f"mp_rank_{mp:02d}"))
        else:
            states.append(_read_unpartitioned(step_dir, own))
    if not states:
        raise FileNotFoundError(f"no '*mp_rank_XX_model_states.pt' files in {step_dir}")
    return states


def _read_universal(step_dir: Path, files: list[Path], out: Path) -> RankState:
    from deepspeed.checkpoint import ds_to_universal

    view = out / "view"
    view.mkdir(parents=True)
    for path in files:
        os.symlink(path.resolve(), view / path.name)
    args = types.SimpleNamespace(
        input_folder=str(view), output_folder=str(out / "universal"), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    quiet = io.StringIO()
    with safe_torch_load(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        ds_to_universal.main(args)
    return _read_converted_universal(out, files)


def _param(path: Path) -> torch.Tensor:
    value = safe_load(path)
    return (value["param"] if isinstance(value, dict) else value).float()


def _read_unpartitioned(step_dir: Path, files: list[Path]) -> RankState:
    """fp32 without ZeRO: the module weights and the torch optimizer's state are whole in the model-states file (the
    manifest names the optimizer's parameters, which torch numbers)."""
    from mambatron.train.checkpoint import read_manifest

    model_states = safe_load(next(p for p in files if p.name.endswith("_model_states.pt")))
    group_names = read_manifest(step_dir).get("optimizer_param_names")
    optimizer = model_states.get("optimizer")
    if not group_names or not optimizer or "state" not in optimizer:
        raise FileNotFoundError(
            f"{step_dir} has neither optimizer shards nor a whole optimizer state; it cannot be resharded"
        )
    weights = {k: v.float() for k, v in model_states["module"].items() if not k.endswith("_extra_state")}
    moments: dict[str, StateDict] = {k: {} for k in MOMENT_KEYS}
    step = None
    for group, names in zip(optimizer["param_groups"], group_names):
        for index, name in zip(group["params"], names):
            state = optimizer["state"].get(index, {})
            step = state.get("step", step)
            for key in MOMENT_KEYS:
                if key in state:
                    moments[key][name] = state[key].float()
    return weights, moments, step if step is not None else 0


def load_into_engine(
    engine: Any,
    step_dir: Path,
    work_dir: Path,
    merge_tp: Callable[[list[StateDict]], StateDict],
    split_tp: Callable[[StateDict], StateDict],
    barrier: Callable[[], None],
) -> None:
    """Load the checkpoint in ``step_dir`` (any layout) into ``engine``. Rank 0 converts into ``work_dir``; every
    rank reads it after ``barrier()`` and rank 0 removes it after a second one."""
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(work_dir, ignore_errors=True)
        try:
            per_rank = read_rank_states(step_dir, work_dir)
        finally:
            barrier()
    else:
        barrier()
        per_rank = None
    try:
        if per_rank is None:
            per_rank = [_read_converted(step_dir, work_dir, mp) for mp in saved_mp_ranks(step_dir)]
        weights = split_tp(merge_tp([w for w, _, _ in per_rank]))
        moments = {
            key: split_tp(merge_tp([m[key] for _, m, _ in per_rank]))
            for key in MOMENT_KEYS
            if all(m[key] for _, m, _ in per_rank)
        }
        _set_engine_state(engine, weights, moments, per_rank[0][2])
    finally:
        barrier()
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(work_dir, ignore_errors=True)


def _read_converted(step_dir: Path, work_dir: Path, mp: int) -> RankState:
    out = work_dir / f"mp_rank_{mp:02d}"
    files = sorted(step_dir.glob(f"*mp_rank_{mp:02d}_*states.pt"))
    if not (out / "universal").is_dir():  # fp32 without ZeRO: nothing was converted, read the files directly
        return _read_unpartitioned(step_dir, files)
    return _read_converted_universal(out, files)


def _saved_shapes(files: list[Path]) -> dict[str, torch.Size]:
    """Each parameter's shape on its saved TP rank (ZeRO-3's converted tensors are flat)."""
    model_states = safe_load(next(p for p in files if p.name.endswith("_model_states.pt")))
    shapes: dict[str, torch.Size] = {}
    for group in model_states.get("param_shapes") or []:
        shapes.update(group)
    return shapes


def _read_converted_universal(out: Path, files: list[Path]) -> RankState:
    shapes = _saved_shapes(files)
    root = out / "universal" / "zero"
    weights: StateDict = {}
    moments: dict[str, StateDict] = {k: {} for k in MOMENT_KEYS}
    step = None
    for param_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        name = param_dir.name
        weights[name] = _param(param_dir / "fp32.pt")
        if name in shapes:
            weights[name] = weights[name].view(shapes[name])
        for key in MOMENT_KEYS:
            if (param_dir / f"{key}.pt").is_file():
                moments[key][name] = _param(param_dir / f"{key}.pt").view_as(weights[name])
        if step is None and (param_dir / "step.pt").is_file():
            step = safe_load(param_dir / "step.pt")
    if step is None:
        common = safe_load(root / "optimizer_state.pt")
        step = next(iter(common["optimizer_state_dict"]["state"].values()))["step"]
    return weights, moments, step


def _set_engine_state(engine: Any, weights: StateDict, moments: dict[str, StateDict], step: Any) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    named = dict(engine.module.named_parameters())
    missing = sorted(set(named) - set(weights))
    if missing:
        raise KeyError(f"checkpoint lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
    optimizer = engine.optimizer
    fp32_without_zero = not engine.zero_optimization() and not engine.bfloat16_enabled()
    with torch.no_grad():
        # First the optimizer's state tensors, which its first step would create (that step also moves weights).
        if engine.zero_optimization_partition_weights():
            _materialize_zero3_state(optimizer)
        elif not fp32_without_zero:
            _materialize_state(optimizer.optimizer)
            optimizer._lazy_init_hp_params_optimizer_state()  # links each parameter to its optimizer fragments
        if engine.zero_optimization_partition_weights():  # ZeRO-3: module weights are partitioned
            import deepspeed

            params = list(named.values())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                for name, param in named.items():
                    param.data.copy_(weights[name].to(param.dtype).view_as(param))
        else:
            for name, param in named.items():
                param.data.copy_(weights[name].to(param.dtype).view_as(param))
        if fp32_without_zero:
            # fp32 without ZeRO: a torch optimizer, whose parameters are the master weights.
            for name, param in named.items():
                if moments:
                    state = {k: moments[k][name].clone() for k in moments}
                    optimizer.state[param] = {"step": _step_like(step, None), **state}
            return
        inner = optimizer.optimizer
        for name, param in named.items():
            full = weights[name].view_as(param) if not hasattr(param, "ds_id") else weights[name]
            safe_set_full_fp32_param(param, full)
            for key, values in moments.items():
                safe_set_full_optimizer_state(param, values[name], key)
        for state in inner.state.values():
            if "step" in state:
                state["step"] = _step_like(step, state["step"])


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
