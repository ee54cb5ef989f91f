"""Memory per token: the KV-cache calculator for any config, MHA/GQA/MQA side by side, memory vs
context against a GPU, and the running model's cache measured against the formula.

Works offline: presets, uploads, local paths and typed-in numbers need no network; hub ids are
tried only when asked for, and a failure says why.
"""

from __future__ import annotations

import streamlit as st

from kvviz.economics import memory as mem
from kvviz.engine.cache import measure, measure_prefill
from kvviz.engine.models import ModelLoadError
from kvviz.figures import memory as fm
from kvviz.geometry import CACHE_DTYPES, dtype_bytes, human_bytes
from kvviz.ui import kit

kit.page("Memory per token")

SOURCES = ["loaded model", "preset", "upload config.json", "hub id or path", "numbers"]

st.title("Memory per token")
st.markdown(
    "Every token leaves one key and one value vector per layer and per KV head in the cache:  \n"
    "**bytes per token = 2 × layers × KV heads × head_dim × bytes per element**. "
    "GQA and MQA shrink it by sharing each KV head among several query heads."
)


def pick_spec() -> mem.ModelSpec | None:
    """The model the calculator is about, from the chosen source; None (with a message) on bad input."""
    source = st.segmented_control("Model from", SOURCES, default="preset", required=True, key="mem_source",
                                  persist_state="session")
    try:
        if source == "loaded model":
            try:
                lm = kit.current_model()
            except ModelLoadError as e:
                st.error(f"No model is loaded ({e}). Pick a preset, upload a config.json or type numbers.")
                return None
            return mem.spec_from_model(lm.model, lm.name)
        if source == "preset":
            names = list(mem.preset_configs())
            name = st.selectbox("Preset (published config.json values)", names, index=names.index("llama-3-8b"),
                                key="mem_preset", persist_state="session")
            return mem.spec_from_config(mem.load_config_source(name), name)
        if source == "upload config.json":
            up = st.file_uploader("A model's config.json", type=["json"], key="mem_upload")
            if up is None:
                st.info("Upload a config.json (from a checkpoint folder or a model page on the hub).")
                return None
            return mem.spec_from_config(mem.parse_config_json(up.getvalue(), source=up.name), up.name)
        if source == "hub id or path":
            target = st.text_input("Hub id, checkpoint directory or config.json path", key="mem_target",
                                   placeholder="e.g. Qwen/Qwen2.5-0.5B or /path/to/checkpoint", persist_state="session")
            if not target.strip():
                st.info("Hub ids need internet; local paths work offline.")
                return None
            with st.spinner(f"Reading the config of {target}…"):
                return mem.spec_from_config(mem.load_config_source(target), target.strip())
        c = st.columns(5)
        layers = c[0].number_input("layers", 1, 1000, 32, key="mem_layers", persist_state="session")
        heads = c[1].number_input("query heads", 1, 1024, 32, key="mem_heads", persist_state="session")
        kv = c[2].number_input("KV heads", 1, 1024, 8, key="mem_kv", persist_state="session")
        hd = c[3].number_input("head_dim", 1, 4096, 128, key="mem_hd", persist_state="session")
        params = c[4].number_input("parameters (billions, optional)", 0.0, 5000.0, 8.0, key="mem_params",
                                   persist_state="session")
        return mem.spec_from_numbers(layers, heads, kv, hd, params, max_positions=8192)
    except ValueError as e:  # ModelLoadError is one: offline hub ids, bad files, impossible numbers
        st.error(str(e))
        return None


spec = pick_spec()
if spec is None:
    st.stop()
geo = spec.geometry
context = geo.max_positions or 8192

c = st.columns(4)
dtype = c[0].selectbox("Cache dtype", CACHE_DTYPES, index=1, key="mem_dtype", persist_state="session",
                       help="fp8 / int4 are quantised caches (int4 ignores the small per-group scales).")
wdtype = c[1].selectbox("Weights dtype", CACHE_DTYPES, index=1, key="mem_wdtype", persist_state="session")
tokens = c[2].number_input("Tokens per sequence", 1, 10_000_000, min(context, 8192), key="mem_tokens")
batch = c[3].number_input("Batch (sequences at once)", 1, 100_000, 1, key="mem_batch", persist_state="session")

