"""A Mamba2 + MoE hybrid through the trainer on two data-parallel processes (ZeRO 1), with a capacity: the
load-balancing loss, the experts' load and the dropped share reach metrics.jsonl, and a resumed run continues
bit-exactly; under context parallelism (dropless) it trains like CP=1."""

from __future__ import annotations

import json

import torch

from tests.train.conftest import TINY, copy_checkpoint, losses, run_train

MOE = [
    "model.hybrid_pattern=ME", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.hidden=48",
    "model.moe.shared_experts=1", "model.moe.aux_loss_coef=0.01", "parallel.zero_stage=1", "train.save_every=2",
    "train.grad_accum=2",
]  # fmt: skip


def test_moe_hybrid_trains_logs_its_load_and_resumes_bit_exactly(tiny_data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = [*TINY, *tiny_data, *MOE, "model.moe.capacity_factor=1.0"]  # and tokens dropped over capacity
    run_train(2, [*common, "train.max_steps=4", f"train.out_dir={full}"])
    reference = losses(full)
    assert sorted(reference) == [1, 2, 3, 4] and reference[4] < reference[1]
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "step" in r]
    for r in steps:
        # Without its coefficient the Switch loss is 1 when balanced and at most num_experts / top_k = 2.
        assert 0.5 < r["moe_aux_loss"] <= 2.0, r
        assert 0 <= r["moe_load_min"] <= 0.25 <= r["moe_load_max"] <= 1, r
        assert 0 <= r["moe_dropped"] < 0.5, r
    copy_checkpoint(full, 2, cut)
    run_train(2, [*common, "train.max_steps=4", f"train.out_dir={cut}"])
    resumed = losses(cut)
    assert {s: resumed[s] for s in (3, 4)} == {s: reference[s] for s in (3, 4)}


def test_expert_parallel_training_equals_ep1_resumes_and_exports(tiny_data, tmp_path):
    """parallel.ep=2 on two processes (each holds 2 of the 4 experts; ZeRO 1, fp32, clipping on, dropless): the
    losses equal the EP=1 run's on the same two data-parallel ranks, a resumed run continues bit-exactly, and the
    checkpoint consolidates to the EP=1 run's weights (the experts gathered over the EP ranks)."""
    from mambatron.train.checkpoint import load_full_model_state

    common = [*TINY, *tiny_data, *MOE, "train.max_steps=4", "optim.grad_clip=0.05"]
    ep1, ep2, cut = tmp_path / "ep1", tmp_path / "ep2", tmp_path / "cut"
    run_train(2, [*common, f"train.out_dir={ep1}"])
    out = run_train(2, [*common, "parallel.ep=2", f"train.out_dir={ep2}"])
    assert "EP 2" in out.stdout
    want, got = losses(ep1), losses(ep2)
    assert sorted(got) == [1, 2, 3, 4] and got[4] < got[1]
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])
    step_dir = ep2 / "checkpoints" / "step_0000004"
    assert sorted(p.name for p in step_dir.glob("mp_rank_*_model_states.pt")) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt",
    ]  # fmt: skip
    full1, _ = load_full_model_state(ep1)
    full2, config = load_full_model_state(ep2)
    assert config.parallel.ep == 2 and full1.keys() == full2.keys()
    assert full2["layers.1.mixer.experts.fc1"].shape[0] == 4
    for name, value in full1.items():
        err = ((full2[name] - value).abs().max() / value.abs().max().clamp_min(1e-12)).item()
        # Four Adam steps amplify the last-bit differences of the two summation orders (the experts' gradients
        # sum the two ranks' tokens inside one product under EP, after it at EP=1).
        assert err < 1e-5, (name, err)
    copy_checkpoint(ep2, 2, cut)
    run_train(2, [*common, "parallel.ep=2", f"train.out_dir={cut}"])
    resumed = losses(cut)
    assert {s: resumed[s] for s in (3, 4)} == {s: got[s] for s in (3, 4)}


