"""A hybrid (Mamba2 + attention + MLP) on one GPU: the Triton path checked against the reference path, then timed.

    python tools/bench_hybrid.py [--config configs/hybrid-tiny.yaml] [--set model.d_model=2048 ...]

The check runs 2 × 512 tokens with two packed documents in bf16 autocast and compares the loss and every gradient
(largest relative error, tolerance 2e-2 as ``tools/bench_step.py``); only a model that passes is timed (8 × 2048
tokens, AdamW, 3 warm-up steps then the mean of 5). There is no anchor to compare with in the same process: mamba_ssm
has no hybrid LM. Prints ``RESULT`` JSON lines.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mambatron.config import load_config
from mambatron.models import build_model
from mambatron.plan import flops_per_token

# The 0.54 B hybrid of docs/hybrid.md's GPU check.
DEFAULT = [
    "model.d_model=2048", "model.hybrid_pattern=M-M*-M-M-M*-M-M-", "model.n_layer=16", "model.vocab_size=50277",
    "model.headdim=64", "model.ngroups=1", "model.d_state=128", "model.chunk_size=256", "model.attention.num_heads=16",
    "model.attention.num_kv_heads=4", "model.mlp.hidden=8192",
]  # fmt: skip


def result(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)


def check(cfg) -> float:
    grads = {}
    for kernels in ("reference", "triton"):
        cfg.kernels = kernels
        torch.manual_seed(0)
        model = build_model(cfg).cuda()
        gen = torch.Generator("cuda").manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (2, 513), device="cuda", generator=gen)
        seq_idx = torch.zeros(2, 512, dtype=torch.int32, device="cuda")
        seq_idx[:, 300:] = 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(ids[:, :-1], ids[:, 1:], seq_idx=seq_idx)
        loss.backward()
        grads[kernels] = {"loss": loss.detach().float(), **{n: p.grad.float() for n, p in model.named_parameters()}}
        del model
    errors = {n: ((grads["reference"][n] - g).norm() / grads["reference"][n].norm().clamp_min(1e-12)).item()
              for n, g in grads["triton"].items()}  # fmt: skip
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    result(what="check_hybrid", max_rel_err=worst[0][1], worst=worst, ok=worst[0][1] < 2e-2)
    return worst[0][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/hybrid-tiny.yaml")
    ap.add_argument("--set", nargs="*", default=[], help="overrides after the 0.54 B defaults")
    args = ap.parse_args()
    cfg = load_config(args.config, [*DEFAULT, *args.set]).model
    if check(cfg) >= 2e-2:
        result(what="train_step_mambatron_hybrid", error="kernel check failed: no speed is reported")
        return
    cfg.kernels = "triton"
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (8, 2049), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 5
    tps = 8 * 2048 / dt
    result(what="train_step_mambatron_hybrid", params=sum(p.numel() for p in model.parameters()), tokens_per_s=tps,
           step_s=dt, mfu=tps * flops_per_token(cfg, 2048) / 989e12,
           peak_mem_GB=torch.cuda.max_memory_allocated() / 1e9, pattern=cfg.hybrid_pattern)  # fmt: skip


if __name__ == "__main__":
    main()
