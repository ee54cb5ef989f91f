"""Reuse of cached rows across requests (a prefix store) and across chat turns (a kept cache).

**Prefix store — block-hashed, as vLLM's automatic prefix caching.** A prompt is cut into blocks of
`block_size` tokens; each full block is named by a chained hash, H(previous block's name, this
block's ids), so one name means one whole prefix. After a request runs, each full block of its
text (prompt and generated tokens) is stored under its name: a copy of that block's K and V rows in
every layer. A later request walks its own block names from the start and takes rows while the
names are found; the first miss ends the hit (SGLang's radix tree would match token by token
instead, and also reuse a partial last block). As in vLLM, a hit never covers the whole prompt:
at least the last token is computed, since its logits choose the first new token. The hit rows
are appended to a fresh cache with `DynamicCache.update`, and only the rest of the prompt goes
through the model. Rows depend only on the tokens before them (causal attention, positions from
the cache's length), so the reused run must equal a cold one: both are run and compared.

**Chat turns.** A `Conversation` keeps its cache: turn 2 feeds only the last reply token (never
fed) and the new message, continuing at the cache's length.

Both live in the caller's hands (the page keeps them in the browser session), never in a module
global: one visitor's rows are never served to another.

Shapes: per layer (keys, values), each (batch=1, num_key_value_heads, seq_len, head_dim).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from kvviz.engine.cache import KV, KVVizCache
from kvviz.engine.capture import to_numpy
from kvviz.engine.models import LoadedModel
from kvviz.engine.session import InputError, Limits, check_steps, encode_prompt, eos_token_ids
from kvviz.serving.common import forward, greedy, median_ms, new_cache, token_texts
from kvviz.serving.defaults import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_BLOCKS
from kvviz.serving.hooks import EXACT, ServingHooks
from kvviz.serving.records import BlockView, ServedRequest


@dataclass
class StoredBlock:
    """One full block of rows in the store."""

    key: bytes
    index: int  # its positions: [index * block_size, (index + 1) * block_size)
    token_ids: tuple[int, ...]
    rows: tuple[KV, ...]  # per layer (keys, values): (1, num_key_value_heads, block_size, head_dim)
    source: str  # the request that computed it
    hits: int = 0


class PrefixStore:
    """Block-hashed prefix cache of one visitor: name -> rows, least recently used evicted first."""

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, max_blocks: int = DEFAULT_MAX_BLOCKS,
                 hooks: ServingHooks = EXACT) -> None:
        if block_size < 1:
            raise InputError(f"block size must be at least 1, got {block_size}")
        if max_blocks < 1:
            raise InputError(f"the store must hold at least one block, got {max_blocks}")
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.hooks = hooks
        self.blocks: OrderedDict[bytes, StoredBlock] = OrderedDict()  # oldest use first
        self.served: list[ServedRequest] = []

    def __len__(self) -> int:
        return len(self.blocks)

    def block_keys(self, ids: Sequence[int]) -> list[bytes]:
        """The chained names of every full block of `ids`."""
        keys, parent, b = [], b"", self.block_size
        for i in range(len(ids) // b):
            parent = self.hooks.block_key(parent, ids[i * b:(i + 1) * b])
            keys.append(parent)
        return keys

    def match(self, ids: Sequence[int]) -> list[StoredBlock]:
        """The stored blocks that start `ids`, in order, stopping at the first miss.

        Only blocks inside ids[:-1] count (vLLM's rule): the last prompt token is always computed.
        The store trusts the name, as vLLM does; it never compares the tokens."""
        hits = []
        for key in self.block_keys(ids[:-1]):
            block = self.blocks.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def touch(self, blocks: Sequence[StoredBlock]) -> None:
        for block in blocks:
            block.hits += 1
            self.blocks.move_to_end(block.key)

    def insert(self, ids: Sequence[int], cache: KVVizCache, source: str) -> list[int]:
        """Store every full block of `ids` not stored yet, copying its rows from `cache` (which
        holds at least len(ids) rows). Returns the indices of the blocks stored now."""
        stored = []
        for i, key in enumerate(self.block_keys(ids)):
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            b = self.block_size
            self.blocks[key] = StoredBlock(key, i, tuple(ids[i * b:(i + 1) * b]), cache.rows(i * b, (i + 1) * b), source)
            stored.append(i)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)
        return stored

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for block in self.blocks.values() for k, v in block.rows)

    def clear(self) -> None:
        self.blocks.clear()
        self.served.clear()


def _hit_rows(hits: Sequence[StoredBlock]) -> tuple[KV, ...]:
    """Per layer, the hit blocks' rows joined in order: (1, num_key_value_heads, len(hits) * block_size, head_dim)."""
    n_layers = len(hits[0].rows)
    return tuple((torch.cat([h.rows[i][0] for h in hits], dim=-2), torch.cat([h.rows[i][1] for h in hits], dim=-2))
                 for i in range(n_layers))


def _cache_arrays(cache: KVVizCache, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n rows of every layer as (num_layers, num_key_value_heads, n, head_dim) arrays."""
    kvs = [cache.layer_kv(i) for i in range(len(cache.layers))]
    keys = np.stack([to_numpy(kv[0][0, :, :n]) for kv in kvs if kv is not None])
    values = np.stack([to_numpy(kv[1][0, :, :n]) for kv in kvs if kv is not None])
    return keys, values


@dataclass
class _Prefilled:
    cache: KVVizCache
    logits: torch.Tensor  # (computed_tokens, vocab): the logits of the positions this prefill computed


def _prefill(lm: LoadedModel, prompt_ids: Sequence[int], reused: tuple[KV, ...] | None, start: int) -> _Prefilled:
    """A fresh cache holding `reused` rows (the first `start` positions), then the rest of the prompt computed."""
    cache = new_cache(lm)
    if reused is not None:
        cache.append_rows(reused)
    logits = forward(lm, cache, prompt_ids[start:])[0]  # (q_len, vocab)
    return _Prefilled(cache, logits)


def _serve(lm: LoadedModel, name: str, mode: str, prompt_ids: Sequence[int], steps: int, start: int,
           warm_prefill: Callable[[], _Prefilled], block_size: int, repeats: int) -> tuple[ServedRequest, KVVizCache]:
    """Serve a prompt whose first `start` rows are reused (`warm_prefill`) and the same prompt cold; compare."""
    eos = eos_token_ids(lm)
    warm_ms, warm = median_ms(warm_prefill, lm, repeats)
    cold_ms, cold = median_ms(lambda: _prefill(lm, prompt_ids, None, 0), lm, repeats)
    keys, values = _cache_arrays(warm.cache, len(prompt_ids))
    cold_keys, cold_values = _cache_arrays(cold.cache, len(prompt_ids))
    out_ids, out_logits = greedy(lm, warm.cache, warm.logits[-1], steps, eos)
    cold_ids, cold_logits = greedy(lm, cold.cache, cold.logits[-1], steps, eos)
    diffs = [float((warm.logits - cold.logits[start:]).abs().max())]
    diffs += [float((a - b).abs().max()) for a, b in zip(out_logits, cold_logits)]
    row_diff = np.maximum(np.abs(keys - cold_keys).max(axis=(1, 3)), np.abs(values - cold_values).max(axis=(1, 3)))
    record = ServedRequest(
        name=name, mode=mode, prompt_ids=tuple(prompt_ids), output_ids=tuple(out_ids), cold_output_ids=tuple(cold_ids),
        token_text=token_texts(lm, [*prompt_ids, *out_ids, *cold_ids]), reused_tokens=start,
        computed_tokens=len(prompt_ids) - start, block_size=block_size, blocks=(), prefill_ms=warm_ms,
        cold_prefill_ms=cold_ms, max_abs_logit_diff=max(diffs), keys=keys, values=values, row_diff=row_diff,
    )
    return record, warm.cache


def serve(lm: LoadedModel, store: PrefixStore, prompt: str | Sequence[int], steps: int = 8, *, name: str | None = None,
          repeats: int = 3, limits: Limits | None = None) -> ServedRequest:
    """Serve one request through `store`: its cached prefix blocks are reused, the rest computed;
    then its own full blocks (prompt and generated text) are stored for the next request.

    `repeats`: timed prefills per path (medians). The record compares the run with a cold one."""
    prompt_ids = list(prompt) if not isinstance(prompt, str) else encode_prompt(lm, prompt, limits)
    if not prompt_ids:
        raise InputError("the prompt is empty: type some text to start from")
    check_steps(lm, len(prompt_ids), steps, limits)
    name = name or f"R{len(store.served) + 1}"
    hits = store.match(prompt_ids)
    store.touch(hits)
    start = len(hits) * store.block_size

    def warm() -> _Prefilled:
        # joining the hit blocks is part of the cost: DynamicCache wants one contiguous tensor per layer
        # (a paged server would point its block table at them instead)
        return _prefill(lm, prompt_ids, _hit_rows(hits) if hits else None, start)

    record, cache = _serve(lm, name, "prefix", prompt_ids, steps, start, warm, store.block_size, repeats)
    text = [*prompt_ids, *record.output_ids[:-1]]  # the rows the cache holds: the last token was never fed
    stored = set(store.insert(text, cache, name))
    record = replace(record, blocks=tuple(_block_views(store, prompt_ids, hits, stored, name)))
    store.served.append(record)
    return record


def _block_views(store: PrefixStore, ids: Sequence[int], hits: Sequence[StoredBlock], stored: set[int],
                 name: str) -> list[BlockView]:
    b = store.block_size
    keys = store.block_keys(ids)
    out = []
    for i in range((len(ids) + b - 1) // b):
        tokens = tuple(ids[i * b:(i + 1) * b])
        if i < len(hits):
            out.append(BlockView(i, hits[i].key.hex(), "hit", hits[i].source, tokens))
        elif i < len(keys):
            out.append(BlockView(i, keys[i].hex(), "stored" if i in stored else "computed", name, tokens))
        else:
            out.append(BlockView(i, "", "partial", name, tokens))
    return out


class Conversation:
    """A chat whose every turn continues from the previous turn's cache (one per visitor)."""

    def __init__(self, lm: LoadedModel, limits: Limits | None = None) -> None:
        self.lm = lm
        self.limits = limits
        self.cache: KVVizCache | None = None
        self.ids: list[int] = []  # every token so far; the cache holds all but the last
        self.turns: list[ServedRequest] = []

    def say(self, text: str, steps: int = 8, repeats: int = 3) -> ServedRequest:
        """Add a user message and generate a reply. The first turn is tokenized as a prompt (with the
        tokenizer's special tokens); later ones are appended as plain text."""
        lm = self.lm
        if not text or not text.strip():
            raise InputError("the message is empty: type some text")
        if self.cache is None:
            new_ids = encode_prompt(lm, text, self.limits)
        else:
            new_ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
            if not new_ids:
                raise InputError("the message produced no tokens: type some text")
        prompt_ids = self.ids + new_ids
        check_steps(lm, len(prompt_ids), steps, self.limits)
        start = max(0, len(self.ids) - 1)  # the kept rows; the reply's last token is fed with the message
        previous = self.cache

        def warm() -> _Prefilled:
            if previous is None:
                return _prefill(lm, prompt_ids, None, 0)
            # each timed run continues the kept cache itself; crop (transformers') takes the last run's rows back off
            extra = previous.get_seq_length() - start
            previous.crop(-extra)
            return _Prefilled(previous, forward(lm, previous, prompt_ids[start:])[0])

        name = f"turn {len(self.turns) + 1}"
        record, cache = _serve(lm, name, "chat", prompt_ids, steps, start, warm, 0, repeats)
        self.cache, self.ids = cache, [*prompt_ids, *record.output_ids]
        self.turns.append(record)
        return record


def reuse_pair(lm: LoadedModel, first: str, then: str, steps: int = 8, *, block_size: int = DEFAULT_BLOCK_SIZE,
               chat: bool = False, repeats: int = 3, limits: Limits | None = None) -> tuple[ServedRequest, ServedRequest]:
    """Serve `first`, then `then`: through a fresh prefix store, or (`chat`) as the conversation's second turn."""
    if chat:
        conv = Conversation(lm, limits)
        return conv.say(first, steps, repeats), conv.say(then, steps, repeats)
    store = PrefixStore(block_size)
    return serve(lm, store, first, steps, repeats=repeats, limits=limits), serve(lm, store, then, steps, repeats=repeats,
                                                                              limits=limits)
