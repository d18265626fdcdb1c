"""TP-sharded module states ↔ one full (TP=1) state dict, and module states out of DeepSpeed ZeRO checkpoints.

The full state dict is the single-device model's, with exactly its parameter names (it feeds the Hugging Face
export). Each parameter has one layout, looked up from its name:

- *split*: cut along ``dim`` into TP blocks, component by component. A fused projection is several components
  laid end to end (Mamba1 in_proj ``[x | z]``, Mamba2 in_proj ``[z | x | B | C | dt]``, Mamba2 conv ``[x | B | C]``),
  and a rank's local tensor holds its block of every component, in the same order. Column-parallel weights and
  per-channel slices split dim 0; row-parallel weights split dim 1 (the reduced input dimension).
- *replicated*: the same on every rank (block norms, final norm, row-parallel biases, x_proj's bias).
"""

from __future__ import annotations

import glob
import os
import re
import tempfile

import torch
from torch import nn

from mambatron.config import ModelConfig
from mambatron.parallel.layout import REPLICATED, Layout
from mambatron.parallel.projections import LocalProjections
from mambatron.serialization import load as safe_load
from mambatron.serialization import safe_torch_load

StateDict = dict[str, torch.Tensor]


_EXTRA_STATE = "_extra_state"


def param_layout(name: str, model_cfg: ModelConfig) -> Layout:
    """The :class:`Layout` of full-state parameter ``name``; raises KeyError for a name it does not know."""
    c = model_cfg
    if name in ("embedding.weight", "lm_head.weight"):
        return Layout(0, (c.padded_vocab_size,))
    if name == "norm_f.weight" or re.fullmatch(r"layers\.\d+\.norm\.weight", name):
        return REPLICATED
    m = re.fullmatch(r"layers\.(\d+)\.mixer\.(.+)", name)
    if m is None:
        raise KeyError(f"no tensor-parallel layout for parameter {name!r}")
    index, leaf = int(m.group(1)), m.group(2)
    from mambatron.models.layers import layer_kinds

    kinds = layer_kinds(c)
    if index >= len(kinds):
        raise KeyError(f"parameter {name!r} is past the model's {len(kinds)} layers")
    table = kinds[index].tp_layouts(c)
    if leaf not in table:
        raise KeyError(f"no tensor-parallel layout for parameter {name!r} ({kinds[index].name})")
    return table[leaf]


