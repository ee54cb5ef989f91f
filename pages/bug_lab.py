"""Bug lab: run a cache that differs from the exact one beside it, and find where, and why, they part.

A variant is any entry of the registry (`kvviz.variants.registry`): a bug, an eviction policy or a
quantised cache, with its parameters and scope. A run here is a `kvviz.variants.diagnose.Diagnosis`:
the exact run, the variant teacher-forced on the exact tokens (so every difference is the variant's
own), and the variant left to itself (the text a user would see). The step controls and Play move
through both runs together; nothing is recomputed. Mystery mode hides a random bug and scores guesses.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import streamlit as st

import kvviz
from kvviz.figures import variants as fv
from kvviz.ui import kit
from kvviz.variants.diagnose import DEFAULT_STEPS, Diagnosis, diagnose, run_clean
from kvviz.variants.evidence import held_mask
from kvviz.variants.registry import KIND_LABELS, REGISTRY, Variant, citation_markdown, names

kit.page("Bug lab")

PLAY_SECONDS = 0.7
PICK, MYSTERY = "Pick a variant", "Mystery"
QUALITY = Path(__file__).resolve().parents[1] / "docs" / "variant_quality.json"  # scripts/variant_quality.py


class LabSettings(NamedTuple):
    """What a diagnosis is made of; any change reruns it (a NamedTuple survives script reruns)."""

    model: str
    prompt: str
    steps: int
    bug: str
    params: tuple[tuple[str, Any], ...]
    layers: tuple[int, ...] | None
    start_step: int
    sampling: kvviz.Sampling


def plain(text: str) -> str:
    """Text that quotes the model's tokens, made safe for st.markdown (no formatting, no LaTeX from them)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|$~<>])", r"\\\1", text)


def mystery_candidates(lm: kvviz.LoadedModel) -> list[str]:
    """Bugs that can act on this model (the registry says which cannot, e.g. a head mapping on MQA)."""
    return [n for n in names("bug") if REGISTRY[n]().problem(lm.info) is None]


def new_mystery() -> None:
    lm = kit.current_model()
    rng = st.session_state.lab_rng or random.Random()
    st.session_state.lab_rng = rng
    previous = st.session_state.lab_mystery
    choices = [n for n in mystery_candidates(lm) if n != previous]
    st.session_state.update(lab_mystery=rng.choice(choices), lab_guess_result=None, lab_view=0, lab_playing=False)


def variant_label(name: str) -> str:
    if name == "none":
        return "Exact cache (control: nothing changed)"
    cls = REGISTRY[name]
    return f"{cls.kind} · {cls.title}"


def param_inputs(cls: type[Variant]) -> tuple[tuple[str, Any], ...]:
    """One input per parameter the registry declares for this variant."""
    values = []
    defaults = cls.info()["params"]
    for p in cls.params:
        key = f"lab_param_{cls.name}_{p.name}"
        if p.choices is not None:
            value = st.selectbox(p.label, list(p.choices), index=list(p.choices).index(defaults[p.name]), key=key,
                                 help=p.help)
        else:
            value = int(st.number_input(p.label, p.minimum, 4096, int(defaults[p.name]), key=key, help=p.help))
        values.append((p.name, value))
    return tuple(values)


def scope_inputs(lm: kvviz.LoadedModel, cls: type[Variant] | None, steps: int) -> tuple[tuple[int, ...] | None, int]:
    """Layers and start step, offered only where the variant can honour them (it says why not)."""
    n_layers = lm.info.num_layers
    if cls is not None and "layers" not in cls.scopes:
        st.caption(f"**Layers:** all. {cls.scope_notes['layers'].capitalize()}.")
        layers = None
    else:
        chosen = st.multiselect("Layers", list(range(n_layers)), default=list(range(n_layers)), key="lab_layers",
                                help="Apply the variant only in these layers.")
        layers = None if len(chosen) in (0, n_layers) else tuple(sorted(chosen))
        if not chosen:
            st.warning("No layer picked: the variant acts in every layer.")
    if cls is not None and "start_step" not in cls.scopes:
        st.caption(f"**Start step:** prefill. {cls.scope_notes['start_step'].capitalize()}.")
        return layers, 0
    start = int(st.number_input("Start step", 0, steps - 1, 0, key="lab_start",
                                help="The variant acts from this step on (0 = from prefill)."))
    return layers, start


