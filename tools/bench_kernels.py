"""Check, then time, mambatron's Triton kernels on one GPU, side by side with mamba_ssm's when it is importable.

For each kernel: compare the forward and every gradient with the fp32 reference (max |error| / max |reference| per
tensor, at a reduced shape so the reference fits), and only if that passes, time forward and forward+backward at the
realistic shape (median of triton.testing.do_bench; our kernels' autotuning picks from the check are forgotten first,
so that they autotune at that shape), report achieved GB/s over the bytes each pass must move at least, as a fraction
of a measured device-to-device copy bandwidth (and TFLOP/s for SSD). A kernel that fails its check gets no speed.

    python tools/bench_kernels.py [--only scan,conv1d,rmsnorm,gated_rmsnorm,ssd] [--json PATH]
        [--extra-path DIR:DIR]   # e.g. where mamba_ssm / selective_scan_cuda / causal_conv1d live

Prints one ``RESULT {json}`` line per kernel and a table at the end.
"""

import argparse
import json
import math
import sys

import torch

SECTIONS = ("scan", "conv1d", "rmsnorm", "gated_rmsnorm", "ssd", "grouped_gemm")
BF16 = torch.bfloat16
TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3}


def result(**kw):
    print("RESULT " + json.dumps(kw), flush=True)
    return kw


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth_GBps() -> float:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n / ms / 1e6


def leaves(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def run_with_grads(fn, inputs: dict, upcast: bool):
    """fn's outputs and the gradients of a fixed random linear loss of them, w.r.t. every float input."""
    args = {
        k: (v.detach().float() if upcast and v.is_floating_point() else v.detach()).requires_grad_(
            v.is_floating_point()
        )
        if isinstance(v, torch.Tensor)
        else v
        for k, v in inputs.items()
    }
    outs = fn(**args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator(device="cuda").manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, device="cuda", generator=g)).sum() for o in outs)
    names = list(leaves(args))
    grads = torch.autograd.grad(loss, [args[k] for k in names])
    return outs, dict(zip(names, grads))


def check(fn, ref_fn, inputs: dict, dtype) -> tuple[bool, dict]:
    """Relative max error of every output and gradient of fn against ref_fn run on fp32 copies of the inputs."""
    outs, grads = run_with_grads(fn, inputs, upcast=False)
    ref_outs, ref_grads = run_with_grads(ref_fn, inputs, upcast=True)
    errors = {}
    pairs = [(f"out{i}", a, b) for i, (a, b) in enumerate(zip(outs, ref_outs))]
    pairs += [(f"d{k}", grads[k], ref_grads[k]) for k in grads]
    for name, a, b in pairs:
        scale = b.float().abs().max().clamp_min(1e-6)
        err = ((a.float() - b.float()).abs().max() / scale).item()
        errors[name] = err if math.isfinite(err) else float("inf")
    return all(e <= TOL[dtype] for e in errors.values()), errors


