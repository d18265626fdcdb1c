"""``linear_cross_entropy_fn``: the LM head's mean cross-entropy without materialising the logits.

The (tokens, vocab) logits are the largest activation of a small LM step: 1.6 GB in bf16 at 16384 tokens and a
50k vocabulary, 3.3 GB again as the fp32 copy the softmax needs, and as much once more for its gradient. Here the
rows are processed in chunks: each chunk's logits are computed, turned into its loss and its logit gradient
(softmax − one-hot, scaled by 1 / valid tokens: the loss is a mean, so that gradient is known in forward), and
folded at once into the hidden-state gradient (g · W) and the weight gradient (gᵀ · h, accumulated in fp32). Only
those two gradients are kept for backward, which scales them by the incoming gradient. The GEMMs are the three of
an unfused head (logits, dh, dW); the peak extra memory is one chunk's logits.

Where Triton runs (CUDA, or the interpreter) one kernel per chunk turns the logits into the loss and the gradient in
place (kernel.py): the logits are read twice and written once, in their own dtype, instead of the ~10 passes over an
fp32 copy that the PyTorch ops below take (they remain the path elsewhere). ``model.kernels`` chooses the op like the
other ops (``auto``: on CUDA).
"""

import torch
import triton

from mambatron.kernels._common import new_output, use_triton

from .reference import check_args

# Bytes of one chunk's fp32 logits: 5338 rows at a 50k vocabulary (16384 tokens in 4 chunks), 1048 rows at 256k.
# The weight gradient is accumulated in fp32 once per chunk (a pass over vocab × d_model), so fewer, larger chunks
# cost less time; the chunk's logits (bf16 and fp32) are the op's extra memory.
CHUNK_BYTES = 1 << 30


def default_chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


def _logits_grad(logits: torch.Tensor, labels: torch.Tensor, inv_count: torch.Tensor):
    """The Triton kernel on one chunk: the logits' gradient, written over the logits, and each row's loss (fp32)."""
    from .kernel import _ce_logits_grad_kernel

    rows, vocab = logits.shape
    loss = new_output((rows,), torch.float32, logits.device)
    block_v = min(4096, triton.next_power_of_2(vocab))
    _ce_logits_grad_kernel[(rows,)](
        logits, labels.contiguous(), inv_count.float().reshape(1), loss, vocab, logits.stride(0), BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )  # fmt: skip
    return logits, loss


def _add_weight_grad(dw: torch.Tensor, grad: torch.Tensor, hc: torch.Tensor) -> None:
    """dw += grad^T hc, dw fp32. On CUDA with 16-bit inputs the GEMM accumulates into dw itself (cuBLAS, fp32 output):
    no 16-bit product rounded per chunk and no separate pass of fp32 adds over the (vocab, d) gradient."""
    if dw.is_cuda and grad.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(dw, grad.t(), hc, out_dtype=torch.float32, out=dw)
    else:
        dw += grad.t() @ hc


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows):
        h = hidden.reshape(-1, hidden.shape[-1])
        lab = labels.reshape(-1)
        valid = lab >= 0
        count = valid.sum().clamp_min(1)
        inv_count = 1.0 / count.float()
        w = weight.to(h.dtype)
        dh = torch.empty_like(h)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            hc = h[start : start + chunk_rows]
            logits = hc @ w.t()
            if use_triton(logits):
                grad, chunk_loss = _logits_grad(logits, lab[start : start + chunk_rows], inv_count)
                loss += chunk_loss.sum()
            else:
                target = lab[start : start + chunk_rows].clamp_min(0).long()[:, None]
                scale = valid[start : start + chunk_rows].float() * inv_count
                logits = logits.float()
                lse = torch.logsumexp(logits, dim=-1)
                loss += ((lse - logits.gather(1, target).squeeze(1)) * scale).sum()
                # d loss / d logits = (softmax − one-hot) · valid / count, computed in place in the fp32 buffer.
                grad = logits.sub_(lse[:, None]).exp_()
                grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
                grad = grad.mul_(scale[:, None]).to(h.dtype)
            dh[start : start + chunk_rows] = grad @ w
            _add_weight_grad(dw, grad, hc)
        ctx.save_for_backward(dh, dw)
        ctx.hidden_shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return (dh * grad_loss.to(dh.dtype)).view(ctx.hidden_shape), (dw * grad_loss).to(ctx.weight_dtype), None, None


def linear_cross_entropy_fn(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Arguments and result as :func:`linear_cross_entropy_fn_ref` (the spec); ``chunk_rows`` rows of logits at a
    time (default: 1 GB of fp32 logits per chunk). Gradients arrive in the inputs' dtypes."""
    check_args(hidden, weight, labels)
    chunk_rows = default_chunk_rows(weight.shape[0]) if chunk_rows is None else chunk_rows
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if torch.is_autocast_enabled(hidden.device.type):  # the GEMMs in autocast's dtype, as F.linear would run them
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_rows)
