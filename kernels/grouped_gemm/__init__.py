"""The experts' GEMMs as one op: ``grouped_linear_fn(x, weight, counts)``, where the rows of x come sorted by group
(expert) and group g's rows are multiplied by ``weight[g]ᵀ``, in one Triton launch per GEMM instead of one matmul per
expert; ``grouped_linear_fn_ref`` (a matmul per group: the spec)."""

from .api import grouped_linear_fn
from .reference import grouped_linear_fn_ref

__all__ = ["grouped_linear_fn", "grouped_linear_fn_ref"]