def test_expert_parallel_checkpoint_resumes_on_other_ep_sizes(tiny_data, tmp_path):
    """A checkpoint saved at EP=2 resumes at EP=1 (ZeRO 2) and one saved at EP=1 at EP=2 (ZeRO 3): every weight and
    Adam moment is merged over the EP ranks and cut again, so the resumed losses stay within summation-order noise of
    the uninterrupted run's, and the resumed run's consolidated weights match it. A full model directory seeds an
    EP=2 run (``train.init_from``) with each rank's share of its experts."""
    from mambatron.hf import save_model_dir
    from mambatron.train.checkpoint import load_full_model_state

    common = [*TINY, *tiny_data, *MOE, "train.max_steps=4", "train.save_every=2"]
    run_train(2, [*common, "parallel.ep=2", f"train.out_dir={tmp_path / 'ep2'}"])
    run_train(2, [*common, f"train.out_dir={tmp_path / 'ep1'}"])
    for src, target in (("ep2", ["parallel.zero_stage=2"]), ("ep1", ["parallel.ep=2", "parallel.zero_stage=3"])):
        dst = tmp_path / f"{src}-resumed"
        copy_checkpoint(tmp_path / src, 2, dst)
        out = run_train(2, [*common, *target, f"train.out_dir={dst}"])
        assert "resumed from" in out.stdout, out.stdout[-2000:]
        want, got = losses(tmp_path / src), losses(dst)
        for step in (3, 4):
            assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (src, step, got[step], want[step])
        full_want, config = load_full_model_state(tmp_path / src)
        full_got, _ = load_full_model_state(dst)
        for name, value in full_want.items():
            err = ((full_got[name] - value).abs().max() / value.abs().max().clamp_min(1e-12)).item()
            assert err < 1e-5, (src, name, err)
    # train.init_from at EP=2: each rank takes its share of the experts of a full model directory.
    model_dir = save_model_dir(full_want, config, tmp_path / "model")
    seeded = tmp_path / "seeded"
    out = run_train(2, [*common, "parallel.ep=2", "train.max_steps=1", "optim.lr=1e-12", "optim.min_lr=0",
                        f"train.init_from={model_dir}", f"train.out_dir={seeded}"])  # fmt: skip
    assert f"initial weights from {model_dir}" in out.stdout
    restarted, _ = load_full_model_state(seeded)
    for name, value in full_want.items():
        torch.testing.assert_close(restarted[name], value, rtol=0, atol=1e-6, msg=name)


def test_moe_hybrid_under_context_parallelism_trains_like_cp1(tiny_data, tmp_path):
    """parallel.cp=2: each rank routes its slice's tokens; the losses (the load-balancing loss's gradient moves the
    router, so a wrong share would change them from step 2 on) and the MoE metrics equal the CP=1 run's, also with the
    experts split over the CP group (parallel.ep=2)."""
    common = [*TINY, *tiny_data, *MOE, "model.moe.aux_loss_coef=0.5", "train.max_steps=4", "train.save_every=0"]
    run_train(0, [*common, f"train.out_dir={tmp_path / 'cp1'}"])
    out = run_train(2, [*common, "parallel.cp=2", f"train.out_dir={tmp_path / 'cp2'}"])
    assert "CP 2" in out.stdout
    _same_losses_and_metrics(tmp_path / "cp2", tmp_path / "cp1", [1, 2, 3, 4])
    # With the experts split over the CP group (EP 2, ZeRO 1) too.
    out = run_train(2, [*common, "parallel.cp=2", "parallel.ep=2", f"train.out_dir={tmp_path / 'cp2ep2'}"])
    assert "CP 2 x DP 1 (EP 2 within DP x CP)" in out.stdout
    _same_losses_and_metrics(tmp_path / "cp2ep2", tmp_path / "cp1", [1, 2, 3, 4])


def test_expert_parallel_over_the_tp_group_trains_resumes_and_exports(tiny_data, tmp_path):
    """parallel.ep=2 with parallel.tp=2 and sequence parallelism on two processes (the TP group splits the experts,
    dropless): the losses and MoE metrics equal the one-process run's, the checkpoint consolidates to its weights,
    a resumed run continues bit-exactly, and one resumed at EP 1 (same TP) continues as the uninterrupted run."""
    from mambatron.train.checkpoint import load_full_model_state

    common = [*TINY, *tiny_data, *MOE, "train.max_steps=4"]
    one, eptp, cut = tmp_path / "one", tmp_path / "eptp", tmp_path / "cut"
    layout = ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2"]
    run_train(0, [*common, f"train.out_dir={one}"])
    out = run_train(2, [*common, *layout, f"train.out_dir={eptp}"])
    assert "TP 2 (EP 2 over it) x DP 1" in out.stdout
    _same_losses_and_metrics(eptp, one, [1, 2, 3, 4])
    full1, _ = load_full_model_state(one)
    full2, config = load_full_model_state(eptp)
    assert (config.parallel.tp, config.parallel.ep) == (2, 2) and full1.keys() == full2.keys()
    for name, value in full1.items():
        err = ((full2[name] - value).abs().max() / value.abs().max().clamp_min(1e-12)).item()
        # Four Adam steps amplify the last-bit differences of the summation orders (an expert's gradient adds the
        # two ranks' blocks of the sequence inside one product here, over the whole sequence in the other run).
        assert err < 5e-5, (name, err)
    copy_checkpoint(eptp, 2, cut)
    run_train(2, [*common, *layout, f"train.out_dir={cut}"])
    resumed, got = losses(cut), losses(eptp)
    assert {s: resumed[s] for s in (3, 4)} == {s: got[s] for s in (3, 4)}
    # Resharded to TP 2 with every expert on both ranks (EP 1): the stacks are merged over the TP group and kept whole.
    copy_checkpoint(eptp, 2, tmp_path / "ep1")
    run_train(2, [*common, *layout[:2], f"train.out_dir={tmp_path / 'ep1'}"])
    resharded = losses(tmp_path / "ep1")
    for step in (3, 4):
        assert abs(resharded[step] - got[step]) <= 1e-5 * abs(got[step]), (step, resharded, got)


