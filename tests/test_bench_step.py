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
            "dcb2:ssd.chunk_scan.TILES[bwd_dcb]=64,2",
            "both:ssd.chunk_scan.TILES[bwd_dcb]=32,4",
            "both:rmsnorm.api.BWD_SPLIT_ABOVE=4096",
        ]
    )
    assert variants == {
        "dcb2": [("ssd.chunk_scan", "TILES", "bwd_dcb", (64, 2))],
        "both": [("ssd.chunk_scan", "TILES", "bwd_dcb", (32, 4)), ("rmsnorm.api", "BWD_SPLIT_ABOVE", None, 4096)],
    }
    with launch_overrides(variants["both"]):
        assert chunk_scan.TILES["bwd_dcb"] == (32, 4) and api.BWD_SPLIT_ABOVE == 4096
    assert chunk_scan.TILES["bwd_dcb"] == tiles and api.BWD_SPLIT_ABOVE == split != 4096
    with pytest.raises(RuntimeError), launch_overrides(variants["dcb2"]):
        assert chunk_scan.TILES["bwd_dcb"] == (64, 2)
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
        ("x:ssd.chunk_scan.TILES[bwd_dcb]=64", r"is \(64, 1\); give a value of the same shape"),
        ("x:rmsnorm.api.BWD_SPLIT_ABOVE=1,2", "is 2048; give a value of the same shape"),
    ],
)
def test_bad_launch_variants_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        parse_launch([text])


def test_a_bad_launch_variant_exits_2_before_anything_runs(capsys):
    assert main(["--presets", "mamba2-1.3b", "--launch", "x:ssd.chunk_scan.TILES[bwd_dcb]=64"]) == 2
    assert "give a value of the same shape" in capsys.readouterr().err
