"""A quiz question as the page shows it, and everything done with one: grading, shuffling, ids.

A `Question` is rendered with one model's live numbers (`kvviz.quiz.bank` makes them); it holds its
answer, which the page keeps on the server until the user has answered. Four kinds, the formats
of the course material:

    single     multiple choice, one right option      response: an option index
    multi      several right options                  response: a set of option indices
    truefalse  a statement, True or False             response: 0 (True) or 1 (False)
    order      put the steps in order                 response: the option indices in the chosen order

Options are stored in the bank's order; the page shows them in a per-session shuffled order
(`option_order`) and the quiz itself in another (`quiz_order`), both seeded so a rerun keeps them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["single", "multi", "truefalse", "order"]
KINDS: dict[str, str] = {
    "single": "Choose one",
    "multi": "Choose every right answer",
    "truefalse": "True or false?",
    "order": "Put the steps in order",
}
TRUE_FALSE = ("True", "False")
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


@dataclass(frozen=True)
class Link:
    """A live view that shows the answer: a page of the app and what it should open on.

    `page` is one of "step", "bug_lab", "paged", "cost", "memory", "quiz"; the UI turns it into a URL
    (kvviz.ui.kit has one link function per page), so the quiz knows no URL parameter names."""

    page: str
    label: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Question:
    id: str  # stable slug, the URL's ?q=
    topic: str
    kind: Kind
    text: str  # markdown, with the live numbers filled in
    options: tuple[str, ...]  # markdown; for `order`, the steps in their right order
    answer: tuple[int, ...]  # the right option indices (for `order`: 0..n-1 in order)
    explanation: str  # markdown with the live run's numbers
    links: tuple[Link, ...] = ()
    figure: str | None = None  # a figure the page draws under the explanation ("whatif")

    def __post_init__(self) -> None:
        if not ID_PATTERN.match(self.id):
            raise ValueError(f"question id {self.id!r} must be a lowercase slug (a-z, 0-9, -)")
        if len(set(self.options)) != len(self.options):
            raise ValueError(f"question {self.id}: two options read the same: {self.options}")
        if self.kind == "truefalse" and self.options != TRUE_FALSE:
            raise ValueError(f"question {self.id}: a true/false question's options are {TRUE_FALSE}")
        if self.kind == "order" and self.answer != tuple(range(len(self.options))):
            raise ValueError(f"question {self.id}: an order question lists its steps in order")
        if self.kind in ("single", "truefalse") and len(self.answer) != 1:
            raise ValueError(f"question {self.id}: a {self.kind} question has exactly one right option")
        if not self.answer or not all(0 <= i < len(self.options) for i in self.answer):
            raise ValueError(f"question {self.id}: answer {self.answer} does not index its {len(self.options)} options")
        if self.kind != "order" and len(self.options) < 2:
            raise ValueError(f"question {self.id}: needs at least two options")


class ResponseError(ValueError):
    """A response that cannot be graded (nothing chosen, steps missing); the message says what to do."""


def normalize(question: Question, response: Any) -> tuple[int, ...]:
    """The response as option indices (sorted for `multi`, in the given order for `order`), checked."""
    n = len(question.options)
    if response is None or (isinstance(response, (list, tuple, set, frozenset)) and not response):
        raise ResponseError("choose an answer first" if question.kind != "order" else "put the steps in order first")
    if question.kind in ("single", "truefalse"):
        if isinstance(response, bool) and question.kind == "truefalse":
            response = 0 if response else 1
        if not isinstance(response, int) or isinstance(response, bool) or not 0 <= response < n:
            raise ResponseError(f"pick one of the {n} options")
        return (response,)
    items = list(response) if isinstance(response, Iterable) and not isinstance(response, str) else [response]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in items):
        raise ResponseError(f"options are numbered 0..{n - 1}")
    if len(set(items)) != len(items):
        raise ResponseError("each option once")
    if question.kind == "multi":
        return tuple(sorted(items))
    if len(items) != n:
        raise ResponseError(f"place every step: {len(items)} of {n} placed")
    return tuple(items)


def grade(question: Question, response: Any) -> bool:
    """Whether `response` is right. Multi: exactly the right set; order: exactly the right sequence."""
    got = normalize(question, response)
    want = question.answer if question.kind == "order" else tuple(sorted(question.answer))
    return got == want


def _rng(seed: int, *salt: str) -> random.Random:
    return random.Random(f"{seed}:{':'.join(salt)}")  # str seeds hash stably (not PYTHONHASHSEED-dependent)


def quiz_order(ids: Sequence[str], seed: int) -> list[str]:
    """The questions in this session's order: a permutation of `ids` fixed by `seed`."""
    order = list(ids)
    _rng(seed, "quiz").shuffle(order)
    return order


def option_order(question: Question, seed: int) -> list[int]:
    """The order this session shows a question's options in (option indices).

    True/False stays True, False. The steps of an order question are never shown already in order."""
    order = list(range(len(question.options)))
    if question.kind == "truefalse":
        return order
    rng = _rng(seed, "options", question.id)
    rng.shuffle(order)
    if question.kind == "order" and len(order) > 1:
        while order == sorted(order):
            rng.shuffle(order)
    return order


def check_id(raw: str | None, ids: Iterable[str]) -> str | None:
    """A question id from a URL if it names one of `ids`, else None (any other text, too long, odd characters)."""
    if raw is None:
        return None
    qid = str(raw).strip().lower()
    return qid if ID_PATTERN.match(qid) and qid in set(ids) else None


@dataclass(frozen=True)
class Answer:
    """What one user answered to one question."""

    response: tuple[int, ...]
    correct: bool


def score(answers: dict[str, Answer]) -> tuple[int, int]:
    """(right, answered)."""
    return sum(a.correct for a in answers.values()), len(answers)
