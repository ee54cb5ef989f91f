"""Check yourself: the course material's questions, answered on the loaded model's own cache.

The questions and their numbers come from one live run per model and server (`kvviz.quiz`),
shared read-only by every session. Each session sees them in its own shuffled order; an answer is
graded on the server, and only then are the explanation, the right answer and the figures sent to
the browser. A teacher links one question with `?q=<id>` (kit.quiz_link).
"""

from __future__ import annotations

import random

import streamlit as st

from kvviz.figures import quiz as fq
from kvviz.quiz import bank
from kvviz.quiz import questions as qz
from kvviz.quiz.live import LiveRun, live_run
from kvviz.ui import kit
from kvviz.ui.model import get_model

kit.page("Check yourself")

LINKS = {
    "step": lambda p: kit.step_link(**p),
    "bug_lab": lambda p: kit.bug_lab_link(**p),
    "paged": lambda p: kit.paged_link(**p),
    "quiz": lambda p: kit.quiz_link(**p),
    "cost": lambda p: "/cost",
    "memory": lambda p: "/memory",
}


@st.cache_resource(show_spinner="Running the live model for the quiz (once per model and server)…", max_entries=3)
def live(name: str) -> tuple[LiveRun, tuple[qz.Question, ...]]:
    """The live run and the questions rendered from it: the same for every visitor, never mutated."""
    run = live_run(get_model(name))
    return run, tuple(bank.questions(run))


def start_over(note: str | None = None) -> None:
    st.session_state.update(quiz_seed=random.SystemRandom().randrange(2**31), quiz_pos=0, quiz_answers={},
                            quiz_error=None, quiz_note=note)


def go(pos: int) -> None:
    st.session_state.update(quiz_pos=pos, quiz_error=None)


def whole_quiz(pos: int) -> None:
    """Leave a linked question for the whole quiz, at that question."""
    st.query_params.clear()
    go(pos)


def response(q: qz.Question) -> object:
    """What the form's widgets hold, as option indices."""
    ss = st.session_state
    if q.kind == "multi":
        return {i for i in range(len(q.options)) if ss.get(f"quiz_{q.id}_opt{i}")}
    return ss.get(f"quiz_{q.id}_answer")


def submit(q: qz.Question) -> None:
    given = response(q)
    try:
        correct = qz.grade(q, given)
    except qz.ResponseError as e:
        st.session_state.quiz_error = (q.id, str(e))
        return
    answers = dict(st.session_state.quiz_answers)
    answers[q.id] = qz.Answer(qz.normalize(q, given), correct)
    st.session_state.update(quiz_answers=answers, quiz_error=None)


def answer_form(q: qz.Question, shown: list[int]) -> None:
    """The widgets for one kind of question; nothing in them says which option is right."""
    label = qz.KINDS[q.kind]
    with st.form(f"quiz_form_{q.id}"):
        if q.kind in ("single", "truefalse"):
            st.radio(label, shown, index=None, format_func=lambda i: q.options[i], key=f"quiz_{q.id}_answer")
        elif q.kind == "multi":
            st.caption(label)
            for i in shown:
                st.checkbox(q.options[i], key=f"quiz_{q.id}_opt{i}")
        else:  # the steps in view, lettered in this session's order; the multiselect keeps the order they are picked in
            tag = {i: chr(ord("A") + n) for n, i in enumerate(shown)}
            st.markdown("\n".join(f"- **{tag[i]}.** {q.options[i]}" for i in shown))
            st.multiselect(f"{label}: pick them first to last", shown, format_func=lambda i: f"{tag[i]}. {q.options[i]}",
                           key=f"quiz_{q.id}_answer", placeholder="the first step…")
        st.form_submit_button("Check my answer", type="primary", on_click=submit, args=(q,), icon=":material/check:")
    error = st.session_state.quiz_error
    if error and error[0] == q.id:
        st.warning(f"Not graded yet: {error[1]}.")


def result(q: qz.Question, answer: qz.Answer, run: LiveRun) -> None:
    """Graded: right or wrong, both answers, the explanation with the live numbers, the views that prove it."""
    def listed(indices: tuple[int, ...]) -> str:
        if len(indices) == 1:
            return q.options[indices[0]]
        bullet = (lambda n: f"{n}.") if q.kind == "order" else (lambda n: "-")
        return "\n" + "\n".join(f"{bullet(n)} {q.options[i]}" for n, i in enumerate(indices, 1))

    if answer.correct:
        st.success(f"**Right.** {listed(answer.response)}", icon=":material/check_circle:")
    else:
        st.error(f"**Not quite.** You answered: {listed(answer.response)}", icon=":material/cancel:")
        st.markdown(f"**The answer:** {listed(q.answer)}")
    st.markdown(q.explanation)
    if q.figure == "whatif":
        w = run.tied
        assert w is not None  # a what-if question is asked only when the what-if ran
        left, right = st.columns(2)
        with left:
            kit.chart(fq.tied_attention_figure(w.real, w.tokens, f"Real: head {w.head}, layer {w.layer}"), "quiz_real")
        with right:
            kit.chart(fq.tied_attention_figure(w.tied, w.tokens, f"What if W_k = W_v = W_q (head {w.head})"), "quiz_tied")
        kit.chart(fq.own_weight_figure(w.real, w.tied, w.tokens, "Each query's weight on its own position"), "quiz_own")
    links = " · ".join(f"[{link.label}]({LINKS[link.page](link.params)})" for link in q.links)
    if links:
        st.markdown(f"**See it live:** {links}")


