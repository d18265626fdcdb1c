"""Suite-wide test setup that has to happen before any test module is imported.

Without a GPU, the Triton kernel tests run in Triton's CPU interpreter, which only works if TRITON_INTERPRET is set
before ``triton`` is first imported: ``triton.language``'s own helpers (``tl.sum``...) are decorated at import. Other
test modules import triton indirectly (transformers, megatron-core, deepspeed), so this cannot wait for
tests/kernels/conftest.py. It does not slow other tests down: on CPU the models pick the reference ops themselves.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
