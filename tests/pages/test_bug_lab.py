"""The Bug lab page in AppTest: pick a bug, step both runs, bad input, Mystery mode and its score."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from kvviz.variants.bugs import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "app.py")


@pytest.fixture(scope="module")
def lab():
    """One app session on the Bug lab page (the bundled model), shared by the tests in order."""
    at = AppTest.from_file(APP, default_timeout=90)
    at.run()
    at.switch_page("pages/bug_lab.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_default_bug_is_shown_with_every_evidence_view(lab):
    at = lab
    m = metrics(at)
    assert m["Verdict"] == "bug" and m["Diverges at"].startswith("step ")
    assert m["K/V differ from"] == "layer 0"
    assert [t.label for t in at.tabs] == ["Logits", "K/V rows", "Attention", "Cache lengths"]
    keys = [c.key for c in at.get("plotly_chart")]  # logits, 3 K/V views, attention, lengths (+ quality, measured)
    assert keys[:6] == ["lab_logits", "lab_kv_layers", "lab_kv_steps", "lab_kv_share", "lab_attention", "lab_lengths"]
    assert keys[6:] == (["lab_quality"] if (ROOT / "docs" / "variant_quality.json").exists() else [])
    assert any("stopped growing" in md.value for md in at.markdown)  # the written diagnosis


def test_stepping_moves_both_runs_together(lab):
    at = lab
    at.button(key="lab_next").click().run()
    assert at.session_state.lab_view == 1
    at.button(key="lab_next").click().run()
    assert at.session_state.lab_view == 2
    assert at.slider(key="lab_scrub").value == 2
    at.button(key="lab_back").click().run()
    assert at.session_state.lab_view == 1 and not at.exception


def test_the_correct_cache_reads_clean_and_scoping_moves_the_divergence(lab):
    at = lab
    at.selectbox(key="lab_bug").set_value("none").run()
    assert metrics(at)["Verdict"] == "clean" and metrics(at)["Diverges at"] == "—"
    at.selectbox(key="lab_bug").set_value("kv_swapped")
    at.multiselect(key="lab_layers").set_value([2, 3])
    at.number_input(key="lab_start").set_value(3).run()
    m = metrics(at)
    assert m["Verdict"] == "bug" and m["K/V differ from"] == "layer 2"
    assert int(m["Diverges at"].split()[1]) >= 3


def test_an_empty_prompt_is_refused_and_the_last_run_kept(lab):
    at = lab
    at.text_area(key="lab_prompt").set_value("   ").run()
    assert any("prompt is empty" in e.value for e in at.error)
    assert any("previous run" in w.value for w in at.warning)
    assert metrics(at)["Verdict"] == "bug"  # still the previous diagnosis
    at.text_area(key="lab_prompt").set_value("It is a truth universally acknowledged, that").run()
    assert not at.error


def test_mystery_mode_hides_the_bug_scores_guesses_and_explains(lab):
    at = lab
    at.segmented_control(key="lab_mode").set_value("Mystery").run()
    hidden = at.session_state.lab_mystery
    assert hidden in REGISTRY
    assert not any(hidden in md.value for md in at.markdown)  # neither name nor diagnosis on screen
    assert any("Mystery mode" in i.value for i in at.info)

    at.selectbox(key="lab_guess").set_value(hidden)
    at.button[-1].click().run()  # the form's Guess button
    assert at.session_state.lab_score == {"right": 1, "played": 1}
    assert any(REGISTRY[hidden].title in s.value for s in at.success)
    clue = [md.value for md in at.markdown if md.value.startswith("**The clue that gives it away:**")]
    assert clue and len(clue[0]) > 60

    at.button(key="lab_next_mystery").click().run()
    second = at.session_state.lab_mystery
    assert second != hidden and at.session_state.lab_guess_result is None
    wrong = next(n for n in REGISTRY if n != second)
    at.selectbox(key="lab_guess").set_value(wrong)
    at.button[-1].click().run()
    assert at.session_state.lab_score == {"right": 1, "played": 2}
    assert any(REGISTRY[second].title in e.value for e in at.error)
    assert not at.exception
