"""Views of a cache variant beside the exact cache (the Bug lab, the step page's Cache control).

Pure builders: numpy arrays and plain values in, a `go.Figure` out. No torch, no Streamlit.
Exact vs variant, over a whole run:
- `divergence_figure`: per step, max |Δlogit| (log scale, with the tolerance), KL(exact‖variant) and
  where the top token differs;
- `kv_status_figure`: the K/V row diff as categories per slot (same / wrong / shifted / missing /
  extra / re-positioned), rows = layers at one step or steps of one layer;
- `layer_step_figure`: share of cache slots that differ, per layer and step;
- `attention_diff_figure`: the attention matrix of one head, exact | variant | variant − exact;
- `lengths_figure`: cache lengths per step, exact vs variant (kept and attended).
What a variant cache holds at one step (the Cache control):
- `held_rows_figure`: which text tokens each layer / KV head still holds (evicted greyed, sinks marked);
- `evicted_kv_figure`: K and V of one KV head over every token so far, evicted rows greyed;
- `quant_error_figure`: dequantised − exact, per row and channel;
- `accumulated_attention_figure`: the attention each token has received (what H2O ranks), sinks marked.
Quality against memory (the CLI's measurements): `quality_vs_bytes_figure`.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from kvviz.figures.common import (
    CACHED_COLOR,
    DIFF_SCALE,
    HIGHLIGHT,
    VALUE_SCALE,
    WEIGHT_SCALE,
    base_layout_dict,
    show_token,
    token_labels,
)
from kvviz.variants.evidence import STATUS_NAMES

CLEAN_COLOR = CACHED_COLOR
BUGGY_COLOR = HIGHLIGHT
# one colour per K/V slot status, in the order of kvviz.variants.evidence.STATUS_NAMES
STATUS_COLORS = ("#c7ccd6", "#d62728", "#ff9f1c", "#4b4f58", "#9467bd", "#2ca02c")
EVICTED_COLOR = "#b9bec8"  # a row the variant no longer holds
SINK_COLOR = "#9467bd"  # the first rows, where attention parks (StreamingLLM's sinks)
MAX_SLOTS = 96  # slots drawn at most in the status heatmap (the newest ones)
MAX_MATRIX = 48  # rows/columns of attention matrices drawn at most (the newest ones)
COLORBAR = dict(thickness=10, len=0.9, outlinewidth=0)


def _discrete_scale(colors: Sequence[str]) -> list[list[object]]:
    """A colourscale that maps integer z = 0..n-1 (with zmin=-0.5, zmax=n-0.5) to flat colours."""
    n = len(colors)
    scale: list[list[object]] = []
    for i, c in enumerate(colors):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def slot_labels(tokens: Sequence[str], n: int, offset: int = 0) -> list[str]:
    """Labels for cache slots 0..n-1: the slot and the clean token it should hold, or 'extra'.

    `offset` slots in front hold no clean token (slot i should hold clean token i - offset).
    """
    return [f"{i} {show_token(tokens[i - offset])}" if offset <= i < len(tokens) + offset else f"{i} extra"
            for i in range(n)]


def _band(step: int, yref: str = "paper") -> dict:
    """A grey band over one step of a per-step chart (the step on screen)."""
    return dict(type="rect", xref="x", yref=yref, x0=step - 0.5, x1=step + 0.5, y0=0, y1=1,
                fillcolor="rgba(128,128,128,0.15)", line_width=0, layer="below")


def divergence_figure(max_abs_logit_diff: np.ndarray, kl: np.ndarray, *, tolerance: float,
                      current_step: int | None = None, first_step: int | None = None,
                      first_token_step: int | None = None, top1_agree: np.ndarray | None = None) -> go.Figure:
    """Per-step evidence: max |Δlogit| (steps,) on a log axis with the noise tolerance, KL (steps,) below,
    and (optional) top1_agree (steps,) bool: an ✕ over the KL bar where the top token differs.

    Built in one go (no make_subplots / add_hline): it is rebuilt at every step of Play."""
    steps = np.arange(len(max_abs_logit_diff))
    floor = tolerance / 100  # zeros cannot sit on a log axis: draw them at the floor
    shown = np.maximum(max_abs_logit_diff, floor)
    colors = [BUGGY_COLOR if v > tolerance else CLEAN_COLOR for v in max_abs_logit_diff]
    traces = [
        go.Bar(x=steps, y=shown, marker_color=colors, name="max |Δlogit|", customdata=max_abs_logit_diff,
               hovertemplate="step %{x}<br>max |Δlogit| %{customdata:.3g}<extra></extra>"),
        go.Bar(x=steps, y=kl, marker_color=BUGGY_COLOR, name="KL", xaxis="x2", yaxis="y2",
               hovertemplate="step %{x}<br>KL %{y:.3g} nats<extra></extra>"),
    ]
    if top1_agree is not None and (~top1_agree).any():
        off = np.flatnonzero(~top1_agree)
        traces.append(go.Scatter(x=off, y=kl[off], mode="markers", name="top-1 differs", xaxis="x2", yaxis="y2",
                                 marker=dict(symbol="x", size=9, color="#222"),
                                 hovertemplate="step %{x}: the top token differs<extra></extra>"))
    shapes = [dict(type="line", xref="paper", yref="y", x0=0, x1=1, y0=tolerance, y1=tolerance,
                   line=dict(color="gray", dash="dash", width=1))]
    # dotted: first divergence; dashed: first different token (named in the page's caption)
    for s, dash in ((first_step, "dot"), (first_token_step, "dash")):
        if s is not None:
            shapes += [dict(type="line", xref=x, yref="paper", x0=s, x1=s, y0=y0, y1=y1,
                            line=dict(color=BUGGY_COLOR, dash=dash, width=1.5))
                       for x, y0, y1 in (("x", 0.56, 1.0), ("x2", 0.0, 0.44))]
    if current_step is not None:
        shapes += [_band(current_step) | dict(xref=x, y0=y0, y1=y1) for x, y0, y1 in (("x", 0.56, 1.0), ("x2", 0, 0.44))]
    top = float(np.log10(max(shown.max(), tolerance) * 3))
    layout = base_layout_dict(None, 380) | dict(
        showlegend=False, bargap=0.25, margin=dict(l=10, r=10, t=30, b=10), shapes=shapes,
        xaxis=dict(anchor="y", domain=[0, 1], dtick=1, showticklabels=False, matches="x2"),
        yaxis=dict(type="log", domain=[0.56, 1.0], range=[float(np.log10(floor)), top]),
        xaxis2=dict(anchor="y2", domain=[0, 1], dtick=1, title_text="step (0 = prefill)"),
        yaxis2=dict(domain=[0.0, 0.44], rangemode="tozero"),
        annotations=[
            dict(text="max |Δlogit| (log scale)", xref="paper", yref="paper", x=0.5, y=1.0, yanchor="bottom",
                 showarrow=False, font_size=13),
            dict(text="KL(exact ‖ variant), nats", xref="paper", yref="paper", x=0.5, y=0.44, yanchor="bottom",
                 showarrow=False, font_size=13),
            dict(text=f"tolerance {tolerance:g}", xref="paper", yref="y", x=0, y=float(np.log10(tolerance)),
                 xanchor="left", yanchor="bottom", showarrow=False, font_size=10),
        ],
    )
    return go.Figure(traces, layout)


def kv_status_figure(status: np.ndarray, row_labels: Sequence[str], x_labels: Sequence[str], *,
                     holds: np.ndarray | None = None, title: str | None = None, y_title: str = "layer") -> go.Figure:
    """K/V row diff as categories: status (rows, slots) int codes (STATUS_NAMES), -1 = no slot in either cache.

    `holds` (rows, slots), optional: the exact row a variant slot equals (-1 none), shown on hover.
    Only the newest MAX_SLOTS slots are drawn.
    """
    n_rows, n_slots = status.shape
    start = max(0, n_slots - MAX_SLOTS)
    shown = status[:, start:]
    z = shown.astype(float)
    z[z < 0] = np.nan  # no slot: left blank
    names = np.array([*STATUS_NAMES, ""], dtype=object)  # index -1 -> ""
    text = names[shown]
    if holds is not None:
        h = holds[:, start:]
        moved = (h >= 0) & (shown != 0)
        text = np.where(moved, text + ": holds exact row " + h.astype(str), text)
    layout = base_layout_dict(title, 170 + 24 * n_rows) | dict(
        xaxis=dict(title_text="cache slot (exact token)" + (f" · last {n_slots - start} of {n_slots} slots" if start else ""),
                   tickangle=-60, tickfont=dict(size=9)),
        yaxis=dict(title_text=y_title, autorange="reversed", type="category"),
    )
    return go.Figure(go.Heatmap(
        z=z, x=list(x_labels[start:]), y=list(row_labels), zmin=-0.5, zmax=len(STATUS_NAMES) - 0.5,
        colorscale=_discrete_scale(STATUS_COLORS), xgap=1, ygap=1, text=text,
        hovertemplate=f"{y_title} %{{y}}<br>slot %{{x}}<br>%{{text}}<extra></extra>",
        colorbar=dict(tickvals=list(range(len(STATUS_NAMES))), ticktext=list(STATUS_NAMES), **COLORBAR),
    ), layout)


def layer_step_figure(share: np.ndarray, *, current_step: int | None = None, title: str | None = None) -> go.Figure:
    """Share of cache slots that differ from the exact cache: share (num_layers, steps) in [0, 1]."""
    n_layers, n_steps = share.shape
    shapes = [] if current_step is None else [dict(
        type="rect", x0=current_step - 0.5, x1=current_step + 0.5, y0=-0.5, y1=n_layers - 0.5,
        line=dict(color=HIGHLIGHT, width=2))]
    layout = base_layout_dict(title, 120 + 26 * n_layers) | dict(
        shapes=shapes, xaxis=dict(title_text="step", dtick=1),
        yaxis=dict(title_text="layer", autorange="reversed", type="category"))
    return go.Figure(go.Heatmap(
        z=share, x=list(range(n_steps)), y=[str(i) for i in range(n_layers)], zmin=0, zmax=1,
        colorscale=[[0, STATUS_COLORS[0]], [1e-9, "#fcbba1"], [1, STATUS_COLORS[1]]], xgap=1, ygap=1,
        hovertemplate="layer %{y}, step %{x}<br>%{z:.0%} of slots differ<extra></extra>",
        colorbar=dict(tickformat=".0%", **COLORBAR),
    ), layout)


def _pad(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=np.float32)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def attention_diff_figure(clean: np.ndarray, buggy: np.ndarray, *, query_labels: Sequence[str],
                          clean_key_labels: Sequence[str], buggy_key_labels: Sequence[str],
                          title: str | None = None) -> go.Figure:
    """One head's attention up to a step, exact (rows, cols_c) | variant (rows, cols_b) | variant − exact.

    Slots are aligned by index (the shorter padded with zeros); only the newest MAX_MATRIX query rows
    and key columns are drawn.
    """
    rows = max(clean.shape[0], buggy.shape[0])
    cols = max(clean.shape[1], buggy.shape[1])
    c, b = _pad(clean, (rows, cols)), _pad(buggy, (rows, cols))
    r0, c0 = max(0, rows - MAX_MATRIX), max(0, cols - MAX_MATRIX)
    c, b = c[r0:, c0:], b[r0:, c0:]
    y = list(query_labels)[r0:rows]
    keys = [(clean_key_labels[i] if i < len(clean_key_labels) else
             (buggy_key_labels[i] if i < len(buggy_key_labels) else str(i))) for i in range(c0, cols)]
    hover = "query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>"
    lim = float(max(np.abs(b - c).max(), 1e-6))
    traces = [
        go.Heatmap(z=c, x=keys, y=y, zmin=0, zmax=1, colorscale=WEIGHT_SCALE, showscale=False, hovertemplate=hover),
        go.Heatmap(z=b, x=keys, y=y, zmin=0, zmax=1, colorscale=WEIGHT_SCALE, showscale=False, hovertemplate=hover,
                   xaxis="x2"),
        go.Heatmap(z=b - c, x=keys, y=y, zmid=0, zmin=-lim, zmax=lim, colorscale=DIFF_SCALE, xaxis="x3",
                   colorbar=dict(title=dict(text="Δ", side="right"), **COLORBAR), hovertemplate=hover),
    ]
    note = f" · last {rows - r0} of {rows} rows" if r0 or c0 else ""
    third = 1 / 3
    axis = dict(type="category", showticklabels=False)
    layout = base_layout_dict((title or "") + note if title or note else None, 400) | dict(
        margin=dict(l=10, r=10, t=60, b=10),  # the figure title above the panel titles
        xaxis=axis | dict(domain=[0, third - 0.02]),
        xaxis2=axis | dict(domain=[third + 0.01, 2 * third - 0.01], anchor="y", title_text="key slot"),
        xaxis3=axis | dict(domain=[2 * third + 0.02, 1.0], anchor="y"),
        yaxis=dict(autorange="reversed", type="category", tickfont=dict(size=9)),
        annotations=[dict(text=t, xref="paper", yref="paper", x=x, y=1.0, yanchor="bottom", showarrow=False,
                          font_size=13)
                     for t, x in (("exact", third / 2), ("variant", 0.5), ("variant − exact", 1 - third / 2))],
    )
    return go.Figure(traces, layout)


def lengths_figure(clean: Sequence[int], buggy_kept: Sequence[int], buggy_attended: Sequence[int], *,
                   current_step: int | None = None) -> go.Figure:
    """Cache lengths per step: exact, variant kept (stored after the step) and variant attended over."""
    steps = list(range(len(clean)))
    traces = [
        go.Scatter(x=steps, y=list(clean), name="exact", mode="lines+markers", line=dict(color=CLEAN_COLOR, width=3)),
        go.Scatter(x=steps, y=list(buggy_attended), name="variant: attended", mode="lines+markers",
                   line=dict(color=BUGGY_COLOR, width=2)),
        go.Scatter(x=steps, y=list(buggy_kept), name="variant: kept", mode="lines+markers",
                   line=dict(color=BUGGY_COLOR, width=1, dash="dot"), marker=dict(symbol="x")),
    ]
    layout = base_layout_dict(None, 300) | dict(
        shapes=[] if current_step is None else [_band(current_step)],
        xaxis=dict(title_text="step", dtick=1), yaxis=dict(title_text="cached rows", rangemode="tozero"),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return go.Figure(traces, layout)


# -- what a variant cache holds at one step (the Cache control) -------------------------------------
def held_rows_figure(held: np.ndarray, tokens: Sequence[str], row_labels: Sequence[str], *, sinks: int = 0,
                     title: str | None = None) -> go.Figure:
    """Which text tokens each cache (a layer / KV head per row) still holds: held (rows, tokens) bool.

    Held rows are drawn dark, evicted ones grey, held sink rows (the first `sinks` tokens) purple.
    """
    n_rows, n_tokens = held.shape
    state = np.where(held, 1, 0)
    state[:, : min(sinks, n_tokens)] = np.where(held[:, : min(sinks, n_tokens)], 2, 0)
    names = np.array(["evicted", "held", "held (sink)"], dtype=object)
    layout = base_layout_dict(title, 140 + 22 * n_rows) | dict(
        xaxis=dict(title_text="text token", tickangle=-60, tickfont=dict(size=9), type="category"),
        yaxis=dict(autorange="reversed", type="category", tickfont=dict(size=10)))
    return go.Figure(go.Heatmap(
        z=state, x=token_labels(tokens), y=list(row_labels), zmin=-0.5, zmax=2.5, xgap=1, ygap=1,
        colorscale=_discrete_scale((EVICTED_COLOR, CLEAN_COLOR, SINK_COLOR)), text=names[state], name="held",
        hovertemplate="%{y}<br>token %{x}: %{text}<extra></extra>",
        colorbar=dict(tickvals=[0, 1, 2], ticktext=list(names), **COLORBAR),
    ), layout)


def evicted_kv_figure(keys: np.ndarray, values: np.ndarray, tokens: Sequence[str], held: np.ndarray, *,
                      kv_head: int, sinks: int = 0, max_rows: int = MAX_MATRIX) -> go.Figure:
    """K and V of one KV head over every token so far, (n_tokens, head_dim) each, with the rows the
    variant no longer holds greyed (held: (n_tokens,) bool). Rows are the exact run's k'/v' of each
    token: what an exact cache would hold, and what the variant dropped. Newest `max_rows` rows drawn."""
    n = keys.shape[0]
    if values.shape != keys.shape or held.shape != (n,) or len(tokens) != n:
        raise ValueError(f"K and V must be (n_tokens, head_dim) with one token and one held flag per row, got "
                         f"{keys.shape}, {values.shape}, {held.shape} for {len(tokens)} tokens")
    start = max(0, n - max_rows)
    labels = token_labels(tokens[start:], start)
    gone = ~held[start:]
    grey = np.where(gone[:, None], 1.0, np.nan) * np.ones((1, keys.shape[1]))  # (rows, head_dim)
    traces = []
    for name, matrix, xaxis in (("K", keys, "x"), ("V", values, "x2")):
        z = np.where(gone[:, None], np.nan, matrix[start:])
        bound = float(np.abs(matrix[start:]).max()) or 1.0
        traces.append(go.Heatmap(z=z, y=labels, x=list(range(z.shape[1])), xaxis=xaxis, colorscale=VALUE_SCALE,
                                 zmid=0, zmin=-bound, zmax=bound, name=name, showscale=name == "K",
                                 colorbar=dict(COLORBAR, x=1.0),
                                 hovertemplate=f"{name}[%{{y}}][%{{x}}] = %{{z:.4f}}<extra></extra>"))
        traces.append(go.Heatmap(z=grey, y=labels, x=list(range(z.shape[1])), xaxis=xaxis, showscale=False,
                                 colorscale=[[0, EVICTED_COLOR], [1, EVICTED_COLOR]], name=f"{name} evicted",
                                 hovertemplate="%{y}: evicted<extra></extra>"))
    shapes = [dict(type="rect", xref="paper", yref="y", x0=-0.01, x1=0.0, y0=i - 0.5, y1=i + 0.5,
                   fillcolor=SINK_COLOR, line_width=0) for i in range(max(0, sinks - start))]
    n_gone = int((~held).sum())
    title = f"K and V · KV head {kv_head} · {n - n_gone} of {n} rows held, evicted greyed"
    if start:
        title += f" · last {n - start} rows"
    layout = base_layout_dict(title, max(280, min(620, 100 + 16 * (n - start)))) | dict(
        shapes=shapes,
        yaxis=dict(showgrid=False, autorange="reversed", type="category", tickfont=dict(size=10)),
        xaxis=dict(showgrid=False, domain=[0.0, 0.46], title_text="K · head_dim index"),
        xaxis2=dict(showgrid=False, domain=[0.52, 0.96], title_text="V · head_dim index", anchor="y"))
    return go.Figure(traces, layout)


def quant_error_figure(key_error: np.ndarray, value_error: np.ndarray, tokens: Sequence[str], *, kv_head: int,
                       max_rows: int = MAX_MATRIX) -> go.Figure:
    """Dequantised − exact of one KV head's cache rows: key_error, value_error (rows, head_dim) each."""
    n = key_error.shape[0]
    start = max(0, n - max_rows)
    labels = token_labels(tokens[start:n], start)
    bound = float(max(np.abs(key_error[start:]).max(initial=0), np.abs(value_error[start:]).max(initial=0))) or 1e-6
    traces = [go.Heatmap(z=m[start:], y=labels, x=list(range(m.shape[1])), xaxis=x, colorscale=DIFF_SCALE, zmid=0,
                         zmin=-bound, zmax=bound, name=f"{name} error", showscale=name == "K",
                         colorbar=dict(COLORBAR, x=1.0, title=dict(text="Δ", side="right")),
                         hovertemplate=f"{name}[%{{y}}][%{{x}}]: dequantised − exact = %{{z:.2e}}<extra></extra>")
              for name, m, x in (("K", key_error, "x"), ("V", value_error, "x2"))]
    title = f"Quantisation error · KV head {kv_head} · largest |Δ| {bound:.2g}"
    layout = base_layout_dict(title, max(260, min(620, 100 + 16 * (n - start)))) | dict(
        yaxis=dict(showgrid=False, autorange="reversed", type="category", tickfont=dict(size=10)),
        xaxis=dict(showgrid=False, domain=[0.0, 0.46], title_text="K · head_dim index"),
        xaxis2=dict(showgrid=False, domain=[0.52, 0.96], title_text="V · head_dim index", anchor="y"))
    return go.Figure(traces, layout)


