"""Expert parallelism (gloo, EP=2): megatron-core's MoE layer with its all-to-all dispatcher, each rank holding half
of the experts, against the one-process MoE layer: fp32 outputs and every gradient within 1e-6 (an expert's gradient
is the sum over ranks of what the one-process layer computes for each rank's tokens), dropless, top-1 and top-2,
softmax and sigmoid routing, with a shared expert, with the load-balancing loss and the router z-loss attached, and
with auxiliary-loss-free balancing biases (counted and moved alike)."""

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
    # Auxiliary-loss-free balancing: biases in the top-k choice, the tokens counted and the biases moved alike.
    ("sigmoid", 2, "relu2", 1, 0.0, 0.0, None, 0.1),
]


@pytest.fixture(scope="module")
def results():
    return run_distributed(ew.ep_parity, 2, 1, CASES, ep=2)


@pytest.fixture(scope="module")
def results_cp2():
    """The same cases at CP = EP = 2: the two ranks holding slices of the same sequences split the experts."""
    return run_distributed(ew.ep_parity, 2, 1, CASES, cp=2, ep=2)


@pytest.fixture(scope="module")
def results_tp2():
    """The same cases at TP = EP = 2 with sequence parallelism: the two ranks of the TP group split the experts."""
    return run_distributed(ew.ep_parity, 2, 2, CASES, ep=2)


def _check_parity(results, case):
    for rank, per_rank in enumerate(results):
        got = per_rank[case]
        assert got["same_init"], "init_weights must draw the one-process layer's numbers"
        assert got["local_experts"] == (2 * rank, 2)
        names = {"out", "x", "router.weight", "experts.fc1", "experts.fc2"}
        capacity = len(case) > 6 and case[6] is not None
        if capacity:
            names.add("eval_out")  # evaluation with a capacity: dropless, as the one-process layer
        if len(case) > 7:
            names |= {"step_tokens", "expert_bias"}
        if case[3]:
            names |= {"shared_experts.linear_fc1.weight", "shared_experts.linear_fc2.weight"}
        assert set(got["errors"]) == names
        for name, err in got["errors"].items():
            assert err < 1e-6, (rank, name, err)
        if case[4]:
            local, ep = got["stats"]
            assert ep.keys() == local.keys() and abs(ep["moe_aux_loss"] - local["moe_aux_loss"]) < 1e-6
        if capacity:
            local, ep = got["stats"]
            assert local["moe_dropped"] > 0.1 and ep["moe_dropped"] == local["moe_dropped"], (local, ep)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_ep2_equals_one_process(results, case):
    _check_parity(results, case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_ep2_cp2_equals_one_process_under_context_parallel(results_cp2, case):
    """EP over the CP group: each rank routes its slice; megatron-core's losses (its share of the load-balancing
    loss, the z-loss divided by CP) are scaled by CP as ours are, so outputs, gradients and metrics match."""
    _check_parity(results_cp2, case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_ep2_tp2_equals_one_process_under_sequence_parallel(results_tp2, case):
    """EP = TP = 2: each rank routes its block of the sequence and the experts are split over the TP group; outputs,
    gradients (router and shared experts summed over TP, experts over the group's tokens) and metrics as the
    one-process layer's under the same sequence parallelism."""
    _check_parity(results_tp2, case)


TRAIN_STAGES = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def trained():
    """The same Mamba2 + MoE LM trained by DeepSpeed on two processes at EP=1 (every expert on both data-parallel
    ranks) and at EP=2 (each rank holds two of the four experts), for each ZeRO stage."""
    return run_distributed(ew.ep_training, 2, 1, TRAIN_STAGES, 1, ep=1), run_distributed(
        ew.ep_training, 2, 1, TRAIN_STAGES, 2, ep=2
    )


@pytest.mark.parametrize("stage", TRAIN_STAGES)
def test_ep2_training_equals_ep1(trained, stage):
    """Per step: the mean loss and DeepSpeed's clipping norm (clipping is on every step) within 1e-6; after four AdamW
    steps every weight within 1e-5 (the experts gathered over the EP ranks). The remaining difference is the order of
    one sum: an expert's gradient adds the two ranks' tokens inside one product under EP, after it at EP=1."""
    _check_training(trained[0][0][stage], trained[1][0][stage], stage)
    # Both runs trained (the comparison is not between two untouched initialisations).
    first = ew.ep_initial_params()
    moved = max(((trained[0][0][stage]["params"][n] - v).abs().max()).item() for n, v in first.items())
    assert moved > 1e-3


TP_STAGES = [1, 3]


@pytest.fixture(scope="module")
def trained_tp2():
    """The same LM at TP = 2 with sequence parallelism on two processes: EP 1 (every expert on both TP ranks) and
    EP 2 (the TP group splits the experts), ZeRO 1 and 3."""
    return run_distributed(ew.ep_training, 2, 2, TP_STAGES, 1, ep=1), run_distributed(
        ew.ep_training, 2, 2, TP_STAGES, 2, ep=2
    )


@pytest.mark.parametrize("stage", TP_STAGES)
def test_ep2_tp2_training_equals_ep1_tp2(trained_tp2, stage):
    """EP = TP = 2 trains as TP = 2 does with every expert on both ranks (same checks as at TP 1, each rank's TP
    block compared)."""
    for rank in range(2):
        _check_training(trained_tp2[0][rank][stage], trained_tp2[1][rank][stage], stage)
    losses = trained_tp2[0][0][stage]["losses"]
    assert losses[-1] < losses[0] - 1e-3, losses  # it trained


def _check_training(ep1, ep2, stage):
    for a, b in zip(ep1["losses"], ep2["losses"]):
        assert abs(a - b) <= 1e-6 * abs(a), (ep1["losses"], ep2["losses"])
    if stage > 0:  # DeepSpeed reports the norm under ZeRO only
        for a, b in zip(ep1["norms"], ep2["norms"]):
            assert a > 0.05 and abs(a - b) <= 1e-6 * a, (ep1["norms"], ep2["norms"])
    assert ep1["params"].keys() == ep2["params"].keys()
    assert ep2["params"]["layers.1.mixer.experts.fc1"].shape[0] == 4
    for name, value in ep1["params"].items():
        err = ((ep2["params"][name] - value).abs().max() / value.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-5, (stage, name, err)
