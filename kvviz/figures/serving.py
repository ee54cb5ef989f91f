"""Views of the serving page: reused rows as hits in K and V, the prefix store's blocks per
request, speculative rows appended then cropped (animated), acceptance per step, the beam tree,
and the beam cache's rows reordered step by step (animated).

Pure builders: `kvviz.serving.records` in, `go.Figure` out (no torch, no Streamlit). Animations are
Plotly frames with a slider and Play: they run in the browser, without a rerun.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from kvviz.figures.common import (
    HIGHLIGHT,
    VALUE_SCALE,
    animation_controls,
    base_layout_dict,
    discrete_scale,
    show_token,
    token_labels,
)
from kvviz.serving.records import PROMPT_ROW, BeamRun, ServedRequest, SpecRun

HIT = "#2ca02c"  # rows served from earlier work
COMPUTED = "#1f77b4"  # rows this request computed
PROMPT = "#9aa5b8"  # the prompt's rows (speculation, beams)
REJECTED = "#d62728"  # appended, then cropped
PARTIAL = "#c7c7c7"
MAX_ROWS = 96  # K/V rows drawn at most (the newest)
MAX_COLUMNS = 48  # beam-cache positions drawn at most (the newest)
SLOT_COLORS = qualitative.Plotly  # beam slot b in SLOT_COLORS[b % 10]


def _short(token: str, n: int = 6) -> str:
    t = show_token(token)
    return t if len(t) <= n else t[: n - 1] + "…"


def _legend(names: Sequence[str], colors: Sequence[str]) -> list[go.Scatter]:
    """Legend entries for a heatmap's discrete colours (a colour bar of categories is cramped on a phone)."""
    return [go.Scatter(x=[None], y=[None], mode="markers", name=n, marker=dict(color=c, size=11, symbol="square"),
                       hoverinfo="skip") for n, c in zip(names, colors)]


LEGEND = dict(orientation="h", yanchor="bottom", y=1.0, x=0, font=dict(size=11))


def _figure(traces: list, title: str, height: int, **layout: object) -> go.Figure:
    return go.Figure(data=traces, layout={**base_layout_dict(title, height), **layout})


