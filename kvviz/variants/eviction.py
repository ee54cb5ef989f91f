"""Eviction policies: caches that keep only some rows, on purpose (kind "eviction").

Every policy has a `budget`: the most rows any decode query attends over, its own row included.
Before a decode step writes its row, the policy evicts stored rows down to `budget - 1`, then
appends the new one (so the cache never holds more than `budget` rows after a decode step).
Prefill is never cut: the prompt attends to itself in full, and a prompt longer than the budget is
evicted down at the first decode step, as the reference implementations do.

Positions after eviction (a choice every policy must make):
- `sliding_window`, `h2o`, `tova` keep each row's **original** RoPE position: a kept key stays as it
  was written, and the new token is fed at its position in the text (what the H2O and TOVA reference
  code does; Mistral-style window attention too);
- `streaming_llm` re-positions **within the cache**, as the StreamingLLM paper does (§3.2): the rows
  are numbered by their slot, the new token is fed at position = its slot, and a kept key that moves
  to a new slot is re-rotated there from its pre-RoPE copy (the reference code caches pre-RoPE keys
  and rotates all of them each step; kvviz re-rotates only the keys that moved, so a budget that
  never evicts stays bit-for-bit the exact cache).

Each policy tracks which text token every row holds (`state["tokens"]`, (num_kv_heads, rows)): H2O
keeps different rows per KV head, the others the same rows in every head.

Shapes: key/value states are (batch, num_key_value_heads, seq_len, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvviz.engine.variant import KV, LayerCall
from kvviz.geometry import KVGeometry
from kvviz.variants.registry import LEARNED_POSITIONS, Param, Variant, register

BUDGET = Param("budget", "Budget (rows)", "the most cache rows a decode query attends over, its own row included",
               minimum=2)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` (num_kv_heads, k) of each KV head: x (batch, num_kv_heads, n, d) -> (batch, num_kv_heads, k, d)."""
    return x.gather(2, idx[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1]))


@dataclass(frozen=True)
class Eviction(Variant):
    """Common to every policy: evict before writing, track which token each row holds."""

    kind: ClassVar[str] = "eviction"
    clue: ClassVar[str] = "evicted"
    params: ClassVar[tuple[Param, ...]] = (BUDGET,)
    positions_note: ClassVar[str] = (
        "original positions: a kept key stays as it was written, at its place in the text, and the new token is "
        "fed at its place in the text (as the reference code does), so the positions seen skip the evicted rows"
    )
    budget: int = 16

    def choose(self, n: int, keep: int, num_kv: int, call: LayerCall) -> torch.Tensor:
        """Which of the n stored rows to keep: (num_kv_heads, keep) indices, ascending."""
        raise NotImplementedError

    def kept(self, stored: KV, idx: torch.Tensor, call: LayerCall) -> KV:
        """The kept rows (a policy that moves rows or ranks them updates its state here)."""
        return gather_rows(stored[0], idx), gather_rows(stored[1], idx)

    def update(self, stored: KV | None, new: KV, call: LayerCall) -> tuple[KV, KV]:
        state = call.state
        num_kv, q_len = new[0].shape[1], new[0].shape[-2]
        n = 0 if stored is None else stored[0].shape[-2]
        tokens = state.get("tokens")
        if tokens is None or tokens.shape[-1] != n:  # rows written before the policy started: tokens 0..n-1
            tokens = torch.arange(n).expand(num_kv, n)
        keep = max(self.budget - q_len, 0)
        if stored is not None and n > keep:
            idx = self.choose(n, keep, num_kv, call)  # (num_kv, keep)
            stored = self.kept(stored, idx, call)
            tokens = tokens.gather(1, idx)
        new_tokens = call.token_index if call.token_index is not None else torch.arange(n, n + q_len)
        state["tokens"] = torch.cat([tokens, new_tokens.to(tokens.dtype).expand(num_kv, q_len)], dim=1)
        kept = new if stored is None or stored[0].shape[-2] == 0 else (
            torch.cat([stored[0], new[0]], dim=-2), torch.cat([stored[1], new[1]], dim=-2))
        return kept, kept

    def report(self, state: dict[str, Any]) -> dict[str, Any]:
        tokens = state.get("tokens")
        return {} if tokens is None else {"tokens": tokens.numpy().copy()}  # (num_kv_heads, rows)


