"""Serving: what an inference server does to the real cache between and across requests — prefix
reuse and chat turns, speculative decoding's rollback, beam search's reorder — each on the loaded
model's own cache with transformers' Cache operations, and checked against a plain run.

Everything kept here is this browser session's own (`kvviz.ui.state`): its prefix store, its
conversation, its runs. The model is the shared, read-only one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import streamlit as st

from kvviz.engine.session import InputError, Limits
from kvviz.figures import serving as fs
from kvviz.serving import defaults as d
from kvviz.serving.beam import beam_search
from kvviz.serving.records import ServedRequest
from kvviz.serving.reuse import Conversation, PrefixStore, serve
from kvviz.serving.speculative import speculate
from kvviz.ui import kit

TITLE = "Serving: reuse, speculate, beam"
kit.page(TITLE)
ss = st.session_state

st.title(TITLE)
st.markdown(
    "A server does more to a KV cache than append: it **reuses** rows another request or an earlier chat turn "
    "computed, **rolls back** rows of draft tokens the model rejected, and **reorders** rows when beams swap "
    "places. Each is done here on the loaded model's real cache with transformers' own operations (`update`, "
    "`crop`, `reorder_cache`, `batch_repeat_interleave`), and each run is checked against a plain one: a cold "
    "prefill, greedy decoding, `generate(num_beams=…)`."
)
lm = kit.require_model("the serving operations")
CAP = Limits().max_new_tokens  # a deployment's KVVIZ_MAX_NEW_TOKENS


def steps_input(label: str, most: int, default: int, key: str) -> int:
    """A new-token count within the deployment's cap."""
    most = min(most, CAP)
    return int(st.number_input(label, 1, most, min(default, most), key=key))


def parity_text(diff: float, same: bool) -> str:
    tokens = "the same tokens" if same else "DIFFERENT tokens"
    if diff <= 1e-5:
        return f"✓ max |Δlogit| {diff:.1e} ≤ 1e-5 against the same prompt run cold; {tokens}"
    if diff <= 1e-4:
        return (f"≈ max |Δlogit| {diff:.1e} against a cold run: float32 noise (rows computed in forwards of other "
                f"shapes round differently; the step page's recompute check sees the same ~1e-5); {tokens}")
    return f"✗ max |Δlogit| {diff:.1e} against a cold run: the reused rows are not this prompt's; {tokens}"


def served_metrics(req: ServedRequest) -> None:
    c = st.columns(4)
    c[0].metric("Prompt rows reused", f"{req.reused_tokens} of {len(req.prompt_ids)}",
                help="rows taken from earlier work instead of computed")
    c[1].metric("Prefill tokens computed", req.computed_tokens)
    c[2].metric("Prefill time", f"{req.prefill_ms:.1f} ms", delta=f"{-req.prefill_ms_saved:+.1f} ms vs cold",
                delta_color="inverse", help=f"cold prefill {req.cold_prefill_ms:.1f} ms (medians; this machine, now)")
    c[3].metric("Parity", f"{req.max_abs_logit_diff:.1e}", help="largest |logit difference| from the same prompt run "
                "cold, over the computed prompt positions and every generated token (float32 noise is ~1e-6)")
    st.caption(parity_text(req.max_abs_logit_diff, req.same_output))


def rows_view(req: ServedRequest, key: str) -> None:
    c = st.columns(2)
    with c[0]:
        layer = kit.picker("Layer", lm.info.num_layers, f"{key}_layer")
    with c[1]:
        kv_head = kit.picker("KV head", lm.info.num_key_value_heads, f"{key}_kv")
    kit.chart(fs.reuse_rows_figure(req, layer, kv_head), f"{key}_rows")


def text_of(ids) -> str:
    return lm.tokenizer.decode(list(ids), skip_special_tokens=True)


