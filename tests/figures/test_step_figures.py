"""The step view's data (kvviz.figures.step): what the browser slices each frame from, no browser."""

from __future__ import annotations

import base64

import numpy as np
import pytest

import kvviz
from kvviz.engine.arithmetic import head_arithmetic
from kvviz.figures import step as fs

PROMPT = "It is a truth universally acknowledged, that"


@pytest.fixture(scope="module")
def run(tiny_llama) -> kvviz.Trace:
    """Prefill + 4 decode steps on the tiny GQA Llama (4 query heads, 2 KV heads)."""
    return kvviz.Session(tiny_llama, PROMPT, 5, stop_at_eos=False).run()


def f32(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


def ragged(r: dict, i: int) -> np.ndarray:
    shape = r["shapes"][i]
    return f32(r["data"])[r["offsets"][i] : r["offsets"][i] + int(np.prod(shape))].reshape(shape)


def payload(t: kvviz.Trace, layer: int = 1, head: int = 3, **kw) -> dict:
    return fs.step_view_payload(t, layer, head, rope=True, bytes_per_token=1024, **kw)


def test_b64_is_little_endian_float32_row_major():
    a = np.arange(6, dtype=np.float64).reshape(2, 3) / 4
    np.testing.assert_array_equal(f32(fs.b64(a)), a.ravel().astype(np.float32))
    assert np.isneginf(f32(fs.b64(np.array([-np.inf])))[0])  # masked scores travel as -inf


def test_k_and_v_travel_once_and_each_step_is_a_prefix(run):
    """A correct cache only appends: one block, and step t's K is its first cache_len[t] rows."""
    v = payload(run)
    kv = v["kv_head"]
    assert kv == 1 and len(v["kv"]["K"]["offsets"]) == 1
    for t, step in enumerate(run.steps):
        block, rows = v["kv"]["ref"][t]
        assert (block, rows) == (0, step.cache_len)
        np.testing.assert_array_equal(ragged(v["kv"]["K"], 0)[:rows], run.keys(1, t)[kv])
        np.testing.assert_array_equal(ragged(v["kv"]["V"], 0)[:rows], run.values(1, t)[kv])


def test_a_cache_that_rewrites_history_gets_a_block_per_step(tiny_llama):
    t = kvviz.trace(tiny_llama, PROMPT, 4, bug="overwrite_last", stop_at_eos=False)
    v = payload(t, 0, 0)
    assert [ref[0] for ref in v["kv"]["ref"]] == list(range(len(t.steps)))
    for i in range(len(t.steps)):
        np.testing.assert_array_equal(ragged(v["kv"]["K"], i), t.keys(0, i)[0])


def test_attention_rows_build_the_triangle_row_by_row(run):
    v = payload(run, 0, 2)
    n = len(run.prompt_ids)
    rows = [ragged(v["attention"], i) for i in range(len(v["attention"]["offsets"]))]
    assert len(rows) == n + len(run.steps) - 1  # prefill's n rows, then one per decode step
    assert [len(r) for r in rows] == [n] * n + [n + i for i in range(1, len(run.steps))]
    np.testing.assert_array_equal(rows[-1], run.steps[-1].layers[0].weights[2, -1])
    np.testing.assert_array_equal(np.vstack(rows[:n]), run.steps[0].layers[0].weights[2])
    assert [s["q_len"] for s in v["steps"]] == [n] + [1] * (len(run.steps) - 1)


def test_each_step_carries_its_vectors_top_k_timings_and_words(run):
    v = payload(run)
    hd = run.model.head_dim
    q, k_new = f32(v["q"]).reshape(-1, hd), f32(v["k_new"]).reshape(-1, hd)
    for t, (s, entry) in enumerate(zip(run.steps, v["steps"])):
        np.testing.assert_array_equal(q[t], s.layers[1].query_states[3, -1])
        np.testing.assert_array_equal(k_new[t], s.layers[1].key_states[1, -1])
        assert entry["top"][0][2] == s.top_k[0].token_id and entry["top"][0][0] == fs.show_token(s.top_k[0].token)
        assert (entry["cache_len"], entry["ms"], entry["parity"]) == (s.cache_len, s.time_ms, s.max_abs_logit_diff)
        assert entry["sentence"].startswith("q′ of “") and "looks most at" in entry["sentence"]
    assert v["steps"][0]["story"].startswith("<p><b>Prefill</b>") and "<b>Decode step 2</b>" in v["steps"][2]["story"]
    assert v["tokens"] == [fs.show_token(x) for x in run.tokens]
    assert v["look"]["value_scale"][0][0] == 0.0 and v["look"]["value_scale"][-1][0] == 1.0  # explicit stops


def test_overviews_hold_every_heads_and_every_layers_newest_row(run):
    v = payload(run, 1, 0)
    t = 3
    heads, layers = ragged(v["heads_rows"], t), ragged(v["layers_rows"], t)
    s = run.steps[t]
    np.testing.assert_array_equal(heads, s.layers[1].weights[:, -1, :])  # (num_heads, kv_len)
    np.testing.assert_allclose(layers, np.stack([x.weights[:, -1, :].mean(0) for x in s.layers]), rtol=1e-6)


def test_the_arithmetic_of_every_step_is_stacked_per_piece(run, tiny_llama):
    parts = [head_arithmetic(tiny_llama, run, t, 1, 3) for t in range(len(run.steps))]
    a = payload(run, arithmetic=parts)["arithmetic"]
    hd, hidden = run.model.head_dim, tiny_llama.model.config.hidden_size
    assert a["rope"] and a["hidden"] == hidden and a["pairs"][0] == [0, hd // 2]
    np.testing.assert_array_equal(f32(a["q_rot"]).reshape(-1, hd)[2], parts[2].q_rot)
    np.testing.assert_array_equal(f32(a["o_part"]).reshape(-1, hidden)[4], parts[4].o_part)
    np.testing.assert_array_equal(ragged(a["weights"], 4), parts[4].weights)
    assert a["position"] == [p.position for p in parts] and max(a["check"]) < 1e-4
    assert payload(run)["arithmetic"] is None


def test_out_of_range_layer_or_head_is_refused(run):
    with pytest.raises(ValueError, match="out of range"):
        payload(run, 2, 0)
    with pytest.raises(ValueError, match="out of range"):
        payload(run, 0, 4)


def test_looks_most_at_names_the_token_its_position_and_the_runner_up():
    w = np.array([0.02, 0.9, 0.08])
    text = fs.looks_most_at(w, ["It", " a", "\n"], query_token=" man", query_position=14)
    assert text == "q′ of “␣man” (pos 14) looks most at “␣a” (pos 1): 0.90; next “⏎” (pos 2) 0.08."
    assert fs.looks_most_at(np.array([1.0]), ["x"], query_token="x", query_position=0).endswith("(pos 0): 1.00.")


def test_step_story_tells_prefill_and_decode_in_order_and_escapes_tokens(run):
    n = len(run.prompt_ids)
    prefill = fs.step_story_html(run.steps[0], n, fed_token="", num_layers=2, head_dim=16, rope=True, greedy=True)
    assert f"all {n} prompt tokens" in prefill and "causal mask" in prefill
    decode = fs.step_story_html(run.steps[2], n, fed_token="<b>", num_layers=2, head_dim=16, rope=True, greedy=True)
    order = ["<b>Feed</b>", "<b>Project</b>", "<b>Append</b>", "<b>Attend</b>", "<b>Mix</b>", "<b>Choose</b>"]
    assert [decode.index(w) for w in order] == sorted(decode.index(w) for w in order)
    assert "<code>&lt;b&gt;</code>" in decode  # a token is text, never markup
    assert f"grows to {run.steps[2].cache_len} positions" in decode and "RoPE" in decode
    gpt2 = fs.step_story_html(run.steps[2], n, fed_token="x", num_layers=2, head_dim=16, rope=False, greedy=False)
    assert "RoPE" not in gpt2 and "sampled" in gpt2


def test_kv_sharing_text_names_the_group():
    assert fs.kv_sharing_text([0, 0, 0, 1, 1, 1], 4) == (
        "query head 4 reads KV head 1: query heads 3, 4, 5 share it (GQA: 6 query heads, 2 KV heads)")
    assert "MQA: 4 query heads, 1 KV heads" in fs.kv_sharing_text([0, 0, 0, 0], 0)
    assert fs.kv_sharing_text([0, 1, 2], 2).startswith("query head 2 has its own KV head 2 (MHA")
