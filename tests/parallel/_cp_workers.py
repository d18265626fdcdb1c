"""Per-rank bodies of the context-parallel tests (importable by spawned processes)."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from mambatron.parallel.dist import DistInfo, context_parallel
from tests.parallel import _workers as w

CP_SEQLEN = 16


def cp_batch(cfg, seqlen: int = CP_SEQLEN):
    """input_ids, labels, seq_idx (2, seqlen). Row 0: documents start exactly on the middle slice edge (seqlen / 2,
    an edge at CP 2 and 4) and inside the last quarter; row 1: one document from position 1 on, so its state passes
    through every slice edge. Some labels ignored."""
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, cfg.vocab_size, (2, seqlen + 1), generator=gen)
    labels = tokens[:, 1:].clone()
    labels[0, :2] = -100
    labels[1, seqlen // 2] = -100
    seq_idx = torch.zeros(2, seqlen, dtype=torch.int32)
    seq_idx[0, seqlen // 2 :] = 1
    seq_idx[0, 3 * seqlen // 4 + 1 :] = 2
    seq_idx[1, 1:] = 1
    return tokens[:, :-1], labels, seq_idx


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def cp_equivalence(info: DistInfo, cases: list[tuple[str, bool, dict, bool]], dtype=torch.float32) -> dict:
    """For each (arch, sequence_parallel, model overrides, documents), in ``dtype``: the CP model (with TP when
    launched so) on this rank's slice against the CP=1 model on the whole sequence. Logits gathered over CP (and
    vocab under TP), the loss averaged over the CP group, every gradient averaged over CP (as the data-parallel × CP
    gradient average does) and consolidated over TP: the largest relative difference of each."""
    from mambatron.models import build_model
    from mambatron.models.moe import moe_stats
    from mambatron.parallel import LocalProjections
    from mambatron.parallel.megatron import MegatronProjections

    cp = context_parallel(info)
    from megatron.core import parallel_state

    cp_group = parallel_state.get_context_parallel_group()
    results = {}
    for arch, sp, overrides, docs in cases:
        cfg = w.tiny_model_config(arch, **overrides)
        state = w.full_state(cfg)
        ids, labels, seq_idx = cp_batch(cfg)
        seq_idx = seq_idx if docs else None
        ref = w.reference_model(cfg, state).to(dtype)
        ref_logits = ref(ids, seq_idx=seq_idx).detach()
        ref_loss = ref.loss(ids, labels, seq_idx=seq_idx)
        ref_loss.backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        ref_moe = moe_stats(ref)  # MoE metrics (empty without E layers): whole-sequence values
        # fp32's own rounding: the CP=1 model in fp32 against itself in float64, per gradient.
        ref64 = w.reference_model(dataclasses.replace(cfg, kernels="reference"), state).to(torch.float64)
        ref64.loss(ids, labels, seq_idx=seq_idx).backward()
        noise = {n: _rel_norm(ref_grads[n], p.grad) for n, p in ref64.named_parameters()}

        if info.tp_size == 1:
            proj = LocalProjections(cp)
            model = build_model(cfg, projections=proj)
            model.load_state_dict(state)
            model.to(dtype)
        else:
            proj = MegatronProjections(sp, cp=cp)
            model = build_model(cfg, projections=proj)
            model.load_state_dict(w.shard(state, cfg, info.tp_size, info.tp_rank))
        n = CP_SEQLEN // info.cp_size
        part = slice(info.cp_rank * n, (info.cp_rank + 1) * n)
        local_seq = seq_idx[:, part].contiguous() if seq_idx is not None else None
        logits = proj.gather_logits(model(ids[:, part], seq_idx=local_seq)).detach()
        logits = torch.cat(cp.gather(logits), dim=1)
        loss = model.loss(ids[:, part], labels[:, part], seq_idx=local_seq)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, group=cp_group)
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g, group=cp_group)
            grads[name] = g / info.cp_size
        if info.tp_size > 1:
            grads = w.consolidate(w.gather_states(grads, info), cfg)
        moe = moe_stats(model)
        assert set(moe) == set(ref_moe), (moe, ref_moe)
        results[(arch, sp, tuple(sorted(overrides.items())), docs)] = {
            "moe_stats": {k: abs(moe[k] - v) / max(abs(v), 1e-30) for k, v in ref_moe.items()},
            "logits": _rel(logits, ref_logits),
            "loss": abs(mean_loss.item() / info.cp_size - ref_loss.item()) / abs(ref_loss.item()),
            "grads": {name: _rel(grads[name], g) for name, g in ref_grads.items()},
            "grads_norm": {name: _rel_norm(grads[name], g) for name, g in ref_grads.items()},
            "grads_abs": {name: _abs(grads[name], g) for name, g in ref_grads.items()},
            "noise": noise,
        }
    return results


def scans_with_initial_state(info: DistInfo) -> dict:
    """Both scans (the references, float64) over a sequence split across the CP group, started from a given state:
    each slice scans from zero, the incoming states are composed from the slices' summaries and the given state, and
    each slice scans again from its incoming state. Output, final state and the gradients of the inputs and of the
    given state against one scan of the whole sequence: the largest relative difference of each."""
    import torch.nn.functional as F

    from mambatron.kernels.selective_scan.reference import selective_scan_fn_ref
    from mambatron.kernels.ssd.reference import mamba_chunk_scan_combined_ref

    cp = context_parallel(info)
    n = CP_SEQLEN // info.cp_size
    part = slice(info.cp_rank * n, (info.cp_rank + 1) * n)
    gen = torch.Generator().manual_seed(5)
    f64 = dict(dtype=torch.float64)
    seq_idx = torch.zeros(2, CP_SEQLEN, dtype=torch.int32)
    seq_idx[0, CP_SEQLEN // 2 :] = 1  # row 0: a document from a slice edge on; row 1: one document throughout
    results = {}

    # Mamba1: u, delta (batch, dim, L), A (dim, N), B, C (batch, N, L).
    b, d, nst = 2, 3, 4
    u, delta = torch.randn(b, d, CP_SEQLEN, generator=gen, **f64), torch.randn(b, d, CP_SEQLEN, generator=gen, **f64)
    A = -torch.rand(d, nst, generator=gen, **f64) - 0.2
    Bm, Cm = torch.randn(b, nst, CP_SEQLEN, generator=gen, **f64), torch.randn(b, nst, CP_SEQLEN, generator=gen, **f64)
    h0 = torch.randn(b, d, nst, generator=gen, **f64)
    bias = torch.randn(d, generator=gen, **f64) * 0.3
    leaves = [t.requires_grad_() for t in (u, delta, Bm, Cm, h0)]
    gy = torch.randn(b, d, CP_SEQLEN, generator=gen, **f64)
    kw = dict(delta_bias=bias, delta_softplus=True, return_last_state=True)
    y, last = selective_scan_fn_ref(u, delta, A, Bm, Cm, initial_state=h0, seq_idx=seq_idx, **kw)
    full = [y.detach(), last.detach(), *torch.autograd.grad((y * gy).sum() + last.sum(), leaves)]
    sl = lambda t: t[..., part]  # noqa: E731
    _, s_last = selective_scan_fn_ref(sl(u), sl(delta), A, sl(Bm), sl(Cm), seq_idx=seq_idx[:, part], **kw)
    log_decay = A * F.softplus(sl(delta) + bias[:, None]).sum(-1, keepdim=True)
    h_in = cp.incoming_state(s_last, log_decay, seq_idx[:, part], initial_state=h0)
    y, last = selective_scan_fn_ref(sl(u), sl(delta), A, sl(Bm), sl(Cm), initial_state=h_in, seq_idx=seq_idx[:, part],
                                    **kw)  # fmt: skip
    # The whole sequence's final state is the last slice's.
    last_full = cp.gather(last.detach())[-1]
    grads = torch.autograd.grad((y * sl(gy)).sum() + (last.sum() if info.cp_rank == info.cp_size - 1 else 0), leaves)
    grads = [g.clone() for g in grads]
    for g in grads:
        dist.all_reduce(g, group=cp.group)
    got = [torch.cat(cp.gather(y.detach()), dim=-1), last_full, *grads]
    results["selective_scan"] = [_rel(a, e) for a, e in zip(got, full, strict=True)]

    # Mamba2 (SSD): x (batch, L, heads, headdim), dt (batch, L, heads), A (heads,), B, C (batch, L, groups, N).
    h, p, g_, nst = 2, 3, 1, 4
    x = torch.randn(b, CP_SEQLEN, h, p, generator=gen, **f64)
    dt = torch.randn(b, CP_SEQLEN, h, generator=gen, **f64)
    A = -torch.rand(h, generator=gen, **f64) - 0.2
    Bm = torch.randn(b, CP_SEQLEN, g_, nst, generator=gen, **f64)
    Cm = torch.randn(b, CP_SEQLEN, g_, nst, generator=gen, **f64)
    h0 = torch.randn(b, h, p, nst, generator=gen, **f64)
    dt_bias = torch.randn(h, generator=gen, **f64) * 0.3
    leaves = [t.requires_grad_() for t in (x, dt, Bm, Cm, h0)]
    gy = torch.randn(b, CP_SEQLEN, h, p, generator=gen, **f64)
    kw = dict(dt_bias=dt_bias, dt_softplus=True, return_final_states=True)
    y, last = mamba_chunk_scan_combined_ref(x, dt, A, Bm, Cm, 4, initial_states=h0, seq_idx=seq_idx, **kw)
    full = [y.detach(), last.detach(), *torch.autograd.grad((y * gy).sum() + last.sum(), leaves)]
    sl = lambda t: t[:, part]  # noqa: E731
    _, s_last = mamba_chunk_scan_combined_ref(sl(x), sl(dt), A, sl(Bm), sl(Cm), 4, seq_idx=seq_idx[:, part], **kw)
    log_decay = (F.softplus(sl(dt) + dt_bias) * A).sum(1)[:, :, None, None]
    h_in = cp.incoming_state(s_last, log_decay, seq_idx[:, part], initial_state=h0)
    y, last = mamba_chunk_scan_combined_ref(sl(x), sl(dt), A, sl(Bm), sl(Cm), 4, initial_states=h_in,
                                            seq_idx=seq_idx[:, part], **kw)  # fmt: skip
    last_full = cp.gather(last.detach())[-1]
    grads = torch.autograd.grad((y * sl(gy)).sum() + (last.sum() if info.cp_rank == info.cp_size - 1 else 0), leaves)
    grads = [g.clone() for g in grads]
    for g in grads:
        dist.all_reduce(g, group=cp.group)
    got = [torch.cat(cp.gather(y.detach()), dim=1), last_full, *grads]
    results["ssd"] = [_rel(a, e) for a, e in zip(got, full, strict=True)]
    return results


def cp_suite(info: DistInfo, cases: list[tuple[str, bool, dict, bool]], f64_cases=()) -> dict:
    return {
        "info": (info.world_size, info.tp_size, info.cp_size, info.cp_rank, info.dp_size),
        "equivalence": cp_equivalence(info, cases),
        "f64": cp_equivalence(info, f64_cases, torch.float64),
        "initial_state": scans_with_initial_state(info) if info.tp_size == 1 else None,
    }
