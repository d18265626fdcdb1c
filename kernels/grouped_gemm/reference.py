"""The spec of the grouped linear: rows sorted by group, group g's rows times weight[g]ᵀ (an F.linear per group)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def check_args(x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int]) -> list[int]:
    counts = [int(c) for c in counts]
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(
            f"grouped_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)}: need x (rows, in_features) and "
            "weight (groups, out_features, in_features)"
        )
    if len(counts) != weight.shape[0] or any(c < 0 for c in counts) or sum(counts) != x.shape[0]:
        raise ValueError(
            f"grouped_linear: counts {counts} must hold one non-negative row count per group ({weight.shape[0]}) "
            f"summing to x's {x.shape[0]} rows"
        )
    return counts


def grouped_linear_fn_ref(x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """x: (rows, in_features), its rows sorted by group, ``counts[g]`` rows for group g; weight: (groups,
    out_features, in_features), cast to x's dtype (as F.linear under autocast). Returns (rows, out_features) in x's
    dtype: group g's rows times weight[g]ᵀ."""
    counts = check_args(x, weight, counts)
    outs = [F.linear(xg, weight[g].to(xg.dtype)) for g, xg in enumerate(x.split(counts))]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])