# -- reuse ----------------------------------------------------------------------------------------------
def prefix_store_section() -> None:
    st.markdown(
        "**Prefix store, block-hashed as vLLM does.** Each full block of a request's text gets a chained name, "
        "H(previous block's name, the block's tokens), so one name means one whole prefix; after a request runs, "
        "its blocks' K and V rows are stored under those names. The next request walks its own names from the start "
        "and takes rows while they are found (its last token is always computed). SGLang's radix tree would match "
        "token by token instead. The store is this browser session's: nobody else's requests are in it."
    )
    c = st.columns([1, 1, 2])
    block = c[0].selectbox("Block size (tokens)", d.BLOCK_SIZES, index=d.BLOCK_SIZES.index(d.DEFAULT_BLOCK_SIZE),
                           key="serve_block", help="vLLM uses 16; short prompts show more hits with smaller blocks")
    store_key = (lm.name, block)
    fresh = ss.serve_store_key != store_key  # first visit, another block size or another model
    if c[1].button("Empty the store", icon=":material/delete:") or fresh:
        ss.serve_store, ss.serve_store_key = PrefixStore(block), store_key  # rows of another model never serve this one
    store: PrefixStore = ss.serve_store
    with st.form("serve_reuse_form"):
        prompt = st.text_area("Request", d.NEXT_REQUEST, height=80, key="serve_reuse_prompt")
        steps = steps_input("Tokens to generate", 64, 8, "serve_reuse_steps")
        sent = st.form_submit_button("Send the request", type="primary", icon=":material/send:")
    try:
        if fresh:  # two requests that share a system prompt, to start from
            with kit.model_work("Serving two requests"), st.spinner("Serving two requests…"):
                for text in d.REQUESTS:
                    serve(lm, store, text, min(8, CAP))
        elif sent:
            with kit.model_work("Serving"), st.spinner("Serving…"):
                serve(lm, store, prompt, steps)
    except InputError as e:
        st.error(str(e))
    if store.served:
        names = [r.name for r in store.served]
        shown = st.selectbox("Request shown", names, index=len(names) - 1, key=f"serve_shown_{len(names)}")
        req = store.served[names.index(shown)]
        served_metrics(req)
        st.text(f"{req.name} generated: {text_of(req.output_ids)!r}")
        kit.chart(fs.block_table_figure(store.served), "serve_blocks")
        st.caption(f"Green: rows served from the store (the request that computed them is in the hover); blue: computed "
                   f"and stored; pale: computed, already stored; grey: a partial last block, never stored. The store holds "
                   f"{len(store)} blocks ({store.nbytes() / 1024:,.1f} KiB of K and V; at most {store.max_blocks} blocks, "
                   "least recently used evicted first).")
        rows_view(req, "serve_reuse")
        st.caption("The request's cache after its prefill: green rows came from the store, blue ones were computed. The "
                   "right column is each row's largest difference from a cold prefill of the same prompt, over all layers: "
                   "float32 noise (~1e-6), because a row depends only on the tokens before it.")


def chat_section() -> None:
    st.markdown("**Chat turns.** Each turn continues from the previous turn's cache: only the reply's last token (never "
                "fed) and the new message are computed.")
    first_chat = ss.serve_chat is None or ss.serve_chat_model != lm.name
    if first_chat:
        ss.serve_chat, ss.serve_chat_model = Conversation(lm), lm.name
    chat: Conversation = ss.serve_chat
    if first_chat:  # first visit: a two-turn conversation
        try:
            with st.spinner("Two chat turns…"):
                for text in d.CHAT_TURNS:
                    chat.say(text, min(10, CAP))
        except InputError as e:
            st.error(str(e))
    with st.form("serve_chat_form"):
        message = st.text_input("Next message" if chat.turns else "First message",
                                d.CHAT_TURNS[min(len(chat.turns), 1)], key=f"serve_chat_msg_{len(chat.turns)}")
        c = st.columns([1, 1, 2])
        with c[0]:
            chat_steps = steps_input("Reply tokens", 64, 10, "serve_chat_steps")
        said = c[1].form_submit_button("Send", type="primary", icon=":material/send:")
    if st.button("New conversation", icon=":material/restart_alt:"):
        ss.serve_chat = chat = Conversation(lm)
    try:
        if said:
            with st.spinner("Replying…"):
                chat.say(message, chat_steps)
    except InputError as e:
        st.error(str(e))
    for turn in chat.turns:
        with st.chat_message("user"):
            st.text(text_of(turn.prompt_ids[turn.reused_tokens + (1 if turn.reused_tokens else 0):]))
        with st.chat_message("assistant"):
            st.text(text_of(turn.output_ids))
    if chat.turns:
        last = chat.turns[-1]
        served_metrics(last)
        rows_view(last, "serve_chat")