def bench_graph(fn) -> float:
    """bench with fn replayed from a CUDA graph: device time without the Python launch overhead, which is what a
    kernel of ~0.1 ms is otherwise bounded by in an eager loop (and what a training step hides)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=200, return_mode="median")


def time_fwd_bwd(fn, inputs: dict, timer=bench) -> tuple[float, float]:
    args = {k: (v.detach().requires_grad_() if k in leaves(inputs) else v) for k, v in inputs.items()}
    names = list(leaves(args))
    first = lambda o: o[0] if isinstance(o, tuple) else o
    dout = torch.randn_like(first(fn(**args)))
    fwd = timer(lambda: fn(**args))
    fwd_bwd = timer(lambda: torch.autograd.grad(first(fn(**args)), [args[k] for k in names], dout))
    return fwd, fwd_bwd


def section(name, ours, ref, small_inputs, big_inputs, dtype, bytes_fwd, bytes_fwd_bwd, copy_GBps, theirs=None,
            flops_fwd=None, exps_fwd=None, extra=None, graphs=False):  # fmt: skip
    """Check ours against ref, then time ours (and theirs, if given) at the big shape; with graphs, also from CUDA
    graphs (fields *_graph)."""
    from mambatron.kernels._common import reset_autotuning

    ok, errors = check(ours, ref, small_inputs(), dtype)
    worst = max(errors.values())
    if not ok:
        return result(what=name, ok=False, errors=errors, note="correctness check failed: no speed reported")
    reset_autotuning()  # ours autotunes at the big shape, as theirs does, not at the check's
    inputs = big_inputs()
    fwd, fwd_bwd = time_fwd_bwd(ours, inputs)
    row = dict(what=name, ok=True, max_rel_error=worst, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd)
    row.update(fwd_GBps=bytes_fwd / fwd / 1e6, fwd_bwd_GBps=bytes_fwd_bwd / fwd_bwd / 1e6)
    row.update(fwd_frac_copy=row["fwd_GBps"] / copy_GBps, fwd_bwd_frac_copy=row["fwd_bwd_GBps"] / copy_GBps)
    if flops_fwd is not None:
        row["fwd_TFLOPs"] = flops_fwd / fwd / 1e9
    if exps_fwd is not None:  # special-function (exp) work, against the SFU rate (H200: ~4.2 T/s)
        row["fwd_Texp_per_s"] = exps_fwd / fwd / 1e9
    row.update(extra or {})
    if graphs:
        try:
            row.update(zip(("fwd_ms_graph", "fwd_bwd_ms_graph"), time_fwd_bwd(ours, inputs, bench_graph)))
        except Exception as e:  # noqa: BLE001 - a pass that cannot be captured still has its eager timing
            row["graph_error"] = repr(e)[:300]
            graphs = False
    if theirs is not None:
        try:
            their_fwd, their_fwd_bwd = time_fwd_bwd(theirs, inputs)
            row.update(theirs_fwd_ms=their_fwd, theirs_fwd_bwd_ms=their_fwd_bwd)
            row.update(fwd_ratio=fwd / their_fwd, fwd_bwd_ratio=fwd_bwd / their_fwd_bwd)
            if graphs:
                their_fwd, their_fwd_bwd = time_fwd_bwd(theirs, inputs, bench_graph)
                row.update(theirs_fwd_ms_graph=their_fwd, theirs_fwd_bwd_ms_graph=their_fwd_bwd)
                row.update(fwd_ratio_graph=row["fwd_ms_graph"] / their_fwd)
                row.update(fwd_bwd_ratio_graph=row["fwd_bwd_ms_graph"] / their_fwd_bwd)
        except Exception as e:  # noqa: BLE001 - a broken competitor must not hide our own numbers
            row["theirs_error"] = repr(e)[:300]
    del inputs
    torch.cuda.empty_cache()
    return result(**row)


def try_import(path: str, attr: str):
    try:
        module = __import__(path, fromlist=[attr])
        return getattr(module, attr)
    except Exception as e:  # noqa: BLE001 - optional competitor, any import failure means "not available"
        print(f"note: {path}.{attr} not importable ({type(e).__name__}: {str(e)[:120]})", flush=True)
        return None


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", dtype=torch.float32, generator=g).mul_(scale).to(dtype)


def scan_inputs(batch, dim, seqlen, dstate):
    """bf16 selective-scan inputs with z, D and Δ bias (+ softplus), as the Mamba1 mixer passes them
    (tools/sweep_scan.py times its variants on the same)."""
    return dict(
        u=randn(batch, dim, seqlen, dtype=BF16, seed=1),
        delta=randn(batch, dim, seqlen, dtype=BF16, scale=0.5, seed=2),
        A=-torch.rand(dim, dstate, device="cuda") * 4 - 0.5,
        B=randn(batch, dstate, seqlen, dtype=BF16, seed=3),
        C=randn(batch, dstate, seqlen, dtype=BF16, seed=4),
        D=randn(dim, seed=5),
        z=randn(batch, dim, seqlen, dtype=BF16, seed=6),
        delta_bias=randn(dim, scale=0.5, seed=7),
        delta_softplus=True,
    )


def scan_section(copy_GBps):
    from mambatron.kernels.selective_scan import selective_scan_fn, selective_scan_fn_ref

    make = scan_inputs

    theirs = try_import("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
    rows = []
    for name, (B, D, L, N) in SCAN_SHAPES.items():
        io = 2 * B * D * L  # one bf16 (batch, dim, seqlen) tensor
        bc = 2 * B * N * L
        bytes_fwd = 4 * io + 2 * bc  # read u, delta, z, B, C; write out
        bytes_fwd_bwd = bytes_fwd + 7 * io + 4 * bc  # bwd reads u, delta, z, dout, B, C; writes du, ddelta, dz, dB, dC
        row = section(
            name, selective_scan_fn, selective_scan_fn_ref, lambda n=N: make(2, 256, 2048, n),
            lambda s=(B, D, L, N): make(*s), BF16, bytes_fwd, bytes_fwd_bwd, copy_GBps, theirs,
            exps_fwd=B * D * L * N, extra=dict(shape=dict(batch=B, dim=D, seqlen=L, dstate=N)),
        )  # fmt: skip
        rows.append(row)
    return rows


# The selective-scan shapes of the Mamba1 GPU targets: Mamba1-1.4B's d_inner at 8 x 2048, a long sequence, and
# Mamba1-2.8B's d_inner.
SCAN_SHAPES = {
    "selective_scan": (8, 4096, 2048, 16),
    "selective_scan_L8192": (8, 4096, 8192, 16),
    "selective_scan_D5120": (8, 5120, 2048, 16),
}


def conv1d_section(copy_GBps):
    """Mamba1's layout (time-contiguous x) and Mamba2's (x the channel-last xBC columns of a wider in_proj output)."""
    from mambatron.kernels.conv1d import causal_conv1d_fn, causal_conv1d_fn_ref

    def make(batch, dim, seqlen, width, channel_last):
        if channel_last:  # xBC of Mamba2-1.3B's in_proj output [z | xBC | dt]
            x = randn(batch, seqlen, 4096 + dim + 64, dtype=BF16, seed=1)[..., 4096 : 4096 + dim].transpose(1, 2)
        else:
            x = randn(batch, dim, seqlen, dtype=BF16, seed=1)
        return dict(x=x, weight=randn(dim, width, seed=2), bias=randn(dim, seed=3), activation="silu")

    theirs = try_import("causal_conv1d", "causal_conv1d_fn")
    rows = []
    for name, (B, D, L, cl) in CONV_SHAPES.items():
        io = 2 * B * D * L
        row = section(
            name, causal_conv1d_fn, causal_conv1d_fn_ref, lambda d=D, n=L, c=cl: make(2, min(d, 256), n, 4, c),
            lambda s=(B, D, L, 4, cl): make(*s), BF16, 2 * io, 2 * io + 3 * io, copy_GBps, theirs, graphs=True,
            extra=dict(shape=dict(batch=B, dim=D, seqlen=L, channel_last=cl)),
        )  # fmt: skip
        rows.append(row)
    return rows


# Mamba1-1.4B's conv (d_inner 4096, time-contiguous) and Mamba2-1.3B's (xBC: 4096 + 2 * 128 channels, channel-last).
CONV_SHAPES = {"causal_conv1d": (8, 4096, 2048, False), "causal_conv1d_channel_last": (8, 4352, 2048, True)}


def rmsnorm_section(copy_GBps):
    from mambatron.kernels.rmsnorm import rms_norm_fn, rms_norm_fn_ref

    def make(rows, hidden):
        return dict(
            x=randn(rows, hidden, dtype=BF16, seed=1),
            weight=randn(hidden, seed=2),
            bias=None,
            residual=randn(rows, hidden, seed=3),
            eps=1e-5,
            prenorm=True,
            residual_in_fp32=True,
        )

    rows, hidden = 8 * 2048, 2048
    n = rows * hidden
    bytes_fwd = 2 * n + 4 * n + 2 * n + 4 * n  # read x bf16, residual fp32; write out bf16, residual_out fp32
    bytes_fwd_bwd = bytes_fwd + (2 + 4 + 2 + 4) * n + (2 + 4) * n  # bwd reads x, residual, dout, dres; writes dx, dres
    theirs = try_import("mamba_ssm.ops.triton.layer_norm", "rms_norm_fn")
    return section(
        "rms_norm_prenorm", rms_norm_fn, rms_norm_fn_ref, lambda: make(512, hidden), lambda: make(rows, hidden), BF16,
        bytes_fwd, bytes_fwd_bwd, copy_GBps, theirs,
    )  # fmt: skip


def gated_rmsnorm_section(copy_GBps):
    from mambatron.kernels.rmsnorm import rmsnorm_fn, rmsnorm_fn_ref

    def make(rows, hidden, group_size):
        return dict(
            x=randn(rows, hidden, dtype=BF16, seed=1),
            weight=randn(hidden, seed=2),
            bias=None,
            z=randn(rows, hidden, dtype=BF16, seed=3),
            eps=1e-5,
            group_size=group_size,
            norm_before_gate=False,
        )

    rows, hidden, group = 8 * 2048, 4096, 4096 // 8
    n = 2 * rows * hidden
    theirs = try_import("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn")
    return section(
        "gated_rmsnorm", rmsnorm_fn, rmsnorm_fn_ref, lambda: make(512, hidden, group),
        lambda: make(rows, hidden, group), BF16, 3 * n, 3 * n + 5 * n, copy_GBps, theirs,
    )  # fmt: skip


def ssd_section(copy_GBps):
    try:
        from mambatron.kernels.ssd import mamba_chunk_scan_combined
        from mambatron.kernels.ssd.reference import mamba_chunk_scan_combined_ref
    except Exception as e:  # noqa: BLE001 - the SSD kernel is optional here
        print(f"note: skipping ssd, mambatron.kernels.ssd not importable ({type(e).__name__}: {e})", flush=True)
        return None

    def make(batch, seqlen, nheads, headdim, dstate, groups, chunk):
        return dict(
            x=randn(batch, seqlen, nheads, headdim, dtype=BF16, seed=1),
            dt=randn(batch, seqlen, nheads, dtype=BF16, seed=2),
            A=-torch.rand(nheads, device="cuda") * 4 - 1,
            B=randn(batch, seqlen, groups, dstate, dtype=BF16, seed=3),
            C=randn(batch, seqlen, groups, dstate, dtype=BF16, seed=4),
            chunk_size=chunk,
            D=randn(nheads, seed=5),
            dt_bias=randn(nheads, seed=6),
            dt_softplus=True,
        )

    B, L, H, P, N, G, Q = 8, 2048, 64, 64, 128, 1, 256
    flops_fwd = 2 * B * L * H * (Q * P + 2 * N * P) + 2 * B * L * G * Q * N
    bytes_fwd = 2 * (2 * B * L * H * P + 2 * B * L * G * N + B * L * H)
    bytes_fwd_bwd = bytes_fwd + 2 * (4 * B * L * H * P + 4 * B * L * G * N + 2 * B * L * H)
    theirs = try_import("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
    return section(
        "ssd", mamba_chunk_scan_combined, mamba_chunk_scan_combined_ref, lambda: make(1, 512, 8, P, N, G, Q),
        lambda: make(B, L, H, P, N, G, Q), BF16, bytes_fwd, bytes_fwd_bwd, copy_GBps, theirs, flops_fwd=flops_fwd,
    )  # fmt: skip


def grouped_gemm_section(copy_GBps):
    """An expert layer's fc1 at configs/hybrid-moe-3b.yaml's shape: 4096 tokens × top-4 routed to 64 experts (uneven
    counts), d_model 2048 → width 1024, bf16 rows and fp32 weights; theirs: one matmul per expert (the layer before)."""
    from mambatron.kernels.grouped_gemm import grouped_linear_fn, grouped_linear_fn_ref

    def make(rows, experts, d_model, width):
        g = torch.Generator().manual_seed(3)
        share = torch.rand(experts, generator=g) + 0.25
        counts = (share / share.sum() * rows).floor().long()
        counts[0] += rows - int(counts.sum())
        return dict(x=randn(rows, d_model, dtype=BF16, seed=1), weight=randn(experts, width, d_model, scale=0.02,
                    seed=2), counts=counts.tolist())  # fmt: skip

    rows, experts, d_model, width = 4096 * 4, 64, 2048, 1024
    flops = 2 * rows * d_model * width
    bytes_fwd = 2 * rows * d_model + 4 * experts * width * d_model + 2 * rows * width
    bytes_fwd_bwd = bytes_fwd + 2 * (2 * rows * d_model + 4 * experts * width * d_model + 2 * rows * width)
    return section(
        "grouped_gemm", grouped_linear_fn, grouped_linear_fn_ref, lambda: make(1000, 8, 256, 128),
        lambda: make(rows, experts, d_model, width), BF16, bytes_fwd, bytes_fwd_bwd, copy_GBps, grouped_linear_fn_ref,
        flops_fwd=flops,
    )  # fmt: skip


def print_table(rows):
    cols = ["what", "ok", "max_rel_error", "fwd_ms", "fwd_bwd_ms", "fwd_GBps", "fwd_bwd_frac_copy"]
    cols += ["theirs_fwd_ms", "theirs_fwd_bwd_ms", "fwd_ratio", "fwd_bwd_ratio", "fwd_TFLOPs"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))
    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--json", help="write all results to this JSON file")
    parser.add_argument("--extra-path", default="", help="colon-separated folders put in front of sys.path")
    args = parser.parse_args(argv)
    sys.path[:0] = [p for p in args.extra_path.split(":") if p]
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}", flush=True)
    copy_GBps = copy_bandwidth_GBps()
    torch.cuda.empty_cache()
    rows = [result(what="copy_bandwidth", GBps=copy_GBps)]
    runners = dict(
        scan=scan_section, conv1d=conv1d_section, rmsnorm=rmsnorm_section, gated_rmsnorm=gated_rmsnorm_section,
        ssd=ssd_section, grouped_gemm=grouped_gemm_section,
    )  # fmt: skip
    for name in only:
        try:
            row = runners[name](copy_GBps)
        except Exception as e:  # noqa: BLE001 - report and go on with the other kernels
            row = result(what=name, ok=False, error=repr(e)[:500])
        if isinstance(row, list):
            rows.extend(row)
        elif row is not None:
            rows.append(row)
    print_table(rows[1:])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
