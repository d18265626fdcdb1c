"""Sweep the causal conv1d launch table on one GPU, beside causal-conv1d's CUDA kernels.

    python tools/sweep_conv.py --out sweep.jsonl [--extra-path DIR:DIR] [--fwd CFG ...] [--bwd CFG ...]
                               [--shapes mamba2-1.3b,mamba2-2.7b,mamba1-1.4b]

A configuration is ``BLOCK_D,BLOCK_L,warps,kernel[,group]`` as in ``kernels/conv1d/api.py`` (``_GPU_FWD``,
``_GPU_BWD``); kernel is shifted, slots or rows. Shapes: Mamba2's xBC columns read in place from its in_proj output
(channel-last; 1.3B: 4352 channels of 8512, 2.7B: 5376 of 10576) and Mamba1-1.4B's time-contiguous x (4096 channels),
all at 8 x 2048 tokens, width 4, bias and SiLU. Every configuration's output (forward) or dx, dweight and dbias
(backward) is checked against the fp32 reference first and gets no time if its max relative error is above 0.03.
Times are device times of ``conv_forward`` / ``conv_backward`` replayed from a CUDA graph (median); causal-conv1d's
are its autograd forward and forward+backward from a graph, their difference standing for its backward. Prints and
appends ``RESULT`` JSON lines.
"""

import argparse
import sys

import torch
from bench_kernels import bench_graph  # tools/ is on the path when a tool runs as a script
from sweep_ssd import results_writer

TOLERANCE = 3e-2
SHAPES = {
    # name: (batch, seqlen, channels, in_proj width or None for a contiguous time-major tensor, column offset)
    "mamba2-1.3b": (8, 2048, 4352, 8512, 4096),
    "mamba2-2.7b": (8, 2048, 5376, 10576, 5120),
    "mamba1-1.4b": (8, 2048, 4096, None, 0),
}
FWD = {
    True: ["128,16,4,shifted", "256,32,1,rows,4", "256,32,1,rows,8", "256,64,1,rows,8", "128,32,1,rows,8",
           "128,64,1,rows,8", "256,64,2,rows,8", "128,64,2,rows,4", "256,128,1,rows,8", "512,64,4,rows,8"],
    False: ["8,128,2,slots"],
}  # fmt: skip
BWD = {
    True: ["64,16,2,slots", "64,32,1,rows,4", "64,64,1,rows,4", "64,64,1,rows,8", "128,64,2,rows,4",
           "128,64,2,rows,8", "256,64,4,rows,8", "64,128,1,rows,8", "128,32,1,rows,4", "128,128,2,rows,8"],
    False: ["4,256,2,slots"],
}  # fmt: skip


def parse(cfg: str) -> tuple:
    parts = cfg.split(",")
    return int(parts[0]), int(parts[1]), int(parts[2]), parts[3], int(parts[4]) if len(parts) > 4 else 0


def make(shape: str):
    batch, seqlen, dim, width_all, col = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g)
    if width_all is None:
        x = rnd(batch, dim, seqlen).to(torch.bfloat16)
    else:
        x = rnd(batch, seqlen, width_all).to(torch.bfloat16)[..., col : col + dim].transpose(1, 2)
    weight, bias = rnd(dim, 4) * 0.5, rnd(dim) * 0.5
    dout = rnd(batch, dim, seqlen).to(torch.bfloat16)
    if width_all is not None:  # the gradient comes channel-last too (SSD writes it so)
        dout = dout.transpose(1, 2).contiguous().transpose(1, 2)
    return x, weight, bias, dout


def reference(x, weight, bias, dout):
    from mambatron.kernels.conv1d import causal_conv1d_fn_ref

    xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, weight, bias))
    out = causal_conv1d_fn_ref(xf, wf, bf, activation="silu")
    dx, dw, db = torch.autograd.grad(out, (xf, wf, bf), dout.float())
    return out.detach(), dx, dw, db


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def sweep_shape(shape: str, fwd_cfgs, bwd_cfgs, theirs, emit) -> None:
    from mambatron.kernels.conv1d import api

    x, weight, bias, dout = make(shape)
    cl = api.channel_last(x)
    ref_out, ref_dx, ref_dw, ref_db = reference(x, weight, bias, dout)
    passes = [
        ("conv_fwd", "_GPU_FWD", fwd_cfgs or FWD[cl], (ref_out,),
         lambda: (api.conv_forward(x, weight, bias, None, None, True),)),
        ("conv_bwd", "_GPU_BWD", bwd_cfgs or BWD[cl], (ref_dx, ref_dw, ref_db),
         lambda: api.conv_backward(x, weight, bias, None, None, True, dout)[:3]),
    ]  # fmt: skip
    for what, table, cfgs, expected, run in passes:
        for cfg in cfgs:
            setattr(api, table, {**getattr(api, table), cl: parse(cfg)})
            try:
                err = max(rel(a, b) for a, b in zip(run(), expected))
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a result too
                emit(what=what, shape=shape, cfg=cfg, error=repr(e)[:300])
                continue
            row = dict(what=what, shape=shape, cfg=cfg, max_rel_error=err, ok=err <= TOLERANCE)
            if row["ok"]:
                row["ms"] = bench_graph(run)
            emit(**row)
    if theirs is None:
        return
    xt, wt, bt = (t.detach().requires_grad_() for t in (x, weight, bias))
    fwd = lambda: theirs(xt, wt, bt, activation="silu")
    try:
        err = rel(fwd(), ref_out)
        fwd_ms = bench_graph(fwd)
        both_ms = bench_graph(lambda: torch.autograd.grad(fwd(), (xt, wt, bt), dout))
        emit(what="causal_conv1d", shape=shape, max_rel_error=err, fwd_ms=fwd_ms, fwd_bwd_ms=both_ms,
             bwd_ms=both_ms - fwd_ms)  # fmt: skip
    except Exception as e:  # noqa: BLE001
        emit(what="causal_conv1d", shape=shape, error=repr(e)[:300])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="append RESULT JSON lines here")
    p.add_argument("--extra-path", default="", help="colon-separated folders put in front of sys.path")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--fwd", nargs="*", help="forward configurations (default: a built-in list per layout)")
    p.add_argument("--bwd", nargs="*", help="backward configurations (default: a built-in list per layout)")
    args = p.parse_args(argv)
    sys.path[:0] = [d for d in args.extra_path.split(":") if d]
    try:
        from causal_conv1d import causal_conv1d_fn as theirs
    except Exception as e:  # noqa: BLE001 - optional competitor
        print(f"note: causal_conv1d not importable ({type(e).__name__}: {str(e)[:120]})", flush=True)
        theirs = None
    emit = results_writer(args.out)
    for shape in args.shapes.split(","):
        sweep_shape(shape, args.fwd, args.bwd, theirs, emit)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
