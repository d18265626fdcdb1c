"""Mamba2 SSD (state space duality) scan: `mamba_chunk_scan_combined`, a drop-in for mamba_ssm's function.

`reference.py` holds the plain-PyTorch spec (the chunked dual form per stage, and the sequential recurrence); the
Triton implementation is split by stage (chunk_cumsum, chunk_state, state_passing, bmm, chunk_scan) and composed
into an autograd op in `combined.py`.
"""

from mambatron.kernels.ssd.combined import mamba_chunk_scan_combined
from mambatron.kernels.ssd.reference import mamba_chunk_scan_combined_ref

__all__ = ["mamba_chunk_scan_combined", "mamba_chunk_scan_combined_ref"]
