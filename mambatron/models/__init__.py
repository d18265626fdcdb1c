"""Mamba1 / Mamba2 language models built from a :class:`~mambatron.config.ModelConfig`."""

from __future__ import annotations

import contextlib

import torch

from mambatron.config import ModelConfig
from mambatron.models.generate import generate
from mambatron.models.lm import MambaLM, count_parameters
from mambatron.models.mamba1 import Mamba1Mixer
from mambatron.models.mamba2 import Mamba2Mixer

__all__ = ["MambaLM", "Mamba1Mixer", "Mamba2Mixer", "build_model", "count_parameters", "generate"]


def build_model(cfg: ModelConfig, projections=None, device=None, dtype=None) -> MambaLM:
    """Build a :class:`MambaLM`. On ``device="meta"`` nothing is allocated (call ``to_empty`` + ``init_weights``
    later); ``projections`` (from ``mambatron.parallel.build_projections``) decides single-device vs tensor-parallel."""
    cfg.validate()
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = MambaLM(cfg, projections)
    if dtype is not None:
        model = model.to(dtype)
    return model
