"""Helpers shared by the SSD Triton kernels: launch configs, block sizes, output allocation."""

import math

import triton

from mambatron.kernels._common import interpreting, new_output  # noqa: F401  (re-exported to the stages)


def _first_config_when_interpreting(configs, named_args, **kwargs):
    # The interpreter cannot benchmark (no GPU driver), and there is nothing to tune there anyway.
    return configs[:1] if interpreting() else configs


def autotune_warps(key: list[str], stages: tuple[int, ...] = (2, 3), capped: tuple[int, ...] = ()):
    """Autotunes num_warps/num_stages on the GPU (block sizes are chosen from the shapes by the launchers), per
    ``key`` and the launch's :func:`grid_bucket` (the kernel takes a ``grid_bucket`` argument).

    ``capped``: stage counts also tried with 8 warps and at most 128 registers per thread, which lets two programs
    share an SM (64K registers) where the uncapped build would take more and leave one; ptxas may spill a little."""
    configs = [triton.Config({}, num_warps=w, num_stages=s) for s in stages for w in (4, 8)]
    configs += [triton.Config({}, num_warps=8, num_stages=s, maxnreg=128) for s in capped]
    return triton.autotune(
        configs=configs,
        key=key + ["grid_bucket"],
        prune_configs_by={"early_config_prune": _first_config_when_interpreting},
    )


def grid_bucket(*grid: int) -> int:
    """The launch's size in steps of a factor of 4 (ceil(log2(programs)) // 2), passed to every autotuned SSD kernel
    as its ``grid_bucket`` argument and part of its autotuning key: the shapes that set the tiles say nothing of
    batch or length, and a pick made over a few dozen programs (a small first call: a check, an evaluation) need not
    be the fastest over a thousand."""
    return (math.prod(grid) - 1).bit_length() // 2


# Upper bounds of the tile sizes along the chunk and along dstate. Tests lower them to exercise multi-tile loops at
# shapes the interpreter can afford.
MAX_CHUNK_BLOCK = 256
MAX_DSTATE_BLOCK = 256


def _fit(n: int, upper: int) -> int:
    block = min(upper, triton.next_power_of_2(n))
    # tl.dot on the GPU needs every dimension >= 16.
    return block if interpreting() else max(block, 16)


def chunk_block(chunk_size: int, upper: int = 64) -> int:
    """Tile size along the positions of a chunk: at most ``upper`` (a launcher's choice) and MAX_CHUNK_BLOCK."""
    return _fit(chunk_size, min(upper, MAX_CHUNK_BLOCK))


def dstate_block(dstate: int, upper: int = 64) -> int:
    """Tile size along dstate: at most ``upper`` (a launcher's choice) and MAX_DSTATE_BLOCK."""
    return _fit(dstate, min(upper, MAX_DSTATE_BLOCK))


def headdim_block(headdim: int, upper: int = 1 << 30) -> int:
    """Tile size along headdim: by default one tile holds the whole head, so per-position sums over headdim need no
    atomics; a kernel without such sums may split the head (``upper``)."""
    return _fit(headdim, upper)
