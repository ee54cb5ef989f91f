"""The tied-QKV what-if: it does what it claims, on every family, and leaves the shared model alone.

The reference is independent of the override: a deep copy of the model whose KV head's W_k and
W_v rows (and biases) are overwritten with the query head's W_q rows, run normally.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from kvviz.engine import capture
from kvviz.engine.models import from_model
from kvviz.engine.session import Session
from kvviz.quiz.whatif import TiedQKV, rope_inverse, tied_attention
from kvviz.testing import tiny_model

TEXT = "It is a truth universally acknowledged, that a single man in possession"
FAMILIES = ("llama_gqa", "llama_mqa", "qwen2", "gpt2")


def overwritten_copy(lm, layer: int, head: int, kv_head: int):
    """The model with KV head `kv_head`'s W_k and W_v (and biases) replaced by query head `head`'s W_q, for real."""
    model = copy.deepcopy(lm.model)
    d = lm.info.head_dim
    q_rows, kv_rows = slice(head * d, (head + 1) * d), slice(kv_head * d, (kv_head + 1) * d)
    with torch.no_grad():
        if lm.info.model_type == "gpt2":  # one Conv1D (hidden, 3 * hidden): q | k | v columns
            attn = model.transformer.h[layer].attn.c_attn
            hidden = lm.info.hidden_size
            for offset in (hidden, 2 * hidden):
                cols = slice(offset + kv_rows.start, offset + kv_rows.stop)
                attn.weight[:, cols] = attn.weight[:, q_rows]
                attn.bias[cols] = attn.bias[q_rows]
        else:
            attn = model.model.layers[layer].self_attn
            for proj in (attn.k_proj, attn.v_proj):
                proj.weight[kv_rows] = attn.q_proj.weight[q_rows]
                if proj.bias is not None:
                    proj.bias[kv_rows] = attn.q_proj.bias[q_rows]
    return from_model(model, lm.tokenizer, name=f"{lm.name}-tied")


def recorded(lm, ids, override=None):
    rec = capture.StepRecorder(step=0, override=override)
    with torch.inference_mode(), capture.recording(rec):
        logits = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
    return rec, logits


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    lm = tiny_model(request.param)
    ids = list(lm.tokenizer(TEXT)["input_ids"])
    return lm, ids


def test_the_override_equals_overwriting_the_weights(family):
    """Every head of the layer (the group shares the new K/V) and the logits match a real overwritten model."""
    lm, ids = family
    layer, head = 1, lm.info.num_heads - 1
    kv_head = head // lm.info.group_size
    copy_lm = overwritten_copy(lm, layer, head, kv_head)
    ref, ref_logits = recorded(copy_lm, ids)
    got, got_logits = recorded(lm, ids, TiedQKV(layer, head, kv_head, rope_inverse(lm)))
    for i in range(lm.info.num_layers):
        np.testing.assert_allclose(got.attention[i]["weights"], ref.attention[i]["weights"], atol=1e-5)
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-4, rtol=1e-4)
    # and the what-if really changes something: the layer's attention differs from the real model's
    real, _ = recorded(lm, ids)
    assert np.abs(real.attention[layer]["weights"][head] - got.attention[layer]["weights"][head]).max() > 1e-3


def test_each_key_equals_its_own_query_so_queries_look_at_themselves(family):
    """Own-position score = |q|^2 / sqrt(d), above the query's mean score elsewhere, and the top weight mostly."""
    lm, ids = family
    tokens = [lm.tokenizer.decode([i]) for i in ids]
    w = tied_attention(lm, ids, tokens, layer=1, head=0)
    np.testing.assert_allclose(np.diagonal(w.tied_scores), w.own_score_expected, rtol=1e-4, atol=1e-4)
    own = np.diagonal(w.tied_scores)[1:]
    assert (own - w.mean_other_score()).mean() > 0
    assert w.own_is_top(w.tied).mean() > w.own_is_top(w.real).mean()
    assert w.own_weight(w.tied).mean() > w.own_weight(w.real).mean()
    np.testing.assert_allclose(w.tied.sum(-1), 1.0, atol=1e-5)  # still softmax rows
    assert np.triu(w.tied, k=1).max() == 0.0  # still causal


