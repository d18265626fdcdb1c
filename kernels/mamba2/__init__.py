"""The Mamba2 mixer between in_proj and out_proj as one op: causal conv over xBC, SSD, gated RMSNorm.

``mamba2_split_conv_scan_fn`` (Triton, one autograd op that saves little and writes every in_proj-output gradient
into one buffer) and ``mamba2_split_conv_scan_fn_ref`` (the spec: the three reference ops composed).
"""

from .api import mamba2_split_conv_scan_fn
from .reference import mamba2_split_conv_scan_fn_ref

__all__ = ["mamba2_split_conv_scan_fn", "mamba2_split_conv_scan_fn_ref"]
