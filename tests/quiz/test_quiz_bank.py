"""The question bank on live runs: enough questions of every kind, each gradable, each citing numbers
that equal an independent computation from the model's config and weights.

Expectations are derived here (from the config, the parameters, the tokenizer), never copied from
a checkpoint's outputs: the bundled model is being retrained.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest

from kvviz.engine import DEFAULT_PROMPT
from kvviz.engine.session import InputError
from kvviz.quiz import bank
from kvviz.quiz.live import DECODE_STEP, FAR_STEP, LIVE_STEPS, SERVING_STATIC, live_run
from kvviz.quiz.questions import KINDS, grade
from kvviz.testing import tiny_model
from kvviz.variants.registry import names

MODELS = ("bundled", "llama_mqa", "gpt2", "qwen2")


@pytest.fixture(scope="module", params=MODELS)
def run(request):
    lm = request.getfixturevalue("bundled") if request.param == "bundled" else tiny_model(request.param)
    return lm, live_run(lm)


def by_id(live):
    return {q.id: q for q in bank.questions(live)}


def config_numbers(lm) -> dict[str, int]:
    """Layers, heads, KV heads, head_dim and hidden size read straight from the config dict."""
    c = lm.model.config.to_dict()
    layers = c.get("num_hidden_layers") or c["n_layer"]
    heads = c.get("num_attention_heads") or c["n_head"]
    hidden = c.get("hidden_size") or c["n_embd"]
    return dict(L=layers, H=heads, kv=c.get("num_key_value_heads") or heads, d=c.get("head_dim") or hidden // heads,
                hidden=hidden, vocab=c["vocab_size"])


def test_enough_questions_of_every_kind_with_unique_ids(run):
    _lm, live = run
    qs = bank.questions(live)
    assert len(qs) >= 15
    assert {q.kind for q in qs} == set(KINDS)
    assert len({q.id for q in qs}) == len(qs)
    assert {q.id for q in qs} | set(bank.not_applicable(live)) == {s.id for s in bank.BANK}


def test_every_question_grades_its_answer_right_and_a_wrong_one_wrong(run):
    _lm, live = run
    for q in bank.questions(live):
        right = {"single": q.answer[0], "truefalse": q.answer[0], "multi": set(q.answer), "order": list(q.answer)}[q.kind]
        assert grade(q, right), q.id
        if q.kind == "order":
            wrong = list(reversed(q.answer))
        elif q.kind == "multi":
            wrong = set(q.answer) - {q.answer[0]}
            wrong = wrong or {next(i for i in range(len(q.options)) if i not in q.answer)}
        else:
            wrong = next(i for i in range(len(q.options)) if i != q.answer[0])
        assert not grade(q, wrong), q.id
        assert q.explanation and q.links, q.id


def test_questions_that_do_not_fit_a_model_are_left_out(run):
    lm, live = run
    n = config_numbers(lm)
    skipped = set(bank.not_applicable(live))
    expected = set()
    if n["kv"] == n["H"]:
        expected |= {"gqa-which-kv", "gqa-same-weights", "bug-gqa-tile"}
    if n["kv"] == 1:
        expected |= {"mqa-bytes", "bug-gqa-tile"}
    assert skipped == expected


def test_the_cost_numbers_equal_a_count_of_the_weights(run):
    lm, live = run
    n = config_numbers(lm)
    prompt = len(lm.tokenizer(DEFAULT_PROMPT)["input_ids"])
    # matrix weights inside the decoder blocks (2-D parameters of the layers), counted here directly
    matmul = sum(p.numel() for name, p in lm.model.named_parameters() if p.dim() == 2 and re.search(r"\.(layers|h)\.\d+\.", name))
    ctx = prompt + FAR_STEP
    attn = 4 * n["L"] * n["H"] * n["d"]
    cached = 2 * matmul + attn * ctx + 2 * n["vocab"] * n["hidden"]
    recompute = 2 * matmul * ctx + attn * ctx * (ctx + 1) // 2 + 2 * n["vocab"] * n["hidden"]
    q = by_id(live)["flops-step-100"]
    assert q.options[q.answer[0]] == f"About {recompute / cached:,.0f}×"
    assert f"context is {ctx} tokens" in q.text


def test_the_bytes_numbers_equal_the_config(run):
    lm, live = run
    n = config_numbers(lm)
    bpt = 2 * n["L"] * n["kv"] * n["d"] * 4  # float32 on CPU
    q = by_id(live)["bytes-per-token"]
    assert q.options[q.answer[0]] == f"{bpt:,} bytes"
    assert "exactly the formula" in q.explanation  # the live cache weighed the same
    assert live.cache_bytes == bpt * (len(lm.tokenizer(DEFAULT_PROMPT)["input_ids"]) + LIVE_STEPS - 1)
    if "mqa-bytes" in by_id(live):
        q = by_id(live)["mqa-bytes"]
        assert q.options[q.answer[0]] == f"{2 * n['L'] * n['d'] * 4:,} bytes"


def test_which_keys_and_positions_follow_from_the_prompt_length(run):
    lm, live = run
    prompt = len(lm.tokenizer(DEFAULT_PROMPT)["input_ids"])
    qs = by_id(live)
    q = qs["tenth-token-keys"]
    assert q.options[q.answer[0]].startswith(f"{prompt + DECODE_STEP}: the {prompt} prompt tokens")
    assert f"has **{prompt + DECODE_STEP} weights**" in q.explanation
    assert f"{prompt + DECODE_STEP - 1} rows before the step and {prompt + DECODE_STEP} after" in q.explanation
    q = qs["rope-position"]
    assert q.options[q.answer[0]] == str(prompt + 7 - 1)  # decode step 7 feeds position n + 6
    q = qs["prefill-causal"]
    assert f"prompt token {prompt // 2} " in q.text and "the largest weight above the diagonal was 0." in q.explanation
    q = qs["decode-order"]
    assert f"from {prompt + 4} to {prompt + 5} rows" in q.explanation
    q = qs["rope-no-rerotate"]
    assert "by at most 0," in q.explanation  # the run's cache was never rewritten


def test_the_gqa_map_is_the_models_sharing(run):
    lm, live = run
    n = config_numbers(lm)
    group = n["H"] // n["kv"]
    qs = by_id(live)
    if "gqa-which-kv" not in qs:
        return
    q = qs["gqa-which-kv"]
    assert q.options[q.answer[0]] == f"KV head {(n['H'] - 1) // group}"
    assert ", ".join(f"{h}→{h // group}" for h in range(n["H"])) in q.explanation


def test_the_what_if_runs_on_the_whole_live_text(run):
    lm, live = run
    prompt = len(lm.tokenizer(DEFAULT_PROMPT)["input_ids"])
    w = live.tied
    assert len(w.tokens) == prompt + LIVE_STEPS - 1  # every fed token; the last choice is never fed
    # the real half is the live run's own attention, rebuilt from its recorded steps
    np.testing.assert_allclose(w.real, live.trace.attention_matrix(w.layer, w.head, live.last_step), atol=1e-5)
    q = by_id(live)["whatif-own-score"]
    assert f"in **{int(w.own_is_top(w.tied).sum())} of {len(w.tokens)}** rows" in q.explanation
    assert q.figure == "whatif"


def test_the_serving_numbers_follow_from_the_scenario(run):
    _lm, live = run
    s = SERVING_STATIC
    prompt, blocks = s["system_tokens"] + s["user_tokens"], s["budget_tokens"] // s["block_size"]
    per = math.ceil((prompt + s["output_tokens"]) / s["block_size"])
    shared = s["system_tokens"] // s["block_size"]
    want = (s["budget_tokens"] // (prompt + s["max_new_tokens"]), blocks // per, (blocks - shared) // (per - shared))
    q = by_id(live)["serving-shared-prompt"]
    assert [int(x) for x in re.findall(r"fits \*\*(\d+)\*\*", q.explanation)] == list(want)
    assert live.serving.oom_summary["paged"]["preemptions"] > 0  # the scenario really runs out of blocks
    assert live.serving.oom_summary["contiguous"]["preemptions"] == 0


def test_links_point_at_real_views(run):
    lm, live = run
    n = config_numbers(lm)
    for q in bank.questions(live):
        for link in q.links:
            assert link.page in {"step", "bug_lab", "paged", "cost", "memory", "quiz"}, q.id
            if link.page == "step":
                p = link.params
                assert p["prompt"] == DEFAULT_PROMPT and int(p["steps"]) == LIVE_STEPS
                assert 0 <= int(p["step"]) < LIVE_STEPS and 0 <= int(p["layer"]) < n["L"] and 0 <= int(p["head"]) < n["H"]
            if link.page == "bug_lab":
                assert link.params["bug"] in names()


def test_bug_names_in_the_bank_are_the_bug_labs():
    assert set(bank.BUG_NAMES) <= set(names())
    text = " ".join(s.text + " ".join(s.options) + s.explanation for s in bank.BANK)
    assert set(re.findall(r"`([a-z0-9_]+)`", text)) <= set(names())


def test_tokens_are_escaped_for_markdown():
    assert bank.md_token("*a* [b](c)\n") == "“\\*a\\* \\[b\\]\\(c\\)⏎”"
    assert bank.md_escape("<script>") == "\\<script\\>"


def test_without_the_what_if_its_questions_are_left_out_and_the_rest_stay(run):
    """A model the what-if cannot run on (partial RoPE) still gets every other question."""
    _lm, live = run
    broken = dataclasses.replace(live, tied=None, tied_error="rotates only 16 of 32 dimensions")
    ids = {q.id for q in bank.questions(broken)}
    assert not ids & {"whatif-own-score", "whatif-why-three"}
    assert ids == set(by_id(live)) - {"whatif-own-score", "whatif-why-three"}
    assert "rotates only 16 of 32" in bank.not_applicable(broken)["whatif-own-score"]


def test_a_context_too_short_for_the_live_run_is_refused_with_a_reason():
    with pytest.raises(InputError, match="context"):
        live_run(tiny_model("llama_gqa", max_positions=16))
