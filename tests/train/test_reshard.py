"""Resume checkpoints on other layouts (DP, TP, ZeRO stage, precision): the loaded state equals the saved one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mambatron.data import merge_states
from mambatron.train import checkpoint as ckpt
from tests.train.conftest import REPO, TINY, copy_checkpoint, losses, run_train, train_cmd, train_env


def probe(mode: str, report: Path, nproc: int, overrides: list[str]) -> None:
    """reshard_probe.py in ``mode`` on ``nproc`` processes (plain python for 0)."""
    launch = [sys.executable]
    if nproc:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*launch, "tests/train/reshard_probe.py", mode, str(report), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def resume_elsewhere(src: Path, tmp_path: Path, saved: tuple[int, list[str]], targets: dict[str, tuple[int, list[str]]],
                     steps: int) -> dict[str, list[dict]]:  # fmt: skip
    """The newest checkpoint of run ``src``: its state as DeepSpeed loads it on the saved layout (``saved``: nproc
    and overrides) is the oracle, dumped once; resumed on each layout of ``targets`` (name: nproc and overrides),
    every rank's weights, module weights, moments and optimizer step must equal the oracle's re-split for it.
    Returns each target's per-rank reports."""
    oracle = tmp_path / "oracle"
    oracle.mkdir()
    shutil.copytree(ckpt.checkpoint_root(src), ckpt.checkpoint_root(tmp_path / "dump"))
    nproc, overrides = saved
    probe("dump", oracle, nproc, [*overrides, f"train.out_dir={tmp_path / 'dump'}", f"train.max_steps={steps + 2}"])
    results = {}
    for name, (nproc, overrides) in targets.items():
        report, run_dir = tmp_path / f"report_{name}", tmp_path / f"check_{name}"
        shutil.copytree(oracle, report)
        shutil.copytree(ckpt.checkpoint_root(src), ckpt.checkpoint_root(run_dir))
        probe("check", report, nproc, [*overrides, f"train.out_dir={run_dir}", f"train.max_steps={steps + 2}"])
        reports = [json.loads(p.read_text()) for p in sorted(report.glob("rank_*.json"))]
        assert len(reports) == max(nproc, 1), name
        for r in reports:
            assert r["mismatches"] == [], (name, r["mismatches"][:10])
            assert r["finite"] and r["step"] == steps + 2, name
        results[name] = reports
    return results


