"""Sweep the launch tiles of the SSD chunk-scan forward, dx-backward, dstates-backward and chunk-state kernels on one
GPU, beside mamba_ssm's.

    python tools/sweep_ssd.py --out sweep.jsonl [--best best.json] [--extra-path DIR:DIR] [--nheads 80]
                              [--fwd 64,32,64 128,32,64 ...] [--dx 64,32,64 ...] [--state 64,64 64,128 ...]
                              [--dstates 64,64 32,128 ...] [--dcb 64,1 64,4 ...]

At Mamba2-1.3B's shape (batch 8, seqlen 2048, 64 heads of 64, dstate 128, chunk 256, one group; ``--nheads 80``:
Mamba2-2.7B's), with x, B and C strided views of one conv output as in the fused Mamba2 op. A tile is (output
positions, positions per inner-loop step, dstate per step), the forward's optionally with a fourth entry, headdim per
program (see ``kernels/ssd/chunk_scan.py`` ``TILES``); a chunk-state or dstates tile is (positions per inner-loop
step, dstate per program) (``kernels/ssd/chunk_state.py`` ``TILES``, ``chunk_scan.TILES["bwd_dstates"]``); a dCB
tile is (positions per side, runs of heads[, 1 to load each head's vectors a head ahead])
(``chunk_scan.TILES["bwd_dcb"]``, compared on dCB's lower triangle and
the dA_cumsum gradient; no mamba_ssm kernel matches it, its own split in two kernels). Every variant is
checked against the default tiles' outputs first and gets no time if it differs by more than 2% (the defaults
themselves are checked against the fp32 reference by ``bench_kernels.py --only ssd``). mamba_ssm's matching kernels
(``_chunk_scan_fwd``, the fused ``_chunk_scan_chunk_state_bwd_dx``, ``_chunk_scan_bwd_dstates``,
``_chunk_state_fwd``) are timed on the same inputs when importable. Prints and appends ``RESULT`` JSON lines;
``--best`` writes the fastest tiles per kernel as JSON. Each timed row names the warps/stages/register cap the
autotuner picked for it.
"""

import argparse
import json
import sys

import torch

SHAPE = dict(batch=8, seqlen=2048, nheads=64, headdim=64, dstate=128, ngroups=1, chunk_size=256)
DEFAULT_FWD = ["64,32,64", "64,64,64", "128,32,64", "128,64,64", "64,16,64", "64,32,128", "32,32,64"]
DEFAULT_STATE = ["64,64", "64,128", "32,128", "128,64", "128,128", "32,64"]
DEFAULT_DX = ["64,32,64", "64,64,64", "128,32,64", "128,64,64", "64,16,64", "64,32,128", "32,32,64"]
DEFAULT_DSTATES = ["64,64", "32,64", "32,128", "64,128", "128,128", "32,256"]
DEFAULT_DCB = ["64,1", "64,1,1", "64,2", "64,2,1", "64,4", "32,1", "32,4"]


