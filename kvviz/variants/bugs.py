"""The bugs: caches broken by accident, each modelled on a real project's bug (kind "bug").

Each entry is a `kvviz.variants.registry.Variant`: the hooks it overrides (see
`kvviz.engine.variant`) and what a learner reads about it. `source` names the issue or pull
request (owner/repo#number) and `source_urls` links it.

Shapes: key/value states are (batch, num_key_value_heads, seq_len, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvviz.engine.variant import KV, LayerCall
from kvviz.geometry import KVGeometry
from kvviz.variants.registry import REGISTRY, Variant, register

__all__ = ["REGISTRY"]  # the whole registry (every kind), kept importable from here


def _cat(stored: KV, new: KV) -> KV:
    return torch.cat([stored[0], new[0]], dim=-2), torch.cat([stored[1], new[1]], dim=-2)


# -- the catalogue ---------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class NeverAppend(Variant):
    name: ClassVar[str] = "never_append"
    title: ClassVar[str] = "New rows never appended"
    description: ClassVar[str] = (
        "Each decode step attends over [K; k'] but never writes k'/v' back, so the cache stays at the prompt."
    )
    corrupts: ClassVar[str] = "the cache's growth: every generated token is forgotten after its own step"
    symptom: ClassVar[str] = (
        "cache length frozen at the prompt length; each generated token is forgotten after its own step"
    )
    source: ClassVar[str] = (
        "sgl-project/sglang#30093: a chained decode path wrote K/V while the sequence lengths that say "
        "which rows exist stood still"
    )
    source_urls: ClassVar[tuple[str, ...]] = ("https://github.com/sgl-project/sglang/issues/30093",)
    clue: ClassVar[str] = "lengths"

    def update(self, stored: KV | None, new: KV, call: LayerCall) -> tuple[KV, KV]:
        if stored is None:
            return new, new  # prefill still fills the cache
        return stored, _cat(stored, new)


@register
@dataclass(frozen=True)
class OverwriteLast(Variant):
    name: ClassVar[str] = "overwrite_last"
    title: ClassVar[str] = "Full cache overwrites its newest slot"
    description: ClassVar[str] = (
        "A fixed-size cache sized to the prompt: once full, each new k'/v' is written into the last slot "
        "instead of evicting the oldest row (a sliding window that drops the newest rows)."
    )
    corrupts: ClassVar[str] = "the last prompt row and every generated row but the newest"
    symptom: ClassVar[str] = (
        "cache length frozen at the prompt length; the last slot changes every step; of the generated text "
        "only the newest token is remembered"
    )
    source: ClassVar[str] = (
        "huggingface/transformers#37269 (a cache sized to the input length stopped growing in a manual loop) "
        "and huggingface/transformers#37574 (sliding-window cache updated wrongly once full, fixed in #38046)"
    )
    source_urls: ClassVar[tuple[str, ...]] = (
        "https://github.com/huggingface/transformers/issues/37269",
        "https://github.com/huggingface/transformers/issues/37574",
    )
    clue: ClassVar[str] = "shifted_rows"

    def update(self, stored: KV | None, new: KV, call: LayerCall) -> tuple[KV, KV]:
        if stored is None:
            return new, new
        # (batch, kv_heads, seq, head_dim): drop the last stored row, the new one takes its slot
        kept = _cat((stored[0][..., :-1, :], stored[1][..., :-1, :]), new)
        return kept, kept


@register
@dataclass(frozen=True)
class OffByOne(Variant):
    name: ClassVar[str] = "off_by_one"
    title: ClassVar[str] = "Off by one: appends the previous step's row"
    description: ClassVar[str] = (
        "The write index lags one step: each decode step appends the previous step's k'/v' and attends "
        "without its own row."
    )
    corrupts: ClassVar[str] = "every generated row (it holds the token before it); the newest token never sees itself"
    symptom: ClassVar[str] = (
        "cache length is right but every row from the first decode step on is the previous token's; logits "
        "differ from step 1 on, yet the chosen tokens may stay the same for many steps (a small shift rarely "
        "moves the top token)"
    )
    source: ClassVar[str] = (
        "microsoft/onnxruntime-genai#2354: decode wrote the new K/V one position too far, leaving a stale slot "
        "that every later step attended to"
    )
    source_urls: ClassVar[tuple[str, ...]] = ("https://github.com/microsoft/onnxruntime-genai/pull/2354",)
    clue: ClassVar[str] = "shifted_rows"

    def update(self, stored: KV | None, new: KV, call: LayerCall) -> tuple[KV, KV]:
        # the row written now is the one made one step earlier (at the first active step: the last stored)
        late = call.state.get("previous")
        call.state["previous"] = (new[0][..., -1:, :], new[1][..., -1:, :])
        if stored is None:
            return new, new  # prefill writes its own rows
        if late is None:
            late = (stored[0][..., -1:, :], stored[1][..., -1:, :])
        kept = _cat(stored, late)
        return kept, kept


@register
@dataclass(frozen=True)
class PositionsNotAdvanced(Variant):
    name: ClassVar[str] = "positions_not_advanced"
    title: ClassVar[str] = "Positions not advanced"
    description: ClassVar[str] = (
        "Position ids are computed as if the cache were empty: every decode token gets position 0, so "
        "RoPE (or learned positions) place it at the start of the text."
    )
    corrupts: ClassVar[str] = "the new k' rows (rotated for the wrong position) and the query's relative distances"
    symptom: ClassVar[str] = "the cache grows normally but new rows differ already in layer 0; text degrades"
    source: ClassVar[str] = (
        "Blaizzy/mlx-vlm#1983: Qwen3-Omni decode assigned RoPE position 0 to every token; also "
        "huggingface/transformers#37403 (a fix for cache positions computed without the cached length)"
    )
    source_urls: ClassVar[tuple[str, ...]] = (
        "https://github.com/Blaizzy/mlx-vlm/issues/1983",
        "https://github.com/huggingface/transformers/pull/37403",
    )
    clue: ClassVar[str] = "positions"

    scopes: ClassVar[tuple[str, ...]] = ("start_step",)
    scope_notes: ClassVar[dict[str, str]] = {
        "layers": "position ids are computed once per forward and shared by every layer (learned positions are "
                  "even added before layer 0), so they cannot be wrong in one layer only",
    }

    def positions(self, positions: torch.Tensor, step: int, cached: int) -> torch.Tensor:
        # (batch, q_len): arange(q_len), ignoring how many positions are already cached
        return torch.arange(positions.shape[-1], device=positions.device).expand_as(positions)


@register
@dataclass(frozen=True)
class StaleCache(Variant):
    name: ClassVar[str] = "stale_cache"
    title: ClassVar[str] = "Cache not cleared between prompts"
    description: ClassVar[str] = (
        "The cache of the previous request is reused: its K/V rows stay in front and the new prompt is "
        "appended after them."
    )
    corrupts: ClassVar[str] = "the context: the query attends to rows of a text the user never sent"
    symptom: ClassVar[str] = "more cache rows than tokens; the model 'remembers' an earlier request"
    source: ClassVar[str] = (
        "mudler/LocalAI#6747: the MLX backend kept KV cache between requests and answers leaked earlier "
        "turns; also ml-explore/mlx-examples#1000 (RotatingKVCache reused between generations)"
    )
    source_urls: ClassVar[tuple[str, ...]] = (
        "https://github.com/mudler/LocalAI/issues/6747",
        "https://github.com/ml-explore/mlx-examples/issues/1000",
    )
    clue: ClassVar[str] = "extra_rows"
    stale_prompt: ClassVar[str | None] = "Mr. Darcy walked into the room, looked about him, and said nothing at all."
    scopes: ClassVar[tuple[str, ...]] = ("layers",)
    scope_notes: ClassVar[dict[str, str]] = {
        "start_step": "the earlier request's rows are in the cache before prefill: there is no later step at which "
                      "the leak could begin",
    }


@register
@dataclass(frozen=True)
class KVSwapped(Variant):
    name: ClassVar[str] = "kv_swapped"
    title: ClassVar[str] = "K and V swapped"
    description: ClassVar[str] = "The write puts k' into the value cache and v' into the key cache."
    corrupts: ClassVar[str] = "every row: scores are q'.v and the output mixes keys"
    symptom: ClassVar[str] = "cache length right, every row wrong from layer 0; output goes wrong at once"
    source: ClassVar[str] = (
        "LMCache/LMCache#4467: a packed K/V cache layout was misread (the K/V axis taken for the head axis), "
        "silently corrupting the KV restored into vLLM"
    )
    source_urls: ClassVar[tuple[str, ...]] = ("https://github.com/LMCache/LMCache/pull/4467",)
    clue: ClassVar[str] = "swapped"

    def update(self, stored: KV | None, new: KV, call: LayerCall) -> tuple[KV, KV]:
        swapped = (new[1], new[0])
        kept = swapped if stored is None else _cat(stored, swapped)
        return kept, kept


@register
@dataclass(frozen=True)
class WrongGQAMapping(Variant):
    name: ClassVar[str] = "gqa_wrong_head"
    title: ClassVar[str] = "Query heads read the wrong KV head"
    description: ClassVar[str] = (
        "GQA sharing done with tile instead of repeat_interleave: query head h reads KV head h % n_kv, not "
        "h // group (on MHA, where both agree, the heads are rotated by one instead)."
    )
    corrupts: ClassVar[str] = "the attention of most query heads (the cache itself is intact)"
    symptom: ClassVar[str] = (
        "cache rows identical in layer 0 and lengths right, yet logits differ from prefill on; impossible on "
        "MQA (one KV head)"
    )
    source: ClassVar[str] = (
        "onnx/onnx#7274: the Attention op's GQA expansion used Tile ([h0, h1, h0, h1]) where torch uses "
        "repeat_interleave; also apple/axlearn#842"
    )
    source_urls: ClassVar[tuple[str, ...]] = (
        "https://github.com/onnx/onnx/pull/7274",
        "https://github.com/apple/axlearn/pull/842",
    )
    clue: ClassVar[str] = "kv_head_of"

    def problem(self, geometry: KVGeometry) -> str | None:
        if geometry.num_key_value_heads == 1:
            return "with a single KV head (MQA) every query head reads the right one: the mapping cannot go wrong"
        return None

    def kv_head_of(self, kv_head_of: torch.Tensor, num_key_value_heads: int, layer_idx: int, step: int) -> torch.Tensor:
        tiled = torch.arange(kv_head_of.shape[0], device=kv_head_of.device) % num_key_value_heads  # (num_heads,)
        if not torch.equal(tiled, kv_head_of):
            return tiled
        return (kv_head_of + 1) % num_key_value_heads  # MHA: tile == identity, so rotate


@register
@dataclass(frozen=True)
class FreshCacheEachStep(Variant):
    name: ClassVar[str] = "fresh_cache_each_step"
    title: ClassVar[str] = "Cache re-created at every step"
    description: ClassVar[str] = (
        "A new empty cache is made before every decode step while only the newest token is fed, so each "
        "step sees itself alone."
    )
    corrupts: ClassVar[str] = "the whole context: the prompt and the history are gone after prefill"
    symptom: ClassVar[str] = "cache length 1 at every decode step; text becomes a bigram model's babble"
    source: ClassVar[str] = (
        "EricLBuehler/mistral.rs#765: running with the KV cache disabled produced garbage output; also "
        "Lightning-AI/litgpt#1647 (nonsense output when the cache was cleared but not rebuilt)"
    )
    source_urls: ClassVar[tuple[str, ...]] = (
        "https://github.com/EricLBuehler/mistral.rs/issues/765",
        "https://github.com/Lightning-AI/litgpt/pull/1647",
    )
    clue: ClassVar[str] = "lengths"

    def update(self, stored: KV | None, new: KV, call: LayerCall) -> tuple[KV, KV]:
        # prefill fills the (new) cache; every decode step finds it emptied and keeps only its own row
        return new, new


@register
@dataclass(frozen=True)
class CausalMaskLost(Variant):
    name: ClassVar[str] = "causal_mask_lost"
    title: ClassVar[str] = "Causal mask lost during prefill"
    description: ClassVar[str] = (
        "Prefill runs with no mask: what happens when a custom attention function is registered without its "
        "mask function. Each prompt token attends to later ones."
    )
    corrupts: ClassVar[str] = "every prompt row from layer 1 on (built from hidden states that saw the future)"
    symptom: ClassVar[str] = "layer 0 rows identical, attention above the diagonal at prefill, logits off from step 0"
    source: ClassVar[str] = (
        "huggingface/transformers#45811: a custom attention function registered without a mask function "
        "silently drops causal masking"
    )
    source_urls: ClassVar[tuple[str, ...]] = ("https://github.com/huggingface/transformers/pull/45811",)
    clue: ClassVar[str] = "prefill_mask"

    scopes: ClassVar[tuple[str, ...]] = ("layers",)
    scope_notes: ClassVar[dict[str, str]] = {
        "start_step": "only prefill has several query rows to mask; a decode step's single query may see every "
                      "cached key anyway, so from a later step there is nothing left to unmask",
    }

    def mask(self, mask: torch.Tensor | None, q_len: int, layer_idx: int, step: int) -> torch.Tensor | None:
        return None if q_len > 1 else mask  # one decode query may see every cached key anyway
