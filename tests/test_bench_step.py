"""tools/bench_step.py: the device idle-time arithmetic and the launch variants (the GPU parts run only on a GPU)."""

import pytest

from tools.bench_step import idle_gaps, launch_overrides, main, parse_launch


def test_idle_gaps_counts_the_union_of_overlapping_intervals_and_charges_each_gap_to_the_next_kernel():
    spans = [
        (0.0, 10.0, "gemm"),
        (2.0, 4.0, "memset"),  # inside gemm (another stream): no gap, no extra busy time
        (8.0, 12.0, "norm"),  # overlaps gemm's end
        (15.0, 16.0, "ssd"),  # 3 idle after norm
        (16.0, 20.0, "conv"),  # back to back: no gap
        (26.5, 27.0, "adam"),  # 6.5 idle after conv
    ]
    wall, busy, gaps = idle_gaps(spans)
    assert wall == 27.0
    assert busy == pytest.approx(12.0 + 1.0 + 4.0 + 0.5)
    assert gaps == [(3.0, "norm", "ssd"), (6.5, "conv", "adam")]
    assert wall - busy == pytest.approx(sum(g for g, _, _ in gaps))


def test_idle_gaps_of_back_to_back_kernels_is_empty():
    wall, busy, gaps = idle_gaps([(1.0, 2.0, "a"), (2.0, 5.0, "b")])
    assert (wall, busy, gaps) == (4.0, 4.0, [])


def test_launch_variants_set_kernel_constants_and_restore_them():
    from mambatron.kernels.rmsnorm import api
    from mambatron.kernels.ssd import chunk_scan

    tiles, split = chunk_scan.TILES["bwd_dcb"], api.BWD_SPLIT_ABOVE
    variants = parse_launch(
        [
            "dcb2:ssd.chunk_scan.TILES[bwd_dcb]=64,2,1",
            "both:ssd.chunk_scan.TILES[bwd_dcb]=32,4,0",
            "both:rmsnorm.api.BWD_SPLIT_ABOVE=4096",
        ]
    )
    assert variants == {
        "dcb2": [("ssd.chunk_scan", "TILES", "bwd_dcb", (64, 2, 1))],
        "both": [("ssd.chunk_scan", "TILES", "bwd_dcb", (32, 4, 0)), ("rmsnorm.api", "BWD_SPLIT_ABOVE", None, 4096)],
    }
    with launch_overrides(variants["both"]):
        assert chunk_scan.TILES["bwd_dcb"] == (32, 4, 0) and api.BWD_SPLIT_ABOVE == 4096
    assert chunk_scan.TILES["bwd_dcb"] == tiles and api.BWD_SPLIT_ABOVE == split != 4096
    with pytest.raises(RuntimeError), launch_overrides(variants["dcb2"]):
        assert chunk_scan.TILES["bwd_dcb"] == (64, 2, 1)
        raise RuntimeError("a failed step still restores the launch")
    assert chunk_scan.TILES["bwd_dcb"] == tiles


@pytest.mark.parametrize(
    "text, match",
    [
        ("ssd.chunk_scan.TILES[bwd_dcb]=64,2", "expected NAME:MODULE"),
        ("x:ssd.chunk_scan.TILES[bwd_dcb]=__import__", "expected NAME:MODULE"),
        ("x:ssd.nonexistent.TILES=1", "no module mambatron.kernels.ssd.nonexistent"),
        ("x:ssd.chunk_scan.NOT_THERE=1", "chunk_scan has no NOT_THERE"),
        ("x:ssd.chunk_scan.TILES[nope]=1", "TILES has no key 'nope'"),
        ("x:ssd.chunk_scan.TILES[bwd_dcb]=64", r"is \(64, 1, 0\); give a value of the same shape"),
        ("x:rmsnorm.api.BWD_SPLIT_ABOVE=1,2", "is 2048; give a value of the same shape"),
    ],
)
def test_bad_launch_variants_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        parse_launch([text])


def test_a_bad_launch_variant_exits_2_before_anything_runs(capsys):
    assert main(["--presets", "mamba2-1.3b", "--launch", "x:ssd.chunk_scan.TILES[bwd_dcb]=64"]) == 2
    assert "give a value of the same shape" in capsys.readouterr().err


