"""What every page repeats: its setup, the navigation, charts, pickers and the Play timer.

Why `page()` exists (the framework trap): with a `pages/` folder beside the entry point,
Streamlit 1.67 starts in its legacy multipage mode, and until some request has run `app.py`'s
`st.navigation`, a deep link (say `/step_through` as the first request to a fresh server) runs
the page script alone, without `app.py`. So every page calls `kit.page()` first, which
- sets the page config, the session-state defaults and the shared model sidebar itself, and
- when the page was not reached through `app.py` (the legacy mode), declares the navigation
  itself: the menu this visitor sees is the real one (titles, icons), and the whole process
  leaves the legacy mode, so from the next request on every page runs through `app.py`.
  (No rerun: a rerun would drop the widget events of the run it replaces. Streamlit's AppTest
  starts every run in the legacy mode, so this path runs on every test rerun too.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import streamlit as st

from kvviz.engine import DEFAULT_PROMPT
from kvviz.engine.models import LoadedModel
from kvviz.engine.work import model_queue
from kvviz.ui import model, state
from kvviz.ui.model import current_model, require_model
from kvviz.ui.text import escape
from kvviz.validate import InputError, settings

__all__ = ["DEFAULT_PROMPT", "PAGES", "bug_lab_link", "chart", "current_model", "escape", "head_picks", "model_work", "page",
           "paged_link", "picker", "play_tick", "quiz_link", "require_model", "run_app", "step_link"]

ROOT = Path(__file__).resolve().parents[2]
# (file, title, icon) in menu order; the first is the default page. Every file must exist.
PAGES: tuple[tuple[str, str, str], ...] = (
    ("pages/home.py", "Home", ":material/home:"),
    ("pages/step_through.py", "Step through", ":material/step:"),
    ("pages/bug_lab.py", "Bug lab", ":material/bug_report:"),
    ("pages/cost.py", "Cache vs recompute", ":material/timer:"),
    ("pages/memory.py", "Memory per token", ":material/memory:"),
    ("pages/paged.py", "Paged & shared prefix", ":material/view_module:"),
    ("pages/serving.py", "Serving: reuse, speculate, beam", ":material/dns:"),
    ("pages/quiz.py", "Check yourself", ":material/quiz:"),
)
CHART_CONFIG = {"displaylogo": False}

_THROUGH_APP: ContextVar[bool] = ContextVar("kvviz_through_app", default=False)


def navigation() -> Any:
    """`st.navigation` over PAGES (a missing page file is an error, not a silently shorter menu)."""
    return st.navigation([st.Page(ROOT / f, title=t, icon=i, default=n == 0) for n, (f, t, i) in enumerate(PAGES)])


@contextmanager
def _through_app():
    token = _THROUGH_APP.set(True)
    try:
        yield
    finally:
        _THROUGH_APP.reset(token)


def _navigation_from_a_page() -> None:
    """Declare the navigation from a page that runs without app.py, keeping the page's identity.

    `st.navigation` re-points the run's active script hash at the entry point, and every widget
    ID includes that hash: declared here without restoring it, the page's widgets would change
    IDs between this run and the next (which goes through app.py), and the first click after a
    deep link would be lost. Streamlit is pinned exactly (tests/test_pins.py); a browser test
    opens every page as the first request of a fresh server, and a page test clicks on the first
    rerun, so a change in these internals fails loudly.
    """
    from streamlit.runtime.scriptrunner import get_script_run_ctx
    from streamlit.runtime.scriptrunner_utils.script_run_context import ThreadState

    ctx = get_script_run_ctx()
    if ctx is None:  # bare mode (plain `python pages/x.py`): nothing to navigate
        return
    with ctx.run_with_active_hash(ThreadState.get().active_script_hash):
        navigation()  # the real menu for this visitor; leaves the legacy pages/ mode for the whole process


def run_app() -> None:
    """The entry point's whole job: navigation, then the chosen page (which sets itself up)."""
    with _through_app():
        navigation().run()


def page(title: str) -> LoadedModel | None:
    """Set up a page: config, state defaults, the shared model sidebar. Returns the sidebar's model.

    Call it first in every page script (see the module docstring for why the page does it itself).
    """
    if not _THROUGH_APP.get():
        _navigation_from_a_page()
    st.set_page_config(page_title=f"{title} · kvviz", page_icon=":material/grid_view:", layout="wide")
    check_settings()
    state.init()
    return model.model_sidebar()


def check_settings() -> None:
    """A deployment's KVVIZ_* variables, checked before anything runs: a bad value stops every page
    with one message naming the variable, instead of a traceback wherever it is first read."""
    try:
        settings()
    except InputError as e:
        st.error(f"kvviz is misconfigured, so nothing runs: {escape(str(e))}. The server's operator must fix it "
                 "and restart.", icon=":material/settings_alert:")
        st.stop()


