"""Autoregressive generation with the recurrent step: a parallel prefill fills each layer's O(1) state (conv window
+ SSM state), then one ``step`` per new token."""

from __future__ import annotations

import torch

from mambatron.models.lm import MambaLM


@torch.no_grad()
def generate(
    model: MambaLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """input_ids: (batch, prompt_len) → (batch, prompt_len + new) token ids.

    ``temperature == 0`` is greedy; otherwise sample from softmax(logits / temperature), restricted to the ``top_k``
    most likely tokens when given. Padded vocabulary entries are never produced. Stops early once every row has
    produced ``eos_id``."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, prompt_len) with prompt_len >= 1, got {tuple(input_ids.shape)}")
    was_training = model.training
    model.eval()
    vocab = model.cfg.vocab_size
    caches = model.empty_caches(input_ids.shape[0])
    logits = model(input_ids, caches=caches)[:, -1]
    out = [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        next_ids = _pick(logits[:, :vocab].float(), temperature, top_k, generator)
        if eos_id is not None:
            next_ids = torch.where(done, torch.full_like(next_ids, eos_id), next_ids)
            done |= next_ids == eos_id
        out.append(next_ids[:, None])
        if eos_id is not None and bool(done.all()):
            break
        logits = model.step(next_ids, caches)
    model.train(was_training)
    return torch.cat(out, dim=1)


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
