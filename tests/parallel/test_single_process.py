"""Single-process checks: bad layouts rejected, shard/consolidate layouts, launcher environments, DeepSpeed JSON."""

from __future__ import annotations

import pytest
import torch

from mambatron.config import Config, ConfigError, ParallelConfig, TrainConfig, config_from_dict
from mambatron.parallel import LocalProjections, build_projections, validate_parallel
from mambatron.parallel.consolidate import consolidate, param_layout, reshard, shard
from mambatron.parallel.dist import DistInfo, expand_hostlist, local_cuda_device, read_launch_env
from tests.parallel._workers import full_state, tiny_model_config

# --------------------------------------------------------------------------- rejected configurations


@pytest.mark.parametrize(
    "arch,overrides,tp,world,message",
    [
        ("mamba1", {"d_model": 12, "expand": 1}, 8, 8, "does not divide d_inner=12"),
        ("mamba2", {"headdim": 16}, 4, 4, "does not divide nheads=2"),
        ("mamba2", {"ngroups": 2}, 4, 4, "does not divide model.ngroups=2"),
        ("mamba1", {"vocab_size": 60, "pad_vocab_multiple": 4}, 8, 8, "does not divide the padded vocab 60"),
        ("mamba1", {}, 2, 3, "WORLD_SIZE=3 is not a multiple of parallel.tp=2"),
    ],
)
def test_bad_parallel_layout_is_rejected(arch, overrides, tp, world, message):
    cfg = tiny_model_config(arch, **overrides)
    with pytest.raises(ConfigError, match=message):
        validate_parallel(cfg, ParallelConfig(tp=tp), world)


def test_context_parallel_layout_is_checked():
    """CP must divide seq_len into slices no shorter than the conv halo, TP must divide each slice under SP, and the
    world must hold whole TP × CP blocks; each error names the fix."""
    cfg = tiny_model_config("mamba1")  # d_conv 4: a halo of 3
    with pytest.raises(ConfigError, match="data.seq_len=2049 is not a multiple of 2; pick a multiple of 2"):
        validate_parallel(cfg, ParallelConfig(cp=2), 2, seq_len=2049)
    with pytest.raises(ConfigError, match="leaves 2 tokens per slice, fewer than the conv1d halo"):
        validate_parallel(cfg, ParallelConfig(cp=4), 4, seq_len=8)
    with pytest.raises(ConfigError, match="each of the cp=2 slices \\(9 tokens\\) over tp=2 ranks"):
        validate_parallel(cfg, ParallelConfig(tp=2, cp=2, sequence_parallel=True), 4, seq_len=18)
    with pytest.raises(ConfigError, match="WORLD_SIZE=6 is not a multiple of parallel.tp × parallel.cp = 2 × 2"):
        validate_parallel(cfg, ParallelConfig(tp=2, cp=2), 6, seq_len=16)
    with pytest.raises(ConfigError, match="parallel.cp=0 must be a positive number"):
        validate_parallel(cfg, ParallelConfig(cp=0), 2, seq_len=16)
    validate_parallel(cfg, ParallelConfig(tp=2, cp=2, sequence_parallel=True), 8, seq_len=16)