def accumulated_attention_figure(received: np.ndarray, tokens: Sequence[str], held: np.ndarray | None = None, *,
                                 sinks: int = 0, kv_head: int = 0, title: str | None = None) -> go.Figure:
    """The attention each token's row has received so far, (n_tokens,): what H2O ranks rows by.

    Sink rows (the first `sinks`) are purple, evicted rows (held False) grey, the rest blue; the
    dashed line is what a row would have if attention were spread evenly."""
    n = len(received)
    held = np.ones(n, dtype=bool) if held is None else held
    colors = np.where(held, CLEAN_COLOR, EVICTED_COLOR).astype(object)
    colors[: min(sinks, n)] = np.where(held[: min(sinks, n)], SINK_COLOR, EVICTED_COLOR)
    state = np.where(held, "held", "evicted").astype(object)
    state[: min(sinks, n)] = np.where(held[: min(sinks, n)], "sink", "evicted sink")
    even = float(received.sum()) / max(n, 1)
    layout = base_layout_dict(title or f"Attention received so far · KV head {kv_head} (what H2O ranks)", 260) | dict(
        bargap=0.15, showlegend=False,
        shapes=[dict(type="line", xref="paper", yref="y", x0=0, x1=1, y0=even, y1=even,
                     line=dict(color="gray", dash="dash", width=1))],
        xaxis=dict(type="category", tickangle=-60, tickfont=dict(size=9)),
        yaxis=dict(title_text="summed weight", rangemode="tozero"))
    return go.Figure(go.Bar(x=token_labels(tokens[:n]), y=received, marker_color=list(colors), name="received",
                            customdata=state, hovertemplate="%{x}<br>%{y:.3f} (%{customdata})<extra></extra>"), layout)


