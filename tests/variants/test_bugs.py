"""The bugs: each detected with its signature clue, the row diffs they leave, the `bugs`/`diagnose` CLI and the
Bug lab figures. (The registry itself: test_registry.py; scoping: test_scoping.py.)"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

import kvviz
from kvviz.cli import main
from kvviz.engine import DEFAULT_PROMPT
from kvviz.engine.trace import Trace
from kvviz.figures import variants as fb
from kvviz.testing import FAMILIES, run_cli, tiny_model
from kvviz.variants import evidence
from kvviz.variants.diagnose import DEFAULT_STEPS, Run, diagnose, run_clean
from kvviz.variants.evidence import EXTRA, MISSING, REPOSITIONED, SAME, SHIFTED
from kvviz.variants.registry import REGISTRY, names

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "It is a truth universally acknowledged, that"
REF = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+#\d+$")
URL = re.compile(r"^https://github\.com/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)/(issues|pull)/(\d+)$")


# -- detection on the bundled model with the CLI defaults -----------------------------------------
@pytest.fixture(scope="module")
def bundled_clean(bundled):
    return run_clean(bundled, DEFAULT_PROMPT, DEFAULT_STEPS)


@pytest.mark.parametrize("name", names())
def test_every_registry_entry_shows_on_the_bundled_model(bundled, bundled_clean, name):
    """Every variant (bugs, eviction at its default budget, quantization) is detected with its signature clue."""
    d = diagnose(bundled, name, DEFAULT_PROMPT, DEFAULT_STEPS, clean=bundled_clean, free_run=False)
    cls = REGISTRY[name]
    assert d.detected and d.first_divergence_step is not None and d.first_divergent_layer is not None
    assert any(f.kind == cls.clue for f in d.findings), [f.kind for f in d.findings]  # its signature is found
    assert d.clue_text() == next(f.text for f in d.findings if f.kind == cls.clue)
    if cls.kind == "bug":
        assert d.max_abs_logit_diff.max() > 100 * d.tolerance.logit
    else:
        assert d.text.startswith("A trade-off")


def test_the_correct_cache_is_never_flagged_on_the_bundled_model(bundled, bundled_clean):
    d = diagnose(bundled, "none", DEFAULT_PROMPT, DEFAULT_STEPS, clean=bundled_clean)
    assert not d.detected and d.first_divergence_step is None and d.first_divergent_layer is None
    assert d.free is not None and d.free.generated_ids == bundled_clean.trace.generated_ids
    assert d.text.startswith("No divergence")


def tiny_params(name: str) -> dict:
    """Parameters that fit the tiny models (head_dim 16) and their short runs (a 12-token prompt + 8 steps)."""
    kind = REGISTRY[name].kind
    if kind == "eviction":
        return {"budget": 8, "sinks": 2} if name == "streaming_llm" else {"budget": 8}
    return {"group": 16} if kind == "quantization" else {}


# -- tiny models ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return {family: tiny_model(family) for family in FAMILIES}


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2"])
@pytest.mark.parametrize("name", names())
def test_every_entry_is_detected_on_tiny_gqa_models(tiny, family, name):
    params = tiny_params(name)
    d = diagnose(tiny[family], name, PROMPT, 8, free_run=False, **params)
    assert d.detected, d.text
    assert any(f.kind == REGISTRY[name].clue for f in d.findings)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt,sampling", [
    (PROMPT, kvviz.Sampling()),
    ("The quick brown fox", kvviz.Sampling(greedy=False, temperature=1.3, seed=4)),
    ("Keys and values are stored", kvviz.Sampling(greedy=False, top_p=0.8, seed=9)),
])
def test_the_correct_cache_is_never_flagged(tiny, family, prompt, sampling):
    d = diagnose(tiny[family], "none", prompt, 6, sampling=sampling)
    assert not d.detected, d.text
    assert d.free.generated_ids == d.clean.trace.generated_ids  # same sampling: the same text


def _with_noise(run: Run, scale: float, seed: int = 0) -> Run:
    """The same run with every logit and every cached K/V entry perturbed by up to `scale`."""
    rng = np.random.default_rng(seed)
    t: Trace = run.trace
    steps = []
    for s in t.steps:
        layers = []
        for ls in s.layers:
            k = ls.key_states + rng.uniform(-scale, scale, ls.key_states.shape).astype(np.float32)
            v = ls.value_states + rng.uniform(-scale, scale, ls.value_states.shape).astype(np.float32)
            layers.append(dataclasses.replace(ls, key_states=k, value_states=v))
        steps.append(dataclasses.replace(s, layers=tuple(layers)))
    noisy = run.logits + rng.uniform(-scale, scale, run.logits.shape).astype(np.float32)
    return Run(trace=dataclasses.replace(t, steps=tuple(steps)), logits=noisy)


def test_float_noise_is_tolerated_and_a_real_difference_is_not(tiny):
    """Guards the stated tolerance: 1e-6 perturbations (kernel noise) pass, 1e-2 ones are flagged."""
    lm = tiny["llama_gqa"]
    clean = run_clean(lm, PROMPT, 5)
    quiet = evidence.compare(clean, _with_noise(clean, 1e-6), None)
    assert not quiet.detected
    loud = evidence.compare(clean, _with_noise(clean, 1e-2), None)
    assert loud.detected and loud.first_divergence_step == 0 and loud.first_divergent_layer == 0


def test_mqa_cannot_have_a_wrong_head_mapping(tiny):
    """With one KV head every mapping is the right one: the GQA bug is honestly not detected."""
    d = diagnose(tiny["llama_mqa"], "gqa_wrong_head", PROMPT, 5, free_run=False)
    assert not d.detected and "No divergence with `gqa_wrong_head`" in d.text
    assert REGISTRY["gqa_wrong_head"]().problem(tiny["llama_mqa"].info)  # the registry says so up front


# -- each bug leaves the evidence it should -------------------------------------------------------
@pytest.fixture(scope="module")
def llama_diags(tiny):
    lm = tiny["llama_gqa"]
    clean = run_clean(lm, PROMPT, 8)
    return lm, {name: diagnose(lm, name, PROMPT, 8, clean=clean, free_run=False, **tiny_params(name))
                for name in [*names("bug"), "int8_cache"]}


def test_row_diffs_name_wrong_missing_shifted_and_extra_rows(llama_diags):
    lm, ds = llama_diags
    p = len(ds["off_by_one"].clean.trace.prompt_ids)
    last = 7

    off = ds["off_by_one"].kv[last][0]  # layer 0: rows depend only on token and position
    assert off.clean_len == off.buggy_len == p + last
    assert (off.status[:p] == SAME).all() and (off.status[p:] == SHIFTED).all()
    assert off.holds[p:].tolist() == list(range(p - 1, p + last - 1))  # each row is the previous token's

    over = ds["overwrite_last"].kv[last][0]
    assert over.buggy_len == p and over.holds[p - 1] == p + last - 1  # the newest row sits in the last prompt slot
    assert (over.status[p:] == MISSING).all()

    never = ds["never_append"].kv[last][0]
    assert never.buggy_len == p + 1 and (never.status[p + 1:] == MISSING).all()
    assert ds["never_append"].buggy_kept()[last] == p  # attended p + 1, kept p

    stale = ds["stale_cache"]
    n_stale = len(lm.tokenizer(REGISTRY["stale_cache"].stale_prompt)["input_ids"])
    sk = stale.kv[last][0]
    assert sk.buggy_len == sk.clean_len + n_stale
    assert sk.offset == n_stale  # the leaked rows sit in front of the prompt
    assert sk.holds[n_stale:].tolist() == list(range(sk.clean_len))  # then the clean rows, in order
    assert (sk.status[:n_stale] == EXTRA).all() and (sk.status[n_stale:] == SAME).all()
    assert not any(r.offset for r in ds["off_by_one"].kv[last])  # equal lengths: nothing in front

    fresh = ds["fresh_cache_each_step"]
    assert fresh.buggy_lengths(0)[1:] == [1] * 7

    swapped = ds["kv_swapped"].kv[0][0]
    assert swapped.swapped_rows == p

    pos = ds["positions_not_advanced"]
    assert [s.positions for s in pos.buggy.trace.steps[1:]] == [(0,)] * 7
    # layer 0: the new rows hold the right token's value, but a key rotated to position 0
    assert (pos.kv[last][0].status[p:] == REPOSITIONED).all() and (pos.kv[last][0].status[:p] == SAME).all()

    gqa = ds["gqa_wrong_head"]
    assert gqa.buggy.trace.steps[0].layers[0].kv_head_of.tolist() == [0, 1, 0, 1]
    assert gqa.first_divergent_layer == 1 and gqa.first_attention_layer == 0  # cache fine, reading wrong

    mask = ds["causal_mask_lost"]
    w = mask.buggy.trace.steps[0].layers[0].weights
    assert w[:, 0, 1:].sum() > 0 and mask.first_divergent_layer == 1  # token 0 sees the future

    q = ds["int8_cache"]
    assert all(row[0].max_rel <= 1 / 254 + 1e-3 for row in q.kv)  # half an int8 step of the row's absmax (+ fp16 scale)


def test_diagnosis_dict_is_json_ready_and_complete(llama_diags):
    _, ds = llama_diags
    d = json.loads(json.dumps(ds["off_by_one"].to_dict()))
    for key in ("bug", "detected", "first_divergence_step", "first_divergent_layer", "first_divergent_token",
                "tolerance", "diagnosis", "findings", "steps"):
        assert key in d
    assert d["bug"] == "off_by_one" and d["detected"] is True and len(d["steps"]) == 8
    assert set(d["steps"][1]["kv_rows"]) == set(evidence.STATUS_NAMES)
    assert 0 <= d["top1_agree"] <= 1 and isinstance(d["steps"][1]["top1_agree"], bool)


# -- CLI --------------------------------------------------------------------------------------------
def test_cli_bugs_json_lists_the_registry(capsys):
    assert main(["bugs", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in out] == names()
    assert all({"name", "kind", "title", "description", "symptom", "source", "params", "scopes"} <= set(e) for e in out)
    assert main(["bugs", "--kind", "eviction", "--json"]) == 0
    assert {e["kind"] for e in json.loads(capsys.readouterr().out)} == {"eviction"}


def test_cli_diagnose_json_and_text(tiny_checkpoint, capsys):
    assert main(["diagnose", "--bug", "off_by_one", "--model", str(tiny_checkpoint), "--steps", "6", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["bug"] == "off_by_one" and d["detected"] is True
    assert d["first_divergence_step"] == 1 and d["first_divergent_layer"] == 0
    assert main(["diagnose", "--bug", "none", "--model", str(tiny_checkpoint), "--steps", "4"]) == 0
    text = capsys.readouterr().out
    assert "detected: False" in text and "No divergence" in text


def test_cli_diagnose_takes_parameters(tiny_checkpoint, capsys):
    assert main(["diagnose", "--bug", "sliding_window", "--param", "budget=6", "--model", str(tiny_checkpoint),
                 "--steps", "6", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "eviction" and d["detected"] and max(s["buggy_cache_len"] for s in d["steps"][1:]) <= 6


@pytest.mark.parametrize("args,message", [
    (("--bug", "nope"), "unknown cache variant 'nope'"),
    (("--bug", "h2o", "--param", "window=3"), "h2o takes no parameter window"),
    (("--bug", "h2o", "--param", "budget"), "write KEY=VALUE"),
    (("--bug", "int8_cache", "--param", "bits=3"), "bits must be one of 8, 4"),
])
def test_cli_bad_variant_input_is_one_line_and_exit_2(args, message):
    out = run_cli("diagnose", *args)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and message in out.stderr, out.stderr


# -- figures ----------------------------------------------------------------------------------------
def test_divergence_figure_has_both_charts_and_the_tolerance(llama_diags):
    _, ds = llama_diags
    d = ds["off_by_one"]
    fig = fb.divergence_figure(d.max_abs_logit_diff, d.kl, tolerance=d.tolerance.logit, current_step=2,
                               first_step=d.first_divergence_step, first_token_step=d.first_divergent_token_step)
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 2 and len(bars[0].y) == len(bars[1].y) == 8
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis2.title.text.startswith("step")
    assert any(s.y0 == d.tolerance.logit for s in fig.layout.shapes)  # the tolerance line


def test_kv_status_figure_shows_categories_per_slot(llama_diags):
    _, ds = llama_diags
    d = ds["never_append"]
    status, holds = d.status_by_step(0)
    labels = fb.slot_labels(d.clean.trace.tokens, status.shape[1])
    fig = fb.kv_status_figure(status, [str(i) for i in range(8)], labels, holds=holds, y_title="step")
    hm = fig.data[0]
    z = np.asarray(hm.z, dtype=float)
    assert z.shape == status.shape and np.isnan(z[0, -1])  # prefill has no slot that far
    assert list(hm.colorbar.ticktext) == list(fb.STATUS_NAMES)
    assert any("holds exact row" in t for row in hm.text for t in row)
    assert fig.layout.yaxis.title.text == "step"


def test_attention_lengths_and_layer_figures(llama_diags):
    _, ds = llama_diags
    d = ds["causal_mask_lost"]
    ct, bt = d.clean.trace, d.buggy.trace
    fig = fb.attention_diff_figure(ct.attention_matrix(0, 0, 0), bt.attention_matrix(0, 0, 0),
                                   query_labels=fb.slot_labels(ct.tokens, 15), clean_key_labels=fb.slot_labels(ct.tokens, 15),
                                   buggy_key_labels=fb.slot_labels(ct.tokens, 15))
    assert len(fig.data) == 3
    diff = np.asarray(fig.data[2].z)
    assert diff[0, 1:].max() > 0  # the first prompt token attended to later ones
    lengths = fb.lengths_figure(d.clean_lengths, d.buggy_kept(), d.buggy_lengths())
    assert [t.name for t in lengths.data] == ["exact", "variant: attended", "variant: kept"]
    share = fb.layer_step_figure(d.share_differing(), current_step=1)
    assert np.asarray(share.data[0].z).shape == (2, 8)


def test_text_html_marks_differing_tokens():
    html = fb.text_html(["It", " is"], [" a", " b", " c"], [" a", " x", " c"], step=1)
    assert html.count("lab-diff") == 2  # one chip + the CSS rule
    assert "lab-now" in html and "lab-later" in html
