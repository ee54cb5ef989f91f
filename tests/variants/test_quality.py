"""Quality against memory: `python -m kvviz evict` / `quantize` and the measurement behind them."""

from __future__ import annotations

import json

import pytest

from kvviz.testing import run_cli, tiny_model
from kvviz.variants import quality
from kvviz.variants.registry import get_variant

KEYS = {"ppl", "ppl_exact", "mean_kl", "top1_agree", "tokens", "peak_cache_len", "cache_bytes_per_token"}


def cli_json(*args: str) -> dict:
    out = run_cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_evict_with_a_budget_beyond_the_text_is_the_exact_cache(bundled):
    """The issue's check, on the bundled model and held-out Austen: budget >= text length, |Δlogit| <= 1e-5."""
    for policy in ("window", "streaming", "h2o", "tova"):
        d = cli_json("evict", "--policy", policy, "--budget", "40", "--tokens", "32", "--passages", "1")
        assert KEYS | {"policy", "budget"} <= set(d), d
        assert d["max_abs_logit_diff"] <= 1e-5 and d["mean_kl"] <= 1e-9 and d["top1_agree"] == 1.0
        assert d["ppl"] == pytest.approx(d["ppl_exact"]) and d["peak_cache_len"] == 31 and d["tokens"] == 31


def test_evict_json_has_the_parameters_and_the_budget_holds(tiny_checkpoint):
    d = cli_json("evict", "--model", str(tiny_checkpoint), "--policy", "streaming", "--budget", "8", "--sinks", "2",
                 "--tokens", "40", "--passages", "2")
    assert KEYS <= set(d) and d["policy"] == "streaming" and d["budget"] == 8 and d["sinks"] == 2
    assert d["peak_cache_len"] == 8 and d["tokens"] == 78 and d["passages"] == 2
    assert d["mean_kl"] > 0 and d["cache_bytes_per_token"] == d["exact_bytes_per_token"]
    assert d["peak_cache_bytes"] == 8 * d["cache_bytes_per_token"]


def test_quantize_counts_bytes_with_their_scales(tiny_checkpoint):
    d = cli_json("quantize", "--model", str(tiny_checkpoint), "--bits", "4", "--keys", "channel", "--group", "16",
                 "--zero-point", "--tokens", "40", "--passages", "1")
    assert KEYS <= set(d) and (d["bits"], d["format"], d["keys"], d["group"], d["zero_point"]) == (4, "int", "channel", 16, True)
    elements = 2 * 2 * 2 * 16  # K and V x layers x KV heads x head_dim of the tiny model
    assert d["cache_bytes_per_token"] == elements * (0.5 + 2 * 2 / 16)  # a scale and a minimum per group of 16
    assert d["exact_bytes_per_token"] == elements * 4 and d["variant"] == "int4"
    fp8 = cli_json("quantize", "--model", str(tiny_checkpoint), "--format", "fp8", "--group", "16", "--tokens", "40")
    assert fp8["variant"] == "fp8" and 0 < fp8["mean_kl"] and fp8["top1_agree"] > 0.5


def test_measure_on_a_text_file(tiny_checkpoint, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun. " * 8)
    d = cli_json("evict", "--model", str(tiny_checkpoint), "--policy", "window", "--budget", "6", "--text", str(text),
                 "--tokens", "30")
    assert d["passages"] == 1 and d["tokens"] == 29


@pytest.mark.parametrize("args,message", [
    (("evict", "--policy", "window", "--budget", "8", "--sinks", "2"), "--sinks is a parameter of --policy streaming"),
    (("evict", "--policy", "h2o", "--budget", "1"), "budget must be a whole number >= 2"),
    (("quantize", "--bits", "4", "--format", "fp8"), "fp8 stores 8 bits"),
    (("quantize", "--group", "24"), "group size 24 does not divide head_dim 32"),
    (("evict", "--policy", "window", "--budget", "8", "--text", "/nonexistent.txt"), "no such file"),
    (("evict", "--policy", "window", "--budget", "8", "--tokens", "9999"), "exceeds the model's context"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = run_cli(*args)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_passages_start_like_any_prompt_and_spread_over_the_text():
    lm = tiny_model("llama_gqa")
    ps = quality.passages_from_text(lm, " ".join(f"word{i}" for i in range(400)), 20, 3)
    assert [len(p) for p in ps] == [20] * 3 and ps[0] != ps[1] != ps[2]
    assert all(p[: len(quality.text_prefix(lm))] == quality.text_prefix(lm) for p in ps)
    with pytest.raises(ValueError, match="the text has"):
        quality.passages_from_text(lm, "too short", 50)


def test_measure_reuses_exact_logits_and_reports_json_ready_numbers():
    lm = tiny_model("llama_gqa")
    ps = quality.passages_from_text(lm, "Keys and values are stored so that the next query can attend. " * 6, 24, 2)
    exact = [quality.forced_logits(lm, p, None)[0] for p in ps]
    q = quality.measure(lm, get_variant("int8_cache", group=16), ps, exact)
    d = json.loads(json.dumps(q.to_dict()))
    assert d["variant"] == "int8_cache" and d["bits"] == 8 and 0 < d["mean_kl"] < 0.05 and d["peak_cache_len"] == 23
