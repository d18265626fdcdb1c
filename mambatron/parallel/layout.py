"""How one full parameter maps to its tensor-parallel shards (see consolidate.py for the conventions)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """How one full parameter maps to TP shards: ``dim`` is None when replicated; ``components`` are full sizes."""

    dim: int | None
    components: tuple[int, ...] = ()

    @property
    def replicated(self) -> bool:
        return self.dim is None


REPLICATED = Layout(None)
