"""Paged & shared-prefix caches: a serving cache under a stream of chat requests that share a
system prompt, simulated three ways on the same memory budget (contiguous reservations, paged
blocks, paged blocks with prefix sharing), with bytes per token from a real model's geometry.
"""

from __future__ import annotations

import streamlit as st

from kvviz.economics import memory as mem
from kvviz.economics import paged
from kvviz.engine.models import ModelLoadError
from kvviz.figures import paged as fp
from kvviz.geometry import CACHE_DTYPES, kv_geometry
from kvviz.ui import kit

kit.page("Paged & shared prefix")

MAX_BLOCKS = 4096  # simulated at most (a few seconds)
MAX_ANIMATED_BLOCKS = 512  # drawn in the animated block table at most (browser render time)


st.title("Paged & shared-prefix caches")
st.markdown(
    "A chat service: many requests start with the same long **system prompt**, memory is tight. A server "
    "that reserves each request's maximum length up front wastes most of it; **PagedAttention** hands out "
    "blocks of *B* tokens as a request grows; **prefix sharing** stores the system prompt's blocks once and "
    "lets every request point at them (reference counts), keeping them cached after their users leave and "
    "evicting the least recently used when memory runs out. When a running request needs a block and none "
    "is left, the newest request is **preempted** (freed, queued again): the latency spike users see."
)

specs: dict[str, mem.ModelSpec] = {}
try:
    lm = kit.current_model()
    specs[f"loaded model: {lm.name}"] = mem.spec_from_model(lm.model, lm.name)
except ModelLoadError:
    pass
for name, path in mem.preset_configs().items():
    specs[name] = mem.ModelSpec(name, kv_geometry(mem.read_config_file(path)))

with st.form("paged_form"):
    c = st.columns([2, 1, 1, 1])
    which = c[0].selectbox("Bytes per token from", list(specs), key="paged_model",
                           help="the KV geometry of the loaded model or of a published config")
    dtype = c[1].selectbox("Cache dtype", CACHE_DTYPES, index=1, key="paged_dtype")
    block_size = c[2].selectbox("Block size B (tokens)", [8, 16, 32, 64], index=1, key="paged_block")
    bpt = specs[which].geometry.bytes_per_token(dtype)
    budget_mib = c[3].number_input("KV memory budget (MiB)", 0.01, 1e6, round(3072 * bpt / 2**20, 2),
                                   key=f"paged_budget_{which}_{dtype}", format="%.2f",
                                   help="memory left for the cache after the weights; default: 3,072 tokens' worth")
    st.markdown("**Request stream**")
    c = st.columns(4)
    n_requests = c[0].number_input("Requests", 1, 500, 40, key="paged_n")
    system = c[1].number_input("System prompt tokens", 0, 4096, 256, key="paged_system")
    n_systems = c[2].number_input("Distinct system prompts", 1, 8, 1, key="paged_n_systems")
    shared = c[3].slider("Share of requests with a system prompt", 0.0, 1.0, 1.0, 0.05, key="paged_shared")
    c = st.columns(4)
    user = c[0].slider("User message tokens", 1, 1024, (16, 96), key="paged_user")
    out = c[1].slider("Output tokens", 1, 1024, (16, 128), key="paged_out")
    max_new = c[2].number_input("max_new_tokens (what contiguous reserves)", 1, 4096, 128, key="paged_max_new")
    rate = c[3].number_input("Arrivals per step", 0.05, 50.0, 1.0, 0.05, key="paged_rate")
    seed = st.number_input("Seed", 0, 2**31 - 1, 0, key="paged_seed")
    st.form_submit_button("Simulate", type="primary", icon=":material/play_arrow:")

budget_tokens = int(budget_mib * 2**20) // bpt
try:
    workload = paged.Workload(
        n_requests=int(n_requests), system_prompt_tokens=int(system), n_system_prompts=int(n_systems),
        shared_fraction=float(shared), user_tokens=tuple(user), output_tokens=tuple(out), max_new_tokens=int(max_new),
        arrival_rate=float(rate), seed=int(seed),
    )
    if budget_tokens < block_size:
        raise ValueError(f"the budget holds {budget_tokens} tokens, less than one block of {block_size}: raise it")
    if budget_tokens // block_size > MAX_BLOCKS:
        raise ValueError(f"the budget holds {budget_tokens // block_size:,} blocks; the simulator takes at most "
                         f"{MAX_BLOCKS:,}: lower the budget or raise the block size")
except ValueError as e:
    st.error(str(e))
    st.stop()

key = (which, dtype, block_size, budget_tokens, workload)
if st.session_state.paged_key != key:
    with st.spinner("Simulating…"):
        st.session_state.paged_results = paged.compare(workload, budget_tokens, block_size, bpt,
                                                       cells=budget_tokens // block_size <= MAX_ANIMATED_BLOCKS)
    st.session_state.paged_key = key
results: dict[str, paged.SimResult] = st.session_state.paged_results

st.caption(f"{which}: {bpt:,} B per token in {dtype} → the budget holds **{budget_tokens:,} tokens** "
           f"= {budget_tokens // block_size:,} blocks of {block_size}.")
typical = workload.typical()
fit = paged.requests_that_fit(budget_tokens, block_size, **typical)
m = st.columns(3)
for col, (k, n) in zip(m, fit.items()):
    peak = results[k].peak_running
    col.metric(f"{paged.STRATEGIES[k]}: fit at once", f"{n}", help="typical requests resident together (static count)")
    col.caption(f"peak in the simulation: **{peak}** running · finished all in **{results[k].steps}** steps")
st.caption(f"Typical request: {typical['prompt_len']} prompt tokens ({typical['shared_len']} shared) + "
           f"{typical['output_len']} output tokens; contiguous reserves prompt + {typical['max_new_tokens']}.")

st.dataframe(paged.summary_table(results), hide_index=True, height="content")
kit.chart(fp.memory_over_time(results), "paged_time")
kit.chart(fp.where_memory_goes(results), "paged_where")
st.caption("Internal fragmentation: slots held but not written (contiguous: the unused tail up to max length; "
           "paged: the last block's empty slots). External: free slots outside the largest free hole, where a "
           "new contiguous reservation cannot go. Paged blocks have none: any free block serves anyone.")

st.subheader("The block table, step by step")
if budget_tokens // block_size > MAX_ANIMATED_BLOCKS:
    st.info(f"The animation draws budgets up to {MAX_ANIMATED_BLOCKS} blocks; this one has "
            f"{budget_tokens // block_size:,}. Lower the budget or raise the block size to see it.")
else:
    kit.chart(fp.block_tables(results), "paged_blocks")
    st.caption("One cell = one block of B token slots (contiguous: one B-slot stretch of its arena). Colour = the "
               "request holding it (R7 = request 7), pale where it is reserved but not yet written; dark cells "
               "marked ×n are shared by n requests (reference count n); grey 'c' = a cached prefix block nobody "
               "holds (evictable); blank = free. Press Play or drag the slider; hover a cell for its owners and fill.")
