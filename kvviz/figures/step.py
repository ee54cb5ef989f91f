"""Views of the step-through page: one step of one layer and head, and the overviews around it.

Pure builders: numpy arrays and kvviz records in, a `go.Figure` out (the token strip and the
story are HTML / Markdown strings). No torch, no Streamlit, so each view is unit-tested.

What a step shows (transformers' vocabulary, batch dropped):
- q', k', v' of the newest token: (head_dim,) each; k', v' belong to the KV head the query head reads,
- K and V of that KV head: (kv_len, head_dim), one new row per decode step (prefill adds the prompt),
- the attention of q' over every cached position: (kv_len,), and the causal matrix built row by row,
- the next-token distribution (top-k) with the chosen token.

Matrix views draw at most `MAX_POSITIONS` positions, the newest ones, and say so in their title:
Chromium took about 1 s to draw one 256x256 heatmap on our 2-core machines (measured with
`scripts/browser_bench.py`), and a step must redraw in a few hundred milliseconds.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from kvviz.engine.trace import Step, TokenProb
from kvviz.figures.common import (
    CACHED_COLOR,
    HIGHLIGHT,
    VALUE_SCALE,
    WEIGHT_SCALE,
    base_layout_dict,
    show_token,
    token_labels,
)
from kvviz.geometry import human_bytes

MAX_POSITIONS = 48  # rows/columns of K, V and attention heatmaps drawn at most (the newest ones)
MAX_BARS = 256  # positions in the one-row overviews (heads, layers) at most
PROMPT_COLOR = "#8c9bb5"  # prompt positions (token strip, attention bars)
GENERATED_COLOR = CACHED_COLOR  # generated positions
COLORBAR = dict(thickness=10, len=0.9, outlinewidth=0)


def crop_start(n: int, limit: int) -> int:
    """First index kept when only the last `limit` of `n` positions are drawn."""
    return max(0, n - limit)


def _crop_note(start: int, n: int) -> str:
    return f" · last {n - start} of {n}" if start else ""


def _outline_rows(y0: float, y1: float, n_cols: int, xref: str = "x", x_start: int = 0) -> dict:
    """A shape outlining rows y0..y1 (category indices, inclusive) of a heatmap whose n_cols
    columns sit at x = x_start, x_start + 1, ..."""
    return dict(type="rect", xref=xref, x0=x_start - 0.5, x1=x_start + n_cols - 0.5, y0=y0 - 0.5, y1=y1 + 0.5,
                line=dict(color=HIGHLIGHT, width=2), fillcolor="rgba(0,0,0,0)")


def _key_axis(start: int, tokens: Sequence[str], rows: int) -> dict:
    """Heatmap x = cached positions as numbers, each cell's token in its hover (customdata).

    Numbers, not token labels, on purpose: Plotly measures every category label in the browser,
    and rotated token labels made each of these charts cost ~100 ms more per step.
    """
    labels = np.array(token_labels(tokens[start:], start), dtype=object)
    return dict(x=np.arange(start, start + len(labels)), customdata=np.broadcast_to(labels, (rows, len(labels))).tolist())


KEY_AXIS = dict(showgrid=False, title_text="key (cached position)", tickfont=dict(size=10))


def _height(rows: int, per_row: int, extra: int, lo: int, hi: int) -> int:
    """Figure height in px: per_row px a row plus room for title and axes, clamped to [lo, hi]."""
    return int(np.clip(per_row * rows + extra, lo, hi))


def _figure(traces: list, title: str, height: int, shapes: Sequence[dict] = (), **layout: object) -> go.Figure:
    """Data and layout validated in one go: ~4x faster than update_* calls after the fact, which
    matters because every step rebuilds every figure."""
    return go.Figure(data=traces, layout={**base_layout_dict(title, height), "shapes": list(shapes), **layout})


# -- the token strip ---------------------------------------------------------------------------
_STRIP_CSS = """
<style>
.kv-strip{display:flex;flex-wrap:wrap;gap:3px;line-height:1.2;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px}
.kv-tok{padding:2px 5px;border-radius:4px;border:2px solid transparent;white-space:pre}
.kv-prompt{background:rgba(140,155,181,.28)}
.kv-gen{background:rgba(31,119,180,.30)}
.kv-fed{border-color:#ff2d55}
.kv-next{border:2px dashed #ff2d55}
.kv-future{opacity:.35}
.kv-legend{font-size:12px;opacity:.8;margin-top:6px;display:flex;gap:14px;flex-wrap:wrap;align-items:center}
.kv-legend .kv-tok{font-size:11px}
</style>
"""


def token_strip_html(tokens: Sequence[str], token_ids: Sequence[int], n_prompt: int, step: int) -> str:
    """Every token of the run as chips: prompt, generated, the ones fed at `step`, the one it chose.

    tokens, token_ids: the whole run (prompt, then one per recorded step). At step 0 the whole
    prompt is fed; at step t >= 1 the token chosen at step t-1 (position n_prompt + t - 1).
    Tokens recorded after `step` (when scrubbing back) are drawn faded. Hover shows position and id.
    """
    if len(tokens) != len(token_ids):
        raise ValueError(f"tokens ({len(tokens)}) and token_ids ({len(token_ids)}) must have the same length")
    fed = range(0, n_prompt) if step == 0 else range(n_prompt + step - 1, n_prompt + step)
    chosen = n_prompt + step
    chips = []
    for pos, (tok, tid) in enumerate(zip(tokens, token_ids)):
        kind = "prompt" if pos < n_prompt else "generated"
        classes = ["kv-tok", "kv-prompt" if pos < n_prompt else "kv-gen"]
        role = ""
        if pos in fed:
            classes.append("kv-fed")
            role = " · fed in at this step"
        elif pos == chosen:
            classes.append("kv-next")
            role = " · chosen at this step (fed in next)"
        elif pos > chosen:
            classes.append("kv-future")
            role = " · recorded later"
        title = f"position {pos} · id {tid} · {kind}{role}"
        chips.append(f'<span class="{" ".join(classes)}" title="{html.escape(title)}">{html.escape(show_token(tok))}</span>')
    legend = (
        '<div class="kv-legend"><span><span class="kv-tok kv-prompt">prompt</span></span>'
        '<span><span class="kv-tok kv-gen">generated</span></span>'
        '<span><span class="kv-tok kv-fed">fed in</span></span>'
        '<span><span class="kv-tok kv-next">chosen next</span></span>'
        "<span>␣ = space · ⏎ = newline · hover a token for its position and id</span></div>"
    )
    return _STRIP_CSS + f'<div class="kv-strip">{"".join(chips)}</div>' + legend


# -- the newest token's vectors ------------------------------------------------------------------
def qkv_figure(query: np.ndarray, key: np.ndarray, value: np.ndarray, *, head: int, kv_head: int,
               token: str, position: int) -> go.Figure:
    """q', k', v' of one token as three rows of a heatmap.

    query (head_dim,) from query head `head`; key, value (head_dim,) from KV head `kv_head`.
    """
    if not query.shape == key.shape == value.shape or query.ndim != 1:
        raise ValueError(f"q', k', v' must be equal 1-d vectors, got {query.shape}, {key.shape}, {value.shape}")
    z = np.stack([query, key, value])  # (3, head_dim)
    rows = [f"q′ head {head}", f"k′ KV head {kv_head}", f"v′ KV head {kv_head}"]
    bound = float(np.abs(z).max()) or 1.0
    trace = go.Heatmap(
        z=z, y=rows, x=list(range(z.shape[1])), colorscale=VALUE_SCALE, zmid=0, zmin=-bound, zmax=bound,
        colorbar=COLORBAR, name="qkv", hovertemplate="%{y}[%{x}] = %{z:.4f}<extra></extra>",
    )
    return _figure([trace], f"q′ k′ v′ of {position} {show_token(token)}", 190,
                   yaxis=dict(showgrid=False, autorange="reversed"), xaxis=dict(showgrid=False, title_text="head_dim index"))


# -- K and V ------------------------------------------------------------------------------------
def kv_figure(keys: np.ndarray, values: np.ndarray, tokens: Sequence[str], *, kv_head: int, new_rows: int,
              max_rows: int = MAX_POSITIONS) -> go.Figure:
    """K and V of one KV head side by side on shared rows: (kv_len, head_dim) each, newest rows outlined.

    One figure, not two: the shared row labels say "same positions" and the browser lays out one
    plot instead of two on every step. The traces are named "K" and "V" so tests and the browser
    can find them; z has one row per cached position (cropped to the last `max_rows`).
    """
    if keys.ndim != 2 or keys.shape != values.shape or keys.shape[0] != len(tokens):
        raise ValueError(f"K and V must both be (kv_len, head_dim) with one token per row, got {keys.shape} and "
                         f"{values.shape} for {len(tokens)} tokens")
    n = keys.shape[0]
    start = crop_start(n, max_rows)
    labels = token_labels(tokens[start:], start)
    rows = n - start
    first_new = max(n - new_rows, start) - start
    traces, shapes = [], []
    # (name, matrix, x axis, its domain, where its colour bar sits) in paper coordinates
    for name, matrix, xaxis, bar_x in (("K", keys, "x", 0.43), ("V", values, "x2", 0.985)):
        z = matrix[start:]  # (rows shown, head_dim)
        bound = float(np.abs(z).max()) or 1.0
        traces.append(go.Heatmap(
            z=z, y=labels, x=list(range(z.shape[1])), xaxis=xaxis, colorscale=VALUE_SCALE, zmid=0, zmin=-bound,
            zmax=bound, colorbar=dict(COLORBAR, x=bar_x, xanchor="left"), name=name,
            hovertemplate=f"{name}[%{{y}}][%{{x}}] = %{{z:.4f}}<extra></extra>",
        ))
        shapes.append(_outline_rows(first_new, rows - 1, z.shape[1], xref=xaxis))
    return _figure(
        traces, f"K and V · KV head {kv_head} · {n} cached rows{_crop_note(start, n)}", _height(rows, 16, 100, 280, 620),
        shapes=shapes,
        yaxis=dict(showgrid=False, autorange="reversed", type="category", tickfont=dict(size=10)),
        xaxis=dict(showgrid=False, domain=[0.0, 0.40], title_text="K · head_dim index"),
        xaxis2=dict(showgrid=False, domain=[0.555, 0.955], title_text="V · head_dim index", anchor="y"),
    )


# -- attention ----------------------------------------------------------------------------------
def causal_mask_nan(matrix: np.ndarray) -> np.ndarray:
    """The zero-padded row-by-row attention matrix with the future (above the diagonal) as NaN.

    matrix (rows, cols): row i is query i; when cols > rows (a cache that started non-empty) the
    diagonal is shifted by cols - rows. NaN draws as empty, so the causal triangle is visible.
    """
    rows, cols = matrix.shape
    future = np.triu(np.ones((rows, cols), dtype=bool), k=1 + cols - rows)
    return np.where(future, np.nan, matrix)


def attention_figure(matrix: np.ndarray, tokens: Sequence[str], n_prompt: int, *, head: int, new_rows: int,
                     max_positions: int = MAX_POSITIONS) -> go.Figure:
    """One head's attention: the matrix built row by row, and under it q''s row as bars.

    matrix (rows, cols) as `Trace.attention_matrix` gives it (zero-padded): row i is query
    position cols - rows + i, columns are the cached positions labelled by `tokens`. The bars are
    its last row, the newest query's softmax weights over every cached position, coloured by what
    the position holds (prompt, generated, the new token itself). Both share the key axis, so each
    bar sits under its column; one figure instead of two also halves the browser's work per step.
    """
    rows, cols = matrix.shape
    if cols != len(tokens) or rows > cols:
        raise ValueError(f"attention matrix {matrix.shape} does not fit {len(tokens)} cached tokens")
    r0, c0 = crop_start(rows, max_positions), crop_start(cols, max_positions)
    z = causal_mask_nan(matrix.astype(np.float32))[r0:, c0:]  # (rows shown, cols shown)
    first_row = cols - rows + r0  # position of the first query row shown
    keys = _key_axis(c0, tokens, z.shape[0])
    traces: list = [go.Heatmap(
        z=z, y=token_labels(tokens[first_row:], first_row), **keys, colorscale=WEIGHT_SCALE, zmin=0,
        zmax=float(np.nanmax(z)) if np.isfinite(z).any() else 1.0, hoverongaps=False, showlegend=False,
        colorbar=dict(COLORBAR, title=dict(text="weight", side="right"), y=1.0, yanchor="top", len=0.62),
        name="attention", hovertemplate="query %{y} → key %{customdata}: %{z:.3f}<extra></extra>",
    )]
    pos = keys["x"]
    newest = matrix[-1, c0:]  # (cols shown,) the newest query's weights
    labels = keys["customdata"][0]
    groups = [("prompt", PROMPT_COLOR, pos < n_prompt), ("generated", GENERATED_COLOR, (pos >= n_prompt) & (pos < cols - 1)),
              ("itself (the new token)", HIGHLIGHT, pos == cols - 1)]
    for group, color, mask in groups:
        if mask.any():
            traces.append(go.Bar(
                x=pos[mask], y=newest[mask], yaxis="y2", name=group, marker_color=color,
                customdata=[labels[i] for i in np.flatnonzero(mask)],
                hovertemplate="q′ → %{customdata}: %{y:.3f}<extra>" + group + "</extra>",
            ))
    first_new = max(rows - new_rows, r0) - r0
    return _figure(
        traces, f"attention, head {head}: {rows} query rows{_crop_note(r0, rows)}", _height(z.shape[0], 13, 260, 430, 780),
        shapes=[_outline_rows(first_new, z.shape[0] - 1, z.shape[1], x_start=c0)], bargap=0.1,
        yaxis=dict(showgrid=False, autorange="reversed", type="category", title_text="query (one row per step)",
                   tickfont=dict(size=10), domain=[0.36, 1.0]),
        yaxis2=dict(title_text="q′ weight", rangemode="tozero", domain=[0.0, 0.27]),
        xaxis=dict(KEY_AXIS, anchor="y2", range=[c0 - 0.5, cols - 0.5]),
        legend=dict(orientation="h", yanchor="bottom", y=0.28, x=1.0, xanchor="right", font=dict(size=11)),
    )


def next_token_figure(top_k: Sequence[TokenProb], chosen_id: int, chosen_token: str, chosen_prob: float) -> go.Figure:
    """The model's most likely next tokens (temperature 1), the chosen one in the highlight colour.

    A sampled token outside the top-k is added as an extra bar so the choice is always visible.
    """
    items = [(t.token_id, t.token, t.prob) for t in top_k]
    if chosen_id not in {i for i, _, _ in items}:
        items.append((chosen_id, chosen_token, chosen_prob))
    probs = [p for _, _, p in items]
    trace = go.Bar(
        x=probs, y=[f"{show_token(tok)}  ·{tid}" for tid, tok, _ in items], orientation="h", name="next token",
        marker_color=[HIGHLIGHT if tid == chosen_id else GENERATED_COLOR for tid, _, _ in items],
        text=[f"{p:.1%}" for p in probs], textposition="auto", cliponaxis=False,
        hovertemplate="%{y}: p = %{x:.4f}<extra></extra>",
    )
    return _figure(
        [trace], f"next token: {show_token(chosen_token)} (p = {chosen_prob:.1%})", 300,
        yaxis=dict(autorange="reversed", type="category"),
        xaxis=dict(title_text="probability", range=[0, min(1.0, max(probs) * 1.25 + 1e-9)]),
    )


# -- overviews: the newest query row only (a grid of full heatmaps would not stay interactive) ---
def heads_overview_figure(last_rows: np.ndarray, tokens: Sequence[str], kv_head_of: Sequence[int], *,
                          selected_head: int, max_positions: int = MAX_BARS) -> go.Figure:
    """Where each head's newest query looked: (num_heads, kv_len), heads grouped by their KV head.

    Rows are labelled "q3 → kv1" so GQA/MQA sharing reads off the axis; dotted lines separate
    the groups of query heads that read the same K and V.
    """
    num_heads, n = last_rows.shape
    if n != len(tokens) or len(kv_head_of) != num_heads:
        raise ValueError(f"rows {last_rows.shape} do not fit {len(tokens)} tokens and {len(kv_head_of)} heads")
    start = crop_start(n, max_positions)
    z = last_rows[:, start:]
    trace = go.Heatmap(
        z=z, **_key_axis(start, tokens, num_heads), y=[f"q{h} → kv{int(kv_head_of[h])}" for h in range(num_heads)],
        colorscale=WEIGHT_SCALE, zmin=0, colorbar=dict(COLORBAR, title=dict(text="weight", side="right")), name="heads",
        hovertemplate="%{y} → key %{customdata}: %{z:.3f}<extra></extra>",
    )
    separators = [
        dict(type="line", xref="paper", x0=0, x1=1, y0=h - 0.5, y1=h - 0.5,
             line=dict(color="rgba(128,128,128,.9)", width=1, dash="dot"))
        for h in range(1, num_heads) if kv_head_of[h] != kv_head_of[h - 1]
    ]
    return _figure(
        [trace], f"newest query of every head{_crop_note(start, n)}", _height(num_heads, 22, 110, 220, 600),
        shapes=[*separators, _outline_rows(selected_head, selected_head, z.shape[1], x_start=start)],
        yaxis=dict(showgrid=False, autorange="reversed", type="category"),
        xaxis=KEY_AXIS,
    )


def layers_overview_figure(last_rows: Sequence[np.ndarray], tokens: Sequence[str], *, selected_layer: int,
                           max_positions: int = MAX_BARS) -> go.Figure:
    """Where each layer's newest query looked, averaged over its heads: (num_layers, kv_len).

    last_rows: one (num_heads, kv_len) array per layer (the newest query row of each head).
    """
    z_full = np.stack([r.mean(axis=0) for r in last_rows])  # (num_layers, kv_len)
    n = z_full.shape[1]
    if n != len(tokens):
        raise ValueError(f"rows of length {n} do not fit {len(tokens)} tokens")
    start = crop_start(n, max_positions)
    z = z_full[:, start:]
    trace = go.Heatmap(
        z=z, **_key_axis(start, tokens, z.shape[0]), y=[f"layer {i}" for i in range(z.shape[0])], colorscale=WEIGHT_SCALE,
        zmin=0, colorbar=dict(COLORBAR, title=dict(text="mean weight", side="right")), name="layers",
        hovertemplate="%{y} → key %{customdata}: %{z:.3f} (mean over heads)<extra></extra>",
    )
    return _figure(
        [trace], f"newest query of every layer, mean over heads{_crop_note(start, n)}", _height(z.shape[0], 24, 110, 220, 600),
        shapes=[_outline_rows(selected_layer, selected_layer, z.shape[1], x_start=start)],
        yaxis=dict(showgrid=False, autorange="reversed", type="category"),
        xaxis=KEY_AXIS,
    )


# -- live cache size ----------------------------------------------------------------------------
def cache_growth_figure(cache_lens: Sequence[int], bytes_per_token: int, *, current_step: int, dtype: str) -> go.Figure:
    """Cache length (left axis) and cache bytes (right axis, = length x bytes per token) per step."""
    steps = list(range(len(cache_lens)))
    lens = np.asarray(cache_lens, dtype=np.int64)
    top = float(lens.max()) * 1.15 + 1
    # the right axis in the binary unit that suits the largest value (Plotly only knows SI prefixes)
    exponent = min(3, int(np.log2(max(top * bytes_per_token, 1)) // 10))
    unit, scale = ("B", "KiB", "MiB", "GiB")[exponent], 1024.0**exponent
    traces = [
        go.Scatter(x=steps, y=lens, mode="lines+markers", name="cache length", line=dict(color=GENERATED_COLOR),
                   customdata=[human_bytes(b) for b in lens * bytes_per_token],
                   hovertemplate="step %{x}: %{y} positions · %{customdata}<extra></extra>"),
        # the same line in bytes on the right axis: invisible, it only gives that axis its scale
        go.Scatter(x=steps, y=lens * bytes_per_token / scale, yaxis="y2", mode="lines", line=dict(width=0),
                   hoverinfo="skip", showlegend=False, name="cache bytes"),
        go.Scatter(x=[current_step], y=[lens[current_step]], mode="markers", name="shown step",
                   marker=dict(color=HIGHLIGHT, size=11, line=dict(width=0)), hoverinfo="skip"),
    ]
    return _figure(
        traces, f"cache size: {human_bytes(lens[current_step] * bytes_per_token)} at step {current_step}", 260,
        showlegend=False,
        xaxis=dict(title_text="step (0 = prefill)", dtick=max(1, len(steps) // 8)),
        yaxis=dict(title_text="cached positions", range=[0, top]),
        yaxis2=dict(title_text=f"cache {unit} ({dtype})", overlaying="y", side="right",
                    range=[0, top * bytes_per_token / scale], showgrid=False),
    )


# -- words --------------------------------------------------------------------------------------
def kv_sharing_text(kv_head_of: Sequence[int], head: int) -> str:
    """'query heads 3, 4, 5 share KV head 1' (GQA), or the MHA/MQA special cases."""
    kv = int(kv_head_of[head])
    group = [h for h, k in enumerate(kv_head_of) if int(k) == kv]
    n_kv = len({int(k) for k in kv_head_of})
    if len(group) == 1:
        return f"query head {head} has its own KV head {kv} (MHA: {len(kv_head_of)} query heads, {n_kv} KV heads)"
    kind = "MQA" if n_kv == 1 else "GQA"
    return (f"query head {head} reads KV head {kv}: query heads {', '.join(map(str, group))} share it "
            f"({kind}: {len(kv_head_of)} query heads, {n_kv} KV heads)")


def step_story(step: Step, n_prompt: int, *, fed_token: str, num_layers: int, head_dim: int, rope: bool,
               greedy: bool) -> str:
    """The ordered actions of one step, as Markdown. fed_token: the token chosen at the step before."""
    choice = "greedy: the most likely" if greedy else "sampled"
    nxt = f"`{show_token(step.token)}` ({choice}, p = {step.prob:.1%})"
    if step.is_prefill:
        return "\n".join([
            "**Prefill**: the whole prompt in one forward.",
            f"1. **Feed** all {n_prompt} prompt tokens, positions 0…{n_prompt - 1}.",
            f"2. **Project**: each of the {num_layers} layers computes q, k, v for every prompt position at once.",
            f"3. **Store**: K and V of all {n_prompt} positions go into the cache ({n_prompt} rows per layer and KV head).",
            "4. **Attend** with the causal mask: position i sees positions 0…i (the triangle).",
            f"5. **Choose** from the last position's logits: {nxt}.",
            "",
            "Each later step feeds one token; only its q′, k′, v′ are new.",
        ])
    pos = step.positions[-1]
    where = "RoPE rotates q′ and k′ by position" if rope else "the embedding adds position"
    return "\n".join([
        f"**Decode step {step.step}**: one token in, one token out.",
        f"1. **Feed** `{show_token(fed_token)}` (id {step.input_ids[-1]}) at position {pos}.",
        f"2. **Project**: in each of the {num_layers} layers, q′, k′, v′ for this token only "
        f"({head_dim} numbers per head); {where} {pos}.",
        f"3. **Append**: K ← [K; k′], V ← [V; v′]: the cache grows to {step.cache_len} positions.",
        f"4. **Attend**: softmax(q′Kᵀ/√{head_dim}) over all {step.cache_len} cached positions: the prompt, "
        "every generated token, and itself. No mask: nothing cached is in the future.",
        "5. **Mix**: the output is those weights times V; the next layer repeats 2–5.",
        f"6. **Choose** from the last layer's logits: {nxt}.",
    ])



def figures_html(figures: dict[str, go.Figure], title: str) -> str:
    """One self-contained HTML page with every figure (plotly.js inlined once: opens offline)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
             f"<body style='font-family:sans-serif'><h2>{html.escape(title)}</h2>"]
    for i, (name, fig) in enumerate(figures.items()):
        parts.append(f"<h3>{html.escape(name)}</h3>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append("</body></html>")
    return "".join(parts)