def show(q: qz.Question, run: LiveRun) -> None:
    st.caption(q.topic)
    st.markdown(f"##### {q.text}")
    answer = st.session_state.quiz_answers.get(q.id)
    if answer is None:
        answer_form(q, qz.option_order(q, st.session_state.quiz_seed))
    else:
        result(q, answer, run)
    st.caption(f"[Link to this question]({kit.quiz_link(q.id)}) (for a teacher: it opens this question alone)")


# -- the page -------------------------------------------------------------------------------------
lm = kit.require_model("the quiz")
try:
    run, questions = live(st.session_state.model_name)
except ValueError as e:  # an InputError too: e.g. a context too short for the live run
    st.error(f"The quiz cannot run on this model: {bank.md_escape(str(e))}", icon=":material/error:")
    st.stop()
by_id = {q.id: q for q in questions}
ss = st.session_state
if ss.quiz_seed is None:  # the first visit of this browser session
    ss.quiz_seed = random.SystemRandom().randrange(2**31)
if ss.quiz_model not in (None, run.name):  # the answers were given on other numbers
    start_over(f"The model changed to {bank.md_escape(run.name)}: the quiz started over with its numbers.")
ss.quiz_model = run.name
order = qz.quiz_order(list(by_id), ss.quiz_seed)

st.title("Check yourself")
st.caption(f"{len(questions)} questions from courses on LLM inference, each answered on this model's own cache, right now: "
           f"the explanations quote a live run (the demo prompt, {len(run.trace.steps)} greedy steps) and link to the "
           "views that show it. Your score stays in this browser session.")
if ss.quiz_note:
    st.info(ss.quiz_note, icon=":material/restart_alt:")
    ss.quiz_note = None

linked_raw = st.query_params.get(kit.QUIZ_PARAMS["question"])
linked = qz.check_id(linked_raw, by_id)
if linked_raw is not None and linked is None:
    asked = str(linked_raw).strip().lower()
    reason = bank.not_applicable(run).get(asked)
    st.warning(f"The link asks for a question this model cannot answer: {reason}. Here is the whole quiz." if reason
               else "The link names no question of this quiz. Here is the whole quiz.", icon=":material/link_off:")

right, answered = qz.score(ss.quiz_answers)
with st.container(horizontal=True, vertical_alignment="center", gap="small"):
    st.markdown(f"**Score {right} / {answered}** answered, of {len(questions)}")
    st.button("Start over", icon=":material/restart_alt:", on_click=start_over, key="quiz_restart",
              help="Clear your answers and shuffle again.")

if linked is not None:
    st.info("One question, linked on its own.", icon=":material/link:")
    st.button("Take the whole quiz", icon=":material/list:", on_click=whole_quiz, args=(order.index(linked),),
              key="quiz_whole")
    show(by_id[linked], run)
    st.stop()

pos = min(ss.quiz_pos, len(order) - 1)
st.progress(answered / len(order))
marks = {qid: " ✓" if a.correct else " ✗" for qid, a in ss.quiz_answers.items()}
labels = [f"Question {i + 1} of {len(order)}{marks.get(qid, '')}" for i, qid in enumerate(order)]
ss.quiz_jump = pos
with st.container(horizontal=True, vertical_alignment="bottom", gap="small"):
    st.button("Previous", icon=":material/chevron_left:", on_click=go, args=(pos - 1,), disabled=pos == 0, key="quiz_prev")
    st.selectbox("Question", list(range(len(order))), format_func=labels.__getitem__, key="quiz_jump",
                 label_visibility="collapsed", on_change=lambda: go(ss.quiz_jump), width=220)
    st.button("Next", icon=":material/chevron_right:", on_click=go, args=(pos + 1,), disabled=pos == len(order) - 1,
              key="quiz_next", type="primary")
show(by_id[order[pos]], run)
if answered == len(order):
    st.success(f"All {len(order)} answered: {right} right.", icon=":material/school:")