@contextmanager
def model_work(what: str, exclusive: bool = False) -> Iterator[None]:
    """Run the block's model work through the process-wide fair queue (`kvviz.engine.work`).

    While other visitors' work runs, a note here says where this visitor is in the line; it goes
    away when the work starts. `exclusive` runs alone (timing runs that change torch's threads).
    Every page's forwards go through this:

        with kit.model_work("Stepping"):
            session.step()

    A full queue raises `QueueFull`, an InputError the page shows like any other.
    """
    note = st.empty()

    def waiting(ahead: int, running: int, waited: float) -> None:
        place = "next in line" if ahead == 0 else f"{ahead} visitor{'s' if ahead > 1 else ''} ahead of you"
        note.info(f"{what}: waiting for the model ({place}; {running} run{'s' if running != 1 else ''} in progress, "
                  f"{waited:.0f} s so far)", icon=":material/hourglass_top:")

    try:
        with model_queue().slot(exclusive=exclusive, on_wait=waiting):
            note.empty()
            yield
    finally:
        note.empty()


def chart(fig: Any, key: str, shown: dict | None = None) -> None:
    """Draw a figure with Streamlit's theme (light/dark); keep it in `shown` (title -> figure) for an export."""
    if shown is not None:
        shown[fig.layout.title.text or key] = fig
    st.plotly_chart(fig, theme="streamlit", key=key, config=CHART_CONFIG)


def picker(label: str, n: int, key: str, fmt: Callable[[int], str] = str) -> int:
    """A compact picker over 0..n-1: segmented buttons when few, a select box when many."""
    if key not in st.session_state or st.session_state[key] is None or st.session_state[key] >= n:
        st.session_state[key] = 0
    if n <= 12:
        return st.segmented_control(label, list(range(n)), format_func=fmt, required=True, key=key, wrap=True)  # a phone wraps them
    return st.selectbox(label, list(range(n)), format_func=fmt, key=key)


def head_picks(picks: Sequence[tuple[str, tuple[int, int]]], layer_key: str, head_key: str,
               current: tuple[int, int]) -> None:
    """One-click buttons for a model's labelled heads ("previous-token · L1H3"), beside the layer and head
    pickers whose keys they set (in a callback, before those widgets are drawn again)."""
    for label, (layer, head) in picks:
        st.button(f"{label} · L{layer}H{head}", key=f"{head_key}_pick_{label}",
                  type="primary" if (layer, head) == current else "secondary",
                  on_click=lambda lh=(layer, head): st.session_state.update({layer_key: lh[0], head_key: lh[1]}),
                  help=f"Layer {layer}, query head {head}: labelled '{label}' by the model's head analysis (heads.json).")


def play_tick(prefix: str, seconds: float, advance: Callable[[], None], at_end: Callable[[], bool]) -> None:
    """One tick of a Play timer, for a fragment rerun every `seconds` while `{prefix}_playing` is set.

    Advances when a tick is due (0.8 x `seconds` since the last, so a slightly early rerun still
    counts); at the end it stops playing and reruns the whole app, which registers the fragment
    again without its timer.
    """
    ss = st.session_state
    if not ss[f"{prefix}_playing"]:
        return
    if at_end():
        ss[f"{prefix}_playing"] = False
        st.rerun()
    if time.monotonic() - ss[f"{prefix}_last_tick"] >= 0.8 * seconds:
        ss[f"{prefix}_last_tick"] = time.monotonic()
        advance()


# -- links into pages: one function per page, so each page's URL parameter names live in one place --
# A link is relative to the app's root ("/step_through?..."): the page's url path is its file's stem.
# The names are what each page reads from st.query_params; keep them equal to the page's own.
STEP_PARAMS = {"prompt": "prompt", "steps": "new_tokens", "layer": "layer", "head": "head", "step": "step"}
BUG_LAB_PARAMS = {"bug": "bug", "mode": "mode"}
PAGED_PARAMS = {"scenario": "scenario"}
QUIZ_PARAMS = {"question": "q"}


def _url(stem: str, names: dict[str, str], values: dict[str, Any]) -> str:
    unknown = set(values) - set(names)
    if unknown:
        raise ValueError(f"/{stem} takes no parameter {sorted(unknown)}; it takes {sorted(names)}")
    query = {names[k]: str(v) for k, v in values.items() if v is not None}
    return f"/{stem}" + (f"?{urlencode(query, quote_via=quote)}" if query else "")


def step_link(prompt: str | None = None, steps: int | None = None, layer: int | None = None, head: int | None = None,
              step: int | None = None) -> str:
    """The step page on a run (prompt, new tokens) at a layer, query head and shown step (0 = prefill)."""
    return _url("step_through", STEP_PARAMS, dict(prompt=prompt, steps=steps, layer=layer, head=head, step=step))


def bug_lab_link(bug: str | None = None, mode: str | None = None) -> str:
    """The Bug lab on one catalogue bug (by name)."""
    return _url("bug_lab", BUG_LAB_PARAMS, dict(bug=bug, mode=mode))


def paged_link(scenario: str | None = None) -> str:
    """The paged & shared-prefix page on one of its scenarios."""
    return _url("paged", PAGED_PARAMS, dict(scenario=scenario))


def quiz_link(question: str | None = None) -> str:
    """The quiz, or one question of it by id (what a teacher sends)."""
    return _url("quiz", QUIZ_PARAMS, dict(question=question))