def sidebar(lm: kvviz.LoadedModel, limits: kvviz.Limits) -> tuple[str, LabSettings]:
    with st.sidebar:
        st.markdown("### Bug lab")
        mode = st.segmented_control("Mode", [PICK, MYSTERY], default=PICK, required=True, key="lab_mode",
                                    help="Mystery hides a random bug: inspect the evidence, then guess.")
        prompt = st.text_area("Prompt", kit.DEFAULT_PROMPT, key="lab_prompt", height=80)
        most = max(2, min(64, limits.max_new_tokens))  # a deployment cap may sit below the default
        steps = int(st.number_input("New tokens", 2, most, min(DEFAULT_STEPS, most), key="lab_steps",
                                    help="Steps in each run; prefill is step 0."))
        params: tuple[tuple[str, Any], ...] = ()
        layers: tuple[int, ...] | None = None
        start = 0
        if mode == PICK:
            bug = st.selectbox("Cache", [*names(), "none"], format_func=variant_label, key="lab_bug",
                               help="Bugs, eviction policies and quantised caches; the last entry changes nothing: "
                                    "the control that must never be flagged.")
            cls = REGISTRY.get(bug)
            if cls is not None:
                params = param_inputs(cls)
                try:
                    problem = cls(**dict(params)).problem(lm.info)
                except ValueError as e:  # parameters that do not fit together (the run says so too)
                    problem = str(e)
                if problem:
                    st.warning(f"On this model: {problem}.")
            layers, start = scope_inputs(lm, cls, steps)
        else:
            if st.session_state.lab_mystery is None:
                new_mystery()
            bug = st.session_state.lab_mystery
        sample = st.toggle("Sample instead of greedy", False, key="lab_sample",
                           help="Both runs use the same sampling settings and seed.")
        if sample:
            temperature = st.slider("Temperature", 0.1, 2.0, 1.0, 0.1, key="lab_temperature")
            seed = int(st.number_input("Seed", 0, 2**31 - 1, 0, key="lab_seed"))
            sampling = kvviz.Sampling(greedy=False, temperature=temperature, seed=seed)
        else:
            sampling = kvviz.Sampling()
    return mode, LabSettings(st.session_state["model_name"], prompt, steps, bug, params, layers, start, sampling)


def exact_run(lm: kvviz.LoadedModel, settings: LabSettings) -> Any:
    """The exact run for these settings, reused while only the variant, its parameters or scope change."""
    key = (settings.model, settings.prompt, settings.steps, settings.sampling)
    cached = st.session_state.lab_clean
    if cached is not None and cached[0] == key:
        return cached[1]
    run = run_clean(lm, settings.prompt, settings.steps, settings.sampling)
    st.session_state.lab_clean = (key, run)
    return run


def run_lab(lm: kvviz.LoadedModel, settings: LabSettings) -> None:
    """Diagnose with the new settings; on bad input keep the previous diagnosis and say why."""
    try:
        with kit.model_work("Running both caches"):
            d = diagnose(lm, settings.bug, settings.prompt, settings.steps, layers=list(settings.layers or []) or None,
                         start_step=settings.start_step, sampling=settings.sampling, clean=exact_run(lm, settings),
                         **dict(settings.params))
    except (kvviz.InputError, ValueError) as e:
        st.session_state.lab_error = str(e)
        return
    view = min(st.session_state.lab_view, d.steps - 1)
    st.session_state.update(lab_diag=d, lab_settings=settings, lab_error=None, lab_view=view)


def tick_forward() -> None:
    d: Diagnosis = st.session_state.lab_diag
    st.session_state.lab_view = min(st.session_state.lab_view + 1, d.steps - 1)


def tick_back() -> None:
    st.session_state.lab_view = max(st.session_state.lab_view - 1, 0)


def on_scrub() -> None:
    st.session_state.lab_view = st.session_state.lab_scrub
    st.session_state.lab_playing = False


def on_guess() -> None:
    guess = st.session_state.lab_guess
    correct = guess == st.session_state.lab_mystery
    score = dict(st.session_state.lab_score)
    score["played"] += 1
    score["right"] += int(correct)
    st.session_state.update(lab_guess_result=(guess, correct), lab_score=score)


