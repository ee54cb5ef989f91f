"""The seam's interface: what a cache that differs from the exact one may change, and where.

The engine calls these hooks and knows nothing else about variants (the catalogue, names and
descriptions live in `kvviz.variants`):
- `update` from `cache.KVVizCache.update` (what is stored, what the query attends over),
- `observe` from the attention function in `capture.py` (the weights a policy ranks rows by),
- `kv_head_of` and `mask` from the attention function in `capture.py`,
- `positions` from the session before each forward (the position ids / RoPE angles),
- `stale_prompt` from the session when a run starts (rows leaked from an earlier request).
The defaults are the exact cache, so a variant overrides only the hook where it lives. Variants
never touch transformers objects or model code: they get and return plain tensors, plus `Rope`,
the model's own rotary embedding as a function (for a variant that moves keys to new positions).

**One scoping rule.** A variant may be limited to some layers and to steps from `start_step` on;
every hook is gated by the one check `active(layer_idx, step)`. Hooks that act on the whole
model (position ids are shared by every layer; a leaked request exists from prefill on) cannot
honour every scope: a variant lists the scopes it honours in `scopes`, says why the others
cannot apply in `scope_notes`, and `scoped()` refuses them. One documented exception: `observe`
(bookkeeping, never a change) runs in the variant's layers from prefill on, so a policy that
ranks rows by accumulated attention has complete scores when it starts acting.

Shapes: key/value states are (batch, num_key_value_heads, seq_len, head_dim).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

KV = tuple[torch.Tensor, torch.Tensor]
SCOPES = ("layers", "start_step")


class Rope:
    """The model's rotary embedding as plain functions: rotate key rows to chosen positions.

    Wraps the model's `rotary_emb` module (transformers computes cos/sin from `inv_freq`, with
    `attention_scaling` folded in), so it matches the model's own rotation exactly. Rotating by
    -p undoes a rotation by p (up to the scaling, divided back out).
    """

    def __init__(self, rotary_emb: torch.nn.Module) -> None:
        self._emb = rotary_emb
        self.scaling = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)

    @classmethod
    def of(cls, model: torch.nn.Module) -> Rope | None:
        """The Rope of a transformers causal LM, or None when it has no rotary embedding (GPT-2)."""
        inner = getattr(model, "model", model)
        emb = getattr(inner, "rotary_emb", None)
        return None if emb is None or not hasattr(emb, "inv_freq") else cls(emb)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (batch, heads, n, head_dim) rotated to positions (n,): what the model does to a key at p."""
        cos, sin = self._emb(x, positions.reshape(1, -1).to(x.device))  # (1, n, rot_dim)
        cos, sin = cos[:, None], sin[:, None]  # (1, 1, n, rot_dim)
        rot = cos.shape[-1]  # partial rotary: only the first rot dims turn
        xr, rest = x[..., :rot], x[..., rot:]
        half = rot // 2
        turned = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)  # transformers' rotate_half
        return torch.cat((xr * cos + turned * sin, rest), dim=-1)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The pre-RoPE rows of keys rotated at `positions` (n,): x (batch, heads, n, head_dim)."""
        back = self.rotate(x, -positions)
        return back / (self.scaling**2) if self.scaling != 1.0 else back


@dataclass(frozen=True)
class LayerCall:
    """What `update` and `observe` are told about the call they are in."""

    layer_idx: int
    step: int  # 0 = prefill
    state: dict[str, Any]  # this layer's memory for this run (per session, never shared)
    token_index: torch.Tensor | None = None  # (q_len,) index in the text of each new row (0 = first prompt token)
    positions: torch.Tensor | None = None  # (q_len,) the position ids the new rows were fed at (RoPE angles)
    rope: Rope | None = None  # None: the model has no rotary embedding


@dataclass(frozen=True)
class CacheVariant:
    """Base class: the exact cache. Subclasses override the hooks they change."""

    name: ClassVar[str] = "none"

    layers: frozenset[int] | None = field(default=None, kw_only=True)  # None = every layer
    start_step: int = field(default=0, kw_only=True)  # 0 = from prefill

    # which of SCOPES this variant honours, and why the others cannot apply
    scopes: ClassVar[tuple[str, ...]] = SCOPES
    scope_notes: ClassVar[dict[str, str]] = {}
    observes: ClassVar[bool] = False  # True: the engine calls `observe` with each layer's attention weights
    stale_prompt: ClassVar[str | None] = None  # session-level: an earlier request whose rows leak in front

    def scoped(self, layers: list[int] | None = None, start_step: int = 0) -> CacheVariant:
        """The same variant limited to some layers and starting at a step (refuses scopes it cannot honour)."""
        asked = {"layers": layers is not None, "start_step": start_step != 0}
        for scope, wanted in asked.items():
            if wanted and scope not in self.scopes:
                raise ValueError(f"{self.name} cannot be limited by {scope.replace('_', ' ')}: "
                                 f"{self.scope_notes.get(scope, 'it acts on the whole model')}")
        return dataclasses.replace(self, layers=None if layers is None else frozenset(layers), start_step=start_step)

    def in_layer(self, layer_idx: int) -> bool:
        return self.layers is None or layer_idx in self.layers

    def active(self, layer_idx: int | None, step: int) -> bool:
        """The one scoping check. `layer_idx=None`: a model-wide hook (only the step is checked)."""
        return step >= self.start_step and (layer_idx is None or self.in_layer(layer_idx))

    def update(self, stored: KV | None, new: KV, call: LayerCall) -> tuple[KV, KV]:
        """Return (what to keep in the cache, what this step attends over). Default: append."""
        if stored is None:
            return new, new
        keys = torch.cat([stored[0], new[0]], dim=-2)
        values = torch.cat([stored[1], new[1]], dim=-2)
        return (keys, values), (keys, values)

    def observe(self, weights: torch.Tensor, call: LayerCall) -> None:
        """See one layer's attention weights (batch, num_heads, q_len, kv_len) over the rows attended."""

    def kv_head_of(self, kv_head_of: torch.Tensor, num_key_value_heads: int, layer_idx: int, step: int) -> torch.Tensor:
        """Which KV head each query head reads: (num_heads,)."""
        return kv_head_of

    def mask(self, mask: torch.Tensor | None, q_len: int, layer_idx: int, step: int) -> torch.Tensor | None:
        """The additive attention mask (batch, 1, q_len, kv_len)."""
        return mask

    def positions(self, positions: torch.Tensor, step: int, cached: int) -> torch.Tensor:
        """Position ids for this step's tokens: (batch, q_len). `cached`: rows in the cache before the step."""
        return positions
