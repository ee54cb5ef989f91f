"""The Step-through page in AppTest, on the bundled model.

The views are drawn in the browser from one payload (kvviz.figures.step.step_view_payload): these
tests read that payload from the page and send the actions the browser would send, by putting them
in `step_pending` (what the view's callback does). One browser session (module scope) goes through
the page in order: prefill, Next step, a scrubbed-back Next, queued clicks, pickers, the arithmetic
tab, bad input, a changed prompt, Reset, Play. Links (URL parameters) get fresh sessions.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from kvviz.engine.heads import load_heads
from kvviz.engine.models import BUNDLED_DIR
from kvviz.testing import step_view_act, step_view_payload

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "app.py")
STEP_PAGE = "pages/step_through.py"
TIMEOUT = 90


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def view(at: AppTest) -> dict:
    """The step view's payload: what the browser draws from."""
    return step_view_payload(at)


def f32(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


def ragged(r: dict, i: int) -> np.ndarray:
    shape = r["shapes"][i]
    return f32(r["data"])[r["offsets"][i] : r["offsets"][i] + int(np.prod(shape))].reshape(shape)


def k_rows(v: dict, step: int) -> np.ndarray:
    """K as the browser slices it for `step`: (kv_len, head_dim)."""
    block, rows = v["kv"]["ref"][step]
    return ragged(v["kv"]["K"], block)[:rows]


def act(at: AppTest, **action) -> AppTest:
    """Send one action as the view would (its id increments like the browser's)."""
    return ok(step_view_act(at, **action))


def open_step_page(**query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    ok(at.run())
    at.query_params.update(query)
    return ok(at.switch_page(STEP_PAGE).run())


@pytest.fixture(scope="module")
def page():
    return open_step_page()


def n_prompt(at: AppTest) -> int:
    return len(at.session_state["step_session"].prompt_ids)


def test_app_and_home_page_run():
    at = ok(AppTest.from_file(APP, default_timeout=TIMEOUT).run())
    assert at.title[0].value.startswith("kvviz")
    assert any(m.label == "Query heads" for m in at.metric)


def test_first_load_is_prefill_on_the_most_structured_head(page):
    """Guards item 4 of issue 11: the page opens on a labelled head, not on layer 0 head 0."""
    v = view(page)
    n = n_prompt(page)
    expected = load_heads(BUNDLED_DIR, 6, 8).most_structured() or (0, 0)
    assert (v["layer"], v["head"]) == expected
    assert len(v["steps"]) == 1 and v["view"] == 0 and v["steps"][0]["cache_len"] == n
    assert k_rows(v, 0).shape == (n, v["head_dim"])
    assert len(v["tokens"]) == n + 1  # the prompt and the token prefill chose
    assert v["steps"][0]["parity"] < 1e-4
    assert v["sharing"].endswith("(GQA: 8 query heads, 2 KV heads)")
    assert "looks most at" in v["steps"][0]["sentence"]
    picks = [b.label for b in page.button if b.key and b.key.startswith("step_head_pick_")]
    assert picks == [f"{label} · L{lh[0]}H{lh[1]}" for label, lh in load_heads(BUNDLED_DIR, 6, 8).picks()]


def test_next_step_appends_one_row_to_k_and_v(page):
    n = n_prompt(page)
    for click in range(1, 4):
        v = view(act(page, do="next", view=click - 1))
        assert len(v["steps"]) == click + 1 and v["view"] == click
        assert k_rows(v, click).shape == (n + click, v["head_dim"])
        np.testing.assert_array_equal(k_rows(v, click)[: n + click - 1], k_rows(v, click - 1))  # earlier rows never change
        assert v["ack"] == page.session_state["step_ack"]
    rows = [ragged(v["attention"], i) for i in range(len(v["attention"]["offsets"]))]
    assert len(rows) == n + 3 and [len(r) for r in rows[-3:]] == [n + 1, n + 2, n + 3]  # the triangle, a row per step
    np.testing.assert_allclose([r.sum() for r in rows], 1.0, atol=1e-5)


def test_next_from_a_scrubbed_back_view_shows_the_next_recorded_step_first(page):
    recorded = len(page.session_state["step_session"].steps)
    nonce = view(page)["nonce"]
    v = view(act(page, do="next", view=1))
    assert v["view"] == 2 and len(v["steps"]) == recorded and v["nonce"] == nonce + 1  # nothing computed
    v = view(act(page, do="view", view=recorded - 1))  # the browser scrubbed to the newest: the server follows
    assert v["view"] == recorded - 1 and page.session_state["step_view"] == recorded - 1


def test_clicks_queued_while_a_step_ran_all_count(page):
    recorded = len(page.session_state["step_session"].steps)
    v = view(act(page, do="next", view=recorded - 1, n=3))
    assert len(v["steps"]) == recorded + 3 and v["view"] == recorded + 2


def test_layer_and_head_pickers_and_labelled_picks(page):
    ok(page.segmented_control(key="step_layer").set_value(3).run())
    ok(page.segmented_control(key="step_head").set_value(5).run())
    v = view(page)
    assert (v["layer"], v["head"], v["kv_head"]) == (3, 5, 1)
    assert v["sharing"].startswith("query head 5 reads KV head 1: query heads 4, 5, 6, 7 share it")
    session = page.session_state["step_session"]
    np.testing.assert_array_equal(f32(v["q"]).reshape(-1, 32)[-1], session.steps[-1].layers[3].query_states[5, -1])
    picks = load_heads(BUNDLED_DIR, 6, 8).picks()
    if picks:
        label, (layer, head) = picks[0]
        ok(page.button(key=f"step_head_pick_{label}").click().run())
        assert (view(page)["layer"], view(page)["head"]) == (layer, head)


def test_the_arithmetic_tab_ships_every_steps_pieces(page):
    v = view(page)
    assert v["arithmetic"] is None  # not shipped while its tab is closed
    v = view(act(page, do="tab", tab="arith"))
    a = v["arithmetic"]
    steps = len(v["steps"])
    assert a is not None and len(a["position"]) == steps and a["rope"]
    assert max(a["check"]) < 1e-3  # recomputed from the weights = what the forward recorded
    weights = ragged(a["weights"], steps - 1)
    np.testing.assert_allclose(weights.sum(), 1.0, atol=1e-5)
    assert view(act(page, do="tab", tab="main"))["arithmetic"] is None


def test_bad_input_says_why_and_keeps_the_run(page):
    recorded = len(page.session_state["step_session"].steps)
    good = page.text_area(key="step_prompt").value
    for prompt, message in [("   ", "the prompt is empty"), ("word " * 700, "the limit is")]:
        ok(page.text_area(key="step_prompt").input(prompt).run())
        assert any(message in e.value for e in page.error), [e.value for e in page.error]
        assert any("Showing the previous run" in w.value for w in page.warning)
        assert len(view(page)["steps"]) == recorded  # nothing lost
    page.text_area(key="step_prompt").input(good)
    ok(page.run())
    assert not page.error and len(view(page)["steps"]) == recorded  # back to the same settings: the same run


def test_a_new_prompt_restarts_from_prefill_with_a_note(page):
    run = view(page)["run"]
    ok(page.text_area(key="step_prompt").input("Emma Woodhouse, handsome, clever").run())
    v = view(page)
    assert v["run"] == run + 1 and len(v["steps"]) == 1 and v["view"] == 0
    assert {"kind": "info", "text": "The prompt changed: the run restarted from prefill."} in v["notices"]
    v = view(act(page, do="next", view=0))
    assert v["notices"] == [] and len(v["steps"]) == 2  # the note stays until the next action
    v = view(act(page, do="reset"))
    assert v["run"] == run + 2 and len(v["steps"]) == 1


def test_play_computes_the_rest_once_and_leaves_the_frames_to_the_browser(page):
    ok(page.number_input(key="step_new_tokens").set_value(6).run())
    assert len(view(page)["steps"]) == 1
    v = view(act(page, do="play", view=0))
    assert len(v["steps"]) == 6 and v["done"] and v["view"] == 0  # the browser animates 0 -> 5
    assert v["autoplay"] is not None
    assert "reached the 6 tokens" in v["stopped"]


def test_a_link_rebuilds_the_same_run_deterministically():
    """Guards item 6 of issue 11: the URL holds prompt, tokens, sampling, layer, head and step."""
    query = dict(prompt="Emma was", tokens="8", sampling="sample", temperature="0.9", seed="7", layer="2", head="6", step="5")
    first, second = open_step_page(**query), open_step_page(**query)
    a, b = view(first), view(second)
    assert (a["layer"], a["head"], a["view"], len(a["steps"])) == (2, 6, 5, 6)
    assert a["ids"] == b["ids"] and a["kv"] == b["kv"]  # the same sampled tokens and the same numbers
    session = first.session_state["step_session"]
    assert session.prompt == "Emma was" and not session.sampling.greedy and session.sampling.seed == 7
    assert first.query_params["step"] == "5" and first.query_params["seed"] == "7"  # written back
    assert not a["notices"]


def test_a_bad_link_falls_back_with_a_message_never_a_traceback():
    at = open_step_page(tokens="lots", layer="99", head="-1", step="x", sampling="creative", top_p="7", prompt="   ")
    v = view(at)
    (notice,) = v["notices"]
    assert notice["kind"] == "warning"
    for name in ("tokens", "layer", "head", "step", "sampling", "top_p", "prompt"):
        assert f"{name}=" in notice["text"], name
    assert len(v["steps"]) == 1 and v["view"] == 0  # the defaults run