def shard_tensor(full: torch.Tensor, layout: Layout, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This rank's block of ``full`` (component by component along ``layout.dim``)."""
    if layout.replicated or tp_size == 1:
        return full.clone()
    _check_sizes(full, layout, tp_size)
    parts = torch.split(full, list(layout.components), dim=layout.dim)
    return torch.cat([p.chunk(tp_size, dim=layout.dim)[tp_rank] for p in parts], dim=layout.dim).contiguous()


def unshard_tensor(shards: list[torch.Tensor], layout: Layout) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor from every rank's block (in TP-rank order)."""
    tp_size = len(shards)
    if layout.replicated or tp_size == 1:
        return shards[0].clone()
    local_sizes = [s // tp_size for s in layout.components]
    per_rank = [torch.split(s, local_sizes, dim=layout.dim) for s in shards]
    pieces = [per_rank[r][i] for i in range(len(local_sizes)) for r in range(tp_size)]
    return torch.cat(pieces, dim=layout.dim).contiguous()


def shard(full_state: StateDict, model_cfg: ModelConfig, tp_size: int, tp_rank: int) -> StateDict:
    """Full (TP=1) state dict → the module state of TP rank ``tp_rank`` of ``tp_size``."""
    return {
        name: shard_tensor(t, param_layout(name, model_cfg), tp_size, tp_rank)
        for name, t in full_state.items()
        if not name.endswith(_EXTRA_STATE)
    }


def consolidate(shard_states: list[StateDict], model_cfg: ModelConfig) -> StateDict:
    """TP-sharded module states (one per TP rank, in rank order) → the full (TP=1) state dict."""
    names = [n for n in shard_states[0] if not n.endswith(_EXTRA_STATE)]
    for rank, state in enumerate(shard_states[1:], start=1):
        if {n for n in state if not n.endswith(_EXTRA_STATE)} != set(names):
            raise ValueError(f"TP rank {rank}'s state has different parameter names than rank 0's")
    return {name: unshard_tensor([s[name] for s in shard_states], param_layout(name, model_cfg)) for name in names}


_EXPERT_PARAM = re.compile(r"(^|\.)mixer\.experts\.fc[12]$")


def is_expert_param(name: str) -> bool:
    """The routed experts' stacked weights (``layers.N.mixer.experts.fc1/fc2``, experts first): what expert
    parallelism splits over ranks. Everything else, shared experts included, is replicated over an EP group."""
    return _EXPERT_PARAM.search(name) is not None


def expert_parallel_slice(full: StateDict, ep_size: int, ep_rank: int) -> StateDict:
    """EP rank ``ep_rank``'s state from a full one: its consecutive share of every expert stack, the rest whole."""
    out = {}
    for name, value in full.items():
        if is_expert_param(name):
            if value.shape[0] % ep_size:
                raise ValueError(f"{name}: {value.shape[0]} experts do not split over {ep_size} EP ranks")
            value = value.chunk(ep_size, dim=0)[ep_rank]
        out[name] = value.clone()
    return out


def merge_expert_parallel(ep_states: list[StateDict]) -> StateDict:
    """The module states of an EP group's ranks (in rank order) → the full state: expert stacks concatenated,
    everything else (replicated) from rank 0."""
    names = [n for n in ep_states[0] if not n.endswith(_EXTRA_STATE)]
    for rank, state in enumerate(ep_states[1:], start=1):
        if {n for n in state if not n.endswith(_EXTRA_STATE)} != set(names):
            raise ValueError(f"EP rank {rank}'s state has different parameter names than rank 0's")
    return {n: torch.cat([s[n] for s in ep_states]) if is_expert_param(n) else ep_states[0][n] for n in names}


def merge_model_parallel(mp_states: list[StateDict], model_cfg: ModelConfig, tp: int, ep: int) -> StateDict:
    """The module states of a run's DeepSpeed model-parallel ranks (in rank order) → the full (TP 1, EP 1) state.
    Those ranks are TP ranks (``ep`` 1), EP ranks (``tp`` 1), or both at once (EP = TP: each TP rank holds its
    share of the expert stacks, which are concatenated, and its TP block of everything else)."""
    if ep == 1:
        return consolidate(mp_states, model_cfg)
    merged = merge_expert_parallel(mp_states)
    if tp == 1:
        return merged
    if tp != ep or len(mp_states) != tp:
        raise ValueError(f"{len(mp_states)} model-parallel states of a run at TP {tp} × EP {ep}: expected EP = TP")
    full = consolidate(mp_states, model_cfg)
    full.update({name: value for name, value in merged.items() if is_expert_param(name)})
    return full


def reshard(shard_states: list[StateDict], model_cfg: ModelConfig, tp_size: int) -> list[StateDict]:
    """Module states at one TP size → module states at ``tp_size`` (one per rank)."""
    full = consolidate(shard_states, model_cfg)
    return [shard(full, model_cfg, tp_size, r) for r in range(tp_size)]


@torch.no_grad()
def init_weights_like_tp1(
    model: nn.Module, model_cfg: ModelConfig, seed: int, tp_size: int, tp_rank: int, ep_size: int = 1, ep_rank: int = 0
) -> None:  # fmt: skip
    """Initialise a (TP-sharded) ``MambaLM`` in place with this rank's shard of exactly the weights that a TP=1
    model gets from ``init_weights(seed)`` on CPU, so a run starts identically at every TP size (and, with experts
    split over the TP group, ``ep_size`` > 1, this rank's share of every expert stack).

    The full weights are drawn one block at a time in the TP=1 model's order (embedding, then every block, then
    the untied head); no full model is ever held.
    """
    from mambatron.models.layers import layer_kinds
    from mambatron.models.lm import Block

    def load(name: str, full: torch.Tensor) -> None:
        local = shard_tensor(full, param_layout(name, model_cfg), tp_size, tp_rank)
        if ep_size > 1 and is_expert_param(name):
            local = local.chunk(ep_size, dim=0)[ep_rank]
        model.get_parameter(name).copy_(local)

    gen = torch.Generator(device="cpu").manual_seed(seed)
    c = model_cfg
    # Constructing the TP=1 blocks runs torch's default init on the global generator; a TP=1 run (built on the meta
    # device, initialised from ``gen``) does not touch it, so neither may this.
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):
        load("embedding.weight", torch.empty(c.padded_vocab_size, c.d_model).normal_(0.0, c.init_std, generator=gen))
        for i, kind in enumerate(layer_kinds(c)):
            block = Block(c, i, LocalProjections(), kind)
            block.norm.weight.fill_(1.0)
            block.mixer.init_weights(gen)
            for name, full in block.state_dict().items():
                load(f"layers.{i}.{name}", full)
            del block
        model.get_parameter("norm_f.weight").fill_(1.0)
        if not c.tie_embeddings:
            head = torch.empty(c.padded_vocab_size, c.d_model).normal_(0.0, c.init_std, generator=gen)
            load("lm_head.weight", head)


def saved_mp_ranks(step_dir: str | os.PathLike) -> list[int]:
    """The TP (``mp_rank_XX``) ranks a DeepSpeed checkpoint folder holds files of."""
    files = glob.glob(os.path.join(step_dir, "*mp_rank_*_model_states.pt"))
    mp_ranks = sorted({int(re.search(r"mp_rank_(\d+)_model_states", os.path.basename(f)).group(1)) for f in files})
    if not mp_ranks:
        raise FileNotFoundError(f"no '*mp_rank_XX_model_states.pt' files in {str(step_dir)!r}")
    return mp_ranks


def mp_rank_files(step_dir: str | os.PathLike, mp_rank: int) -> list[str]:
    """Every model- and optimizer-states file of TP rank ``mp_rank`` (all its data-parallel ranks)."""
    return sorted(glob.glob(os.path.join(step_dir, f"*mp_rank_{mp_rank:02d}_*states.pt")))


def link_mp_rank(step_dir: str | os.PathLike, mp_rank: int, view: str | os.PathLike) -> None:
    """Make ``view`` a folder of links to TP rank ``mp_rank``'s files only: DeepSpeed's readers take every file of a
    folder, and refuse (or merge wrongly) TP > 1 checkpoints as a whole."""
    os.makedirs(view)
    for path in mp_rank_files(step_dir, mp_rank):
        os.symlink(os.path.abspath(path), os.path.join(view, os.path.basename(path)))


def zero_checkpoint_module_states(checkpoint_dir: str, tag: str | None = None) -> list[StateDict]:
    """fp32 module states, one per TP (``mp_rank_XX``) rank, from a DeepSpeed checkpoint at ``checkpoint_dir/tag``
    (``tag`` defaults to the one named in ``checkpoint_dir/latest``).

    ZeRO 1-3: the fp32 master weights are gathered from the data-parallel partitions with DeepSpeed's
    ``get_fp32_state_dict_from_zero_checkpoint``, one TP rank at a time (it refuses TP > 1 checkpoints as a whole).
    Without ZeRO partitions (stage 0) the module weights saved in ``mp_rank_XX_model_states.pt`` are used, cast
    to fp32: exact for fp32 training, the bf16 weights (not the fp32 masters) for bf16 training.
    """
    if tag is None:
        with open(os.path.join(checkpoint_dir, "latest")) as f:
            tag = f.read().strip()
    step_dir = os.path.join(checkpoint_dir, tag)
    return [_module_state_for_mp_rank(step_dir, mp) for mp in saved_mp_ranks(step_dir)]


def consolidate_zero_checkpoint(checkpoint_dir: str, model_cfg: ModelConfig, tag: str | None = None) -> StateDict:
    """The full (TP=1, EP=1) fp32 state dict of a (TP-sharded or expert-parallel, ZeRO-partitioned) DeepSpeed
    checkpoint. DeepSpeed's model-parallel ranks are TP ranks, EP ranks (``ExpertParallelMPU``) or both (EP = TP);
    the run's manifest says which (:func:`merge_model_parallel`)."""
    if tag is None:
        with open(os.path.join(checkpoint_dir, "latest")) as f:
            tag = f.read().strip()
    states = zero_checkpoint_module_states(checkpoint_dir, tag)
    manifest = _manifest(os.path.join(checkpoint_dir, tag))
    ep = int(manifest.get("ep", 1))
    return merge_model_parallel(states, model_cfg, int(manifest.get("tp", 1 if ep > 1 else len(states))), ep)


def _module_state_for_mp_rank(step_dir: str, mp_rank: int) -> StateDict:
    from mambatron.serialization import before_deepspeed_import

    before_deepspeed_import()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    suffix = f"mp_rank_{mp_rank:02d}"
    optim_files = glob.glob(os.path.join(step_dir, f"*{suffix}_optim_states.pt"))
    if optim_files:
        with tempfile.TemporaryDirectory() as tmp:
            link_mp_rank(step_dir, mp_rank, os.path.join(tmp, "step"))
            try:
                with safe_torch_load():  # zero_to_fp32 would unpickle with weights_only=False
                    return _as_fp32(get_fp32_state_dict_from_zero_checkpoint(tmp, tag="step"))
            except ValueError:
                pass  # not ZeRO-partitioned (e.g. stage 0): the saved module weights are complete
    model_files = sorted(glob.glob(os.path.join(step_dir, f"*{suffix}_model_states.pt")))
    model_states = safe_load(model_files[0])
    module = model_states["module"]
    optimizer = model_states.get("optimizer") or {}
    names = _manifest(step_dir).get("optimizer_param_names")
    from mambatron.train.elastic import fp16_style_masters, is_fp16_style_state

    if is_fp16_style_state(optimizer) and names:
        # bf16 without ZeRO: the module holds bf16 copies; the fp32 master weights are in the optimizer's state.
        masters, _ = fp16_style_masters(optimizer, names, {k: v.shape for k, v in module.items()})
        module = {**module, **{k: v["weights"] for k, v in masters.items()}}
    return _as_fp32(module)


def _manifest(step_dir: str) -> dict:
    """The training run's manifest of a checkpoint folder, or {} (a checkpoint written by something else)."""
    from mambatron.train.checkpoint import read_manifest

    try:
        return read_manifest(step_dir)
    except (OSError, ValueError):
        return {}


def _as_fp32(state: StateDict) -> StateDict:
    return {
        k: v.float() if v.is_floating_point() else v
        for k, v in state.items()
        if not k.endswith(_EXTRA_STATE) and v is not None
    }


def _check_sizes(full: torch.Tensor, layout: Layout, tp_size: int) -> None:
    if full.shape[layout.dim] != sum(layout.components):
        raise ValueError(
            f"tensor of shape {tuple(full.shape)} does not match components {layout.components} along dim {layout.dim}"
        )
    if any(s % tp_size for s in layout.components):
        raise ValueError(f"tp={tp_size} does not divide the components {layout.components}")
