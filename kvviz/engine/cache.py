"""The one module that touches transformers' Cache internals, and weighs the cache it holds.

`KVVizCache` is a `DynamicCache` whose `update` is the seam kvviz needs:
- it reports each layer's new k'/v' rows to the active recorder (see `capture.py`), and
- it lets a variant (see `variant.py`; the catalogue is `kvviz.variants`) decide what is stored and what is attended.

Serving operations are transformers' own, inherited unchanged: `crop(-n)` (speculative rollback),
`reorder_cache(beam_idx)` and `batch_repeat_interleave(n)` (beam search); `rows` / `append_rows`
copy rows out of one cache and into another (a prefix store, `kvviz.serving.reuse`).

Bugs never see a `DynamicLayer`: they get the stored (keys, values) tensors and return new ones;
only this module reads or writes `layer.keys` / `layer.values`. Pinned to transformers 5.23
(`tests/test_pins.py` fails loudly if the attributes relied on here move).

Shapes: key/value states are (batch, num_key_value_heads, seq_len, head_dim).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from kvviz.engine import capture
from kvviz.geometry import kv_geometry

if TYPE_CHECKING:
    from kvviz.engine.models import LoadedModel
    from kvviz.engine.variant import CacheVariant

KV = tuple[torch.Tensor, torch.Tensor]


class KVVizCache(DynamicCache):
    """A DynamicCache that records its updates and can carry an injected bug.

    One instance per session/run: `step` is set by the session before each forward so a bug can
    start at a chosen step, and `bug_state` holds a bug's per-layer memory (e.g. the previous
    step's rows for an off-by-one append).
    """

    def __init__(self, config: Any, bug: CacheVariant | None = None) -> None:
        super().__init__(config=config)
        self.bug = bug
        self.step = 0
        self.bug_state: dict[int, dict[str, Any]] = {}

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
        state = self.bug_state.setdefault(layer_idx, {})
        (keep_k, keep_v), attended = bug.update(stored, (key_states, value_states), layer_idx, self.step, state)
        layer.keys, layer.values = keep_k, keep_v
        return attended

    def layer_kv(self, layer_idx: int) -> KV | None:
        """The stored (keys, values) of one layer, or None before its first update."""
        layer = self.layers[layer_idx]
        if not layer.is_initialized or layer.get_seq_length() == 0:
            return None
        return layer.keys, layer.values

    def seq_lengths(self) -> list[int]:
        """Cached positions per layer (they differ only under some bugs)."""
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

    def load_rows(self, other: KVVizCache) -> None:
        """Copy another cache's stored rows into this one (used to simulate a stale cache)."""
        for i in range(len(self.layers)):
            kv = other.layer_kv(i)
            if kv is None:
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
