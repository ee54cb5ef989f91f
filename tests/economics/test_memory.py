"""KV-cache arithmetic: hand-computed configs of each family, dtypes, variants, the CLI, and the
formula against the bytes a real cache holds."""

from __future__ import annotations

import json

import pytest

import kvviz
from kvviz.cli import main
from kvviz.economics import memory
from kvviz.economics.memory import (
    count_parameters,
    geometry_from_numbers,
    kv_geometry,
    load_config_source,
    read_config_file,
)
from kvviz.engine.cache import measure, measure_prefill
from kvviz.testing import FAMILIES, tiny_model

# (preset, layers, KV heads, head_dim, attention) from each published config.json, and the
# fp16 bytes per token worked out by hand: 2 x layers x KV heads x head_dim x 2 bytes.
HAND = [
    ("llama-2-7b", 32, 32, 128, "MHA", 2 * 32 * 32 * 128 * 2),  # 524,288 = 512 KiB
    ("llama-3-8b", 32, 8, 128, "GQA", 2 * 32 * 8 * 128 * 2),  # 131,072 = 128 KiB
    ("mistral-7b", 32, 8, 128, "GQA", 131_072),
    ("qwen2-7b", 28, 4, 128, "GQA", 57_344),
    ("qwen2.5-0.5b", 24, 2, 64, "GQA", 12_288),
    ("gemma-7b", 28, 16, 256, "MHA", 458_752),  # head_dim 256, not 3072 / 16 = 192
    ("gemma-2b", 18, 1, 256, "MQA", 18_432),
    ("gpt2", 12, 12, 64, "MHA", 36_864),  # n_layer / n_head / n_embd
    ("opt-125m", 12, 12, 64, "MHA", 36_864),
    ("falcon-7b", 32, 1, 64, "MQA", 8_192),  # multi_query: 4544 / 71 = 64
    ("falcon-40b", 60, 8, 64, "GQA", 122_880),  # new_decoder_architecture + num_kv_heads
    ("phi-2", 32, 32, 80, "MHA", 327_680),  # num_key_value_heads: null -> MHA
]


@pytest.mark.parametrize(("name", "layers", "kv", "head_dim", "kind", "fp16"), HAND)
def test_every_family_config_reads_to_hand_computed_bytes(name, layers, kv, head_dim, kind, fp16):
    geo = kv_geometry(read_config_file(memory.CONFIGS_DIR / f"{name}.json"))
    assert (geo.num_layers, geo.num_key_value_heads, geo.head_dim, geo.attention_kind) == (layers, kv, head_dim, kind)
    assert geo.bytes_per_token("float16") == fp16


@pytest.mark.parametrize("name", [h[0] for h in HAND])
def test_config_object_and_raw_json_agree(name):
    """Guards Falcon-7B: FalconConfig fills num_kv_heads with num_heads though multi_query means 1."""
    cfg = read_config_file(memory.CONFIGS_DIR / f"{name}.json")
    assert kv_geometry(memory.to_transformers_config(cfg)) == kv_geometry(cfg)


def test_gemma_head_dim_is_explicit_not_hidden_over_heads():
    geo = kv_geometry(read_config_file(memory.CONFIGS_DIR / "gemma-7b.json"))
    assert geo.hidden_size // geo.num_heads == 192
    assert geo.head_dim == 256


def test_dtypes_and_totals_for_llama3():
    geo = kv_geometry(load_config_source("llama-3-8b"))
    by_dtype = [geo.bytes_per_token(d) for d in ("fp32", "fp16", "bf16", "fp8", "int4")]
    assert by_dtype == [262_144, 131_072, 131_072, 65_536, 32_768]
    # 8k context, batch 4, fp16: 131072 x 8192 x 4 = 4 GiB exactly
    est = memory.estimate(geo, 8192, 4, "float16")
    assert (est.bytes_per_sequence, est.total_bytes) == (2**30, 2**32)
    assert memory.max_context_on(geo, 80 * 2**30, 4, "float16", weights_bytes=16 * 2**30) == 64 * 2**30 // (131_072 * 4)
    with pytest.raises(ValueError, match="unknown cache dtype"):
        geo.bytes_per_token("float12")


def test_mha_gqa_mqa_variants_of_one_model():
    geo = kv_geometry(load_config_source("llama-2-7b"))
    v = geo.variants()
    assert [g.num_key_value_heads for g in v.values()] == [32, 8, 1]
    assert [g.bytes_per_token() for g in v.values()] == [524_288, 131_072, 16_384]
    assert sum("this model" in k for k in v) == 1 and "this model" in next(iter(v))
    # a GQA model keeps its own grouping as the GQA variant
    assert [g.num_key_value_heads for g in kv_geometry(load_config_source("qwen2.5-0.5b")).variants().values()] == [14, 2, 1]
    with pytest.raises(ValueError, match="divide"):
        geo.with_kv_heads(5)


