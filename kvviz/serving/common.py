"""What reuse, speculation and beam search share: one forward on a cache, greedy decoding, the
token texts of a run, and median timings.

No recorder is set around these forwards, so kvviz's registered attention runs as plain SDPA:
serving runs are as fast as transformers' own, and the same shared model serves every visitor.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch

from kvviz.engine.cache import KVVizCache
from kvviz.engine.models import LoadedModel
from kvviz.engine.timing import timed

T = TypeVar("T")

__all__ = ["forward", "greedy", "median_ms", "new_cache", "token_texts"]


def new_cache(lm: LoadedModel) -> KVVizCache:
    return KVVizCache(config=lm.model.config)


def forward(lm: LoadedModel, cache: KVVizCache, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Feed `ids` after what `cache` holds; return float32 logits (batch, q_len, vocab).

    `ids` is a list (one sequence) or a (batch, q_len) tensor. Positions continue from the cache's
    length (transformers' default), so the rows land where the cache says the text is."""
    ids_t = ids if isinstance(ids, torch.Tensor) else torch.tensor([list(ids)])
    with torch.inference_mode():
        out = lm.model(input_ids=ids_t.to(lm.device), past_key_values=cache, use_cache=True)
    return out.logits.float()


def greedy(lm: LoadedModel, cache: KVVizCache, next_logits: torch.Tensor, steps: int,
           eos: Iterable[int] = ()) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding from a filled cache: (token ids, the logits (vocab,) each was chosen from).

    `next_logits` (vocab,) are the logits after the last cached token. Stops after `steps` tokens or
    at an end-of-text token; the last chosen token is not fed (the cache ends one row short)."""
    eos = set(eos)
    ids: list[int] = []
    logits_seen: list[torch.Tensor] = []
    logits = next_logits
    while True:
        token = int(torch.argmax(logits).item())
        ids.append(token)
        logits_seen.append(logits)
        if len(ids) >= steps or token in eos:
            return ids, logits_seen
        logits = forward(lm, cache, [token])[0, -1]  # (vocab,)


def median_ms(fn: Callable[[], T], lm: LoadedModel, repeats: int) -> tuple[float, T]:
    """(median milliseconds over `repeats` calls, the last call's result); one untimed warm-up call first."""
    result = fn()
    times = []
    for _ in range(max(1, repeats)):
        ms, result = timed(fn, lm.device)
        times.append(ms)
    return statistics.median(times), result


def token_texts(lm: LoadedModel, ids: Iterable[int]) -> dict[int, str]:
    """Each distinct id's text (figures label rows with them)."""
    return {i: lm.tokenizer.decode([i]) for i in sorted(set(int(x) for x in ids))}
