"""The app shell and the Step-through page in AppTest, on the bundled model.

One browser session (module scope) goes through the page in order: prefill, Next step, scrub,
pickers, overviews, bad input, a changed prompt, Reset, Play to the end.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "app.py")
STEP_PAGE = "pages/step_through.py"
TIMEOUT = 90


def figures(at: AppTest) -> dict[str, dict]:
    """Every Plotly chart on the page (its JSON spec), by the name of its first trace (K, qkv, ...)."""
    specs = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    return {spec["data"][0].get("name"): spec for spec in specs}


def trace(at: AppTest, name: str) -> dict:
    """The trace called `name` (K, V, attention, heads, ...) in whichever chart holds it."""
    for spec in figures(at).values():
        for t in spec["data"]:
            if t.get("name") == name:
                return t
    raise AssertionError(f"no trace {name!r} on the page; charts: {list(figures(at))}")


def array(value) -> np.ndarray:
    """A Plotly 7 spec array: a plain list, or base64 {"dtype", "bdata", "shape"} for numpy data."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = [int(x) for x in str(value.get("shape", len(flat))).split(",")]
        return flat.reshape(shape)
    return np.asarray(value, dtype=float)


def z_shape(at: AppTest, name: str) -> tuple[int, ...]:
    return array(trace(at, name)["z"]).shape


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture(scope="module")
def page():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    ok(at.run())
    ok(at.switch_page(STEP_PAGE).run())
    return at


def prompt_len(at: AppTest) -> int:
    return len(at.session_state["step_session"].prompt_ids)


def test_app_and_home_page_run():
    at = ok(AppTest.from_file(APP, default_timeout=TIMEOUT).run())
    assert at.title[0].value.startswith("kvviz")
    assert any(m.label == "Query heads" for m in at.metric)


def test_first_load_is_prefill_with_every_view(page):
    at = page
    n = prompt_len(at)
    m = metrics(at)
    assert m["Step"] == "prefill" and m["Cache length"] == str(n)
    assert set(figures(at)) == {"K", "qkv", "attention", "next token", "heads"}  # K and V share a figure
    assert z_shape(at, "K") == z_shape(at, "V") == (n, 32)  # bundled head_dim
    assert z_shape(at, "attention") == (n, n)
    assert z_shape(at, "heads") == (8, n)  # 8 query heads, newest row each
    assert [md.value for md in at.markdown if md.value.startswith("**Prefill**")]
    assert any("share it (GQA: 8 query heads, 2 KV heads)" in c.value for c in at.caption)
    parity = next(m for m in at.metric if m.label.startswith("Parity"))
    assert float(parity.value) < 1e-4


def test_next_step_appends_one_row_to_k_and_v(page):
    at = page
    n = prompt_len(at)
    for clicks in range(1, 4):
        ok(at.button(key="step_next").click().run())
        assert z_shape(at, "K") == z_shape(at, "V") == (n + clicks, 32)
        assert metrics(at)["Step"] == f"decode {clicks}"
    assert len(trace(at, "K")["y"]) == n + 3  # rows labelled by their tokens
    assert z_shape(at, "attention") == (n + 3, n + 3)
    assert metrics(at)["Cache length"] == str(n + 3)
    story = next(md.value for md in at.markdown if md.value.startswith("**Decode step 3**"))
    assert "K ← [K; k′], V ← [V; v′]" in story


def test_scrubbing_back_shows_an_old_step_without_recomputing(page):
    at = page
    n, recorded = prompt_len(at), len(at.session_state["step_session"].steps)
    ok(at.slider(key="step_scrub").set_value(1).run())
    assert z_shape(at, "K") == (n + 1, 32)
    assert metrics(at)["Step"] == "decode 1"
    assert len(at.session_state["step_session"].steps) == recorded
    ok(at.slider(key="step_scrub").set_value(recorded - 1).run())


def test_query_head_picker_shows_the_kv_head_it_shares(page):
    at = page
    ok(at.segmented_control(key="step_head").set_value(5).run())
    assert any(c.value.startswith("**query head 5 reads KV head 1: query heads 4, 5, 6, 7 share it") for c in at.caption)
    assert figures(at)["K"]["layout"]["title"]["text"].startswith("K and V · KV head 1")
    assert trace(at, "qkv")["y"] == ["q′ head 5", "k′ KV head 1", "v′ KV head 1"]
    ok(at.segmented_control(key="step_layer").set_value(3).run())
    assert "layer 3" in next(c.value for c in at.caption if c.value.startswith("**query head"))


def test_overviews_switch_between_heads_layers_and_cache_size(page):
    at = page
    ok(at.segmented_control(key="step_overview").set_value("All layers").run())
    assert z_shape(at, "layers") == (6, prompt_len(at) + 3)
    ok(at.segmented_control(key="step_overview").set_value("Cache size").run())
    lengths = trace(at, "cache length")["y"]
    assert list(array(lengths)) == [prompt_len(at) + i for i in range(4)]
    ok(at.segmented_control(key="step_overview").set_value("All heads").run())


def test_bad_input_says_why_and_keeps_the_run(page):
    at = page
    n = prompt_len(at)
    good = at.text_area(key="step_prompt").value
    for prompt, message in [
        ("   ", "the prompt is empty"),
        ("word " * 700, "the limit is"),
    ]:
        ok(at.text_area(key="step_prompt").input(prompt).run())
        assert any(message in e.value for e in at.error), [e.value for e in at.error]
        assert any("Showing the previous run" in w.value for w in at.warning)
        assert z_shape(at, "K") == (n + 3, 32)  # nothing lost
    # a prompt that fits alone, but not with the tokens asked for (both changed in one rerun)
    at.text_area(key="step_prompt").input("word " * 300)
    ok(at.number_input(key="step_new_tokens").set_value(256).run())
    assert any("exceed the model's context" in e.value for e in at.error)
    at.text_area(key="step_prompt").input(good)
    ok(at.number_input(key="step_new_tokens").set_value(24).run())
    assert not at.error and z_shape(at, "K") == (n + 3, 32)  # back to the same settings: the same run


def test_a_new_prompt_restarts_from_prefill_with_a_note(page):
    at = page
    ok(at.text_area(key="step_prompt").input("Emma Woodhouse, handsome, clever").run())
    assert any(i.value == "The prompt changed: the run restarted from prefill." for i in at.info)
    assert metrics(at)["Step"] == "prefill"
    assert z_shape(at, "K") == (prompt_len(at), 32)
    ok(at.button(key="step_next").click().run())
    ok(at.button(key="step_reset").click().run())
    assert metrics(at)["Step"] == "prefill" and len(at.session_state["step_session"].steps) == 1


def test_play_advances_on_its_own_and_stops_at_the_end(page):
    at = page
    ok(at.number_input(key="step_new_tokens").set_value(4).run())
    ok(at.button(key="step_play").click().run())
    session = at.session_state["step_session"]
    assert len(session.steps) >= 2  # the first tick steps at once
    deadline = time.monotonic() + 30
    while at.session_state["step_playing"] and time.monotonic() < deadline:
        time.sleep(0.5)  # AppTest has no timer: rerun as the fragment's run_every would
        ok(at.run())
    assert not at.session_state["step_playing"]
    assert len(session.steps) == 4 and session.done
    assert any("Generation is over" in c.value for c in at.caption)
    assert at.button(key="step_next").disabled
