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
    ("mistral-7b-v0.1", 32, 8, 128, "GQA", 131_072),  # below its window
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
    by_dtype = [geo.bytes_per_token(d) for d in ("fp32", "fp16", "bf16", "fp8", "int8", "int4")]
    # 65,536 elements per token; int8: + one fp16 scale per 64; int4: + fp16 scale and zero point per 64
    assert by_dtype == [262_144, 131_072, 131_072, 65_536, 65_536 + 1024 * 2, 32_768 + 1024 * 4]
    assert [geo.scale_bytes_per_token(d) for d in ("fp16", "fp8", "int8", "int4")] == [0, 0, 2048, 4096]
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
    assert (d["bytes_per_token"], d["total_bytes"], d["scale_bytes_per_token"]) == (36_864, 368_640, 4096)
    assert main(["memory", *numbers, "--dtype", "int4", "--group-size", "128", "--tokens", "10", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["group_size"], d["scale_bytes_per_token"], d["bytes_per_token"]) == (128, 2048, 34_816)
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
    assert [len(t.y) for t in bars.data] == [6, 6, 6]
    assert bars.data[0].y[1] == pytest.approx(524_288 * 1000 / 2**20)  # MHA fp16, in MiB (the largest bar is 1 GiB)
    assert bars.layout.yaxis.title.text.startswith("MiB")
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


# -- the architectures of issue 15: MLA, windows, hybrids ---------------------------------------
# (preset, attention, layers by kind, window, bf16 bytes per token below every window, one
# sequence of 8,192 tokens in bf16), worked out by hand from the published configs:
ARCH = [
    # MLA: (kv_lora_rank 512 + rope 64) x layers x 2 B, whatever the 16 / 128 heads
    ("deepseek-v2-lite", "MLA", {"global": 27}, 0, 576 * 27 * 2, 576 * 27 * 2 * 8192),
    ("deepseek-v3", "MLA", {"global": 61}, 0, 70_272, 70_272 * 8192),
    # every layer windowed (4096): 4095 rows kept per layer
    ("mistral-7b-v0.1", "GQA", {"windowed": 32}, 4096, 131_072, 131_072 * 4095),
    # 21 global + 21 windowed (4096), 8 KV heads x 256: 8192 B per layer and token
    ("gemma-2-9b", "GQA", {"global": 21, "windowed": 21}, 4096, 344_064, 21 * 8192 * 8192 + 21 * 8192 * 4095),
    # 8 global + 40 windowed (1024)
    ("gemma-3-12b", "GQA", {"global": 8, "windowed": 40}, 1024, 393_216, 8 * 8192 * 8192 + 40 * 8192 * 1023),
    # 12 + 12 (128), 8 KV heads x 64: 2048 B per layer and token
    ("gpt-oss-20b", "GQA", {"global": 12, "windowed": 12}, 128, 49_152, 12 * 2048 * 8192 + 12 * 2048 * 127),
    # only 4 of 32 layers attend (i % 8 == 4); 8 KV heads x 128
    ("jamba-v0.1", "GQA", {"global": 4, "no_kv": 28}, 0, 16_384, 16_384 * 8192),
    # every 4th of 48 layers attends; 2 KV heads x 256
    ("qwen3-next-80b-a3b", "GQA", {"global": 12, "no_kv": 36}, 0, 24_576, 24_576 * 8192),
]


@pytest.mark.parametrize(("name", "kind", "layers", "window", "bf16", "seq8k"), ARCH)
def test_architecture_presets_read_to_hand_computed_bytes(name, kind, layers, window, bf16, seq8k):
    geo = kv_geometry(load_config_source(name))
    assert (geo.attention_kind, geo.layers_by_kind(), geo.window) == (kind, layers, window)
    assert geo.bytes_per_token("bf16") == bf16
    assert geo.total_bytes(8192, 1, "bf16") == seq8k
    assert geo.total_bytes(8192, 3, "bf16") == 3 * seq8k
    if window:  # below the window every layer grows; the naive sum is what the old calculator said
        assert geo.total_bytes(window - 1, 1, "bf16") == (window - 1) * bf16
        assert geo.without_windows().total_bytes(8192, 1, "bf16") == 8192 * bf16 > seq8k


def test_deepseek_v3_is_not_read_as_mha_with_head_dim_56():
    """Issue 15's first example: 1,748,992 B/token before, 70,272 now, decompressed 4,997,120."""
    geo = kv_geometry(load_config_source("deepseek-v3"))
    assert geo.bytes_per_token("bf16") == 70_272 != 2 * 61 * 128 * 56 * 2
    assert geo.decompressed_bytes_per_token("bf16") == 128 * (192 + 128) * 61 * 2 == 4_997_120
    assert (geo.head_dim, geo.value_head_dim) == (192, 128)
    own = next(iter(geo.variants()))
    assert own.startswith("MLA") and "this model" in own
    mha = geo.variants()["MHA (128 KV heads)"]
    assert mha.bytes_per_token("bf16") == geo.decompressed_bytes_per_token("bf16")


def test_hybrid_fixed_states_by_hand():
    """Jamba: 28 Mamba layers x 8192 channels x (conv 4 + SSM 16); Qwen3-Next: 36 DeltaNet layers x
    (8192 conv channels x 4 + 32 heads x 128 x 128). transformers keeps the recurrent part in fp32."""
    jamba = kv_geometry(load_config_source("jamba-v0.1"))
    assert (jamba.conv_state_elements, jamba.recurrent_state_elements) == (28 * 8192 * 4, 28 * 8192 * 16)
    assert jamba.state_bytes(1, "bf16") == 9_175_040
    assert jamba.state_bytes(1, "bf16", stored_by="transformers") == 28 * 8192 * (4 * 2 + 16 * 4) == 16_515_072
    qn = kv_geometry(load_config_source("qwen3-next-80b-a3b"))
    assert qn.state_bytes(2, "bf16") == 2 * 40_108_032
    assert qn.state_bytes(1, "bf16", stored_by="transformers") == 77_856_768
    assert qn.bytes_by_kind(100, 2, "bf16") == {"global": 2 * 100 * 24_576, "no_kv": 2 * 40_108_032}
    with pytest.raises(ValueError, match="stored_by"):
        qn.state_bytes(1, "bf16", stored_by="vllm")


def test_windows_bend_the_fit_and_an_all_windowed_model_fits_any_length():
    mistral = kv_geometry(load_config_source("mistral-7b-v0.1"))
    cap = 131_072 * 4095
    assert mistral.max_tokens(cap, "bf16") == 1 << 40  # never grows past the window
    assert mistral.max_tokens(cap - 1, "bf16") == 4094
    gemma = kv_geometry(load_config_source("gemma-2-9b"))
    fixed = 21 * 8192 * 4095
    budget = fixed + 21 * 8192 * 10_000
    assert gemma.max_tokens(budget, "bf16") == 10_000  # past the window only global layers count
    assert memory.max_context_on(mistral, 80 * 2**30, 1, "bf16", weights_bytes=16 * 2**30) == memory.MAX_TOKENS
    # the chart's points include the corner where windowed layers stop
    assert 4095 in memory.context_points(32_768, window=4096)


def test_old_preset_name_still_resolves():
    """mistral-7b.json (v0.1) was renamed mistral-7b-v0.1; the old name keeps working in the CLI."""
    assert load_config_source("mistral-7b") == load_config_source("mistral-7b-v0.1")


@pytest.mark.parametrize(("cfg", "message"), [
    ([1, 2, 3], "JSON object"),
    ("not a config", "JSON object"),
    ({"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4}, "layers, heads and hidden size"),
    ({"num_hidden_layers": -2, "num_attention_heads": 4, "hidden_size": 64}, "num_hidden_layers = -2 is out of range"),
    ({"num_hidden_layers": 10**9, "num_attention_heads": 4, "hidden_size": 64}, "out of range"),
    ({"num_hidden_layers": "32", "num_attention_heads": 4, "hidden_size": 64}, "whole number"),
    ({"num_hidden_layers": 2.5, "num_attention_heads": 4, "hidden_size": 64}, "whole number"),
    ({"num_hidden_layers": True, "num_attention_heads": 4, "hidden_size": 64}, "whole number"),
    ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "num_key_value_heads": 8}, "more KV heads"),
    ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 2}, "no head_dim"),
    ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "layer_types": ["full_attention"]},
     "1 entries for 2 layers"),
    ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "layer_types": ["warp", "full_attention"]},
     "unknown layer type"),
    ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "layer_types": "full_attention"},
     "list of strings"),
    ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
      "layer_types": ["sliding_attention", "full_attention"]}, "no sliding_window"),
    ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "sliding_window": 0}, "out of range"),
    ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "kv_lora_rank": float("nan")}, "whole number"),
    ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "max_position_embeddings": -1}, "out of range"),
])
def test_bad_configs_say_which_field(cfg, message):
    with pytest.raises(ValueError, match=message):
        kv_geometry(cfg)


