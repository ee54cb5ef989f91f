"""Cache vs recompute: the FLOP model against torch's FLOP counter, timings' structure and spread."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, DynamicCache

from kvviz.economics import cost
from kvviz.geometry import kv_geometry
from kvviz.testing import tiny_config, tiny_model


def _counted(model, ids, cache=None, **kw) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, past_key_values=cache, **kw)
    return counter.get_total_flops()


@pytest.mark.parametrize("family", ["llama_gqa", "llama_mqa", "gpt2"])
def test_flop_model_equals_torch_flop_counter(family):
    """With eager attention every product is a counted matmul: the cached step matches exactly;
    the recompute matches the full square (eager computes the masked half too), i.e. our causal
    count plus the masked pairs."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager").eval()
    fm = cost.flop_model(model)
    n = 24
    ids = torch.randint(0, 300, (1, n))
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
    assert _counted(model, ids[:, -1:], cache, use_cache=True) == fm.cached_step(n)
    full_square = _counted(model, ids, use_cache=False, logits_to_keep=1)
    assert full_square == fm.forward(n, n * n)
    assert fm.recompute_step(n) == full_square - 4 * fm.num_layers * fm.attn_width * (n * n - n * (n + 1) // 2)


def test_flop_model_counts_by_hand():
    lm = tiny_model("llama_gqa")  # 2 layers, hidden 64, 4 heads / 2 KV heads of 16, mlp 128, vocab 384
    fm = cost.flop_model(lm.model)
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 128  # q, k+v, o, gate/up/down
    assert (fm.matmul_params, fm.lm_head_params, fm.attn_width) == (2 * per_layer, 64 * 384, 64)
    assert fm.cached_step(10) == 2 * 2 * per_layer + 4 * 2 * 64 * 10 + 2 * 64 * 384
    ratios = [fm.recompute_step(n) / fm.cached_step(n) for n in (8, 64, 127)]
    assert ratios == sorted(ratios) and ratios[-1] > 50


def test_spread_quantiles_match_numpy():
    xs = (5.0, 1.0, 4.0, 2.0, 3.0, 10.0)
    s = cost.Spread(xs)
    assert s.median == np.median(xs)
    assert (s.q1, s.q3) == (np.percentile(xs, 25), np.percentile(xs, 75))
    assert s.iqr == pytest.approx(np.percentile(xs, 75) - np.percentile(xs, 25))


def test_measure_steps_on_a_tiny_model_leaves_the_model_untouched():
    lm = tiny_model("llama_gqa")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    sweep = cost.measure_steps(lm, [16, 4, 64], repeats=3, warmup=1)
    assert [s.context for s in sweep.steps] == [4, 16, 64]
    for s in sweep.steps:
        assert len(s.cached_ms.samples) == len(s.recompute_ms.samples) == 3
        assert all(x > 0 for x in s.cached_ms.samples + s.recompute_ms.samples)
        assert s.cached_ms.q1 <= s.cached_ms.median <= s.cached_ms.q3
        assert s.recompute_flops > s.cached_flops
    assert sweep.rows()[0]["context"] == 4 and "FLOP ratio" in sweep.rows()[0]
    assert lm.model.config._attn_implementation == "kvviz"
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_bad_contexts_are_refused():
    lm = tiny_model("llama_gqa")  # context 128
    with pytest.raises(ValueError, match="between 2 and the model's context"):
        cost.measure_steps(lm, [8, 500])
    with pytest.raises(ValueError, match="fit the model's context"):
        cost.measure_throughput(lm, prompt_tokens=120, decode_tokens=20)


def test_default_contexts_double_up_to_the_full_context():
    assert cost.default_contexts(512) == [8, 16, 32, 64, 128, 256, 512]
    assert cost.default_contexts(2048, n=4) == [256, 512, 1024, 2048]


def test_throughput_and_bytes_per_decode_token():
    lm = tiny_model("llama_gqa")
    th = cost.measure_throughput(lm, prompt_tokens=48, decode_tokens=8, repeats=2)
    assert th.prefill_tokens_per_s > 0 and th.decode_tokens_per_s > 0
    weights = sum(p.numel() * 4 for p in lm.model.parameters())
    assert th.weights_bytes == weights
    # prefill reuses each weight byte for every prompt token; decode for one token
    assert th.prefill_intensity > 10 * th.decode_intensity
    geo = kv_geometry(lm.model.config)
    rows = cost.bytes_per_decode_token(geo, weights, [1, 100], "float32")
    assert rows[1]["cache_bytes"] == 100 * geo.bytes_per_token("float32") and rows[0]["weights_bytes"] == weights


def _fake_sweep() -> cost.CostSweep:
    """A CostSweep with known numbers (the figures are pure: no measuring needed)."""
    fm = cost.FlopModel(matmul_params=1000, lm_head_params=100, num_layers=2, attn_width=8)
    steps = tuple(
        cost.StepCost(n, cost.Spread((1.0, 1.2, 1.1)), cost.Spread((n / 10, n / 8, n / 9)),
                      fm.cached_step(n), fm.recompute_step(n))
        for n in (8, 64, 512)
    )
    return cost.CostSweep("m", "cpu", "float32", 1, 3, steps)


def test_cost_figures():
    from kvviz.figures import cost as fc

    sweep = _fake_sweep()
    fig = fc.step_times(sweep)
    cached, _recompute = fig.data
    assert list(cached.x) == [8, 64, 512] and cached.y[0] == pytest.approx(1.1)
    assert cached.error_y.array[0] == pytest.approx(1.15 - 1.1) and cached.error_y.arrayminus[0] == pytest.approx(1.1 - 1.05)
    assert fig.layout.yaxis.type == "log" and "ms" in fig.layout.yaxis.title.text
    flops = fc.step_flops(sweep)
    ratio = next(t for t in flops.data if t.name == "FLOP ratio (counted)")
    assert list(ratio.y) == [s.flop_ratio for s in sweep.steps]
    rows = [{"context": 8, "weights_bytes": 2**20, "cache_bytes": 2**19}]
    b = fc.decode_bytes(rows)
    assert [t.y[0] for t in b.data] == [1.0, 0.5] and b.layout.barmode == "stack"
    assert fc.log_ticks(4.3, 130) == [2, 5, 10, 20, 50, 100, 200]