def test_autotune_picks_name_each_kernel_its_key_and_config(monkeypatch):
    """An autotuned SSD kernel run once (the interpreter takes the first configuration) is listed with its key and
    that configuration; a benchmarked one (timings as the autotuner leaves them) also with every candidate's time,
    for the key it benchmarked last only."""
    import torch
    from triton.runtime.autotuner import Autotuner

    from mambatron.kernels._common import interpreting, reset_autotuning
    from mambatron.kernels.ssd import bmm
    from tools.bench_step import autotune_picks

    tuner = bmm._bmm_chunk_fwd_kernel
    assert isinstance(tuner, Autotuner)
    monkeypatch.setattr(tuner, "cache", {})
    x = torch.randn(1, 8, 1, 4, device="cuda" if torch.cuda.is_available() else "cpu")
    bmm.bmm_chunk_fwd(x, x, 4)
    (pick,) = [p for p in autotune_picks() if p["kernel"] == "_bmm_chunk_fwd_kernel"]
    first = tuner.configs[0]
    assert pick["key"][:2] == ["4", "4"]  # chunk_size, dstate
    if interpreting():  # no benchmark: the first configuration
        assert (pick["num_warps"], pick["num_stages"]) == (first.num_warps, first.num_stages)
        assert "candidates_ms" not in pick
    else:  # benchmarked: the fastest candidate
        fastest = min(pick["candidates_ms"], key=lambda c: c["ms"])
        assert (pick["num_warps"], pick["num_stages"]) == (fastest["num_warps"], fastest["num_stages"])
    # As after a benchmark on a GPU: two keys, the second benchmarked last, its timings kept.
    (key,) = tuner.cache
    other = ("8",) + key[1:]
    monkeypatch.setattr(tuner, "cache", {key: first, other: tuner.configs[1]})
    monkeypatch.setattr(
        tuner, "configs_timings", {first: [0.5, 0.4, 0.6], tuner.configs[1]: [0.25, 0.2, 0.3]}, raising=False
    )
    picks = [p for p in autotune_picks() if p["kernel"] == "_bmm_chunk_fwd_kernel"]
    assert [("candidates_ms" in p) for p in picks] == [False, True]
    assert picks[1]["num_warps"] == tuner.configs[1].num_warps
    assert [c["ms"] for c in picks[1]["candidates_ms"]] == [0.5, 0.25]
    # What the step does after the check: every pick forgotten, this kernel's two among them.
    assert reset_autotuning() >= 2
    assert tuner.cache == {} and not [p for p in autotune_picks() if p["kernel"] == "_bmm_chunk_fwd_kernel"]


@pytest.mark.parametrize("passes", [True, False])
def test_the_step_forgets_the_checks_autotuning_picks(passes, monkeypatch):
    """The check runs a small model whose autotuning picks a step in the same grid bucket would reuse:
    after a passing check they are recorded and forgotten; a failing check gives the step a record with no speed."""
    import torch

    import tools.bench_step as bench_step
    from mambatron.kernels.ssd import bmm

    tuner = bmm._bmm_chunk_fwd_kernel
    monkeypatch.setattr(tuner, "cache", {})

    def check(cfg, device):  # stands in for the small model's check: runs an autotuned kernel
        x = torch.randn(1, 8, 1, 4, device=device)
        bmm.bmm_chunk_fwd(x, x, 4)
        return 0.001 if passes else 0.5

    monkeypatch.setattr(bench_step, "check_kernels", check)
    start = len(bench_step.RECORDS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = bench_step.checked(None, "tiny", tolerance=0.02, device=device)
    whats = [r["what"] for r in bench_step.RECORDS[start:]]
    if passes:
        assert got is None and tuner.cache == {}
        assert whats == ["check_tiny", "autotune_check_tiny"]
        assert any(p["kernel"] == "_bmm_chunk_fwd_kernel" for p in bench_step.RECORDS[-1]["picks"])
    else:
        assert "error" in got and "tokens_per_s" not in got
        assert whats == ["check_tiny", "train_step_mambatron_tiny"]
