"""Every cache formula against transformers 5.23 on CPU: a tiny random model of each family
(MLA, sliding window, local/global, hybrids with Mamba or Gated DeltaNet layers) is prefilled and
decoded past its window, and the bytes its cache really holds must equal `kvviz.geometry`'s.

Guards issue 15: DeepSeek read as "MHA, head_dim 56"; windowed layers summed as if they kept every
token; hybrids' attention-free layers counted as caching; quantized sizes without their scales.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kvviz.economics import memory
from kvviz.economics.memory import read_config_file, to_transformers_config
from kvviz.geometry import QUANTIZED, kv_geometry, quantized_bytes_per_element

W = 4  # the tiny models' sliding window: the cache must stop growing at W - 1 rows
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256)
MLA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
           v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
           max_position_embeddings=256, n_group=1, topk_group=1)


def tiny_config(family: str):
    """A random config of `family` small enough to run on CPU in a blink (transformers 5.23 classes)."""
    import transformers as tf

    if family == "deepseek_v2":
        return tf.DeepseekV2Config(**MLA, q_lora_rank=None)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**MLA, q_lora_rank=32)
    if family == "mistral":  # every layer windowed
        return tf.MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=W)
    if family == "gemma2":  # local, global
        return tf.Gemma2Config(**COMMON, num_hidden_layers=2, head_dim=16, sliding_window=W)
    if family == "gemma3_text":  # 5 local : 1 global
        return tf.Gemma3TextConfig(**COMMON, num_hidden_layers=6, head_dim=16, sliding_window=W)
    if family == "gpt_oss":
        return tf.GptOssConfig(**COMMON, num_hidden_layers=2, head_dim=16, sliding_window=W, num_local_experts=4,
                               num_experts_per_tok=2)
    if family == "jamba":  # layer 1 attention, layers 0, 2, 3 Mamba
        return tf.JambaConfig(**COMMON, num_hidden_layers=4, attn_layer_period=4, attn_layer_offset=1,
                              expert_layer_period=2, expert_layer_offset=1, num_experts=2, num_experts_per_tok=1,
                              mamba_d_state=8)
    if family == "qwen3_next":  # layer 3 attention, layers 0-2 Gated DeltaNet
        return tf.Qwen3NextConfig(**COMMON, num_hidden_layers=4, head_dim=16, linear_num_key_heads=2,
                                  linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  shared_expert_intermediate_size=32)
    raise ValueError(family)


FAMILIES = ("deepseek_v2", "deepseek_v3", "mistral", "gemma2", "gemma3_text", "gpt_oss", "jamba", "qwen3_next")


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def cache_bytes(cache) -> tuple[int, int]:
    """(K/V tensor bytes, fixed-state bytes) a transformers cache really holds, over all layers."""
    kv = state = 0
    for layer in cache.layers:
        if hasattr(layer, "recurrent_states"):  # LinearAttentionLayer: convolution + recurrent states
            state += sum(_nbytes(t) for t in layer.conv_states.values())
            state += sum(_nbytes(t) for t in layer.recurrent_states.values())
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor):
            kv += _nbytes(keys) + _nbytes(layer.values)
    return kv, state


def run(family: str, dtype: torch.dtype, batch: int, lengths: tuple[int, ...]):
    """Prefill `lengths[0]` random tokens, decode one token at a time, and at each length in
    `lengths` yield (tokens, the cache)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (batch, lengths[0]), generator=gen)  # (batch, prompt)
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache, n = out.past_key_values, lengths[0]
        for target in lengths:
            while n < target:
                nxt = out.logits[:, -1:].argmax(-1)  # (batch, 1)
                out = model(nxt, past_key_values=cache, use_cache=True)
                n += 1
            yield n, cache, model.config


