"""The LM head and its next-token loss as one op: ``linear_cross_entropy_fn`` (chunked over rows, never holding the
full logits) and ``linear_cross_entropy_fn_ref`` (logits, then fp32 cross-entropy: the spec)."""

from .api import linear_cross_entropy_fn
from .reference import linear_cross_entropy_fn_ref

__all__ = ["linear_cross_entropy_fn", "linear_cross_entropy_fn_ref"]
