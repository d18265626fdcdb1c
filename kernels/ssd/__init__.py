"""Mamba2 SSD (state space duality) scan: `mamba_chunk_scan_combined`, a drop-in for mamba_ssm's function.

`reference.py` holds the plain-PyTorch spec (chunked dual form per stage, and the sequential recurrence).
"""

from mambatron.kernels.ssd.reference import mamba_chunk_scan_combined_ref

# The Triton path replaces this alias; until then the public function is the reference.
mamba_chunk_scan_combined = mamba_chunk_scan_combined_ref

__all__ = ["mamba_chunk_scan_combined", "mamba_chunk_scan_combined_ref"]
