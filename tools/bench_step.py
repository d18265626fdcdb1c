"""Full training-step throughput on one GPU: tokens/s, MFU and peak memory, beside mamba_ssm's MambaLMHeadModel.

    python tools/bench_step.py [--presets mamba1-1.4b,mamba2-1.3b] [--batch 8] [--seqlen 2048] [--steps 10]
                               [--activation-checkpointing] [--profile [--gaps N]] [--top N]
                               [--set KEY=VALUE ...] [--launch NAME:MODULE.TABLE[KEY]=INTS ...] [--json PATH]

One step = forward + backward + AdamW (fused) under bf16 autocast with fp32 weights, the same recipe for both
implementations. Before timing, our model's loss and gradients with the Triton kernels are compared against the
reference ops on a short sequence; a preset that fails that check gets no speed printed. MFU counts the matmul FLOPs
(6 × linear parameters × tokens, the LM head included) against ``--peak-tflops`` (H100/H200 SXM dense bf16: 989).
Each step record also has the fastest, median and slowest single step (CUDA events), the peak reserved memory and
the caching allocator's retries (each one frees cached blocks and synchronises the device).
``--profile`` adds one profiled step per implementation: its device time and the kernels that take the most of it;
``--gaps N`` then profiles N back-to-back steps for the device's idle time between kernels and what it waited for.
``--launch`` times our step again, in the same process, with a kernel's launch constant changed (a variant per NAME;
e.g. ``dcb2:ssd.chunk_scan.TILES[bwd_dcb]=64,2,0``, a module under ``mambatron.kernels``, a module-level constant or
one key of a dict of them, integers only): each variant passes its own check first and is recorded as
``train_step_mambatron_<preset>@<NAME>``, so that a launch change is compared on one machine, not across machines.
Our kernels' autotuning picks from the check are forgotten before the step, which autotunes at its own shape (as a
training run's first step, and mamba_ssm's here). After each of our steps an ``autotune_<preset>[@<NAME>]`` record
(and before it ``autotune_check_...``, what the check picked) lists the configuration every autotuned kernel of ours
picked, per autotuning key (the shapes and, for the SSD kernels, the grid bucket), with each candidate's median
time where the autotuner last benchmarked that kernel: what our step ran with, which the autotuner can choose
differently from one machine to the next.
mamba_ssm is looked for on the import path and in ``.anchor/`` (its public sources, with the CUDA extensions built
by the anchor scripts in /tmp/ext).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


# Every RESULT record of this run (checks and profiles too), in the order printed: what --json writes.
RECORDS: list[dict] = []


START = time.perf_counter()


def result(**kw) -> dict:
    kw["elapsed_s"] = round(time.perf_counter() - START, 1)  # since start: what each part costs a timed-out call
    print("RESULT " + json.dumps(kw), flush=True)
    RECORDS.append(kw)
    return kw


def linear_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: linear layers and the (tied or untied) LM head."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    emb = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if emb and not any(m.weight is emb[0].weight for m in model.modules() if isinstance(m, torch.nn.Linear)):
        n += emb[0].weight.numel()  # tied head: the embedding matrix is also the LM head's weight
    return n


def check_kernels(cfg, device: str) -> float:
    """Max relative difference of loss and gradients: Triton path vs reference ops (bf16 autocast, short seq)."""
    from mambatron.models import build_model

    torch.manual_seed(0)
    small = type(cfg)(**{**cfg.__dict__, "n_layer": 2})
    grads = {}
    for kernels in ("reference", "triton"):
        small.kernels = kernels
        torch.manual_seed(0)
        model = build_model(small).to(device)
        ids = torch.randint(
            0, small.vocab_size, (2, 513), device=device, generator=torch.Generator(device).manual_seed(1)
        )
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        grads[kernels] = [loss.detach().float()] + [p.grad.float() for p in model.parameters()]
    worst = 0.0
    for a, b in zip(grads["reference"], grads["triton"]):
        worst = max(worst, ((a - b).norm() / a.norm().clamp_min(1e-12)).item())
    return worst


def profile_step(step, what: str, top: int = 15) -> dict:
    """One step under torch.profiler: total device (CUDA self) time, CPU time, and the top kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernels are the events that run on the device; the CPU ops that launched them would count their time again.
    on_device = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    events = on_device or events
    dev = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    total = sum(dev(e) for e in events)
    top = sorted(events, key=dev, reverse=True)[:top]
    kernels = [dict(name=e.key[:90], ms=dev(e) / 1e3, calls=e.count) for e in top if dev(e) > 0]
    cpu_ms = max((e.cpu_time_total for e in prof.key_averages()), default=0.0) / 1e3
    return result(what=f"profile_{what}", device_ms=total / 1e3, cpu_ms=cpu_ms, top_kernels=kernels)


