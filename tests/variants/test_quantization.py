"""Quantised caches: the rounding each format promises, the grouping (per token / per channel as KIVI), the
bytes with their scales, and the error a view shows (dequantised − exact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvviz.engine.variant import LayerCall
from kvviz.geometry import quantized_bytes_per_element
from kvviz.testing import tiny_model
from kvviz.variants.paired import PairedSession
from kvviz.variants.quantization import FP8_MAX, fake_quantize, per_channel, per_token
from kvviz.variants.registry import get_variant

PROMPT = "It is a truth universally acknowledged, that"


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4096, 32, generator=g) * 3  # (groups, group)


@pytest.mark.parametrize("bits,levels", [(8, 254), (4, 14)])
def test_symmetric_int_rounds_within_half_a_step_of_the_absmax(x, bits, levels):
    err = (fake_quantize(x, bits, "int", zero_point=False) - x).abs()
    bound = x.abs().amax(-1, keepdim=True) / levels * 1.001  # half a step; the fp16 scale adds < 0.1 %
    assert (err <= bound).all() and err.max() > 0.5 * bound.max()  # and the rounding is really that coarse


def test_asymmetric_int_rounds_within_half_a_step_of_the_range(x):
    err = (fake_quantize(x, 4, "int", zero_point=True) - x).abs()
    span = x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)
    assert (err <= span / 30 * 1.01 + 1e-3).all()


def test_fp8_e4m3_keeps_about_two_significant_digits_and_never_overflows(x):
    y = fake_quantize(x, 8, "fp8", zero_point=False)
    rel = ((y - x).abs() / x.abs().clamp_min(1e-3))[x.abs() > 0.1 * x.abs().amax(-1, keepdim=True)]
    assert rel.max() <= 2**-4 + 1e-3  # 3 mantissa bits: half a step is 1/16 of the value
    assert 0.01 < float(((y - x).pow(2).mean() / x.pow(2).mean()).sqrt()) < 0.05  # rel-RMSE ~2.7 % (research notes)
    huge = torch.tensor([[1e6, -3e6, 5.0]])  # scaled so the absmax maps to 448: nothing saturates ...
    y = fake_quantize(huge, 8, "fp8", False)[0]
    np.testing.assert_allclose(y[:2].numpy(), huge[0, :2].numpy(), rtol=2**-4)
    assert y[2] == 0  # ... but a value below e4m3's smallest step (2^-9 of the scale) in the same group vanishes
    assert torch.tensor([1000.0]).to(torch.float8_e4m3fn).float().item() == FP8_MAX  # unscaled, e4m3 saturates


def test_groups_keep_an_outlier_to_itself():
    x = torch.ones(1, 1, 2, 64)
    x[..., 0, 0] = 100.0  # an outlier in channel 0 of token 0
    tok = per_token(x, 32, 4, "int", False)
    assert torch.allclose(tok[..., 0, 32:], x[..., 0, 32:], atol=1e-3)  # the other group keeps its ones (fp16 scale)
    assert (tok[..., 0, 1:32] == 0).all()  # its own group of 32 is crushed to zero
    keys = torch.ones(1, 1, 32, 4)
    keys[..., 0, 0] = 100.0
    chan = per_channel(keys, 32, 4, "int", False)
    assert torch.allclose(chan[..., 1:], keys[..., 1:], atol=1e-3)  # per channel: the other channels keep their ones
    assert (chan[..., 1:, 0] == 0).all()  # the outlier's channel is crushed


def test_keys_per_channel_wait_for_a_full_block_of_tokens():
    """KIVI: the newest keys stay exact until `group` of them exist; values are quantised at once."""
    q = get_variant("kivi", group=8)
    state: dict = {}
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, 2, 12, 16, generator=g), torch.randn(1, 2, 12, 16, generator=g)
    (keys, values), _ = q.update(None, (k, v), LayerCall(0, 0, state))  # prefill: 12 rows
    assert state["done"] == 8 and torch.equal(keys[..., 8:, :], k[..., 8:, :]) and not torch.equal(keys[..., :8, :], k[..., :8, :])
    assert not torch.equal(values, v)
    stored = (keys, values)
    for step in range(1, 5):  # four more rows: the second block of 8 fills at the 16th row
        new = (torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g))
        stored, _ = q.update(stored, new, LayerCall(0, step, state))
    assert state["done"] == 16 and stored[0].shape[-2] == 16
    assert q.report(state) == {"quantized_key_rows": 16}


def test_bytes_per_element_count_each_groups_scale():
    assert quantized_bytes_per_element(8, 32) == 1.0625  # llama.cpp q8_0: 34 B per 32 values
    assert quantized_bytes_per_element(4, 32) == 0.5625  # q4_0: 18 B per 32 values
    assert quantized_bytes_per_element(4, 32, zero_point=True) == 0.625  # a minimum beside each scale
    assert quantized_bytes_per_element(8, 128, scale_bytes=4) == 1 + 4 / 128
    with pytest.raises(ValueError, match="positive"):
        quantized_bytes_per_element(0, 32)


@pytest.mark.parametrize("name,bound", [("int8_cache", 1 / 254), ("int4_cache", 1 / 14), ("fp8_cache", 1 / 16)])
def test_the_error_view_is_dequantised_minus_exact_per_row(name, bound):
    lm = tiny_model("llama_gqa")
    p = PairedSession(lm, PROMPT, 4, name, stop_at_eos=False, group=16)
    p.run()
    exact_rows = p.variant.trace()  # the run's own k'/v' before rounding are recorded per step
    k_err, v_err = p.quantization_error(1, 3)
    kept = exact_rows.keys(1, 3)
    own = kept - k_err  # (kv_heads, rows, head_dim)
    assert k_err.shape == kept.shape and np.abs(k_err).max() > 0 and np.abs(v_err).max() > 0
    assert (np.abs(k_err) <= np.abs(own).max(-1, keepdims=True) * bound * 1.01 + 1e-6).all()


def test_the_error_view_refuses_a_cache_whose_rows_moved():
    lm = tiny_model("llama_gqa")
    p = PairedSession(lm, PROMPT, 4, "sliding_window", budget=6, stop_at_eos=False)
    p.run()
    with pytest.raises(ValueError, match="its rows moved"):
        p.quantization_error(0, 3)
