"""One scoping rule: every variant honours its layers and start step, or says why it cannot (and refuses).

Guards issue 12's measurements: `fresh_cache_each_step` scoped to layer 1 did nothing,
`positions_not_advanced` scoped to layer 1 still diverged in layer 0, `stale_cache` with start step 3
diverged at step 0.
"""

from __future__ import annotations

import pytest

from kvviz.testing import tiny_model
from kvviz.variants.diagnose import diagnose, run_clean
from kvviz.variants.registry import REGISTRY, get_variant, names

PROMPT = "It is a truth universally acknowledged, that"
STEPS = 8


def params(name: str) -> dict:
    """Parameters that act on the tiny model's short run (head_dim 16; a 12-token prompt + 8 steps)."""
    kind = REGISTRY[name].kind
    if kind == "eviction":
        return {"budget": 8, "sinks": 2} if name == "streaming_llm" else {"budget": 8}
    return {"group": 16} if kind == "quantization" else {}


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama_gqa")


@pytest.fixture(scope="module")
def clean(lm):
    return run_clean(lm, PROMPT, STEPS)


@pytest.mark.parametrize("name", [n for n in names() if "layers" in REGISTRY[n].scopes])
def test_a_variant_scoped_to_the_last_layer_leaves_the_layers_below_exact(lm, clean, name):
    d = diagnose(lm, name, PROMPT, STEPS, layers=[1], clean=clean, free_run=False, **params(name))
    assert d.detected, d.text  # it acts in layer 1 ...
    assert d.first_divergent_layer == 1 or (d.first_divergent_layer is None and d.first_attention_layer == 1)
    for row in d.kv:  # ... and layer 0 holds and reads exactly the exact rows at every step
        assert not row[0].differs
    assert (d.attention[:, 0] <= d.tolerance.attention).all()


@pytest.mark.parametrize("name", [n for n in names() if "start_step" in REGISTRY[n].scopes])
def test_a_variant_started_at_step_3_changes_nothing_before(lm, clean, name):
    start = 3
    d = diagnose(lm, name, PROMPT, STEPS, start_step=start, clean=clean, free_run=False, **params(name))
    assert d.detected and d.first_divergence_step >= start, d.text
    assert (d.max_abs_logit_diff[:start] <= d.tolerance.logit).all()
    assert not any(layer.differs for row in d.kv[:start] for layer in row)


@pytest.mark.parametrize("name", [n for n in names() if len(REGISTRY[n].scopes) < 2])
def test_a_scope_that_cannot_apply_is_refused_with_the_reason(lm, name):
    cls = REGISTRY[name]
    (missing,) = set(cls.scope_notes)
    scope = {"layers": {"layers": [1]}, "start_step": {"start_step": 3}}[missing]
    with pytest.raises(ValueError, match=f"{name} cannot be limited by {missing.replace('_', ' ')}"):
        get_variant(name, **params(name)).scoped(**scope)
    with pytest.raises(ValueError, match="cannot be limited"):
        diagnose(lm, name, PROMPT, 3, free_run=False, **scope, **params(name))


def test_the_three_scopes_measured_broken_in_issue_12(lm, clean):
    """fresh_cache_each_step acts in layer 1 alone; the other two say why they cannot be scoped so."""
    fresh = diagnose(lm, "fresh_cache_each_step", PROMPT, STEPS, layers=[1], clean=clean, free_run=False)
    assert fresh.detected and fresh.first_divergent_layer == 1
    assert fresh.buggy_lengths(1)[1:] == [1] * (STEPS - 1) and fresh.buggy_lengths(0) == fresh.clean_lengths
    assert "layers" not in REGISTRY["positions_not_advanced"].scopes
    assert "shared by every layer" in REGISTRY["positions_not_advanced"].scope_notes["layers"]
    assert "start_step" not in REGISTRY["stale_cache"].scopes
    assert "before prefill" in REGISTRY["stale_cache"].scope_notes["start_step"]
    # the scopes they do honour work
    late = diagnose(lm, "positions_not_advanced", PROMPT, STEPS, start_step=3, clean=clean, free_run=False)
    assert late.first_divergence_step == 3
    stale = diagnose(lm, "stale_cache", PROMPT, STEPS, layers=[1], clean=clean, free_run=False)
    assert stale.first_divergent_layer == 1 and stale.kv[0][1].buggy_len > stale.kv[0][1].clean_len


def test_out_of_range_layers_and_negative_steps_are_refused(lm):
    with pytest.raises(ValueError, match="out of range"):
        diagnose(lm, "kv_swapped", PROMPT, 4, layers=[7])
    with pytest.raises(ValueError, match="start step must be >= 0"):
        diagnose(lm, "kv_swapped", PROMPT, 4, start_step=-1)
    assert not diagnose(lm, "off_by_one", PROMPT, 4, start_step=6, free_run=False).detected  # never reached
