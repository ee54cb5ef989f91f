"""The catalogue of injected KV-cache bugs: one registry, one source of truth.

A bug is a frozen dataclass whose hooks are called at the engine's seams:
- `update` by `cache.KVVizCache.update` (what is stored, what the query attends over),
- `kv_head_of` and `mask` by the attention function in `capture.py`,
- `positions` by the session before each forward (the position ids / RoPE angles),
- `fresh_cache_each_step` and `stale_prompt` by the session around the cache's lifetime.
The defaults are the correct behaviour, so a bug overrides only the hook where it lives. Bugs
never touch transformers objects: they get and return plain tensors.

Shapes: key/value states are (batch, num_key_value_heads, seq_len, head_dim).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CacheBug:
    """Base class: the correct cache. Subclasses override one hook and fill the catalogue fields."""

    name: ClassVar[str] = "none"
    title: ClassVar[str] = "Correct cache"
    description: ClassVar[str] = "K <- [K; k'], V <- [V; v'] at every step, positions advance."
    corrupts: ClassVar[str] = "nothing"
    symptom: ClassVar[str] = "none: cached logits equal a full recompute"
    source: ClassVar[str] = ""

    layers: frozenset[int] | None = None  # None = every layer
    start_step: int = 0  # 0 = from prefill

    # session-level hooks
    fresh_cache_each_step: ClassVar[bool] = False
    stale_prompt: ClassVar[str | None] = None

    def scoped(self, layers: list[int] | None = None, start_step: int = 0) -> CacheBug:
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

    @classmethod
    def info(cls) -> dict[str, str]:
        return {
            "name": cls.name,
            "title": cls.title,
            "description": cls.description,
            "corrupts": cls.corrupts,
            "symptom": cls.symptom,
            "source": cls.source,
        }


REGISTRY: dict[str, type[CacheBug]] = {}


def register(cls: type[CacheBug]) -> type[CacheBug]:
    REGISTRY[cls.name] = cls
    return cls


def get_bug(name: str | CacheBug | None) -> CacheBug | None:
    """A bug instance by name; None or "none" = the correct cache. Unknown names raise ValueError."""
    if name is None or isinstance(name, CacheBug):
        return name
    if name == "none":
        return None
    if name not in REGISTRY:
        raise ValueError(f"unknown bug {name!r}; choose one of: none, {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()


def catalogue() -> list[dict[str, str]]:
    return [cls.info() for cls in REGISTRY.values()]


@register
@dataclass(frozen=True)
class NeverAppend(CacheBug):
    name: ClassVar[str] = "never_append"
    title: ClassVar[str] = "New rows never appended"
    description: ClassVar[str] = (
        "The step attends over [K; k'] but the cache is never written back, so it stays at the prompt."
    )
    corrupts: ClassVar[str] = "the cache's growth: every generated token is forgotten after its own step"
    symptom: ClassVar[str] = "cache length frozen at the prompt length; the model loses track of what it just said"
    source: ClassVar[str] = "huggingface/transformers#26344 (past_key_values not returned/updated in a custom loop)"

    def update(self, stored: KV | None, new: KV, layer_idx: int, step: int, state: dict[str, Any]) -> tuple[KV, KV]:
        if stored is None:
            return new, new  # prefill still fills the cache
        attended = (torch.cat([stored[0], new[0]], dim=-2), torch.cat([stored[1], new[1]], dim=-2))
        return stored, attended