# -- reuse ----------------------------------------------------------------------------------------
def reuse_rows_figure(req: ServedRequest, layer: int, kv_head: int, max_rows: int = MAX_ROWS) -> go.Figure:
    """This request's cache after its prefill, one KV head of one layer: a hit/computed strip, K, V,
    and each row's largest difference from a cold prefill (all layers), on shared rows."""
    keys, values = req.keys[layer, kv_head], req.values[layer, kv_head]  # (prompt_len, head_dim)
    n = keys.shape[0]
    start = max(0, n - max_rows)
    tokens = [req.token_text.get(i, "?") for i in req.prompt_ids]
    labels = token_labels(tokens[start:], start)
    hit = req.hit[start:]
    block_of = _block_sources(req)
    strip_text = [["hit" if h else "new"] for h in hit]
    strip_hover = [[(f"reused: {block_of.get(start + r, 'the previous turn')}" if h else "computed by this request")]
                   for r, h in enumerate(hit)]
    diff = req.row_diff.max(axis=0)[start:]  # (rows,) over all layers
    floor = 1e-9
    traces = [
        go.Heatmap(z=[[0.0 if h else 1.0] for h in hit], y=labels, x=["row"], xaxis="x",
                   colorscale=discrete_scale([HIT, COMPUTED]), zmin=-0.5, zmax=1.5, showscale=False, text=strip_text,
                   texttemplate="%{text}", textfont=dict(size=9), customdata=strip_hover,
                   hovertemplate="%{y}: %{customdata}<extra></extra>", name="reuse", xgap=1, ygap=1),
    ]
    for name, matrix, xaxis in (("K", keys, "x2"), ("V", values, "x3")):
        z = matrix[start:]
        bound = float(np.abs(z).max()) or 1.0
        # no colour bars: the values are in the hover, and three panels must fit a phone's width
        traces.append(go.Heatmap(z=z, y=labels, xaxis=xaxis, colorscale=VALUE_SCALE, zmid=0, zmin=-bound, zmax=bound,
                                 showscale=False, name=name,
                                 hovertemplate=f"{name}[%{{y}}][%{{x}}] = %{{z:.4f}}<extra></extra>"))
    # markers, not bars: a bar's base at 0 has no place on a log axis
    traces.append(go.Scatter(x=np.maximum(diff, floor), y=labels, xaxis="x4", mode="markers", name="|Δ| vs cold",
                             marker=dict(color=[HIT if h else COMPUTED for h in hit], size=7), customdata=diff,
                             hovertemplate="%{y}: max |Δ| over layers %{customdata:.2g}<extra></extra>"))
    shapes = []
    if req.block_size:
        for b in range(req.block_size, n, req.block_size):
            if b > start:
                shapes.append(dict(type="line", xref="paper", x0=0, x1=1, yref="y", y0=b - start - 0.5, y1=b - start - 0.5,
                                   line=dict(color="rgba(128,128,128,0.6)", width=1, dash="dot")))
    note = f" · last {n - start} of {n} rows" if start else ""
    title = (f"{req.name}: {req.reused_tokens} rows reused (green), {req.computed_tokens} computed (blue) · "
             f"layer {layer}, KV head {kv_head}{note}")
    bound = max(float(diff.max(initial=floor)) * 3, 1e-4)
    return _figure(
        traces, title, int(np.clip(15 * (n - start) + 110, 300, 1500)), shapes=shapes, showlegend=False,
        yaxis=dict(showgrid=False, autorange="reversed", type="category", tickfont=dict(size=10)),
        xaxis=dict(domain=[0.0, 0.06], showticklabels=False, showgrid=False),
        xaxis2=dict(domain=[0.08, 0.45], showgrid=False, title_text="K · head_dim", anchor="y"),
        xaxis3=dict(domain=[0.48, 0.85], showgrid=False, title_text="V · head_dim", anchor="y"),
        xaxis4=dict(domain=[0.88, 1.0], type="log", range=[math.log10(floor), math.log10(bound)], anchor="y",
                    title_text="max |Δ| vs cold", tickfont=dict(size=9)),
    )


def _block_sources(req: ServedRequest) -> dict[int, str]:
    """Position -> where its reused row came from, for hover text."""
    out = {}
    for b in req.blocks:
        if b.status == "hit":
            for i in range(len(b.token_ids)):
                out[b.index * req.block_size + i] = f"block {b.index} ({b.key[:8]}…) computed by {b.source}"
    return out


BLOCK_STATUS = ("hit", "stored", "computed", "partial")
BLOCK_COLORS = (HIT, COMPUTED, "#aec7e8", PARTIAL)


