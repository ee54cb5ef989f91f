"""Paged & shared prefix: the serving incidents as guided scenarios. Each poses a question, runs the
same request stream through the server as it was (before) and through the knobs the reader turns
(after), and compares memory over time, queueing, time to first token and preemptions.
"""

from __future__ import annotations

import dataclasses

import streamlit as st

from kvviz.economics import memory as mem
from kvviz.economics import paged
from kvviz.engine.models import ModelLoadError
from kvviz.figures import paged as fp
from kvviz.geometry import CACHE_DTYPES, human_bytes, kv_geometry
from kvviz.ui import kit

kit.page("Paged & shared prefix")

MAX_ANIMATED_BLOCKS = 512  # drawn in the animated block table at most (browser render time)
LOWER_IS_BETTER_NOT = {"peak running requests", "prefix hit tokens", "output tokens / s"}

st.title("Paged & shared-prefix caches: serving incidents")
st.markdown(
    "A serving engine hands its KV memory to many requests at once. How it hands it out (contiguous "
    "reservations or **paged** blocks, **shared prefixes** or copies) and what it does when memory runs out "
    "(**preempt** and recompute, or **swap** to CPU memory; **chunk** long prefills; **admit** fewer) decides "
    "how many requests run, how long users wait for a first token, and whether running answers freeze. "
    "Pick an incident, read the question, then turn the knobs on the right until *after* beats *before*."
)

linked = st.query_params.get("scenario")  # kit.paged_link (e.g. from a quiz answer) opens one incident
if linked in paged.SCENARIOS and st.session_state.get("paged_linked") != linked:
    st.session_state.paged_linked = st.session_state["paged_scenario"] = linked  # once: the picker stays free after
key = st.selectbox("Incident", list(paged.SCENARIOS), format_func=lambda k: paged.SCENARIOS[k].title,
                   key="paged_scenario")
sc = paged.SCENARIOS[key]
st.info(sc.question, icon=":material/help:")


def k(name: str) -> str:
    """Widget keys per scenario: each starts from its own incident."""
    return f"paged_{key}_{name}"


# -- bytes per token: the loaded model or a preset --------------------------------------------
specs: dict[str, mem.ModelSpec] = {}
try:
    lm = kit.current_model()
    specs[f"loaded model: {lm.name}"] = mem.spec_from_model(lm.model, lm.name)
except ModelLoadError:
    pass
for name, path in mem.preset_configs().items():
    specs[name] = mem.ModelSpec(name, kv_geometry(mem.read_config_file(path)))
names = list(specs)
c = st.columns([2, 1])
which = c[0].selectbox("Bytes per token from", names, index=names.index("llama-3-8b"), key="paged_model",
                       help="sets the MiB on the charts and how long a swap over PCIe takes; the incident itself "
                            "is in tokens")
dtype = c[1].selectbox("Cache dtype", CACHE_DTYPES, index=1, key="paged_dtype")
bpt = specs[which].geometry.bytes_per_token(dtype)

# -- the traffic: the same for before and after -------------------------------------------------
w = sc.workload
with st.expander("The traffic and the memory (the same before and after)"):
    c = st.columns(4)
    n_requests = c[0].number_input("Requests", 1, 500, w.n_requests, key=k("n"))
    rate = c[1].number_input("Arrivals per second", 0.1, 1000.0, float(w.arrival_rate), 0.5, key=k("rate"))
    budget = c[2].number_input("KV memory (tokens)", 16, 200_000, sc.before.budget_tokens, 1000, key=k("budget"),
                               help="what is left for the cache after the weights, in tokens of this model")
    seed = c[3].number_input("Seed", 0, 2**31 - 1, w.seed, key=k("seed"))
    c = st.columns(4)
    system = c[0].number_input("System prompt tokens", 0, 8192, w.system_prompt_tokens, key=k("system"))
    n_systems = c[1].number_input("Distinct system prompts", 1, 8, w.n_system_prompts, key=k("n_systems"))
    shared = c[2].slider("Share with a system prompt", 0.0, 1.0, float(w.shared_fraction), 0.05, key=k("shared"))
    max_new = c[3].number_input("Clients' max_new_tokens", 1, 8192, w.max_new_tokens, key=k("max_new"))
    c = st.columns(4)
    user = c[0].slider("User turn tokens", 1, 1024, w.user_tokens, key=k("user"))
    out = c[1].slider("Output tokens", 1, 2048, w.output_tokens, key=k("out"))
    long_prompt = c[2].slider("Share pasting a document", 0.0, 1.0, float(w.long_prompt_fraction), 0.05,
                              key=k("long_prompt"))
    long_out = c[3].slider("Share writing a long answer", 0.0, 1.0, float(w.long_output_fraction), 0.05,
                           key=k("long_out"))
    c = st.columns(4)
    doc = c[0].slider("Document tokens", 1, 16_384, w.long_prompt_tokens, key=k("doc"))
    long_len = c[1].slider("Long answer tokens", 1, 8192, w.long_output_tokens, key=k("long_len"))