def _recent(n: int, k: int, num_kv: int) -> torch.Tensor:
    """The k newest of n rows, for every KV head: (num_kv, k)."""
    return torch.arange(n - k, n).expand(num_kv, k)


@register
@dataclass(frozen=True)
class SlidingWindow(Eviction):
    name: ClassVar[str] = "sliding_window"
    title: ClassVar[str] = "Sliding window"
    description: ClassVar[str] = (
        "Keep only the newest `budget` rows: each decode step drops the oldest row before writing its own. "
        "Kept keys stay at their original positions."
    )
    corrupts: ClassVar[str] = "everything older than the window, the first tokens included"
    symptom: ClassVar[str] = (
        "cache length capped at the budget; the oldest rows leave one per step; once the first tokens leave, "
        "models that park attention on them (attention sinks) degrade sharply"
    )
    source: ClassVar[str] = (
        "window attention, the baseline StreamingLLM measures (Xiao et al. 2024, arXiv:2309.17453: perplexity "
        "explodes once the first tokens are evicted); huggingface/transformers#37574 (a sliding-window cache "
        "once full)"
    )
    source_urls: ClassVar[tuple[str, ...]] = (
        "https://arxiv.org/abs/2309.17453",
        "https://github.com/huggingface/transformers/issues/37574",
    )

    def choose(self, n: int, keep: int, num_kv: int, call: LayerCall) -> torch.Tensor:
        return _recent(n, keep, num_kv)


@register
@dataclass(frozen=True)
class StreamingLLM(Eviction):
    name: ClassVar[str] = "streaming_llm"
    title: ClassVar[str] = "StreamingLLM: attention sinks + recent window"
    description: ClassVar[str] = (
        "Keep the first `sinks` rows (attention sinks) and the newest rows up to the budget; evict the middle. "
        "Positions are slots in the cache, as in the paper: the new token is fed at its slot and kept keys that "
        "move are re-rotated to their new slot from a pre-RoPE copy."
    )
    corrupts: ClassVar[str] = "the middle of the context; positions (the model sees a text only `budget` long)"
    symptom: ClassVar[str] = (
        "cache length capped at the budget; the first rows never leave; the kept recent keys change every step "
        "(re-rotated) while their values stay; position ids stop growing at budget - 1"
    )
    source: ClassVar[str] = (
        "Xiao, Tian, Chen, Han, Lewis, 'Efficient Streaming Language Models with Attention Sinks', ICLR 2024, "
        "arXiv:2309.17453 (code mit-han-lab/streaming-llm); huggingface/transformers#26553 (the Cache "
        "abstraction and SinkCache it led to)"
    )
    source_urls: ClassVar[tuple[str, ...]] = (
        "https://arxiv.org/abs/2309.17453",
        "https://github.com/huggingface/transformers/issues/26553",
    )
    params: ClassVar[tuple[Param, ...]] = (
        BUDGET, Param("sinks", "Sink rows", "the first rows that are never evicted (the paper uses 4)", minimum=0))
    positions_note: ClassVar[str] = (
        "re-positioned within the cache, as the StreamingLLM paper does: rows are numbered by their slot, the new "
        "token is fed at its slot (never beyond budget - 1) and every kept key that moves is re-rotated to its new "
        "slot from its pre-RoPE copy"
    )
    scopes: ClassVar[tuple[str, ...]] = ("start_step",)
    scope_notes: ClassVar[dict[str, str]] = {
        "layers": "it re-positions the new token (position ids are shared by every layer), so every layer must "
                  "evict alike",
    }
    sinks: int = 4

    def __post_init__(self) -> None:
        if self.budget <= self.sinks:
            raise ValueError(f"streaming_llm: the budget ({self.budget}) must exceed the sink rows ({self.sinks}) "
                             "to leave room for a recent window")

    def problem(self, geometry: KVGeometry) -> str | None:
        if geometry.model_type in LEARNED_POSITIONS:
            return (f"{geometry.model_type} has learned positions, not RoPE: StreamingLLM's re-positioning of cached "
                    "keys needs rotary embeddings (use sliding_window)")
        return None

    def positions(self, positions: torch.Tensor, step: int, cached: int) -> torch.Tensor:
        # (batch, q_len): the new rows go in the slots right after the rows kept (slots, not text positions)
        if cached == 0:
            return positions
        q_len = positions.shape[-1]
        first = min(cached, max(self.budget - q_len, 0))
        return torch.arange(first, first + q_len, device=positions.device).expand_as(positions)

    def choose(self, n: int, keep: int, num_kv: int, call: LayerCall) -> torch.Tensor:
        sinks = min(self.sinks, keep)
        idx = torch.cat([torch.arange(sinks), torch.arange(n - (keep - sinks), n)])
        return idx.expand(num_kv, keep)

    def _rope(self, call: LayerCall) -> Any:
        if call.rope is None:
            raise ValueError("streaming_llm re-positions keys with RoPE, and this model has no rotary embedding")
        return call.rope

    def update(self, stored: KV | None, new: KV, call: LayerCall) -> tuple[KV, KV]:
        rope, state = self._rope(call), call.state
        if stored is None:
            state["pre"] = new[0][..., :0, :]
        elif state.get("pre") is None or state["pre"].shape[-2] != stored[0].shape[-2]:
            # rows written before the policy started sit at their text positions: row i was rotated at i
            state["pre"] = rope.unrotate(stored[0], torch.arange(stored[0].shape[-2]))
        out = super().update(stored, new, call)  # evicts through `kept`, which keeps `pre` aligned
        positions = call.positions if call.positions is not None else torch.arange(new[0].shape[-2])
        state["pre"] = torch.cat([state["pre"], rope.unrotate(new[0], positions)], dim=-2)
        return out

    def kept(self, stored: KV, idx: torch.Tensor, call: LayerCall) -> KV:
        pre = gather_rows(call.state["pre"], idx)  # (batch, num_kv, keep, head_dim) pre-RoPE keys
        keys, values = gather_rows(stored[0], idx), gather_rows(stored[1], idx)
        slots = torch.arange(idx.shape[1])
        moved = idx[0] != slots  # the same rows in every head
        if bool(moved.any()):
            keys = keys.clone()
            keys[:, :, moved] = self._rope(call).rotate(pre[:, :, moved], slots[moved])  # re-rotated at the new slot
        call.state["pre"] = pre
        return keys, values


