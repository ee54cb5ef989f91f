"""Step through: prefill, then one decode step per click; watch K and V grow and where q′ looks.

One `kvviz.Session` per browser session lives in `st.session_state`; each Next step records one
`Step`. The views are drawn in the browser (`kvviz.ui.stepview`) from the whole run, so the slider
and Play move through recorded steps with no server round trip per frame; the server runs only
what needs the model (a step, Play's remaining steps once, Reset) and the arithmetic tab.

The page's state lives in its URL, so a reload or a shared link rebuilds the same run:
`?prompt=…&tokens=24&sampling=greedy|sample&temperature=0.8&top_k=0&top_p=0.9&seed=1&layer=1&head=3&step=5`
(every parameter optional; defaults are left out; see `kvviz.ui.stepview.link`). Positions and
steps count from 0 (step 0 = prefill).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import streamlit as st

import kvviz
from kvviz.engine.arithmetic import ArithmeticUnavailable, head_arithmetic
from kvviz.engine.heads import HeadLabels, load_heads
from kvviz.engine.models import resolve
from kvviz.figures import step as fs
from kvviz.geometry import kv_geometry
from kvviz.ui import kit
from kvviz.ui.stepview import action_of, standalone_html, step_view
from kvviz.ui.stepview import link as links

kit.page("Step through")

VIEW_KEY = "step_view_widget"
DEFAULT_TOKENS = 24


class RunSettings(NamedTuple):
    """What a run is made of; any change means a fresh run from prefill.

    A NamedTuple, not a dataclass: this script is re-executed on every rerun, so the class is
    redefined each time, and only tuple equality survives that.
    """

    model: str
    prompt: str
    new_tokens: int
    sampling: kvviz.Sampling


# -- the link (URL) ---------------------------------------------------------------------------------
def read_link(lm: kvviz.LoadedModel, limits: kvviz.Limits) -> None:
    """Once per browser session: the URL's parameters become the widgets' values (bad ones dropped, said why)."""
    ss = st.session_state
    if ss.step_link_read:
        return
    ss.step_link_read = True
    link, notes = links.parse_link(st.query_params.to_dict(), max_tokens=limits.max_new_tokens,
                                   num_layers=lm.info.num_layers, num_heads=lm.info.num_heads, default_tokens=DEFAULT_TOKENS)
    widget_values = {"step_prompt": link.prompt, "step_new_tokens": link.tokens,
                     "step_mode": None if link.sample is None else ("sample" if link.sample else "greedy"),
                     "step_temperature": link.temperature, "step_top_k": link.top_k, "step_top_p": link.top_p,
                     "step_seed": link.seed, "step_layer": link.layer, "step_head": link.head}
    for key, value in widget_values.items():
        if value is not None:
            ss[key] = value
    ss.step_link_step = link.step
    if notes:
        ss.step_notices = [("warning", "Ignored from the link: " + "; ".join(notes) + ".")]


def default_params(limits: kvviz.Limits) -> dict[str, Any]:
    return {"prompt": kit.DEFAULT_PROMPT, "tokens": min(DEFAULT_TOKENS, limits.max_new_tokens), "sampling": "greedy",
            "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0, "layer": None, "head": None, "step": None}


def write_link(settings: RunSettings, layer: int, head: int, limits: kvviz.Limits) -> None:
    """Put the shown state in the URL (only when it changed: each write is a message to the browser)."""
    sp = settings.sampling
    params = links.link_params(prompt=settings.prompt, tokens=settings.new_tokens, sample=not sp.is_greedy,
                               temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, seed=sp.seed, layer=layer,
                               head=head, step=st.session_state.step_view, defaults=default_params(limits))
    current = st.query_params.to_dict()
    others = {k: v for k, v in current.items() if k not in links.PARAMS}
    if {**others, **params} != current:
        st.query_params.from_dict({**others, **params})


# -- the run --------------------------------------------------------------------------------------
def sidebar(limits: kvviz.Limits) -> tuple[RunSettings, bool]:
    """The page's part of the sidebar (below the shared model block). Returns (settings, parity)."""
    with st.sidebar:
        st.markdown("### Run")
        prompt = st.text_area("Prompt", kit.DEFAULT_PROMPT, key="step_prompt", height=96, persist_state="session",
                              help="Ctrl+Enter or click away to apply; a new prompt restarts the run.")
        most = limits.max_new_tokens  # a deployment cap may sit below the default
        new_tokens = st.number_input("New tokens", 1, most, min(DEFAULT_TOKENS, most), key="step_new_tokens",
                                     persist_state="session", help="Steps in the run: prefill makes the first token.")
        mode = st.segmented_control("Next token", ["greedy", "sample"], default="greedy", required=True,
                                    key="step_mode", persist_state="session")
        if mode == "sample":
            temperature = st.slider("Temperature", *links.TEMPERATURE, 1.0, 0.05, key="step_temperature",
                                    persist_state="session")
            top_k = st.number_input("Top-k (0 = off)", 0, links.MAX_TOP_K, 0, key="step_top_k", persist_state="session")
            top_p = st.slider("Top-p (1 = off)", *links.TOP_P, 1.0, 0.05, key="step_top_p", persist_state="session")
            seed = st.number_input("Seed", 0, links.MAX_SEED, 0, key="step_seed", persist_state="session")
            sampling = kvviz.Sampling(greedy=False, temperature=temperature, top_k=int(top_k), top_p=top_p, seed=int(seed))
        else:
            sampling = kvviz.Sampling()
        parity = st.toggle("Check each step against a full recompute", True, key="step_parity", persist_state="session",
                           help="Runs the whole sequence again without the cache and compares the logits (the parity badge).")
    name = st.session_state["model_name"]
    return RunSettings(name, prompt, int(new_tokens), sampling), parity