def test_resume_on_another_layout(ref_run, tmp_path):
    """The 2-process (DP 2) reference run's step-20 checkpoint resumes exactly on 1 process and on TP 2."""
    ref_dir, overrides = ref_run
    layouts = {"dp1": (1, 1), "tp2": (2, 2)}
    targets = {name: (nproc, [*overrides, f"parallel.tp={tp}"]) for name, (nproc, tp) in layouts.items()}
    results = resume_elsewhere(ref_dir, tmp_path, (2, overrides), targets, 20)
    for name, (nproc, tp) in layouts.items():
        for r in results[name]:
            assert (r["tp"], r["dp"]) == (tp, nproc // tp)
            # The global batch differs on a new layout, so the loss is not the reference's, but it continues from a
            # trained model, not from scratch (~5.6 at init).
            assert abs(r["losses"][0] - losses(ref_dir)[20]) < 0.5


# Saved layout (nproc, overrides) -> the layouts (nproc, overrides) it resumes on: ZeRO stages, precisions and TP
# sizes the same-layout path cannot load into each other.
CROSS = {
    "zero3-dp2": ((2, ["parallel.zero_stage=3"]), {
        "zero1-dp1": (1, ["parallel.zero_stage=1"]),
        "zero1-tp2": (2, ["parallel.zero_stage=1", "parallel.tp=2"]),
    }),
    "zero1-dp2": ((2, ["parallel.zero_stage=1"]), {"zero3-dp2": (2, ["parallel.zero_stage=3"])}),
    "bf16-zero1-dp2": ((2, ["parallel.zero_stage=1", "train.precision=bf16"]), {
        "bf16-zero3-dp2": (2, ["parallel.zero_stage=3", "train.precision=bf16"]),
    }),
    "fp32-zero0": ((0, ["parallel.zero_stage=0"]), {
        "zero0-tp2": (2, ["parallel.zero_stage=0", "parallel.tp=2"]),
        "zero1": (0, ["parallel.zero_stage=1"]),
    }),
    # bf16 without ZeRO: DeepSpeed's fp16-style optimizer, fp32 masters flat per group, on either side.
    "bf16-zero0": ((0, ["parallel.zero_stage=0", "train.precision=bf16"]), {
        "bf16-zero1-dp2": (2, ["parallel.zero_stage=1", "train.precision=bf16"]),
    }),
    # (bf16 without ZeRO at TP > 1 is refused by the config: DeepSpeed clips it by a wrong gradient norm.)
    "bf16-zero1-tp2": ((2, ["parallel.zero_stage=1", "train.precision=bf16", "parallel.tp=2"]), {
        "bf16-zero0-dp2": (2, ["parallel.zero_stage=0", "train.precision=bf16"]),
    }),
}  # fmt: skip


@pytest.mark.parametrize("saved", list(CROSS))
def test_resume_across_zero_stages_and_precisions(tiny_data, tmp_path, saved):
    """A 2-step run saved on one layout resumes exactly on others: weights, moments and step equal the saved run's
    (as DeepSpeed loads them on the saved layout), then it trains on."""
    (saved_n, saved_o), targets = CROSS[saved]
    common = [*TINY, *tiny_data, "train.max_steps=2"]
    src = tmp_path / "src"
    run_train(saved_n, [*common, *saved_o, f"train.out_dir={src}"])
    targets = {name: (n, [*common, *o]) for name, (n, o) in targets.items()}
    resume_elsewhere(src, tmp_path, (saved_n, [*common, *saved_o]), targets, 2)


def test_tensor_parallel_run_matches_single_process(tiny_data, tmp_path):
    """A TP=2 run (CLI, meta-device build, vocab-parallel loss, eval) starts exactly like the TP=1 model and follows
    the same loss curve up to float reduction order."""
    common = [*TINY, *tiny_data, "train.max_steps=4", "train.eval_every=4", "train.eval_steps=2"]
    run_train(1, [*common, f"train.out_dir={tmp_path / 'tp1'}"])
    run_train(2, [*common, f"train.out_dir={tmp_path / 'tp2'}", "parallel.tp=2"])
    tp1, tp2 = losses(tmp_path / "tp1"), losses(tmp_path / "tp2")
    assert sorted(tp2) == [1, 2, 3, 4]
    for step in tp1:
        assert tp2[step] == pytest.approx(tp1[step], abs=1e-5), (step, tp1, tp2)
    val = [json.loads(x) for x in (tmp_path / "tp2" / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert len(val) == 1 and val[0]["step"] == 4


def test_the_data_position_survives_a_data_parallel_change(tiny_data, tmp_path):
    """data.streams=4: a DP=2 run's step-6 checkpoint (12 micro-batches consumed) resumed on DP=1 for 6 steps and on
    DP=4 for 2 steps ends with the stream positions of the uninterrupted DP=2 run at the same global count (its steps
    9 and 10): the global data sequence went on as if uninterrupted, without the restart warning."""
    common = [*TINY, *tiny_data, "parallel.zero_stage=1", "data.streams=4", "train.save_every=3", "train.keep_last=9"]
    ref = tmp_path / "ref"
    run_train(2, [*common, f"train.out_dir={ref}", "train.max_steps=10"])

    def position(run_dir, step):
        manifest = ckpt.read_manifest(ckpt.checkpoint_root(run_dir) / ckpt.step_dir_name(step))
        return merge_states(list(manifest["data"].values()))

    assert position(ref, 6)["consumed"] == 12
    for nproc, max_steps, same_as in ((1, 12, 9), (4, 8, 10)):
        run_dir = tmp_path / f"dp{nproc}"
        copy_checkpoint(ref, 6, run_dir)
        out = run_train(nproc, [*common, f"train.out_dir={run_dir}", f"train.max_steps={max_steps}"])
        assert "restart" not in out.stderr and "resumed from" in out.stdout
        got, want = position(run_dir, max_steps), position(ref, same_as)
        assert got["consumed"] == want["consumed"] == 12 + (max_steps - 6) * nproc
        assert got["streams"] == want["streams"], nproc


def test_a_failed_conversion_is_one_line_and_leaves_the_checkpoint(tiny_data, tmp_path):
    """When the conversion for another layout fails (here its work folder cannot be created: a file holds the name),
    the run stops with one line naming the checkpoint and the way out (exit 2), and the checkpoint is untouched."""
    common = [*TINY, *tiny_data, f"train.out_dir={tmp_path}"]
    run_train(0, [*common, "train.max_steps=1", "parallel.zero_stage=1"])
    step_dir = ckpt.latest_checkpoint(tmp_path)
    (step_dir.parent / f".reshard_{step_dir.name}").write_text("in the way")
    before = {p.name: p.stat().st_size for p in step_dir.iterdir()}
    proc = subprocess.run(train_cmd(0, [*common, "train.max_steps=2", "parallel.zero_stage=3"]), cwd=REPO,
                          env=train_env(), capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("checkpoint error:")]
    assert len(lines) == 1 and "for another layout failed" in lines[0] and "layout it was saved with" in lines[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert {p.name: p.stat().st_size for p in step_dir.iterdir()} == before
    assert ckpt.latest_checkpoint(tmp_path) == step_dir
