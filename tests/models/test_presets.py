import re
from pathlib import Path

import pytest

from mambatron.config import load_config
from mambatron.models import build_model, count_parameters

PRESETS = sorted([*Path("configs").glob("mamba*.yaml"), *Path("configs").glob("hybrid-*b.yaml")])
# Sizes that are not the name's: the hybrid study calls its 8.65 B-parameter models (256k vocabulary) "8B".
EXACT = {"hybrid-8b": 8.65e9}


def test_moe_preset_plans_its_active_parameters():
    """The MoE preset: total past 3 B, about a third of it active per token, FLOPs counted on the active ones."""
    from mambatron.plan import count_params, flops_per_token, format_plan, make_plan

    cfg = load_config("configs/hybrid-moe-3b.yaml")
    pc = count_params(cfg.model)
    assert pc.total > 3e9 and 0.3 < pc.active / pc.total < 0.4
    assert flops_per_token(cfg.model, 4096) < 6 * pc.total * 0.5
    plan = make_plan(cfg, 16)
    text = format_plan(plan, cfg)
    assert f"{pc.active:,} active per token" in text and "fits" in text
    # EP 8 over 16 ranks: each holds 1/8 of the routed experts (8 layers x 64 experts x 2 x 2048 x 1024), ZeRO splits
    # them over the 2 ranks that hold the same ones, and each micro-batch's 4096 tokens go 4 times to other ranks and
    # back (7/8 of them off-rank) in every MoE layer, in bf16.
    routed = 8 * 64 * 2 * 2048 * 1024
    ep8 = make_plan(load_config("configs/hybrid-moe-3b.yaml", ["parallel.ep=8"]), 16)
    assert ep8.expert_params_per_gpu == routed // 8 and ep8.params_per_gpu == pc.total - routed + routed // 8
    assert ep8.optimizer_bytes == plan.optimizer_bytes  # ZeRO-1: the same total state, split another way
    assert ep8.weights_bytes == plan.weights_bytes - (routed - routed // 8) * 2
    assert ep8.ep_exchange_bytes == 8 * 2 * 4096 * 4 * 2048 * 2 * 7 // 8
    # Under TP 2 the routed experts are whole on each rank (EP 1) or split over the TP group (EP = TP = 2, sequence
    # parallel: each rank sends its half of the tokens, half of those to the other rank); the rest is split by TP.
    sp = ["parallel.tp=2", "parallel.sequence_parallel=true"]
    tp2 = make_plan(load_config("configs/hybrid-moe-3b.yaml", sp), 16)
    eptp = make_plan(load_config("configs/hybrid-moe-3b.yaml", [*sp, "parallel.ep=2"]), 16)
    assert tp2.params_per_gpu == -(-(pc.total - routed) // 2) + routed
    assert eptp.params_per_gpu == -(-(pc.total - routed) // 2) + routed // 2
    assert eptp.ep_exchange_bytes == 8 * 2 * 2048 * 4 * 2048 * 2 // 2


def test_every_size_has_a_preset():
    names = {p.stem for p in PRESETS}
    for size in ("130m", "370m", "790m", "1.4b", "2.8b", "7b"):
        assert f"mamba1-{size}" in names
    for size in ("130m", "370m", "780m", "1.3b", "2.7b", "8b"):
        assert f"mamba2-{size}" in names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_parameter_count_matches_name(path):
    cfg = load_config(path)
    model = build_model(cfg.model, device="meta")
    n = count_parameters(model)
    value, unit = re.search(r"-([\d.]+)([mb])$", path.stem).groups()
    expected = EXACT.get(path.stem, float(value) * (1e6 if unit == "m" else 1e9))
    assert abs(n - expected) / expected <= 0.05, f"{path.stem}: {n / 1e6:.1f}M parameters"
    if path.stem.startswith("hybrid"):
        kinds = {block.kind for block in model.layers}
        ffn = "moe" if "-moe-" in path.stem else "mlp"
        assert cfg.model.hybrid_pattern and kinds == {cfg.model.arch, "attention", ffn}
    else:
        assert cfg.model.arch == path.stem.split("-")[0]
