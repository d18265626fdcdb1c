"""Typed run configuration: dataclasses loaded from YAML with ``--set a.b=c`` overrides.

Every section is a small dataclass. Derived values (d_inner, dt_rank, nheads, padded vocab) are properties, never
stored twice. Unknown keys and impossible values raise :class:`ConfigError` with a one-line message that names the
field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the field and how to fix it."""


@dataclass(frozen=True)
class AttentionConfig:
    """The attention layers of a hybrid model (``*`` in model.hybrid_pattern): causal, grouped-query."""

    num_heads: int = 32
    num_kv_heads: int = 8
    # Per-head width; null = d_model // num_heads.
    head_dim: int | None = None
    # RoPE base; null = no positional encoding (Nemotron-H and Jamba use none: the Mamba layers carry position).
    rope_theta: float | None = None
    bias: bool = False

    def validate(self) -> None:
        _positive(self, "num_heads", "num_kv_heads")
        if self.head_dim is not None:
            _positive(self, "head_dim")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.attention.num_kv_heads={self.num_kv_heads} must divide model.attention.num_heads="
                f"{self.num_heads} (grouped-query attention shares each KV head among a whole group of query heads)"
            )
        if self.rope_theta is not None:
            _positive(self, "rope_theta")


@dataclass(frozen=True)
class MLPConfig:
    """The MLP layers of a hybrid model (``-`` in model.hybrid_pattern)."""

    # Hidden width; null = 4 * d_model.
    hidden: int | None = None
    # relu2: down(relu(up(x))²) (Nemotron-H); swiglu: down(silu(gate(x)) · up(x)).
    activation: Literal["relu2", "swiglu"] = "relu2"
    bias: bool = False

    def validate(self) -> None:
        if self.hidden is not None:
            _positive(self, "hidden")


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts layers of a hybrid model (``E`` in model.hybrid_pattern).

    Each token goes to its top_k experts (each an MLP of width ``hidden`` with model.mlp.activation) and their outputs
    are summed, weighted by the router's probabilities; ``shared_experts`` more of the same width see every token.
    Routers follow the two Hugging Face targets: ``softmax`` as Jamba (softmax over all experts, the top_k kept
    without renormalising), ``sigmoid`` as Nemotron-H (sigmoid scores, the top_k renormalised to sum to 1).
    """

    num_experts: int = 8
    top_k: int = 2
    # Width of each expert; null = model.mlp.hidden (or 4 * d_model).
    hidden: int | None = None
    shared_experts: int = 0
    router: Literal["softmax", "sigmoid"] = "softmax"
    # Switch-Transformer load-balancing loss: coef * num_experts * sum_e(fraction routed to e * mean score of e).
    aux_loss_coef: float = 0.01
    # Router z-loss (ST-MoE): coef * mean over tokens of logsumexp(router logits)²; 0 = off.
    z_loss_coef: float = 0.0
    # Expert capacity in training, as a multiple of the even share (tokens · top_k / num_experts): an expert keeps the
    # routed tokens with the highest probabilities up to it and drops the rest (megatron-core's drop policy "probs").
    # null = dropless. Evaluation and generation are always dropless, as the Hugging Face targets are.
    capacity_factor: float | None = None
    # Auxiliary-loss-free balancing (DeepSeek-V3; Nemotron-H's e_score_correction_bias; sigmoid router): a per-expert
    # bias added to the scores for choosing the top_k only, moved by this much after every optimizer step towards
    # the even load (sign of the mean count minus the expert's count over the step). 0 = off.
    bias_update_rate: float = 0.0

    def validate(self) -> None:
        _positive(self, "num_experts", "top_k")
        if self.hidden is not None:
            _positive(self, "hidden")
        if self.top_k > self.num_experts:
            raise ConfigError(f"model.moe.top_k={self.top_k} exceeds model.moe.num_experts={self.num_experts}")
        if self.shared_experts < 0:
            raise ConfigError(f"model.moe.shared_experts={self.shared_experts} must be >= 0")
        if self.router not in ("softmax", "sigmoid"):
            raise ConfigError(f"model.moe.router={self.router!r}: use softmax (Jamba) or sigmoid (Nemotron-H)")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            value = getattr(self, name)
            if not (math.isfinite(float(value)) and value >= 0):
                raise ConfigError(f"model.moe.{name}={value} must be a finite number >= 0")
        if self.bias_update_rate > 0 and self.router != "sigmoid":
            raise ConfigError(
                f"model.moe.bias_update_rate={self.bias_update_rate} balances sigmoid routers (Nemotron-H's score "
                "correction bias); set model.moe.router=sigmoid or model.moe.bias_update_rate=0"
            )
        if self.capacity_factor is not None and not (
            math.isfinite(float(self.capacity_factor)) and self.capacity_factor > 0
        ):  # fmt: skip
            raise ConfigError(
                f"model.moe.capacity_factor={self.capacity_factor} must be a finite number > 0 (1.0: each expert takes "
                "its even share of the routed tokens), or null for dropless routing"
            )


@dataclass
class ModelConfig:
    # The Mamba mixer (mambatron/models/layers.py): "mamba1" or "mamba2". Every block is one when hybrid_pattern is
    # empty; otherwise it is the kind of the pattern's "M" layers.
    arch: str = "mamba1"
    # One symbol per layer, each its own pre-norm residual block: "M" the Mamba mixer (arch), "*" attention, "-" MLP,
    # "E" mixture of experts.
    # Empty = n_layer Mamba layers; when set, n_layer must equal its length.
    hybrid_pattern: str = ""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    pad_vocab_multiple: int = 16
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    # Mamba1: rank of the Δ projection; "auto" = ceil(d_model / 16).
    dt_rank: int | Literal["auto"] = "auto"
    # Mamba1: RMS-normalise Δ's low-rank input, B and C before the scan, with this epsilon: weightless as FalconMamba
    # does (FalconMambaForCausalLM), or with learnable weights as Jamba's Mamba layers do (mamba1_inner_norm_weights).
    mamba1_inner_norms: bool = False
    mamba1_inner_norm_eps: float = 1e-6
    mamba1_inner_norm_weights: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    # Mamba2 only.
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    A_init_range: tuple[float, float] = (1.0, 16.0)
    # Keep each chunk's entering SSM state (bf16, batch x nchunks x nheads x headdim x d_state per layer; 67 MB at
    # Mamba2-1.3B's 8 x 2048 tokens) from the forward for the backward instead of recomputing it there: one
    # chunk-state and one state-passing launch less per layer in backward, for that much memory (on one H200: 6.7%
    # more tokens/s at Mamba2-1.3B for 3.2 GB, docs/benchmarks.md). False recomputes them. Triton path only.
    ssd_keep_states: bool = True
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    init_std: float = 0.02
    # Which implementation of the selective scan / SSD / conv / norm ops to run.
    kernels: Literal["auto", "triton", "reference"] = "auto"

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def head_dim_value(self) -> int:
        return self.attention.head_dim or self.d_model // self.attention.num_heads

    @property
    def mlp_hidden(self) -> int:
        return self.mlp.hidden or 4 * self.d_model

    @property
    def moe_hidden(self) -> int:
        return self.moe.hidden or self.mlp_hidden

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def validate(self) -> None:
        _positive(self, "d_model", "n_layer", "vocab_size", "pad_vocab_multiple", "d_state", "d_conv", "expand")
        if self.dt_rank != "auto" and int(self.dt_rank) <= 0:
            raise ConfigError(f"model.dt_rank={self.dt_rank} must be a positive integer or 'auto'")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"model.dt_min={self.dt_min} / model.dt_max={self.dt_max}: need 0 < dt_min <= dt_max")
        from mambatron.models.layers import kinds, layer_kinds  # the kinds import this module

        mixers = sorted(name for name, kind in kinds().items() if kind.symbol == "M")
        if self.arch not in kinds():
            raise ConfigError(f"unknown layer kind {self.arch!r} (model.arch); known kinds: {', '.join(mixers)}")
        if self.arch not in mixers:
            raise ConfigError(f"model.arch={self.arch!r} is not a Mamba mixer; use one of {', '.join(mixers)} "
                              "(attention and MLP layers go in model.hybrid_pattern)")  # fmt: skip
        if self.mamba1_inner_norms and self.arch != "mamba1":
            raise ConfigError(f"model.mamba1_inner_norms=true needs model.arch=mamba1, got {self.arch!r}")
        if self.mamba1_inner_norm_weights and not self.mamba1_inner_norms:
            raise ConfigError("model.mamba1_inner_norm_weights=true needs model.mamba1_inner_norms=true")
        _positive(self, "mamba1_inner_norm_eps")
        if self.hybrid_pattern and self.n_layer != len(self.hybrid_pattern):
            raise ConfigError(
                f"model.n_layer={self.n_layer} but model.hybrid_pattern has {len(self.hybrid_pattern)} symbols; set "
                f"model.n_layer={len(self.hybrid_pattern)}"
            )
        self.attention.validate()
        self.mlp.validate()
        if "E" in self.hybrid_pattern:
            self.moe.validate()
        for kind in {k.name: k for k in layer_kinds(self)}.values():
            problem = kind.config_problem(self)
            if problem:
                raise ConfigError(problem)


@dataclass
class ParallelConfig:
    tp: int = 1
    # Context parallel: each sequence split into cp contiguous slices, one per rank of a CP group
    # (world = DP × TP × CP; the CP ranks of one data-parallel rank read the same batches).
    cp: int = 1
    # Expert parallel: the experts of every MoE layer split over ep ranks, tokens exchanged by all-to-all (the EP
    # ranks are data-parallel ranks for everything else).
    ep: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    # Merged over the DeepSpeed JSON generated from this config, for knobs it does not model
    # (e.g. {"zero_optimization": {"reduce_bucket_size": 5e8}}).
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _positive(self, "tp")
        _positive(self, "cp")
        _positive(self, "ep")
        if not isinstance(self.deepspeed_extra, dict):
            raise ConfigError(f"parallel.deepspeed_extra={self.deepspeed_extra!r} must be a mapping of DeepSpeed keys")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1; set tp or turn it off")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("parallel.offload_params needs parallel.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("parallel.offload_optimizer needs parallel.zero_stage >= 1")


@dataclass
class DataConfig:
    # Path or URL of the index JSON written by tools/prepare_data.py; shards are found relative to it.
    index: str = ""
    tokenizer: str = ""
    seq_len: int = 2048
    micro_batch: int = 8
    num_workers: int = 1
    # Data streams of the train split (each reads its own shards, shuffles and packs); 0: world_size × max(1,
    # num_workers) at the run's first start. A checkpoint's data position resumes exactly on any number of
    # data-parallel ranks × workers that divides it: set e.g. 64 for a run whose node count may change.
    streams: int = 0
    shuffle_buffer: int = 1000
    seed: int = 1234
    skip_bad_shards: bool = False
    # Allow ``pipe:`` (shell command) names in data.index and in a local index's shard list. Off: data never runs
    # code unless asked to. A remote (http) index may never name commands.
    allow_pipe: bool = False
    # Check every shard against the sha256 in the index, hashed as it streams on its first full read in a process.
    verify_shards: bool = True

    def validate(self) -> None:
        _positive(self, "seq_len", "micro_batch")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.streams < 0:
            raise ConfigError(f"data.streams={self.streams} must be >= 0 (0: one per rank and worker)")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer={self.shuffle_buffer} must be >= 0 (0 disables shuffling)")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    # WSD: fraction of max_steps spent in the final decay.
    decay_frac: float = 0.2

    def validate(self) -> None:
        for name in ("lr", "min_lr", "weight_decay", "eps", "grad_clip", "decay_frac"):
            if not math.isfinite(float(getattr(self, name))):
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be a finite number")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.lr={self.lr} / optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")
        if len(self.betas) != 2 or not all(0 <= float(b) < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ConfigError(f"optim.eps={self.eps} must be > 0 and optim.weight_decay={self.weight_decay} >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.decay_frac <= 1:
            raise ConfigError(f"optim.decay_frac={self.decay_frac} must be in [0, 1]")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "mambatron"
    name: str = ""
    entity: str = ""
    # wandb's own console output (banner, run history and summary); the run directory is printed either way.
    verbose: bool = False


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    # Model directory (config.yaml + model.safetensors, e.g. from tools/import_hf.py) to take initial weights from.
    init_from: str = ""
    max_steps: int = 1000
    grad_accum: int = 1
    save_every: int = 500
    keep_last: int = 3
    # Write checkpoints in the background: a save stages the state in host memory and training goes on while it is
    # written (a save waits for the previous one). false: every save returns once the checkpoint is complete.
    async_save: bool = True
    # A step whose loss is non-finite on any rank is skipped (no update); this many in a row stop the run (exit 3).
    max_bad_steps: int = 5
    eval_every: int = 0
    eval_steps: int = 10
    log_every: int = 1
    seed: int = 0
    precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    deterministic: bool = False
    # Used by the planner (--dry-run) to warn when a run will not fit (null: the memory of the GPU of the machine that
    # plans, or 80 without one), and for MFU.
    gpu_memory_gb: float | None = None
    gpu_peak_tflops: float = 989.0
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        _positive(self, "max_steps", "grad_accum", "keep_last", "log_every", "max_bad_steps")
        if self.gpu_memory_gb is not None:
            _positive(self, "gpu_memory_gb")
        if not str(self.out_dir).strip():
            raise ConfigError("train.out_dir is empty; set it to the run's folder, e.g. train.out_dir=runs/my-run")
        if self.save_every < 0 or self.eval_every < 0:
            raise ConfigError("train.save_every and train.eval_every must be >= 0 (0 disables)")


def check_sequence_parallel_seq_len(parallel: ParallelConfig, seq_len: int) -> None:
    """Context parallelism gives each CP rank an equal slice of the sequence, and sequence parallelism each TP rank an
    equal block of that slice: CP, and TP × CP under sequence parallelism, must divide ``seq_len``."""
    tp, cp = parallel.tp, parallel.cp
    if seq_len % cp:
        raise ConfigError(
            f"parallel.cp={cp} splits every sequence into {cp} slices but data.seq_len={seq_len} is not a multiple "
            f"of {cp}; pick a multiple of {cp}"
        )
    if parallel.sequence_parallel and (seq_len // cp) % tp:
        if cp == 1:
            raise ConfigError(
                f"parallel.sequence_parallel splits the sequence over tp={tp} ranks but data.seq_len={seq_len} is not "
                f"a multiple of {tp}; pick a multiple of {tp} or turn sequence_parallel off"
            )
        raise ConfigError(
            f"parallel.sequence_parallel splits each of the cp={cp} slices ({seq_len // cp} tokens) over tp={tp} "
            f"ranks, which does not divide it; pick a data.seq_len that is a multiple of {tp * cp} or turn "
            "sequence_parallel off"
        )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        for section in (self.model, self.parallel, self.data, self.optim, self.train):
            section.validate()
        check_sequence_parallel_seq_len(self.parallel, self.data.seq_len)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (tuples become lists); ``config_from_dict`` reads it back."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _positive(obj: Any, *names: str) -> None:
    section = _SECTION_NAMES.get(type(obj), type(obj).__name__)
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{section}.{name}={value!r} must be a positive number")


_SECTION_NAMES = {
    ModelConfig: "model",
    AttentionConfig: "model.attention",
    MLPConfig: "model.mlp",
    MoEConfig: "model.moe",
    ParallelConfig: "parallel",
    DataConfig: "data",
    OptimConfig: "optim",
    TrainConfig: "train",
    WandbConfig: "train.wandb",
}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of fields, got {value!r}")
        return _build(tp, value, where)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}={value!r} is not one of {list(args)}{hint}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for option in args:
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}={value!r} has the wrong type; expected {tp}")
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where}={value!r} must be a list of {len(args)} values")
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}={value!r} must be a number")
    if tp is str:
        return "" if value is None else str(value)
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            path = f"{where}.{key}" if where else key
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else f"valid keys: {names}"
            raise ConfigError(f"unknown config key '{path}': {hint}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_overrides(overrides: typing.Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → nested dict. Values are parsed as YAML scalars (``true``, ``1e-3``, ``[1, 2]``)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. --set train.max_steps=100)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(value, str) and _FLOAT.fullmatch(value):
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a field inside a non-mapping value")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data or {}, "").validate()


def load_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> Config:
    """Load a YAML config, apply ``key.sub=value`` overrides, validate, and return a :class:`Config`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; pass an existing YAML file (see configs/)")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections (model, data, ...)")
    data = _merge(data, parse_overrides(overrides))
    return config_from_dict(data)