est = mem.estimate(geo, int(tokens), int(batch), dtype, weights_bytes=spec.weights_bytes(wdtype) or None)
st.markdown(
    f"**{spec.label}** · {geo.model_type} · {geo.num_layers} layers · {geo.num_heads} query heads / "
    f"{geo.num_key_value_heads} KV heads (**{geo.attention_kind}**) · head_dim {geo.head_dim} · context {context:,}  \n"
    f"2 × {geo.num_layers} × {geo.num_key_value_heads} × {geo.head_dim} × {dtype_bytes(dtype):g} B "
    f"= **{est.bytes_per_token:,} B per token**"
)
m = st.columns(4)
m[0].metric("Per token", human_bytes(est.bytes_per_token))
m[1].metric(f"One sequence ({int(tokens):,} tokens)", human_bytes(est.bytes_per_sequence))
m[2].metric(f"Batch of {int(batch)}", human_bytes(est.total_bytes))
if spec.parameters:
    m[3].metric(f"Weights ({spec.parameters / 1e9:.2f} B params, {wdtype})", human_bytes(spec.weights_bytes(wdtype)))
else:
    m[3].metric("Weights", "unknown", help=spec.note or None)

st.subheader("Memory vs context on a GPU")
c = st.columns([2, 1])
gpu = c[0].selectbox("Device", list(mem.GPU_PRESETS), index=4, key="mem_gpu", persist_state="session")
device_bytes = mem.GPU_PRESETS[gpu]
extent = c[1].segmented_control("Context axis up to", ["device full", "model's context"], default="device full",
                                required=True, key="mem_extent", persist_state="session")
variants = geo.variants()
top = (mem.chart_extent(variants, device_bytes, int(batch), dtype, spec.weights_bytes(wdtype), fallback=context)
       if extent == "device full" else context)
kit.chart(fm.memory_vs_context(variants, mem.context_points(top), int(batch), dtype,
                               spec.weights_bytes(wdtype), device_bytes, gpu, model_context=context), "mem_chart")
fit = {label: mem.max_context_on(g, device_bytes, int(batch), dtype, spec.weights_bytes(wdtype)) for label, g in variants.items()}
st.caption("Longest context per sequence that fits on the device with the weights, at this batch and dtype: "
           + " · ".join(f"{label.replace(' ← this model', ' (this model)')}: **{n:,}** tokens" for label, n in fit.items()))

st.subheader("MHA vs GQA vs MQA, every cache dtype")
kit.chart(fm.variants_by_dtype(variants, int(tokens), int(batch)), "mem_variants")
st.caption("Same layers and head_dim; only the number of KV heads changes. Quality is not free: MQA and "
           "aggressive quantisation cost accuracy, which this page does not measure.")

with st.expander("Every family at a glance (published configs)"):
    st.dataframe(mem.presets_table(8192, dtype), hide_index=True)

st.subheader("The running model's cache, measured")
run = st.session_state.step_session  # the Step-through page's run in this browser session, if any
live = None if run is None else measure(run.cache, run.lm.model.config, run.lm.info.dtype)
if live is not None:
    st.markdown(
        f"Your **Step through** run on **{run.lm.name}**: its cache holds {live.tokens} tokens; K and V tensors "
        f"**{live.measured_bytes:,} B**, formula **{live.formula_bytes:,} B** "
        + ("— equal ✓" if live.equal else "— different: this run's cache was changed (an injected bug?)")
    )
try:
    lm = kit.current_model()
except ModelLoadError as e:
    st.info(f"No model loaded ({e}), so nothing to measure.")
    st.stop()
cap = lm.info.context_length
c = st.columns(2)
n_tok = c[0].slider("Tokens to prefill", 1, cap, min(64, cap), key="mem_measure_tokens")
n_batch = c[1].slider("Batch", 1, 8, 2, key="mem_measure_batch")
meas = measure_prefill(lm, int(n_tok), int(n_batch))
m = st.columns(3)
m[0].metric("Measured: K and V tensor bytes", f"{meas.measured_bytes:,} B")
m[1].metric("Formula", f"{meas.formula_bytes:,} B")
m[2].metric("Equal", "yes ✓" if meas.equal else "no ✗")
st.caption(
    f"**{lm.name}** ({lm.info.dtype}): a fresh cache after prefilling {int(n_batch)} × {int(n_tok)} random tokens holds "
    f"{len(meas.shapes)} layers of K and V shaped {meas.shapes[0]} (batch, KV heads, tokens, head_dim); "
    "`numel × element_size` summed over them is the measured number."
)
if not meas.equal:
    st.warning("The cache holds a different number of bytes than the formula (a sliding-window or otherwise "
               "special cache layer).")
