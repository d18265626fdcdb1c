"""Expert parallelism (gloo, EP=2): megatron-core's MoE layer with its all-to-all dispatcher, each rank holding half
of the experts, against the one-process MoE layer: fp32 outputs and every gradient within 1e-6 (an expert's gradient
is the sum over ranks of what the one-process layer computes for each rank's tokens), dropless, top-1 and top-2,
softmax and sigmoid routing, with a shared expert, with the load-balancing loss and the router z-loss attached."""

from __future__ import annotations

import pytest

from tests.parallel import _ep_workers as ew
from tests.parallel._launch import run_distributed

# (router, top_k, activation, shared experts, aux_loss_coef, z_loss_coef[, capacity_factor])
CASES = [
    ("softmax", 2, "swiglu", 0, 0.0, 0.0),
    ("softmax", 1, "relu2", 1, 0.0, 0.0),
    ("sigmoid", 2, "relu2", 1, 0.1, 0.0),
    ("softmax", 2, "swiglu", 0, 0.1, 0.01),
    # Token dropping: megatron-core's router drops over each rank's capacity as the one-process layer does.
    ("sigmoid", 2, "relu2", 0, 0.1, 0.0, 0.5),
]


@pytest.fixture(scope="module")
def results():
    return run_distributed(ew.ep_parity, 2, 1, CASES, ep=2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_ep2_equals_one_process(results, case):
    for rank, per_rank in enumerate(results):
        got = per_rank[case]
        assert got["same_init"], "init_weights must draw the one-process layer's numbers"
        assert got["local_experts"] == (2 * rank, 2)
        names = {"out", "x", "router.weight", "experts.fc1", "experts.fc2"}
        if len(case) > 6:
            names.add("eval_out")  # evaluation with a capacity: dropless, as the one-process layer
        if case[3]:
            names |= {"shared_experts.linear_fc1.weight", "shared_experts.linear_fc2.weight"}
        assert set(got["errors"]) == names
        for name, err in got["errors"].items():
            assert err < 1e-6, (rank, name, err)
        if case[4]:
            local, ep = got["stats"]
            assert ep.keys() == local.keys() and abs(ep["moe_aux_loss"] - local["moe_aux_loss"]) < 1e-6
        if len(case) > 6:
            local, ep = got["stats"]
            assert local["moe_dropped"] > 0.1 and ep["moe_dropped"] == local["moe_dropped"], (local, ep)
