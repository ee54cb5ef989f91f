"""Which heads of a model do something recognisable: a tolerant reader of a checkpoint's `heads.json`.

`python -m kvviz.training.evaluate` writes `heads.json` beside the bundled checkpoint: per layer
and head a few attention shares and a "label", and a "summary" {label: ["L1H3", ...]}. The format
grows between versions (v1: "previous-token", "first-token (sink)", "induction", "mixed"; v2 adds
"sink" and may add a "best" head per label), so this reader takes what it finds and ignores the rest.
A model without the file (hub ids) simply has no labelled heads.

No torch: a plain JSON reader.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNLABELLED = {"mixed", "self", "", "none", "other"}
# the order of the one-click picks and of "the most structured head": the clearest pattern first
PREFERENCE = ("induction", "previous-token", "sink", "first-token")
# the per-head share that measures each label (v1/v2 key names)
SCORE_KEYS = {"induction": ("induction",), "previous-token": ("prev_token", "previous_token"),
              "sink": ("first_token", "sink"), "first-token": ("first_token", "sink")}
HEAD_NAME = re.compile(r"^L(\d+)H(\d+)$")

Head = tuple[int, int]  # (layer, head)


@dataclass(frozen=True)
class HeadLabels:
    """Labelled heads of one model: {label: heads, best first}; empty when nothing is known."""

    labels: dict[str, tuple[Head, ...]] = field(default_factory=dict)

    def picks(self) -> list[tuple[str, Head]]:
        """One (label, head) per label, in PREFERENCE order then the rest: the one-click picks."""
        order = sorted(self.labels, key=lambda name: (_rank(name), name))
        return [(name, self.labels[name][0]) for name in order if self.labels[name]]

    def most_structured(self) -> Head | None:
        """The head to open on: the best head of the most preferred label present, or None."""
        picks = self.picks()
        return picks[0][1] if picks else None


def _rank(label: str) -> int:
    for i, name in enumerate(PREFERENCE):
        if label == name or label.startswith(name):
            return i
    return len(PREFERENCE)


def _canonical(label: str) -> str:
    """v1's "first-token (sink)" and v2's "sink" are the same pattern: one pick named "sink"."""
    label = label.strip().lower()
    return "sink" if "sink" in label or label.startswith("first-token") else label


def _parse_head(value: Any) -> Head | None:
    if isinstance(value, str):
        m = HEAD_NAME.match(value.strip())
        return (int(m.group(1)), int(m.group(2))) if m else None
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, dict) and isinstance(value.get("layer"), int) and isinstance(value.get("head"), int):
        return int(value["layer"]), int(value["head"])
    return None


def _score(layers: list, head: Head, label: str) -> float:
    try:
        entry = layers[head[0]][head[1]]
    except (IndexError, TypeError, KeyError):
        return 0.0
    if not isinstance(entry, dict):
        return 0.0
    for key in SCORE_KEYS.get(label, ()):
        if isinstance(entry.get(key), (int, float)):
            return float(entry[key])
    return 0.0


def parse_heads(data: Any, num_layers: int | None = None, num_heads: int | None = None) -> HeadLabels:
    """HeadLabels from a loaded heads.json (any version); unknown or broken parts are skipped.

    Heads outside (num_layers, num_heads), when given, are dropped: a heads.json from another
    checkpoint must not point the page at a head that does not exist.
    """
    if not isinstance(data, dict):
        return HeadLabels()
    layers = data.get("layers") if isinstance(data.get("layers"), list) else []
    found: dict[str, set[Head]] = {}
    summary = data.get("summary") if isinstance(data.get("summary"), dict) else {}
    for label, heads in summary.items():
        if isinstance(label, str) and isinstance(heads, list):
            found.setdefault(_canonical(label), set()).update(h for h in map(_parse_head, heads) if h)
    for li, row in enumerate(layers):  # per-head labels, in case the summary is missing or partial
        for hi, entry in enumerate(row if isinstance(row, list) else []):
            if isinstance(entry, dict) and isinstance(entry.get("label"), str):
                found.setdefault(_canonical(entry["label"]), set()).add((li, hi))
    best: dict[str, Head] = {}
    raw_best = data.get("best")
    if isinstance(raw_best, dict):  # v2: {"induction": "L2H5", ...}
        best = {_canonical(k): h for k, v in raw_best.items() if isinstance(k, str) and (h := _parse_head(v))}
    for label, value in summary.items():  # or {"induction": {"heads": [...], "best": "L2H5"}}
        if isinstance(label, str) and isinstance(value, dict):
            found.setdefault(_canonical(label), set()).update(
                h for h in map(_parse_head, value.get("heads", []) if isinstance(value.get("heads"), list) else []) if h)
            if (h := _parse_head(value.get("best"))) is not None:
                best[_canonical(label)] = h

    def fits(h: Head) -> bool:
        return (num_layers is None or 0 <= h[0] < num_layers) and (num_heads is None or 0 <= h[1] < num_heads)

    labels: dict[str, tuple[Head, ...]] = {}
    for label, heads in found.items():
        if label in UNLABELLED:
            continue
        ordered = sorted((h for h in heads if fits(h)), key=lambda h: (-_score(layers, h, label), h))
        if label in best and fits(best[label]):
            ordered = [best[label], *[h for h in ordered if h != best[label]]]
        if ordered:
            labels[label] = tuple(ordered)
    return HeadLabels(labels)


def load_heads(model_dir: str | Path | None, num_layers: int | None = None, num_heads: int | None = None) -> HeadLabels:
    """The labelled heads in `model_dir/heads.json`; empty when there is no such file or it is unreadable."""
    if model_dir is None:
        return HeadLabels()
    path = Path(model_dir) / "heads.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return HeadLabels()
    return parse_heads(data, num_layers, num_heads)
