"""Sweep the RMSNorm forward's launch on one GPU, beside mamba_ssm's Triton norms.

    python tools/sweep_norm.py --out sweep.jsonl [--extra-path DIR:DIR] [--fwd CFG ...] [--shapes NAME,...]
                               [--bwd CFG ...]

A configuration is ``programs_per_SM,wide_warps,warps,chunk[,split_above]`` as in ``kernels/rmsnorm/api.py``
(``LAUNCH["fwd"]``, ``FWD_CHUNK``, ``FWD_SPLIT_ABOVE``): programs per SM (0: one row per program), warps for rows of ≥
4096 elements and for shorter ones, the column chunk (0: one padded tile) for groups whose tile would be padded past
``FWD_CHUNK_ABOVE`` elements, which run with chunk / 256 warps, and the group size above which a group that is not a
power of two is held as two tiles (absent or 0: never). Shapes are the forward norms of a Mamba2 step at 8 x 2048
tokens: the pre-norm residual add over d_model (bf16 x, fp32 residual) and the gated norm over d_inner (one group,
gate applied before the norm, z read in place from the in_proj output), for Mamba2-1.3B (2048, 4096) and 2.7B (2560,
5120). Every configuration's outputs (out, and residual_out for the pre-norm) are checked against the fp32 reference
first and get no time if their max relative error is above 0.03. Times are device times from a CUDA graph (median);
mamba_ssm's ``rms_norm_fn`` / ``layernorm_gated.rmsnorm_fn`` forwards are timed the same way. The last line, ``what:
best``, is the configuration with the least total time over the shapes. Prints and appends ``RESULT`` JSON lines.

``--bwd`` then times the backward as the training step runs it (the pre-norm from the fp32 sum with an incoming
residual gradient, the gated norm with z read in place; both recompute the bf16 output for the next linear's weight
gradient) in each configuration ``programs_per_SM,wide_warps,warps,split_above[,prefetch_above]`` (``LAUNCH["bwd"]``,
``BWD_SPLIT_ABOVE``, ``BWD_PREFETCH_ABOVE``, absent: 0), each checked first against the default's gradients, with its
effective bandwidth (the bytes each tensor moves once, over the time).
"""

import argparse
import sys

import torch
from bench_kernels import bench_graph  # tools/ is on the path when a tool runs as a script
from bench_step import launch_overrides
from sweep_conv import rel
from sweep_ssd import results_writer

TOLERANCE = 3e-2
ROWS = 8 * 2048
SHAPES = {
    # name: (hidden, in_proj width holding z at column 0, or None for the pre-norm residual add)
    "prenorm-2048": (2048, None),
    "gated-4096": (4096, 8512),
    "prenorm-2560": (2560, None),
    "gated-5120": (5120, 10576),
}
FWD = ["16,16,8,0", "0,8,4,0", "0,16,8,0", "32,16,8,0", "0,4,4,0", "16,16,8,1024", "16,8,4,1024", "0,4,4,1024",
       "0,8,8,1024", "0,4,4,512", "32,4,4,1024", "64,4,4,512", "16,8,8,2048", "0,8,4,2048"]  # fmt: skip


def parse(cfg: str) -> tuple[tuple[int, int, int], int, int]:
    per_sm, wide, warps, chunk, *split = (int(v) for v in cfg.split(","))
    return (per_sm, wide, warps), chunk, (split[0] if split else 0)


def make(shape: str) -> dict:
    hidden, width = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g)
    x = rnd(ROWS, hidden).to(torch.bfloat16)
    weight = 1 + 0.1 * rnd(hidden)
    if width is None:
        return dict(x=x, residual=rnd(ROWS, hidden), z=None, weight=weight, prenorm=True)
    return dict(x=x, residual=None, z=rnd(ROWS, width).to(torch.bfloat16)[:, :hidden], weight=weight, prenorm=False)


def ours(inp: dict):
    from mambatron.kernels.rmsnorm import api

    return api.norm_forward(
        inp["x"], inp["residual"], inp["z"], inp["weight"], None, 1e-5, inp["x"].shape[-1], False, inp["prenorm"],
        torch.float32,
    )  # fmt: skip


def reference(inp: dict):
    from mambatron.kernels.rmsnorm import rms_norm_fn_ref, rmsnorm_fn_ref

    x, w = inp["x"].float(), inp["weight"]
    if inp["prenorm"]:
        return rms_norm_fn_ref(x, w, None, inp["residual"], 1e-5, prenorm=True, residual_in_fp32=True)
    return rmsnorm_fn_ref(x, w, None, z=inp["z"].float(), eps=1e-5, norm_before_gate=False), None


def theirs_fn(inp: dict):
    """mamba_ssm's forward for the same inputs, or None where it is not importable."""
    try:
        if inp["prenorm"]:
            from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

            return lambda: rms_norm_fn(inp["x"], inp["weight"], None, residual=inp["residual"], eps=1e-5,
                                       prenorm=True, residual_in_fp32=True)  # fmt: skip
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

        return lambda: rmsnorm_fn(inp["x"], inp["weight"], None, z=inp["z"], eps=1e-5, norm_before_gate=False)
    except Exception as e:  # noqa: BLE001 - optional competitor
        print(f"note: mamba_ssm norms not importable ({type(e).__name__}: {str(e)[:120]})", flush=True)
        return None


