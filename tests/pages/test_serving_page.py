"""The Serving page through app.py (AppTest) on a tiny saved GQA Llama: reuse, chat turns,
speculation and beams run on the first visit; forms rerun them; each browser session keeps its
own prefix store; bad input and a deployment's token cap give messages, not tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "app.py")
PAGE = str(ROOT / "pages" / "serving.py")


def open_page(model_dir: Path, tab: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["model_name"] = str(model_dir)
    at.run()
    if tab is not None:
        at.query_params["tab"] = tab
    at.switch_page(PAGE).run()
    assert not at.exception, at.exception
    return at


def switch_tab(at: AppTest, tab: str) -> None:
    """Click a tab: AppTest keeps the URL's query params and they win, so drop the URL's tab first."""
    at.query_params.pop("tab", None)
    at.session_state["tab"] = tab
    at.run()


def errors(at: AppTest) -> list[str]:
    assert not at.exception, at.exception
    return [e.value for e in at.error]


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def button(at: AppTest, label: str, which: int = 0):
    return [b for b in at.button if b.label == label][which]


def test_reuse_tab_serves_two_requests_and_two_chat_turns_on_the_first_visit(tiny_checkpoint):
    at = open_page(tiny_checkpoint)
    assert errors(at) == []
    store = at.session_state["serve_store"]
    first, second = store.served
    assert first.reused_tokens == 0 and second.reused_tokens > 0 and second.same_output
    assert len(at.session_state["serve_chat"].turns) == 2
    assert at.session_state["serve_spec"] is None and at.session_state["serve_beam"] is None  # closed tabs do not run
    titles = [f["layout"]["title"]["text"] for f in charts(at)]
    assert titles[0].startswith("The prefix store") and "R2: " in titles[1] and "rows reused (green)" in titles[1]
    assert titles[2].startswith("turn 2: ")

    at.text_area(key="serve_reuse_prompt").input("It is a truth universally acknowledged, that a single man")
    button(at, "Send the request").click().run()
    assert errors(at) == [] and len(at.session_state["serve_store"].served) == 3
    assert at.session_state["serve_store"].served[-1].reused_tokens > 0  # the shared start of the first two

    at.text_input(key="serve_chat_msg_2").input(" And then")
    button(at, "Send").click().run()
    assert errors(at) == [] and len(at.session_state["serve_chat"].turns) == 3
    assert at.session_state["serve_chat"].turns[-1].reused_tokens > 0

    button(at, "Empty the store").click().run()
    assert errors(at) == [] and at.session_state["serve_store"] is not store
    assert len(at.session_state["serve_store"]) == 0 and not at.session_state["serve_store"].served

    at.text_area(key="serve_reuse_prompt").input("   ")
    button(at, "Send the request").click().run()
    assert any("empty" in e for e in errors(at))


def test_speculate_and_beam_tabs(tiny_checkpoint):
    at = open_page(tiny_checkpoint, tab="Speculate")  # the tab is in the URL: ?tab=Speculate
    assert errors(at) == []
    run = at.session_state["serve_spec"]
    assert run.matches_greedy and at.session_state["serve_store"] is None
    (spec,) = [f for f in charts(at) if f.get("frames")]
    assert len(spec["frames"]) == 1 + 2 * len(run.steps)  # per step: rows appended, then cropped
    assert spec["layout"]["sliders"][0]["steps"] and spec["layout"]["updatemenus"][0]["buttons"][0]["method"] == "animate"
    at.number_input(key="serve_spec_k").set_value(2)
    button(at, "Run").click().run()
    assert errors(at) == [] and at.session_state["serve_spec"].draft_tokens == 2

    switch_tab(at, "Beam")
    assert errors(at) == [] and at.session_state["serve_beam"].beams
    figs = charts(at)
    assert figs[0]["layout"]["title"]["text"].startswith("The beams") and len(figs[1]["frames"]) == len(
        at.session_state["serve_beam"].steps)
    at.text_area(key="serve_beam_prompt").input("  ")
    button(at, "Run").click().run()
    assert any("empty" in e for e in errors(at))


def test_each_browser_session_has_its_own_store(tiny_checkpoint):
    """Two visitors send the same requests: the second one's first request finds nothing cached."""
    one, two = open_page(tiny_checkpoint), open_page(tiny_checkpoint)
    store_one, store_two = one.session_state["serve_store"], two.session_state["serve_store"]
    assert store_one is not store_two
    assert store_two.served[0].reused_tokens == 0  # a shared store would have served it all from visitor one
    assert one.session_state["serve_chat"] is not two.session_state["serve_chat"]


def test_a_small_token_cap_is_respected(tiny_checkpoint, monkeypatch):
    """A deployment may cap new tokens below the page's defaults: the page offers the cap, never crashes."""
    monkeypatch.setenv("KVVIZ_MAX_NEW_TOKENS", "4")
    at = open_page(tiny_checkpoint)
    assert errors(at) == []
    assert at.number_input(key="serve_reuse_steps").max == at.number_input(key="serve_chat_steps").max == 4
    assert all(len(r.output_ids) <= 4 for r in at.session_state["serve_store"].served)
    for tab, key in (("Speculate", "serve_spec_steps"), ("Beam", "serve_beam_steps")):
        switch_tab(at, tab)
        assert errors(at) == [] and at.number_input(key=key).max == 4