QUALITY_METRICS = {"ppl": "perplexity (held-out text)", "mean_kl": "mean KL(exact ‖ variant), nats",
                   "top1_agree": "top-1 agreement with the exact cache"}


def quality_vs_bytes_figure(rows: Sequence[Mapping[str, object]], *, metric: str = "mean_kl",
                            title: str | None = None) -> go.Figure:
    """Quality against cache bytes: one line per policy/format, one point per budget/setting.

    rows: `kvviz.variants.quality.Quality.to_dict()` dicts, each with a "series" label (the line it
    belongs to) and "label" (the point); x = peak cache bytes of one passage, y = `metric`. The exact
    cache is the star (its ppl_exact, KL 0, top-1 1)."""
    if metric not in QUALITY_METRICS:
        raise ValueError(f"metric must be one of {', '.join(QUALITY_METRICS)}, got {metric!r}")
    series: dict[str, list[Mapping[str, object]]] = {}
    for r in rows:
        series.setdefault(str(r["series"]), []).append(r)
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
    traces = []
    for (name, pts), color in zip(series.items(), palette * 3):
        pts = sorted(pts, key=lambda r: float(r["peak_cache_bytes"]))  # type: ignore[arg-type]
        traces.append(go.Scatter(
            x=[float(r["peak_cache_bytes"]) / 1024 for r in pts], y=[r[metric] for r in pts], mode="lines+markers",  # type: ignore[arg-type]
            name=name, line=dict(color=color), text=[str(r["label"]) for r in pts],
            customdata=[[r["ppl"], r["mean_kl"], r["top1_agree"]] for r in pts],
            hovertemplate=(f"{name} · %{{text}}<br>%{{x:.0f}} KiB<br>ppl %{{customdata[0]:.3f}} · KL "
                           "%{customdata[1]:.3g} · top-1 %{customdata[2]:.1%}<extra></extra>")))
    if rows and metric != "mean_kl":  # the exact cache's KL is 0: off a log axis
        r = rows[0]
        exact_kib = float(r["exact_bytes_per_token"]) * float(r["tokens"]) / float(r["passages"]) / 1024  # type: ignore[arg-type]
        exact_y = {"ppl": r["ppl_exact"], "mean_kl": 0.0, "top1_agree": 1.0}[metric]
        traces.append(go.Scatter(x=[exact_kib], y=[exact_y], mode="markers", name="exact cache",
                                 marker=dict(symbol="star", size=14, color="#222"),
                                 hovertemplate="exact cache<br>%{x:.0f} KiB<extra></extra>"))
    layout = base_layout_dict(title, 440) | dict(
        xaxis=dict(type="log", title_text="peak cache bytes per sequence (KiB, log scale)"),
        yaxis=dict(title_text=QUALITY_METRICS[metric], type="log" if metric == "mean_kl" else "linear"),
        legend=dict(orientation="v", x=1.02, y=1))
    return go.Figure(traces, layout)


