"""Views of the "Check yourself" page: the tied-QKV what-if beside the real head.

Pure builders: arrays and token labels in, a `go.Figure` out (kvviz.quiz.whatif makes the arrays).
A (T, T) attention matrix: row i is the query at position i, column j the key at position j;
above the diagonal is the future, drawn empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from kvviz.figures.common import CACHED_COLOR, HIGHLIGHT, WEIGHT_SCALE, base_layout_dict, token_labels

REAL_COLOR = CACHED_COLOR
TIED_COLOR = HIGHLIGHT


def causal_mask_nan(matrix: np.ndarray) -> np.ndarray:
    """The zero-padded row-by-row attention matrix with the future (above the diagonal) as NaN.

    matrix (rows, cols): row i is query i; when cols > rows (a cache that started non-empty) the
    diagonal is shifted by cols - rows. NaN draws as empty, so the causal triangle is visible.
    """
    rows, cols = matrix.shape
    future = np.triu(np.ones((rows, cols), dtype=bool), k=1 + cols - rows)
    return np.where(future, np.nan, matrix)


def _check(matrix: np.ndarray, tokens: Sequence[str]) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(tokens):
        raise ValueError(f"attention matrix {matrix.shape} must be square with one row per token ({len(tokens)} tokens)")


def tied_attention_figure(matrix: np.ndarray, tokens: Sequence[str], title: str) -> go.Figure:
    """One head's whole-text attention as a causal heatmap: the diagonal (each query's own position) is its edge."""
    _check(matrix, tokens)
    labels = token_labels(tokens)
    z = causal_mask_nan(matrix.astype(np.float32))  # (T, T), NaN above the diagonal
    n = len(tokens)
    heat = go.Heatmap(
        z=z, x=labels, y=labels, colorscale=WEIGHT_SCALE, zmin=0, zmax=1, hoverongaps=False, name="attention",
        colorbar=dict(thickness=10, outlinewidth=0, title=dict(text="weight", side="right")),
        hovertemplate="query %{y} → key %{x}: %{z:.3f}<extra></extra>",
    )
    return go.Figure(data=[heat], layout={
        **base_layout_dict(title, int(np.clip(14 * n + 150, 300, 560))),
        "xaxis": dict(type="category", title_text="key (position)", tickangle=-60, tickfont=dict(size=9), showgrid=False),
        "yaxis": dict(type="category", title_text="query", autorange="reversed", tickfont=dict(size=9), showgrid=False),
    })


def own_weight_figure(real: np.ndarray, tied: np.ndarray, tokens: Sequence[str], title: str) -> go.Figure:
    """Each query's weight on its own position, real vs what-if: the diagonals of the two matrices as bars."""
    _check(real, tokens)
    _check(tied, tokens)
    labels = token_labels(tokens)
    bars = [go.Bar(x=labels, y=np.diagonal(m).astype(np.float32), name=name, marker_color=color,
                   hovertemplate="query %{x}: %{y:.3f} on itself<extra>" + name + "</extra>")
            for m, name, color in ((real, "real W_k, W_v", REAL_COLOR), (tied, "W_k = W_v = W_q", TIED_COLOR))]
    return go.Figure(data=bars, layout={
        **base_layout_dict(title, 340), "barmode": "group", "bargap": 0.15,
        "xaxis": dict(type="category", tickangle=-60, tickfont=dict(size=9)),
        "yaxis": dict(title_text="weight on itself", range=[0, 1.05]),
        "legend": dict(orientation="h", yanchor="top", y=-0.42, x=0.0, xanchor="left"),
    })
