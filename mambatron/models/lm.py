"""The Mamba language model: embedding → pre-norm residual blocks (RMSNorm, residual in fp32) → final norm → LM head.

``forward(input_ids (batch, seqlen), seq_idx=None) -> logits (batch, seqlen, padded_vocab // tp)``. ``seq_idx``
(batch, seqlen) int32 marks packed documents; the conv and SSM states reset where it changes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mambatron.config import ModelConfig
from mambatron.models.layers import LayerKind, layer_kinds
from mambatron.models.ops import get_op
from mambatron.parallel.projections import LocalProjections


class RMSNorm(nn.Module):
    """Holds the weight; the fused add + RMSNorm op is applied by the block."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.weight._no_weight_decay = True


class Block(nn.Module):
    """Pre-norm residual block around one layer of any kind (its module is ``mixer``, whatever the kind)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, proj: LocalProjections, kind: LayerKind):
        super().__init__()
        self.cfg = cfg
        self.kind = kind.name
        self.norm = RMSNorm(cfg.d_model)
        proj.mark_sequence_parallel(self.norm.weight)
        self.mixer = kind.build(cfg, layer_idx, proj)

    def _norm(self, hidden: torch.Tensor, residual: torch.Tensor | None):
        rms_norm = get_op("rms_norm", self.cfg.kernels, hidden)
        return rms_norm(
            hidden,
            self.norm.weight,
            None,
            residual=residual,
            eps=self.cfg.norm_eps,
            prenorm=True,
            residual_in_fp32=self.cfg.residual_in_fp32,
        )

    def forward(self, hidden, residual=None, seq_idx=None, cache=None):
        """hidden, residual: (batch, seqlen_local, d_model) → (mixer output, new residual)."""
        hidden, residual = self._norm(hidden, residual)
        return self.mixer(hidden, seq_idx=seq_idx, cache=cache), residual

    def step(self, hidden, residual, cache):
        hidden, residual = self._norm(hidden, residual)
        return self.mixer.step(hidden, cache), residual


class MambaLM(nn.Module):
    def __init__(self, cfg: ModelConfig, proj: LocalProjections | None = None, init: bool = True):
        super().__init__()
        proj = proj or LocalProjections()
        if cfg.padded_vocab_size % proj.tp_size:
            raise ValueError(
                f"tensor-parallel size {proj.tp_size} must divide the padded vocab {cfg.padded_vocab_size}"
            )
        self.cfg = cfg
        self.proj = proj
        self.activation_checkpointing = False
        self.embedding = proj.embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i, proj, kind) for i, kind in enumerate(layer_kinds(cfg)))
        self.norm_f = RMSNorm(cfg.d_model)
        proj.mark_sequence_parallel(self.norm_f.weight)
        if not cfg.tie_embeddings:
            self.lm_head = proj.column(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if init and self.embedding.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter in place (also after ``to_empty`` from the meta device)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embedding.weight.device).manual_seed(seed)
        self.embedding.weight.normal_(0.0, self.cfg.init_std, generator=gen)
        for block in self.layers:
            block.norm.weight.fill_(1.0)
            block.mixer.init_weights(gen)
        self.norm_f.weight.fill_(1.0)
        if not self.cfg.tie_embeddings:
            self.lm_head.weight.normal_(0.0, self.cfg.init_std, generator=gen)

    def _apply(self, fn, recurse=True):
        # Materialising from the meta device (``to_empty``) replaces every Parameter object, which would silently drop
        # what was attached to the old ones at construction: ``_no_weight_decay``, the sequence-parallel tag and the
        # hook that sums such a parameter's gradient over TP. Carry them over to the new objects.
        before = dict(self.named_parameters(remove_duplicate=False))
        out = super()._apply(fn, recurse)
        for name, param in self.named_parameters(remove_duplicate=False):
            old = before.get(name)
            if old is not None and param is not old:
                param.__dict__.update(old.__dict__)
                for hook in (old._backward_hooks or {}).values():
                    param.register_hook(hook)
        return out

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.cfg.tie_embeddings else self.lm_head.weight

    def _final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        rms_norm = get_op("rms_norm", self.cfg.kernels, hidden)
        return rms_norm(
            hidden, self.norm_f.weight, None, residual=residual, eps=self.cfg.norm_eps, prenorm=False,
            residual_in_fp32=self.cfg.residual_in_fp32,
        )  # fmt: skip

    def _final(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.proj.lm_head(self._final_norm(hidden, residual), self.head_weight)

    def _head_loss(self, hidden: torch.Tensor, residual: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over labels >= 0 of the head's logits. On one device the head and the loss run as one
        op (chunked on GPU: the logits are never held whole); vocab-parallel heads go through their own loss."""
        hidden = self._final_norm(hidden, residual)
        if isinstance(self.proj, LocalProjections):
            head_loss = get_op("linear_cross_entropy", self.cfg.kernels, hidden)
            loss = head_loss(hidden, self.head_weight, labels)
        else:
            loss = self.loss_from_logits(self.proj.lm_head(hidden, self.head_weight), labels)
        cp = getattr(self.proj, "cp", None)
        if cp is None:
            return loss
        # Context parallel: this rank holds one slice of each sequence. Scaled so that the mean over the CP group
        # (which the data-parallel gradient average takes) is the mean over every token of the whole sequences.
        count = (labels >= 0).sum().to(loss.dtype)
        return loss * (count * cp.size / cp.sum(count).clamp_min(1))

    def forward(
        self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None, caches: list | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """input_ids: (batch, seqlen) → logits (batch, seqlen, padded_vocab // tp). ``caches`` (one dict per
        layer) is filled with each layer's final conv window and SSM state, for generation. Given ``labels``
        (batch, seqlen), returns the mean next-token loss over labels >= 0 instead of the logits."""
        hidden = self.embedding(input_ids)
        residual = None
        for i, block in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            if self.activation_checkpointing and self.training and cache is None:
                hidden, residual = checkpoint(block, hidden, residual, seq_idx, use_reentrant=False)
            else:
                hidden, residual = block(hidden, residual, seq_idx=seq_idx, cache=cache)
        if labels is not None:
            return self._head_loss(hidden, residual, labels)
        return self._final(hidden, residual)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over labels >= 0. input_ids, labels: (batch, seqlen)."""
        return self(input_ids, seq_idx=seq_idx, labels=labels)

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of (vocab-local) logits (batch, seqlen, vocab // tp) over labels >= 0."""
        per_token = self.proj.cross_entropy(logits, labels)
        return per_token.sum() / (labels >= 0).sum().clamp_min(1)

    def step(self, token_ids: torch.Tensor, caches: list) -> torch.Tensor:
        """One recurrent step: token_ids (batch,) → logits (batch, padded_vocab)."""
        hidden = self.embedding(token_ids)
        residual = None
        for block, cache in zip(self.layers, caches):
            hidden, residual = block.step(hidden, residual, cache)
        return self._final(hidden, residual)

    def empty_caches(self, batch: int) -> list:
        w = self.embedding.weight
        return [block.mixer.empty_cache(batch, w.device, w.dtype) for block in self.layers]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