st.caption(f"{which}: {bpt:,} B per token in {dtype}, so the KV memory of {int(budget):,} tokens is "
           f"{human_bytes(int(budget) * bpt)}.")

# -- before (the incident) and after (the reader's knobs) ---------------------------------------
ALLOC_LABELS = {"paged": "paged blocks", "contiguous": "contiguous"}


def knobs_from(server: paged.Server) -> dict[str, object]:
    """Widget values that reproduce `server`."""
    return {k("alloc"): server.allocator, k("block"): server.block_size, k("share"): server.prefix_sharing,
            k("reserve"): server.reserve == "max_new_tokens", k("cap"): server.max_new_tokens_cap or 0,
            k("preempt"): server.preemption, k("swap"): server.swap_space_tokens, k("chunked"): server.chunked_prefill,
            k("batched"): server.max_batched_tokens, k("running"): server.max_running}


def load_knobs(server: paged.Server, reveal: bool) -> None:
    st.session_state.update(knobs_from(server))
    st.session_state[k("revealed")] = reveal


for name, value in knobs_from(sc.before).items():  # a first visit starts from the incident
    st.session_state.setdefault(name, value)

try:
    before = dataclasses.replace(sc.before, budget_tokens=int(budget))
except ValueError as e:  # a budget smaller than the incident's block
    st.error(str(e))
    st.stop()
left, right = st.columns(2)
with left:
    st.markdown("**Before: the server as it was**")
    st.markdown("\n".join(f"- **{a}**: {b}" for a, b in before.describe().items()))  # kvviz's own words
with right:
    st.markdown("**After: your settings**")
    c = st.columns(2)
    alloc = c[0].segmented_control("Memory", list(ALLOC_LABELS), format_func=ALLOC_LABELS.get, required=True,
                                   key=k("alloc"))
    block = c[1].selectbox("Block size B (tokens)", [8, 16, 32, 64, 128, 256], key=k("block"))
    c = st.columns(2)
    share = c[0].toggle("Prefix sharing", key=k("share"), disabled=alloc == "contiguous")
    reserve = c[1].toggle("Reserve max_new_tokens", key=k("reserve"), disabled=alloc == "contiguous",
                          help="admit a request only when its prompt + max_new_tokens fit beside every running "
                               "request's reservation (contiguous memory always reserves it)")
    c = st.columns(2)
    preempt = c[0].segmented_control("Preemption", list(paged.PREEMPTION), required=True, key=k("preempt"))
    swap = c[1].number_input("CPU swap space (tokens)", 0, 1_000_000, step=1000, key=k("swap"),
                             disabled=preempt != "swap")
    c = st.columns(2)
    chunked = c[0].toggle("Chunked prefill", key=k("chunked"))
    batched = c[1].number_input("Tokens per step (max_num_batched_tokens)", 16, 65_536, step=256, key=k("batched"))
    c = st.columns(2)
    cap = c[0].number_input("Server max_new_tokens cap (0 = the client's)", 0, 8192, step=64, key=k("cap"))
    running = c[1].number_input("Most requests running (max_num_seqs)", 1, 1024, key=k("running"))
    c = st.columns(2)
    c[0].button("Show a fix", icon=":material/lightbulb:", on_click=load_knobs, args=(sc.fix, True), key=k("fix_btn"))
    c[1].button("Back to the incident", icon=":material/undo:", on_click=load_knobs, args=(sc.before, False),
                key=k("reset_btn"))