def reuse_section() -> None:
    prefix_store_section()
    st.divider()
    chat_section()


def run_once(name: str, key: tuple, label: str, compute: Callable[[], Any]) -> Any:
    """The result kept in `serve_{name}` for these inputs (`key`), computed through the fair queue
    only when the inputs changed; None (and the reason shown) when they cannot run."""
    if ss[f"serve_{name}_key"] != key:
        try:
            with kit.model_work(label), st.spinner(f"{label}…"):
                ss[f"serve_{name}"] = compute()
            ss[f"serve_{name}_key"] = key
        except InputError as e:
            st.error(str(e))
    return ss[f"serve_{name}"] if ss[f"serve_{name}_key"] == key else None


# -- speculative decoding -------------------------------------------------------------------------------
def speculate_section() -> None:
    st.markdown(
        "**Draft, verify, roll back.** Prompt lookup drafts up to *k* tokens with no second model: it finds the text's "
        "last n-gram earlier in the text and proposes what followed. One forward over [last token, drafts] appends "
        "1 + *k* rows and gives the model's own choice after each; the drafts it agrees with are kept, then its own "
        "next token, and `cache.crop(-rejected)` removes the rows of the rest. Greedy, so the text equals plain "
        "greedy decoding — checked below."
    )
    with st.form("serve_spec_form"):
        spec_prompt = st.text_area("Prompt", d.SPECULATE_PROMPT, height=80, key="serve_spec_prompt")
        c = st.columns(3)
        with c[0]:
            spec_steps = steps_input("Tokens to generate", 128, 48, "serve_spec_steps")
        k = c[1].number_input("Draft tokens k", 1, d.MAX_DRAFT_TOKENS, d.DEFAULT_DRAFT_TOKENS, key="serve_spec_k")
        ngram = c[2].number_input("Longest n-gram looked up", 1, 4, d.DEFAULT_MAX_NGRAM, key="serve_spec_ngram")
        st.form_submit_button("Run", type="primary", icon=":material/play_arrow:")
    run = run_once("spec", (lm.name, spec_prompt, spec_steps, int(k), int(ngram)), "Speculating",
                   lambda: speculate(lm, spec_prompt, spec_steps, int(k), max_ngram=int(ngram)))
    if run is not None:
        c = st.columns(4)
        c[0].metric("Acceptance", "–" if run.acceptance_rate is None else f"{run.acceptance_rate:.0%}",
                    help=f"{run.accepted} of {run.proposed} drafted tokens")
        c[1].metric("Rows rolled back", run.rolled_back_rows, help="appended by a verifying forward, then cropped")
        c[2].metric(f"Forwards for {len(run.generated_ids)} tokens", 1 + len(run.steps),
                    help="prefill + one verifying forward per step; plain greedy decoding needs one forward per token")
        c[3].metric("Decode time", f"{run.spec_ms:.0f} ms", delta=f"{run.spec_ms - run.greedy_ms:+.0f} ms vs greedy",
                    delta_color="inverse")
        st.caption("✓ the same tokens as plain greedy decoding" if run.matches_greedy else
                    "✗ differs from plain greedy decoding (float ties between the two paths)")
        st.text(f"generated: {text_of(run.generated_ids)!r}")
        kit.chart(fs.speculation_figure(run), "serve_spec_rows")
        st.caption("One cell per cache row (16 to a line). Press Play or drag the slider: at “3↑” step 3's forward appended "
                   "the last token and the drafts (green: accepted, red: rejected); at “3↓” `crop` took the red rows off. "
                   "Grey: the prompt; blue: generated text already in the cache.")
        kit.chart(fs.acceptance_figure(run), "serve_spec_acceptance")
        with st.expander("Every step"):
            st.dataframe([{"step": s.step, "drafted": text_of(s.draft_ids), "accepted": s.accepted,
                           "cache rows": f"{s.cache_len_before} → {s.cache_len_verified} → {s.cache_len_after}",
                           "added": text_of(s.new_ids), "ms": round(s.time_ms, 2)} for s in run.steps], hide_index=True)

