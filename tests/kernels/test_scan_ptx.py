"""The selective-scan backward as compiled for a GPU (sm_90), on any machine: Triton's own pipeline down to a cubin
with its bundled ptxas, in a subprocess without the interpreter. The backward's inline PTX runs only on a GPU; here a
syntax slip in it, a register blow-up past the cap, or a regression to what it replaced fails without one.

What the PTX is for (kernels/selective_scan/kernel.py, docs/benchmarks.md 2026-12-03): Triton lowers the adjoint's
reverse ``tl.associative_scan`` by reversing the lanes of its inputs and outputs (``shfl.sync.bfly`` with lane mask
31); the inline block scans with ``shfl.sync.down`` instead, and must not read ``%laneid`` (a special-register read on
every state index's dependency chain made the first version slower than Triton's scan).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.selective_scan.kernel import _scan_bwd_kernel

fn = _scan_bwd_kernel
types = {name: "*bf16" for name in ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "dout_ptr", "du_ptr", "ddelta_ptr",
                                    "dz_ptr")}
constants = dict(HAS_D=True, HAS_Z=True, HAS_DELTA_BIAS=True, DELTA_SOFTPLUS=True, HAS_DLAST=False, HAS_SEQ_IDX=True,
                 CHUNK=256, BLOCK_D=1, BLOCK_N=16)
out = {}
for use_asm in (False, True):
    cx = dict(constants, USE_ASM=use_asm)
    signature = {}
    for name in fn.arg_names:
        if name in cx:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = types.get(name, "*i32" if name == "seq_idx_ptr" else "*fp32")
        else:
            signature[name] = "i32"
    src = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in cx.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1, maxnreg=128))
    ptx = kernel.asm["ptx"]
    out[str(use_asm)] = {
        "cubin_bytes": len(kernel.asm["cubin"]),
        "lane_reversals": len(re.findall(r"shfl\.sync\.bfly\.b32\s+%r\d+, %r\d+, 31, 31", ptx)),
        "shuffles_down": ptx.count("shfl.sync.down.b32"),
        "laneid_reads": ptx.count("%laneid"),
        "exponentials": len(re.findall(r"ex2\.approx", ptx)),
    }
print(json.dumps(out))
"""


def test_backward_compiles_for_sm90_with_and_without_its_ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    triton_scan, ptx_scan = got["False"], got["True"]
    assert triton_scan["cubin_bytes"] > 0 and ptx_scan["cubin_bytes"] > 0  # ptxas accepted both
    # Triton's reverse scan: 2 inputs and 2 outputs of 8 registers, each reversed over the lanes.
    assert triton_scan["lane_reversals"] == 32 and triton_scan["shuffles_down"] == 0, triton_scan
    # The inline block: no lane reversal, its own shuffles down (5 levels x 2 + 2 exclusive + 1 for a_{t+1}), no
    # %laneid, and one exponential per step fewer (a_{t+1} is the neighbour's a_t).
    assert ptx_scan["lane_reversals"] == 0 and ptx_scan["shuffles_down"] == 13, ptx_scan
    assert ptx_scan["laneid_reads"] == 0
    assert ptx_scan["exponentials"] < triton_scan["exponentials"], (ptx_scan, triton_scan)
