"""The step-through views (kvviz.figures.step): traces, shapes, labels and highlights, no browser."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

import kvviz
from kvviz.engine.trace import TokenProb
from kvviz.figures import step as fs
from kvviz.figures.common import HIGHLIGHT

PROMPT = "It is a truth universally acknowledged, that"


@pytest.fixture(scope="module")
def run(tiny_llama) -> kvviz.Trace:
    """Prefill + 4 decode steps on the tiny GQA Llama (4 query heads, 2 KV heads)."""
    return kvviz.Session(tiny_llama, PROMPT, 5, stop_at_eos=False).run()


def outlines(fig: go.Figure) -> list:
    return [s for s in fig.layout.shapes if s.type == "rect" and s.line.color == HIGHLIGHT]


def test_k_and_v_gain_one_row_per_decode_step_and_outline_it(run):
    n_prompt = len(run.prompt_ids)
    for s, step in enumerate(run.steps):
        keys, values = run.keys(0, s)[1], run.values(0, s)[1]  # KV head 1: (kv_len, head_dim)
        fig = fs.kv_figure(keys, values, run.cached_tokens(s), kv_head=1, new_rows=len(step.input_ids))
        k, v = fig.data
        assert (k.name, v.name) == ("K", "V") and (k.xaxis, v.xaxis) == ("x", "x2")
        assert k.z.shape == v.z.shape == (n_prompt + s, run.model.head_dim)
        np.testing.assert_array_equal(v.z, values)
        labels = [f"{i} {fs.show_token(t)}" for i, t in enumerate(run.cached_tokens(s))]
        assert list(k.y) == list(v.y) == labels  # one row per cached position, labelled by its token
        first_new = 0 if s == 0 else n_prompt + s - 1  # prefill outlines the whole prompt, decode the last row
        boxes = outlines(fig)
        assert [b.xref for b in boxes] == ["x", "x2"]
        assert all((b.y0, b.y1) == (first_new - 0.5, n_prompt + s - 1 + 0.5) for b in boxes)
        assert fig.layout.yaxis.autorange == "reversed"  # K <- [K; k']: new rows at the bottom
        assert fig.layout.xaxis.title.text.startswith("K") and "head_dim" in fig.layout.xaxis.title.text
        assert fig.layout.xaxis2.title.text.startswith("V") and "head_dim" in fig.layout.xaxis2.title.text


def test_big_matrices_show_only_their_newest_rows_and_say_so():
    rng = np.random.default_rng(0)
    keys, values = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    tokens = [f"t{i}" for i in range(300)]
    fig = fs.kv_figure(keys, values, tokens, kv_head=0, new_rows=1, max_rows=40)
    assert fig.data[0].z.shape == fig.data[1].z.shape == (40, 8)
    np.testing.assert_array_equal(fig.data[0].z, keys[-40:])
    assert fig.data[0].y[0] == "260 t260" and fig.data[0].y[-1] == "299 t299"
    assert "last 40 of 300" in fig.layout.title.text
    assert all((b.y0, b.y1) == (38.5, 39.5) for b in outlines(fig))
    with pytest.raises(ValueError, match="one token per row"):
        fs.kv_figure(keys, values[:10], tokens, kv_head=0, new_rows=1)


def test_qkv_are_three_rows_centred_on_zero(run):
    ls = run.steps[2].layers[1]
    fig = fs.qkv_figure(ls.query_states[3, -1], ls.key_states[1, -1], ls.value_states[1, -1], head=3, kv_head=1,
                        token=" the", position=12)
    trace = fig.data[0]
    assert trace.z.shape == (3, run.model.head_dim)
    np.testing.assert_array_equal(trace.z[1], ls.key_states[1, -1])
    assert list(trace.y) == ["q′ head 3", "k′ KV head 1", "v′ KV head 1"]
    assert trace.zmid == 0 and trace.zmin == -trace.zmax
    assert "12" in fig.layout.title.text and "␣the" in fig.layout.title.text  # the token's position and text
    with pytest.raises(ValueError, match="equal 1-d"):
        fs.qkv_figure(np.zeros(4), np.zeros(5), np.zeros(4), head=0, kv_head=0, token="x", position=0)


def test_causal_mask_blanks_the_future_only():
    m = np.tril(np.ones((3, 3)))
    out = fs.causal_mask_nan(m)
    assert np.array_equal(np.isnan(out), np.triu(np.ones((3, 3), dtype=bool), k=1))
    shifted = fs.causal_mask_nan(np.ones((2, 4)))  # 2 queries over 4 keys: the cache held 2 rows already
    assert np.array_equal(np.isnan(shifted), [[False, False, False, True], [False, False, False, False]])


def test_attention_is_the_causal_triangle_built_row_by_row(run):
    n_prompt = len(run.prompt_ids)
    for s in (0, 4):
        fig = fs.attention_figure(run.attention_matrix(1, 0, s), run.cached_tokens(s), n_prompt, head=0,
                                  new_rows=len(run.steps[s].input_ids))
        z = fig.data[0].z
        assert fig.data[0].name == "attention" and z.shape == (n_prompt + s, n_prompt + s)
        assert np.array_equal(np.isnan(z), np.triu(np.ones(z.shape, dtype=bool), k=1))
        np.testing.assert_allclose(np.nansum(z, axis=1), 1.0, atol=1e-5)
        (box,) = outlines(fig)
        assert box.y1 == n_prompt + s - 0.5
        assert box.y0 == (-0.5 if s == 0 else n_prompt + s - 1.5)  # prefill: every row is new


def test_attention_bars_are_the_newest_row_coloured_by_origin(run):
    n_prompt, s = len(run.prompt_ids), 3
    weights = run.steps[s].layers[0].weights[2, -1]  # (kv_len,) what q' of head 2 attended
    fig = fs.attention_figure(run.attention_matrix(0, 2, s), run.cached_tokens(s), n_prompt, head=2, new_rows=1)
    bars = {t.name: t for t in fig.data[1:]}
    assert list(bars) == ["prompt", "generated", "itself (the new token)"]
    assert [len(t.y) for t in bars.values()] == [n_prompt, s - 1, 1]
    np.testing.assert_allclose(np.concatenate([t.y for t in bars.values()]), weights, atol=1e-7)
    assert list(np.concatenate([t.x for t in bars.values()])) == list(fig.data[0].x)  # each bar under its column
    assert all(t.yaxis == "y2" for t in bars.values())
    assert bars["itself (the new token)"].marker.color == HIGHLIGHT
    assert bars["prompt"].customdata[0] == f"0 {fs.show_token(run.prompt_tokens[0])}"
    prefill = fs.attention_figure(run.attention_matrix(0, 0, 0), run.cached_tokens(0), n_prompt, head=0, new_rows=n_prompt)
    assert [t.name for t in prefill.data[1:]] == ["prompt", "itself (the new token)"]  # no generated tokens yet


def test_big_attention_matrices_are_cropped_to_the_newest_positions(run):
    cols = len(run.cached_tokens(4))
    fig = fs.attention_figure(run.attention_matrix(1, 0, 4), run.cached_tokens(4), len(run.prompt_ids), head=0,
                              new_rows=1, max_positions=6)
    heat = fig.data[0]
    assert heat.z.shape == (6, 6) and "last 6 of" in fig.layout.title.text
    assert list(heat.x) == list(range(cols - 6, cols))  # keys by position number, their token on hover
    assert heat.customdata[0][-1] == f"{cols - 1} {fs.show_token(run.cached_tokens(4)[-1])}"
    assert outlines(fig)[0].x0 == cols - 6 - 0.5
    assert sum(len(t.y) for t in fig.data[1:]) == 6


def test_next_token_marks_the_choice_even_outside_the_top_k():
    top = [TokenProb(5, " the", 0.5), TokenProb(7, " a", 0.3)]
    fig = fs.next_token_figure(top, 7, " a", 0.3)
    bar = fig.data[0]
    assert list(bar.y) == ["␣the  ·5", "␣a  ·7"]
    assert list(bar.marker.color) == [fs.GENERATED_COLOR, HIGHLIGHT]
    sampled = fs.next_token_figure(top, 99, "zz", 0.01).data[0]  # a sampled token the top-k does not hold
    assert list(sampled.x) == [0.5, 0.3, 0.01] and sampled.marker.color[-1] == HIGHLIGHT


def test_heads_overview_labels_and_separates_the_kv_groups(run):
    ls = run.steps[2].layers[0]
    fig = fs.heads_overview_figure(ls.weights[:, -1, :], run.cached_tokens(2), ls.kv_head_of, selected_head=3)
    assert fig.data[0].z.shape == (run.model.num_heads, run.steps[2].cache_len)
    assert list(fig.data[0].y) == ["q0 → kv0", "q1 → kv0", "q2 → kv1", "q3 → kv1"]
    separators = [s for s in fig.layout.shapes if s.type == "line"]
    assert [s.y0 for s in separators] == [1.5]  # one boundary between the two KV groups
    (box,) = outlines(fig)
    assert (box.y0, box.y1) == (2.5, 3.5)
    mha = fs.heads_overview_figure(np.ones((3, 4)) / 4, list("abcd"), [0, 1, 2], selected_head=0)
    assert len([s for s in mha.layout.shapes if s.type == "line"]) == 2


def test_layers_overview_averages_heads_per_layer(run):
    step = run.steps[3]
    rows = [x.weights[:, -1, :] for x in step.layers]
    fig = fs.layers_overview_figure(rows, run.cached_tokens(3), selected_layer=1)
    np.testing.assert_allclose(fig.data[0].z, np.stack([r.mean(0) for r in rows]))
    assert list(fig.data[0].y) == ["layer 0", "layer 1"]
    assert outlines(fig)[0].y0 == 0.5


def test_cache_growth_plots_length_and_bytes_on_matching_axes():
    fig = fs.cache_growth_figure([10, 11, 12, 13], 4096, current_step=2, dtype="float32")
    length, in_bytes, marker = fig.data
    assert list(length.y) == [10, 11, 12, 13]
    np.testing.assert_allclose(in_bytes.y, np.array([10, 11, 12, 13]) * 4096 / 1024)  # KiB
    assert "KiB" in fig.layout.yaxis2.title.text and "float32" in fig.layout.yaxis2.title.text
    assert fig.layout.yaxis2.range[1] == pytest.approx(fig.layout.yaxis.range[1] * 4)  # 4096 B = 4 KiB per position
    assert (marker.x[0], marker.y[0]) == (2, 12)
    assert "48.0 KiB at step 2" in fig.layout.title.text


def test_token_strip_marks_fed_and_chosen_tokens_and_escapes_html():
    tokens = ["<b>", " x", "\n", " y", " z"]
    html = fs.token_strip_html(tokens, [1, 2, 3, 4, 5], n_prompt=3, step=1)
    assert ">&lt;b&gt;</span>" in html and "<b>" not in html
    assert 'class="kv-tok kv-gen kv-fed" title="position 3 · id 4 · generated · fed in at this step"' in html
    assert 'class="kv-tok kv-gen kv-next" title="position 4 · id 5 · generated · chosen at this step (fed in next)"' in html
    assert ">⏎<" in html and ">␣x<" in html
    prefill = fs.token_strip_html(tokens, [1, 2, 3, 4, 5], n_prompt=3, step=0)
    assert prefill.count("kv-prompt kv-fed") == 3 and prefill.count("kv-future") == 1 + 1  # position 4, + the CSS rule
    with pytest.raises(ValueError, match="same length"):
        fs.token_strip_html(tokens, [1], n_prompt=1, step=0)


def test_kv_sharing_text_names_the_group():
    assert fs.kv_sharing_text([0, 0, 0, 1, 1, 1], 4) == (
        "query head 4 reads KV head 1: query heads 3, 4, 5 share it (GQA: 6 query heads, 2 KV heads)")
    assert "MQA: 4 query heads, 1 KV heads" in fs.kv_sharing_text([0, 0, 0, 0], 0)
    assert fs.kv_sharing_text([0, 1, 2], 2).startswith("query head 2 has its own KV head 2 (MHA")


def test_step_story_tells_prefill_and_decode_in_order(run):
    n_prompt = len(run.prompt_ids)
    prefill = fs.step_story(run.steps[0], n_prompt, fed_token="", num_layers=2, head_dim=16, rope=True, greedy=True)
    assert f"all {n_prompt} prompt tokens" in prefill and "causal mask" in prefill
    decode = fs.step_story(run.steps[2], n_prompt, fed_token=run.steps[1].token, num_layers=2, head_dim=16,
                           rope=True, greedy=True)
    order = ["**Feed**", "**Project**", "**Append**", "**Attend**", "**Mix**", "**Choose**"]
    assert [decode.index(w) for w in order] == sorted(decode.index(w) for w in order)
    assert "K ← [K; k′], V ← [V; v′]" in decode and f"grows to {run.steps[2].cache_len} positions" in decode
    assert f"at position {n_prompt + 1}" in decode and "RoPE" in decode
    gpt2 = fs.step_story(run.steps[2], n_prompt, fed_token="x", num_layers=2, head_dim=16, rope=False, greedy=False)
    assert "RoPE" not in gpt2 and "sampled" in gpt2


def test_figures_html_inlines_plotly_once_and_keeps_every_figure():
    figs = {"K": fs.next_token_figure([TokenProb(1, "a", 0.9)], 1, "a", 0.9),
            "V": fs.cache_growth_figure([3, 4], 8, current_step=1, dtype="float16")}
    page = fs.figures_html(figs, "kvviz <step 1>")
    assert page.count("<h3>") == 2 and "kvviz &lt;step 1&gt;" in page
    assert page.count("Plotly.newPlot") == 2
    assert page.count("plotly.js v") == 1  # the library itself, inlined once: the file opens offline


def test_human_bytes():
    assert [fs.human_bytes(x) for x in (512, 1536, 3 * 2**20, 5 * 2**30)] == ["512 B", "1.5 KiB", "3.0 MiB", "5.0 GiB"]