def block_table_figure(requests: Sequence[ServedRequest]) -> go.Figure:
    """Every request of the session (rows) by prompt block (columns): hit, computed and stored, or a
    partial block (never stored). Cells show the first hex digits of the block's name: equal names
    are the same prefix, which is what a hit needs."""
    requests = [r for r in requests if r.block_size]
    if not requests:
        raise ValueError("no requests served through a prefix store yet")
    cols = max(len(r.blocks) for r in requests)
    z = np.full((len(requests), cols), np.nan)
    text = np.full((len(requests), cols), "", dtype=object)
    hover = np.full((len(requests), cols), "", dtype=object)
    for i, r in enumerate(requests):
        for b in r.blocks:
            z[i, b.index] = BLOCK_STATUS.index(b.status)
            text[i, b.index] = b.key[:4] if b.key else "part"
            words = "".join(r.token_text.get(t, "?") for t in b.token_ids)
            origin = f"rows from {b.source}" if b.status == "hit" else b.status
            hover[i, b.index] = f"{r.name} block {b.index}: {origin}<br>{words[:60]!r}<br>name {b.key[:16] or '(partial)'}"
    fig = _figure(
        [go.Heatmap(z=z, text=text, texttemplate="%{text}", textfont=dict(size=10), customdata=hover,
                    hovertemplate="%{customdata}<extra></extra>", colorscale=discrete_scale(BLOCK_COLORS),
                    zmin=-0.5, zmax=len(BLOCK_STATUS) - 0.5, xgap=2, ygap=2, y=[r.name for r in requests],
                    showscale=False, showlegend=False),
         *_legend(BLOCK_STATUS, BLOCK_COLORS)],
        f"The prefix store, request by request (blocks of {requests[0].block_size} tokens)",
        int(np.clip(110 + 34 * len(requests), 200, 640)), legend=LEGEND, margin=dict(l=10, r=10, t=70, b=10),
        xaxis=dict(title_text=f"block b: positions b·{requests[0].block_size} onwards", dtick=1, showgrid=False),
        yaxis=dict(autorange="reversed", type="category", showgrid=False),
    )
    return fig


# -- speculative decoding -------------------------------------------------------------------------
SPEC_STATUS = ("prompt", "generated", "appended, accepted", "appended, rejected")
SPEC_COLORS = (PROMPT, COMPUTED, HIT, REJECTED)


def _spec_frames(run: SpecRun) -> list[tuple[str, list[int], list[int], str]]:
    """(name, token ids of the cache rows, their status codes, caption) before and after each rollback."""
    n_prompt = len(run.prompt_ids)
    rows = list(run.prompt_ids)  # the cache after prefill
    status = [0] * n_prompt
    text = [*run.prompt_ids, run.first_id]
    frames = [("0", list(rows), list(status), f"prefill: {n_prompt} rows · chose {show_token(run.token_text[run.first_id])!r}")]
    for s in run.steps:
        fed = [text[-1], *s.draft_ids]
        verdict = [2] + [2 if i < s.accepted else 3 for i in range(s.proposed)]
        frames.append((f"{s.step}a", rows + fed, status + verdict,
                       f"step {s.step} · verify: fed the last token + {s.proposed} drafted → {s.cache_len_verified} rows"))
        rows = rows + fed[: 1 + s.accepted]
        status = [0] * n_prompt + [1] * (len(rows) - n_prompt)
        text += list(s.new_ids)
        frames.append((f"{s.step}b", list(rows), list(status),
                       f"step {s.step} · crop(-{s.rejected}) → {s.cache_len_after} rows · accepted {s.accepted} of "
                       f"{s.proposed}, then the model's own {show_token(run.token_text[s.new_ids[-1]])!r}"))
    return frames