def test_expert_parallel_layout_is_checked():
    """EP needs MoE layers whose experts it divides, TP = 1 (then any CP) or EP = TP with sequence parallelism (then
    CP = 1) and a world of whole EP groups; each error names the fix."""
    from mambatron.config import MoEConfig

    moe = tiny_model_config("mamba2", hybrid_pattern="ME", moe=MoEConfig(num_experts=4, top_k=2, hidden=16))
    with pytest.raises(ConfigError, match="the model has no MoE layers"):
        validate_parallel(tiny_model_config("mamba2"), ParallelConfig(ep=2), 2)
    with pytest.raises(ConfigError, match="parallel.ep=8 does not divide model.moe.num_experts=4"):
        validate_parallel(moe, ParallelConfig(ep=8), 8)
    with pytest.raises(ConfigError, match="parallel.ep > 1 with parallel.cp > 1 runs with parallel.tp=1"):
        validate_parallel(moe, ParallelConfig(ep=2, cp=2, tp=2, sequence_parallel=True), 8, seq_len=16)
    validate_parallel(moe, ParallelConfig(ep=2, cp=2), 4, seq_len=16)  # EP over data x context parallel ranks
    for layout in (ParallelConfig(ep=2, tp=2), ParallelConfig(ep=4, tp=2, sequence_parallel=True)):
        with pytest.raises(ConfigError, match="needs parallel.ep equal to parallel.tp and parallel.sequence_parallel"):
            validate_parallel(moe, layout, 8)
    validate_parallel(moe, ParallelConfig(ep=2, tp=2, sequence_parallel=True), 4, seq_len=16)
    with pytest.raises(ConfigError, match="WORLD_SIZE=3 is not a multiple of parallel.ep=2"):
        validate_parallel(moe, ParallelConfig(ep=2), 3)
    biased = tiny_model_config(
        "mamba2", hybrid_pattern="ME",
        moe=MoEConfig(num_experts=4, top_k=2, hidden=16, router="sigmoid", bias_update_rate=0.1),
    )  # fmt: skip
    validate_parallel(biased, ParallelConfig(ep=2), 2)  # bias balancing works under EP
    validate_parallel(moe, ParallelConfig(ep=2), 4)


def test_expert_parallel_slices_and_merges_the_expert_stacks():
    """An EP rank's state holds its consecutive share of every routed-expert stack and the rest whole; merging the
    ranks' states gives the full state back (shared experts and routers are replicated, not split), also when the EP
    ranks are TP ranks (EP = TP) holding TP blocks of the rest."""
    from mambatron.config import MoEConfig
    from mambatron.parallel.consolidate import (
        expert_parallel_slice,
        is_expert_param,
        merge_expert_parallel,
        merge_model_parallel,
        shard,
    )  # fmt: skip

    cfg = tiny_model_config("mamba2", hybrid_pattern="ME", moe=MoEConfig(num_experts=4, top_k=2, hidden=16,
                                                                           shared_experts=1))  # fmt: skip
    full = full_state(cfg)
    split = {n for n in full if is_expert_param(n)}
    assert split == {"layers.1.mixer.experts.fc1", "layers.1.mixer.experts.fc2"}
    parts = [expert_parallel_slice(full, 2, r) for r in range(2)]
    assert torch.equal(parts[1]["layers.1.mixer.experts.fc2"], full["layers.1.mixer.experts.fc2"][2:])
    assert torch.equal(parts[1]["layers.1.mixer.router.weight"], full["layers.1.mixer.router.weight"])
    merged = merge_expert_parallel(parts)
    assert merged.keys() == full.keys() and all(torch.equal(merged[n], full[n]) for n in full)
    with pytest.raises(ValueError, match="4 experts do not split over 3 EP ranks"):
        expert_parallel_slice(full, 3, 0)
    # EP = TP: each TP rank's block with its share of the experts; merged back over both at once.
    mp = [expert_parallel_slice(shard(full, cfg, 2, r), 2, r) for r in range(2)]
    assert mp[1]["embedding.weight"].shape[0] == full["embedding.weight"].shape[0] // 2
    for tp, ep, states in ((2, 2, mp), (1, 2, parts), (2, 1, [shard(full, cfg, 2, r) for r in range(2)])):
        merged = merge_model_parallel(states, cfg, tp, ep)
        assert merged.keys() == full.keys() and all(torch.equal(merged[n], full[n]) for n in full), (tp, ep)
    with pytest.raises(ValueError, match="expected EP = TP"):
        merge_model_parallel(mp, cfg, 2, 4)


