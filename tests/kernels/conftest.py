"""Kernel tests: Triton runs in its CPU interpreter when there is no GPU, outputs start as NaN, shared tolerances.

TRITON_INTERPRET must be set before ``triton`` is imported anywhere in the process (``triton.language``'s own helpers
such as ``tl.sum`` are decorated at import). tests/conftest.py sets it for whole-suite runs, where modules collected
earlier import triton (megatron-core, deepspeed, transformers); this conftest sets it again for runs that start here.
The ``triton_interpreter`` fixture fails with a clear message if triton was imported too early anyway.
"""

import os
import sys

import pytest
import torch

_TRITON_IMPORTED_EARLY = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Ops allocate their outputs full of NaN, so an element a kernel never writes fails the comparison.
os.environ.setdefault("MAMBATRON_POISON", "1")

# (atol, rtol) per dtype of the tensors being compared; CI never relaxes these.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (6e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "", dtype: torch.dtype | None = None):
    """Compare a kernel result to its fp32/fp64 reference with the tolerance of ``dtype`` (default: actual's)."""
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def saved_words_per_token(run, exclude, tokens: int) -> float:
    """What ``run()`` keeps for backward, in 4-byte words per token: every storage autograd saves, counted once,
    except those of the tensors in ``exclude`` (the parameters)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values()) / (tokens * 4)


@pytest.fixture
def triton_interpreter():
    """Use in tests that run Triton kernels on CPU."""
    if _TRITON_IMPORTED_EARLY and not torch.cuda.is_available():
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: set it in tests/conftest.py")


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
