"""The versions and transformers internals kvviz is built on. These fail loudly when they move."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import torch

from kvviz.engine import capture
from kvviz.engine.cache import check_internals

ROOT = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_installed_versions_match_the_exact_pins():
    pins = _pins()
    for pkg in ("torch", "transformers", "streamlit", "plotly"):
        assert pkg in pins, f"{pkg} must be pinned exactly in requirements.txt"
        installed = version(pkg).split("+")[0]  # torch's local tag (+cpu) is the build, not the release
        assert installed == pins[pkg], f"{pkg} {installed} installed but {pins[pkg]} pinned"


def test_cache_internals_kvviz_relies_on_are_present():
    """cache.py reads DynamicLayer.keys/values/is_initialized; a rename must fail here, not silently."""
    assert check_internals() == []


def test_attention_and_mask_functions_are_registered():
    """Regression: without the mask function an unknown attention name gets no mask (prefill not causal)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping[capture.ATTN_IMPLEMENTATION] is capture.kvviz_attention
    assert capture.ATTN_IMPLEMENTATION in AttentionMaskInterface._global_mapping


def test_attention_function_contract(tiny_llama):
    """transformers 5.23 calls attention with post-RoPE q (batch, heads, q, d) and the full cache
    K/V (batch, kv_heads, kv, d), new rows last; the layer index is on the module."""
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, tuple(query.shape), tuple(key.shape), attention_mask is not None))
        return capture.kvviz_attention(module, query, key, value, attention_mask, **kwargs)

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("kvviz_spy", spy)
    AttentionMaskInterface.register("kvviz_spy", eager_mask)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_llama.model.config, attn_implementation="kvviz_spy")
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5]]), past_key_values=cache, use_cache=True)
        model(torch.tensor([[6]]), past_key_values=cache, use_cache=True)
    info = tiny_llama.info
    d = info.head_dim
    assert seen[0] == (0, (1, info.num_heads, 5, d), (1, info.num_key_value_heads, 5, d), True)
    assert seen[-1] == (info.num_layers - 1, (1, info.num_heads, 1, d), (1, info.num_key_value_heads, 6, d), True)