def backward_args(inp: dict) -> tuple[tuple, dict, int]:
    """(positional args, keyword args, bytes moved) of norm_backward for a forward shape of :func:`make`."""
    from mambatron.kernels.rmsnorm import api

    x, w, z = inp["x"], inp["weight"], inp["z"]
    g = torch.Generator(device="cuda").manual_seed(1)
    dout = torch.randn(x.shape, device="cuda", generator=g).to(torch.bfloat16)
    if inp["prenorm"]:
        _, summed, rstd = api.norm_forward(x, inp["residual"], None, w, None, 1e-5, x.shape[-1], True, True,
                                           torch.float32)  # fmt: skip
        dres = torch.randn(x.shape, device="cuda", generator=g)
        args = (summed, None, None, w, None, rstd, True, dout, dres)
        kw = dict(out_dtype=torch.bfloat16, summed_dtypes=(torch.bfloat16, torch.float32))
        return args, kw, x.numel() * (4 + 2 + 4 + 2 + 4 + 2)  # sum, dout, dres in; dx, dresidual, out
    _, _, rstd = api.norm_forward(x, None, z, w, None, 1e-5, x.shape[-1], False, False, None)
    args = (x, None, z, w, None, rstd, False, dout)
    return args, dict(out_dtype=torch.bfloat16), x.numel() * 2 * 6  # x, z, dout in; dx, dz, out


def sweep_backward(shapes: list[str], cfgs: list[str], emit) -> None:
    """Each backward configuration ``programs_per_SM,wide_warps,warps,split_above[,prefetch_above]``
    (``LAUNCH["bwd"]``, ``BWD_SPLIT_ABOVE``, ``BWD_PREFETCH_ABOVE``), checked against the default's gradients, then
    timed; the last line is the best in total."""
    from mambatron.kernels.rmsnorm import api

    totals: dict[str, float] = {}
    for shape in shapes:
        args, kw, nbytes = backward_args(make(shape))
        base = [t for t in api.norm_backward(*args, **kw) if t is not None]
        for cfg in cfgs:
            per_sm, wide, warps, split, *prefetch = (int(v) for v in cfg.split(","))
            launch = [
                ("rmsnorm.api", "LAUNCH", "bwd", (per_sm, wide, warps)),
                ("rmsnorm.api", "BWD_SPLIT_ABOVE", None, split),
                ("rmsnorm.api", "BWD_PREFETCH_ABOVE", None, prefetch[0] if prefetch else 0),
            ]
            with launch_overrides(launch):
                try:
                    got = [t for t in api.norm_backward(*args, **kw) if t is not None]
                except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a result too
                    emit(what="norm_bwd", shape=shape, cfg=cfg, error=repr(e)[:300])
                    totals[cfg] = float("inf")
                    continue
                err = max(rel(a, b) for a, b in zip(got, base))  # bf16 outputs: summation order moves the last bit
                row = dict(what="norm_bwd", shape=shape, cfg=cfg, max_rel_error=err, ok=err <= 1e-2)
                if row["ok"]:
                    row["ms"] = bench_graph(lambda a=args, k=kw: api.norm_backward(*a, **k))
                    row["GBps"] = nbytes / row["ms"] / 1e6
            totals[cfg] = totals.get(cfg, 0.0) + row.get("ms", float("inf"))
            emit(**row)
        torch.cuda.empty_cache()
    best = min(totals, key=totals.get)
    emit(what="best_bwd", cfg=best, total_ms=totals[best], shapes=shapes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="append RESULT JSON lines here")
    p.add_argument("--extra-path", default="", help="colon-separated folders put in front of sys.path")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--fwd", nargs="*", default=FWD, help="forward configurations")
    p.add_argument("--bwd", nargs="*", default=[], help="backward configurations to time (none: the forward only)")
    args = p.parse_args(argv)
    sys.path[:0] = [d for d in args.extra_path.split(":") if d]
    from mambatron.kernels.rmsnorm import api

    emit = results_writer(args.out)
    default = (api.LAUNCH["fwd"], api.FWD_CHUNK, api.FWD_SPLIT_ABOVE)
    totals: dict[str, float] = {}
    shapes = args.shapes.split(",")
    for shape in shapes:
        inp = make(shape)
        expected = reference(inp)
        for cfg in args.fwd:
            api.LAUNCH["fwd"], api.FWD_CHUNK, api.FWD_SPLIT_ABOVE = parse(cfg)
            try:
                out, residual_out, _ = ours(inp)
                err = max(rel(a, b) for a, b in zip((out, residual_out), expected) if b is not None)
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a result too
                emit(what="norm_fwd", shape=shape, cfg=cfg, error=repr(e)[:300])
                totals[cfg] = float("inf")
                continue
            row = dict(what="norm_fwd", shape=shape, cfg=cfg, max_rel_error=err, ok=err <= TOLERANCE)
            if row["ok"]:
                row["ms"] = bench_graph(lambda i=inp: ours(i))
            totals[cfg] = totals.get(cfg, 0.0) + row.get("ms", float("inf"))
            emit(**row)
        api.LAUNCH["fwd"], api.FWD_CHUNK, api.FWD_SPLIT_ABOVE = default
        theirs = theirs_fn(inp)
        if theirs is not None:
            err = rel(theirs()[0] if inp["prenorm"] else theirs(), expected[0])
            emit(what="mamba_ssm_norm_fwd", shape=shape, max_rel_error=err, ms=bench_graph(theirs))
        torch.cuda.empty_cache()
    best = min(totals, key=totals.get)
    emit(what="best", cfg=best, total_ms=totals[best], shapes=shapes)
    if args.bwd:
        sweep_backward(shapes, args.bwd, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
