"""Data path: tokenizers, text → WebDataset shards, and the streaming loader with packing and exact resume."""

from mambatron.data.shards import (
    DataIndexError,
    DataPositionError,
    ShardError,
    ShardLoader,
    build_loader,
    iter_shard,
    merge_states,
    read_index,
    shard_infos,
)
from mambatron.data.tokenizers import Tokenizer, TokenizerError, load_tokenizer, tokenizer_hash, train_tokenizer

__all__ = [
    "DataIndexError",
    "DataPositionError",
    "ShardError",
    "ShardLoader",
    "Tokenizer",
    "TokenizerError",
    "build_loader",
    "iter_shard",
    "load_tokenizer",
    "merge_states",
    "read_index",
    "shard_infos",
    "tokenizer_hash",
    "train_tokenizer",
]
