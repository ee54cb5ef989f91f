"""The one registry of cache variants: documented entries of three kinds, lookups, parameters, the README table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import kvviz
from kvviz.geometry import KVGeometry
from kvviz.variants import registry
from kvviz.variants.registry import CLUES, KINDS, REGISTRY, get_variant, names

ROOT = Path(__file__).resolve().parents[2]
GITHUB = re.compile(r"^https://github\.com/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)/(issues|pull)/(\d+)$")
ARXIV = re.compile(r"^https://arxiv\.org/abs/(\d{4}\.\d{5})$")


def test_every_entry_is_documented_with_real_looking_sources():
    entries = kvviz.catalogue()
    kinds = [e["kind"] for e in entries]
    assert kinds.count("bug") == 9 and kinds.count("eviction") >= 4 and kinds.count("quantization") >= 3
    assert kinds == sorted(kinds, key=KINDS.index)  # bugs first, then eviction, then quantization
    for e in entries:
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", e["name"]), e["name"]
        for field in ("title", "description", "corrupts", "symptom", "source"):
            assert len(e[field].strip()) > (5 if field == "title" else 10), (e["name"], field)
        assert e["clue"] in CLUES and e["source_urls"], e["name"]
        for url in e["source_urls"]:
            gh, ax = GITHUB.match(url), ARXIV.match(url)
            assert gh or ax, url
            ref = f"{gh[1]}/{gh[2]}#{gh[4]}" if gh else f"arXiv:{ax[1]}"
            assert ref in e["source"], (ref, e["source"])  # the text names what it links
        assert set(e["scopes"]) | set(e["scope_notes"]) == {"layers", "start_step"}  # every scope: honoured or why not
        if e["kind"] == "eviction":
            assert "budget" in e["params"] and e["positions_note"]
    assert len({e["name"] for e in entries}) == len(entries)


def test_the_papers_are_cited_where_their_mechanism_is():
    """StreamingLLM, H2O, TOVA and KIVI are implemented after their papers: each cites its arXiv id."""
    cited = {n: REGISTRY[n].source_urls for n in ("streaming_llm", "h2o", "tova", "kivi")}
    assert "https://arxiv.org/abs/2309.17453" in cited["streaming_llm"]
    assert "https://arxiv.org/abs/2306.14048" in cited["h2o"]
    assert "https://arxiv.org/abs/2401.06104" in cited["tova"]
    assert "https://arxiv.org/abs/2402.02750" in cited["kivi"]


def test_get_variant_builds_with_parameters_and_refuses_bad_ones():
    assert get_variant("none") is None and get_variant(None) is None
    assert get_variant("h2o", budget=32).budget == 32
    assert get_variant("kivi").parameters() == {"bits": 4, "format": "int", "keys": "channel", "group": 32,
                                                "zero_point": True}
    with pytest.raises(ValueError, match=r"unknown cache variant 'nope'; choose one of: none, never_append"):
        get_variant("nope")
    with pytest.raises(ValueError, match="h2o takes no parameter sinks; its parameters: budget, heavy"):
        get_variant("h2o", sinks=2)
    with pytest.raises(ValueError, match="budget must be a whole number >= 2"):
        get_variant("sliding_window", budget=1)
    with pytest.raises(ValueError, match="bits must be one of 8, 4"):
        get_variant("int8_cache", bits=2)
    with pytest.raises(ValueError, match="fp8 stores 8 bits"):
        get_variant("fp8_cache", bits=4)
    with pytest.raises(ValueError, match=r"budget \(4\) must exceed the sink rows \(4\)"):
        get_variant("streaming_llm", budget=4, sinks=4)


def test_problems_say_why_a_variant_cannot_act_on_a_model():
    mqa = KVGeometry("llama", 2, 4, 1, 16, 64, 128)
    gpt2 = KVGeometry("gpt2", 2, 4, 4, 16, 64, 128)
    assert "single KV head" in get_variant("gqa_wrong_head").problem(mqa)
    assert get_variant("gqa_wrong_head").problem(gpt2) is None
    assert "learned positions" in get_variant("streaming_llm").problem(gpt2)
    assert "does not divide head_dim 16" in get_variant("int8_cache").problem(gpt2)
    assert get_variant("int8_cache", group=16).problem(gpt2) is None


def test_cache_bytes_per_element_count_the_scales():
    """int8 in blocks of 32 with an fp16 scale is llama.cpp's q8_0 (8.5 bits); q4_0 is 4.5 bits; KIVI adds a minimum."""
    assert get_variant("int8_cache").cache_bytes_per_element(4) == 1.0625
    assert get_variant("int4_cache").cache_bytes_per_element(4) == 0.5625
    assert get_variant("fp8_cache").cache_bytes_per_element(4) == 1.0625
    assert get_variant("kivi").cache_bytes_per_element(4) == 0.5 + 4 / 32
    assert get_variant("h2o").cache_bytes_per_element(4) == 4  # eviction saves rows, not bytes per row


def test_readme_table_matches_the_registry():
    """README.md carries exactly `registry.markdown_table()` between its markers (regenerate it when the registry changes)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- bugs:start -->", "<!-- bugs:end -->"
    assert start in text and end in text, "README.md needs the variant table between <!-- bugs:start --> and <!-- bugs:end -->"
    table = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == registry.markdown_table(), "regenerate with: python -c 'from kvviz.variants import registry; print(registry.markdown_table())'"


def test_markdown_table_has_one_row_per_entry_with_links():
    rows = registry.markdown_table().splitlines()
    assert len(rows) == 2 + len(names())
    for row, name in zip(rows[2:], names()):
        cls = REGISTRY[name]
        assert row.startswith(f"| `{name}`") and all(url in row for url in cls.source_urls)
        assert row.count(" | ") == 4  # five cells: no stray pipe from the texts