def variant_card(name: str, params: dict[str, Any] | None = None) -> None:
    if name == "none":
        st.markdown("**Nothing changed.** K ← [K; k′], V ← [V; v′] at every step and the positions advance: the "
                    "control run. Its evidence must read *clean*; any difference would be floating-point noise.")
        return
    cls = REGISTRY[name]
    setting = ", ".join(f"{k} = {v}" for k, v in (params or {}).items())
    lines = [f"**{cls.title}** ({KIND_LABELS[cls.kind]}{'; ' + setting if setting else ''}) — {cls.description}",
             f"**Changes:** {cls.corrupts}.", f"**Expect:** {cls.symptom}."]
    if cls.positions_note:
        lines.append(f"**Positions after eviction:** {cls.positions_note}.")
    lines.append(f"**Modelled on:** {cls.source} ({citation_markdown(cls)})")
    st.markdown("  \n".join(lines))


def quality_section() -> None:
    """The CLI's measurements of every eviction policy and quantisation, if the script has written them."""
    if not QUALITY.exists():
        return
    data = json.loads(QUALITY.read_text(encoding="utf-8"))
    with st.expander("Quality against memory: every eviction policy and quantisation, measured on held-out Austen"):
        metric = st.segmented_control("Quality", list(fv.QUALITY_METRICS), default="mean_kl", required=True,
                                      format_func=lambda m: fv.QUALITY_METRICS[m], key="lab_quality_metric")
        kit.chart(fv.quality_vs_bytes_figure(data["rows"], metric=metric), "lab_quality")
        st.caption(f"{data['model']} · {data['passages']} passages of {data['tokens']} tokens, teacher-forced · "
                   f"measured {data['measured']} by `python scripts/variant_quality.py` (the same numbers as "
                   "`python -m kvviz evict` / `quantize`). x: the cache's peak bytes for one passage, scales included.")


# -- the page --------------------------------------------------------------------------------------
limits = kvviz.Limits()
lm = kit.require_model("the Bug lab")
mode, settings = sidebar(lm, limits)
if st.session_state.lab_settings != settings:
    run_lab(lm, settings)
else:
    st.session_state.lab_error = None  # the inputs are back to the run on screen

st.title("Bug lab")
st.caption("A broken cache rarely crashes: the model keeps talking, only worse; an approximate one (evicted or "
           "quantised) is worse on purpose, by an amount you can measure. Run either beside the exact cache and find "
           "where, and why, they part.")
if st.session_state.lab_error:
    st.error(st.session_state.lab_error)
d: Diagnosis | None = st.session_state.lab_diag
if d is None:
    st.stop()
if st.session_state.lab_settings != settings:
    st.warning("Showing the previous run: the new settings could not start one (see the error above).")

mystery = mode == MYSTERY and st.session_state.lab_guess_result is None
if mode == PICK:
    with st.expander(f"What `{d.bug}` does", expanded=False):
        variant_card(d.bug, dict(st.session_state.lab_settings.params))
else:
    score = st.session_state.lab_score
    st.info(f"**Mystery mode**: a bug from the catalogue is hidden in the cache (all layers, from prefill). Inspect "
            f"the evidence below, then guess. Score: **{score['right']} / {score['played']}**.",
            icon=":material/search:")


def rows_label(d: Diagnosis, s: int) -> str:
    """How many rows the variant keeps after step s, and attends over when that differs (layer 0)."""
    kept, attended = d.buggy_kept()[s], d.kv[s][0].buggy_len
    return f"{kept} rows kept" + ("" if attended == kept else f", {attended} attended") + f" after step {s}"


