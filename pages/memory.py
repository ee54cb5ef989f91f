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
from kvviz.geometry import (
    CACHE_DTYPES,
    LAYER_KIND_LABELS,
    QUANTIZED,
    dtype_bytes,
    human_bytes,
    human_count,
    resolve_group_size,
)
from kvviz.ui import kit

kit.page("Memory per token")

SOURCES = ["loaded model", "preset", "upload config.json", "hub id or path", "numbers"]

st.title("Memory per token")
st.markdown(
    "Every token leaves one key and one value vector per layer and per KV head in the cache:  \n"
    "**bytes per token = 2 × layers × KV heads × head_dim × bytes per element**. "
    "GQA and MQA shrink it by sharing each KV head among several query heads; **MLA** (DeepSeek) caches one "
    "small latent per layer instead; **windowed** layers (Mistral, Gemma, gpt-oss) stop growing at their window; "
    "**hybrids** (Jamba, Qwen3-Next) cache only in their few attention layers."
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
context = geo.context_length

grouped = resolve_group_size(st.session_state.get("mem_dtype", "float16")) is not None
c = list(st.columns(5 if grouped else 4))
dtype = c.pop(0).selectbox("Cache dtype", CACHE_DTYPES, index=1, key="mem_dtype", persist_state="session",
                           help="fp8 keeps one scale per tensor; int8 / int4 add a scale (int4: and a zero point) "
                                "per group of elements.")
group = None
if resolve_group_size(dtype) is not None:  # int8 / int4: the group is a knob
    col = c.pop(0) if grouped else st
    group = int(col.number_input("Group size (elements per scale)", 1, 4096, resolve_group_size(dtype),
                                 key="mem_group", persist_state="session", help=QUANTIZED[dtype].note))
wdtype = c[0].selectbox("Weights dtype", CACHE_DTYPES, index=1, key="mem_wdtype", persist_state="session")
# one tokens box per model, so a preset's 8,192 never carries over to a 512-token model
tokens = c[1].number_input("Tokens per sequence", 1, int(mem.MAX_TOKENS), context, key=f"mem_tokens::{spec.label}")
batch = c[2].number_input("Batch (sequences at once)", 1, mem.MAX_BATCH, 1, key="mem_batch", persist_state="session")

est = mem.estimate(geo, int(tokens), int(batch), dtype, weights_bytes=spec.weights_bytes(wdtype) or None, group_size=group)
kinds = geo.layers_by_kind()
layers = " + ".join(f"{n} {LAYER_KIND_LABELS[k]}" for k, n in kinds.items())
window = f" (window {geo.window:,})" if geo.window else ""
if geo.kv_lora_rank:
    per_layer = f"({geo.kv_lora_rank} latent + {geo.qk_rope_head_dim} rope)"
elif geo.value_head_dim != geo.head_dim:
    per_layer = f"{geo.num_key_value_heads} × ({geo.head_dim} + {geo.value_head_dim})"
else:
    per_layer = f"2 × {geo.num_key_value_heads} × {geo.head_dim}"
scales = f" + {est.scale_bytes_per_token:,} B of scales" if est.scale_bytes_per_token else ""
st.markdown(
    f"**{spec.label}** · {geo.model_type} · **{geo.attention_kind}** · {layers}{window} · {geo.num_heads} query heads / "
    f"{geo.num_key_value_heads} KV heads · head_dim {geo.head_dim} · context {context:,}  \n"
    f"{geo.cached_layers} cached layers × {per_layer} × {dtype_bytes(dtype):g} B{scales} "
    f"= **{est.bytes_per_token:,} B per token**" + (" while the context is below the window" if geo.window else "")
)
m = st.columns(4)
m[0].metric("Per token", human_bytes(est.bytes_per_token))
m[1].metric(f"One sequence ({int(tokens):,} tokens)", human_bytes(est.bytes_per_sequence))
m[2].metric(f"Batch of {int(batch)}", human_bytes(est.total_bytes + est.state_bytes),
            help="KV cache plus the fixed state of layers without one" if est.state_bytes else None)
if spec.parameters:
    m[3].metric(f"Weights ({human_count(spec.parameters)} params, {wdtype})", human_bytes(spec.weights_bytes(wdtype)))
else:
    m[3].metric("Weights", "unknown", help=spec.note or None)

extra = []  # (label, value, help) for what only some architectures have
if geo.window:
    blind = geo.without_windows().total_bytes(int(tokens), int(batch), dtype, group)
    extra.append(("Past the window, per token", human_bytes(geo.growth_bytes_per_token(dtype, group)),
                  "only the global layers keep growing"))
    extra.append(("If the window were ignored", human_bytes(blind), "what summing every layer at every token says"))
if geo.kv_lora_rank:
    dec = geo.decompressed_bytes_per_token(dtype)
    extra.append(("Decompressed K/V per token", human_bytes(dec),
                  f"{dec / est.bytes_per_token:.0f}× the latent: what attention multiplies at each step (rebuilt, "
                  "not kept) and what an engine without an MLA kernel would cache"))
if est.state_bytes:
    extra.append(("Fixed state, whole batch", human_bytes(est.state_bytes),
                  f"in {est.state_dtype}; transformers 5.23 keeps recurrent states in float32: "
                  f"{human_bytes(geo.state_bytes(int(batch), est.state_dtype, stored_by='transformers'))}"))
if est.scale_bytes_per_token:
    extra.append(("Scales per token", human_bytes(est.scale_bytes_per_token),
                  f"{est.scale_bytes_per_token / est.bytes_per_token:.0%} of the quantized cache, group {group}"))
if extra:
    cols = st.columns(4)
    for col, (label, value, tip) in zip(cols, extra):
        col.metric(label, value, help=tip)
for note in geo.notes():
    st.caption(note)

st.subheader("Memory vs context on a GPU")
c = st.columns([2, 1])
gpu = c[0].selectbox("Device", list(mem.GPU_PRESETS), index=4, key="mem_gpu", persist_state="session")
device_bytes = mem.GPU_PRESETS[gpu]
extent = c[1].segmented_control("Context axis up to", ["model's context", "until the device is full"],
                                default="model's context", required=True, key="mem_extent", persist_state="session")
variants = geo.variants()
if geo.window:
    variants["this model, windows ignored"] = geo.without_windows()
weights = spec.weights_bytes(wdtype)
top = context
if extent == "until the device is full":
    top = max(context, mem.chart_extent(variants, device_bytes, int(batch), dtype, weights, fallback=context, group_size=group))
kit.chart(fm.memory_vs_context(variants, mem.context_points(top, window=geo.window), int(batch), dtype, weights,
                               device_bytes, gpu, model_context=context, group_size=group), "mem_chart")
fit = {label: mem.max_context_on(g, device_bytes, int(batch), dtype, weights, group) for label, g in variants.items()}
st.caption(f"Longest context per sequence that fits on the device with the weights, at this batch and dtype (the model "
           f"itself takes {context:,}): "
           + " · ".join(f"{label.replace(' ← this model', ' (this model)')}: **"
                        + ("any length" if n >= mem.MAX_TOKENS else f"{n:,}") + "** tokens" for label, n in fit.items()))

if len(kinds) > 1 or geo.window:
    st.subheader("Where the cache goes, by layer kind")
    kit.chart(fm.memory_by_kind(geo, mem.context_points(top, window=geo.window), int(batch), dtype, group), "mem_kinds")

st.subheader("MHA vs GQA vs MQA" + (" vs MLA" if geo.kv_lora_rank else "") + ", every cache dtype")
kit.chart(fm.variants_by_dtype(geo.variants(), int(tokens), int(batch), group_size=group), "mem_variants")
st.caption("Same layers and head sizes; only the number of KV heads (or the latent) changes. Quality is not free: "
           "MQA and aggressive quantisation cost accuracy, which this page does not measure.")

with st.expander("Every family at a glance (published configs)"):
    st.dataframe(mem.presets_table(8192, "bfloat16"), hide_index=True)

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
