"""Sweep the launch configurations of the selective-scan kernels on one GPU, beside mamba_ssm's CUDA scan.

    python tools/sweep_scan.py --out sweep.jsonl [--extra-path DIR:DIR] [--shapes 8,4096,2048,16 ...]
                               [--fwd 64,4,1,128 128,2,1,128 ...] [--bwd 256,1,1,128 ...] [--no-asm]

A configuration is (CHUNK, BLOCK_D, num_warps, maxnreg) as in ``kernels/selective_scan/api.py`` (``_GPU_FWD``,
``_GPU_BWD``; the backward's chunk must be a multiple of the forward's). Inputs are bf16 with z, D and Δ bias +
softplus, as in ``tools/bench_kernels.py``. Forward variants are timed forward only, backward variants forward +
backward (gradients of every input) with the default forward. Every variant is checked against the default
configuration's outputs and gradients first and gets no time if it differs by more than 2% (the defaults themselves
are checked against the fp32 reference by ``bench_kernels.py --only scan``). ``--no-asm`` also times each variant
with ``MAMBATRON_SCAN_ASM=0`` (plain Triton where the kernels would use their inline PTX). mamba_ssm's
``selective_scan_fn`` is timed on the same inputs when importable. Prints and appends ``RESULT`` JSON lines.
"""

import argparse
import os
import sys

import torch
from bench_kernels import BF16, scan_inputs  # tools/ is on the path when a tool runs as a script
from sweep_ssd import results_writer

DEFAULT_SHAPES = ["8,4096,2048,16", "8,4096,8192,16", "8,5120,2048,16"]  # Mamba1-1.4B, long, Mamba1-2.8B's d_inner
DEFAULT_FWD = ["64,4,1,128", "64,4,1,96", "128,2,1,128", "256,1,1,128", "64,8,2,128", "32,8,1,128"]
DEFAULT_BWD = ["256,1,1,128", "256,1,1,144", "256,2,2,128"]


def config_arg(text: str) -> dict:
    chunk, block_d, warps, maxnreg = (int(v) for v in text.split(","))
    return dict(CHUNK=chunk, BLOCK_D=block_d, num_warps=warps, maxnreg=maxnreg)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def sweep_shape(shape, args, emit, theirs) -> None:
    """Time mamba_ssm's scan and every configuration at one (batch, dim, seqlen, dstate)."""
    from triton.testing import do_bench

    from mambatron.kernels.selective_scan import api, selective_scan_fn

    inputs = scan_inputs(*shape)
    softplus = inputs.pop("delta_softplus")
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    dout = torch.randn(shape[:3], device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(BF16)

    def forward(fn=selective_scan_fn):
        return fn(**inputs, delta_softplus=softplus)

    def forward_backward(fn=selective_scan_fn):
        out = fn(**leaves, delta_softplus=softplus)
        return (out, *torch.autograd.grad(out, list(leaves.values()), dout))

    if theirs is not None:
        emit(what="mamba_ssm_scan", shape=shape, fwd_ms=do_bench(lambda: forward(theirs), return_mode="median"),
             fwd_bwd_ms=do_bench(lambda: forward_backward(theirs), return_mode="median"))  # fmt: skip
    expected_fwd, expected_all = forward(), forward_backward()
    user_asm = os.environ.get("MAMBATRON_SCAN_ASM")
    for kind, texts, table in (("fwd", args.fwd, api._GPU_FWD), ("bwd", args.bwd, api._GPU_BWD)):
        default = dict(table)
        for text in texts:
            for asm in (True, False) if args.no_asm else (True,):
                table.clear()
                table.update(config_arg(text))
                os.environ["MAMBATRON_SCAN_ASM"] = "1" if asm else "0"
                row = dict(what="scan_config", kind=kind, shape=shape, config=text, asm=asm)
                try:
                    if kind == "fwd":
                        err = rel(forward(), expected_fwd)
                    else:
                        err = max(rel(a, b) for a, b in zip(forward_backward(), expected_all))
                    row.update(ok=err < args.tolerance, rel_err_vs_default=err)
                    if row["ok"]:
                        run = forward if kind == "fwd" else forward_backward
                        row["ms"] = do_bench(run, warmup=25, rep=150, return_mode="median")
                except Exception as e:  # a configuration the kernel cannot compile is a result
                    row.update(ok=False, error=repr(e)[:200])
                emit(**row)
        table.clear()
        table.update(default)
        os.environ.pop("MAMBATRON_SCAN_ASM", None)
        if user_asm is not None:
            os.environ["MAMBATRON_SCAN_ASM"] = user_asm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="append RESULT JSON lines here")
    p.add_argument("--extra-path", default="", help="colon-separated folders put in front of sys.path")
    p.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help="batch,dim,seqlen,dstate")
    p.add_argument("--fwd", nargs="*", default=DEFAULT_FWD, help="forward configurations CHUNK,BLOCK_D,warps,maxnreg")
    p.add_argument("--bwd", nargs="*", default=DEFAULT_BWD, help="backward configurations CHUNK,BLOCK_D,warps,maxnreg")
    p.add_argument("--no-asm", action="store_true", help="also time each variant with MAMBATRON_SCAN_ASM=0")
    p.add_argument("--tolerance", type=float, default=2e-2, help="max relative difference from the defaults")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: sweep_scan.py times GPU kernels and needs a CUDA device; run it on a GPU machine",
              file=sys.stderr)  # fmt: skip
        return 2
    sys.path[:0] = [d for d in args.extra_path.split(":") if d]
    from mambatron.kernels.selective_scan import api

    emit = results_writer(args.out)
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as theirs
    except ImportError as e:
        theirs = None
        emit(what="mamba_ssm_unavailable", error=repr(e)[:200])
    emit(what="sweep_scan_setup", torch=torch.__version__, gpu=torch.cuda.get_device_name(),
         defaults=dict(fwd=api._GPU_FWD, bwd=api._GPU_BWD))  # fmt: skip
    for shape_text in args.shapes:
        sweep_shape(tuple(int(v) for v in shape_text.split(",")), args, emit, theirs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