def start_run(lm: kvviz.LoadedModel, settings: RunSettings, parity: bool) -> str | None:
    """A fresh Session with prefill done. On bad input, returns why and the previous run stays."""
    try:
        with kit.model_work("Prefill"):
            session = kvviz.Session(lm, settings.prompt, settings.new_tokens, sampling=settings.sampling, parity=parity)
            session.step()  # prefill: step 0
    except kvviz.InputError as e:
        st.session_state.step_notices = []  # an older "restarted" note would contradict "showing the previous run"
        return str(e)
    ss = st.session_state
    previous: RunSettings | None = ss.step_settings
    if previous is not None and previous != settings:
        changed = [label for label, same in (
            ("model", previous.model == settings.model), ("prompt", previous.prompt == settings.prompt),
            ("new tokens", previous.new_tokens == settings.new_tokens), ("sampling", previous.sampling == settings.sampling),
        ) if not same]
        ss.step_notices = [("info", f"The {' and '.join(changed)} changed: the run restarted from prefill.")]
    ss.update(step_session=session, step_settings=settings, step_view=0, step_error=None, step_arith={},
              step_run_id=ss.step_run_id + 1, step_nonce=ss.step_nonce + 1)
    return None


def advance(n: int = 1) -> None:
    """Record up to `n` more steps (fewer when the run ends) and show the newest."""
    ss = st.session_state
    session: kvviz.Session = ss.step_session
    try:
        with kit.model_work("Stepping"):  # the fair queue: one visitor's Play cannot starve the others
            for _ in range(max(1, n)):
                if session.done:
                    break
                session.step()
                ss.step_error = None
    except kvviz.InputError as e:  # a refused or failed step (the run keeps what it recorded), or a full queue
        ss.step_error = str(e)
    ss.update(step_view=len(session.steps) - 1, step_nonce=ss.step_nonce + 1)


