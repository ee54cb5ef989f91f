"""Home: what a KV cache is, the loaded model's cache shape, and a one-click run."""

from __future__ import annotations

import streamlit as st

from kvviz.api import trace
from kvviz.geometry import dtype_bytes, kv_geometry
from kvviz.ui import kit
from kvviz.validate import InputError

kit.page("Home")

st.title("kvviz — watch the KV cache")
st.markdown(
    """
A decoder LM makes, for every token and every layer, a **query** q, a **key** k and a **value** v.
Token *t* attends over the keys of every earlier token. Recomputing them at each step is wasteful,
so inference keeps them: the **KV cache**.

* **Prefill** (step 0) runs the whole prompt at once and fills K and V for every prompt position.
* **Decode** (each later step) feeds one token: each layer makes q′, k′, v′, appends
  **K ← [K; k′]**, **V ← [V; v′]**, and q′ attends over every cached key.

Open **Step through** to watch it row by row, or the **Bug lab** to break it on purpose.
"""
)

lm = kit.require_model("the model's cache geometry")
info = lm.info
geo = kv_geometry(lm.model.config)
c = st.columns(5)
c[0].metric("Layers", info.num_layers)
c[1].metric("Query heads", info.num_heads)
c[2].metric("KV heads", f"{info.num_key_value_heads} ({info.attention_kind})")
c[3].metric("head_dim", info.head_dim)
c[4].metric("KV bytes / token", f"{geo.bytes_per_token(info.dtype):,}",
            help=f"2 (K and V) × {info.num_layers} layers × {info.num_key_value_heads} KV heads × "
            f"{info.head_dim} head_dim × {dtype_bytes(info.dtype):g} bytes ({info.dtype})")

st.subheader("Quick run")
with st.form("quick"):
    prompt = st.text_input("Prompt", kit.DEFAULT_PROMPT)
    steps = st.slider("New tokens", 1, 48, 12)
    go_run = st.form_submit_button("Generate")
if go_run:
    try:
        with kit.model_work("Generating"):
            t = trace(lm, prompt, steps)
    except InputError as e:
        st.error(kit.escape(str(e)))
    else:
        # two labelled lines, not "**prompt**continuation": a prompt ending in punctuation followed by a
        # letter leaves the closing ** unmatched in Markdown (and the bold then spills into the answer)
        st.markdown(f"**Prompt:** {kit.escape(t.prompt)}  \n**Continuation:** {kit.escape(t.generated_text)}")
        worst = max(s.max_abs_logit_diff or 0.0 for s in t.steps)
        st.caption(
            f"cache grew from {t.steps[0].cache_len} to {t.steps[-1].cache_len} positions; "
            f"largest |cached − recomputed logit| over all steps: {worst:.1e}"
        )
        st.dataframe(
            [{"step": s.step, "phase": "prefill" if s.is_prefill else "decode", "token": repr(s.token),
              "p": round(s.prob, 3), "cache length": s.cache_len, "ms": round(s.time_ms, 1),
              "|Δlogit| vs recompute": s.max_abs_logit_diff} for s in t.steps],
            hide_index=True,
        )
