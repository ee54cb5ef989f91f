"""Views of the paged-cache page: memory over time, where the memory goes, and the animated
block table (which request owns which block, which blocks are shared).

Pure builders: `kvviz.economics.paged.SimResult` in, `go.Figure` out (no torch, no Streamlit). The block
table is a Plotly heatmap animated with frames, a slider and a play button.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from kvviz.economics.paged import STRATEGIES, Cell, SimResult
from kvviz.figures.common import base_layout

STRATEGY_COLORS = {"contiguous": "#d62728", "paged": "#1f77b4", "prefix": "#2ca02c"}
CACHED = "#9e9e9e"  # unreferenced prefix block kept for reuse
SHARED = "#1a237e"  # a block several requests hold
OWNER_COLORS = qualitative.Pastel[:10]  # request r is drawn in OWNER_COLORS[r % 10]
# the same colours, faded: slots a request holds but has not written (reserved ahead of need)
RESERVED_COLORS = [c.replace("rgb(", "rgba(").replace(")", ",0.3)") for c in OWNER_COLORS]
N_COLORS = 2 + 2 * len(OWNER_COLORS)


def _mib(tokens: int, bytes_per_token: int) -> float:
    return tokens * bytes_per_token / 2**20 if bytes_per_token else float(tokens)


def memory_over_time(results: Mapping[str, SimResult]) -> go.Figure:
    """Memory held (top) and requests running (bottom) at every step, per strategy."""
    any_r = next(iter(results.values()))
    bpt = any_r.bytes_per_token
    unit = "MiB" if bpt else "tokens"
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.6, 0.4])
    for key, r in results.items():
        steps = [s.step for s in r.snapshots]
        color = STRATEGY_COLORS[key]
        fig.add_trace(go.Scatter(x=steps, y=[_mib(s.reserved_tokens, bpt) for s in r.snapshots], name=STRATEGIES[key],
                                 legendgroup=key, line=dict(color=color, width=2),
                                 hovertemplate="step %{x}: %{y:.1f} " + unit + " held<extra>" + STRATEGIES[key] + "</extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=steps, y=[_mib(s.used_tokens, bpt) for s in r.snapshots], name="of which written",
                                 legendgroup=key, showlegend=False, line=dict(color=color, width=1, dash="dot"),
                                 hovertemplate="step %{x}: %{y:.1f} " + unit + " written<extra>" + STRATEGIES[key] + "</extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=steps, y=[len(s.running) for s in r.snapshots], name=STRATEGIES[key], legendgroup=key,
                                 showlegend=False, line=dict(color=color, width=2, shape="hv"),
                                 hovertemplate="step %{x}: %{y} running<extra>" + STRATEGIES[key] + "</extra>"),
                      row=2, col=1)
    fig.add_hline(y=_mib(any_r.budget_tokens, bpt), line=dict(color="gray", dash="dash"), row=1, col=1,
                  annotation_text="budget", annotation_position="top left")
    fig.update_yaxes(title_text=f"{unit} held (solid) / written (dotted)", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="requests running", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="step (one decode token per running request)", row=2, col=1)
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return base_layout(fig, height=480)


def where_memory_goes(results: Mapping[str, SimResult]) -> go.Figure:
    """Share of the budget, averaged over the run: written K/V, internal and external
    fragmentation, cached prefixes, free."""
    parts = [
        ("written K/V", lambda s: s.used_tokens, "#2ca02c"),
        ("internal fragmentation", lambda s: s.internal_frag_tokens, "#ff7f0e"),
        ("external fragmentation", lambda s: s.external_frag_tokens, "#d62728"),
        ("cached prefix (reclaimable)", lambda s: s.cached_tokens, CACHED),
        ("free", lambda s: s.free_tokens - s.external_frag_tokens, "rgba(160,160,160,0.25)"),
    ]
    names = [STRATEGIES[k] for k in results]
    fig = go.Figure()
    for label, f, color in parts:
        y = [100 * float(np.mean([f(s) for s in r.snapshots])) / r.budget_tokens for r in results.values()]
        fig.add_trace(go.Bar(y=names, x=y, name=label, orientation="h", marker_color=color,
                             hovertemplate="%{y}: %{x:.1f}% of the budget<extra>" + label + "</extra>"))
    fig.update_layout(barmode="stack", legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, traceorder="normal"))
    fig.update_xaxes(title_text="% of the memory budget (mean over the run)", range=[0, 100])
    fig.update_yaxes(autorange="reversed")
    return base_layout(fig, height=260)


# -- the animated block table -----------------------------------------------------------------
def _colorscale() -> list[list[float | str]]:
    """Discrete scale over z = 0 (cached), 1 (shared), 2..11 (owner r % 10), 12..21 (the same
    owner, nothing written yet)."""
    colors = [CACHED, SHARED, *OWNER_COLORS, *RESERVED_COLORS]
    n = len(colors)
    scale: list[list[float | str]] = []
    for i, c in enumerate(colors):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def _cell_view(cell: Cell, block: int, block_size: int) -> tuple[float, str, str]:
    """(z, text, hover) of one cell."""
    if cell.cached:
        return 0.0, "c", f"block {block}: cached prefix, no owner (evictable)"
    if not cell.owners:
        return math.nan, "", f"block {block}: free"
    fill = f"{cell.fill}/{block_size} tokens"
    if len(cell.owners) > 1:
        who = ", ".join(f"R{r}" for r in cell.owners[:8]) + (" …" if len(cell.owners) > 8 else "")
        return 1.0, f"×{len(cell.owners)}", f"block {block}: shared by {who} (refcount {len(cell.owners)}), {fill}"
    r = cell.owners[0]
    if cell.fill == 0:
        return 2.0 + len(OWNER_COLORS) + r % 10, f"R{r}", f"block {block}: request {r}, reserved, nothing written yet"
    return 2.0 + r % 10, f"R{r}", f"block {block}: request {r}, {fill}"


def _grid(cells: Sequence[Cell], cols: int, block_size: int) -> tuple[list, list, list]:
    rows = math.ceil(len(cells) / cols)
    z = [[math.nan] * cols for _ in range(rows)]
    text = [[""] * cols for _ in range(rows)]
    hover = [[""] * cols for _ in range(rows)]
    for i, c in enumerate(cells):
        z[i // cols][i % cols], text[i // cols][i % cols], hover[i // cols][i % cols] = _cell_view(c, i, block_size)
    return z, text, hover


def frame_steps(results: Mapping[str, SimResult], max_frames: int) -> list[int]:
    """Evenly spaced steps over the longest run (the first and last included)."""
    last = max(r.steps for r in results.values()) - 1
    n = max(2, min(max_frames, last + 1))
    return sorted({round(i * last / (n - 1)) for i in range(n)})


def block_tables(results: Mapping[str, SimResult], max_frames: int = 40, cols: int = 16) -> go.Figure:
    """Each strategy's memory as a grid of blocks, animated over the run.

    A cell is one block of B token slots (for contiguous, one B-slot stretch of the arena). Colour
    = the request holding it (R<id>), dark = shared by several (×refcount), grey = cached prefix
    with no owner, blank = free. A finished run keeps showing its last step.
    """
    keys = list(results)
    steps = frame_steps(results, max_frames)
    bs = next(iter(results.values())).block_size
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[STRATEGIES[k] for k in keys], horizontal_spacing=0.03)

    def traces(step: int) -> list[go.Heatmap]:
        out = []
        for k in keys:
            r = results[k]
            snap = r.snapshots[min(step, r.steps - 1)]
            z, text, hover = _grid(snap.cells, cols, bs)
            out.append(go.Heatmap(
                z=z, text=text, customdata=hover, texttemplate="%{text}", textfont=dict(size=8),
                hovertemplate="%{customdata}<extra></extra>", colorscale=_colorscale(), zmin=-0.5, zmax=N_COLORS - 0.5,
                showscale=False, xgap=1, ygap=1,
            ))
        return out

    def caption(step: int) -> str:
        bits = []
        for k in keys:
            r = results[k]
            s = r.snapshots[min(step, r.steps - 1)]
            bits.append(f"{STRATEGIES[k].split(' (')[0].split(',')[0]}: {len(s.running)} running, {s.waiting} waiting")
        return f"step {step} · " + " · ".join(bits)

    for i, t in enumerate(traces(steps[0])):
        fig.add_trace(t, row=1, col=i + 1)
    fig.frames = [go.Frame(data=traces(s), name=str(s), traces=list(range(len(keys))),
                           layout=go.Layout(title_text=caption(s))) for s in steps]
    n_rows = math.ceil(len(next(iter(results.values())).snapshots[0].cells) / cols)
    for i in range(len(keys)):
        fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, ticks="", showline=False, row=1, col=i + 1)
        fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, ticks="", showline=False,
                         autorange="reversed", row=1, col=i + 1)
    play = dict(frame=dict(duration=350, redraw=True), fromcurrent=True, transition=dict(duration=0))
    fig.update_layout(
        updatemenus=[dict(type="buttons", direction="left", x=0, y=-0.02, xanchor="left", yanchor="top", showactive=False,
                          buttons=[dict(label="▶ Play", method="animate", args=[None, play]),
                                   dict(label="❚❚ Pause", method="animate",
                                        args=[[None], dict(frame=dict(duration=0, redraw=False), mode="immediate")])])],
        sliders=[dict(active=0, x=0.16, len=0.84, y=-0.02, yanchor="top", currentvalue=dict(prefix="step "),
                      steps=[dict(label=str(s), method="animate",
                                  args=[[str(s)], dict(mode="immediate", frame=dict(duration=0, redraw=True))])
                             for s in steps])],
    )
    base_layout(fig, title=caption(steps[0]), height=max(320, 24 * n_rows + 170))
    fig.update_layout(margin=dict(t=70, b=80))
    return fig
