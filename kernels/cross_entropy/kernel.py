"""Triton kernel of the chunked LM-head loss: one chunk's logits → per-row loss and the logits' gradient, in one pass
pair over each row.

A program owns one row of logits (vocab entries, any float dtype, unit stride). Pass 1 keeps a running max and sum
of exponentials per lane (an online logsumexp), so the row is read once for its log-sum-exp; the target logit is one
load. Pass 2 reads the row again (from L2 mostly) and writes (softmax − one-hot) · scale over it, in the logits'
dtype, where scale = 1 / (valid tokens) for a valid label (>= 0) and 0 otherwise: each element is read before it
is written, by the same program.
"""

import triton
import triton.language as tl


@triton.jit
def _ce_logits_grad_kernel(
    logits_ptr, labels_ptr, inv_count_ptr, loss_ptr, vocab, stride_logits, BLOCK_V: tl.constexpr
):
    row = tl.program_id(0)
    label = tl.load(labels_ptr + row)
    valid = label >= 0
    scale = tl.where(valid, tl.load(inv_count_ptr), 0.0)
    base = logits_ptr + row.to(tl.int64) * stride_logits
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, vocab, BLOCK_V):
        inside = start + cols < vocab
        x = tl.load(base + start + cols, mask=inside, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # A lane that has seen only padding keeps m = -inf and a sum of 0: shifting by 0 there instead of by m_new
        # gives exp(-inf) = 0 terms rather than exp(-inf + inf) = nan.
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    row_max = tl.max(m, axis=0)
    lse = row_max + tl.log(tl.sum(s * tl.exp(m - row_max), axis=0))
    target = tl.load(base + tl.maximum(label, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, (lse - target) * scale, 0.0))
    for start in range(0, vocab, BLOCK_V):
        inside = start + cols < vocab
        x = tl.load(base + start + cols, mask=inside, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * scale
        g = tl.where(start + cols == label, g - scale, g)
        tl.store(base + start + cols, g.to(logits_ptr.dtype.element_ty), mask=inside)
