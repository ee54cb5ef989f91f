"""Views of the paged-cache page: several runs of one request stream (before / after a fix, or
the three allocators) compared over time, their time to first token, where their memory goes, and
the animated block table (which request owns which block, which blocks are shared).

Pure builders: `{label: kvviz.economics.paged.SimResult}` in, `go.Figure` out (no torch, no
Streamlit). Runs are coloured by their order (the first, "before", in red). The block table is a
Plotly heatmap animated with frames, a slider and a play button, all in the browser.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from kvviz.economics.blocks import Cell
from kvviz.economics.paged import SimResult, Snapshot
from kvviz.figures.common import base_layout

RUN_COLORS = ("#d62728", "#2ca02c", "#1f77b4", "#9467bd")  # before (red), after (green), ...
CACHED = "#9e9e9e"  # unreferenced prefix block kept for reuse
SHARED = "#1a237e"  # a block several requests hold
FREE = "rgba(160,160,160,0.12)"  # drawn, faintly, so the whole memory's extent shows
OWNER_COLORS = qualitative.Pastel[:10]  # request r is drawn in OWNER_COLORS[r % 10]
# the same colours, faded: slots a request holds but has not written (reserved ahead of need)
RESERVED_COLORS = [c.replace("rgb(", "rgba(").replace(")", ",0.3)") for c in OWNER_COLORS]
N_COLORS = 3 + 2 * len(OWNER_COLORS)
FREE_Z, CACHED_Z, SHARED_Z, OWNER_Z = 0.0, 1.0, 2.0, 3.0  # z of each kind of cell; owners from 3 on


def run_color(i: int) -> str:
    return RUN_COLORS[i % len(RUN_COLORS)]


def _mib(tokens: int, bytes_per_token: int) -> float:
    return tokens * bytes_per_token / 2**20 if bytes_per_token else float(tokens)


def thin(snapshots: Sequence[Snapshot], max_points: int) -> list[Snapshot]:
    """At most about `max_points` snapshots, evenly spaced, the last one kept (a long run has
    thousands of steps; a line needs no more points than the chart has pixels)."""
    k = max(1, math.ceil(len(snapshots) / max(1, max_points)))
    out = list(snapshots[::k])
    if snapshots and out[-1] is not snapshots[-1]:
        out.append(snapshots[-1])
    return out


def over_time(results: Mapping[str, SimResult], max_points: int = 800) -> go.Figure:
    """Per run, against simulated seconds: KV memory held (solid) and written (dotted) under the
    budget; requests running (solid) and queued (dotted); preemptions so far (solid) and of them
    swaps to CPU (dotted)."""
    any_r = next(iter(results.values()))
    bpt = any_r.bytes_per_token
    unit = "MiB" if bpt else "tokens"
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.45, 0.3, 0.25])
    series = [  # (row, what, value per snapshot, dotted)
        (1, unit + " held", lambda s: _mib(s.reserved_tokens, bpt), False),
        (1, unit + " written", lambda s: _mib(s.used_tokens, bpt), True),
        (2, "running", lambda s: len(s.running), False),
        (2, "queued", lambda s: s.waiting, True),
        (3, "preempted so far", lambda s: s.preemptions, False),
        (3, "swapped to CPU so far", lambda s: s.swaps, True),
    ]
    for i, (label, r) in enumerate(results.items()):
        snaps = thin(r.snapshots, max_points)
        t = [s.time_ms / 1000 for s in snaps]
        for n, (row, what, f, dotted) in enumerate(series):
            fig.add_trace(go.Scatter(
                x=t, y=[f(s) for s in snaps], name=label, legendgroup=label, showlegend=n == 0,
                line=dict(color=run_color(i), width=1 if dotted else 2, dash="dot" if dotted else None, shape="hv"),
                hovertemplate="%{x:.2f} s: %{y:,.1f} " + what + "<extra>" + label + "</extra>",
            ), row=row, col=1)
    budgets = {r.budget_tokens for r in results.values()}
    for b in budgets:
        fig.add_hline(y=_mib(b, bpt), line=dict(color="gray", dash="dash"), row=1, col=1,
                      annotation_text="KV budget", annotation_position="top left")
    fig.update_yaxes(title_text=f"{unit} held / written", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="running / queued", rangemode="tozero", row=2, col=1)
    fig.update_yaxes(title_text="preemptions", rangemode="tozero", row=3, col=1)
    fig.update_xaxes(title_text="simulated time (s)", row=3, col=1)
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return base_layout(fig, height=560)


def ttft(results: Mapping[str, SimResult]) -> go.Figure:
    """Time to first token of every request, per run, as a cumulative share (log time axis): a
    line further left is faster; its right end is the slowest request."""
    fig = go.Figure()
    for i, (label, r) in enumerate(results.items()):
        v = np.sort(np.asarray(r.ttfts(), dtype=float))
        if not v.size:
            continue
        share = np.arange(1, v.size + 1) / v.size * 100
        p95 = float(np.percentile(v, 95))
        fig.add_trace(go.Scatter(
            x=np.maximum(v, 1.0), y=share, name=f"{label} (p95 {p95:,.0f} ms)", mode="lines",
            line=dict(color=run_color(i), width=2, shape="hv"),
            hovertemplate="%{y:.0f}% of requests within %{x:,.0f} ms<extra>" + label + "</extra>",
        ))
    fig.add_hline(y=95, line=dict(color="gray", dash="dot", width=1), annotation_text="95%",
                  annotation_position="bottom right")
    fig.update_xaxes(title_text="time to first token (ms, log scale)", type="log")
    fig.update_yaxes(title_text="% of requests", range=[0, 101])
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return base_layout(fig, height=320)


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
    names = list(results)
    fig = go.Figure()
    for label, f, color in parts:
        y = [100 * float(np.mean([f(s) for s in r.snapshots])) / r.budget_tokens for r in results.values()]
        fig.add_trace(go.Bar(y=names, x=y, name=label, orientation="h", marker_color=color,
                             hovertemplate="%{y}: %{x:.1f}% of the budget<extra>" + label + "</extra>"))
    fig.update_layout(barmode="stack", legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, traceorder="normal"))
    fig.update_xaxes(title_text="% of the KV memory budget (mean over the run)", range=[0, 100])
    fig.update_yaxes(autorange="reversed")
    return base_layout(fig, height=120 + 50 * len(results))


# -- the animated block table -----------------------------------------------------------------
def _colorscale() -> list[list[float | str]]:
    """Discrete scale over z = 0 (free), 1 (cached), 2 (shared), 3..12 (owner r % 10), 13..22 (the
    same owner, nothing written yet)."""
    colors = [FREE, CACHED, SHARED, *OWNER_COLORS, *RESERVED_COLORS]
    n = len(colors)
    scale: list[list[float | str]] = []
    for i, c in enumerate(colors):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def _cell_view(cell: Cell) -> tuple[float, str]:
    """(z, label) of one cell: the colour index and the short text drawn in it."""
    if cell.cached:
        return CACHED_Z, "c"
    if not cell.owners:
        return FREE_Z, ""
    if len(cell.owners) > 1:
        return SHARED_Z, f"×{len(cell.owners)}"
    r = cell.owners[0]
    return (OWNER_Z + len(OWNER_COLORS) if cell.fill == 0 else OWNER_Z) + r % 10, f"R{r}"


def _grid(cells: Sequence[Cell], cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, text, customdata) as arrays of (rows, cols) (customdata: (rows, cols, 2) = block id,
    tokens written). Arrays, not nested lists: Plotly encodes numbers compactly, and the hover
    text is put together in the browser from them."""
    rows = math.ceil(len(cells) / cols)
    z = np.full(rows * cols, np.nan, dtype=np.float32)
    text = np.full(rows * cols, "", dtype=object)
    data = np.full((rows * cols, 2), -1, dtype=np.int32)  # int32: 4 bytes a number in the page, not 8
    for i, c in enumerate(cells):
        z[i], text[i] = _cell_view(c)
        data[i] = (i, c.fill)
    return z.reshape(rows, cols), text.reshape(rows, cols), data.reshape(rows, cols, 2)