def test_sequence_parallel_needs_seq_len_multiple_of_tp():
    with pytest.raises(ConfigError, match="data.seq_len=2049 is not a multiple of 2"):
        validate_parallel(tiny_model_config("mamba1"), ParallelConfig(tp=2, sequence_parallel=True), 2, seq_len=2049)
    validate_parallel(tiny_model_config("mamba1"), ParallelConfig(tp=2), 2, seq_len=2049)
    # Also when the whole run config is loaded, before any process group or model exists.
    with pytest.raises(ConfigError, match="data.seq_len=2049 is not a multiple of 2"):
        config_from_dict({"parallel": {"tp": 2, "sequence_parallel": True}, "data": {"seq_len": 2049}})
    assert config_from_dict({"parallel": {"tp": 2, "sequence_parallel": True}, "data": {"seq_len": 2048}})


def test_good_layout_passes():
    validate_parallel(tiny_model_config("mamba2"), ParallelConfig(tp=2, sequence_parallel=True), 4)
    validate_parallel(tiny_model_config("mamba1"), ParallelConfig(tp=1), 3)


def test_sequence_parallel_needs_tp():
    with pytest.raises(ConfigError, match="sequence_parallel=true needs parallel.tp > 1"):
        validate_parallel(tiny_model_config("mamba1"), ParallelConfig(tp=1, sequence_parallel=True), 1)


def test_tp1_projections_are_local():
    assert isinstance(build_projections(ParallelConfig(tp=1)), LocalProjections)


# --------------------------------------------------------------------------- shard / consolidate layouts


