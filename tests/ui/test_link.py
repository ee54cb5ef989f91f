"""The step page's URL parameters (kvviz.ui.stepview.link): every value checked, bad ones dropped with a reason."""

from __future__ import annotations

from kvviz.ui.stepview.link import Link, link_params, parse_link

LIMITS = dict(max_tokens=256, num_layers=6, num_heads=8)


def test_a_full_link_parses():
    link, notes = parse_link({"prompt": "Emma", "tokens": "12", "sampling": "sample", "temperature": "0.8", "top_k": "40",
                              "top_p": "0.9", "seed": "3", "layer": "1", "head": "7", "step": "11", "quiz": "q3"}, **LIMITS)
    assert notes == []
    assert link == Link(prompt="Emma", tokens=12, sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=3, layer=1, head=7,
                        step=11)


def test_every_bad_value_is_dropped_with_its_reason():
    bad = {"prompt": " ", "tokens": "0", "sampling": "wild", "temperature": "nan", "top_k": "-1", "top_p": "1.5", "seed": "x",
           "layer": "6", "head": "8", "step": "24"}
    link, notes = parse_link(bad, **LIMITS)
    assert link == Link()
    assert [n.split("=")[0] for n in notes] == ["prompt", "tokens", "sampling", "temperature", "top_k", "top_p", "seed",
                                                "layer", "head", "step"]
    assert "from 0 (prefill) to 23" in notes[-1]  # the default 24 tokens bound the step


def test_the_step_is_bounded_by_the_links_own_tokens():
    assert parse_link({"tokens": "5", "step": "4"}, **LIMITS)[0].step == 4
    assert parse_link({"tokens": "5", "step": "5"}, **LIMITS)[0].step is None


def test_params_leave_out_defaults_and_round_trip():
    defaults = {"prompt": "P", "tokens": 24, "sampling": "greedy", "layer": None, "head": None, "step": None}
    params = link_params(prompt="P", tokens=24, sample=False, temperature=1.0, top_k=0, top_p=1.0, seed=0, layer=1, head=3,
                         step=0, defaults=defaults)
    assert params == {"layer": "1", "head": "3", "step": "0"}
    params = link_params(prompt="Emma", tokens=8, sample=True, temperature=0.8, top_k=0, top_p=0.9, seed=2, layer=0, head=0,
                         step=5, defaults=defaults)
    link, notes = parse_link(params, **LIMITS)
    assert not notes and link == Link(prompt="Emma", tokens=8, sample=True, temperature=0.8, top_k=0, top_p=0.9, seed=2,
                                      layer=0, head=0, step=5)