try:
    workload = paged.Workload(
        n_requests=int(n_requests), system_prompt_tokens=int(system), n_system_prompts=int(n_systems),
        shared_fraction=float(shared), user_tokens=tuple(user), output_tokens=tuple(out), max_new_tokens=int(max_new),
        arrival_rate=float(rate), long_prompt_fraction=float(long_prompt), long_prompt_tokens=tuple(doc),
        long_output_fraction=float(long_out), long_output_tokens=tuple(long_len), seed=int(seed),
    )
    after = paged.Server(
        budget_tokens=int(budget), allocator=alloc, block_size=int(block), prefix_sharing=bool(share) and alloc == "paged",
        reserve="max_new_tokens" if reserve and alloc == "paged" else "none", max_new_tokens_cap=int(cap) or None,
        preemption=preempt, swap_space_tokens=int(swap), chunked_prefill=bool(chunked), max_batched_tokens=int(batched),
        max_running=int(running),
    )
except ValueError as e:
    st.error(str(e))
    st.stop()

runs = {"before": before, "after": after}
sim_key = (workload, before, after, bpt)
if st.session_state.paged_key != sim_key:
    animate = all(s.budget_tokens // s.block_size <= MAX_ANIMATED_BLOCKS for s in runs.values())
    with st.spinner("Simulating both servers…"):
        results = paged.compare(workload.requests(), runs, bpt, cells=animate)
        st.session_state.paged_results = results
        st.session_state.paged_figures = {
            "time": fp.over_time(results), "ttft": fp.ttft(results), "where": fp.where_memory_goes(results),
            "blocks": fp.block_tables(results) if animate else None,
        }
    st.session_state.paged_key = sim_key
results: dict[str, paged.SimResult] = st.session_state.paged_results
figs = st.session_state.paged_figures

st.subheader("What changed")
for label, r in results.items():
    (st.warning if r.stopped_at_limit else st.caption)(f"**{label}**: {r.done_line()}")
summaries = {label: r.summary() for label, r in results.items()}
m = st.columns(len(sc.watch))
for col, measure in zip(m, sc.watch):
    b, a = summaries["before"][measure], summaries["after"][measure]
    col.metric(measure, f"{a:,}", delta=f"{a - b:,.1f}" if isinstance(a, float) else f"{a - b:,}",
               delta_color="normal" if measure in LOWER_IS_BETTER_NOT else "inverse",
               help=f"before: {b:,}; after: {a:,}")
if st.session_state.get(k("revealed")):
    st.success(sc.why, icon=":material/lightbulb:")
else:
    st.caption("Turn a knob on the right (or press **Show a fix**): the numbers above compare your settings with "
               "the incident.")

# one type per column (Arrow): numbers as text with thousands separators
st.dataframe([{c: v if isinstance(v, str) else f"{v:,}" for c, v in row.items()} for row in paged.summary_table(results)],
             hide_index=True, height="content")
kit.chart(figs["time"], "paged_time")
st.caption("Top: KV memory held (solid) and actually written (dotted) against the budget. Middle: requests "
           "running (solid) and queued (dotted). Bottom: preemptions so far (solid), of which swaps to CPU (dotted).")
kit.chart(figs["ttft"], "paged_ttft")
st.caption("Time to first token of every request, from arrival: the further left the line, the sooner users see "
           "text; the right end is the slowest request. The step durations come from a simple cost model "
           f"(a step: {paged.StepCost().fixed_ms:g} ms + {paged.StepCost().prefill_ms_per_token:g} ms per prompt "
           f"token + {paged.StepCost().decode_ms_per_request:g} ms per running request + swap bytes at "
           f"{paged.StepCost().pcie_gb_per_s:g} GB/s), not a measurement.")
kit.chart(figs["where"], "paged_where")
st.caption("Internal fragmentation: slots held but not written (contiguous: the unused tail up to max_new_tokens; "
           "paged: the last block's empty slots). External: free slots outside the largest free hole, where a new "
           "contiguous reservation cannot go. Paged blocks have none: any free block serves anyone.")

st.subheader("The block table, over time")
if figs["blocks"] is None:
    st.info(f"The animation draws memories of up to {MAX_ANIMATED_BLOCKS} blocks; this one has "
            f"{max(s.budget_tokens // s.block_size for s in runs.values()):,}. Raise the block size or lower the KV "
            "memory to see it.")
else:
    kit.chart(figs["blocks"], "paged_blocks")
    st.caption("One cell = one block of B token slots (contiguous: one B-slot stretch of its arena). Colour = the "
               "request holding it (R7 = request 7), pale where it is reserved but not yet written; dark cells "
               "marked ×n are shared by n requests (reference count n); grey 'c' = a cached prefix block nobody "
               "holds (evictable); blank = free. Press Play or drag the slider.")
