"""Bug lab: break the KV cache on purpose, run it beside the correct one, and find where they part.

A run here is a `kvviz.variants.diagnose.Diagnosis`: the clean run, the buggy run teacher-forced on the
clean tokens (so every difference is the bug's own), and the buggy run left to itself (the text a
user would see). The slider and Play step through both runs together; nothing is recomputed.
Mystery mode hides a random bug from the catalogue and scores the user's guesses.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import streamlit as st

import kvviz
from kvviz.figures import bugs as fb
from kvviz.ui import kit
from kvviz.variants.bugs import REGISTRY
from kvviz.variants.diagnose import DEFAULT_STEPS, Diagnosis, diagnose

kit.page("Bug lab")

PLAY_SECONDS = 0.7
PICK, MYSTERY = "Pick a bug", "Mystery"



class LabSettings(NamedTuple):
    """What a diagnosis is made of; any change reruns it (a NamedTuple survives script reruns)."""

    model: str
    prompt: str
    steps: int
    bug: str
    layers: tuple[int, ...] | None
    start_step: int
    sampling: kvviz.Sampling


def mystery_candidates(lm: kvviz.LoadedModel) -> list[str]:
    """Bugs that can show on this model (a head mapping cannot be wrong with a single KV head)."""
    names = list(REGISTRY)
    if lm.info.num_key_value_heads == 1:
        names.remove("gqa_wrong_head")
    return names


def new_mystery() -> None:
    lm = kit.current_model()
    rng = st.session_state.lab_rng or random.Random()
    st.session_state.lab_rng = rng
    previous = st.session_state.lab_mystery
    choices = [n for n in mystery_candidates(lm) if n != previous]
    st.session_state.update(lab_mystery=rng.choice(choices), lab_guess_result=None, lab_view=0, lab_playing=False)


def bug_title(name: str) -> str:
    return "Correct cache (control: nothing injected)" if name == "none" else REGISTRY[name].title


def sidebar(lm: kvviz.LoadedModel, limits: kvviz.Limits) -> tuple[str, LabSettings]:
    with st.sidebar:
        st.markdown("### Bug lab")
        mode = st.segmented_control("Mode", [PICK, MYSTERY], default=PICK, required=True, key="lab_mode",
                                    help="Mystery hides a random bug: inspect the evidence, then guess.")
        prompt = st.text_area("Prompt", kit.DEFAULT_PROMPT, key="lab_prompt", height=80)
        most = max(2, min(64, limits.max_new_tokens))  # a deployment cap may sit below the default
        steps = int(st.number_input("New tokens", 2, most, min(DEFAULT_STEPS, most), key="lab_steps",
                                    help="Steps in each run; prefill is step 0."))
        layers: tuple[int, ...] | None = None
        start = 0
        if mode == PICK:
            bug = st.selectbox("Bug", [*REGISTRY, "none"], format_func=bug_title, key="lab_bug",
                               help="The last entry injects nothing: the control that must never be flagged.")
            chosen = st.multiselect("Layers", list(range(lm.info.num_layers)), default=list(range(lm.info.num_layers)),
                                    key="lab_layers", help="Inject the bug only in these layers.")
            layers = None if len(chosen) in (0, lm.info.num_layers) else tuple(sorted(chosen))
            if not chosen:
                st.warning("No layer picked: the bug is injected in every layer.")
            start = int(st.number_input("Start step", 0, steps - 1, 0, key="lab_start",
                                        help="The bug acts from this step on (0 = from prefill)."))
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
    return mode, LabSettings(st.session_state["model_name"], prompt, steps, bug, layers, start, sampling)


def run_lab(lm: kvviz.LoadedModel, settings: LabSettings) -> None:
    """Diagnose with the new settings; on bad input keep the previous diagnosis and say why."""
    try:
        d = diagnose(lm, settings.bug, settings.prompt, settings.steps, layers=list(settings.layers or []) or None,
                     start_step=settings.start_step, sampling=settings.sampling)
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




def bug_card(name: str) -> None:
    if name == "none":
        st.markdown("**Nothing injected.** K ← [K; k′], V ← [V; v′] at every step and the positions advance: the "
                    "control run. Its evidence must read *clean*; any difference would be floating-point noise.")
        return
    cls = REGISTRY[name]
    links = " · ".join(f"[{u.split('github.com/')[-1]}]({u})" for u in cls.source_urls)
    kind = " *(a trade-off, not a bug)*" if cls.kind == "tradeoff" else ""
    st.markdown(f"**{cls.title}**{kind} — {cls.description}  \n"
                f"**Corrupts:** {cls.corrupts}.  \n**Expect:** {cls.symptom}.  \n"
                f"**Seen in the wild:** {cls.source} ({links})")


# -- the page --------------------------------------------------------------------------------------
limits = kvviz.Limits()
lm = kit.require_model("the Bug lab")
mode, settings = sidebar(lm, limits)
if st.session_state.lab_settings != settings:
    run_lab(lm, settings)
else:
    st.session_state.lab_error = None  # the inputs are back to the run on screen

st.title("Bug lab")
st.caption("A cache bug rarely crashes: the model keeps talking, only worse. Run a deliberately broken cache beside "
           "the correct one and find where, and why, they part.")
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
        bug_card(d.bug)
else:
    score = st.session_state.lab_score
    st.info(f"**Mystery mode**: a bug from the catalogue is hidden in the cache (all layers, from prefill). Inspect "
            f"the evidence below, then guess. Score: **{score['right']} / {score['played']}**.",
            icon=":material/search:")


def viewer() -> None:
    """Step controls, the two texts, metrics and every evidence view. Reruns alone on clicks and Play ticks."""
    d: Diagnosis = st.session_state.lab_diag
    last = d.steps - 1
    kit.play_tick("lab", PLAY_SECONDS, tick_forward, at_end=lambda: st.session_state.lab_view >= last)
    s = min(st.session_state.lab_view, last)
    playing = st.session_state.lab_playing

    with st.container(horizontal=True, vertical_alignment="bottom", gap="small"):
        st.button("Back", icon=":material/skip_previous:", on_click=tick_back, disabled=s == 0, key="lab_back")
        st.button("Next step", icon=":material/skip_next:", type="primary", on_click=tick_forward,
                  disabled=s == last, key="lab_next", help="Show both runs one step further.")
        if st.button("Pause" if playing else "Play", icon=":material/pause:" if playing else ":material/play_arrow:",
                     key="lab_play"):
            if not playing and s == last:
                st.session_state.lab_view = 0
            st.session_state.lab_playing = not playing
            st.session_state.lab_last_tick = 0.0
            st.rerun()
        st.session_state.lab_scrub = s
        st.slider("Shown step (0 = prefill)", 0, last, key="lab_scrub", on_change=on_scrub, width=340)

    ct, free = d.clean.trace, d.free
    clean_tokens = [x.token for x in ct.steps]
    buggy_tokens = [x.token for x in free.steps] if free is not None else []
    left, right = st.columns(2, gap="large")
    with left:
        st.markdown(f"**Clean cache** · {ct.steps[s].cache_len} rows cached after step {s}")
        st.html(fb.text_html(ct.prompt_tokens, clean_tokens, buggy_tokens, s))
    with right:
        label = "Hidden bug" if mystery else f"Buggy cache · `{d.bug}`"
        kept = d.buggy_kept()[s]
        st.markdown(f"**{label}** · {kept} rows cached after step {s}")
        st.html(fb.text_html(ct.prompt_tokens, buggy_tokens, clean_tokens, s))
    st.caption("Each run chooses its own tokens with the same sampling: tokens that differ from the other run are red. "
               "The evidence below compares the buggy cache *fed the clean tokens*, so every difference is the bug's own.")

    m = st.columns(5)
    if not d.detected:
        m[0].metric("Verdict", "clean", f"within {d.tolerance.logit:g}", delta_color="green", delta_arrow="off")
    elif mystery:  # the kind would give a trade-off away
        m[0].metric("Verdict", "differs", "beyond float noise", delta_color="red", delta_arrow="off")
    elif d.kind == "tradeoff":
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
                help="The lowest layer in which any cache row differs from the clean cache.")
    m[4].metric(f"KL at step {s}", f"{d.kl[s]:.2g} nats", f"max |Δlogit| {d.max_abs_logit_diff[s]:.2g}",
                delta_color="off", delta_arrow="off", help="KL(clean ‖ buggy) between the two next-token distributions.")

    tabs = st.tabs(["Logits", "K/V rows", "Attention", "Cache lengths"])
    with tabs[0]:
        kit.chart(fb.divergence_figure(d.max_abs_logit_diff, d.kl, tolerance=d.tolerance.logit, current_step=s,
                                   first_step=d.first_divergence_step, first_token_step=d.first_divergent_token_step),
              "lab_logits")
        st.caption("Bars above the dashed grey tolerance are real divergence, below it floating-point noise. KL says "
                   "how far the whole next-token distribution moved, not only the top token. Red dotted line: first "
                   "divergence; red dashed line: first different token; grey band: the shown step.")
    with tabs[1]:
        status, holds = d.status_by_layer(s)
        labels = fb.slot_labels(ct.tokens, status.shape[1], d.kv[s][0].offset)
        kit.chart(fb.kv_status_figure(status, [str(i) for i in range(status.shape[0])], labels, holds=holds,
                                  title=f"Every layer's cache at step {s}, slot by slot"), "lab_kv_layers")
        c1, c2 = st.columns([3, 2], gap="large")
        with c1:
            layer = st.selectbox("Layer", list(range(ct.model.num_layers)), index=layer0 or 0, key="lab_kv_layer")
            status, holds = d.status_by_step(layer)
            kit.chart(fb.kv_status_figure(status, [str(i) for i in range(status.shape[0])],
                                      fb.slot_labels(ct.tokens, status.shape[1], d.kv[-1][0].offset), holds=holds,
                                      y_title="step",
                                      title=f"Layer {layer}, step by step"), "lab_kv_steps")
        with c2:
            kit.chart(fb.layer_step_figure(d.share_differing(), current_step=s,
                                       title="Share of slots that differ"), "lab_kv_share")
        st.caption("**wrong**: matches no clean row · **shifted**: equals a *different* clean row (written in the wrong "
                   "slot) · **missing**: the clean cache has it, the buggy one is shorter · **extra**: a row with no clean "
                   "counterpart, in front of or beyond the clean rows. In layer 0 rows depend only on token and "
                   "position: a difference there is the cache's own.")
    with tabs[2]:
        c1, c2 = st.columns(2)
        alayer = c1.selectbox("Layer", list(range(ct.model.num_layers)), key="lab_att_layer")
        head = c2.selectbox("Query head", list(range(ct.model.num_heads)), key="lab_att_head")
        bt = d.buggy.trace
        kit.chart(fb.attention_diff_figure(
            ct.attention_matrix(alayer, head, s), bt.attention_matrix(alayer, head, s),
            query_labels=fb.slot_labels(ct.tokens, len(ct.prompt_ids) + s),
            clean_key_labels=fb.slot_labels(ct.tokens, ct.steps[s].layers[alayer].kv_len),
            buggy_key_labels=fb.slot_labels(ct.tokens, bt.steps[s].layers[alayer].kv_len),
            title=f"Attention of head {head}, layer {alayer}, up to step {s}"), "lab_attention")
        st.caption(f"Largest |Δweight| at step {s}, per layer: "
                   + ", ".join(f"L{i} {v:.2g}" for i, v in enumerate(d.attention[s]))
                   + ". Slots are aligned by index; a missing mask shows as weight above the diagonal at prefill.")
    with tabs[3]:
        kit.chart(fb.lengths_figure(d.clean_lengths, d.buggy_kept(), d.buggy_lengths(), current_step=s), "lab_lengths")
        st.caption("*Kept*: rows the buggy cache stores after the step; *attended*: rows its newest query saw "
                   f"(layer {layer0 or 0}). A correct cache keeps and attends over the same rows, one more per step.")


run_every = PLAY_SECONDS if st.session_state.lab_playing else None
st.fragment(viewer, run_every=run_every)()

# -- the verdict -----------------------------------------------------------------------------------
if mode == PICK:
    st.subheader("Diagnosis")
    st.markdown(d.text)
else:
    result = st.session_state.lab_guess_result
    if result is None:
        with st.form("lab_guess_form", border=False):
            st.selectbox("Your guess", list(REGISTRY), format_func=lambda n: REGISTRY[n].title, key="lab_guess")
            st.form_submit_button("Guess", type="primary", on_click=on_guess, icon=":material/help:")
    else:
        guess, correct = result
        cls = REGISTRY[d.bug]
        if correct:
            st.success(f"Right: it was **{cls.title}**.", icon=":material/check_circle:")
        else:
            st.error(f"Not {REGISTRY[guess].title}: it was **{cls.title}**.", icon=":material/cancel:")
        st.markdown(f"**The clue that gives it away:** {d.clue_text()}")
        bug_card(d.bug)
        with st.expander("The full diagnosis"):
            st.markdown(d.text)
        st.button("Next mystery", icon=":material/casino:", type="primary", on_click=new_mystery, key="lab_next_mystery")
