"""Views of the cache-vs-recompute page: measured step times with their spread, FLOPs per step,
prefill vs decode throughput, and the bytes one decode step must move.

Pure builders: kvviz.economics.cost records in, `go.Figure` out (no torch, no Streamlit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kvviz.figures.common import CACHED_COLOR, RECOMPUTE_COLOR, base_layout

if TYPE_CHECKING:
    from kvviz.economics.cost import CostSweep, Throughput

WEIGHTS_COLOR = "#8c9bb5"  # the weights' share of memory traffic


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 tick values covering [lo, hi] for a log axis (Plotly's own minor labels crowd it)."""
    if lo <= 0 or hi <= 0:
        return []
    out, decade = [], 10 ** math.floor(math.log10(lo))
    while decade <= hi * 10:
        out += [decade * m for m in (1, 2, 5)]
        decade *= 10
    inside = [v for v in out if lo <= v <= hi]
    below = [v for v in out if v < lo][-1:]
    above = [v for v in out if v > hi][:1]
    return below + inside + above


def step_times(sweep: CostSweep, log: bool = True) -> go.Figure:
    """Median ms of one decode step vs context, cached and recomputed; bars span the IQR."""
    x = [s.context for s in sweep.steps]
    fig = go.Figure()
    for name, color, spreads in (
        ("with the KV cache (1 token in)", CACHED_COLOR, [s.cached_ms for s in sweep.steps]),
        ("full recompute (all tokens in)", RECOMPUTE_COLOR, [s.recompute_ms for s in sweep.steps]),
    ):
        med = [sp.median for sp in spreads]
        fig.add_trace(go.Scatter(
            x=x, y=med, name=name, mode="lines+markers", line=dict(color=color, width=2),
            error_y=dict(type="data", symmetric=False, array=[sp.q3 - m for sp, m in zip(spreads, med)],
                         arrayminus=[m - sp.q1 for sp, m in zip(spreads, med)], thickness=1.5, width=4),
            customdata=[[sp.q1, sp.q3, len(sp.samples)] for sp in spreads],
            hovertemplate="context %{x}<br>median %{y:.2f} ms<br>IQR %{customdata[0]:.2f}–%{customdata[1]:.2f} ms"
                          " (%{customdata[2]} runs)<extra>%{fullData.name}</extra>",
        ))
    fig.update_xaxes(title_text="context length (tokens attended by the new token)", type="log" if log else "linear",
                     tickvals=x, ticktext=[str(c) for c in x])
    if log:
        lows = [s.cached_ms.q1 for s in sweep.steps] + [s.recompute_ms.q1 for s in sweep.steps]
        highs = [s.cached_ms.q3 for s in sweep.steps] + [s.recompute_ms.q3 for s in sweep.steps]
        ticks = log_ticks(min(lows), max(highs))
        fig.update_yaxes(tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    fig.update_yaxes(title_text="ms per decode step", type="log" if log else "linear")
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return base_layout(fig, height=380)


def step_flops(sweep: CostSweep) -> go.Figure:
    """FLOPs per step both ways (left, log) and how many times more the recompute costs (right):
    counted FLOPs vs measured time."""
    x = [s.context for s in sweep.steps]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("FLOPs per decode step", "recompute ÷ cached"))
    fig.add_trace(go.Bar(x=[str(c) for c in x], y=[s.cached_flops for s in sweep.steps], name="with the cache",
                         marker_color=CACHED_COLOR, hovertemplate="context %{x}: %{y:.3s} FLOPs<extra>cached</extra>"),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=[str(c) for c in x], y=[s.recompute_flops for s in sweep.steps], name="full recompute",
                         marker_color=RECOMPUTE_COLOR,
                         hovertemplate="context %{x}: %{y:.3s} FLOPs<extra>recompute</extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=[s.flop_ratio for s in sweep.steps], name="FLOP ratio (counted)",
                             mode="lines+markers", line=dict(color="#6a3d9a", width=2),
                             hovertemplate="context %{x}: %{y:.1f}× the FLOPs<extra></extra>"), row=1, col=2)
    fig.add_trace(go.Scatter(x=x, y=[s.time_ratio for s in sweep.steps], name="time ratio (measured)",
                             mode="lines+markers", line=dict(color="#33a02c", width=2, dash="dot"),
                             hovertemplate="context %{x}: %{y:.1f}× the time<extra></extra>"), row=1, col=2)
    fig.update_yaxes(type="log", dtick=1, exponentformat="SI", title_text="FLOPs", row=1, col=1)
    fig.update_yaxes(type="log", dtick=1, title_text="× (log)", row=1, col=2)
    fig.update_xaxes(title_text="context length", type="category", row=1, col=1)
    fig.update_xaxes(title_text="context length", type="log", tickvals=x, ticktext=[str(c) for c in x], row=1, col=2)
    fig.update_layout(barmode="group", legend=dict(orientation="h", yanchor="top", y=-0.25, x=0))
    base_layout(fig, height=400)
    fig.update_layout(margin=dict(t=40, b=10))
    return fig


def prefill_vs_decode(th: Throughput) -> go.Figure:
    """Tokens/s and FLOPs per byte moved, prefill beside decode."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.15,
                        subplot_titles=("tokens per second (measured)", "FLOPs per byte moved (counted)"))
    names = [f"prefill ({th.prompt_tokens} tokens in one forward)", "decode (1 token per forward)"]
    short = ["prefill", "decode"]
    colors = [RECOMPUTE_COLOR, CACHED_COLOR]
    fig.add_trace(go.Bar(x=short, y=[th.prefill_tokens_per_s, th.decode_tokens_per_s], marker_color=colors,
                         text=[f"{v:,.0f}" for v in (th.prefill_tokens_per_s, th.decode_tokens_per_s)],
                         textposition="auto", hovertext=names, hovertemplate="%{hovertext}: %{y:,.0f} tokens/s<extra></extra>",
                         showlegend=False), row=1, col=1)
    fig.add_trace(go.Bar(x=short, y=[th.prefill_intensity, th.decode_intensity], marker_color=colors,
                         text=[f"{v:,.1f}" for v in (th.prefill_intensity, th.decode_intensity)], textposition="auto",
                         hovertext=names, hovertemplate="%{hovertext}: %{y:,.2f} FLOPs per byte<extra></extra>",
                         showlegend=False), row=1, col=2)
    fig.update_yaxes(type="log", dtick=1, title_text="tokens/s", row=1, col=1)
    fig.update_yaxes(type="log", dtick=1, title_text="FLOPs / byte", row=1, col=2)
    base_layout(fig, height=340)
    fig.update_layout(margin=dict(t=40))
    return fig


def decode_bytes(rows: Sequence[dict[str, int]]) -> go.Figure:
    """Bytes one decode step reads at each context: the weights (fixed) + the cache (grows)."""
    x = [str(r["context"]) for r in rows]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=x, y=[r["weights_bytes"] / 2**20 for r in rows], name="weights (read once per step)",
                         marker_color=WEIGHTS_COLOR, hovertemplate="context %{x}: %{y:.2f} MiB of weights<extra></extra>"))
    fig.add_trace(go.Bar(x=x, y=[r["cache_bytes"] / 2**20 for r in rows], name="KV cache (read whole each step)",
                         marker_color=CACHED_COLOR, hovertemplate="context %{x}: %{y:.2f} MiB of cache<extra></extra>"))
    fig.update_layout(barmode="stack", legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, traceorder="normal"))
    fig.update_xaxes(title_text="context length", type="category")
    fig.update_yaxes(title_text="MiB moved per generated token")
    return base_layout(fig, height=340)
