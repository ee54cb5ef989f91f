"""Quality against memory: what an eviction policy or a quantised cache costs, measured.

Teacher-forced on held-out text: each passage is fed one token at a time (prefill = its first
token, then every next token of the text, whatever the model would have chosen), once with the
exact cache and once with the variant, and every next-token distribution is compared:

    ppl          exp(mean negative log-likelihood of the text) under the variant cache
    ppl_exact    the same under the exact cache (same tokens, same code path)
    mean_kl      mean KL(exact ‖ variant) over every predicted token, nats
    top1_agree   share of positions where both caches put the same token on top
    peak_cache_len         most rows any layer held after a step
    cache_bytes_per_token  bytes a real cache of this kind holds per cached token, scales included
                           (2 x layers x KV heads x head_dim x bytes per element)

Passages default to evenly spaced windows of the held-out Austen split (`data/austen/valid.txt.gz`,
the last 5% of every novel, never trained on), each starting with the tokens the tokenizer puts in
front of any text (a BOS, if it adds one). Nothing is recorded but logits (`Session(record=False)`).
"""

from __future__ import annotations

import gzip
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvviz.engine.models import LoadedModel
from kvviz.engine.session import Limits, Session
from kvviz.engine.variant import CacheVariant
from kvviz.geometry import dtype_bytes
from kvviz.variants.evidence import log_softmax, logit_metrics
from kvviz.variants.registry import Variant

HELD_OUT = Path(__file__).resolve().parents[2] / "data" / "austen" / "valid.txt.gz"


@dataclass(frozen=True)
class Quality:
    """One variant measured on some passages (the keys of `to_dict` are the CLI's JSON)."""

    variant: str
    params: dict[str, Any]
    ppl: float
    ppl_exact: float
    mean_kl: float
    top1_agree: float
    max_abs_logit_diff: float
    tokens: int  # predicted tokens, all passages
    passages: int
    peak_cache_len: int
    cache_bytes_per_token: float
    exact_bytes_per_token: float
    dtype: str  # of the exact cache the bytes are compared with
    model: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_cache_bytes(self) -> float:
        return self.peak_cache_len * self.cache_bytes_per_token

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        out.pop("params")  # flattened: each parameter is a key of its own
        out.update(self.params)
        out.update(self.extra)
        out["peak_cache_bytes"] = self.peak_cache_bytes
        return out


def text_prefix(lm: LoadedModel) -> list[int]:
    """The ids the tokenizer puts in front of any text (a BOS for models trained with one; often none)."""
    return list(lm.tokenizer("")["input_ids"])


def passages_from_text(lm: LoadedModel, text: str, tokens: int, count: int = 1) -> list[list[int]]:
    """`count` evenly spaced windows of `tokens` ids (prefix included) from `text`."""
    if tokens < 2:
        raise ValueError(f"tokens must be at least 2 (one to feed, one to predict), got {tokens}")
    prefix = text_prefix(lm)
    body = list(lm.tokenizer(text)["input_ids"])
    if prefix and body[: len(prefix)] == prefix:
        body = body[len(prefix):]  # each window gets the prefix of its own
    width = tokens - len(prefix)
    if len(body) < width:
        raise ValueError(f"the text has {len(body)} tokens; {tokens} were asked for: use a longer text or fewer tokens")
    if count < 1:
        raise ValueError(f"passages must be at least 1, got {count}")
    starts = [round(i * (len(body) - width) / max(count - 1, 1)) for i in range(count)]
    return [prefix + body[s:s + width] for s in starts]


def held_out_passages(lm: LoadedModel, tokens: int, count: int) -> list[list[int]]:
    """Evenly spaced windows of the held-out Austen split (the endings of all six novels)."""
    with gzip.open(HELD_OUT, "rt", encoding="utf-8") as f:
        return passages_from_text(lm, f.read(), tokens, count)


def forced_logits(lm: LoadedModel, ids: list[int], variant: CacheVariant | None) -> tuple[np.ndarray, int]:
    """Feed ids[0], then ids[1:] one at a time: (logits predicting ids[1:] (len-1, vocab), peak rows held)."""
    n = len(ids) - 1
    limits = Limits(max_prompt_tokens=max(1, len(ids)), max_new_tokens=max(1, n))
    session = Session(lm, ids[:1], n, bug=variant, forced_ids=ids[1:], parity=False, keep_logits=True,
                      record=False, stop_at_eos=False, limits=limits)
    peak, rows = 0, []
    while not session.done:
        step = session.step()
        rows.append(step.logits)
        peak = max(peak, *session.cache.seq_lengths())
    return np.stack(rows), peak


def nll(logits: np.ndarray, targets: list[int]) -> np.ndarray:
    """Negative log-likelihood of each target: (n, vocab), n ids -> (n,) nats."""
    return -log_softmax(logits)[np.arange(len(targets)), targets]


def measure(lm: LoadedModel, variant: CacheVariant | None, passages: list[list[int]],
            exact: list[np.ndarray] | None = None) -> Quality:
    """Measure `variant` against the exact cache on `passages` (pass `exact` logits to reuse them)."""
    if exact is None:
        exact = [forced_logits(lm, ids, None)[0] for ids in passages]
    nll_v, nll_e, kls, top1, dmax, peak = [], [], [], [], 0.0, 0
    for ids, ref in zip(passages, exact):
        logits, rows = forced_logits(lm, ids, variant)
        d, kl, agree = logit_metrics(ref, logits)
        nll_v.append(nll(logits, ids[1:]))
        nll_e.append(nll(ref, ids[1:]))
        kls.append(kl)
        top1.append(agree)
        dmax, peak = max(dmax, float(d.max())), max(peak, rows)
    geometry = lm.info
    exact_elem = dtype_bytes(geometry.dtype)
    elem = variant.cache_bytes_per_element(exact_elem) if isinstance(variant, Variant) else exact_elem
    return Quality(
        variant="none" if variant is None else variant.name,
        params=variant.parameters() if isinstance(variant, Variant) else {},
        ppl=math.exp(float(np.concatenate(nll_v).mean())),
        ppl_exact=math.exp(float(np.concatenate(nll_e).mean())),
        mean_kl=float(np.concatenate(kls).mean()),
        top1_agree=float(np.concatenate(top1).mean()),
        max_abs_logit_diff=dmax,
        tokens=int(sum(len(p) - 1 for p in passages)),
        passages=len(passages),
        peak_cache_len=int(peak),
        cache_bytes_per_token=geometry.elements_per_token() * elem,
        exact_bytes_per_token=float(geometry.elements_per_token() * exact_elem),
        dtype=geometry.dtype,
        model=geometry.name,
    )
