"""The exact and a variant cache stepped together on the same tokens: the API the step page's Cache control uses."""

from __future__ import annotations

import numpy as np
import pytest

import kvviz
from kvviz.testing import tiny_model
from kvviz.variants import evidence
from kvviz.variants.paired import PairedSession

PROMPT = "It is a truth universally acknowledged, that"


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama_gqa")


def test_the_exact_cache_twice_agrees_at_every_step(lm):
    p = PairedSession(lm, PROMPT, 5, None, parity=True, sampling=kvviz.Sampling(greedy=False, temperature=1.2, seed=3))
    steps = p.run()
    assert len(steps) == 5 and p.done
    assert all(s.max_abs_logit_diff == 0 and s.kl == 0 and s.top1_agree for s in steps)
    assert all(s.token_id == s.variant_token_id for s in steps)  # same sampling seed: the same choices
    assert all(x.max_abs_logit_diff < 1e-4 for x in p.exact.steps)  # the exact run is parity-checked


def test_the_variant_is_fed_the_exact_runs_tokens_one_step_at_a_time(lm):
    p = PairedSession(lm, PROMPT, 6, "off_by_one", stop_at_eos=False)
    first = p.step()
    assert first.step == 0 and not p.done
    p.run()
    exact, var = p.runs()
    assert [s.input_ids for s in var.trace.steps] == [s.input_ids for s in exact.trace.steps]
    assert [s.variant_token_id for s in p.steps] == list(var.trace.generated_ids)  # its own choices, recorded
    e = p.evidence()
    np.testing.assert_allclose([s.kl for s in p.steps], e.kl)
    np.testing.assert_allclose([s.max_abs_logit_diff for s in p.steps], e.max_abs_logit_diff, rtol=1e-6)
    assert [s.top1_agree for s in p.steps] == e.top1_agree.tolist()
    assert e.detected and e.bug == "off_by_one" and e.first_divergence_step == 1


def test_params_and_instances_both_work_and_bad_names_fail(lm):
    a = PairedSession(lm, PROMPT, 3, "h2o", budget=4)
    assert a.variant_cache.budget == 4
    b = PairedSession(lm, PROMPT, 3, kvviz.get_variant("tova", budget=5))
    assert b.variant_cache.budget == 5
    with pytest.raises(ValueError, match="unknown cache variant"):
        PairedSession(lm, PROMPT, 3, "nope")


def test_held_rows_grey_what_a_window_evicted(lm):
    p = PairedSession(lm, PROMPT, 6, "sliding_window", budget=8, stop_at_eos=False)
    p.run()
    n = len(p.exact.prompt_ids) + 5
    mask = p.held_mask(0, 5)  # (kv_heads, tokens so far)
    assert mask.shape == (lm.info.num_key_value_heads, n)
    assert (mask[:, n - 8:]).all() and not mask[:, : n - 8].any()
    exact = PairedSession(lm, PROMPT, 3, None)
    exact.run()
    assert exact.held_mask(1, 2).all() and exact.sinks == 1


def test_accumulated_attention_is_what_each_key_received(lm):
    """For the exact cache: the column sums of every query's attention, per KV head (its query heads added)."""
    p = PairedSession(lm, PROMPT, 4, None)
    p.run()
    trace = p.variant.trace()
    got = p.accumulated_attention(1, 3)  # (kv_heads, tokens so far)
    group = lm.info.num_heads // lm.info.num_key_value_heads
    manual = np.stack([sum(trace.attention_matrix(1, h, 3).sum(axis=0) for h in range(kv * group, (kv + 1) * group))
                       for kv in range(lm.info.num_key_value_heads)])
    np.testing.assert_allclose(got, manual[:, : got.shape[1]], rtol=1e-5)
    assert got.sum() == pytest.approx(lm.info.num_heads * (len(p.exact.prompt_ids) + 3), rel=1e-5)  # rows sum to 1


def test_accumulated_attention_follows_rows_that_moved(lm):
    """After eviction, weights land on the token each row holds, so evicted tokens keep what they had."""
    p = PairedSession(lm, PROMPT, 6, "streaming_llm", budget=6, sinks=2, stop_at_eos=False)
    p.run()
    got = p.accumulated_attention(0, 5)
    n_queries = len(p.exact.prompt_ids) + 5
    assert got.sum() == pytest.approx(lm.info.num_heads * n_queries, rel=1e-5)
    assert p.sinks == 2
    mask = p.held_mask(0, 5)
    later = evidence.accumulated_attention(p.variant.trace(), 0, 5, [s.reports[0].get("tokens") for s in p.steps])
    np.testing.assert_allclose(got, later)
    assert mask[:, :2].all() and not mask[:, 2: n_queries - 4].any()