def speculation_figure(run: SpecRun, cols: int = 16) -> go.Figure:
    """The real cache's rows as cells (wrapped `cols` to a line), animated: each step's verifying
    forward appends the last token and the drafts (green accepted, red rejected), then `crop`
    removes the rejected rows."""
    frames = _spec_frames(run)
    most = max(len(f[1]) for f in frames)
    n_rows = math.ceil(most / cols)

    def trace(ids: list[int], status: list[int]) -> go.Heatmap:
        z = np.full((n_rows, cols), np.nan)
        text = np.full((n_rows, cols), "", dtype=object)
        hover = np.full((n_rows, cols), "", dtype=object)
        for pos, (t, c) in enumerate(zip(ids, status)):
            r, k = divmod(pos, cols)
            z[r, k] = c
            text[r, k] = _short(run.token_text.get(t, "?"))
            hover[r, k] = f"row {pos}: {show_token(run.token_text.get(t, '?'))!r} · {SPEC_STATUS[c]}"
        return go.Heatmap(z=z, text=text, texttemplate="%{text}", textfont=dict(size=9), customdata=hover,
                          hovertemplate="%{customdata}<extra></extra>", colorscale=discrete_scale(SPEC_COLORS),
                          zmin=-0.5, zmax=len(SPEC_COLORS) - 0.5, xgap=1, ygap=1, showscale=False, showlegend=False)

    _, ids0, status0, caption0 = frames[0]
    fig = _figure([trace(ids0, status0), *_legend(SPEC_STATUS, SPEC_COLORS)], caption0,
                  int(np.clip(28 * n_rows + 220, 280, 900)), legend=LEGEND,
                  xaxis=dict(showticklabels=False, showgrid=False, zeroline=False),
                  yaxis=dict(autorange="reversed", showgrid=False, zeroline=False, title_text=f"rows ({cols} per line)",
                             showticklabels=False),
                  margin=dict(l=10, r=10, t=80, b=80))
    # each frame replaces trace 0 only: the legend entries stay
    fig.frames = [go.Frame(data=[trace(ids, st)], traces=[0], name=name, layout=go.Layout(title_text=cap))
                  for name, ids, st, cap in frames]
    # "3↑": step 3's forward appended its rows; "3↓": the crop took the rejected ones off
    labels = [name if name == "0" else (name[:-1] + ("↑" if name.endswith("a") else "↓")) for name, *_ in frames]
    fig.update_layout(**animation_controls([f[0] for f in frames], labels, duration=700, prefix="step "))
    return fig