@register
@dataclass(frozen=True)
class H2O(Eviction):
    name: ClassVar[str] = "h2o"
    title: ClassVar[str] = "H2O: heavy hitters + recent window"
    description: ClassVar[str] = (
        "Rank every row by the attention it has received so far, summed over all queries (per KV head); keep "
        "the `budget - recent` heaviest and the newest rows. Each KV head keeps its own rows; keys stay at their "
        "original positions."
    )
    corrupts: ClassVar[str] = "rows little attended so far (which may matter later)"
    symptom: ClassVar[str] = (
        "cache length capped at the budget; different KV heads keep different rows; old rows with large "
        "accumulated attention (often the first tokens) survive"
    )
    source: ClassVar[str] = (
        "Zhang et al., 'H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models', "
        "NeurIPS 2023, arXiv:2306.14048 (code FMInference/H2O: hh_score = attention summed over queries, per "
        "head); NVIDIA/TensorRT-LLM#104 (asked for it in a serving engine)"
    )
    source_urls: ClassVar[tuple[str, ...]] = (
        "https://arxiv.org/abs/2306.14048",
        "https://github.com/NVIDIA/TensorRT-LLM/issues/104",
    )
    params: ClassVar[tuple[Param, ...]] = (
        BUDGET, Param("heavy", "Heavy hitters", "rows kept for their accumulated attention (0 = half the budget, "
                                                "the paper's split)", minimum=0))
    observes: ClassVar[bool] = True
    heavy: int = 0

    def __post_init__(self) -> None:
        if self.heavy >= self.budget:
            raise ValueError(f"h2o: heavy hitters ({self.heavy}) must be fewer than the budget ({self.budget}) to "
                             "leave room for the newest row")

    @property
    def recent(self) -> int:
        """Rows kept because they are the newest (the new row included)."""
        return self.budget - (self.heavy or self.budget // 2)

    def observe(self, weights: torch.Tensor, call: LayerCall) -> None:
        # weights (batch, num_heads, q_len, kv_len): add each row's attention, summed over the queries
        received = weights.float().sum(dim=(0, 2))  # (num_heads, kv_len)
        score = call.state.get("score")
        if score is None:
            score = received.new_zeros(received.shape[0], 0)
        if score.shape[1] < received.shape[1]:  # the new rows start at zero
            score = torch.cat([score, score.new_zeros(score.shape[0], received.shape[1] - score.shape[1])], dim=1)
        call.state["score"] = score[:, : received.shape[1]] + received

    def _score(self, n: int, num_kv: int, call: LayerCall) -> torch.Tensor:
        """Accumulated attention per KV head (its query heads summed): (num_kv_heads, n)."""
        score = call.state.get("score")
        if score is None or score.shape[1] != n:
            raise RuntimeError(f"h2o: scores for {0 if score is None else score.shape[1]} rows, cache holds {n}")
        return score.view(num_kv, -1, n).sum(dim=1)

    def choose(self, n: int, keep: int, num_kv: int, call: LayerCall) -> torch.Tensor:
        recent = min(max(self.recent - 1, 0), keep)  # the new row is the last of the recent window
        heavy = keep - recent
        older = self._score(n, num_kv, call)[:, : n - recent]  # (num_kv, n - recent)
        top = older.topk(heavy, dim=1).indices  # (num_kv, heavy)
        return torch.cat([top, _recent(n, recent, num_kv)], dim=1).sort(dim=1).values

    def kept(self, stored: KV, idx: torch.Tensor, call: LayerCall) -> KV:
        score = call.state["score"]  # (num_heads, n): each query head follows its KV head's rows
        per_head = idx.repeat_interleave(score.shape[0] // idx.shape[0], dim=0)  # (num_heads, keep)
        call.state["score"] = score.gather(1, per_head)
        return super().kept(stored, idx, call)

    def report(self, state: dict[str, Any]) -> dict[str, Any]:
        out = super().report(state)
        score, tokens = state.get("score"), state.get("tokens")
        if score is not None and tokens is not None and score.shape[1] == tokens.shape[1]:
            out["score"] = score.view(tokens.shape[0], -1, tokens.shape[1]).sum(dim=1).numpy().copy()  # (num_kv, rows)
        return out


@register
@dataclass(frozen=True)
class TOVA(Eviction):
    name: ClassVar[str] = "tova"
    title: ClassVar[str] = "TOVA: drop the least attended row"
    description: ClassVar[str] = (
        "When the cache is full, drop the row the newest query attended to least (its weights averaged over all "
        "heads of the layer): one decision per layer, shared by every KV head. No accumulation, no fixed window; "
        "keys stay at their original positions."
    )
    corrupts: ClassVar[str] = "whatever the current query ignores (it may be needed later)"
    symptom: ClassVar[str] = (
        "cache length capped at the budget; rows leave from anywhere, one per step; every KV head keeps the same rows"
    )
    source: ClassVar[str] = (
        "Oren, Hassid, Yarden, Adi, Schwartz, 'Transformers are Multi-State RNNs', 2024, arXiv:2401.06104 "
        "(code schwartz-lab-NLP/TOVA: mean over heads of the last query's weights, one top-k per layer)"
    )
    source_urls: ClassVar[tuple[str, ...]] = ("https://arxiv.org/abs/2401.06104",)
    observes: ClassVar[bool] = True

    def observe(self, weights: torch.Tensor, call: LayerCall) -> None:
        # weights (batch, num_heads, q_len, kv_len): the newest query's row, averaged over heads
        call.state["last"] = weights[0, :, -1, :].float().mean(dim=0)  # (kv_len,)

    def choose(self, n: int, keep: int, num_kv: int, call: LayerCall) -> torch.Tensor:
        last = call.state.get("last")
        if last is None or last.shape[0] != n:
            raise RuntimeError(f"tova: weights for {0 if last is None else last.shape[0]} rows, cache holds {n}")
        return last.topk(keep).indices.sort().values.expand(num_kv, keep)

    def report(self, state: dict[str, Any]) -> dict[str, Any]:
        out = super().report(state)
        last = state.get("last")
        if last is not None:
            out["last"] = last.numpy().copy()  # (rows,) the weights the next eviction ranks by
        return out