def show_link_step() -> None:
    """A link asked for step t: compute the run up to it (deterministic), then show it."""
    ss = st.session_state
    want = ss.step_link_step
    if want is None or ss.step_session is None:
        return
    ss.step_link_step = None
    missing = want - (len(ss.step_session.steps) - 1)
    if missing > 0:
        advance(missing)
    ss.update(step_view=min(want, len(ss.step_session.steps) - 1), step_nonce=ss.step_nonce + 1)


def apply(action: dict[str, Any]) -> None:
    """One action from the browser: next / play / reset / view / tab (see kvviz/ui/stepview/view.js)."""
    ss = st.session_state
    session: kvviz.Session = ss.step_session
    last = len(session.steps) - 1
    view = action.get("view")
    view = min(max(int(view), 0), last) if isinstance(view, (int, float)) else ss.step_view
    kind = action.get("do")
    if kind in ("next", "play", "reset"):
        ss.step_notices = []
    if kind == "next":
        if view < last:  # scrubbed back: the next recorded step first (the browser normally does this itself)
            ss.update(step_view=view + 1, step_nonce=ss.step_nonce + 1)
        else:
            n = action.get("n", 1)
            advance(int(n) if isinstance(n, int) and 0 < n <= session.max_new_tokens else 1)
    elif kind == "play":  # every remaining step once; the browser animates them from the shown step
        advance(session.max_new_tokens)
        ss.update(step_view=view, step_autoplay=(ss.step_autoplay or 0) + 1)
    elif kind == "reset":
        start_run(kit.current_model(), ss.step_settings, session.parity)
    elif kind == "view":
        ss.step_view = view
    elif kind == "tab" and action.get("tab") in ("main", "arith", "over"):
        ss.step_tab = action["tab"]
    if isinstance(action.get("id"), int):
        ss.step_ack = max(ss.step_ack, action["id"])


def on_action() -> None:
    """The view's trigger callback: queue the action; the views apply it before drawing."""
    action = action_of(VIEW_KEY)
    if action:
        st.session_state.step_pending = [*st.session_state.step_pending, action]


# -- the views ------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def head_labels(model_name: str, num_layers: int, num_heads: int) -> HeadLabels:
    """The model's labelled heads (heads.json beside a local checkpoint; hub models have none)."""
    try:
        path = Path(resolve(model_name))
    except Exception:  # a model name that resolves nowhere has no labels
        return HeadLabels()
    return load_heads(path if path.is_dir() else None, num_layers, num_heads)


def pickers(lm: kvviz.LoadedModel, kv_head_of: Any) -> tuple[int, int]:
    """Layer and query head, opening on the model's most structured head, with one-click labelled picks."""
    ss, info = st.session_state, lm.info
    labels = head_labels(lm.name, info.num_layers, info.num_heads)
    if "step_layer" not in ss or "step_head" not in ss:  # first visit: the clearest pattern, not layer 0 head 0
        layer, head = labels.most_structured() or (0, 0)
        ss.setdefault("step_layer", layer)
        ss.setdefault("step_head", head)
    with st.container(horizontal=True, vertical_alignment="bottom", gap="medium"):
        layer = kit.picker("Layer", info.num_layers, "step_layer")
        head = kit.picker("Query head → the KV head it reads", info.num_heads, "step_head",
                          fmt=lambda h: f"q{h}→kv{int(kv_head_of[h])}")
        picks = labels.picks()
        if picks:
            kit.head_picks(picks, "step_layer", "step_head", current=(layer, head))
    return layer, head


def arithmetic(lm: kvviz.LoadedModel, t: kvviz.Trace, layer: int, head: int) -> tuple[list | None, str | None]:
    """The arithmetic of every recorded step for (layer, head), computed once per step and kept."""
    ss = st.session_state
    parts = ss.step_arith.setdefault((ss.step_run_id, layer, head), [])
    try:
        while len(parts) < len(t.steps):
            parts.append(head_arithmetic(lm, t, len(parts), layer, head))
    except ArithmeticUnavailable as e:
        return None, f"The arithmetic cannot be shown for this model: {e}."
    return parts, None


