"""The tolerant heads.json reader (kvviz.engine.heads): v1, v2 and broken files."""

from __future__ import annotations

import json

from kvviz.engine.heads import load_heads, parse_heads
from kvviz.engine.models import BUNDLED_DIR


def test_the_bundled_file_gives_picks_that_exist():
    labels = load_heads(BUNDLED_DIR, 6, 8)
    data = json.loads((BUNDLED_DIR / "heads.json").read_text())
    labelled = {(li, hi) for li, row in enumerate(data["layers"]) for hi, h in enumerate(row) if h["label"] != "mixed"}
    assert {h for heads in labels.labels.values() for h in heads} == labelled
    assert labels.most_structured() in labelled | {None}


def test_v1_labels_and_scores_order_the_heads():
    data = {"layers": [[{"label": "mixed"}, {"label": "previous-token", "prev_token": 0.5}],
                       [{"label": "previous-token", "prev_token": 0.7}, {"label": "first-token (sink)", "first_token": 0.9}]],
            "summary": {"previous-token": ["L0H1", "L1H0"], "first-token (sink)": ["L1H1"], "mixed": ["L0H0"]}}
    labels = parse_heads(data)
    assert labels.labels == {"previous-token": ((1, 0), (0, 1)), "sink": ((1, 1),)}  # best share first; v1's sink renamed
    assert labels.picks() == [("previous-token", (1, 0)), ("sink", (1, 1))]
    assert labels.most_structured() == (1, 0)


def test_v2_sink_induction_and_best_entries():
    data = {"layers": [[{"label": "sink"}, {"label": "induction", "induction": 0.2}, {"label": "induction", "induction": 0.6}]],
            "summary": {"induction": {"heads": ["L0H1", "L0H2"], "best": "L0H1"}, "sink": ["L0H0"]},
            "best": {"sink": [0, 0]}}
    labels = parse_heads(data)
    assert labels.labels["induction"] == ((0, 1), (0, 2))  # "best" wins over the score
    assert labels.picks()[0] == ("induction", (0, 1)) and labels.most_structured() == (0, 1)


def test_broken_or_foreign_files_give_nothing_or_only_heads_that_exist(tmp_path):
    assert parse_heads("nonsense").labels == {} and parse_heads({"summary": {"induction": ["L9H9", "bad", 3]}}).labels == {
        "induction": ((9, 9),)}
    assert parse_heads({"summary": {"induction": ["L9H9"]}}, num_layers=6, num_heads=8).labels == {}
    (tmp_path / "heads.json").write_text("{not json")
    assert load_heads(tmp_path).labels == {} and load_heads(tmp_path / "missing").labels == {} and load_heads(None).labels == {}