def idle_gaps(spans: list[tuple[float, float, str]]) -> tuple[float, float, list[tuple[float, str, str]]]:
    """Device intervals (start, end, name), sorted by start and possibly overlapping (several streams) ->
    (window, busy time = their union, gaps as (length, name of the last interval to end before, name after))."""
    busy, gaps, end, before = 0.0, [], spans[0][0], spans[0][2]
    for start, stop, name in spans:
        if start > end:
            gaps.append((start - end, before, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, before = stop, name
    return end - spans[0][0], busy, gaps


def device_gaps(step, what: str, steps: int = 3, top: int = 12) -> dict:
    """Where the device waits between kernels over ``steps`` back-to-back steps (device activity only, so the
    profiler adds little host work). ``busy_ms`` is the union of kernel and copy intervals, ``idle_ms`` the rest
    of the window; each gap is charged to the kernel that follows it (the one the host had not launched yet)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if str(getattr(e, "device_type", "")).endswith("CUDA") and e.time_range.end > e.time_range.start
    )
    if not spans:
        return result(what=f"gaps_{what}", error="the profiler saw no device activity")
    wall, busy, gaps = idle_gaps(spans)
    after: dict[str, list] = {}
    for gap, _, name in gaps:
        after.setdefault(name[:90], [0.0, 0])
        after[name[:90]][0] += gap / 1e3
        after[name[:90]][1] += 1
    by_kernel = sorted(after.items(), key=lambda kv: -kv[1][0])[:top]
    largest = sorted(gaps, reverse=True)[:top]
    return result(
        what=f"gaps_{what}", steps=steps, wall_ms=wall / 1e3, busy_ms=busy / 1e3, idle_ms=(wall - busy) / 1e3,
        gaps=len(gaps), idle_before=[dict(kernel=k, ms=v[0], gaps=v[1]) for k, v in by_kernel],
        largest=[dict(ms=g / 1e3, previous=a[:60], next=b[:60]) for g, a, b in largest],
    )  # fmt: skip


def time_step(
    model, ids, steps: int, loss_fn, profile_as: str | None = None, top: int = 15, gaps: int = 0
) -> tuple[float, float, float, dict]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    # Events between steps cost no sync; their spread shows whether single steps stall (allocator, clocks).
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    t = time.perf_counter()
    host = []  # seconds the host spends issuing each step: near the step time when the host (or a sync) bounds it
    marks[0].record()
    for i in range(steps):
        h = time.perf_counter()
        loss = step()
        host.append(time.perf_counter() - h)
        marks[i + 1].record()
    torch.cuda.synchronize()
    dt, mem = (time.perf_counter() - t) / steps, torch.cuda.max_memory_allocated() / 1e9
    per_step = sorted(a.elapsed_time(b) for a, b in zip(marks, marks[1:]))
    stats = dict(
        step_ms_min=per_step[0], step_ms_median=per_step[len(per_step) // 2], step_ms_max=per_step[-1],
        peak_reserved_GB=torch.cuda.max_memory_reserved() / 1e9,
        alloc_retries=torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries,
        host_ms_median=sorted(host)[len(host) // 2] * 1e3,
    )  # fmt: skip
    if profile_as:
        try:
            profile_step(step, profile_as, top)
        except Exception as e:  # noqa: BLE001 - a profiler failure must not hide the timing
            result(what=f"profile_{profile_as}", error=repr(e)[:300])
    if profile_as and gaps:
        try:
            device_gaps(step, profile_as, gaps, top)
        except Exception as e:  # noqa: BLE001
            result(what=f"gaps_{profile_as}", error=repr(e)[:300])
    return dt, mem, float(loss.detach()), stats


_LAUNCH = re.compile(
    r"^(?P<name>[\w-]+):(?P<module>[a-z_][\w.]*)\.(?P<attr>[A-Z_][A-Z0-9_]*)(\[(?P<key>\w+)\])?=(?P<value>-?\d+(,-?\d+)*)$"
)


def _launch_target(module: str, attr: str, key: str | None) -> str:
    return f"mambatron.kernels.{module}.{attr}" + (f"[{key!r}]" if key else "")


def parse_launch(texts: list[str]) -> dict[str, list[tuple[str, str, str | None, int | tuple[int, ...]]]]:
    """``NAME:MODULE.TABLE[KEY]=INTS`` (see ``--launch``) -> {name: [(module, attr, key or None, value)]}: the
    module, relative to ``mambatron.kernels``, must hold the constant (or dict with that key), and the value must have
    its shape (an int, or a tuple of as many ints). Raises ValueError naming the problem."""
    variants: dict[str, list] = {}
    for text in texts:
        m = _LAUNCH.match(text)
        if m is None:
            raise ValueError(
                f"--launch {text!r}: expected NAME:MODULE.CONSTANT[KEY]=INT[,INT...], "
                "e.g. dcb2:ssd.chunk_scan.TILES[bwd_dcb]=64,2,0"
            )
        module, attr, key = m["module"], m["attr"], m["key"]
        try:
            mod = importlib.import_module(f"mambatron.kernels.{module}")
        except ImportError:
            raise ValueError(f"--launch {text!r}: no module mambatron.kernels.{module}") from None
        if not hasattr(mod, attr):
            raise ValueError(f"--launch {text!r}: mambatron.kernels.{module} has no {attr}")
        current = getattr(mod, attr)
        if key is not None:
            if not isinstance(current, dict) or key not in current:
                raise ValueError(f"--launch {text!r}: mambatron.kernels.{module}.{attr} has no key {key!r}")
            current = current[key]
        ints = tuple(int(v) for v in m["value"].split(","))
        if isinstance(current, int) and not isinstance(current, bool) and len(ints) == 1:
            value = ints[0]
        elif isinstance(current, tuple) and len(current) == len(ints) and all(type(v) is int for v in current):
            value = ints
        else:
            raise ValueError(
                f"--launch {text!r}: {_launch_target(module, attr, key)} is {current!r}; give a value of the same shape"
            )
        variants.setdefault(m["name"], []).append((module, attr, key, value))
    return variants


@contextlib.contextmanager
def launch_overrides(overrides: list[tuple[str, str, str | None, int | tuple[int, ...]]]):
    """Sets the constants of one variant (from :func:`parse_launch`) and restores them afterwards."""
    saved = []
    try:
        for module, attr, key, value in overrides:
            mod = importlib.import_module(f"mambatron.kernels.{module}")
            if key is None:
                saved.append((mod, attr, None, getattr(mod, attr)))
                setattr(mod, attr, value)
            else:
                table = getattr(mod, attr)
                saved.append((table, None, key, table[key]))
                table[key] = value
        yield
    finally:
        for owner, attr, key, old in reversed(saved):
            if key is None:
                setattr(owner, attr, old)
            else:
                owner[key] = old


def checked(cfg, label: str, tolerance: float, device: str = "cuda") -> dict | None:
    """The check of our kernels for a step: None when it passes, else the step's record, which has no speed. After a
    pass, the picks our kernels' autotuning made during the check are recorded and forgotten, so that the step's
    kernels autotune at the step's shape, as a training run's first step and mamba_ssm's here do, not at the check's
    2 x 512."""
    from mambatron.kernels._common import reset_autotuning

    err = check_kernels(cfg, device)
    ok = err < tolerance
    result(what=f"check_{label}", max_rel_err_loss_and_grads=err, tolerance=tolerance, ok=ok)
    if not ok:
        return result(what=f"train_step_mambatron_{label}", error=f"kernel check failed (rel err {err:.3g})")
    result(what=f"autotune_check_{label}", picks=autotune_picks())
    reset_autotuning()
    return None


def ours(preset: str, args, variant: str | None = None) -> dict:
    from mambatron.config import load_config
    from mambatron.models import build_model

    cfg = load_config(ROOT / "configs" / f"{preset}.yaml", ["model.kernels=triton", *args.set]).model
    label = preset if variant is None else f"{preset}@{variant}"
    failed = checked(cfg, label, args.tolerance)
    if failed is not None:
        return failed
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    model.activation_checkpointing = args.activation_checkpointing
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seqlen + 1), device="cuda")
    profile_as = f"mambatron_{label}" if args.profile else None
    loss_fn = lambda m, x: m.loss(x[:, :-1], x[:, 1:])  # noqa: E731
    dt, mem, loss, stats = time_step(model, ids, args.steps, loss_fn, profile_as, args.top, args.gaps)
    launch = args.launch_variants.get(variant, []) if variant else []
    result(what=f"autotune_{label}", picks=autotune_picks())
    return report(
        f"train_step_mambatron_{label}", model, args, dt, mem, loss, config_overrides=args.set,
        launch_overrides=[f"{_launch_target(m, a, k)}={v}" for m, a, k, v in launch], **stats,
    )  # fmt: skip


def mamba_ssm_step(preset: str, args) -> dict:
    sys.path[:0] = [str(ROOT / ".anchor"), str(ROOT / ".anchor" / "cc1d"), "/tmp/ext/selective_scan_cuda"]
    sys.path[:0] = ["/tmp/ext/causal_conv1d_cuda"]
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    from mambatron.config import load_config

    cfg = load_config(ROOT / "configs" / f"{preset}.yaml").model
    ssm = {"layer": "Mamba1" if cfg.arch == "mamba1" else "Mamba2", "d_state": cfg.d_state}
    if cfg.arch == "mamba2":
        ssm.update(headdim=cfg.headdim, ngroups=cfg.ngroups, chunk_size=cfg.chunk_size)
    mcfg = MambaConfig(
        d_model=cfg.d_model, n_layer=cfg.n_layer, vocab_size=cfg.vocab_size, ssm_cfg=ssm, rms_norm=True,
        residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=cfg.pad_vocab_multiple,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MambaLMHeadModel(mcfg, device="cuda")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seqlen + 1), device="cuda")

    def loss_fn(m, x):
        logits = m(x[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].reshape(-1))

    profile_as = f"mamba_ssm_{preset}" if args.profile else None
    dt, mem, loss, stats = time_step(model, ids, args.steps, loss_fn, profile_as, args.top, args.gaps)
    return report(f"train_step_mamba_ssm_{preset}", model, args, dt, mem, loss, **stats)


def autotune_picks() -> list[dict]:
    """Per autotuned Triton kernel of ours (module under ``mambatron.kernels``) and autotuning key: the configuration it
    picked, and each candidate's median time (ms) where that kernel last benchmarked this key."""
    from mambatron.kernels._common import autotuners

    picks = []
    for tuner in autotuners():
        # The autotuner keeps the timings of its last benchmark only: that of the key it added last (the cache is
        # filled in benchmark order).
        timings = getattr(tuner, "configs_timings", None) or {}
        last_key = next(reversed(tuner.cache), None)
        for key, cfg in tuner.cache.items():
            pick = dict(kernel=tuner.fn.__name__, key=[str(k) for k in key], **_config(cfg))
            if key == last_key and cfg in timings:
                pick["candidates_ms"] = [dict(**_config(c), ms=_median(t)) for c, t in timings.items()]
            picks.append(pick)
    return picks


def _config(cfg) -> dict:
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)


def _median(t) -> float:
    return round(float(t[0] if isinstance(t, (list, tuple)) else t), 5)  # do_bench's (median, p20, p80) or a time


def report(what: str, model, args, dt: float, mem: float, loss: float, **extra) -> dict:
    tokens = args.batch * args.seqlen
    flops = 6 * linear_params(model) * tokens
    return result(
        what=what, params=sum(p.numel() for p in model.parameters()), batch=args.batch, seqlen=args.seqlen,
        step_s=dt, tokens_per_s=tokens / dt, model_TFLOPs=flops / dt / 1e12, mfu=flops / dt / 1e12 / args.peak_tflops,
        peak_mem_GB=mem, loss=loss, activation_checkpointing=args.activation_checkpointing, **extra,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="mamba1-1.4b,mamba2-1.3b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--tolerance", type=float, default=2e-2, help="max relative error of loss/grads vs reference")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--no-mamba-ssm", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile one extra step of each implementation")
    ap.add_argument(
        "--gaps", type=int, default=0, help="with --profile: device idle time over this many back-to-back steps"
    )
    ap.add_argument("--top", type=int, default=15, help="kernels listed per profile")
    ap.add_argument(
        "--set", nargs="*", default=[], help="config overrides for our model, e.g. model.ssd_keep_states=true"
    )
    ap.add_argument(
        "--launch", nargs="*", default=[], help="our step again with a kernel launch constant changed, e.g. "
        "dcb2:ssd.chunk_scan.TILES[bwd_dcb]=64,2,0 (entries with one NAME make one variant)",
    )  # fmt: skip
    ap.add_argument("--json", help="append every RESULT record (checks, profiles, steps) to this file")
    args = ap.parse_args(argv)
    try:
        args.launch_variants = parse_launch(args.launch)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: bench_step needs a CUDA GPU", file=sys.stderr)
        return 2
    print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), flush=True)
    records = []
    for preset in args.presets.split(","):
        records.append(ours(preset, args))
        torch.cuda.empty_cache()
        for name, overrides in args.launch_variants.items():
            with launch_overrides(overrides):
                records.append(ours(preset, args, variant=name))
            torch.cuda.empty_cache()
        if not args.no_mamba_ssm:
            try:
                records.append(mamba_ssm_step(preset, args))
            except Exception as e:  # noqa: BLE001  (the comparison is optional; say why it is missing)
                records.append(result(what=f"train_step_mamba_ssm_{preset}", error=repr(e)[:300]))
            torch.cuda.empty_cache()
    for r in records:
        if "tokens_per_s" in r:
            print(
                f"{r['what']:45s} {r['tokens_per_s']:>10.0f} tok/s  MFU {r['mfu']:.1%}  peak {r['peak_mem_GB']:.1f} GB"
            )
    if args.json:
        with open(args.json, "a") as f:
            for r in RECORDS:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_CACHE_DIR", "/tmp/triton-cache")
    sys.exit(main())
