"""`kvviz bench`: the structure and sanity of its output on tiny models (no timing thresholds here:
speed numbers come from `python -m kvviz bench`, reported in the README)."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kvviz import cli
from kvviz import bench
from kvviz.engine.models import from_model
from kvviz.testing import tiny_tokenizer

CONTEXTS = [8, 24, 40]
PER_CONTEXT = ("capture_overhead_by_context", "cache_speedup", "step_ms", "forward_ms", "plain_step_ms",
               "prefill_ms", "plain_prefill_ms", "recompute_ms", "trace_bytes_per_step", "kv_cache_bytes")


def wide_heads_model():
    """Like tiny_model('llama_gqa') (2 layers, 4 heads, 2 KV heads) but head_dim 32 instead of 16."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=384, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0)
    return from_model(AutoModelForCausalLM.from_config(config), tiny_tokenizer(), name="tiny-wide-heads")


@pytest.fixture(scope="module")
def result(tiny_llama):
    return bench.run_bench(tiny_llama, contexts=CONTEXTS, repeats=2, warmup=1)


def test_bench_reports_every_measure_per_context(result):
    assert result["settings"]["contexts"] == CONTEXTS
    assert result["settings"]["repeats"] == 2 and result["settings"]["statistic"] == "median"
    for key in PER_CONTEXT:
        assert list(result[key]) == [str(c) for c in CONTEXTS], key  # string keys, as JSON has them
        assert all(v > 0 for v in result[key].values()), key
    by_context = sorted(result["capture_overhead_by_context"].values())
    assert result["capture_overhead"] == by_context[len(by_context) // 2]  # the median of three
    assert result["capture_overhead_worst"] == by_context[-1]
    for c in map(str, CONTEXTS):
        assert result["cache_speedup"][c] == pytest.approx(result["recompute_ms"][c] / result["plain_step_ms"][c])
    assert {"cpu", "cores", "torch_threads", "torch", "transformers"} <= set(result["machine"])
    assert result["machine"]["torch_threads"] == torch.get_num_threads()
    assert result["model"]["num_layers"] == 2 and result["model"]["parameters"] > 0
    json.dumps(result)  # JSON-ready as it is


def test_trace_bytes_per_step_grow_with_context_not_with_cache_copies(result, tiny_llama):
    """A decode step records one attention row per head (scores + weights, float32), never a K/V copy."""
    info = tiny_llama.info
    per_position = 2 * info.num_layers * info.num_heads * 4
    tb = result["trace_bytes_per_step"]
    for a, b in pairwise(CONTEXTS):
        assert tb[str(b)] - tb[str(a)] == per_position * (b - a)  # linear in the context, exactly
    kv = result["kv_cache_bytes"]
    cache_per_position = 2 * info.num_layers * info.num_key_value_heads * info.head_dim * 4
    for a, b in pairwise(CONTEXTS):
        assert kv[str(b)] - kv[str(a)] == cache_per_position * (b - a)
    assert per_position < cache_per_position
    assert all(tb[c] < kv[c] for c in tb)


def test_trace_bytes_per_position_do_not_scale_with_head_dim(tiny_llama):
    narrow = bench.run_bench(tiny_llama, contexts=[8, 40], repeats=1, warmup=0)
    wide = bench.run_bench(wide_heads_model(), contexts=[8, 40], repeats=1, warmup=0)
    slope = [(r["trace_bytes_per_step"]["40"] - r["trace_bytes_per_step"]["8"]) / 32 for r in (narrow, wide)]
    cache_slope = [(r["kv_cache_bytes"]["40"] - r["kv_cache_bytes"]["8"]) / 32 for r in (narrow, wide)]
    assert wide["model"]["head_dim"] == 2 * narrow["model"]["head_dim"]
    assert slope[0] == slope[1]  # per cached position: layers x heads x 8 bytes, whatever head_dim is
    assert cache_slope[1] == 2 * cache_slope[0]  # whereas the cache itself doubles


def test_prompt_of_length_gives_the_context_asked_for(tiny_llama):
    for n in (2, 8, 33, 100):
        got = len(tiny_llama.tokenizer(bench.prompt_of_length(tiny_llama.tokenizer, n))["input_ids"])
        assert n - 1 <= got <= n


def test_default_contexts_fit_the_model(tiny_llama):
    contexts = bench.default_contexts(tiny_llama, steps_per_context=14)
    assert contexts[:2] == [16, 64]
    assert max(contexts) + 14 < tiny_llama.info.max_positions


def test_cli_bench_json(tiny_checkpoint, capsys):
    code = cli.main(["bench", "--model", str(tiny_checkpoint), "--json", "--repeats", "1", "--warmup", "0",
                     "--contexts", "8", "16"])
    out = capsys.readouterr().out
    assert code == 0
    d = json.loads(out)  # exactly one JSON object on stdout
    assert list(d["cache_speedup"]) == ["8", "16"]
    assert d["model"]["name"] == str(tiny_checkpoint)


@pytest.mark.parametrize("args,needle", [
    (["--contexts", "100000"], "do not fit"),
    (["--repeats", "0"], "repeats must be >= 1"),
    (["--model", "random:nope"], "unknown synthetic model"),
])
def test_cli_bench_bad_input_is_one_line(tiny_checkpoint, capsys, args, needle):
    if "--model" not in args:
        args = [*args, "--model", str(tiny_checkpoint)]
    capsys.readouterr()
    code = cli.main(["bench", *args])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
