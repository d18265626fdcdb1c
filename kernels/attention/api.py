"""``attention_fn``: causal grouped-query attention through ``torch.nn.functional.scaled_dot_product_attention``.

Without documents (seq_idx None) and with the queries covering the whole sequence, SDPA gets ``is_causal`` and picks
its flash kernel on a GPU; with packed documents it gets the block-diagonal causal mask (the memory-efficient kernel,
which reads a (q_len, kv_len) boolean mask per row: 4 MB at 2048 tokens, 1 GB at 32768).
"""

import torch.nn.functional as F

from .reference import attention_mask, check_args


def attention_fn(q, k, v, seq_idx=None):
    """Arguments and result as :func:`attention_fn_ref` (the spec)."""
    check_args(q, k, v, seq_idx)
    gqa = q.shape[1] != k.shape[1]
    if seq_idx is None and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = attention_mask(q.shape[2], k.shape[2], seq_idx, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
