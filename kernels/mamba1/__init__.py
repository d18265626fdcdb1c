"""The Mamba1 mixer between in_proj and out_proj as one op: causal conv over x, x_proj, dt_proj, selective scan, gate.

``mamba1_conv_scan_fn`` (Triton, one autograd op that saves the in_proj output and x_proj's small output, recomputes
the conv and Δ, and writes both halves of the in_proj-output gradient into one buffer) and
``mamba1_conv_scan_fn_ref`` (the spec: the reference ops composed).
"""

from .api import mamba1_conv_scan_fn
from .reference import mamba1_conv_scan_fn_ref

__all__ = ["mamba1_conv_scan_fn", "mamba1_conv_scan_fn_ref"]
