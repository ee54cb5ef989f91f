"""Step through: prefill, then one decode step per click; watch K and V grow and where q′ looks.

One `kvviz.Session` per browser session lives in `st.session_state`; each click records one
`Step`. The slider scrubs over recorded steps without recomputing anything. The views are one
fragment, so a click reruns only them, not the sidebar; Play reruns that fragment on a timer.
"""

from __future__ import annotations

from typing import NamedTuple

import streamlit as st

import kvviz
from kvviz.figures import step as fs
from kvviz.geometry import dtype_bytes, human_bytes, kv_geometry
from kvviz.ui import kit

kit.page("Step through")

OVERVIEWS = ["All heads", "All layers", "Cache size"]
SPEEDS = {"slow · 1 s": 1.0, "normal · 0.5 s": 0.5, "fast · 0.25 s": 0.25}
PARITY_OK = 1e-4  # |cached - recomputed logit| below this is float32 noise



class RunSettings(NamedTuple):
    """What a run is made of; any change means a fresh run from prefill.

    A NamedTuple, not a dataclass: this script is re-executed on every rerun, so the class is
    redefined each time, and only tuple equality survives that.
    """

    model: str
    prompt: str
    new_tokens: int
    sampling: kvviz.Sampling


def sidebar(limits: kvviz.Limits) -> tuple[RunSettings, bool]:
    """The page's part of the sidebar (below the shared model block). Returns (settings, parity)."""
    with st.sidebar:
        st.markdown("### Run")
        prompt = st.text_area("Prompt", kit.DEFAULT_PROMPT, key="step_prompt", height=96, persist_state="session",
                              help="Ctrl+Enter or click away to apply; a new prompt restarts the run.")
        most = limits.max_new_tokens  # a deployment cap may sit below the default
        new_tokens = st.number_input("New tokens", 1, most, min(24, most), key="step_new_tokens",
                                     persist_state="session", help="Steps in the run: prefill makes the first token.")
        mode = st.segmented_control("Next token", ["greedy", "sample"], default="greedy", required=True,
                                    key="step_mode", persist_state="session")
        if mode == "sample":
            temperature = st.slider("Temperature", 0.05, 2.0, 1.0, 0.05, key="step_temperature", persist_state="session")
            top_k = st.number_input("Top-k (0 = off)", 0, 10_000, 0, key="step_top_k", persist_state="session")
            top_p = st.slider("Top-p (1 = off)", 0.05, 1.0, 1.0, 0.05, key="step_top_p", persist_state="session")
            seed = st.number_input("Seed", 0, 2**31 - 1, 0, key="step_seed", persist_state="session")
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
        session = kvviz.Session(lm, settings.prompt, settings.new_tokens, sampling=settings.sampling, parity=parity)
        session.step()  # prefill: step 0
    except kvviz.InputError as e:
        return str(e)
    previous: RunSettings | None = st.session_state.step_settings
    st.session_state.step_note = None
    if previous is not None and previous != settings:
        changed = [label for label, same in (
            ("model", previous.model == settings.model), ("prompt", previous.prompt == settings.prompt),
            ("new tokens", previous.new_tokens == settings.new_tokens), ("sampling", previous.sampling == settings.sampling),
        ) if not same]
        st.session_state.step_note = f"The {' and '.join(changed)} changed: the run restarted from prefill."
    st.session_state.update(step_session=session, step_settings=settings, step_view=0, step_playing=False,
                            step_error=None)
    return None


def advance() -> None:
    """Record the next step and show it (the Next step button and each Play tick)."""
    session: kvviz.Session = st.session_state.step_session
    try:
        session.step()
    except kvviz.InputError as e:
        st.session_state.step_error = str(e)
        return
    st.session_state.update(step_view=len(session.steps) - 1, step_error=None, step_note=None)


def restart() -> None:
    """Reset: the run's own settings, a fresh cache, prefill again."""
    start_run(kit.current_model(), st.session_state.step_settings, st.session_state.step_session.parity)


def on_scrub() -> None:
    if not st.session_state.step_playing:  # while playing the slider follows the newest step
        st.session_state.step_view = st.session_state.step_scrub






# -- the page -------------------------------------------------------------------------------------
limits = kvviz.Limits()
lm = kit.require_model("the step-through view")
settings, parity = sidebar(limits)

settings_error = None  # why the sidebar's settings cannot run; the previous run stays on screen
if st.session_state.step_session is None or st.session_state.step_settings != settings:
    settings_error = start_run(lm, settings, parity)
if st.session_state.step_session is not None:
    st.session_state.step_session.parity = parity  # read per step: toggling it needs no restart

st.title("Step through")
st.caption("Prefill fills the cache with the prompt; each decode step feeds one token, appends one row to K and V, "
           "and lets the new query q′ attend over everything cached.")
if settings_error:
    st.error(settings_error, icon=":material/error:")
