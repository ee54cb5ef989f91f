"""Speculative decoding with prompt lookup: drafts as transformers proposes them, the rejected rows
cropped from the real cache, and the output equal to plain greedy decoding."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from kvviz.engine.session import InputError
from kvviz.serving.hooks import ServingHooks
from kvviz.serving.speculative import prompt_lookup, speculate

REPEATING = 'Elizabeth said to her sister, "I am very glad to see you." Her sister said to Elizabeth, "I am very'


@pytest.fixture(params=["bundled", "tiny"])
def lm(request, bundled, tiny_llama):
    return bundled if request.param == "bundled" else tiny_llama


def greedy_generate(lm, ids, steps):
    t = torch.tensor([list(ids)])
    return lm.model.generate(t, max_new_tokens=steps, do_sample=False, pad_token_id=0)[0, t.shape[1]:].tolist()


@pytest.mark.parametrize("seed", range(40))
def test_prompt_lookup_proposes_what_transformers_proposes(seed):
    rng = random.Random(seed)
    ids = [rng.randrange(6) for _ in range(rng.randrange(2, 30))]
    k, n = rng.randrange(1, 6), rng.randrange(1, 4)
    eos = rng.choice([[], [0]])
    gen = PromptLookupCandidateGenerator(eos_token_id=torch.tensor(eos) if eos else None, num_output_tokens=k,
                                         max_matching_ngram_size=n, max_length=1000)
    cand, _ = gen.get_candidates(torch.tensor([ids]))
    expected = cand[0, len(ids):].tolist()
    draft = prompt_lookup(ids, k, n, eos)
    assert list(draft.ids) == expected
    if draft.ids:  # the match it reports is real: the n-gram before the draft equals the text's last n-gram
        assert ids[draft.match_start:draft.match_start + draft.ngram] == ids[-draft.ngram:]
        assert list(draft.ids) == ids[draft.match_start + draft.ngram:][: len(draft.ids)]


@pytest.mark.parametrize("k", [1, 4])
def test_speculation_equals_greedy_decoding_and_crops_every_rejected_row(lm, k):
    run = speculate(lm, REPEATING, 24, k)
    assert list(run.generated_ids) == greedy_generate(lm, run.prompt_ids, 24)
    assert run.matches_greedy and len(run.generated_ids) == 24
    assert run.proposed > 0  # the prompt repeats itself: lookup finds drafts
    held = len(run.prompt_ids) + 1  # after prefill: the prompt's rows; the first token is not fed yet
    for s in run.steps:
        assert s.cache_len_before == held - 1
        assert s.cache_len_verified == s.cache_len_before + 1 + s.proposed
        assert s.rolled_back == s.proposed - s.accepted == s.rejected  # measured on the cache
        assert s.cache_len_after == s.cache_len_before + 1 + s.accepted
        assert s.new_ids[: s.accepted] == s.draft_ids[: s.accepted] and len(s.new_ids) == s.accepted + 1
        assert s.proposed <= k
        held += len(s.new_ids)
    assert run.rolled_back_rows == run.proposed - run.accepted
    assert 1 + len(run.steps) <= len(run.generated_ids)


class KeepRejected(ServingHooks):
    """The bug the rollback prevents: rejected draft rows stay in the cache."""

    def rollback(self, cache, rejected):
        pass


class Watch(ServingHooks):
    """Exact, but remembers the cache so the test can read it at the end."""

    def rollback(self, cache, rejected):
        self.cache = cache
        super().rollback(cache, rejected)


def test_the_cache_after_speculation_is_the_cache_of_the_text(bundled):
    """Not just the row count: the rows left are those a plain prefill of the text computes."""
    from kvviz.serving.common import forward, new_cache

    hooks = Watch()
    run = speculate(bundled, REPEATING, 16, 4, hooks=hooks)
    text = [*run.prompt_ids, *run.generated_ids][:-1]  # the newest token is never fed
    cold = new_cache(bundled)
    forward(bundled, cold, text)
    assert hooks.cache.get_seq_length() == len(text)
    for i in range(bundled.info.num_layers):
        got, ref = hooks.cache.layer_kv(i), cold.layer_kv(i)
        torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(got[1], ref[1], atol=1e-4, rtol=0)


def test_without_rollback_the_rejected_rows_stay(bundled):
    run = speculate(bundled, REPEATING, 16, 4, hooks=KeepRejected())
    rejected = [s for s in run.steps if s.rejected]
    assert rejected, "the prompt must produce rejected drafts"
    assert all(s.rolled_back == 0 for s in run.steps)
    last = run.steps[-1]
    assert last.cache_len_after > len(run.prompt_ids) + len(run.generated_ids)  # more rows than text


def test_bad_input(bundled):
    with pytest.raises(InputError, match="draft"):
        speculate(bundled, REPEATING, 4, 0)
    with pytest.raises(InputError, match="empty"):
        speculate(bundled, "", 4)
    with pytest.raises(InputError, match="steps"):
        speculate(bundled, REPEATING, 0)