@pytest.mark.parametrize("family", FAMILIES)
def test_formula_equals_what_transformers_caches(family):
    """Below the window (2 tokens), at it and past it (10): K/V bytes and fixed states, batch 2, fp32."""
    batch = 2
    for tokens, cache, config in run(family, torch.float32, batch, (2, 3, 10)):
        geo = kv_geometry(config)
        kv, state = cache_bytes(cache)
        assert kv == geo.total_bytes(tokens, batch, "float32"), (family, tokens)
        assert state == geo.state_bytes(batch, "float32", stored_by="transformers") == geo.state_bytes(batch, "float32")
        if tokens == 2:  # below every window every cached layer grows by bytes_per_token
            assert kv == tokens * batch * geo.bytes_per_token("float32")


def test_what_each_family_is_named():
    expected = {
        "deepseek_v2": ("MLA", {"global": 2}, 0), "deepseek_v3": ("MLA", {"global": 2}, 0),
        "mistral": ("GQA", {"windowed": 2}, W), "gemma2": ("GQA", {"global": 1, "windowed": 1}, W),
        "gemma3_text": ("GQA", {"global": 1, "windowed": 5}, W), "gpt_oss": ("GQA", {"global": 1, "windowed": 1}, W),
        "jamba": ("GQA", {"global": 1, "no_kv": 3}, 0), "qwen3_next": ("GQA", {"global": 1, "no_kv": 3}, 0),
    }
    for family, (kind, layers, window) in expected.items():
        geo = kv_geometry(tiny_config(family))
        assert (geo.attention_kind, geo.layers_by_kind(), geo.window) == (kind, layers, window), family


def test_mla_caches_the_latent_and_the_rope_key_not_per_head_k_and_v():
    """transformers 5.23's DeepSeek layers put the latent in `keys` and the roped shared key in `values`."""
    *_, (tokens, cache, config) = run("deepseek_v3", torch.float32, 1, (3, 5))
    geo = kv_geometry(config)
    assert tokens == 5
    for layer in cache.layers:
        assert tuple(layer.keys.shape) == (1, 1, 5, geo.kv_lora_rank)  # (batch, 1, T, kv_lora_rank)
        assert tuple(layer.values.shape) == (1, 1, 5, geo.qk_rope_head_dim)  # (batch, 1, T, rope)
    # what attention multiplies instead: 4 heads x (16 + 8 key, 16 value) per layer
    assert geo.decompressed_bytes_per_token("float32") == 2 * 4 * (24 + 16) * 4
    assert geo.bytes_per_token("float32") == 2 * (32 + 8) * 4


@pytest.mark.parametrize("family", ["jamba", "qwen3_next"])
def test_hybrid_recurrent_states_are_float32_in_a_bf16_model(family):
    """Measured: conv states follow the model's dtype, recurrent/SSM states stay float32."""
    batch = 2
    *_, (tokens, cache, config) = run(family, torch.bfloat16, batch, (3, 4))
    geo = kv_geometry(config)
    kv, state = cache_bytes(cache)
    assert kv == geo.total_bytes(tokens, batch, "bfloat16")
    assert state == geo.state_bytes(batch, "bfloat16", stored_by="transformers") > geo.state_bytes(batch, "bfloat16")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_config_json_without_derived_fields_reads_the_same(family):
    """config.json files often lack `layer_types` (Gemma-2, Jamba, Mistral): kvviz derives them as
    transformers does, so the raw dict and the config object agree."""
    config = tiny_config(family)
    raw = json.loads(json.dumps(config.to_dict()))
    raw.pop("layer_types", None)
    assert kv_geometry(raw) == kv_geometry(config)


@pytest.mark.parametrize("name", sorted(memory.preset_configs()))
def test_every_preset_reads_the_same_as_transformers_config_object(name):
    raw = read_config_file(memory.CONFIGS_DIR / f"{name}.json")
    assert kv_geometry(to_transformers_config(raw)) == kv_geometry(raw)


