"""tools/bench_step.py's device idle-time arithmetic (the GPU parts run only on a GPU)."""

import pytest

from tools.bench_step import idle_gaps


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
