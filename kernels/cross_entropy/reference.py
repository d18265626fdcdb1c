"""The spec of the LM head's loss: logits = hidden · weightᵀ, fp32 cross-entropy, mean over labels >= 0."""

import torch
import torch.nn.functional as F


def check_args(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    if hidden.shape[:-1] != labels.shape or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}: need hidden "
            "(..., d_model), weight (vocab, d_model) and labels of hidden's leading shape"
        )


def linear_cross_entropy_fn_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the logits ``hidden · weightᵀ`` (weight cast to hidden's dtype, as F.linear
    under autocast) over the positions whose label is >= 0; 0 when there are none. The softmax runs in fp32."""
    check_args(hidden, weight, labels)
    logits = F.linear(hidden, weight.to(hidden.dtype)).flatten(0, -2)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax of a 50k vocabulary needs fp32
    per_token = F.cross_entropy(logits, labels.clamp_min(0).flatten().long(), reduction="none")
    valid = labels.flatten() >= 0
    return (per_token * valid).sum() / valid.sum().clamp_min(1)