def _same_losses_and_metrics(run_dir, ref_dir, steps) -> None:
    """Both runs logged ``steps``, with the same losses and MoE metrics (relative 1e-5)."""
    got, ref = losses(run_dir), losses(ref_dir)
    assert sorted(got) == sorted(ref) == steps
    metrics = {}
    for run in (run_dir, ref_dir):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        metrics[run] = {r["step"]: r for r in lines if "moe_aux_loss" in r}
    for step in steps:
        assert abs(got[step] - ref[step]) <= 1e-5 * abs(ref[step]), (step, got, ref)
        for key in ("moe_aux_loss", "moe_load_min", "moe_load_max"):
            a, b = metrics[run_dir][step][key], metrics[ref_dir][step][key]
            assert abs(a - b) <= 1e-5 * abs(b), (step, key, a, b)


def test_balancing_biases_move_and_resume_on_another_layout(tiny_data, tmp_path):
    """model.moe.bias_update_rate: the E layers' biases move by the rate after every step (all ranks' counts), are
    saved with the checkpoint and restored exactly, also when a DP=2 checkpoint resumes on DP=1 (grad_accum 4, the
    same global batch): the resumed run ends with the uninterrupted run's biases and losses; at EP=2 the run trains
    as at EP=1."""
    from mambatron.config import load_config
    from mambatron.parallel.consolidate import consolidate_zero_checkpoint

    common = [*TINY, *tiny_data, *MOE, "model.moe.router=sigmoid", "model.moe.bias_update_rate=0.1",
              "train.max_steps=4", "train.keep_last=9"]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_train(2, [*common, f"train.out_dir={full}"])
    cfg = load_config("configs/tiny.yaml", [*common, f"train.out_dir={full}"]).model

    def biases(run_dir):
        state = consolidate_zero_checkpoint(str(run_dir / "checkpoints"), cfg, tag="step_0000004")
        return {k: v for k, v in state.items() if k.endswith("expert_bias")}

    want = biases(full)
    assert len(want) == 1 and all(v.abs().max() > 0 for v in want.values())
    for v in want.values():  # four steps of +-0.1 (or 0 at the mean)
        assert torch.allclose(v, (v / 0.1).round() * 0.1, atol=1e-6) and v.abs().max() <= 0.4 + 1e-6
    copy_checkpoint(full, 2, cut)
    out = run_train(0, [*common, "train.grad_accum=4", f"train.out_dir={cut}"])
    assert "resumed from" in out.stdout
    got = biases(cut)
    assert all(torch.equal(got[k], want[k]) for k in want), (got, want)
    ref, resumed = losses(full), losses(cut)
    for step in (3, 4):
        assert abs(resumed[step] - ref[step]) <= 1e-5 * abs(ref[step]), (step, resumed, ref)
    # Under expert parallelism (EP 2 on the same two ranks) the biases move alike and the losses follow.
    ep2 = tmp_path / "ep2"
    run_train(2, [*common, "parallel.ep=2", f"train.out_dir={ep2}"])
    got = biases(ep2)
    assert all(torch.equal(got[k], want[k]) for k in want), (got, want)
    for step, value in losses(ep2).items():
        assert abs(value - ref[step]) <= 1e-5 * abs(ref[step]), (step, value, ref[step])


def test_moe_hybrid_under_tensor_and_sequence_parallelism_trains_like_one_process(tiny_data, tmp_path):
    """parallel.tp=2 with sequence parallelism: the E layer is replicated over TP and routes each rank's block of
    the sequence; the losses and the MoE metrics equal the one-process run's."""
    common = [*TINY, *tiny_data, *MOE, "model.moe.aux_loss_coef=0.5", "train.max_steps=3", "train.save_every=0"]
    run_train(0, [*common, f"train.out_dir={tmp_path / 'tp1'}"])
    out = run_train(
        2, [*common, "parallel.tp=2", "parallel.sequence_parallel=true", f"train.out_dir={tmp_path / 'tp2'}"]
    )
    assert "TP 2" in out.stdout
    _same_losses_and_metrics(tmp_path / "tp2", tmp_path / "tp1", [1, 2, 3])
