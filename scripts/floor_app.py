"""The floor for the step page's click latency: a bare Streamlit page, no model, five Plotly charts.

`scripts/browser_bench.py` clicks Next step here and on kvviz's step page in turns and compares
click -> K updated. This page does the least a Streamlit page can do for the same picture: one
button, and the five charts the step page shows (K, V, q'k'v', attention, top-10 bars) redrawn
with `st.plotly_chart` from random numbers of the same shapes (head_dim 32, one K/V row and one
attention row more per click). No kvviz import, no model, no computing.

    streamlit run scripts/floor_app.py
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

PROMPT_ROWS, HEAD_DIM, TOP = 11, 32, 10

st.set_page_config(page_title="floor", layout="wide")
st.session_state.setdefault("rows", PROMPT_ROWS)
if st.button("Next step", type="primary"):
    st.session_state.rows += 1
n = st.session_state.rows
rng = np.random.default_rng(n)
labels = [f"{i} t{i}" for i in range(n)]


def heatmap(z: np.ndarray, name: str, y: list[str], scale: str = "RdBu_r") -> go.Figure:
    fig = go.Figure(go.Heatmap(z=z, y=y, name=name, colorscale=scale))
    fig.update_layout(title=name, height=max(280, 16 * len(y) + 100), yaxis=dict(autorange="reversed", type="category"))
    return fig


attention = np.tril(rng.random((n, n)))
attention /= attention.sum(axis=1, keepdims=True)
c1, c2 = st.columns(2)
with c1:
    st.plotly_chart(heatmap(rng.normal(size=(n, HEAD_DIM)), "K", labels), key="K")
with c2:
    st.plotly_chart(heatmap(rng.normal(size=(n, HEAD_DIM)), "V", labels), key="V")
st.plotly_chart(heatmap(rng.normal(size=(3, HEAD_DIM)), "qkv", ["q′", "k′", "v′"]), key="qkv")
c3, c4 = st.columns([3, 2])
with c3:
    st.plotly_chart(heatmap(np.where(attention > 0, attention, np.nan), "attention", labels, "Viridis"), key="att")
with c4:
    probs = np.sort(rng.dirichlet(np.ones(50)))[::-1][:TOP]
    bars = go.Figure(go.Bar(x=probs, y=[f"tok{i}" for i in range(TOP)], orientation="h", name="next token"))
    bars.update_layout(title="next token", height=300, yaxis=dict(autorange="reversed"))
    st.plotly_chart(bars, key="top")
