"""The "Check yourself" page in AppTest, on the bundled model: answers hidden until graded, every
question answerable through its widgets, the score per session, shuffling, and links to one question.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from kvviz.quiz import bank
from kvviz.quiz.live import live_run
from kvviz.quiz.questions import quiz_order
from kvviz.ui import kit

APP = str(Path(__file__).resolve().parents[2] / "app.py")
PAGE = "pages/quiz.py"
TIMEOUT = 300  # the first run makes the live run (seconds on an idle machine, more on a busy one)


@pytest.fixture(scope="module")
def questions(bundled):
    """The same questions the page renders (its live run is deterministic but for timings)."""
    return {q.id: q for q in bank.questions(live_run(bundled))}


def open_quiz(seed: int | None = None, q: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if seed is not None:
        at.session_state["quiz_seed"] = seed
    at.run()
    if q is not None:
        at.query_params["q"] = q
    at.switch_page(PAGE).run()
    return ok(at)


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    """Everything the page wrote as text: markdown, captions, alerts, labels."""
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [x.value for kind in ("success", "error", "warning", "info") for x in at.get(kind)]
    parts += [r.label for r in at.radio] + [c.label for c in at.checkbox] + [m.label for m in at.multiselect]
    return "\n".join(parts)


def shown_id(at: AppTest) -> str:
    found = re.findall(r"/quiz\?q=([a-z0-9-]+)", texts(at))
    assert len(found) == 1, found
    return found[0]


def answer(at: AppTest, q, right: bool) -> AppTest:
    """Fill the question's widgets with the right answer, or a wrong one, and submit."""
    if q.kind in ("single", "truefalse"):
        pick = q.answer[0] if right else next(i for i in range(len(q.options)) if i != q.answer[0])
        at.radio(key=f"quiz_{q.id}_answer").set_value(pick)
    elif q.kind == "multi":
        picks = set(q.answer) if right else set(q.answer[1:]) or {next(i for i in range(len(q.options)) if i not in q.answer)}
        for i in picks:
            at.checkbox(key=f"quiz_{q.id}_opt{i}").check()
    else:
        at.multiselect(key=f"quiz_{q.id}_answer").set_value(list(q.answer) if right else list(reversed(q.answer)))
    submit(at)
    return ok(at)


def submit(at: AppTest) -> None:
    next(b for b in at.button if b.label == "Check my answer").click().run()


def score(at: AppTest) -> str:
    return next(m.value for m in at.markdown if m.value.startswith("**Score"))


@pytest.fixture(scope="module")
def quiz(bundled):
    return open_quiz(seed=7)


def test_a_question_is_shown_without_its_answer(quiz, questions):
    at = quiz
    qid = shown_id(at)
    assert qid == quiz_order(list(questions), 7)[0]  # the session's shuffled order
    q = questions[qid]
    page = texts(at)
    assert q.text[:40] in page
    assert q.explanation[:40] not in page and "The answer:" not in page and not at.success
    assert score(at).startswith("**Score 0 / 0**")


def test_submitting_nothing_is_not_graded(quiz):
    at = quiz
    submit(at)
    ok(at)
    assert any("Not graded yet" in w.value for w in at.warning)
    assert score(at).startswith("**Score 0 / 0**")


def test_every_question_is_answered_right_or_wrong_through_the_page(quiz, questions):
    """Right on even positions, wrong on odd ones; the verdict, the explanation and the score follow."""
    at = quiz
    order = quiz_order(list(questions), 7)
    for pos, qid in enumerate(order):
        assert shown_id(at) == qid
        q = questions[qid]
        right = pos % 2 == 0
        answer(at, q, right)
        if right:
            assert at.success and at.success[0].value.startswith("**Right.**"), qid
        else:
            assert at.error and at.error[0].value.startswith("**Not quite.**"), qid
            assert any(m.value.startswith("**The answer:**") for m in at.markdown), qid
        assert q.explanation[:40] in texts(at), qid
        assert any("See it live" in m.value for m in at.markdown), qid
        if q.figure == "whatif":
            assert len(at.get("plotly_chart")) == 3
        assert score(at).startswith(f"**Score {pos // 2 + 1} / {pos + 1}**")
        if pos < len(order) - 1:
            at.button(key="quiz_next").click().run()
    n = len(order)
    assert any(s.value.startswith(f"All {n} answered: {(n + 1) // 2} right") for s in at.success)


def test_going_back_shows_the_graded_answer_and_start_over_resets(quiz, questions):
    at = quiz
    at.button(key="quiz_prev").click().run()
    ok(at)
    verdicts = [x.value for x in [*at.success, *at.error]]
    assert any(v.startswith(("**Right.**", "**Not quite.**")) for v in verdicts)  # graded stays graded
    assert not any(b.label == "Check my answer" for b in at.button)  # and cannot be answered again
    seed = at.session_state.quiz_seed
    at.button(key="quiz_restart").click().run()
    ok(at)
    assert score(at).startswith("**Score 0 / 0**") and at.session_state.quiz_pos == 0
    assert at.session_state.quiz_seed != seed


def test_sessions_see_their_own_shuffled_order(bundled, questions):
    ids = list(questions)
    seeds = next((a, b) for a in range(50) for b in range(a + 1, 50) if quiz_order(ids, a)[0] != quiz_order(ids, b)[0])
    first = [shown_id(open_quiz(seed=s)) for s in seeds]
    assert first == [quiz_order(ids, s)[0] for s in seeds] and first[0] != first[1]


def test_a_teacher_link_opens_one_question_then_the_whole_quiz(bundled, questions):
    at = open_quiz(seed=3, q="whatif-own-score")
    assert shown_id(at) == "whatif-own-score"
    assert any("linked on its own" in i.value for i in at.info)
    answer(at, questions["whatif-own-score"], right=True)
    assert len(at.get("plotly_chart")) == 3  # real, tied, own-position bars
    assert score(at).startswith("**Score 1 / 1**")
    at.button(key="quiz_whole").click().run()
    ok(at)
    assert "q" not in at.query_params
    assert at.session_state.quiz_pos == quiz_order(list(questions), 3).index("whatif-own-score")
    assert shown_id(at) == "whatif-own-score" and score(at).startswith("**Score 1 / 1**")


@pytest.mark.parametrize("raw", ["no-such-question", "<b>x</b>", "WHATIF" * 30])
def test_a_bad_link_says_so_and_shows_the_whole_quiz(bundled, raw):
    at = open_quiz(seed=5, q=raw)
    assert any("names no question" in w.value for w in at.warning)
    assert raw not in texts(at)  # nothing of the URL is echoed
    assert at.button(key="quiz_next")  # the whole quiz


def test_links_into_other_pages_are_built_in_one_place():
    """One function per page builds its URL (the parameter names live in kit.py, for the pages to read)."""
    assert (kit.step_link(prompt="It is, a", steps=12, layer=1, head=3, step=5)
            == "/step_through?prompt=It%20is%2C%20a&new_tokens=12&layer=1&head=3&step=5")
    assert kit.step_link() == "/step_through"
    assert kit.bug_lab_link(bug="never_append") == "/bug_lab?bug=never_append"
    assert kit.paged_link(scenario="long_generations") == "/paged?scenario=long_generations"
    assert kit.quiz_link("tenth-token-keys") == "/quiz?q=tenth-token-keys"