# -- beam search ----------------------------------------------------------------------------------------
def beam_section() -> None:
    st.markdown(
        "**Beams share the prompt, then swap.** The prompt is prefilled once and `batch_repeat_interleave(n)` gives "
        "every beam slot its rows. Each step keeps the *n* best continuations; slot *b* now continues the text of slot "
        "beam_idx[*b*], so `reorder_cache(beam_idx)` copies that slot's rows into slot *b*. The best sequence equals "
        "`model.generate(num_beams=n, do_sample=False)`'s."
    )
    with st.form("serve_beam_form"):
        beam_prompt = st.text_area("Prompt", kit.DEFAULT_PROMPT, height=68, key="serve_beam_prompt")
        c = st.columns(2)
        beams = c[0].number_input("Beams", 1, d.MAX_BEAMS, 3, key="serve_beam_n")
        with c[1]:
            beam_steps = steps_input("Most new tokens", 64, 12, "serve_beam_steps")
        st.form_submit_button("Run", type="primary", icon=":material/play_arrow:")
    br = run_once("beam", (lm.name, beam_prompt, int(beams), beam_steps), "Searching",
                  lambda: beam_search(lm, beam_prompt, int(beams), beam_steps))
    if br is not None:
        stored = br.num_beams * br.steps[-1].cache_shape[1]
        c = st.columns(3)
        c[0].metric("Best score", f"{br.beams[0].score:.4f}", help="sum of log-probabilities / length (generate's ranking)")
        c[1].metric("Cache at the end", f"{br.num_beams} × {br.steps[-1].cache_shape[1]} rows",
                    help=f"{br.cache_bytes:,} bytes: DynamicCache holds a copy of every row per beam")
        c[2].metric("Distinct rows", f"{br.distinct_rows()} of {stored}",
                    help="what a copy-on-write (paged) cache would hold: shared history stored once")
        st.text(f"best: {text_of(br.generated_ids)!r}")
        kit.chart(fs.beam_tree_figure(br), "serve_beam_tree")
        kit.chart(fs.beam_cache_figure(br), "serve_beam_cache")
        st.caption("One line per beam slot, one cell per cached row, after each step's reorder. A cell's colour is the slot "
                   "whose forward computed that row (grey: the prompt, prefilled once): equal colours down a column are "
                   "copies of one row, the history those beams share. Press Play to watch rows copied between slots.")
        st.dataframe([{"rank": i + 1, "score": round(h.score, 4), "tokens": len(h.ids), "text": text_of(h.ids)}
                      for i, h in enumerate(br.beams)], hide_index=True)


# Only the open tab runs (its runs are kept in this session's state); the tab is in the URL (?tab=Beam).
SECTIONS = {"Reuse": reuse_section, "Speculate": speculate_section, "Beam": beam_section}
for tab, section in zip(st.tabs(list(SECTIONS), key="tab", on_change="rerun", bind="query-params"), SECTIONS.values()):
    with tab:
        if tab.open:
            section()
