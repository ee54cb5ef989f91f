"""Speculative decoding with prompt-lookup drafts, and the rollback of rejected rows.

Each step:
1. **Draft.** Prompt lookup (no second model): find the text's last n-gram (n = max_ngram down to
   1) earlier in the text, first match from the left, and propose the k tokens that followed it —
   the rule of transformers' `PromptLookupCandidateGenerator` (a draft stops before an end-of-text).
2. **Verify in one forward.** Feed [last token, d1 .. dk]: the cache grows by 1 + k rows and the
   model's greedy choice after every fed token comes out of the same forward.
3. **Accept** the leading drafts equal to the model's choices (n of them), then take the model's own
   next token after them: every step adds n + 1 tokens, exactly what greedy decoding would write.
4. **Roll back.** The rows of the k - n rejected drafts are removed with `cache.crop(-(k - n))`, as
   transformers' `_assisted_decoding` does; the cache again holds every token but the newest.

The prefill runs alone (step 0); transformers' assisted generation instead drafts from the prompt
and verifies those drafts in the prefill forward. Greedy only: sampled speculation needs rejection
sampling against the draft's probabilities, which prompt lookup does not have.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from kvviz.engine.cache import KVVizCache
from kvviz.engine.models import LoadedModel
from kvviz.engine.session import InputError, Limits, check_steps, encode_prompt, eos_token_ids
from kvviz.engine.timing import timed
from kvviz.serving.common import forward, greedy, new_cache, token_texts
from kvviz.serving.defaults import DEFAULT_DRAFT_TOKENS, DEFAULT_MAX_NGRAM, MAX_DRAFT_TOKENS
from kvviz.serving.hooks import EXACT, ServingHooks
from kvviz.serving.records import SpecRun, SpecStep


@dataclass(frozen=True)
class Draft:
    ids: tuple[int, ...]
    match_start: int = -1  # where the matched n-gram starts in the text (-1: none)
    ngram: int = 0


def prompt_lookup(ids: Sequence[int], k: int, max_ngram: int = DEFAULT_MAX_NGRAM, eos: Iterable[int] = ()) -> Draft:
    """Propose up to k tokens: what followed the first earlier occurrence of the text's last n-gram."""
    eos = set(eos)
    n_ids = len(ids)
    if k < 1:
        return Draft(())
    for n in range(min(max_ngram, n_ids - 1), 0, -1):
        tail = list(ids[n_ids - n:])
        for start in range(n_ids - n):  # every window before the tail itself, left to right
            if list(ids[start:start + n]) != tail:
                continue
            follow = list(ids[start + n:min(start + n + k, n_ids)])
            if not follow:
                continue
            cut = next((i for i, t in enumerate(follow) if t in eos), len(follow))
            if cut == 0:  # only an end-of-text follows: transformers gives up the lookup here
                return Draft(())
            return Draft(tuple(follow[:cut]), start, n)
    return Draft(())


def speculate(lm: LoadedModel, prompt: str | Sequence[int], steps: int = 32, draft_tokens: int = DEFAULT_DRAFT_TOKENS,
              *, max_ngram: int = DEFAULT_MAX_NGRAM, hooks: ServingHooks = EXACT,
              limits: Limits | None = None) -> SpecRun:
    """Generate `steps` tokens greedily with prompt-lookup speculation; also plain greedy, to compare."""
    if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise InputError(f"draft tokens must be between 1 and {MAX_DRAFT_TOKENS}, got {draft_tokens}")
    if max_ngram < 1:
        raise InputError(f"the n-gram size must be at least 1, got {max_ngram}")
    prompt_ids = list(prompt) if not isinstance(prompt, str) else encode_prompt(lm, prompt, limits)
    check_steps(lm, len(prompt_ids), steps, limits)
    eos = eos_token_ids(lm)

    cache = new_cache(lm)
    cache.activate_past_recording()  # sliding-window layers keep their rows until the crop (transformers does the same)
    prefill_ms, logits = timed(lambda: forward(lm, cache, prompt_ids)[0, -1], lm.device)
    text = [*prompt_ids, int(torch.argmax(logits))]
    records: list[SpecStep] = []
    while len(text) - len(prompt_ids) < steps and text[-1] not in eos:
        remaining = steps - (len(text) - len(prompt_ids))
        # at most remaining - 1 drafts: the verifying forward always adds one token of its own
        draft = prompt_lookup(text, min(draft_tokens, remaining - 1), max_ngram, eos)
        records.append(_verify(lm, cache, text, draft, len(records) + 1, hooks))
        text += records[-1].new_ids

    plain_cache = new_cache(lm)
    first = forward(lm, plain_cache, prompt_ids)[0, -1]
    greedy_ms, (greedy_ids, _) = timed(lambda: greedy(lm, plain_cache, first, steps, eos), lm.device)
    return SpecRun(
        prompt_ids=tuple(prompt_ids),
        token_text=token_texts(lm, [*text, *greedy_ids, *(t for r in records for t in r.draft_ids)]),
        draft_tokens=draft_tokens, max_ngram=max_ngram, first_id=text[len(prompt_ids)], prefill_ms=prefill_ms,
        steps=tuple(records), greedy_ids=tuple(greedy_ids), greedy_ms=greedy_ms,
    )


def _verify(lm: LoadedModel, cache: KVVizCache, text: list[int], draft: Draft, step: int, hooks: ServingHooks) -> SpecStep:
    """One forward over [last token, drafts]; accept the matching drafts; crop the rejected rows."""
    before = cache.get_seq_length()

    def run() -> tuple[tuple[int, ...], int, int]:
        logits = forward(lm, cache, [text[-1], *draft.ids])[0]  # (1 + k, vocab)
        verified_len = cache.get_seq_length()
        choices = tuple(int(c) for c in torch.argmax(logits, dim=-1))  # the model's greedy token after each fed token
        accepted = 0
        while accepted < len(draft.ids) and choices[accepted] == draft.ids[accepted]:
            accepted += 1
        hooks.rollback(cache, len(draft.ids) - accepted)
        return choices, verified_len, accepted

    time_ms, (verified, verified_len, accepted) = timed(run, lm.device)
    new_ids = (*draft.ids[:accepted], verified[accepted])
    return SpecStep(
        step=step, draft_ids=draft.ids, match_start=draft.match_start, ngram=draft.ngram, verified_ids=verified,
        accepted=accepted, new_ids=new_ids, cache_len_before=before, cache_len_verified=verified_len,
        cache_len_after=cache.get_seq_length(), time_ms=time_ms,
    )