def acceptance_figure(run: SpecRun) -> go.Figure:
    """Drafted tokens per step, split into accepted and rejected, with the step's acceptance rate."""
    steps = [s.step for s in run.steps]
    rate = [s.acceptance for s in run.steps]
    traces = [
        go.Bar(x=steps, y=[s.accepted for s in run.steps], name="accepted", marker_color=HIT,
               hovertemplate="step %{x}: %{y} accepted<extra></extra>"),
        go.Bar(x=steps, y=[s.rejected for s in run.steps], name="rejected (rows cropped)", marker_color=REJECTED,
               hovertemplate="step %{x}: %{y} rejected<extra></extra>"),
        go.Scatter(x=steps, y=[None if r is None else 100 * r for r in rate], yaxis="y2", name="acceptance %",
                   mode="markers", marker=dict(color=HIGHLIGHT, size=7, symbol="diamond"),
                   hovertemplate="step %{x}: %{y:.0f}% accepted<extra></extra>"),
    ]
    total = "no drafts" if run.acceptance_rate is None else f"{run.acceptance_rate:.0%} of {run.proposed} drafts accepted"
    return _figure(
        traces, f"Acceptance per step · {total} · {1 + len(run.steps)} forwards for {len(run.generated_ids)} tokens", 320,
        barmode="stack",
        xaxis=dict(title_text="step (no bar: no n-gram match, a plain decode step)", dtick=max(1, len(steps) // 16)),
        yaxis=dict(title_text="drafted tokens", rangemode="tozero"),
        yaxis2=dict(overlaying="y", side="right", range=[-5, 105], tickvals=[0, 50, 100], title_text="accepted %",
                    showgrid=False),
        legend=dict(orientation="h", yanchor="top", y=-0.25, x=0), margin=dict(l=10, r=10, t=40, b=10),
    )


# -- beam search ----------------------------------------------------------------------------------
def beam_tree_figure(run: BeamRun) -> go.Figure:
    """Each step's beam slots (y) by step (x), each node the token a slot took, joined to the slot it
    continued (the beam index `reorder_cache` received). Thick: the best hypothesis; dark: the other
    finished hypotheses; grey: beams pruned later. Stars: where a hypothesis finished."""
    n = run.num_beams
    on_best: set[tuple[int, int]] = set()
    on_any: set[tuple[int, int]] = set()
    ends = []  # (x, y, rank, hypothesis, parent slot): stars beside their parent's row, spread when several
    seen: dict[tuple[int, int], int] = {}
    for rank, h in enumerate(run.beams):
        path = [(j, h.parents[j]) for j in range(1, len(h.parents))]  # the slot after step j holding its first j tokens
        on_any.update(path)
        if rank == 0:
            on_best.update(path)
        parent = h.parents[-1] if h.parents else 0
        k = seen[(len(h.ids), parent)] = seen.get((len(h.ids), parent), -1) + 1
        ends.append((len(h.ids), parent + 0.22 * k, rank, h, parent))
    edge_x: dict[str, list] = {"best": [], "kept": [], "pruned": []}
    edge_y: dict[str, list] = {"best": [], "kept": [], "pruned": []}
    nodes: dict[str, tuple[list, list, list, list]] = {k: ([], [], [], []) for k in edge_x}
    for s in run.steps:
        for b, (parent, token, score) in enumerate(zip(s.beam_idx, s.tokens, s.scores)):
            kind = "best" if (s.step, b) in on_best else "kept" if (s.step, b) in on_any else "pruned"
            if score <= -1e8:  # a slot with no live candidate (all ended): not a real beam
                continue
            edge_x[kind] += [s.step - 1, s.step, None]
            edge_y[kind] += [parent if s.step > 1 else 0, b, None]
            xs, ys, ts, hs = nodes[kind]
            xs.append(s.step)
            ys.append(b)
            ts.append(_short(run.token_text.get(token, "?"), 7))
            hs.append(f"step {s.step}, slot {b}: {show_token(run.token_text.get(token, '?'))!r}<br>continues slot {parent}"
                      f" · log p {score:.3f}")
    for x, y, rank, _, parent in ends:  # the last step of each hypothesis: its parent slot to its star
        kind = "best" if rank == 0 else "kept"
        edge_x[kind] += [x - 1, x, None]
        edge_y[kind] += [parent, y, None]
    style = {"best": (HIGHLIGHT, 3.5), "kept": ("#555", 1.8), "pruned": ("rgba(150,150,150,0.45)", 1)}
    traces: list = []
    for kind, (color, width) in style.items():
        traces.append(go.Scatter(x=edge_x[kind], y=edge_y[kind], mode="lines", line=dict(color=color, width=width),
                                 hoverinfo="skip", showlegend=False))
    for kind, (color, _) in style.items():
        xs, ys, ts, hs = nodes[kind]
        traces.append(go.Scatter(x=xs, y=ys, mode="markers+text", text=ts, textposition="top center",
                                 textfont=dict(size=9), marker=dict(color=color, size=9), customdata=hs,
                                 hovertemplate="%{customdata}<extra></extra>", name=kind, showlegend=False))
    prompt = "".join(run.token_text.get(t, "?") for t in run.prompt_ids)
    traces.append(go.Scatter(x=[0], y=[0], mode="markers+text", text=["prompt"], textposition="top center",
                             textfont=dict(size=9), marker=dict(color="#9aa5b8", size=11, symbol="square"),
                             customdata=[f"the prompt ({len(run.prompt_ids)} tokens, prefilled once):<br>{prompt[-80:]!r}"],
                             hovertemplate="%{customdata}<extra></extra>", showlegend=False))
    traces.append(go.Scatter(
        x=[e[0] for e in ends], y=[e[1] for e in ends], mode="markers+text",
        text=[f"#{e[2] + 1}" for e in ends], textposition="middle right", textfont=dict(size=9),
        marker=dict(symbol="star", size=[16 if e[2] == 0 else 11 for e in ends],
                    color=[HIGHLIGHT if e[2] == 0 else "#555" for e in ends]),
        customdata=[f"hypothesis #{e[2] + 1}: score {e[3].score:.4f}<br>{''.join(run.token_text.get(t, '?') for t in e[3].ids)!r}"
                    for e in ends],
        hovertemplate="%{customdata}<extra></extra>", showlegend=False,
    ))
    steps = len(run.steps)
    return _figure(
        traces, f"The beams, step by step ({n} slots; thick: the best of {len(run.beams)} finished hypotheses)",
        int(np.clip(70 * n + 140, 260, 700)),
        xaxis=dict(title_text="step (0 = the prompt)", range=[-0.5, steps + 0.7], dtick=1 if steps <= 24 else 2, showgrid=False),
        yaxis=dict(title_text="beam slot", range=[n - 0.4, -0.6], dtick=1, zeroline=False),
    )


def beam_cache_figure(run: BeamRun, max_columns: int = MAX_COLUMNS) -> go.Figure:
    """The real cache's rows: one line per beam slot, one cell per position, after each step's
    `reorder_cache(beam_idx)`. Colour: the slot whose forward computed the row (grey: the prompt,
    prefilled once). Equal colours in a column are copies of one row: history the beams share."""
    if not run.steps:
        raise ValueError("beam search ran no steps")
    n = run.num_beams
    provs, tokens = run.provenance(), run.row_tokens()
    width = min(max_columns, provs[-1].shape[1])
    last_start = provs[-1].shape[1] - width

    def trace(prov: np.ndarray, tok: np.ndarray) -> go.Heatmap:
        z = np.full((n, width), np.nan)
        text = np.full((n, width), "", dtype=object)
        hover = np.full((n, width), "", dtype=object)
        for (b, pos), code in np.ndenumerate(prov):
            col = pos - last_start
            if col < 0:
                continue
            origin = n if code == PROMPT_ROW else int(code) % n
            z[b, col] = origin
            word = run.token_text.get(int(tok[b, pos]), "?")
            text[b, col] = _short(word, 5)
            sharing = [int(x) for x in np.flatnonzero(prov[:, pos] == code)]
            who = "the prompt's prefill" if code == PROMPT_ROW else f"step {int(code) // n}, slot {origin}"
            hover[b, col] = (f"slot {b}, position {pos}: {show_token(word)!r}<br>row computed by {who}"
                             f"<br>the same row in slots {sharing}")
        colors = [SLOT_COLORS[i % len(SLOT_COLORS)] for i in range(n)] + [PROMPT]
        return go.Heatmap(z=z, x=list(range(last_start, last_start + width)), text=text, texttemplate="%{text}",
                          textfont=dict(size=8), customdata=hover, hovertemplate="%{customdata}<extra></extra>",
                          colorscale=discrete_scale(colors), zmin=-0.5, zmax=n + 0.5, xgap=1, ygap=2, showscale=False)

    def caption(s_idx: int) -> str:
        s, prov = run.steps[s_idx], provs[s_idx]
        distinct = sum(len(set(prov[:, c].tolist())) for c in range(prov.shape[1]))
        return (f"step {s.step} · reorder_cache(beam_idx={list(s.beam_idx)}) · cache {s.cache_shape[0]} × "
                f"{s.cache_shape[1]} rows, {distinct} distinct" + (f" · positions {last_start}+" if last_start else ""))

    fig = _figure([trace(provs[0], tokens[0])], caption(0), int(np.clip(38 * n + 190, 260, 600)),
                  xaxis=dict(showgrid=False, range=[last_start - 0.5, last_start + width - 0.5], side="top",
                             tickfont=dict(size=9)),
                  yaxis=dict(title_text="beam slot", autorange="reversed", dtick=1, showgrid=False),
                  margin=dict(l=10, r=10, t=75, b=90))
    fig.frames = [go.Frame(data=[trace(p, t)], traces=[0], name=str(i), layout=go.Layout(title_text=caption(i)))
                  for i, (p, t) in enumerate(zip(provs, tokens))]
    fig.update_layout(**animation_controls([str(i) for i in range(len(provs))], [str(s.step) for s in run.steps],
                                           duration=600, prefix="step "))
    return fig
