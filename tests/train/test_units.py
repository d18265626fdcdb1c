"""Fast in-process tests: LR schedules, the planner and --dry-run, checkpoint bookkeeping, metrics, plot_loss."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mambatron.config import WandbConfig, load_config
from mambatron.models import build_model
from mambatron.plan import activation_bytes_per_layer, count_params, make_plan, world_size_from_env
from mambatron.train import checkpoint as ckpt
from mambatron.train import signals
from mambatron.train.__main__ import main as train_main
from mambatron.train.metrics import MetricsLogger, Throughput
from mambatron.train.schedule import LRSchedule
from mambatron.train.trainer import EXIT_OK, EXIT_PREEMPTED, StepResult, Trainer


def test_schedules():
    cos = LRSchedule("cosine", lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert cos.lr_at(0) == pytest.approx(0.1) and cos.lr_at(9) == pytest.approx(1.0)
    assert cos.lr_at(10) == pytest.approx(1.0) and cos.lr_at(109) == pytest.approx(0.1)
    assert cos.lr_at(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 50 / 99)))
    wsd = LRSchedule("wsd", lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=100, decay_frac=0.2)
    assert wsd.lr_at(50) == 1.0 and wsd.lr_at(79) == 1.0
    assert wsd.lr_at(80) == pytest.approx(1 - 1 / 20) and wsd.lr_at(99) == pytest.approx(0.0)
    assert LRSchedule("constant", 0.5, 0.0, 0, 10).lr_at(7) == 0.5
    lrs = [cos.lr_at(s) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_schedule_change_since_checkpoint():
    saved = LRSchedule("cosine", lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert saved.change_since(saved.state_dict(), 110) is None
    raised = LRSchedule("cosine", lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=210)  # train.max_steps raised
    note = raised.change_since(saved.state_dict(), 110)
    now = 0.1 + 0.45 * (1 + math.cos(math.pi * 100 / 199))  # back up the stretched cosine
    assert "max_steps 110 -> 210" in note and f"lr at step 110 is now {now:.3e} (was 1.000e-01)" in note


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.arch=mamba1", "model.d_model=64", "model.n_layer=3"],
        ["model.arch=mamba2", "model.d_model=64", "model.n_layer=2", "model.headdim=16", "model.ngroups=2"],
        ["model.arch=mamba1", "model.d_model=64", "model.n_layer=2", "model.tie_embeddings=false", "model.bias=true"],
    ],
)
def test_param_count_matches_model(overrides):
    cfg = load_config("configs/tiny.yaml", overrides)
    model = build_model(cfg.model)
    assert count_params(cfg.model).total == sum(p.numel() for p in model.parameters())


def test_plan_zero_stages_and_fit_warning():
    cfg = load_config("configs/mamba1-7b.yaml")
    plans = {s: make_plan(load_config("configs/mamba1-7b.yaml", [f"parallel.zero_stage={s}"]), 8) for s in range(4)}
    assert plans[0].optimizer_bytes == 8 * plans[1].optimizer_bytes
    # bf16: fp32 master weights + fp32 gradients + two Adam moments, as DeepSpeed allocates them.
    assert plans[1].optimizer_bytes == plans[1].params_per_gpu * 16 // 8
    fp32 = {s: make_plan(load_config("configs/mamba1-7b.yaml", ["train.precision=fp32", f"parallel.zero_stage={s}"]), 8)
            for s in (0, 1)}  # fmt: skip
    assert fp32[0].optimizer_bytes == fp32[0].params_per_gpu * 8  # torch AdamW on the fp32 parameters themselves
    assert fp32[1].optimizer_bytes == fp32[1].params_per_gpu * 16 // 8  # ZeRO clones fp32 master weights
    assert plans[2].grads_bytes * 8 == plans[1].grads_bytes
    assert plans[3].weights_bytes * 8 == plans[2].weights_bytes
    p = make_plan(cfg, 16)
    assert 6.5e9 < p.params_total < 7.5e9 and p.dp == 16
    assert p.tokens_per_step == cfg.data.micro_batch * cfg.data.seq_len * 16
    assert p.activations_bytes_ckpt < p.activations_bytes_no_ckpt
    # DeepSpeed's reduction buckets: 5e8 bf16 elements, double-buffered under ZeRO-1/2, single under ZeRO-3.
    assert [plans[s].buckets_bytes for s in range(4)] == [0, 2 * 10**9, 2 * 10**9, 10**9]
    smaller = ["parallel.zero_stage=1", "parallel.deepspeed_extra.zero_optimization.reduce_bucket_size=100000000"]
    assert make_plan(load_config("configs/mamba1-7b.yaml", smaller), 8).buckets_bytes == 4 * 10**8
    # Checkpointing keeps every block's inputs: the bf16 output of the block before and the fp32 residual.
    tokens, m = cfg.data.micro_batch * cfg.data.seq_len, cfg.model
    one_block = activation_bytes_per_layer(m, tokens, 1, False, 2)
    assert p.activations_bytes_ckpt - p.logits_bytes == m.n_layer * tokens * (2 + 4) * m.d_model + one_block
    offload = make_plan(load_config("configs/mamba1-7b.yaml", ["parallel.offload_optimizer=true"]), 16)
    assert offload.optimizer_bytes == 0 and offload.optimizer_cpu_bytes == p.optimizer_bytes
    big = make_plan(load_config("configs/mamba1-7b.yaml", ["parallel.zero_stage=0", "data.micro_batch=16"]), 1)
    assert not big.fits and any("exceeds the 80 GiB of a GPU" in w for w in big.warnings)
    assert world_size_from_env({"WORLD_SIZE": "8"}) == 8
    assert world_size_from_env({"SLURM_NNODES": "4", "MAMBATRON_NPROC_PER_NODE": "8"}) == 32
    assert world_size_from_env({}) == 1


def test_plan_chunked_head_loss_and_context_parallel():
    """At TP=1 the head's loss holds one chunk of logits, not all of them; under CP each rank keeps the activations
    of its slice, ZeRO partitions over DP x CP, and the exchanged bytes are counted per layer kind."""
    from mambatron.kernels.cross_entropy.api import default_chunk_rows
    from mambatron.plan import format_plan

    base = ["data.seq_len=32768", "data.micro_batch=1", "parallel.zero_stage=1"]
    cfg = load_config("configs/mamba2-1.3b.yaml", base)
    one = make_plan(cfg, 8)
    vocab, d = cfg.model.padded_vocab_size, cfg.model.d_model
    assert one.logits_bytes == default_chunk_rows(vocab) * vocab * (2 + 4) + vocab * d * 4
    cp = make_plan(load_config("configs/mamba2-1.3b.yaml", [*base, "parallel.cp=4"]), 8)
    assert (cp.tp, cp.cp, cp.dp) == (1, 4, 2) and cp.tokens_per_step == 32768 * 2
    assert cp.activations_bytes_no_ckpt - cp.logits_bytes == (one.activations_bytes_no_ckpt - one.logits_bytes) // 4
    assert cp.optimizer_bytes == one.optimizer_bytes  # 8 replicas either way: DP 8, or DP 2 x CP 4
    m = cfg.model
    per_layer = 4 * (3 * (m.d_inner + 2 * m.ngroups * m.d_state) * 2 + m.nheads * (m.headdim * m.d_state + 1) * 4)
    assert cp.cp_exchange_bytes == m.n_layer * per_layer and one.cp_exchange_bytes == 0
    assert "(TP 1 x CP 4 x DP 2)" in format_plan(cp, cfg) and "8192 tokens per slice" in format_plan(cp, cfg)


def test_dry_run_applies_the_layout_checks_and_plans_for_the_gpu(capsys, monkeypatch):
    """--dry-run refuses a layout the real run would refuse (one line, exit 2), plans for --gpu-memory, and a plan
    that does not fit on one GPU suggests planning for more with --world-size."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    for args in (["--set", "parallel.tp=3"], ["--set", "parallel.tp=2", "--world-size", "3"]):
        assert train_main(["--config", "configs/tiny.yaml", *args, "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("config error: "), err
        assert "does not divide nheads=8" in err[0] or "WORLD_SIZE=3 is not a multiple of parallel.tp=2" in err[0]
    assert train_main(["--config", "configs/mamba1-7b.yaml", "--dry-run", "--gpu-memory", "141"]) == 0
    out = capsys.readouterr().out
    assert "of 141 GiB -> fits" in out, out
    assert train_main(["--config", "configs/mamba1-7b.yaml", "--dry-run", "--gpu-memory", "40"]) == 0
    out = capsys.readouterr().out
    assert "exceeds the 40 GiB of a GPU (train.gpu_memory_gb)" in out and "--world-size N" in out, out


def test_dry_run_cli(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert train_main(["--config", "configs/mamba1-7b.yaml", "--dry-run", "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "world size      64" in out and "FLOPs per token" in out
    assert train_main(["--config", "configs/tiny.yaml", "--set", "parallel.tp=2", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tp"] == 2
    assert train_main(["--config", "configs/tiny.yaml", "--set", "train.nope=1", "--dry-run"]) == 2


def _fake_checkpoint(root: Path, step: int, status: str = "complete") -> Path:
    d = root / ckpt.step_dir_name(step)
    d.mkdir(parents=True)
    (d / ckpt.MANIFEST).write_text(json.dumps({"step": step, "status": status}))
    return d


def test_checkpoint_listing_ignores_torn_writes(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    for s in (10, 20, 30):
        _fake_checkpoint(root, s)
    _fake_checkpoint(root, 40, status="writing")  # manifest written but not marked complete
    (root / "step_0000050").mkdir()  # no manifest at all
    (root / ".tmp_step_0000060").mkdir()  # still being written
    (root / "step_0000070").mkdir()
    (root / "step_0000070" / ckpt.MANIFEST).write_text('{"status": "compl')  # truncated manifest
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000010", "step_0000020", "step_0000030"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000030"
    assert ckpt.resolve_checkpoint(tmp_path) == root / "step_0000030"
    assert ckpt.resolve_checkpoint(root) == root / "step_0000030"
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_checkpoint(root / "step_0000040")
    ckpt._prune(root, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000020", "step_0000030"]
    assert (root / "step_0000040").exists()  # pruning only touches complete checkpoints...
    assert not (root / ".tmp_step_0000060").exists()  # ...and the temporary directories of saves that died


def test_metrics_jsonl_and_offline_wandb(tmp_path):
    import tools.plot_loss as plot_loss

    cfg = load_config("configs/tiny.yaml")
    logger = MetricsLogger(tmp_path, True, cfg.to_dict(), WandbConfig(mode="offline", project="t"), 10)
    for step in (1, 2, 2):  # a resumed run appends a step again; the last record wins when read
        rec = dict(step=step, loss=5.0 - step, lr=1e-3, grad_norm=1.0, tokens=64 * step, tokens_per_s=1.0,
                   mfu=0.0, step_seconds=0.1, memory_gib=0.0)  # fmt: skip
        logger.log_step(rec, print_line=True, seconds_per_step=0.1)
    logger.log_eval(2, 3.5)
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"} <= set(lines[0])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "wandb offline run directory missing"
    train, val = plot_loss.read_metrics(tmp_path)
    assert sorted(train) == [1, 2] and val[2]["val_ppl"] == pytest.approx(math.exp(3.5))
    assert plot_loss.main([str(tmp_path), "--out", str(tmp_path / "loss.png"), "--x", "tokens"]) == 0
    assert (tmp_path / "loss.png").stat().st_size > 1000


def _signalled_trainer(monkeypatch, signum: int, max_steps: int) -> tuple[Trainer, list]:
    """A Trainer whose build, steps, saves and requeue are stubs recorded in the returned list; ``signum`` is
    pending from the start."""
    trainer = Trainer(load_config("configs/tiny.yaml", [f"train.max_steps={max_steps}"]))
    calls = []
    monkeypatch.setattr(signals, "install", lambda: None)
    monkeypatch.setattr(signals, "received", lambda: signum)
    trainer.dist = SimpleNamespace(world_size=1, device=torch.device("cpu"))
    trainer.metrics = SimpleNamespace(print=lambda line: None)
    trainer.build = lambda: None
    trainer.resume = lambda: False
    trainer.train_step = lambda: StepResult(step=trainer.step + 1, loss=1.0, lr=1.0, grad_norm=1.0, seconds=0.1)
    trainer._log = lambda result: setattr(trainer, "step", result.step)
    trainer.save = lambda: calls.append(("save", trainer.step))
    trainer.shutdown = lambda: calls.append(("shutdown", trainer.step))
    trainer._request_requeue = lambda: calls.append(("requeue", trainer.step))
    return trainer, calls


@pytest.mark.parametrize("signum, requeues", [(signal.SIGUSR1, 1), (signal.SIGTERM, 0)])
def test_preemption_requeues_once_and_only_after_sigusr1(monkeypatch, signum, requeues):
    """The preempted loop saves and returns; run() requeues after shutdown, once, and never for SIGTERM (scancel)."""
    trainer, calls = _signalled_trainer(monkeypatch, signum, max_steps=5)
    assert trainer.run() == EXIT_PREEMPTED
    assert calls == [("save", 1), ("shutdown", 1)] + [("requeue", 1)] * requeues


def test_signal_during_the_last_step_finishes_the_run(monkeypatch):
    trainer, calls = _signalled_trainer(monkeypatch, signal.SIGUSR1, max_steps=1)
    assert trainer.run() == EXIT_OK
    assert calls == [("save", 1), ("shutdown", 1)]  # saved once, not requeued to resume a finished run


def test_throughput_drops_the_first_step_from_the_window():
    tp = Throughput(flops_per_token=6.0, peak_flops_total=1200.0, window=3)
    assert tp.update(10.0, 100) == (10.0, 0.05)  # the first step alone while there is nothing else
    assert tp.seconds_per_step() == 10.0
    assert tp.update(1.0, 100) == (100.0, 0.5)  # ...then it leaves the window (it would give 200 / 11 s)
    tp.update(2.0, 100)
    tp.update(2.0, 100)
    tp.update(3.0, 100)
    assert tp.seconds_per_step() == pytest.approx(7.0 / 3)  # sliding window of the last 3 steps
    assert tp.eta_seconds_per_step() == pytest.approx(8.0 / 4)  # every step but the first, for a steady ETA


def test_progress_line_leaves_out_gpu_figures_on_cpu(tmp_path):
    import io

    cfg = load_config("configs/tiny.yaml")
    rec = dict(step=3, loss=2.0, lr=1e-3, grad_norm=1.0, tokens=64, tokens_per_s=1000.0, mfu=0.25, step_seconds=0.1,
               memory_gib=12.5)  # fmt: skip
    lines = {}
    for accelerator in (True, False):
        stream = io.StringIO()
        logger = MetricsLogger(tmp_path / str(accelerator), True, cfg.to_dict(), WandbConfig(mode="disabled"), 10,
                               stream=stream, accelerator=accelerator)  # fmt: skip
        logger.log_step(rec, print_line=True, seconds_per_step=2.0)
        lines[accelerator] = stream.getvalue()
    assert "mfu 25.0% | mem 12.5 GiB" in lines[True] and "eta 0m14s" in lines[True]
    assert "mfu" not in lines[False] and "GiB" not in lines[False] and "eta 0m14s" in lines[False]


def test_save_flushes_every_file_before_the_manifest(tmp_path, monkeypatch):
    """The shards and rank files reach the disk before the manifest marks the checkpoint complete, and the rename
    after it."""
    import os

    class Engine:  # writes what DeepSpeed writes for one rank: a model-states and an optimizer shard
        def save_checkpoint(self, root, tag, save_latest):
            (Path(root) / tag).mkdir()
            for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
                (Path(root) / tag / name).write_bytes(b"x")

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    final = ckpt.Checkpointer(asynchronous=False).save(
        Engine(), tmp_path, 7, {"config": {}}, {"data": None}, rank=0, keep_last=2
    )
    root, tmp = str(ckpt.checkpoint_root(tmp_path)), str(ckpt.checkpoint_root(tmp_path) / ".tmp_step_0000007")
    manifest = synced.index(f"{tmp}/manifest.json")
    before = set(synced[:manifest])
    assert {f"{tmp}/{name}" for name in os.listdir(final) if name != "manifest.json"} | {tmp} <= before
    assert synced[manifest + 1 :] == [tmp, root]  # the manifest's directory entry, then the rename
    assert ckpt.latest_checkpoint(tmp_path) == final


def test_export_refuses_a_missing_tokenizer_it_was_given(tmp_path, capsys):
    """An explicit --tokenizer that does not exist is an error; only the run config's default may be skipped."""
    import tools.export_hf as export_hf
    from mambatron.hf import save_model_dir

    cfg = load_config("configs/tiny.yaml", ["model.d_model=32", "model.n_layer=1", "data.tokenizer=missing/tok"])
    model_dir = save_model_dir(build_model(cfg.model), cfg, tmp_path / "model")
    args = ["--checkpoint", str(model_dir), "--out", str(tmp_path / "hf")]
    assert export_hf.main([*args, "--tokenizer", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    assert export_hf.main(args) == 0  # the config's tokenizer is missing: warned about, model exported
    assert "exporting the model without it" in capsys.readouterr().err and (tmp_path / "hf" / "config.json").is_file()
    # A second export into the now non-empty folder needs --overwrite; without it nothing there changes.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "hf").iterdir()}
    assert export_hf.main(args) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "hf").iterdir()} == before
    assert export_hf.main([*args, "--overwrite"]) == 0


def test_requeue_counts_scontrol_ended_by_its_own_requeue(monkeypatch):
    """scontrol runs inside the job it requeues, so the requeue can kill it before it exits: that is a requeue, not a
    failure; a real failure names scontrol's exit code and message."""
    import signal
    import subprocess

    from mambatron.train.trainer import Trainer

    printed = []
    trainer = Trainer.__new__(Trainer)
    trainer.is_main = True
    trainer.metrics = type("M", (), {"print": staticmethod(printed.append)})()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    for code, err, want in [
        (0, "", "SLURM job 42 requeued"),
        (-signal.SIGTERM, "", "SLURM job 42 requeued (scontrol was ended by the requeue it requested)"),
        (1, "Invalid job id", "SLURM job 42 requeue failed (exit 1): Invalid job id"),
    ]:
        done = subprocess.CompletedProcess(["scontrol"], code, stdout="", stderr=err)
        monkeypatch.setattr(subprocess, "run", lambda *a, done=done, **k: done)
        trainer._request_requeue()
        assert printed[-1] == want
