"""Eviction policies do what their papers say, and a budget that never evicts is the exact cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvviz.engine.variant import LayerCall, Rope
from kvviz.testing import tiny_model
from kvviz.variants import quality
from kvviz.variants.evidence import accumulated_attention
from kvviz.variants.paired import PairedSession
from kvviz.variants.registry import get_variant, names

PROMPT = "It is a truth universally acknowledged, that"
STEPS = 10
BUDGET = 8


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama_gqa")


def paired(lm, name, **params):
    p = PairedSession(lm, PROMPT, STEPS, name, stop_at_eos=False, **params)
    p.run()
    return p


@pytest.mark.parametrize("name", names("eviction"))
def test_a_budget_at_least_the_text_is_the_exact_cache(lm, name):
    """Guards the CLI's promise: budget >= text length gives the exact cache's logits (|Δlogit| <= 1e-5)."""
    ids = list(lm.tokenizer(PROMPT * 2)["input_ids"])[:24]
    exact, rows = quality.forced_logits(lm, ids, None)
    for budget in (len(ids), len(ids) + 5):
        logits, peak = quality.forced_logits(lm, ids, get_variant(name, budget=budget))
        assert np.abs(logits - exact).max() <= 1e-5 and peak == rows
    tight, peak = quality.forced_logits(lm, ids, get_variant(name, budget=6))
    assert peak == 6 and np.abs(tight - exact).max() > 1e-3  # a budget that evicts changes them


@pytest.mark.parametrize("name", names("eviction"))
def test_the_budget_caps_every_layer_after_prefill(lm, name):
    p = paired(lm, name, budget=BUDGET)
    n_prompt = len(p.exact.prompt_ids)
    assert p.steps[0].variant_cache_lens == (n_prompt,) * lm.info.num_layers  # prefill is never cut
    for s in p.steps[1:]:
        assert max(s.variant_cache_lens) == BUDGET and s.exact_cache_len == n_prompt + s.step
        for layer in range(lm.info.num_layers):
            held = p.held(layer, s.step)  # (kv_heads, rows): text tokens, ascending, the newest last
            assert held.shape == (lm.info.num_key_value_heads, BUDGET)
            assert (np.diff(held, axis=1) > 0).all() and (held[:, -1] == n_prompt + s.step - 1).all()


def test_sliding_window_keeps_the_newest_rows_as_written(lm):
    p = paired(lm, "sliding_window", budget=BUDGET)
    last = STEPS - 1
    n = len(p.exact.prompt_ids) + last
    assert (p.held(1, last) == np.arange(n - BUDGET, n)).all()
    exact, var = p.runs()
    # layer 0 rows depend only on token and position: the kept rows are the exact rows, untouched
    np.testing.assert_array_equal(var.trace.keys(0, last), exact.trace.keys(0, last)[:, n - BUDGET:])
    assert [s.positions[-1] for s in var.trace.steps[1:]] == [s.positions[-1] for s in exact.trace.steps[1:]]


def test_streaming_llm_keeps_sinks_and_recent_rows_at_their_cache_slots(lm):
    """As in the paper: positions are slots in the cache, and moved keys are re-rotated from their pre-RoPE copy."""
    sinks = 2
    p = paired(lm, "streaming_llm", budget=BUDGET, sinks=sinks)
    exact, var = p.runs()
    n_prompt, last = len(p.exact.prompt_ids), STEPS - 1
    n = n_prompt + last
    held = p.held(0, last)[0]
    assert held.tolist() == [*range(sinks), *range(n - (BUDGET - sinks), n)]
    assert [s.positions for s in var.trace.steps[1:]] == [(BUDGET - 1,)] * last  # the new token sits at its slot
    # ground truth from the exact run's layer-0 keys: unrotate token j from its text position, rotate to slot i
    rope = Rope.of(lm.model)
    k_exact = torch.from_numpy(exact.trace.keys(0, last))[None]  # (1, kv_heads, n, head_dim)
    pre = rope.unrotate(k_exact[:, :, held], torch.from_numpy(held))
    expected = rope.rotate(pre, torch.arange(BUDGET))[0].numpy()
    np.testing.assert_allclose(var.trace.keys(0, last), expected, atol=1e-5)
    np.testing.assert_array_equal(var.trace.values(0, last), exact.trace.values(0, last)[:, held])  # V has no RoPE
    # the sinks never move, so their keys are the exact ones bit for bit
    np.testing.assert_array_equal(var.trace.keys(0, last)[:, :sinks], exact.trace.keys(0, last)[:, :sinks])


def test_rope_rotates_like_the_model_and_undoes_itself(lm):
    rope = Rope.of(lm.model)
    x = torch.randn(1, 2, 5, lm.info.head_dim)
    pos = torch.tensor([0, 3, 7, 20, 41])
    np.testing.assert_allclose(rope.unrotate(rope.rotate(x, pos), pos).numpy(), x.numpy(), atol=1e-5)
    np.testing.assert_allclose(rope.rotate(x, torch.zeros(5, dtype=torch.long)).numpy(), x.numpy(), atol=1e-6)
    assert Rope.of(tiny_model("gpt2").model) is None  # learned positions: nothing to rotate


def test_h2o_keeps_the_rows_with_most_accumulated_attention_per_kv_head(lm):
    p = paired(lm, "h2o", budget=BUDGET)
    var = p.variant.trace()
    recent = BUDGET - BUDGET // 2
    for s in p.steps[1:]:
        for layer in range(lm.info.num_layers):
            report = s.reports[layer]
            # its score is the attention each held token has received, recomputed independently from the trace
            tokens = [x.reports[layer].get("tokens") for x in p.steps[: s.step + 1]]
            received = accumulated_attention(var, layer, s.step, tokens)  # (kv_heads, tokens so far)
            held = report["tokens"]
            for h in range(held.shape[0]):
                np.testing.assert_allclose(report["score"][h], received[h, held[h]], rtol=1e-4, atol=1e-5)
        # at the step that evicted, the kept older rows were the heaviest among the candidates
        prev = p.steps[s.step - 1].reports[0]
        n_prev = prev["tokens"].shape[1]
        if n_prev > BUDGET - 1:
            for h in range(prev["tokens"].shape[0]):
                candidates = prev["score"][h][: n_prev - (recent - 1)]
                top = set(prev["tokens"][h][np.argsort(-candidates, kind="stable")[: BUDGET // 2]].tolist())
                kept_old = set(s.reports[0]["tokens"][h][: BUDGET // 2].tolist())
                assert kept_old == top


def test_h2o_lets_each_kv_head_keep_its_own_rows():
    """Per head, as the reference code: a head that attends to other rows keeps other rows (plain tensors)."""
    h2o = get_variant("h2o", budget=5, heavy=2)  # recent window 3: the new row and the two newest stored
    state: dict = {}
    k = torch.arange(6.0).view(1, 1, 6, 1).expand(1, 2, 6, 4)  # (batch, kv_heads, rows, head_dim): row i holds i
    call = LayerCall(0, 1, state, torch.tensor([6]), torch.tensor([6]), None)
    weights = torch.zeros(1, 4, 1, 6)  # (batch, heads, q, rows); query heads 0,1 read KV head 0, heads 2,3 KV head 1
    weights[0, :2, 0, [1, 2]] = 0.5
    weights[0, 2:, 0, [0, 3]] = 0.5
    h2o.observe(weights, call)
    new = torch.full((1, 2, 1, 4), 6.0)
    (keys, _), _ = h2o.update((k, k), (new, new), call)
    assert state["tokens"].tolist() == [[1, 2, 4, 5, 6], [0, 3, 4, 5, 6]]
    assert keys[0, :, :, 0].tolist() == [[1, 2, 4, 5, 6], [0, 3, 4, 5, 6]]


def test_tova_drops_the_row_the_last_query_attended_least(lm):
    p = paired(lm, "tova", budget=BUDGET)
    checked = 0
    for s in p.steps[1:]:
        before = p.steps[s.step - 1].reports[0]
        if before["tokens"].shape[1] < BUDGET:
            continue  # nothing to evict yet
        kept = set(s.reports[0]["tokens"][0].tolist())
        lost = set(before["tokens"][0].tolist()) - kept
        n_lost = before["tokens"].shape[1] - (BUDGET - 1)
        weakest = before["tokens"][0][np.argsort(before["last"], kind="stable")[:n_lost]]
        assert lost == set(weakest.tolist())
        assert (s.reports[0]["tokens"] == s.reports[0]["tokens"][:1]).all()  # every KV head keeps the same rows
        checked += 1
    assert checked >= 3
