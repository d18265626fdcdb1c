"""Parallelism, decided in one place: process groups, tensor/sequence-parallel projections, ZeRO, consolidation.

- :mod:`.dist`: torchrun/SLURM environment → torch.distributed + megatron-core parallel_state (:class:`DistInfo`).
- :mod:`.projections` / :mod:`.megatron`: the projection factory the models are built from (TP=1 / TP>1).
- :mod:`.zero`: DeepSpeed ZeRO 0-3 engine over the data-parallel group.
- :mod:`.consolidate`: TP shards ↔ full (TP=1) state dicts, and module states out of ZeRO checkpoints.

megatron-core and DeepSpeed are imported lazily, so ``import mambatron.parallel`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mambatron.config import ConfigError, ModelConfig, ParallelConfig, check_sequence_parallel_seq_len
from mambatron.parallel.projections import LocalProjections

if TYPE_CHECKING:
    from mambatron.parallel.megatron import MegatronProjections

__all__ = ["ConfigError", "LocalProjections", "build_projections", "validate_parallel"]


def validate_parallel(
    model_cfg: ModelConfig, parallel_cfg: ParallelConfig, world_size: int | None = None, seq_len: int | None = None
) -> None:
    """Reject a model/parallel layout that cannot be sharded, before anything is allocated.

    Checks that TP divides d_inner (Mamba1), nheads and ngroups (Mamba2) and the padded vocab, that the world
    size (when given) is a multiple of TP × CP, and (when ``seq_len`` is given) that CP divides it into slices no
    shorter than the conv1d halo, each of which TP divides under sequence parallelism.
    Raises :class:`ConfigError` with a one-line message naming the fix.
    """
    parallel_cfg.validate()
    tp, cp, ep = parallel_cfg.tp, parallel_cfg.cp, parallel_cfg.ep
    if ep > 1:
        _check_expert_parallel(model_cfg, parallel_cfg, world_size)
    if seq_len is not None:
        check_sequence_parallel_seq_len(parallel_cfg, seq_len)
        if cp > 1 and seq_len // cp < model_cfg.d_conv - 1:
            raise ConfigError(
                f"parallel.cp={cp} leaves {seq_len // cp} tokens per slice, fewer than the conv1d halo of "
                f"model.d_conv-1={model_cfg.d_conv - 1}; use a smaller cp or a longer data.seq_len"
            )
    if world_size is not None and (world_size < 1 or world_size % (tp * cp)):
        if cp == 1:
            raise ConfigError(
                f"WORLD_SIZE={world_size} is not a multiple of parallel.tp={tp}; launch a multiple of {tp} processes "
                f"or set parallel.tp to a divisor of {world_size}"
            )
        raise ConfigError(
            f"WORLD_SIZE={world_size} is not a multiple of parallel.tp × parallel.cp = {tp} × {cp}; launch a "
            f"multiple of {tp * cp} processes"
        )
    if tp == 1:
        return
    from mambatron.models.layers import layer_kinds

    for kind in {k.name: k for k in layer_kinds(model_cfg)}.values():
        problem = kind.tp_problem(model_cfg, tp)
        if problem:
            raise ConfigError(problem)
    if model_cfg.padded_vocab_size % tp:
        raise ConfigError(
            f"parallel.tp={tp} does not divide the padded vocab {model_cfg.padded_vocab_size}; "
            f"set model.pad_vocab_multiple to a multiple of {tp}"
        )


def _check_expert_parallel(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, world_size: int | None) -> None:
    ep = parallel_cfg.ep
    if "E" not in model_cfg.hybrid_pattern:
        raise ConfigError(
            f"parallel.ep={ep} but the model has no MoE layers (E in model.hybrid_pattern); set parallel.ep=1"
        )
    if model_cfg.moe.num_experts % ep:
        raise ConfigError(
            f"parallel.ep={ep} does not divide model.moe.num_experts={model_cfg.moe.num_experts}; each EP rank holds "
            "an equal share of the experts"
        )
    tp = parallel_cfg.tp
    if parallel_cfg.cp > 1 and tp > 1:
        raise ConfigError("parallel.ep > 1 with parallel.cp > 1 runs with parallel.tp=1 for now; set one of them to 1")
    if tp > 1 and (ep != tp or not parallel_cfg.sequence_parallel):
        # Megatron-core's expert layout with experts not split by TP: EP groups are consecutive ranks, so with EP = TP
        # each TP group holds every expert once, over ranks that see different tokens (sequence parallel).
        raise ConfigError(
            f"parallel.ep={ep} with parallel.tp={tp} needs parallel.ep equal to parallel.tp and "
            "parallel.sequence_parallel=true (the experts are split over each TP group); set parallel.ep="
            f"{tp} and parallel.sequence_parallel=true, or parallel.tp=1"
        )
    if world_size is not None and world_size % ep:
        raise ConfigError(f"WORLD_SIZE={world_size} is not a multiple of parallel.ep={ep}; launch a multiple of {ep}")


def build_projections(
    parallel_cfg: ParallelConfig, *, init_std: float = 0.02, cp=None
) -> LocalProjections | MegatronProjections:
    """The projection factory for this run: :class:`LocalProjections` at TP=1, megatron-core layers at TP>1
    (megatron's parallel_state must be initialised, see :func:`mambatron.parallel.dist.setup`); ``cp`` is this
    rank's context-parallel group (:func:`mambatron.parallel.dist.context_parallel`), None without CP."""
    if parallel_cfg.tp == 1:
        return LocalProjections(cp, ep=parallel_cfg.ep)
    from mambatron.parallel.megatron import MegatronProjections

    return MegatronProjections(parallel_cfg.sequence_parallel, init_std=init_std, cp=cp, ep=parallel_cfg.ep)
