"""The one module that touches transformers' Cache internals, and weighs the cache it holds.

`KVVizCache` is a `DynamicCache` whose `update` is the seam kvviz needs:
- it reports each layer's new k'/v' rows to the active recorder (see `capture.py`), and
- it lets a variant (see `variant.py`; the catalogue is `kvviz.variants`) decide what is stored and what is
  attended, and hands it the attention weights when it ranks rows by them (`observe`).

Serving operations are transformers' own, inherited unchanged: `crop(-n)` (speculative rollback),
`reorder_cache(beam_idx)` and `batch_repeat_interleave(n)` (beam search); `rows` / `append_rows`
copy rows out of one cache and into another (a prefix store, `kvviz.serving.reuse`).

Variants never see a `DynamicLayer`: they get the stored (keys, values) tensors and return new ones;
only this module reads or writes `layer.keys` / `layer.values`. Pinned to transformers 5.23
(`tests/test_pins.py` fails loudly if the attributes relied on here move).

Shapes: key/value states are (batch, num_key_value_heads, seq_len, head_dim).
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from kvviz.engine import capture
from kvviz.engine.variant import LayerCall
from kvviz.geometry import kv_geometry

if TYPE_CHECKING:
    from kvviz.engine.models import LoadedModel
    from kvviz.engine.variant import CacheVariant, Rope

KV = tuple[torch.Tensor, torch.Tensor]


class KVVizCache(DynamicCache):
    """A DynamicCache that records its updates and can carry a cache variant (an injected bug, an
    eviction policy, a quantised store: see `variant.py`).

    One instance per session/run. Before each forward the session calls `begin_step` so a variant
    knows the step (it may start at a chosen one), which text tokens the new rows are and at which
    positions they were fed; `bug_state` holds a variant's per-layer memory (e.g. the previous step's
    rows for an off-by-one append, the attention an eviction policy ranks rows by).
    """

    def __init__(self, config: Any, bug: CacheVariant | None = None, rope: Rope | None = None) -> None:
        super().__init__(config=config)
        self.bug = bug
        self.rope = rope
        self.step = 0
        self.token_index: torch.Tensor | None = None  # (q_len,) text index of this step's new rows
        self.positions: torch.Tensor | None = None  # (q_len,) their position ids
        self.bug_state: dict[int, dict[str, Any]] = {}

    def begin_step(self, step: int, token_index: torch.Tensor, positions: torch.Tensor) -> None:
        """Called by the session before each forward: token_index and positions are (q_len,)."""
        self.step, self.token_index, self.positions = step, token_index, positions

    def call(self, layer_idx: int) -> LayerCall:
        """What a variant hook is told about this layer in this step."""
        return LayerCall(layer_idx, self.step, self.bug_state.setdefault(layer_idx, {}), self.token_index,
                         self.positions, self.rope)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> KV:
        # key_states/value_states: (batch, num_key_value_heads, q_len, head_dim), the new k'/v'
        recorder = capture.current_recorder()
        if recorder is not None:
            recorder.record_new_kv(layer_idx, key_states, value_states)
        bug = self.bug
        if bug is None or not bug.active(layer_idx, self.step):
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        stored = (layer.keys, layer.values) if layer.get_seq_length() > 0 else None
        (keep_k, keep_v), attended = bug.update(stored, (key_states, value_states), self.call(layer_idx))
        layer.keys, layer.values = keep_k, keep_v
        return attended

    def observe(self, layer_idx: int, weights: torch.Tensor) -> None:
        """Hand one layer's attention weights (batch, num_heads, q_len, kv_len) to a variant that ranks rows."""
        if self.bug is not None and self.bug.observes and self.bug.in_layer(layer_idx):
            self.bug.observe(weights, self.call(layer_idx))

    def layer_kv(self, layer_idx: int) -> KV | None:
        """The stored (keys, values) of one layer, or None before its first update."""
        layer = self.layers[layer_idx]
        if not layer.is_initialized or layer.get_seq_length() == 0:
            return None
        return layer.keys, layer.values

    def seq_lengths(self) -> list[int]:
        """Cached positions per layer (they differ only under some variants)."""
        return [layer.get_seq_length() for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes held by the stored K and V tensors, all layers."""
        total = 0
        for i in range(len(self.layers)):
            kv = self.layer_kv(i)
            if kv is not None:
                total += kv[0].numel() * kv[0].element_size() + kv[1].numel() * kv[1].element_size()
        return total

    def rows(self, start: int, end: int) -> tuple[KV, ...]:
        """Copies of every layer's stored rows [start, end): per layer (keys, values), each
        (batch, num_key_value_heads, end - start, head_dim). Copies, because a prefix store keeps
        them after this cache is gone (and DynamicCache may later replace or slice its tensors)."""
        out = []
        for i in range(len(self.layers)):
            kv = self.layer_kv(i)
            if kv is None or not 0 <= start <= end <= kv[0].shape[-2]:
                raise ValueError(f"layer {i} holds {0 if kv is None else kv[0].shape[-2]} rows; asked for [{start}, {end})")
            out.append((kv[0][..., start:end, :].clone(), kv[1][..., start:end, :].clone()))
        return tuple(out)

    def append_rows(self, rows: Sequence[KV]) -> None:
        """Append rows to every layer through DynamicCache's own `update` (how a prefix-cache hit
        fills a new request's cache before the rest of its prompt is computed)."""
        if len(rows) != len(self.layers):
            raise ValueError(f"{len(rows)} layers of rows for a cache of {len(self.layers)} layers")
        for i, (keys, values) in enumerate(rows):
            DynamicCache.update(self, keys, values, i)  # the plain append: no recorder, no variant

    def load_rows(self, other: KVVizCache, layers: Container[int] | None = None) -> None:
        """Copy another cache's stored rows into this one (used to simulate a stale cache), in `layers` (default all)."""
        for i in range(len(self.layers)):
            kv = other.layer_kv(i)
            if kv is None or (layers is not None and i not in layers):
                continue
            layer = self.layers[i]
            if not layer.is_initialized:
                layer.lazy_initialization(kv[0], kv[1])
            layer.keys, layer.values = kv[0].clone(), kv[1].clone()


def check_internals() -> list[str]:
    """Names of the transformers cache internals kvviz relies on that are missing (empty = fine)."""
    from transformers.cache_utils import DynamicLayer

    missing = []
    for attr in ("update", "lazy_initialization", "get_seq_length", "get_mask_sizes", "is_initialized"):
        if not hasattr(DynamicLayer, attr) and attr != "is_initialized":
            missing.append(f"DynamicLayer.{attr}")
    layer = DynamicLayer()
    if not hasattr(layer, "is_initialized"):
        missing.append("DynamicLayer.is_initialized")
    k = torch.zeros(1, 1, 2, 4)
    layer.update(k, k)
    if not (hasattr(layer, "keys") and hasattr(layer, "values")) or layer.keys.shape != (1, 1, 2, 4):
        missing.append("DynamicLayer.keys/values as (batch, kv_heads, seq, head_dim)")
    if not hasattr(DynamicCache(), "layers"):
        missing.append("DynamicCache.layers")
    return missing


# -- the cache, weighed against the formula ---------------------------------------------------
@dataclass(frozen=True)
class CacheMeasurement:
    """A real cache's tensor bytes beside the formula's prediction (`kvviz.geometry`)."""

    tokens: int
    batch: int
    dtype: str
    measured_bytes: int  # KVVizCache.nbytes(): numel x element_size of every stored K and V
    formula_bytes: int
    shapes: tuple[tuple[int, ...], ...]  # each layer's key_states shape (batch, kv_heads, seq, head_dim)

    @property
    def equal(self) -> bool:
        return self.measured_bytes == self.formula_bytes


def measure(cache: KVVizCache, config: Any, dtype: str, batch: int = 1) -> CacheMeasurement | None:
    """Weigh a filled cache against the formula for its geometry (None before the first update)."""
    kvs = [cache.layer_kv(i) for i in range(len(cache.layers))]
    if not kvs or any(kv is None for kv in kvs):
        return None
    tokens = int(cache.seq_lengths()[0])
    formula = kv_geometry(config).total_bytes(tokens, batch, dtype)
    return CacheMeasurement(tokens, batch, dtype, cache.nbytes(), formula, tuple(tuple(kv[0].shape) for kv in kvs))  # type: ignore[index]


def measure_prefill(lm: LoadedModel, tokens: int, batch: int = 1, seed: int = 0) -> CacheMeasurement:
    """Prefill `batch` x `tokens` random token ids into a fresh cache and weigh its tensors.

    Uses the shared model read-only (no recorder: plain attention); the cache is thrown away.
    """
    cap = lm.info.context_length
    if not 1 <= tokens <= cap:
        raise ValueError(f"tokens must be between 1 and the model's context ({cap}), got {tokens}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, lm.info.vocab_size, (batch, tokens), generator=gen).to(lm.device)  # (batch, tokens)
    cache = KVVizCache(config=lm.model.config)
    with torch.inference_mode():
        lm.model(input_ids=ids, past_key_values=cache, use_cache=True)
    result = measure(cache, lm.model.config, lm.info.dtype, batch)
    assert result is not None  # a prefill fills every layer
    return result
