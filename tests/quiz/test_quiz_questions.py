"""Grading, shuffling and ids of quiz questions (pure: no model)."""

from __future__ import annotations

import pytest

from kvviz.quiz.questions import (
    TRUE_FALSE,
    Answer,
    Question,
    ResponseError,
    check_id,
    grade,
    normalize,
    option_order,
    quiz_order,
    score,
)

SINGLE = Question("one", "t", "single", "?", ("a", "b", "c", "d"), (2,), "why")
MULTI = Question("many", "t", "multi", "?", ("a", "b", "c", "d"), (0, 3), "why")
TF = Question("tf", "t", "truefalse", "?", TRUE_FALSE, (1,), "why")
ORDER = Question("steps", "t", "order", "?", ("first", "second", "third", "fourth", "fifth"), (0, 1, 2, 3, 4), "why")


@pytest.mark.parametrize("question, right, wrongs", [
    (SINGLE, 2, [0, 1, 3]),
    (MULTI, {3, 0}, [{0}, {3}, {0, 1, 3}, {1, 2}]),
    (TF, 1, [0]),
    (TF, False, [True]),
    (ORDER, [0, 1, 2, 3, 4], [[1, 0, 2, 3, 4], [4, 3, 2, 1, 0], [0, 1, 2, 4, 3]]),
])
def test_every_kind_grades_right_and_wrong(question, right, wrongs):
    assert grade(question, right) is True
    for wrong in wrongs:
        assert grade(question, wrong) is False


@pytest.mark.parametrize("question, response, message", [
    (SINGLE, None, "choose an answer"),
    (SINGLE, 7, "pick one of the 4"),
    (SINGLE, "2", "pick one"),
    (MULTI, set(), "choose an answer"),
    (MULTI, [0, 9], "numbered 0..3"),
    (ORDER, [], "put the steps in order"),
    (ORDER, [0, 1, 2], "3 of 5 placed"),
    (ORDER, [0, 0, 1, 2, 3], "each option once"),
])
def test_ungradable_responses_say_what_to_do(question, response, message):
    with pytest.raises(ResponseError, match=message):
        grade(question, response)


def test_normalize_sorts_a_multi_answer_but_keeps_an_order():
    assert normalize(MULTI, [3, 0]) == (0, 3)
    assert normalize(ORDER, [4, 3, 2, 1, 0]) == (4, 3, 2, 1, 0)
    assert normalize(TF, True) == (0,)


def test_quiz_order_is_a_seeded_permutation():
    ids = [f"q{i}" for i in range(24)]
    a, b = quiz_order(ids, 1), quiz_order(ids, 1)
    assert a == b and sorted(a) == sorted(ids)
    orders = {tuple(quiz_order(ids, seed)) for seed in range(20)}
    assert len(orders) == 20  # different sessions see different orders


def test_option_order_is_seeded_never_in_order_for_steps_and_fixed_for_true_false():
    for seed in range(50):
        shown = option_order(ORDER, seed)
        assert sorted(shown) == list(range(5)) and shown != list(range(5))
        assert option_order(TF, seed) == [0, 1]
        assert option_order(SINGLE, seed) == option_order(SINGLE, seed)
    firsts = {option_order(SINGLE, seed)[0] for seed in range(50)}
    assert firsts == {0, 1, 2, 3}  # the right option is not always in the same place


@pytest.mark.parametrize("raw, expected", [
    ("many", "many"), ("  MANY ", "many"), ("nope", None), (None, None), ("", None),
    ("many<script>", None), ("x" * 200, None), ("../many", None),
])
def test_check_id_accepts_only_known_slugs(raw, expected):
    assert check_id(raw, ["one", "many"]) == expected


def test_score_counts_right_and_answered():
    assert score({}) == (0, 0)
    assert score({"a": Answer((1,), True), "b": Answer((0,), False), "c": Answer((2,), True)}) == (2, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(id="Bad Id"), "slug"),
    (dict(options=("a", "a")), "read the same"),
    (dict(kind="truefalse", options=("yes", "no")), "options are"),
    (dict(answer=(0, 1)), "exactly one"),
    (dict(answer=(5,)), "does not index"),
    (dict(kind="order", options=("a", "b"), answer=(1, 0)), "in order"),
])
def test_malformed_questions_are_refused(kwargs, message):
    base = dict(id="ok", topic="t", kind="single", text="?", options=("a", "b"), answer=(0,), explanation="why")
    with pytest.raises(ValueError, match=message):
        Question(**{**base, **kwargs})
