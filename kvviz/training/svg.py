"""A small dependency-free SVG heatmap: the model card's picture of per-head scores.

One panel per score (e.g. sink and induction), layers down, query heads across, the value
printed in every cell. Plain SVG 1.1 text, so it renders on GitHub and in any browser, and a
diff of it is readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

CELL = 38  # px per cell
LEFT = 34  # room for the "L0" row labels
TOP = 44  # room for the panel title and the "H0" column labels
GAP = 26  # between panels


def _fill(v: float) -> str:
    """White (0) to dark blue (1), linear in each channel; values are clipped to [0, 1]."""
    v = min(1.0, max(0.0, v))
    lo, hi = (255, 255, 255), (8, 48, 107)
    r, g, b = (round(a + (c - a) * v) for a, c in zip(lo, hi))
    return f"#{r:02x}{g:02x}{b:02x}"


def _panel(title: str, values: Sequence[Sequence[float]], x0: int) -> list[str]:
    """SVG elements of one panel whose left edge is at ``x0``; values is (num_layers, num_heads)."""
    n_heads = len(values[0])
    out = [f'<text x="{x0 + LEFT}" y="14" font-weight="bold">{escape(title)}</text>']
    out += [f'<text x="{x0 + LEFT + (h + 0.5) * CELL}" y="{TOP - 8}" text-anchor="middle">H{h}</text>' for h in range(n_heads)]
    for li, row in enumerate(values):
        y = TOP + li * CELL
        out.append(f'<text x="{x0 + LEFT - 6}" y="{y + CELL / 2 + 4}" text-anchor="end">L{li}</text>')
        for h, v in enumerate(row):
            x = x0 + LEFT + h * CELL
            ink = "#ffffff" if v >= 0.55 else "#000000"
            out.append(f'<rect x="{x}" y="{y}" width="{CELL}" height="{CELL}" fill="{_fill(v)}" stroke="#cccccc"/>')
            out.append(f'<text x="{x + CELL / 2}" y="{y + CELL / 2 + 4}" text-anchor="middle" fill="{ink}">{v:.2f}</text>')
    return out


def heatmap_svg(panels: Sequence[tuple[str, Sequence[Sequence[float]]]], caption: str = "") -> str:
    """An SVG document with one heatmap per ``(title, values)``, values (num_layers, num_heads)
    in [0, 1], side by side; ``caption`` goes underneath."""
    n_layers, n_heads = len(panels[0][1]), len(panels[0][1][0])
    panel_w = LEFT + n_heads * CELL
    width = len(panels) * panel_w + (len(panels) - 1) * GAP + 8
    height = TOP + n_layers * CELL + (26 if caption else 8)
    body = []
    for i, (title, values) in enumerate(panels):
        body += _panel(title, values, i * (panel_w + GAP))
    if caption:
        body.append(f'<text x="{LEFT}" y="{height - 8}" fill="#555555">{escape(caption)}</text>')
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            'font-family="Helvetica, Arial, sans-serif" font-size="11">',
            f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
            *body,
            "</svg>",
            "",
        ]
    )
