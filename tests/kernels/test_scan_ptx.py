"""The selective-scan kernels as compiled for a GPU (sm_90), on any machine: Triton's own pipeline down to a cubin
with its bundled ptxas, in a subprocess without the interpreter. The inline PTX runs only on a GPU; here a syntax slip
in it, a register blow-up past the cap, a layout it was not written for, or a regression to what it replaced fails
without one.

What the PTX is for (kernels/selective_scan/kernel.py, docs/benchmarks.md 2026-12-03): Triton lowers the adjoint's
reverse ``tl.associative_scan`` by reversing the lanes of its inputs and outputs; the backward's block scans with
``shfl.sync.down`` instead, and must not read ``%laneid`` (a special-register read on every state index's dependency
chain made the first version slower than Triton's scan). The block assumes each lane holds 8 consecutive steps: the
compiler picks that layout for launches that ``api._use_asm`` admits (16-bit tiles, time strides 1, every other
integer and pointer divisible by 16), so the kernel is compiled here specialized that way and the layout of the
block's operands is checked; at run time the block checks it again and traps.

The counts asserted are those of the block itself; what Triton emits for its own scan differs between Triton
versions and is only compared where the difference is the point (exponentials).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.selective_scan import kernel as kernels

# argv: the kernel, its constexpr flags, the flag that switches its PTX on and off
fn, flags, switch = getattr(kernels, sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
bf16 = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr", "out_ptr"}
variants = {str(p): dict(flags, **{switch: p}) for p in (False, True)}
out = {}
for key, constants in variants.items():
    signature, attrs, cx = {}, {}, dict(constants)
    for i, name in enumerate(fn.arg_names):
        if name in cx:
            signature[name] = "constexpr"
        elif name.startswith("s_") and name.endswith("_l"):  # time strides: 1, as api.py hands them over
            signature[name] = "constexpr"
            cx[name] = 1
        else:
            if name.endswith("_ptr"):
                signature[name] = "*bf16" if name in bf16 else ("*i32" if name == "seq_idx_ptr" else "*fp32")
            else:
                signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in cx.items()}, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1, maxnreg=128))
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<.*>)$", ttgir, flags=re.M))
    out[key] = {
        "cubin_bytes": len(kernel.asm["cubin"]),
        "asm_layouts": [layouts.get(n, n) for n in re.findall(r"inline_asm.*-> tensor<\w+, (#\w+)>", ttgir)],
        "scan_asm_layouts": [layouts.get(n, n) for n in re.findall(r"inline_asm.*shfl.*-> tensor<\w+, (#\w+)>", ttgir)],
        "shuffles_down": ptx.count("shfl.sync.down.b32"),
        "laneid_reads": ptx.count("%laneid"),
        "traps": ptx.count("trap;"),
        "exponentials": len(re.findall(r"ex2\.approx", ptx)),
        "barriers": ptx.count("bar.sync"),
        "shared_stores": len(re.findall(r"st\.shared|stmatrix", ptx)),
        "sfu_log2": ptx.count("lg2.approx"),
        "divisions": len(re.findall(r"div\.(?:full|rn)\.f32", ptx)),
    }
print(json.dumps(out))
"""


FLAGS = dict(HAS_D=True, HAS_Z=True, HAS_DELTA_BIAS=True, DELTA_SOFTPLUS=True, HAS_SEQ_IDX=True, BLOCK_N=16)


def compile_both(kernel: str, flags: dict, switch: str) -> tuple[dict, dict]:
    """What the kernel compiles to for sm_90 without and with its PTX (the switch off and on)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, kernel, json.dumps(flags), switch], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return got["False"], got["True"]


def test_forward_ptx_stores_in_place_and_uses_the_sfu():
    """The forward's chunk-state store (kernel._store_where) keeps the scanned tile where it is: a masked ``tl.store``
    of it went through shared memory with a barrier once per state index (docs/benchmarks.md, 2026-12-03). Its asm
    writes nothing through shared memory and adds no barrier. softplus' log2 and the gate's division are one SFU
    instruction each instead of libdevice's log2 and a full-range division."""
    flags = dict(FLAGS, HAS_H0=True, CHUNK=64, BLOCK_D=4, SAVE_EVERY=4)
    triton_store, ptx_store = compile_both("_scan_fwd_kernel", flags, "PTX")
    assert ptx_store["cubin_bytes"] > 0 and triton_store["cubin_bytes"] > 0
    assert len(ptx_store["asm_layouts"]) == 3 and triton_store["asm_layouts"] == []  # store, log2, division
    assert ptx_store["sfu_log2"] > 0 and ptx_store["divisions"] == 0, ptx_store
    assert triton_store["sfu_log2"] == 0 and triton_store["divisions"] > 0, triton_store
    # The tile store inside the loop over state indices is the one that goes: its barrier and its shared stores.
    assert ptx_store["barriers"] == triton_store["barriers"] - 1, (ptx_store, triton_store)
    assert ptx_store["shared_stores"] < triton_store["shared_stores"], (ptx_store, triton_store)
    assert ptx_store["exponentials"] == triton_store["exponentials"]


def test_backward_compiles_for_sm90_with_and_without_its_ptx():
    flags = dict(FLAGS, HAS_DLAST=False, CHUNK=256, BLOCK_D=1, PTX=True)  # PTX: the per-element forms, as on a GPU
    triton_scan, ptx_scan = compile_both("_scan_bwd_kernel", flags, "USE_ASM")
    assert triton_scan["cubin_bytes"] > 0 and ptx_scan["cubin_bytes"] > 0  # ptxas accepted both
    assert triton_scan["scan_asm_layouts"] == [] and triton_scan["traps"] == 0
    # One block, on operands that hold 8 consecutive steps per lane, and checked again at run time.
    layouts = ptx_scan["scan_asm_layouts"]
    assert len(layouts) == 1 and "sizePerThread = [1, 8]" in layouts[0], ptx_scan
    assert ptx_scan["traps"] == 1 and ptx_scan["laneid_reads"] == 0, ptx_scan
    # 5 levels x 2 shuffles down + 2 exclusive + 1 for a_{t+1}; one exponential per step fewer (a_{t+1} is the
    # neighbouring lane's a_t instead of a second tile's exponential).
    assert ptx_scan["shuffles_down"] == 13, ptx_scan
    assert ptx_scan["exponentials"] < triton_scan["exponentials"], (ptx_scan, triton_scan)


def test_backward_uses_the_sfu_like_the_forward():
    """With PTX the backward recomputes softplus with the forward's lg2.approx (so its dt is the forward's) and
    takes its sigmoids as SFU reciprocals, without a full-range division."""
    flags = dict(FLAGS, HAS_DLAST=False, CHUNK=256, BLOCK_D=1, USE_ASM=True)
    plain, ptx = compile_both("_scan_bwd_kernel", flags, "PTX")
    assert ptx["sfu_log2"] > 0 and ptx["divisions"] == 0, ptx
    assert plain["sfu_log2"] == 0 and plain["divisions"] > 0, plain