def viewer() -> None:
    """Step controls, the two texts, metrics and every evidence view. Reruns alone on clicks and Play ticks."""
    d: Diagnosis = st.session_state.lab_diag
    last = d.steps - 1
    kit.play_tick("lab", PLAY_SECONDS, tick_forward, at_end=lambda: st.session_state.lab_view >= last)
    s = min(st.session_state.lab_view, last)
    playing = st.session_state.lab_playing

    with st.container(horizontal=True, vertical_alignment="bottom", gap="small"):
        st.button("Back", icon=":material/skip_previous:", on_click=tick_back, disabled=s == 0 or playing,
                  key="lab_back")
        st.button("Next step", icon=":material/skip_next:", type="primary", on_click=tick_forward,
                  disabled=s == last or playing, key="lab_next", help="Show both runs one step further.")
        if st.button("Pause" if playing else "Play", icon=":material/pause:" if playing else ":material/play_arrow:",
                     key="lab_play"):
            if not playing and s == last:
                st.session_state.lab_view = 0
            st.session_state.lab_playing = not playing
            st.session_state.lab_last_tick = 0.0
            st.rerun()
        if not playing:
            # no slider while playing: a live slider sends its stale value back and stops Play mid-way
            st.session_state.lab_scrub = s
            st.slider("Shown step (0 = prefill)", 0, last, key="lab_scrub", on_change=on_scrub, width=340)
        st.markdown(f"**step {s} of {last}**", width="content")

    ct, free = d.clean.trace, d.free
    clean_tokens = [x.token for x in ct.steps]
    buggy_tokens = [x.token for x in free.steps] if free is not None else []
    left, right = st.columns(2, gap="large")
    with left:
        st.markdown(f"**Exact cache** · {ct.steps[s].cache_len} rows after step {s}")
        st.html(fv.text_html(ct.prompt_tokens, clean_tokens, buggy_tokens, s))
    with right:
        if mystery:
            label = "Hidden variant"
        elif d.bug == "none":
            label = "Control: the exact cache again"
        else:
            label = f"{d.kind.capitalize()} · `{d.bug}`"
        st.markdown(f"**{label}** · {rows_label(d, s)}")
        st.html(fv.text_html(ct.prompt_tokens, buggy_tokens, clean_tokens, s))
    st.caption("Each run chooses its own tokens with the same sampling: tokens that differ from the other run are red. "
               "The evidence below compares the variant *fed the exact tokens*, so every difference is its own.")

    m = st.columns(5)
    if not d.detected:
        m[0].metric("Verdict", "clean", f"within {d.tolerance.logit:g}", delta_color="green", delta_arrow="off")
    elif mystery:  # the kind would give a trade-off away
        m[0].metric("Verdict", "differs", "beyond float noise", delta_color="red", delta_arrow="off")
    elif d.kind in ("eviction", "quantization"):
        m[0].metric("Verdict", "trade-off", "approximate by design", delta_color="orange", delta_arrow="off")
    else:
        m[0].metric("Verdict", "bug", "beyond float noise", delta_color="red", delta_arrow="off")
    first = d.first_divergence_step
    m[1].metric("Diverges at", "—" if first is None else f"step {first}",
                help=f"First step whose logits differ by more than {d.tolerance.logit:g} or whose cache rows differ.")
    t = d.first_divergent_token_step
    m[2].metric("Other token at", "—" if t is None else f"step {t}",
                None if t is None else f"{ct.steps[t].token!r} → {d.buggy.trace.steps[t].token!r}",
                delta_color="off", delta_arrow="off")
    layer0 = d.first_divergent_layer
    m[3].metric("K/V differ from", "—" if layer0 is None else f"layer {layer0}",
                help="The lowest layer in which any cache row differs from the exact cache.")
    m[4].metric(f"KL at step {s}", f"{d.kl[s]:.2g} nats",
                f"|Δlogit| {d.max_abs_logit_diff[s]:.2g} · top-1 {'agrees' if d.top1_agree[s] else 'differs'}",
                delta_color="off", delta_arrow="off", help="KL(exact ‖ variant) between the next-token distributions.")

    tabs = st.tabs(["Logits", "K/V rows", "Attention", "Cache lengths"])
    with tabs[0]:
        kit.chart(fv.divergence_figure(d.max_abs_logit_diff, d.kl, tolerance=d.tolerance.logit, current_step=s,
                                       first_step=d.first_divergence_step, first_token_step=d.first_divergent_token_step,
                                       top1_agree=d.top1_agree), "lab_logits")
        st.caption("Bars above the dashed grey tolerance are real divergence, below it floating-point noise. KL says "
                   "how far the whole next-token distribution moved, not only the top token (✕: the top token "
                   "differs). Red dotted line: first divergence; red dashed line: first different token; grey band: "
                   "the shown step.")
    with tabs[1]:
        status, holds = d.status_by_layer(s)
        labels = fv.slot_labels(ct.tokens, status.shape[1], d.kv[s][0].offset)
        kit.chart(fv.kv_status_figure(status, [str(i) for i in range(status.shape[0])], labels, holds=holds,
                                      title=f"Every layer's cache at step {s}, slot by slot"), "lab_kv_layers")
        if not mystery and d.held_tokens(0, s) is not None:
            n_tokens, heads = len(ct.prompt_ids) + s, ct.model.num_key_value_heads
            held = [held_mask(d.held_tokens(layer, s), n_tokens, heads) for layer in range(ct.model.num_layers)]
            kit.chart(fv.held_rows_figure(
                np.concatenate(held), ct.tokens[:n_tokens],
                [f"L{layer} · kv{h}" for layer in range(ct.model.num_layers) for h in range(heads)],
                sinks=int(dict(st.session_state.lab_settings.params).get("sinks", 0)),
                title=f"Which tokens each layer and KV head still holds after step {s}"), "lab_held")
        c1, c2 = st.columns([3, 2], gap="large")
        with c1:
            layer = st.selectbox("Layer", list(range(ct.model.num_layers)), index=layer0 or 0, key="lab_kv_layer")
            status, holds = d.status_by_step(layer)
            kit.chart(fv.kv_status_figure(status, [str(i) for i in range(status.shape[0])],
                                          fv.slot_labels(ct.tokens, status.shape[1], d.kv[-1][0].offset), holds=holds,
                                          y_title="step", title=f"Layer {layer}, step by step"), "lab_kv_steps")
        with c2:
            kit.chart(fv.layer_step_figure(d.share_differing(), current_step=s,
                                           title="Share of slots that differ"), "lab_kv_share")
        st.caption("**wrong**: matches no exact row · **shifted**: equals a *different* exact row (written in another "
                   "slot) · **missing**: the exact cache has it, the variant is shorter · **extra**: a row with no exact "
                   "counterpart, in front of or beyond the exact rows · **re-positioned**: the value equals an exact "
                   "row's, the key does not (the token's RoPE position changed). In layer 0 rows depend only on token "
                   "and position: a difference there is the cache's own.")
    with tabs[2]:
        c1, c2 = st.columns(2)
        alayer = c1.selectbox("Layer", list(range(ct.model.num_layers)), key="lab_att_layer")
        head = c2.selectbox("Query head", list(range(ct.model.num_heads)), key="lab_att_head")
        bt = d.buggy.trace
        kit.chart(fv.attention_diff_figure(
            ct.attention_matrix(alayer, head, s), bt.attention_matrix(alayer, head, s),
            query_labels=fv.slot_labels(ct.tokens, len(ct.prompt_ids) + s),
            clean_key_labels=fv.slot_labels(ct.tokens, ct.steps[s].layers[alayer].kv_len),
            buggy_key_labels=fv.slot_labels(ct.tokens, bt.steps[s].layers[alayer].kv_len),
            title=f"Attention of head {head}, layer {alayer}, up to step {s}"), "lab_attention")
        st.caption(f"Largest |Δweight| at step {s}, per layer: "
                   + ", ".join(f"L{i} {v:.2g}" for i, v in enumerate(d.attention[s]))
                   + ". Slots are aligned by index; a missing mask shows as weight above the diagonal at prefill.")
    with tabs[3]:
        kit.chart(fv.lengths_figure(d.clean_lengths, d.buggy_kept(), d.buggy_lengths(), current_step=s), "lab_lengths")
        st.caption("*Kept*: rows the variant stores after the step; *attended*: rows its newest query saw "
                   f"(layer {layer0 or 0}). The exact cache keeps and attends over the same rows, one more per step.")


run_every = PLAY_SECONDS if st.session_state.lab_playing else None
st.fragment(viewer, run_every=run_every)()

# -- the verdict -----------------------------------------------------------------------------------
if mode == PICK:
    st.subheader("Diagnosis")
    st.markdown(plain(d.text))
    quality_section()
else:
    result = st.session_state.lab_guess_result
    if result is None:
        with st.form("lab_guess_form", border=False):
            st.selectbox("Your guess", mystery_candidates(lm), format_func=lambda n: REGISTRY[n].title, key="lab_guess")
            st.form_submit_button("Guess", type="primary", on_click=on_guess, icon=":material/help:")
    else:
        guess, correct = result
        cls = REGISTRY[d.bug]
        if correct:
            st.success(f"Right: it was **{cls.title}**.", icon=":material/check_circle:")
        else:
            st.error(f"Not {REGISTRY[guess].title}: it was **{cls.title}**.", icon=":material/cancel:")
        st.markdown(f"**The clue that gives it away:** {plain(d.clue_text())}")
        variant_card(d.bug)
        with st.expander("The full diagnosis"):
            st.markdown(plain(d.text))
        st.button("Next mystery", icon=":material/casino:", type="primary", on_click=new_mystery, key="lab_next_mystery")