def tiles_arg(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def make_inputs(device="cuda"):
    from mambatron.kernels.ssd.bmm import bmm_chunk_fwd
    from mambatron.kernels.ssd.chunk_scan import chunk_scan_bwd_dstates
    from mambatron.kernels.ssd.chunk_state import chunk_state_fwd
    from mambatron.kernels.ssd.combined import _state_dtype, ssd_forward
    from mambatron.kernels.ssd.reference import NO_DT_LIMIT
    from mambatron.kernels.ssd.state_passing import state_passing_bwd, state_passing_fwd

    s = SHAPE
    g = torch.Generator(device=device).manual_seed(0)
    d_inner, gn = s["nheads"] * s["headdim"], s["ngroups"] * s["dstate"]
    xbc = torch.randn(s["batch"], s["seqlen"], d_inner + 2 * gn, device=device, generator=g).to(torch.bfloat16)
    x = xbc[..., :d_inner].unflatten(-1, (s["nheads"], s["headdim"]))
    B = xbc[..., d_inner : d_inner + gn].unflatten(-1, (s["ngroups"], s["dstate"]))
    C = xbc[..., d_inner + gn :].unflatten(-1, (s["ngroups"], s["dstate"]))
    dt = (torch.randn(s["batch"], s["seqlen"], s["nheads"], device=device, generator=g) * 0.5).to(torch.bfloat16)
    A = -torch.rand(s["nheads"], device=device, generator=g) * 4 - 1
    D = torch.randn(s["nheads"], device=device, generator=g)
    dt_bias = torch.randn(s["nheads"], device=device, generator=g) * 0.5
    dout = torch.randn(x.shape, device=device, generator=g).to(torch.bfloat16)
    Q = s["chunk_size"]
    _, _, (_, dt_out, dA_cumsum, _) = ssd_forward(x, dt, A, B, C, Q, D, None, dt_bias, None, None, True, NO_DT_LIMIT)
    states = chunk_state_fwd(B, x, dt_out, dA_cumsum)
    prev_states, _ = state_passing_fwd(states, dA_cumsum, None, None, _state_dtype(x))
    dprev = chunk_scan_bwd_dstates(dout, C, dA_cumsum)
    dstates, _, _ = state_passing_bwd(prev_states, dprev, dA_cumsum, None, None, _state_dtype(x))
    return dict(CB=bmm_chunk_fwd(C, B, Q), x=x, B=B, C=C, D=D, dout=dout, dt=dt_out, dA_cumsum=dA_cumsum,
                prev_states=prev_states, dstates=dstates)  # fmt: skip


def _dcb(chunk_scan, t):
    """The dCB backward's outputs to compare: dCB where it is defined (s <= l) and the dA_cumsum gradient."""
    dCB, ddA = chunk_scan.chunk_scan_bwd_dcb(t["dout"], t["x"], t["dt"], t["dA_cumsum"], t["CB"])
    return dCB.tril(), ddA


def results_writer(path: str):
    """emit(**row): print a ``RESULT`` JSON line and append it to path (tools/sweep_scan.py writes the same way)."""

    def emit(**row):
        print("RESULT " + json.dumps(row), flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

    return emit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="append RESULT JSON lines here")
    p.add_argument("--best", help="write the fastest tiles per kernel here (JSON)")
    p.add_argument("--extra-path", default="", help="colon-separated folders put in front of sys.path")
    p.add_argument("--fwd", nargs="*", default=DEFAULT_FWD, type=str, help="forward tiles, e.g. 64,32,64")
    p.add_argument("--dx", nargs="*", default=DEFAULT_DX, type=str, help="dx-backward tiles, e.g. 64,32,64")
    p.add_argument("--state", nargs="*", default=DEFAULT_STATE, type=str, help="chunk-state tiles, e.g. 64,128")
    p.add_argument("--dstates", nargs="*", default=DEFAULT_DSTATES, type=str, help="dstates tiles, e.g. 32,128")
    p.add_argument("--dcb", nargs="*", default=DEFAULT_DCB, type=str, help="dCB-backward tiles, e.g. 64,4")
    p.add_argument("--nheads", type=int, default=SHAPE["nheads"], help="heads of 64 (64: Mamba2-1.3B, 80: 2.7B)")
    p.add_argument("--tolerance", type=float, default=2e-2, help="max relative difference from the default tiles")
    args = p.parse_args(argv)
    SHAPE["nheads"] = args.nheads
    if not torch.cuda.is_available():
        print("error: sweep_ssd.py times GPU kernels and needs a CUDA device; run it on a GPU machine", file=sys.stderr)
        return 2
    sys.path[:0] = [d for d in args.extra_path.split(":") if d]
    from triton.testing import do_bench

    from mambatron.kernels.ssd import chunk_scan, chunk_state

    emit = results_writer(args.out)

    def bench(fn):
        return do_bench(fn, warmup=25, rep=150, return_mode="median")

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    t = make_inputs()
    emit(what="sweep_ssd_setup", shape=SHAPE, torch=torch.__version__, gpu=torch.cuda.get_device_name())
    try:
        from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_fwd
        from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx

        args_fwd = (t["CB"], t["x"], t["dt"], t["dA_cumsum"], t["C"], t["prev_states"])
        args_dx = (t["x"], t["dt"], t["dA_cumsum"], t["B"], t["CB"], t["dout"], t["dstates"])
        emit(what="mamba_ssm_chunk_scan_fwd", ms=bench(lambda: _chunk_scan_fwd(*args_fwd, D=t["D"])))
        emit(
            what="mamba_ssm_chunk_scan_chunk_state_bwd_dx",
            ms=bench(lambda: _chunk_scan_chunk_state_bwd_dx(*args_dx, D=t["D"])),
        )
        from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_bwd_dstates

        emit(
            what="mamba_ssm_chunk_scan_bwd_dstates",
            ms=bench(lambda: _chunk_scan_bwd_dstates(t["C"], t["dA_cumsum"], t["dout"], dtype=torch.float32)),
        )
        from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_state_fwd

        emit(
            what="mamba_ssm_chunk_state_fwd",
            ms=bench(lambda: _chunk_state_fwd(t["B"], t["x"], t["dt"], t["dA_cumsum"], states_in_fp32=True)),
        )
    except ImportError as e:
        emit(what="mamba_ssm_unavailable", error=repr(e)[:200])

    # kind: (one run returning the outputs to compare, the autotuned kernel whose pick is recorded)
    runs = {
        "fwd": (
            lambda: chunk_scan.chunk_scan_fwd(
                t["CB"], t["x"], t["dt"], t["dA_cumsum"], t["C"], t["prev_states"], t["D"]
            )[:1],
            chunk_scan._chunk_scan_fwd_kernel,
        ),
        "bwd_dx": (
            lambda: chunk_scan.chunk_scan_bwd_dx(
                t["CB"], t["x"], t["dout"], t["dt"], t["dA_cumsum"], t["B"], t["dstates"], t["D"]
            )[:3],
            chunk_scan._chunk_scan_bwd_dx_kernel,
        ),
        "state": (
            lambda: (chunk_state.chunk_state_fwd(t["B"], t["x"], t["dt"], t["dA_cumsum"]),),
            chunk_state._chunk_state_fwd_kernel,
        ),
        "bwd_dstates": (
            lambda: (chunk_scan.chunk_scan_bwd_dstates(t["dout"], t["C"], t["dA_cumsum"]),),
            chunk_scan._chunk_scan_bwd_dstates_kernel,
        ),
        "bwd_dcb": (lambda: _dcb(chunk_scan, t), chunk_scan._chunk_scan_bwd_dcb_kernel),
    }
    best = {}
    sweeps = (
        ("fwd", args.fwd), ("bwd_dx", args.dx), ("state", args.state), ("bwd_dstates", args.dstates),
        ("bwd_dcb", args.dcb),
    )  # fmt: skip
    for kind, variants in sweeps:
        table, key = (chunk_state.TILES, "fwd") if kind == "state" else (chunk_scan.TILES, kind)
        default = table[key]
        run, kernel = runs[kind]
        expected = run()
        for text in variants:
            tiles = tiles_arg(text)
            tiles += default[len(tiles) :]  # entries left out keep their defaults (the forward's headdim split, ...)
            table[key] = tiles
            row = dict(what="ssd_tiles", kind=kind, tiles=list(tiles))
            try:
                err = max(rel(a, b) for a, b in zip(run(), expected))
                row.update(ok=err < args.tolerance, rel_err_vs_default=err)
                if row["ok"]:
                    row["ms"] = bench(run)
                    row["config"] = str(getattr(kernel, "best_config", None))  # the autotuner's pick
                    if kind not in best or row["ms"] < best[kind][1]:
                        best[kind] = (list(tiles), row["ms"])
            except Exception as e:  # a tile the kernel cannot compile is a result, not the end of the sweep
                row.update(ok=False, error=repr(e)[:200])
            emit(**row)
        table[key] = default
    emit(what="ssd_tiles_best", best=best)
    if args.best:
        with open(args.best, "w") as f:
            json.dump({k: v[0] for k, v in best.items()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
