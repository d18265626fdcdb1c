"""A hybrid (Mamba2 + attention + MLP) on one GPU: the Triton path checked against the reference path, then timed.

    python tools/bench_hybrid.py [--set model.d_model=2048 ...]
    python tools/bench_hybrid.py --time-config configs/hybrid-8b.yaml --batch 1 --seqlen 4096 \
        --activation-checkpointing --param-dtype bf16

The check runs the 0.54 B hybrid of docs/hybrid.md (``--config`` + ``--set``) on 2 × 512 tokens with two packed
documents, four ways: the reference path in fp32 (the truth), the reference and the Triton path in bf16 autocast,
and the Triton path in fp32. It compares the loss and every gradient with the truth (relative L2 error per tensor)
and passes when the Triton path is exact in fp32 (largest error < 1e-2) and its bf16 error is no larger than the
reference path's own bf16 error (× 1.25). Comparing two bf16 runs with each other instead measures bf16 noise:
at d_state 128 the A_log and dt_bias gradients (sums over every token) differ by ~3% between any two bf16 runs.

Only a model that passes is timed: ``--time-config`` (default: the checked model) at ``--batch`` × ``--seqlen``,
AdamW, 3 warm-up steps then the mean of 5 (``tools/bench_step.py``'s timing). ``--param-dtype bf16`` keeps weights,
gradients and AdamW moments in bf16 (what fits a hybrid-8B on one GPU: fp32 weights with fp32 Adam moments are
138 GB); the step's GEMMs and kernels are the same as under fp32 weights with bf16 autocast. There is no anchor in
the same process: mamba_ssm has
no hybrid LM. Prints ``RESULT`` JSON lines.
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_step import time_step  # tools/ is on the path when a tool runs as a script

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


def _grads(cfg, kernels: str, bf16: bool) -> dict[str, torch.Tensor]:
    cfg.kernels = kernels
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model(cfg)
    gen = torch.Generator("cuda").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 513), device="cuda", generator=gen)
    seq_idx = torch.zeros(2, 512, dtype=torch.int32, device="cuda")
    seq_idx[:, 300:] = 1
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = model.loss(ids[:, :-1], ids[:, 1:], seq_idx=seq_idx)
    loss.backward()
    return {"loss": loss.detach().float(), **{n: p.grad.float() for n, p in model.named_parameters()}}


def check(cfg) -> bool:
    truth = _grads(cfg, "reference", bf16=False)
    worst = {}
    for name, kernels, bf16 in (("triton_fp32", "triton", False), ("triton_bf16", "triton", True),
                                ("reference_bf16", "reference", True)):  # fmt: skip
        grads = _grads(cfg, kernels, bf16)
        errors = {n: ((truth[n] - g).norm() / truth[n].norm().clamp_min(1e-12)).item() for n, g in grads.items()}
        worst[name] = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
        del grads
    top = {name: w[0][1] for name, w in worst.items()}
    ok = top["triton_fp32"] < 1e-2 and top["triton_bf16"] <= 1.25 * top["reference_bf16"]
    result(what="check_hybrid", max_rel_err_vs_fp32_reference=top, worst=worst, ok=ok)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/hybrid-tiny.yaml")
    ap.add_argument("--set", nargs="*", default=[], help="overrides after the 0.54 B defaults")
    ap.add_argument("--time-config", help="the config to time (default: the checked model)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--param-dtype", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()
    cfg = load_config(args.config, [*DEFAULT, *args.set]).model
    if not check(cfg):
        result(what="train_step_mambatron_hybrid", error="kernel check failed: no speed is reported")
        return
    if args.time_config:
        cfg = load_config(args.time_config).model
    cfg.kernels = "triton"
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialised on the GPU: an 8B model's CPU initialisation takes minutes
        model = build_model(cfg)
    if args.param_dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.activation_checkpointing = args.activation_checkpointing
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seqlen + 1), device="cuda")
    dt, peak_gb, _ = time_step(model, ids, 5, lambda m, x: m.loss(x[:, :-1], x[:, 1:]))
    tps = args.batch * args.seqlen / dt
    result(what="train_step_mambatron_hybrid", config=args.time_config or "0.54B check model",
           params=sum(p.numel() for p in model.parameters()), batch=args.batch, seqlen=args.seqlen,
           activation_checkpointing=args.activation_checkpointing, param_dtype=args.param_dtype, tokens_per_s=tps,
           step_s=dt, mfu=tps * flops_per_token(cfg, args.seqlen) / 989e12,
           peak_mem_GB=peak_gb, pattern=cfg.hybrid_pattern)  # fmt: skip


if __name__ == "__main__":
    main()
