"""The exact cache and a variant cache, stepped together on the same tokens: the Cache control's engine.

    exact:    a normal session: it chooses each next token (greedy or sampled);
    variant:  the same prompt and sampling with a cache variant, *teacher-forced*: at every step it is
              fed the token the exact run chose, so every difference is the variant's own. Its own
              choice is still recorded (`PairedStep.variant_token`).

Each `step()` runs one forward in each and returns a `PairedStep`: |Δlogit|, KL(exact ‖ variant),
top-1 agreement, both cache lengths and what the variant says each layer holds (which text token
every row is, H2O's scores). The views a page draws are methods here, page-independent: which
tokens each layer/KV head holds (greying evicted rows), the quantisation error of each row, the
attention each cached token has received (what H2O ranks), with the sink rows marked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvviz.engine.models import LoadedModel
from kvviz.engine.sampling import Sampling
from kvviz.engine.session import Limits, Session
from kvviz.engine.variant import CacheVariant
from kvviz.variants import evidence
from kvviz.variants.evidence import Evidence, Run
from kvviz.variants.registry import Variant, get_variant


def variant_reports(session: Session) -> tuple[dict[str, Any], ...]:
    """What a session's variant says each layer holds now (see `Variant.report`), one dict per layer."""
    bug = session.bug
    if not isinstance(bug, Variant):
        return ()
    states = session.cache.bug_state
    return tuple(bug.report(states.get(i, {})) for i in range(session.lm.info.num_layers))


@dataclass(frozen=True)
class PairedStep:
    """One step of both runs (step 0 = prefill)."""

    step: int
    token_id: int  # the exact run's choice: the next input of both runs
    token: str
    variant_token_id: int  # what the variant would have chosen from its own logits
    variant_token: str
    max_abs_logit_diff: float
    kl: float  # KL(exact ‖ variant), nats
    top1_agree: bool
    exact_cache_len: int  # rows after the step (layer 0)
    variant_cache_lens: tuple[int, ...]  # rows each layer's variant cache keeps after the step
    reports: tuple[dict[str, Any], ...]  # per layer: the variant's own account (e.g. "tokens" (num_kv_heads, rows))


class PairedSession:
    """An exact and a variant session on one prompt, stepped together (one user's; the model is shared)."""

    def __init__(self, lm: LoadedModel, prompt: str | Sequence[int], max_new_tokens: int,
                 variant: str | CacheVariant | None, *, sampling: Sampling | None = None, limits: Limits | None = None,
                 parity: bool = False, stop_at_eos: bool = True, **params: Any) -> None:
        """`variant`: a registry name (with `params`, e.g. budget=16) or an instance; None = the exact cache twice.
        `parity`: check the exact run against a full recompute at every step (the variant never is)."""
        self.variant_cache = get_variant(variant, **params) if isinstance(variant, str) else variant
        self.exact = Session(lm, prompt, max_new_tokens, sampling=sampling, limits=limits, parity=parity,
                             stop_at_eos=stop_at_eos, keep_logits=True)
        self.variant = Session(lm, prompt, max_new_tokens, bug=self.variant_cache, sampling=sampling, limits=limits,
                               parity=False, stop_at_eos=False, keep_logits=True)
        self.steps: list[PairedStep] = []

    @property
    def done(self) -> bool:
        return self.exact.done

    @property
    def stopped_reason(self) -> str | None:
        return self.exact.stopped_reason

    def step(self) -> PairedStep:
        """One forward in each run; the variant is fed the exact run's token next."""
        e = self.exact.step()
        v = self.variant.step()
        if not self.variant.done:
            self.variant.force_next(e.token_id)
        assert e.logits is not None and v.logits is not None  # both keep logits
        dlogit, kl, top1 = evidence.logit_metrics(e.logits[None], v.logits[None])
        record = PairedStep(
            step=e.step, token_id=e.token_id, token=e.token, variant_token_id=v.token_id, variant_token=v.token,
            max_abs_logit_diff=float(dlogit[0]), kl=float(kl[0]), top1_agree=bool(top1[0]),
            exact_cache_len=e.cache_len, variant_cache_lens=tuple(self.variant.cache.seq_lengths()),
            reports=variant_reports(self.variant),
        )
        self.steps.append(record)
        return record

    def run(self) -> list[PairedStep]:
        while not self.done:
            self.step()
        return self.steps

    # -- the two runs, as evidence -----------------------------------------------------------------
    def runs(self) -> tuple[Run, Run]:
        """(exact, variant) as `Run`s: each trace with its per-step logits (steps, vocab)."""
        out = []
        for s in (self.exact, self.variant):
            t = s.trace()
            out.append(Run(trace=t, logits=np.stack([x.logits for x in t.steps])))
        return out[0], out[1]

    def evidence(self, free: Any = None) -> Evidence:
        """The whole comparison so far (see `kvviz.variants.evidence.compare`)."""
        exact, var = self.runs()
        v = self.variant_cache
        cls = type(v) if isinstance(v, Variant) else None
        return evidence.compare(
            exact, var, free, bug="none" if v is None else v.name,
            title="Correct cache" if cls is None else cls.title, kind="none" if cls is None else cls.kind,
            clue="" if cls is None else cls.clue,
            scope_layers=None if v is None or v.layers is None else tuple(sorted(v.layers)),
            start_step=0 if v is None else v.start_step, reports=tuple(s.reports for s in self.steps),
        )

    # -- views for the Cache control -----------------------------------------------------------------
    @property
    def sinks(self) -> int:
        """Rows marked as sinks: the variant's own (StreamingLLM), else the first token (the usual attention sink)."""
        return int(getattr(self.variant_cache, "sinks", 1))

    def held(self, layer: int, step: int) -> np.ndarray:
        """(num_kv_heads, rows): the text token each row of the variant cache holds after `step`.

        From the variant's own account when it keeps one (eviction); else rows are tokens 0..n-1."""
        reports = self.steps[step].reports
        tokens = reports[layer].get("tokens") if reports else None
        if tokens is not None:
            return tokens
        n = self.steps[step].variant_cache_lens[layer]
        return np.tile(np.arange(n), (self.exact.lm.info.num_key_value_heads, 1))

    def held_mask(self, layer: int, step: int) -> np.ndarray:
        """(num_kv_heads, tokens so far) bool: which text tokens the variant still holds (False = evicted)."""
        n_tokens = len(self.exact.prompt_ids) + step
        return evidence.held_mask(self.held(layer, step), n_tokens, self.exact.lm.info.num_key_value_heads)

    def accumulated_attention(self, layer: int, step: int) -> np.ndarray:
        """(num_kv_heads, tokens so far): the attention each token's row has received in the variant run
        (summed over its queries and the query heads of each KV head). Evicted tokens keep what they got."""
        trace = self.variant.trace()
        tokens = [s.reports[layer].get("tokens") if s.reports else None for s in self.steps[: step + 1]]
        # the rows attended at step s are the rows held after step s (eviction happens before the write)
        return evidence.accumulated_attention(trace, layer, step, tokens)

    def quantization_error(self, layer: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(K error, V error), each (num_kv_heads, rows, head_dim): dequantised minus the exact rows written."""
        return evidence.quantization_error(self.variant.trace(), layer, step)