def test_parameter_counts_match_published_sizes():
    assert count_parameters(load_config_source("gpt2")) == 124_439_808
    assert count_parameters(load_config_source("llama-2-7b")) == 6_738_415_616
    assert round(count_parameters(load_config_source("llama-3-8b")) / 1e9, 2) == 8.03
    assert round(count_parameters(load_config_source("falcon-7b")) / 1e9, 2) == 6.92


def test_numbers_typed_in_and_their_errors():
    geo = geometry_from_numbers(32, 8, 128, num_heads=32)
    assert (geo.attention_kind, geo.bytes_per_token()) == ("GQA", 131_072)
    with pytest.raises(ValueError, match="positive"):
        geometry_from_numbers(0, 8, 128)
    with pytest.raises(ValueError, match="multiple"):
        geometry_from_numbers(2, 3, 64, num_heads=8)


def test_config_files_directories_and_bad_input(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64}))
    assert kv_geometry(read_config_file(tmp_path)).bytes_per_token("float32") == 2 * 2 * 4 * 16 * 4
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_config_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"no config\.json"):
        read_config_file(tmp_path / "missing")
    with pytest.raises(ValueError, match="layers, heads and hidden size"):
        kv_geometry({"model_type": "mystery"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id offline: a clear error, no traceback, no wait
    with pytest.raises(kvviz.ModelLoadError, match="offline"):
        load_config_source("someone/not-a-model")


@pytest.mark.parametrize("family", FAMILIES)
def test_formula_equals_the_bytes_a_real_cache_holds(family):
    lm = tiny_model(family)
    m = measure_prefill(lm, tokens=37, batch=3)
    assert m.measured_bytes == m.formula_bytes > 0
    assert len(m.shapes) == lm.info.num_layers
    assert all(s == (3, lm.info.num_key_value_heads, 37, lm.info.head_dim) for s in m.shapes)


def test_formula_equals_a_running_sessions_cache():
    lm = tiny_model("llama_gqa")
    s = kvviz.Session(lm, "It is a truth universally acknowledged", 5, parity=False, stop_at_eos=False)
    s.run()
    n = s.cache.seq_lengths()[0]
    assert s.cache.nbytes() == kv_geometry(lm.model.config).total_bytes(n, 1, lm.info.dtype)


def test_cli_json_and_text(capsys):
    gemma = str(memory.CONFIGS_DIR / "gemma-7b.json")
    assert main(["memory", "--config", gemma, "--tokens", "1000", "--batch", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["bytes_per_token"], d["total_bytes"]) == (458_752, 458_752 * 1000 * 2)
    assert isinstance(d["bytes_per_token"], int) and isinstance(d["total_bytes"], int)
    numbers = ["--layers", "32", "--kv-heads", "8", "--head-dim", "128"]
    assert main(["memory", *numbers, "--dtype", "int4", "--tokens", "10", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["bytes_per_token"], d["total_bytes"]) == (32_768, 327_680)
    assert main(["memory", "--config", "llama-3-8b", "--tokens", "8192"]) == 0
    out = capsys.readouterr().out
    assert "131,072 B" in out and "1.0 GiB" in out and "weights" in out
    assert main(["memory", "--layers", "4"]) == 2
    assert "--kv-heads" in capsys.readouterr().err


def test_memory_figures():
    from kvviz.figures import memory as fm

    geo = kv_geometry(load_config_source("llama-3-8b"))
    v = geo.variants()
    fig = fm.memory_vs_context(v, [1, 1000, 100_000], 2, "float16", 16 * 2**30, 80 * 2**30, "A100", model_context=8192)
    assert [t.name.split(" (")[0] for t in fig.data] == ["weights", "MHA", "GQA", "MQA"]
    gqa = fig.data[2]
    assert gqa.y[-1] == pytest.approx(16 + 100_000 * 131_072 * 2 / 2**30)
    assert {s.type for s in fig.layout.shapes} == {"line"} and len(fig.layout.shapes) == 2  # device + context lines
    bars = fm.variants_by_dtype(v, 1000, 1)
    assert [len(t.y) for t in bars.data] == [5, 5, 5]
    assert bars.data[0].y[1] == pytest.approx(524_288 * 1000 / 2**30)  # MHA fp16
    assert memory.chart_extent(v, 80 * 2**30, 1, "float16", 16 * 2**30) == int(
        memory.max_context_on(v[next(iter(v))], 80 * 2**30, 1, "float16", 16 * 2**30) * 1.15)


def test_session_cache_measurement_follows_a_running_session():
    lm = tiny_model("gpt2")
    s = kvviz.Session(lm, "Keys and values are stored", 4, parity=False, stop_at_eos=False)
    assert measure(s.cache, s.lm.model.config, s.lm.info.dtype) is None  # nothing cached before prefill
    s.step()
    s.step()
    m = measure(s.cache, s.lm.model.config, s.lm.info.dtype)
    assert m.tokens == len(s.prompt_ids) + 1 and m.equal and m.measured_bytes == s.cache.nbytes()