if st.session_state.step_session is None:
    st.stop()
if settings_error:
    st.warning("Showing the previous run: fix the settings in the sidebar to start a new one.")


def viewer(lm: kvviz.LoadedModel, rope: bool) -> None:
    """Controls, metrics and every view of the shown step. Reruns alone on clicks and Play ticks."""
    session: kvviz.Session = st.session_state.step_session
    kit.play_tick("step", st.session_state.step_seconds, advance,
                  at_end=lambda: session.done or st.session_state.step_error is not None)
    playing = st.session_state.step_playing

    # -- controls ---------------------------------------------------------------------------
    n = len(session.steps)
    with st.container(horizontal=True, vertical_alignment="bottom", gap="small"):
        st.button("Next step", icon=":material/skip_next:", type="primary", on_click=advance, disabled=session.done,
                  key="step_next", help="Feed the last chosen token: one decode step.")
        if st.button("Pause" if playing else "Play", icon=":material/pause:" if playing else ":material/play_arrow:",
                     disabled=session.done and not playing, key="step_play"):
            st.session_state.step_playing = not playing
            st.session_state.step_last_tick = 0.0
            st.rerun()  # the whole app: the fragment's timer is set when it is registered
        st.button("Reset", icon=":material/restart_alt:", on_click=restart, key="step_reset",
                  help="Start again from prefill with the same settings.")
        st.selectbox("Speed", list(SPEEDS), index=1, key="step_speed", label_visibility="collapsed", width=150,
                     on_change=lambda: st.session_state.update(step_seconds=SPEEDS[st.session_state.step_speed]),
                     help="Seconds per step while playing.")
        if n > 1:
            st.session_state.step_scrub = st.session_state.step_view
            st.slider("Shown step (0 = prefill)", 0, n - 1, key="step_scrub", on_change=on_scrub, width=340,
                      disabled=playing, help="Scrub through recorded steps; nothing is recomputed.")
    if st.session_state.step_note:  # stays until the next step, so a fragment rerun does not hide it
        st.info(st.session_state.step_note, icon=":material/restart_alt:")
    if session.done:
        st.caption(f"Generation is over: {session.stopped_reason}. Reset or change the settings to run again.")
    if st.session_state.step_error:
        st.error(st.session_state.step_error)

    t = session.trace()
    shown: dict = {}  # title -> figure, for the HTML export
    s = min(st.session_state.step_view, n - 1)
    step = t.steps[s]
    info = t.model
    n_prompt = len(t.prompt_ids)
    geo = kv_geometry(lm.model.config)
    bytes_per_token = geo.bytes_per_token(info.dtype)

    # -- live metrics -----------------------------------------------------------------------
    m = st.columns(5)
    m[0].metric("Step", "prefill" if step.is_prefill else f"decode {s}", f"{n} recorded", delta_color="off",
                delta_arrow="off", help="Step 0 is prefill; each later step is one decode step.")
    grew = step.cache_len - (t.steps[s - 1].cache_len if s else 0)
    m[1].metric("Cache length", step.cache_len, f"+{grew} position{'s' if grew > 1 else ''}", delta_arrow="off",
                help="Cached positions per layer and KV head after this step.")
    m[2].metric("Cache bytes", human_bytes(bytes_per_token * step.cache_len), f"{bytes_per_token:,} B per token",
                delta_color="off", delta_arrow="off",
                help=f"bytes per token = 2 (K and V) × {info.num_layers} layers × {info.num_key_value_heads} KV heads × "
                     f"{info.head_dim} (head_dim) × {dtype_bytes(info.dtype):g} B ({info.dtype}); × cache length.")
    diff = step.max_abs_logit_diff
    if diff is None:
        m[3].metric("Parity", "off", "not checked", delta_color="off", delta_arrow="off")
    else:
        ok = diff < PARITY_OK
        m[3].metric("Parity |Δlogit|", f"{diff:.1e}", "cache exact" if ok else "cache differs", delta_arrow="off",
                    delta_color="green" if ok else "red",
                    help="Largest |cached − full-recompute| next-token logit. Float32 noise is ~1e-6; "
                         f"green under {PARITY_OK:g}.")
    m[4].metric("Step time", f"{step.time_ms:.1f} ms",
                f"recompute {step.recompute_ms:.1f} ms" if step.recompute_ms is not None else "cached forward",
                delta_color="off", delta_arrow="off", help="This step's cached forward (capture included) vs recomputing all.")

    # -- tokens, pickers, the story ----------------------------------------------------------
    ids = list(t.prompt_ids) + list(t.generated_ids)
    st.html(fs.token_strip_html(t.tokens, ids, n_prompt, s))
    with st.container(horizontal=True, vertical_alignment="bottom", gap="medium"):
        layer = kit.picker("Layer", info.num_layers, "step_layer")
        kv_head_of = step.layers[layer].kv_head_of
        head = kit.picker("Query head → the KV head it reads", info.num_heads, "step_head",
                      fmt=lambda h: f"q{h}→kv{int(kv_head_of[h])}")
    kv = int(kv_head_of[head])
    st.caption(f"**{fs.kv_sharing_text(kv_head_of, head)}**. The K and V below are KV head {kv}'s, in layer {layer}.")
    ls = step.layers[layer]
    cached = t.cached_tokens(s)
    new_rows = len(step.input_ids)

    story, views = st.columns([2, 3], gap="large")
    with story:
        fed_token = t.steps[s - 1].token if s else ""
        st.markdown(fs.step_story(step, n_prompt, fed_token=fed_token, num_layers=info.num_layers, head_dim=info.head_dim,
                                  rope=rope, greedy=t.sampling.get("greedy", True)))
    with views:
        kit.chart(fs.kv_figure(t.keys(layer, s)[kv], t.values(layer, s)[kv], cached, kv_head=kv, new_rows=new_rows),
              "step_KV", shown)
        added = "prefill stored every prompt row" if step.is_prefill else "one new row each"
        st.caption(f"**K ← [K; k′], V ← [V; v′]**: {added} (outlined). A row per cached position, a column per "
                   "head_dim index; earlier rows never change.")
        kit.chart(fs.qkv_figure(ls.query_states[head, -1], ls.key_states[kv, -1], ls.value_states[kv, -1], head=head,
                            kv_head=kv, token=t.tokens[step.positions[-1]], position=step.positions[-1]), "step_qkv", shown)
        st.caption("The newest token's query, key and value (at prefill: the last prompt token's). "
                   "k′ and v′ are the outlined rows of K and V above.")

    # -- attention, the next token, overviews -------------------------------------------------
    ac, oc = st.columns([3, 2], gap="large")
    with ac:
        kit.chart(fs.attention_figure(t.attention_matrix(layer, head, s), cached, n_prompt, head=head, new_rows=new_rows),
              "step_attention", shown)
        st.caption("What q′ attends to: softmax(q′Kᵀ/√d) over every cached position — the prompt, each generated "
                   "token and the new token itself (bars; they sum to 1). Above, the matrix built row by row: prefill "
                   "made the causal triangle in one go, each decode step adds one row (outlined), one column longer; "
                   "empty cells are the future. Hover a cell for its tokens.")
    with oc:
        kit.chart(fs.next_token_figure(step.top_k, step.token_id, step.token, step.prob), "step_next_token", shown)
        st.caption(f"The model's top {len(step.top_k)} next tokens (temperature 1); the chosen one, in red, is fed "
                   "in at the next step.")
        # one overview at a time: each chart on screen costs browser time on every step
        view = st.segmented_control("Overview", OVERVIEWS, default=OVERVIEWS[0], required=True, key="step_overview",
                                    label_visibility="collapsed")
        if view == "All heads":
            kit.chart(fs.heads_overview_figure(ls.weights[:, -1, :], cached, kv_head_of, selected_head=head), "step_heads",
                  shown)
            st.caption(f"Layer {layer}: each row is one query head's newest query; dotted lines group the heads that "
                       "share a KV head.")
        elif view == "All layers":
            kit.chart(fs.layers_overview_figure([x.weights[:, -1, :] for x in step.layers], cached, selected_layer=layer),
                  "step_layers", shown)
            st.caption("Each layer's newest query, averaged over its heads.")
        else:
            kit.chart(fs.cache_growth_figure([x.cache_len for x in t.steps], bytes_per_token, current_step=s,
                                         dtype=info.dtype), "step_size", shown)
            st.caption("Every step adds one row per layer and KV head: the cache grows linearly with the tokens.")

    with st.expander("Export"):
        st.download_button("Trace (JSON, summary)", lambda: t.to_json(), file_name="kvviz-trace.json", mime="application/json",
                           on_click="ignore", icon=":material/download:")
        st.download_button("Trace with all arrays (JSON)", lambda: t.to_json(arrays=True),
                           file_name="kvviz-trace-arrays.json", mime="application/json", on_click="ignore",
                           icon=":material/download:")
        st.download_button("Figures of this step (HTML)",
                           lambda: fs.figures_html(shown, f"kvviz · {info.name} · step {s} · layer {layer} head {head}"),
                           file_name=f"kvviz-step{s}-L{layer}-H{head}.html", mime="text/html", on_click="ignore",
                           icon=":material/download:")
        st.caption("The HTML opens offline and stays interactive; each chart's camera icon also saves a PNG.")


rope = any("rope" in key for key in lm.model.config.to_dict())  # RoPE (Llama, Qwen2) vs learned positions (GPT-2)
run_every = st.session_state.step_seconds if st.session_state.step_playing else None
st.fragment(viewer, run_every=run_every)(lm, rope)
