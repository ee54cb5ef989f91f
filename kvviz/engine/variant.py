"""The seam's interface: what a cache that differs from the exact one may change, and where.

The engine calls these hooks and knows nothing else about variants (the catalogue, names and
descriptions live in `kvviz.variants`):
- `update` from `cache.KVVizCache.update` (what is stored, what the query attends over),
- `kv_head_of` and `mask` from the attention function in `capture.py`,
- `positions` from the session before each forward (the position ids / RoPE angles),
- `fresh_cache_each_step` and `stale_prompt` from the session around the cache's lifetime.
The defaults are the exact cache, so a variant overrides only the hook where it lives. Variants
never touch transformers objects or model code: they get and return plain tensors.

Shapes: key/value states are (batch, num_key_value_heads, seq_len, head_dim).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CacheVariant:
    """Base class: the exact cache. Subclasses override the hooks they change."""

    name: ClassVar[str] = "none"

    layers: frozenset[int] | None = None  # None = every layer
    start_step: int = 0  # 0 = from prefill

    # session-level hooks
    fresh_cache_each_step: ClassVar[bool] = False
    stale_prompt: ClassVar[str | None] = None

    def scoped(self, layers: list[int] | None = None, start_step: int = 0) -> CacheVariant:
        """The same bug limited to some layers and starting at a step."""
        return dataclasses.replace(
            self, layers=None if layers is None else frozenset(layers), start_step=start_step
        )

    def active(self, layer_idx: int, step: int) -> bool:
        return step >= self.start_step and (self.layers is None or layer_idx in self.layers)

    def update(
        self, stored: KV | None, new: KV, layer_idx: int, step: int, state: dict[str, Any]
    ) -> tuple[KV, KV]:
        """Return (what to keep in the cache, what this step attends over). Default: append."""
        if stored is None:
            return new, new
        keys = torch.cat([stored[0], new[0]], dim=-2)
        values = torch.cat([stored[1], new[1]], dim=-2)
        return (keys, values), (keys, values)

    def kv_head_of(self, kv_head_of: torch.Tensor, num_key_value_heads: int, layer_idx: int, step: int) -> torch.Tensor:
        """Which KV head each query head reads: (num_heads,)."""
        return kv_head_of

    def mask(self, mask: torch.Tensor | None, q_len: int, layer_idx: int, step: int) -> torch.Tensor | None:
        """The additive attention mask (batch, 1, q_len, kv_len)."""
        return mask

    def positions(self, positions: torch.Tensor, step: int) -> torch.Tensor:
        """Position ids for this step's tokens: (batch, q_len)."""
        return positions
