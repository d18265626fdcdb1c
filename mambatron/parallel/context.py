"""Context parallelism: each sequence split into ``size`` contiguous slices, one per rank of a CP group.

Rank r of a CP group holds positions ``[r·L, (r+1)·L)`` of every sequence (L = seq_len / cp). The layers that mix
along the sequence exchange only what crosses a slice edge:

- **conv1d** reads the previous rank's last ``d_conv − 1`` inputs (:meth:`ContextParallel.with_halo`); rank 0 reads
  zeros, and a document boundary is respected through the halo's ``seq_idx``.
- **SSM state passing** (:meth:`ContextParallel.incoming_state`): each rank scans its slice from a zero state and
  shares that slice's final state and total log-decay (O(state) bytes per layer). The state entering rank r is
  composed from the earlier slices, h_in(r) = Σ_{j<r} (Π_{j<k<r} decay_k) · S_j, where a ``seq_idx`` document
  boundary inside (or at the start of) a slice cuts the chain. The rank then scans again from h_in, which is exact,
  and the kernels' initial-state gradient carries the backward to the earlier ranks' summaries.
- **attention** gathers keys and values of the slices up to its own (:meth:`ContextParallel.prefix`), so its
  queries are the last L positions of that prefix, as the causal/document mask expects.

Every exchange is an all-gather whose backward sums the gradients over the group and keeps this rank's part, so
gradients flow back to the ranks that produced each piece. That backward is a collective, so every rank's graph
uses every gather (rank 0 reads its zeros through them), or the ranks' backward collectives would fall out of step.
Built by :mod:`mambatron.parallel.dist` (megatron-core's context-parallel groups) and handed to the models through
their projections (``proj.cp``); ``None`` means no CP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherWithGrad(torch.autograd.Function):
    """All-gather of equally shaped tensors; backward sums every rank's gradient of the gathered list and returns
    this rank's part (each piece's gradient reaches the rank that contributed it)."""

    @staticmethod
    def forward(ctx, group, rank, tensor):
        ctx.group, ctx.rank, ctx.like = group, rank, torch.zeros_like(tensor)
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        stacked = torch.stack([ctx.like if g is None else g for g in grads]).contiguous()
        dist.all_reduce(stacked, group=ctx.group)
        return None, None, stacked[ctx.rank]


class ContextParallel:
    """This rank's place in its CP group, and the exchanges the sequence-mixing layers need."""

    def __init__(self, group: dist.ProcessGroup | None, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on all), differentiable."""
        if tensor.requires_grad and torch.is_grad_enabled():
            return list(_GatherWithGrad.apply(self.group, self.rank, tensor))
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return parts

    def start(self, local_len: int) -> int:
        """The position of this slice's first token in the whole sequence."""
        return self.rank * local_len

    def with_halo(
        self, x: torch.Tensor, width: int, dim: int, seq_idx: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x with the previous rank's last ``width`` entries along ``dim`` (time) in front, zeros on rank 0; and
        seq_idx (batch, L) extended the same way (rank 0's halo takes its first document: zeros add nothing)."""
        if width == 0:
            return x, seq_idx
        tails = self.gather(x.narrow(dim, x.shape[dim] - width, width))
        # Rank 0 reads zeros, through the gathered tensor all the same: every rank's backward must run the gather's
        # collective, or the ranks' collectives fall out of step.
        halo = tails[self.rank - 1] if self.rank > 0 else tails[0] * 0
        x = torch.cat([halo, x], dim=dim)
        if seq_idx is not None:
            seq_tails = self.gather(seq_idx[:, -width:])
            seq_halo = seq_tails[self.rank - 1] if self.rank > 0 else seq_idx[:, :1].expand(-1, width)
            seq_idx = torch.cat([seq_halo, seq_idx], dim=1)
        return x, seq_idx

    def causal_conv(self, conv, x: torch.Tensor, weight: torch.Tensor, bias, seq_idx: torch.Tensor | None):
        """``conv`` (a causal_conv1d_fn with SiLU) over this slice of x (batch, dim, L): the previous rank's last
        ``width − 1`` inputs in front (:meth:`with_halo`), their outputs dropped."""
        halo = weight.shape[-1] - 1
        x, seq_idx = self.with_halo(x, halo, 2, seq_idx)
        return conv(x, weight, bias, seq_idx=seq_idx, activation="silu")[..., halo:]

    def incoming_state(
        self,
        final_state: torch.Tensor,
        log_decay: torch.Tensor,
        seq_idx: torch.Tensor | None,
        initial_state: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The exact state entering this slice.

        final_state: (batch, *state) this slice's final state scanned from a zero state (fp32); log_decay: the
        slice's total log-decay, broadcastable to final_state; seq_idx (batch, L) or None; initial_state: the state
        entering the whole sequence (the same on every rank), None for zeros. Differentiable in every rank's
        final_state and log_decay, and in initial_state (each rank's gradient of it is a part to be summed).
        """
        batch = final_state.shape[0]
        ones = (1,) * (final_state.dim() - 1)
        states = self.gather(final_state)
        decays = self.gather(torch.exp(log_decay).contiguous())  # as small as its broadcast shape
        if seq_idx is None:
            continues = [torch.ones(batch, dtype=torch.bool, device=final_state.device)] * self.size
            whole = continues
        else:
            firsts = self.gather(seq_idx[:, 0].contiguous())
            lasts = self.gather(seq_idx[:, -1].contiguous())
            # Whether slice j's first token continues slice j−1's last document, and whether slice j is one document.
            continues = [torch.ones_like(firsts[0], dtype=torch.bool)] + [
                firsts[j] == lasts[j - 1] for j in range(1, self.size)
            ]
            whole = [w.bool() for w in self.gather((seq_idx == seq_idx[:, :1]).all(dim=1).to(torch.int32))]
        state = (states[0] + decays[0]) * 0  # zeros that keep both gathers in every rank's backward (see with_halo)
        if initial_state is not None:
            state = state + initial_state
        for j in range(self.rank):
            # What enters slice j survives to its end only if it continues there and no document starts inside.
            keep = (continues[j] & whole[j]).to(state.dtype).view(batch, *ones)
            state = state * decays[j] * keep + states[j]
        return state * continues[self.rank].to(state.dtype).view(batch, *ones) if self.rank else state

    def prefix(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """The slices of ranks 0..rank concatenated along ``dim`` (keys and values of causal attention)."""
        return torch.cat(self.gather(tensor)[: self.rank + 1], dim=dim)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """A non-differentiable sum over the group (token counts)."""
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor, group=self.group)
        return tensor
