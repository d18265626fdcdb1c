"""The spec of causal grouped-query attention over packed documents, in plain PyTorch."""

import math

import torch


def check_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_idx: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need q (batch, heads, seqlen, head_dim) and "
            "k, v (batch, kv_heads, kv_len, head_dim)"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{k.shape[1]} KV heads must divide {q.shape[1]} query heads")
    if seq_idx is not None and seq_idx.shape != (q.shape[0], k.shape[2]):
        raise ValueError(f"seq_idx {tuple(seq_idx.shape)} must be (batch, kv_len) = ({q.shape[0]}, {k.shape[2]})")


def attention_mask(q_len: int, kv_len: int, seq_idx: torch.Tensor | None, device) -> torch.Tensor:
    """(batch or 1, 1, q_len, kv_len) bool, True where attending is allowed: causal, the queries being the last
    q_len positions, and within one document of ``seq_idx`` (batch, kv_len)."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    allowed = q_pos[:, None] >= torch.arange(kv_len, device=device)[None, :]
    allowed = allowed[None, None]
    if seq_idx is not None:
        same_doc = seq_idx[:, kv_len - q_len :, None] == seq_idx[:, None, :]
        allowed = allowed & same_doc[:, None]
    return allowed


def attention_fn_ref(q, k, v, seq_idx=None):
    """q: (batch, heads, q_len, head_dim); k, v: (batch, kv_heads, kv_len, head_dim) with kv_heads dividing heads
    (query head h reads KV head h // (heads / kv_heads)); the queries are the last q_len of the kv_len positions;
    seq_idx: (batch, kv_len) int document ids or None. Token t attends to tokens s ≤ t of its own document, with
    softmax(q·kᵀ / sqrt(head_dim)) computed in fp32 (fp64 for fp64 inputs). Returns (batch, heads, q_len,
    head_dim) in q's dtype."""
    check_args(q, k, v, seq_idx)
    groups = q.shape[1] // k.shape[1]
    compute = torch.promote_types(q.dtype, torch.float32)
    k = k.repeat_interleave(groups, dim=1).to(compute)
    v = v.repeat_interleave(groups, dim=1).to(compute)
    scores = torch.matmul(q.to(compute), k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~attention_mask(q.shape[2], k.shape[2], seq_idx, q.device), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)
