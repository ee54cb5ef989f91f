"""Views of the memory page: KV cache (+ weights) vs context against a GPU, and the same model as
MHA / GQA / MQA in every cache dtype.

Pure builders: `kvviz.economics.memory.KVGeometry` in, `go.Figure` out (no torch, no Streamlit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

from kvviz.figures.common import HIGHLIGHT, base_layout
from kvviz.geometry import CACHE_DTYPES, KVGeometry

GiB = 2**30
WEIGHTS_FILL = "rgba(140,155,181,0.35)"
VARIANT_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")  # MHA, GQA, MQA, ...


def memory_vs_context(
    variants: Mapping[str, KVGeometry], contexts: Sequence[int], batch: int, dtype: str,
    weights_bytes: int = 0, device_bytes: int | None = None, device_label: str = "", model_context: int = 0,
) -> go.Figure:
    """Weights + batch x KV cache (GiB) vs context length, one line per attention variant.

    The weights are the shaded floor every line starts from; the device's memory is a dashed line
    (where a line crosses it, that many tokens no longer fit).
    """
    x = list(contexts)
    w = weights_bytes / GiB
    fig = go.Figure()
    if weights_bytes:
        fig.add_trace(go.Scatter(x=x, y=[w] * len(x), name=f"weights ({w:.1f} GiB)", mode="lines",
                                 line=dict(color="rgba(140,155,181,1)", width=1), fill="tozeroy", fillcolor=WEIGHTS_FILL,
                                 hovertemplate="weights %{y:.2f} GiB<extra></extra>"))
    for (label, geo), color in zip(variants.items(), VARIANT_COLORS):
        per_tok = geo.bytes_per_token(dtype) * batch
        fig.add_trace(go.Scatter(
            x=x, y=[w + n * per_tok / GiB for n in x], name=label, mode="lines",
            line=dict(color=color, width=3 if "this model" in label else 2, dash=None if "this model" in label else "dash"),
            customdata=[n * per_tok / GiB for n in x],
            hovertemplate="%{x:,} tokens: cache %{customdata:.2f} GiB, total %{y:.2f} GiB<extra>" + label + "</extra>",
        ))
    if device_bytes:
        fig.add_hline(y=device_bytes / GiB, line=dict(color=HIGHLIGHT, dash="dot", width=2),
                      annotation_text=f"{device_label or 'device'}: {device_bytes / GiB:.0f} GiB",
                      annotation_position="top left")
    if model_context and x and model_context <= x[-1]:
        fig.add_vline(x=model_context, line=dict(color="gray", dash="dash", width=1),
                      annotation_text=f"model's context {model_context:,}", annotation_position="top right")
    fig.update_xaxes(title_text=f"context length per sequence (tokens), batch {batch}")
    fig.update_yaxes(title_text=f"GiB ({dtype} cache)", rangemode="tozero")
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return base_layout(fig, height=420)


def variants_by_dtype(variants: Mapping[str, KVGeometry], tokens: int, batch: int,
                      dtypes: Sequence[str] = CACHE_DTYPES) -> go.Figure:
    """Cache size for `batch` x `tokens`, grouped by dtype, one bar per attention variant."""
    fig = go.Figure()
    for (label, geo), color in zip(variants.items(), VARIANT_COLORS):
        y = [geo.total_bytes(tokens, batch, d) / GiB for d in dtypes]
        fig.add_trace(go.Bar(
            x=list(dtypes), y=y, name=label, marker_color=color,
            customdata=[geo.bytes_per_token(d) for d in dtypes],
            hovertemplate="%{x}: %{y:.3g} GiB (%{customdata:,} B/token)<extra>" + label + "</extra>",
        ))
    fig.update_layout(barmode="group", legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    fig.update_xaxes(title_text="cache dtype")
    fig.update_yaxes(title_text=f"GiB for {batch} × {tokens:,} tokens")
    return base_layout(fig, height=360)
