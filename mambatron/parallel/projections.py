"""The projections a model is built from: the only place that decides between single-device and tensor-parallel.

Mixers and the LM never see a process group. They ask a :class:`Projections` object for their linear layers,
embedding, LM head and loss, and size their local parameters with ``tp_size``:

- ``column(in_f, out_f, bias)``: input ``(batch, seqlen_local, in_f)`` (sequence-sharded under sequence
  parallelism, gathered inside), output ``(batch, seqlen, out_f // tp)``.
- ``row(in_f, out_f, bias, scatter=True)``: input ``(batch, seqlen, in_f // tp)``; output reduced over TP,
  ``(batch, seqlen_local, out_f)`` (reduce-scattered along the sequence under SP). ``scatter=False`` always
  all-reduces and keeps the full sequence (Mamba1's small x_proj output); it is for outputs that every rank
  consumes with its own channels, so their gradient is summed over TP as well.
- ``embedding(vocab, dim)``: ``(batch, seqlen)`` ids → ``(batch, seqlen_local, dim)``.
- ``lm_head(hidden, weight)``: ``(batch, seqlen_local, dim)`` → vocab-local logits ``(batch, seqlen, vocab // tp)``.
- ``cross_entropy(logits_local, labels)`` → per-token loss ``(batch, seqlen)``; labels ``< 0`` are ignored.
- ``gather_logits(logits_local)`` → full-vocab logits.
- ``cp``: the :class:`~mambatron.parallel.context.ContextParallel` of this rank, or None without context
  parallelism (the layers that mix along the sequence exchange slice edges through it).
- ``mark_sequence_parallel(param)``: tags parameters used in sequence-sharded regions (norm weights) so their
  gradients are reduced over TP.
- ``sum_grad_over_tp(param)``: for a parameter replicated on every TP rank that acts on values every rank holds in
  full but whose gradient each rank sees only through its own channels (Jamba's dt/B/C norm weights on x_proj's
  all-reduced output): its gradient is summed over TP as autograd produces it.

:class:`LocalProjections` is the TP=1 implementation; ``mambatron.parallel.megatron`` provides the megatron-core one
(``mambatron.parallel.build_projections`` picks). A single token ``(batch, in_f)`` (recurrent generation) is accepted
everywhere without sequence parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambatron.kernels._common import bias_grad, weight_grad


def foldable(linear: nn.Module) -> bool:
    """Whether ``linear`` is a plain single-device ``nn.Linear`` (or :class:`Linear`), whose weight a fused op may
    apply itself. The tensor-parallel layers communicate around their GEMM, so they must run as modules."""
    return type(linear) in (nn.Linear, Linear)


class _HalfLinear(torch.autograd.Function):
    """F.linear in a half dtype with full-precision parameters, as autocast runs it, but with the weight and bias
    gradients produced in the parameters' dtype (:func:`weight_grad`) instead of cast to it afterwards."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        w = weight.to(dtype)
        ctx.save_for_backward(x, w)
        ctx.param_dtype = weight.dtype
        ctx.has_bias = bias is not None
        return F.linear(x, w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, dout):
        x, w = ctx.saved_tensors
        dout2 = dout.reshape(-1, dout.shape[-1])
        dx = torch.matmul(dout, w) if ctx.needs_input_grad[0] else None
        dw = weight_grad(dout2, x.reshape(-1, x.shape[-1]), ctx.param_dtype) if ctx.needs_input_grad[1] else None
        db = bias_grad(dout2, ctx.param_dtype) if ctx.has_bias else None
        return dx, dw, db, None


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose autocast path keeps fp32 weight gradients fp32 end to
    end: see :class:`_HalfLinear`. Outside autocast, or with half-precision parameters, it is ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        if dtype not in (torch.bfloat16, torch.float16) or self.weight.dtype != torch.float32:
            return super().forward(x)
        return _HalfLinear.apply(x.to(dtype), self.weight, self.bias, dtype)


class _FeatureMajorLinear(torch.autograd.Function):
    """W·xᵀ (+ b) for x (rows, in_f): (out_f, rows). Backward gives dx as dyᵀ·W, already (rows, in_f) row-major, so
    the layer below receives a contiguous gradient instead of a transposed one."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = torch.matmul(weight, x.t())
        return out if bias is None else out.add_(bias[:, None])

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        dx = torch.matmul(dout.t(), weight)
        dweight = torch.matmul(dout, x)
        dbias = (
            dout.sum(1, dtype=torch.promote_types(dout.dtype, torch.float32)).to(dout.dtype) if ctx.has_bias else None
        )
        return dx, dweight, dbias


def feature_major(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` for x (batch, seqlen, in_f), as a (batch, seqlen, out_f) tensor laid out feature-major in
    memory, (out_f, batch, seqlen): each feature's sequence is contiguous, which is what the sequence kernels read.

    A plain ``nn.Linear`` computes it as W·xᵀ, one GEMM with no copy either way (under autocast in its dtype, as
    F.linear would be); other modules (the tensor-parallel ones) return their usual channel-last output, which
    consumers must also accept.
    """
    if not foldable(linear) or x.dim() != 3:
        return linear(x)
    batch, seqlen, _ = x.shape
    weight, bias = linear.weight, linear.bias
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    out = _FeatureMajorLinear.apply(x.reshape(batch * seqlen, -1), weight, bias)  # (out_f, batch * seqlen)
    return out.view(-1, batch, seqlen).permute(1, 2, 0)


class LocalProjections:
    tp_size = 1
    tp_rank = 0
    sequence_parallel = False

    def __init__(self, cp=None, ep: int = 1):
        # Context parallel (mambatron.parallel.context.ContextParallel) for the layers that mix along the sequence.
        self.cp = cp
        # Expert parallel size: MoE layers split their experts over this many data-parallel ranks.
        self.ep_size = ep

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, bias: bool = False, scatter: bool = True) -> nn.Module:
        return Linear(in_features, out_features, bias=bias)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return nn.Embedding(vocab_size, dim)

    def lm_head(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, weight.to(hidden.dtype))

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = logits.flatten(0, -2)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # the softmax of a 50k vocabulary needs fp32
        loss = F.cross_entropy(flat, labels.clamp_min(0).flatten().long(), reduction="none")
        return loss.view(labels.shape) * (labels >= 0)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def mark_sequence_parallel(self, param: nn.Parameter) -> None:
        return None

    def sum_grad_over_tp(self, param: nn.Parameter) -> None:
        return None