def test_mamba1_in_proj_shards_interleave_x_and_z():
    cfg = tiny_model_config("mamba1")
    full = full_state(cfg)
    w = full["layers.0.mixer.in_proj.weight"]  # (2 * d_inner, d_model) = [x | z]
    di = cfg.d_inner
    rank1 = shard(full, cfg, 2, 1)["layers.0.mixer.in_proj.weight"]
    torch.testing.assert_close(rank1, torch.cat([w[di // 2 : di], w[di + di // 2 :]]), rtol=0, atol=0)
    assert shard(full, cfg, 2, 1)["layers.0.mixer.x_proj.weight"].shape == (
        cfg.dt_rank_value + 2 * cfg.d_state,
        di // 2,
    )


def test_mamba2_in_proj_shards_split_per_component():
    cfg = tiny_model_config("mamba2")
    full = full_state(cfg)
    di, gn, h = cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.nheads
    w = full["layers.1.mixer.in_proj.weight"]
    z, x, b, c, dt = torch.split(w, [di, di, gn, gn, h])
    rank0 = shard(full, cfg, 2, 0)["layers.1.mixer.in_proj.weight"]
    expected = torch.cat([z[: di // 2], x[: di // 2], b[: gn // 2], c[: gn // 2], dt[: h // 2]])
    torch.testing.assert_close(rank0, expected, rtol=0, atol=0)
    conv0 = shard(full, cfg, 2, 0)["layers.1.mixer.conv1d.weight"]
    cx, cb, cc = torch.split(full["layers.1.mixer.conv1d.weight"], [di, gn, gn])
    torch.testing.assert_close(conv0, torch.cat([cx[: di // 2], cb[: gn // 2], cc[: gn // 2]]), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("tp", [2, 4])
def test_shard_consolidate_roundtrip(arch, tp):
    overrides = {"ngroups": 4, "bias": True, "tie_embeddings": False} if arch == "mamba2" else {"bias": True}
    cfg = tiny_model_config(arch, **overrides)
    full = full_state(cfg)
    shards = [shard(full, cfg, tp, r) for r in range(tp)]
    back = consolidate(shards, cfg)
    assert set(back) == set(full)
    for name, t in full.items():
        assert torch.equal(back[name], t), name
    to_two = reshard(shards, cfg, 2)
    for r in range(2):
        for name, t in shard(full, cfg, 2, r).items():
            assert torch.equal(to_two[r][name], t), name


def test_init_like_tp1_leaves_the_global_generator_alone():
    from mambatron.models import build_model
    from mambatron.parallel.consolidate import init_weights_like_tp1

    cfg = tiny_model_config("mamba1")
    model = build_model(cfg)
    expected = build_model(cfg)
    expected.init_weights(seed=3)
    state = torch.get_rng_state()
    init_weights_like_tp1(model, cfg, seed=3, tp_size=1, tp_rank=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in model.state_dict().items())


def test_unknown_parameter_has_no_layout():
    with pytest.raises(KeyError, match="no tensor-parallel layout"):
        param_layout("layers.0.mixer.mystery", tiny_model_config("mamba1"))


def test_replicated_and_row_layouts():
    cfg = tiny_model_config("mamba2", bias=True)
    assert param_layout("layers.3.norm.weight", cfg).replicated
    assert param_layout("norm_f.weight", cfg).replicated
    assert param_layout("layers.0.mixer.out_proj.bias", cfg).replicated
    assert param_layout("layers.0.mixer.out_proj.weight", cfg).dim == 1
    assert param_layout("layers.0.mixer.norm.weight", cfg).dim == 0  # the group-wise gated norm stays local


# --------------------------------------------------------------------------- launcher environments


def test_hostlist_expansion():
    assert expand_hostlist("node[1-2]") == ["node1", "node2"]
    assert expand_hostlist("gpu[01-03,7],cpu1") == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"]
    assert expand_hostlist("r[1-2]n[3-4]") == ["r1n3", "r1n4", "r2n3", "r2n4"]
    assert expand_hostlist("a,b") == ["a", "b"]


def test_launch_env_torchrun_slurm_single():
    torchrun = read_launch_env(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "5"}
    )
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr) == (3, 4, 1, "h")
    assert torchrun.source == "torchrun"
    slurm = read_launch_env(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "zz-fake[7-8]"}
    )
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr) == (5, 8, 1, "zz-fake7")
    assert slurm.source == "slurm"
    single = read_launch_env({})
    assert (single.rank, single.world_size, single.source) == (0, 1, "single")


def test_slurm_master_port_per_job_below_ephemeral_range():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu-[01-03,07]"}
    # MASTER_ADDR set: the port alone is under test, without 10,000 calls of scontrol for the first host.
    addr = {"MASTER_ADDR": "gpu-01"}
    ports = {read_launch_env({**env, **addr, "SLURM_JOB_ID": str(j)}).master_port for j in range(123_456, 133_456)}
    assert len(ports) == 10_000 and min(ports) >= 1024 and max(ports) < 29500  # 29500+: torchrun's rendezvous
    slurm = read_launch_env({**env, "SLURM_JOB_ID": "123456"})
    assert (slurm.master_addr, slurm.master_port) == ("gpu-01", 18456)
    # An exported but empty variable counts as unset.
    assert read_launch_env({**env, "SLURM_JOB_ID": "7", "MASTER_PORT": "", "MASTER_ADDR": ""}).master_port == 15007
    assert read_launch_env({**env, "MASTER_PORT": "4242"}).master_port == 4242


def test_local_cuda_device():
    assert [local_cuda_device(r, 8) for r in range(8)] == list(range(8))
    assert [local_cuda_device(r, 1) for r in range(4)] == [0, 0, 0, 0]  # one GPU bound per task
    with pytest.raises(ConfigError, match="only 4 CUDA devices are visible; launch at most 4"):
        local_cuda_device(5, 4)


def test_setup_rejects_world_not_multiple_of_tp(monkeypatch):
    from mambatron.parallel import dist as pdist

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="WORLD_SIZE=3 is not a multiple of parallel.tp=2"):
        pdist.setup(ParallelConfig(tp=2))
    assert not torch.distributed.is_initialized()


def test_single_process_setup_without_launcher(monkeypatch):
    from mambatron.parallel import dist as pdist

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    info = pdist.setup(ParallelConfig())
    try:
        assert (info.rank, info.world_size, info.tp_size, info.dp_size, info.backend) == (0, 1, 1, 1, "gloo")
        pdist.seed_model_parallel(1234)  # megatron's RNG tracker works on the CPU stand-ins
        state = torch.get_rng_state()
        from megatron.core import tensor_parallel

        with tensor_parallel.get_cuda_rng_tracker().fork():
            pass
        assert torch.equal(state, torch.get_rng_state()), "the tracker must not move the global CPU generator"
    finally:
        pdist.teardown()
    assert not torch.distributed.is_initialized()


# --------------------------------------------------------------------------- DeepSpeed JSON


def test_deepspeed_config_from_yaml_config():
    from mambatron.parallel.zero import deepspeed_config

    cfg = Config(
        parallel=ParallelConfig(
            tp=2,
            zero_stage=3,
            offload_optimizer=True,
            offload_params=True,
            deepspeed_extra={"zero_optimization": {"reduce_bucket_size": 1000}},
        ),
        train=TrainConfig(grad_accum=4, precision="bf16"),
    )
    cfg.data.micro_batch = 3
    cfg.optim.grad_clip = 0.7
    info = DistInfo(0, 8, 0, 2, 0, 4, 0, torch.device("cpu"), "gloo")
    ds = deepspeed_config(cfg, info)
    assert ds["train_batch_size"] == 3 * 4 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.7 and ds["bf16"]["enabled"]
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu" and zero["reduce_bucket_size"] == 1000
    assert "scheduler" not in ds


def test_deepspeed_config_refuses_bf16_without_zero_under_tp():
    from mambatron.parallel.zero import deepspeed_config

    cfg = Config(parallel=ParallelConfig(tp=2, zero_stage=0), train=TrainConfig(precision="bf16"))
    with pytest.raises(ConfigError, match="set parallel.zero_stage to 1 or more"):
        deepspeed_config(cfg, DistInfo(0, 4, 0, 2, 0, 2, 0, torch.device("cpu"), "gloo"))
    assert deepspeed_config(cfg, DistInfo(0, 2, 0, 1, 0, 2, 0, torch.device("cpu"), "gloo"))["bf16"]["enabled"]
    cfg.train.precision = "fp32"
    assert deepspeed_config(cfg, DistInfo(0, 4, 0, 2, 0, 2, 0, torch.device("cpu"), "gloo"))["zero_optimization"]


def test_weight_decay_only_on_matrices():
    from mambatron.models import build_model
    from mambatron.parallel.zero import param_groups

    model = build_model(tiny_model_config("mamba2", bias=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert all(model.get_parameter(n).dim() >= 2 for n in decayed)
    assert "layers.0.mixer.in_proj.weight" in decayed and "embedding.weight" in decayed
    skipped = {names[id(p)] for p in no_decay["params"]}
    for name in ("layers.0.norm.weight", "layers.0.mixer.A_log", "layers.0.mixer.D", "layers.0.mixer.dt_bias"):
        assert name in skipped
    assert no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("bias", [False, True])
def test_feature_major_linear_equals_the_linear(bias):
    """feature_major(linear, x) is linear(x) laid out (out_f, batch, seqlen) in memory; its gradients equal the
    linear's, and x's gradient comes back contiguous (no transposed copy for the layer below)."""
    from mambatron.parallel.projections import feature_major

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 10, bias=bias).double()
    x = torch.randn(2, 5, 6, dtype=torch.double, requires_grad=True)
    out = feature_major(lin, x)
    assert out.shape == (2, 5, 10) and out.stride() == (5, 1, 10)
    expected = lin(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    g = torch.randn_like(expected)
    grads = torch.autograd.grad(out, [x, *lin.parameters()], g)
    expected_grads = torch.autograd.grad(expected, [x, *lin.parameters()], g)
    assert grads[0].is_contiguous()
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
