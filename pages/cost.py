"""Cache vs recompute, measured live on the loaded model: one decode step with the KV cache vs a
full recompute as the context grows (median and IQR over repeats), FLOPs per step both ways,
prefill vs decode throughput, and the bytes a decode step must move.

The measurements run only when asked (a button), alone: they hold the whole model queue
(`kit.model_work(..., exclusive=True)`), so the torch thread count they set, process-wide, is
theirs alone and restored before anyone else's forward runs. Results stay in this browser session.
"""

from __future__ import annotations

import os

import streamlit as st

from kvviz.economics import cost
from kvviz.figures import cost as fc
from kvviz.geometry import human_bytes, kv_geometry
from kvviz.ui import kit

kit.page("Cache vs recompute")


st.title("Cache vs recompute")
st.markdown(
    "Without a cache, every new token means running the model over **the whole sequence again**; with it, the "
    "model runs over **one token** and reads the keys and values it kept. Below, both are timed on the loaded "
    "model, on this machine, as the context grows."
)
lm = kit.require_model("the timings")

ctx = lm.info.context_length
choices = cost.default_contexts(ctx, n=12, smallest=4)
with st.form("cost_form"):
    c = st.columns([3, 1, 1, 1])
    contexts = c[0].multiselect("Context lengths", choices, default=cost.default_contexts(ctx), key="cost_contexts")
    repeats = c[1].number_input("Repeats", 1, 50, 5, key="cost_repeats", help="timed runs per point (after 2 warm-ups)")
    prompt_tokens = c[2].number_input("Prefill tokens", 8, max(8, ctx - 32), min(256, ctx // 2), key="cost_prompt")
    cores = os.cpu_count() or 1
    threads = c[3].number_input("CPU threads", 1, cores, 1, key="cost_threads",
                                help="torch threads while measuring (restored after; the measurement runs alone, so "
                                     "nobody else's work uses them). 1 gives steady timings on a busy machine; more "
                                     "can be faster on an idle one.")
    run = st.form_submit_button("Run the measurements", type="primary", icon=":material/timer:")
    st.caption(f"On **{kit.escape(lm.name)}** ({lm.info.device}, {lm.info.dtype}). A few seconds for the bundled model "
               "on a CPU; much longer for large models at long contexts. It runs alone: other visitors' steps wait.")


def measure() -> None:
    try:
        with kit.model_work("Timing", exclusive=True), st.spinner("Timing cached and recomputed steps…"):
            bar = st.progress(0.0)
            st.session_state.cost_sweep = cost.measure_steps(lm, contexts, repeats=int(repeats), progress=bar.progress,
                                                               threads=int(threads))
            bar.empty()
            st.session_state.cost_throughput = cost.measure_throughput(lm, int(prompt_tokens), 32, threads=int(threads))
        st.session_state.cost_error = None
    except ValueError as e:  # InputError (a full queue, bad contexts) and the economics' own checks
        st.session_state.cost_error = str(e)


if run:
    measure()
if st.session_state.cost_error:
    st.error(kit.escape(st.session_state.cost_error))
sweep, th = st.session_state.cost_sweep, st.session_state.cost_throughput
if sweep is not None and sweep.model != lm.name:  # measured on another model: not this one's numbers
    sweep = th = None
if sweep is None or th is None:
    st.info("Pick the context lengths and press **Run the measurements**: nothing is timed until you ask.",
            icon=":material/timer:")
    st.stop()

last = sweep.steps[-1]
m = st.columns(4)
m[0].metric(f"Cached step at {last.context}", f"{last.cached_ms.median:.2f} ms", help=f"IQR {last.cached_ms.iqr:.2f} ms")
m[1].metric(f"Recompute at {last.context}", f"{last.recompute_ms.median:.2f} ms", help=f"IQR {last.recompute_ms.iqr:.2f} ms")
m[2].metric("Measured speed-up", f"{last.time_ratio:.1f}×")
m[3].metric("FLOP ratio", f"{last.flop_ratio:.0f}×")

kit.chart(fc.step_times(sweep), "cost_times")
st.caption(f"Median of {sweep.repeats} runs per point; bars span the interquartile range. {sweep.device}, "
           f"{sweep.threads} torch thread(s); other work on the machine adds noise. The cached step barely grows: "
           "its work is one token through the weights plus one row of attention.")
kit.chart(fc.step_flops(sweep), "cost_flops")
st.markdown(
    "**Counted**: a cached step costs ≈ 2 × (weights) + 4 × layers × heads × head_dim × *n* FLOPs; a recompute "
    "≈ *n* × 2 × (weights) + the full causal attention, so the ratio grows like *n*. **Measured**, the gap is "
    "smaller on a small model: each forward also pays fixed costs (Python, kernel launches, memory traffic) "
    "that FLOPs do not count; on large models and long contexts the two ratios meet."
)
with st.expander("All numbers"):
    st.dataframe(sweep.rows(), hide_index=True)

st.subheader("Prefill vs decode")
kit.chart(fc.prefill_vs_decode(th), "cost_pd")
st.markdown(
    f"Prefill pushed **{th.prefill_tokens_per_s:,.0f} tokens/s** ({th.prompt_tokens} tokens in one forward); "
    f"decode made **{th.decode_tokens_per_s:,.0f} tokens/s** (one token per forward, {th.decode_tokens} steps).  \n"
    f"**Prefill is compute-bound**: one large matrix product over all prompt tokens reuses each weight "
    f"{th.prompt_tokens} times, {th.prefill_intensity:,.0f} FLOPs per byte read. "
    f"**Decode is memory-bound**: every step reads all weights ({human_bytes(th.weights_bytes)}) and the whole cache "
    f"to make one token, {th.decode_intensity:.2f} FLOPs per byte. For scale, an A100 does about "
    f"{cost.A100_RIDGE:.0f} bf16 FLOPs in the time it reads one byte from memory: a kernel below that intensity waits "
    "on memory, so decode speed is set by bandwidth, and batching many sequences (sharing each weight read) is "
    "how servers raise it."
)
geo = kv_geometry(lm.model.config)
kit.chart(fc.decode_bytes(cost.bytes_per_decode_token(geo, th.weights_bytes, [s.context for s in sweep.steps],
                                                      lm.info.dtype)), "cost_bytes")
st.caption(f"Bytes one decode step reads: every weight once plus the whole cache "
           f"({geo.bytes_per_token(lm.info.dtype):,} B per cached token in {lm.info.dtype}). On this small model the "
           "weights dominate; for Llama-3-8B in fp16 (16 GB of weights, 128 KiB per token), the cache of one 8k-token "
           "sequence adds 1 GiB per step, and of a batch of 32 such sequences, 32 GiB — more than the weights.")
