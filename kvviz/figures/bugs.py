"""Views of the Bug lab: a clean and a buggy run side by side, and where they part.

Pure builders: numpy arrays and plain values in, a `go.Figure` out. No torch, no Streamlit.
- `divergence_figure`: per step, max |Δlogit| (log scale, with the tolerance) and KL(clean‖buggy);
- `kv_status_figure`: the K/V row diff as categories per slot (same / wrong / shifted / missing /
  extra), rows = layers at one step or steps of one layer;
- `layer_step_figure`: share of cache slots that differ, per layer and step (the first layer that differs
  stands out);
- `attention_diff_figure`: the attention matrix of one head, clean | buggy | buggy − clean;
- `lengths_figure`: cache lengths per step, clean vs buggy (kept and attended).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kvviz.figures.common import CACHED_COLOR, DIFF_SCALE, HIGHLIGHT, WEIGHT_SCALE, base_layout, discrete_scale, show_token

CLEAN_COLOR = CACHED_COLOR
BUGGY_COLOR = HIGHLIGHT
# one colour per K/V slot status, in the order of kvviz.variants.diagnose.STATUS_NAMES
STATUS_NAMES = ("same", "wrong", "shifted", "missing", "extra")
STATUS_COLORS = ("#c7ccd6", "#d62728", "#ff9f1c", "#4b4f58", "#9467bd")
MAX_SLOTS = 96  # slots drawn at most in the status heatmap (the newest ones)
MAX_MATRIX = 48  # rows/columns of attention matrices drawn at most (the newest ones)
COLORBAR = dict(thickness=10, len=0.9, outlinewidth=0)


def slot_labels(tokens: Sequence[str], n: int, offset: int = 0) -> list[str]:
    """Labels for cache slots 0..n-1: the slot and the clean token it should hold, or 'extra'.

    `offset` slots in front hold no clean token (slot i should hold clean token i - offset).
    """
    return [f"{i} {show_token(tokens[i - offset])}" if offset <= i < len(tokens) + offset else f"{i} extra"
            for i in range(n)]


def divergence_figure(max_abs_logit_diff: np.ndarray, kl: np.ndarray, *, tolerance: float,
                      current_step: int | None = None, first_step: int | None = None,
                      first_token_step: int | None = None) -> go.Figure:
    """Per-step evidence: max |Δlogit| (steps,) on a log axis with the noise tolerance, and KL (steps,)."""
    steps = np.arange(len(max_abs_logit_diff))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=("max |Δlogit| (log scale)", "KL(clean ‖ buggy), nats"))
    floor = tolerance / 100  # zeros cannot sit on a log axis: draw them at the floor
    shown = np.maximum(max_abs_logit_diff, floor)
    colors = [BUGGY_COLOR if v > tolerance else CLEAN_COLOR for v in max_abs_logit_diff]
    fig.add_trace(go.Bar(x=steps, y=shown, marker_color=colors, name="max |Δlogit|",
                         customdata=max_abs_logit_diff,
                         hovertemplate="step %{x}<br>max |Δlogit| %{customdata:.3g}<extra></extra>"), row=1, col=1)
    fig.add_hline(y=tolerance, line=dict(color="gray", dash="dash", width=1), row=1, col=1,
                  annotation_text=f"tolerance {tolerance:g}", annotation_position="top left",
                  annotation_font_size=10)
    fig.add_trace(go.Bar(x=steps, y=kl, marker_color=BUGGY_COLOR, name="KL",
                         hovertemplate="step %{x}<br>KL %{y:.3g} nats<extra></extra>"), row=2, col=1)
    fig.update_yaxes(type="log", row=1, col=1, range=[np.log10(floor), np.log10(max(shown.max(), tolerance) * 3)])
    fig.update_yaxes(rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="step (0 = prefill)", dtick=1, row=2, col=1)
    # dotted: first divergence; dashed: first different token (named in the page's caption)
    for s, dash in ((first_step, "dot"), (first_token_step, "dash")):
        if s is not None:
            fig.add_vline(x=s, line=dict(color=BUGGY_COLOR, dash=dash, width=1.5))
    if current_step is not None:
        fig.add_vrect(x0=current_step - 0.5, x1=current_step + 0.5, fillcolor="rgba(128,128,128,0.15)", line_width=0)
    base_layout(fig, height=380)
    fig.update_layout(showlegend=False, bargap=0.25, margin=dict(t=30))  # room for the subplot titles
    return fig


def kv_status_figure(status: np.ndarray, row_labels: Sequence[str], x_labels: Sequence[str], *,
                     holds: np.ndarray | None = None, title: str | None = None, y_title: str = "layer") -> go.Figure:
    """K/V row diff as categories: status (rows, slots) int codes 0..4, -1 = no slot in either cache.

    `holds` (rows, slots), optional: the clean row a buggy slot equals (-1 none), shown on hover.
    Only the newest MAX_SLOTS slots are drawn.
    """
    n_rows, n_slots = status.shape
    start = max(0, n_slots - MAX_SLOTS)
    z = status[:, start:].astype(float)
    z[z < 0] = np.nan  # no slot: left blank
    labels = list(x_labels[start:])
    text = np.full(z.shape, "", dtype=object)
    for r in range(n_rows):
        for c in range(z.shape[1]):
            code = status[r, start + c]
            if code < 0:
                continue
            t = STATUS_NAMES[code]
            if holds is not None and holds[r, start + c] >= 0 and code != 0:
                t += f": holds clean row {holds[r, start + c]}"
            text[r, c] = t
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=list(row_labels), zmin=-0.5, zmax=len(STATUS_NAMES) - 0.5,
        colorscale=discrete_scale(STATUS_COLORS), xgap=1, ygap=1, text=text,
        hovertemplate=f"{y_title} %{{y}}<br>slot %{{x}}<br>%{{text}}<extra></extra>",
        colorbar=dict(tickvals=list(range(len(STATUS_NAMES))), ticktext=list(STATUS_NAMES), **COLORBAR),
    ))
    note = f" · last {n_slots - start} of {n_slots} slots" if start else ""
    fig.update_xaxes(title_text="cache slot (clean token)" + note, tickangle=-60, tickfont=dict(size=9))
    fig.update_yaxes(title_text=y_title, autorange="reversed", type="category")
    return base_layout(fig, title, height=170 + 24 * n_rows)


def layer_step_figure(share: np.ndarray, *, current_step: int | None = None, title: str | None = None) -> go.Figure:
    """Share of cache slots that differ from the clean cache: share (num_layers, steps) in [0, 1]."""
    n_layers, n_steps = share.shape
    fig = go.Figure(go.Heatmap(
        z=share, x=list(range(n_steps)), y=[str(i) for i in range(n_layers)], zmin=0, zmax=1,
        colorscale=[[0, STATUS_COLORS[0]], [1e-9, "#fcbba1"], [1, STATUS_COLORS[1]]], xgap=1, ygap=1,
        hovertemplate="layer %{y}, step %{x}<br>%{z:.0%} of slots differ<extra></extra>",
        colorbar=dict(tickformat=".0%", **COLORBAR),
    ))
    if current_step is not None:
        fig.add_shape(type="rect", x0=current_step - 0.5, x1=current_step + 0.5, y0=-0.5, y1=n_layers - 0.5,
                      line=dict(color=HIGHLIGHT, width=2))
    fig.update_xaxes(title_text="step", dtick=1)
    fig.update_yaxes(title_text="layer", autorange="reversed", type="category")
    return base_layout(fig, title, height=120 + 26 * n_layers)


def _pad(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=np.float32)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def attention_diff_figure(clean: np.ndarray, buggy: np.ndarray, *, query_labels: Sequence[str],
                          clean_key_labels: Sequence[str], buggy_key_labels: Sequence[str],
                          title: str | None = None) -> go.Figure:
    """One head's attention up to a step, clean (rows, cols_c) | buggy (rows, cols_b) | buggy − clean.

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
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=("clean", "buggy", "buggy − clean"))
    hover = "query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>"
    fig.add_trace(go.Heatmap(z=c, x=keys, y=y, zmin=0, zmax=1, colorscale=WEIGHT_SCALE, showscale=False,
                             hovertemplate=hover), row=1, col=1)
    fig.add_trace(go.Heatmap(z=b, x=keys, y=y, zmin=0, zmax=1, colorscale=WEIGHT_SCALE, showscale=False,
                             hovertemplate=hover), row=1, col=2)
    lim = float(max(np.abs(b - c).max(), 1e-6))
    fig.add_trace(go.Heatmap(z=b - c, x=keys, y=y, zmid=0, zmin=-lim, zmax=lim, colorscale=DIFF_SCALE,
                             colorbar=dict(title=dict(text="Δ", side="right"), **COLORBAR),
                             hovertemplate=hover), row=1, col=3)
    fig.update_yaxes(autorange="reversed", type="category", tickfont=dict(size=9))
    fig.update_xaxes(type="category", showticklabels=False)
    fig.update_xaxes(title_text="key slot", row=1, col=2)
    note = f" · last {rows - r0} of {rows} rows" if r0 or c0 else ""
    base_layout(fig, (title or "") + note if title or note else None, height=400)
    fig.update_layout(margin=dict(t=60))  # the figure title above the subplot titles
    return fig


def lengths_figure(clean: Sequence[int], buggy_kept: Sequence[int], buggy_attended: Sequence[int], *,
                   current_step: int | None = None) -> go.Figure:
    """Cache lengths per step: clean, buggy kept (stored after the step) and buggy attended over."""
    steps = list(range(len(clean)))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=steps, y=list(clean), name="clean", mode="lines+markers",
                             line=dict(color=CLEAN_COLOR, width=3)))
    fig.add_trace(go.Scatter(x=steps, y=list(buggy_attended), name="buggy: attended", mode="lines+markers",
                             line=dict(color=BUGGY_COLOR, width=2)))
    fig.add_trace(go.Scatter(x=steps, y=list(buggy_kept), name="buggy: kept", mode="lines+markers",
                             line=dict(color=BUGGY_COLOR, width=1, dash="dot"), marker=dict(symbol="x")))
    if current_step is not None:
        fig.add_vrect(x0=current_step - 0.5, x1=current_step + 0.5, fillcolor="rgba(128,128,128,0.15)", line_width=0)
    fig.update_xaxes(title_text="step", dtick=1)
    fig.update_yaxes(title_text="cached rows", rangemode="tozero")
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return base_layout(fig, height=300)


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