def test_values_are_the_queries_before_rope(family):
    """What the override writes into V equals x W_q computed from the layer's input, not the rotated q."""
    lm, ids = family
    layer, head = 1, 1
    if lm.info.model_type == "gpt2":
        pytest.skip("no RoPE: pre- and post-rotation queries are the same")
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([ids]), use_cache=False, output_hidden_states=True)
        block = lm.model.model.layers[layer]
        x = block.input_layernorm(out.hidden_states[layer])  # (1, T, hidden)
        d = lm.info.head_dim
        q_pre = block.self_attn.q_proj(x)[0, :, head * d:(head + 1) * d]  # (T, head_dim)
    seen = {}

    def spy(layer_idx, query, key, value, kwargs):
        k, v = TiedQKV(layer, head, head // lm.info.group_size, rope_inverse(lm))(layer_idx, query, key, value, kwargs)
        if layer_idx == layer:
            seen["v"], seen["q"] = v[0, head // lm.info.group_size], query[0, head]
        return k, v

    recorded(lm, ids, spy)
    torch.testing.assert_close(seen["v"], q_pre, atol=1e-4, rtol=1e-4)
    assert (seen["q"] - q_pre).abs().max() > 1e-3  # RoPE did rotate the query: the undo is not a no-op


def test_the_shared_model_is_untouched():
    """After a what-if the weights are bit-identical and a normal run has parity with a full recompute."""
    lm = tiny_model("llama_gqa")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ids = list(lm.tokenizer(TEXT)["input_ids"])
    tied_attention(lm, ids, [str(i) for i in ids], layer=0, head=2)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trace = Session(lm, TEXT, 4).run()
    assert max(s.max_abs_logit_diff for s in trace.steps) < 1e-4


def test_the_override_never_writes_into_a_cache():
    """At a prefill with a cache, attention gets the cache's own tensors: the what-if must copy, not write."""
    from kvviz.engine.cache import KVVizCache

    lm = tiny_model("llama_gqa")
    ids = torch.tensor([list(lm.tokenizer(TEXT)["input_ids"])])
    caches = []
    for override in (None, TiedQKV(0, 0, 0, rope_inverse(lm))):
        cache = KVVizCache(config=lm.model.config)
        with torch.inference_mode(), capture.recording(capture.StepRecorder(step=0, override=override)):
            lm.model(input_ids=ids, past_key_values=cache, use_cache=True)
        caches.append(cache.layer_kv(0))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_the_override_refuses_a_cached_step_and_the_recorder_checks_shapes():
    lm = tiny_model("llama_gqa")
    tied = TiedQKV(0, 0, 0, rope_inverse(lm))
    q, k = torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 5, 16)
    with pytest.raises(ValueError, match="without a cache"):
        tied(0, q, k, k, {})
    assert tied(1, q, k, k, {})[0] is k  # other layers pass through

    def bad(layer_idx, query, key, value, kwargs):
        return key[:, :, :1], value

    with pytest.raises(ValueError, match="keep the K/V shapes"):
        recorded(lm, [1, 2, 3], bad)


def test_bad_layer_or_head_is_refused():
    lm = tiny_model("llama_gqa")
    with pytest.raises(ValueError, match="out of range"):
        tied_attention(lm, [1, 2, 3], ["a", "b", "c"], layer=9, head=0)
    with pytest.raises(ValueError, match="at least 2"):
        tied_attention(lm, [1], ["a"], layer=0, head=0)


def test_a_rope_kvviz_cannot_undo_is_refused(monkeypatch):
    """A model whose rotation is not rotate-half (here: interleaved pairs, as GPT-J) gets a ValueError, not wrong values."""
    from transformers.models.llama import modeling_llama

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def rot(x):
            pairs = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
            return x * cos + pairs * sin

        return rot(q), rot(k)

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", interleaved)
    lm = tiny_model("llama_gqa")
    ids = list(lm.tokenizer(TEXT)["input_ids"])
    with pytest.raises(ValueError, match="cannot undo"):
        tied_attention(lm, ids, [str(i) for i in ids], layer=0, head=0)
