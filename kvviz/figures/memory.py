"""Views of the memory page: KV cache (+ weights) vs context against a GPU, and the same model as
MHA / GQA / MQA in every cache dtype.

Pure builders: `kvviz.economics.memory.KVGeometry` in, `go.Figure` out (no torch, no Streamlit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

from kvviz.figures.common import HIGHLIGHT, base_layout
from kvviz.geometry import CACHE_DTYPES, KVGeometry, human_bytes

GiB = 2**30
WEIGHTS_FILL = "rgba(140,155,181,0.35)"
VARIANT_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")  # MHA, GQA, MQA, ...
UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def byte_unit(largest: float) -> tuple[str, int]:
    """The binary unit an axis reaching `largest` bytes reads best in (GiB for a big model, KiB for a tiny one)."""
    return next(((name, div) for name, div in UNITS if largest >= div), UNITS[-1])


def memory_vs_context(
    variants: Mapping[str, KVGeometry], contexts: Sequence[int], batch: int, dtype: str,
    weights_bytes: int = 0, device_bytes: int | None = None, device_label: str = "", model_context: int = 0,
    group_size: int | None = None,
) -> go.Figure:
    """Weights + batch x KV cache vs context length, one line per variant (another KV-head count,
    or the same model without its windows). Lines bend where windowed layers stop growing; a
    hybrid's fixed state lifts its line from the start.

    The weights are the shaded floor every line starts from; the device's memory is a dotted line
    (where a line crosses it, that many tokens no longer fit) when it is within reach of the lines,
    else named in the title. The unit (GiB ... B) follows the largest value drawn.
    """
    x = list(contexts)
    # per variant: cache + fixed state (bytes) at every context
    caches = {label: [geo.total_bytes(n, batch, dtype, group_size) + geo.state_bytes(batch, dtype) for n in x]
              for label, geo in variants.items()}
    top = weights_bytes + max((max(c) for c in caches.values() if c), default=0)
    unit, div = byte_unit(top)
    fig = go.Figure()
    if weights_bytes:
        fig.add_trace(go.Scatter(x=x, y=[weights_bytes / div] * len(x), name=f"weights ({human_bytes(weights_bytes)})",
                                 mode="lines", line=dict(color="rgba(140,155,181,1)", width=1), fill="tozeroy",
                                 fillcolor=WEIGHTS_FILL, hovertemplate="weights %{y:.3g} " + unit + "<extra></extra>"))
    for (label, cache), color in zip(caches.items(), VARIANT_COLORS):
        own = "this model" in label
        fig.add_trace(go.Scatter(
            x=x, y=[(weights_bytes + c) / div for c in cache], name=label, mode="lines",
            line=dict(color=color, width=3 if own else 2, dash=None if own else "dash"),
            customdata=[c / div for c in cache],
            hovertemplate="%{x:,} tokens: cache %{customdata:.3g} " + unit + ", total %{y:.3g} " + unit
                          + "<extra>" + label + "</extra>",
        ))
    if device_bytes and device_bytes <= 1.5 * top:
        fig.add_hline(y=device_bytes / div, line=dict(color=HIGHLIGHT, dash="dot", width=2),
                      annotation_text=f"{device_label or 'device'}: {human_bytes(device_bytes)}",
                      annotation_position="top left")
    elif device_bytes:  # a line at 80 GiB would flatten a tiny model's MiB to nothing: say it instead
        fig.add_annotation(text=f"{device_label or 'the device'} ({human_bytes(device_bytes)}) is far above this range",
                           xref="paper", yref="paper", x=0.01, y=0.99, xanchor="left", yanchor="top",
                           showarrow=False, font=dict(color=HIGHLIGHT))
    if model_context and x and model_context <= x[-1]:
        fig.add_vline(x=model_context, line=dict(color="gray", dash="dash", width=1),
                      annotation_text=f"model's context {model_context:,}", annotation_position="top right")
    fig.update_xaxes(title_text=f"context length per sequence (tokens), batch {batch}")
    fig.update_yaxes(title_text=f"{unit} ({dtype} cache)", rangemode="tozero")
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return base_layout(fig, height=420)


def variants_by_dtype(variants: Mapping[str, KVGeometry], tokens: int, batch: int,
                      dtypes: Sequence[str] = CACHE_DTYPES, group_size: int | None = None) -> go.Figure:
    """Cache size for `batch` x `tokens` (windows capped, quantized scales included), grouped by
    dtype, one bar per attention variant."""
    sizes = {label: [geo.total_bytes(tokens, batch, d, group_size) for d in dtypes] for label, geo in variants.items()}
    unit, div = byte_unit(max((max(v) for v in sizes.values()), default=0))
    fig = go.Figure()
    for (label, geo), color in zip(variants.items(), VARIANT_COLORS):
        fig.add_trace(go.Bar(
            x=list(dtypes), y=[b / div for b in sizes[label]], name=label, marker_color=color,
            customdata=[geo.bytes_per_token(d, group_size) for d in dtypes],
            hovertemplate="%{x}: %{y:.3g} " + unit + " (%{customdata:,} B/token)<extra>" + label + "</extra>",
        ))
    fig.update_layout(barmode="group", legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    fig.update_xaxes(title_text="cache dtype (int8/int4 with their scales)")
    fig.update_yaxes(title_text=f"{unit} for {batch} × {tokens:,} tokens")
    return base_layout(fig, height=360)


KIND_COLORS = {"global": "#1f77b4", "windowed": "#ff7f0e", "no_kv": "#7f7f7f"}


def memory_by_kind(geo: KVGeometry, contexts: Sequence[int], batch: int, dtype: str,
                   group_size: int | None = None) -> go.Figure:
    """One model's cache vs context, stacked by layer kind: global layers grow with every token,
    windowed layers flatten at their window, layers without a KV cache hold a fixed state."""
    x = list(contexts)
    rows = [geo.bytes_by_kind(n, batch, dtype, group_size) for n in x]
    kinds = [k for k in ("no_kv", "windowed", "global") if any(k in r for r in rows)]
    unit, div = byte_unit(max((sum(r.values()) for r in rows), default=0))
    n = geo.layers_by_kind()
    labels = {"global": f"{n.get('global', 0)} global layers",
              "windowed": f"{n.get('windowed', 0)} windowed layers (window {geo.window:,})",
              "no_kv": f"{n.get('no_kv', 0)} layers without KV: fixed state"}
    fig = go.Figure()
    for k in kinds:
        fig.add_trace(go.Scatter(
            x=x, y=[r.get(k, 0) / div for r in rows], name=labels[k], mode="lines", stackgroup="kinds",
            line=dict(color=KIND_COLORS[k], width=1),
            hovertemplate="%{x:,} tokens: %{y:.3g} " + unit + "<extra>" + labels[k] + "</extra>",
        ))
    if geo.window and x and geo.window <= x[-1]:
        fig.add_vline(x=geo.window - 1, line=dict(color=KIND_COLORS["windowed"], dash="dot", width=1),
                      annotation_text=f"window − 1 = {geo.window - 1:,}", annotation_position="top right")
    fig.update_xaxes(title_text=f"context length per sequence (tokens), batch {batch}")
    fig.update_yaxes(title_text=f"{unit} ({dtype})", rangemode="tozero")
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return base_layout(fig, height=340)