def payload(lm: kvviz.LoadedModel, t: kvviz.Trace, layer: int, head: int, rope: bool) -> dict[str, Any]:
    ss = st.session_state
    session: kvviz.Session = ss.step_session
    parts, note = arithmetic(lm, t, layer, head) if ss.step_tab == "arith" else (None, None)
    bytes_per_token = kv_geometry(lm.model.config).bytes_per_token(t.model.dtype)
    data = fs.step_view_payload(t, layer, head, rope=rope, bytes_per_token=bytes_per_token, arithmetic=parts,
                                arithmetic_note=note)
    notices = [{"kind": k, "text": x} for k, x in ss.step_notices]
    if ss.step_error:
        notices.append({"kind": "error", "text": ss.step_error})
    data.update(run=ss.step_run_id, nonce=ss.step_nonce, view=min(ss.step_view, len(t.steps) - 1), autoplay=ss.step_autoplay,
                ack=ss.step_ack, runs=ss.step_runs, done=session.done, stopped=session.stopped_reason, tab=ss.step_tab,
                notices=notices)
    return data


def export(lm: kvviz.LoadedModel, t: kvviz.Trace, layer: int, head: int, rope: bool) -> None:
    with st.expander("Export"):
        st.download_button("Trace (JSON, summary)", lambda: t.to_json(), file_name="kvviz-trace.json", mime="application/json",
                           on_click="ignore", icon=":material/download:")
        st.download_button("Trace with all arrays (JSON)", lambda: t.to_json(arrays=True),
                           file_name="kvviz-trace-arrays.json", mime="application/json", on_click="ignore",
                           icon=":material/download:")
        st.download_button("This run's views, layer and head (interactive HTML)",
                           lambda: standalone_html({**payload(lm, t, layer, head, rope), "notices": [], "autoplay": None},
                                                   f"kvviz · {t.model.name} · layer {layer} head {head}"),
                           file_name=f"kvviz-run-L{layer}-H{head}.html", mime="text/html", on_click="ignore",
                           icon=":material/download:")
        st.caption("The HTML page opens offline (plotly.js inside) and plays, scrubs and hovers like this one.")


def viewer(lm: kvviz.LoadedModel, rope: bool, limits: kvviz.Limits) -> None:
    """Pickers and the step view. Reruns alone on the view's actions and the pickers."""
    ss = st.session_state
    ss.step_runs += 1
    pending, ss.step_pending = ss.step_pending, []
    for action in pending:
        apply(action)
    t = ss.step_session.trace()
    layer, head = pickers(lm, t.steps[0].layers[0].kv_head_of)
    step_view(payload(lm, t, layer, head, rope), key=VIEW_KEY, on_action=on_action)
    write_link(ss.step_settings, layer, head, limits)
    export(lm, t, layer, head, rope)


# -- the page -------------------------------------------------------------------------------------
limits = kvviz.Limits()
lm = kit.require_model("the step-through view")
read_link(lm, limits)
settings, parity = sidebar(limits)

settings_error = None  # why the sidebar's settings cannot run; the previous run stays on screen
if st.session_state.step_session is None or st.session_state.step_settings != settings:
    settings_error = start_run(lm, settings, parity)
if st.session_state.step_session is not None:
    st.session_state.step_session.parity = parity  # read per step: toggling it needs no restart
    show_link_step()

st.title("Step through")
st.caption("Prefill fills the cache with the prompt; each decode step feeds one token, appends one row to K and V, "
           "and lets the new query q′ attend over everything cached. Positions and steps count from 0.")
if settings_error:
    st.error(settings_error, icon=":material/error:")
if st.session_state.step_session is None:
    st.stop()
if settings_error:
    st.warning("Showing the previous run: fix the settings in the sidebar to start a new one.")

rope = any("rope" in key for key in lm.model.config.to_dict())  # RoPE (Llama, Qwen2) vs learned positions (GPT-2)
st.fragment(viewer)(lm, rope, limits)