def frame_times(results: Mapping[str, SimResult], max_frames: int) -> list[float]:
    """Evenly spaced moments (ms) over the longest run, the first and last included."""
    end = max(r.snapshots[-1].time_ms for r in results.values())
    start = min(r.snapshots[0].time_ms for r in results.values())
    n = max(2, max_frames)
    return [start + i * (end - start) / (n - 1) for i in range(n)]


def _picture_at(r: SimResult, t_ms: float) -> tuple[tuple[Cell, ...], int]:
    """The kept block table closest before `t_ms` (a finished run keeps showing its last one), and its step."""
    best = None
    for s in r.snapshots:
        if s.picture is not None and (best is None or s.time_ms <= t_ms):
            best = s
        if s.time_ms > t_ms and best is not None:
            break
    assert best is not None, "the run kept no block table (simulate with cells=True)"
    return best.cells, best.step


def block_tables(results: Mapping[str, SimResult], max_frames: int = 40, cols: int = 16) -> go.Figure:
    """Each run's memory as a grid of blocks, animated over simulated time.

    A cell is one block of B token slots (for contiguous, one B-slot stretch of the arena). Colour
    = the request holding it (R<id>), pale where reserved but not yet written, dark = shared by
    several (×refcount), grey = cached prefix with no owner ("c"), blank = free. A finished run
    keeps showing its last step. Built as plain data without Plotly's per-element validation
    (an animation holds tens of thousands of cells; the arrays are checked by the tests instead).
    """
    labels = list(results)
    times = frame_times(results, max_frames)
    hover = "block %{customdata[0]}: %{text} (%{customdata[1]} tokens written)<extra></extra>"

    def traces(t_ms: float) -> tuple[list[dict], str]:
        out, bits = [], []
        for i, label in enumerate(labels):
            r = results[label]
            cells, step = _picture_at(r, t_ms)
            z, text, data = _grid(cells, cols)
            out.append(dict(
                type="heatmap", z=z, text=text, customdata=data, texttemplate="%{text}", textfont=dict(size=8),
                hovertemplate=hover, colorscale=_colorscale(), zmin=-0.5, zmax=N_COLORS - 0.5, showscale=False,
                xgap=1, ygap=1, xaxis=f"x{i + 1 if i else ''}", yaxis=f"y{i + 1 if i else ''}",
            ))
            s = r.snapshots[step]
            bits.append(f"{label}: {len(s.running)} running, {s.waiting} queued")
        return out, f"{t_ms / 1000:.1f} s · " + " · ".join(bits)

    frames, caption0, first = [], "", []
    for i, t in enumerate(times):
        data, caption = traces(t)
        if i == 0:
            first, caption0 = data, caption
        frames.append(dict(data=data, name=str(i), traces=list(range(len(labels))), layout=dict(title_text=caption)))
    n_rows = max(z["z"].shape[0] for z in first)
    grid = make_subplots(rows=1, cols=len(labels), subplot_titles=labels, horizontal_spacing=0.03)
    axis = dict(showticklabels=False, showgrid=False, zeroline=False, ticks="", showline=False)
    grid.update_xaxes(**axis)
    grid.update_yaxes(**axis, autorange="reversed")
    play = dict(frame=dict(duration=350, redraw=True), fromcurrent=True, transition=dict(duration=0))
    grid.update_layout(
        updatemenus=[dict(type="buttons", direction="left", x=0, y=-0.02, xanchor="left", yanchor="top", showactive=False,
                          buttons=[dict(label="▶ Play", method="animate", args=[None, play]),
                                   dict(label="❚❚ Pause", method="animate",
                                        args=[[None], dict(frame=dict(duration=0, redraw=False), mode="immediate")])])],
        sliders=[dict(active=0, x=0.16, len=0.84, y=-0.02, yanchor="top", currentvalue=dict(prefix="t = ", suffix=" s"),
                      steps=[dict(label=f"{t / 1000:.1f}", method="animate",
                                  args=[[f["name"]], dict(mode="immediate", frame=dict(duration=0, redraw=True))])
                             for f, t in zip(frames, times)])],
    )
    base_layout(grid, title=caption0, height=max(320, 24 * n_rows + 170))
    grid.update_layout(margin=dict(t=70, b=80))
    return go.Figure(dict(data=first, layout=grid.layout.to_plotly_json(), frames=frames), _validate=False)