def test_fp8_cache_costs_one_byte_per_element_and_nothing_per_token_for_its_scale():
    """transformers' QuantizedCache('fp8'): e4m3 payload plus one fp32 scale per K/V tensor and layer."""
    from transformers import QuantizedCache

    from kvviz.testing import tiny_model

    lm = tiny_model("llama_gqa")
    geo = kv_geometry(lm.model.config)
    cache = QuantizedCache("fp8", lm.model.config)
    ids = torch.randint(0, 300, (1, 7))
    sizes = []
    with torch.inference_mode():
        out = lm.model(ids, past_key_values=cache, use_cache=True)
        for _ in range(3):
            payload = scales = 0
            for layer in cache.layers:
                for q, scale in (layer._quantized_keys, layer._quantized_values):
                    assert q.dtype == torch.float8_e4m3fn
                    payload, scales = payload + _nbytes(q), scales + _nbytes(scale)
            sizes.append((cache.get_seq_length(), payload, scales))
            out = lm.model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    for tokens, payload, scales in sizes:
        assert payload == geo.total_bytes(tokens, 1, "fp8")
        assert scales == 2 * geo.num_layers * 4  # fixed: one float32 per tensor, whatever the length
    assert geo.scale_bytes_per_token("fp8") == 0 and QUANTIZED["fp8"].default_group_size is None


def _group_quantize(x: np.ndarray, bits: int, group: int, asymmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize the last axis of x in groups (padded to a whole group): (codes, fp16 scales, fp16 zero points)."""
    pad = (-x.shape[-1]) % group
    g = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], -1, group)
    if asymmetric:
        lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
        scale = np.maximum(hi - lo, 1e-8) / (2**bits - 1)
        codes = np.round((g - lo) / scale).astype(np.uint8)
        return codes, scale.astype(np.float16), lo.astype(np.float16)
    scale = np.maximum(np.abs(g).max(-1, keepdims=True), 1e-8) / (2 ** (bits - 1) - 1)
    return np.round(g / scale).astype(np.int8), scale.astype(np.float16), None


@pytest.mark.parametrize(("dtype", "group"), [("int8", 64), ("int8", 32), ("int4", 64), ("int4", 32), ("int4", 48)])
def test_group_quantized_sizes_equal_a_real_group_quantizer(dtype, group):
    """K and V of phi-2's shape (head_dim 80: a group of 64 leaves a second, padded group) quantized
    per vector: packed payload + fp16 scales (+ zero points) = the formula."""
    geo = kv_geometry(read_config_file(memory.CONFIGS_DIR / "phi-2.json"))
    q = QUANTIZED[dtype]
    kv = np.random.default_rng(0).standard_normal((2, geo.num_key_value_heads, 5, geo.head_dim))  # (K|V, heads, T, d)
    _codes, scales, zeros = _group_quantize(kv, q.bits, group, asymmetric=q.zero_point_bytes > 0)
    payload = kv.size * q.bits // 8  # packed codes, padding not stored
    meta = scales.nbytes + (0 if zeros is None else zeros.nbytes)
    per_token_one_layer = (payload + meta) / 5
    assert geo.bytes_per_token(dtype, group) == geo.num_layers * per_token_one_layer
    assert geo.scale_bytes_per_token(dtype, group) == geo.num_layers * meta / 5


def test_published_quantized_block_formats():
    """llama.cpp's q8_0 and q4_0 blocks (32 values + one fp16 scale): 34 B and 18 B per 32."""
    assert quantized_bytes_per_element(8, 32, scale_bytes=2) * 32 == 34
    assert quantized_bytes_per_element(4, 32, scale_bytes=2) * 32 == 18
    assert quantized_bytes_per_element(4, None) == 0.5
    llama3 = kv_geometry(read_config_file(memory.CONFIGS_DIR / "llama-3-8b.json"))
    # int4 with fp16 scale + zero point per 64: 4.5 bits per element
    assert llama3.bytes_per_token("int4") == 65_536 * 0.5 + 65_536 // 64 * 4 == 36_864
    assert llama3.bytes_per_token("int4", 32) == 65_536 * 0.5 + 65_536 // 32 * 4
    assert math.isclose(llama3.bytes_per_token("int8"), 65_536 * quantized_bytes_per_element(8, 64))