# -- the two texts ---------------------------------------------------------------------------------
_TEXT_CSS = """
<style>
.lab-text{display:flex;flex-wrap:wrap;gap:3px;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;line-height:1.3}
.lab-tok{padding:2px 4px;border-radius:4px;white-space:pre}
.lab-prompt{background:rgba(140,155,181,.28)}
.lab-same{background:rgba(31,119,180,.22)}
.lab-diff{background:rgba(255,45,85,.30);outline:1px solid rgba(255,45,85,.8)}
.lab-now{outline:2px dashed #ff2d55}
.lab-later{opacity:.3}
</style>
"""


def text_html(prompt_tokens: Sequence[str], generated: Sequence[str], reference: Sequence[str], step: int) -> str:
    """One run's text as chips: the prompt, then its generated tokens up to `step` (later ones faded).

    Tokens that differ from `reference` (the other run's token at the same step) are marked red; the
    token chosen at `step` is outlined.
    """
    chips = [f'<span class="lab-tok lab-prompt">{html.escape(show_token(t))}</span>' for t in prompt_tokens]
    for i, tok in enumerate(generated):
        cls = ["lab-tok", "lab-diff" if i >= len(reference) or reference[i] != tok else "lab-same"]
        if i == step:
            cls.append("lab-now")
        elif i > step:
            cls.append("lab-later")
        title = f"step {i}" + ("" if cls[1] == "lab-same" else " · differs from the other run")
        chips.append(f'<span class="{" ".join(cls)}" title="{html.escape(title)}">{html.escape(show_token(tok))}</span>')
    return _TEXT_CSS + f'<div class="lab-text">{"".join(chips)}</div>'