def test_bad_sizes_and_group_sizes_say_what_to_fix():
    geo = kv_geometry(load_config_source("llama-3-8b"))
    with pytest.raises(ValueError, match="tokens must be"):
        memory.estimate(geo, -1)
    with pytest.raises(ValueError, match="batch must be at least 1"):
        memory.estimate(geo, 10, 0)
    with pytest.raises(ValueError, match="group size"):
        memory.estimate(geo, 10, 1, "int4", group_size=0)
    assert geo.bytes_per_token("fp16", group_size=7) == 131_072  # float dtypes have no groups


def test_cli_json_names_the_architecture(capsys):
    assert main(["memory", "--config", "gemma-3-12b", "--dtype", "bf16", "--tokens", "8192", "--batch", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["attention"], d["layers_by_kind"], d["window"]) == ("GQA", {"global": 8, "windowed": 40}, 1024)
    assert (d["bytes_per_token"], d["total_bytes"]) == (393_216, 2 * 872_087_552)
    assert d["bytes_by_kind"] == {"global": 2 * 8 * 8192 * 8192, "windowed": 2 * 40 * 8192 * 1023}
    assert "scale_bytes_per_token" not in d and d["growth_bytes_per_token"] == 65_536
    assert main(["memory", "--config", "deepseek-v3", "--dtype", "bf16", "--tokens", "10", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["attention"], d["bytes_per_token"], d["decompressed_bytes_per_token"]) == ("MLA", 70_272, 4_997_120)
    assert "window" not in d
    assert main(["memory", "--config", "jamba-v0.1", "--dtype", "int4", "--tokens", "10", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["layers_by_kind"] == {"global": 4, "no_kv": 28} and d["scale_bytes_per_token"] == 4 * 2 * 8 * 2 * 4
    assert d["state_dtype"] == "bfloat16" and d["state_bytes"] == 9_175_040
    assert main(["memory", "--config", "qwen3-next-80b-a3b", "--tokens", "4096"]) == 0
    out = capsys.readouterr().out
    assert "12 global attention, 36 no KV cache" in out and "fixed state" in out and "transformers 5.23" in out


def test_human_count_and_the_presets_table():
    from kvviz.geometry import human_count

    assert [human_count(n) for n in (999, 4_390_000, 8_030_261_248, 671_026_404_352, 1.2e13)] == [
        "999", "4.39M", "8.03B", "671B", "12T"]
    rows = {r["model"]: r for r in memory.presets_table(8192, "bfloat16")}
    assert rows["gemma-3-12b"]["window"] == 1024 and rows["gemma-3-12b"]["GiB if windows were ignored"] == 3.0
    assert rows["deepseek-v3"]["attention"] == "MLA" and rows["llama-3-8b"]["window"] is None
    assert rows["jamba-v0.1"]["layers"] == "4 global + 28 no kv" and rows["jamba-v0.1"]["fixed state (MiB)"] == 8.8


def test_memory_by_kind_figure_stacks_the_kinds():
    from kvviz.figures import memory as fm

    geo = kv_geometry(load_config_source("gemma-2-9b"))
    fig = fm.memory_by_kind(geo, [1, 4095, 8192], 1, "bf16")
    assert [t.name.split(" ")[1] for t in fig.data] == ["windowed", "global"]
    windowed, global_ = (list(t.y) for t in fig.data)
    assert windowed[1] == windowed[2] > 0 and global_[2] > global_[1]  # the window flattens, global grows
    assert sum(t.y[2] for t in fig.data) == pytest.approx(geo.total_bytes(8192, 1, "bf16") / 2**30)
    # a windowed model's line bends: at 8,192 it is below twice its value at 4,095
    chart = fm.memory_vs_context({"this model": geo, "blind": geo.without_windows()}, [4095, 8192], 1, "bf16")
    ours, blind = (list(t.y) for t in chart.data)
    assert ours[1] < 2 * ours[0] and blind[1] == pytest.approx(2 * blind[0], rel=1e-3)
