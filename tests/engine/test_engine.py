"""The core engine on tiny seeded models: parity, capture correctness, GQA, isolation."""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest
import torch

import kvviz
from kvviz.engine.sampling import Sampling
from kvviz.testing import FAMILIES, run_in_lockstep, tiny_model

PROMPT = "It is a truth universally acknowledged, that"


def _eager_twin(lm):
    """The same weights with transformers' own eager attention (the reference)."""
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_config(lm.model.config, attn_implementation="eager")
    twin.load_state_dict(lm.model.state_dict())
    return twin.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_steps_match_full_recompute_and_generate(family):
    """Parity: every cached step equals a no-cache forward, and greedy equals model.generate."""
    lm = tiny_model(family)
    session = kvviz.Session(lm, PROMPT, 10, stop_at_eos=False)
    t = session.run()
    assert len(t.steps) == 10
    assert all(s.max_abs_logit_diff is not None and s.max_abs_logit_diff < 1e-4 for s in t.steps)
    ids = torch.tensor([t.prompt_ids])
    out = lm.model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert list(t.generated_ids) == out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_new_rows_are_the_cache_rows(family):
    """k'/v' recorded at each step are exactly the rows the cache holds, in order."""
    lm = tiny_model(family)
    session = kvviz.Session(lm, PROMPT, 6, stop_at_eos=False)
    t = session.run()
    for layer in range(lm.info.num_layers):
        keys, values = session.cache.layer_kv(layer)  # (1, num_kv, seq, head_dim)
        np.testing.assert_array_equal(t.keys(layer, len(t.steps) - 1), keys[0].numpy())
        np.testing.assert_array_equal(t.values(layer, len(t.steps) - 1), values[0].numpy())
    # a correct cache is append-only, so nothing but the new rows is stored per step
    assert all(ls.attended_keys is None for s in t.steps for ls in s.layers)
    assert [s.cache_len for s in t.steps] == [len(t.prompt_ids) + i for i in range(6)]


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_weights_equal_eager_output_attentions(family):
    """The recorded attention equals transformers' eager `output_attentions` over the full sequence."""
    lm = tiny_model(family)
    t = kvviz.Session(lm, PROMPT, 5, stop_at_eos=False).run()
    full = list(t.prompt_ids) + list(t.generated_ids[:-1])  # every token that was fed in
    with torch.no_grad():
        ref = _eager_twin(lm)(torch.tensor([full]), output_attentions=True).attentions
    n_prompt = len(t.prompt_ids)
    for layer in range(lm.info.num_layers):
        eager = ref[layer][0].numpy()  # (num_heads, seq, seq)
        np.testing.assert_allclose(t.steps[0].layers[layer].weights, eager[:, :n_prompt, :n_prompt], atol=1e-5)
        for s in t.steps[1:]:
            row = n_prompt + s.step - 1
            np.testing.assert_allclose(s.layers[layer].weights[:, 0, :], eager[:, row, : row + 1], atol=1e-5)


def test_weights_are_causal_rows_that_sum_to_one(tiny_llama):
    t = kvviz.trace(tiny_llama, PROMPT, 4)
    for s in t.steps:
        for ls in s.layers:
            np.testing.assert_allclose(ls.weights.sum(-1), 1.0, atol=1e-5)
    prefill = t.steps[0].layers[0].weights  # (num_heads, P, P)
    upper = np.triu(np.ones(prefill.shape[1:], dtype=bool), k=1)
    assert np.all(prefill[:, upper] == 0.0)
    assert np.all(prefill[:, ~upper] > 0.0)
    assert np.isneginf(t.steps[0].layers[0].scores[:, upper]).all()
    # each decode step adds one row one key longer
    assert [s.layers[0].kv_len for s in t.steps] == [len(t.prompt_ids) + i for i in range(4)]
    assert [s.key_positions for s in t.steps] == [len(t.prompt_ids) + i for i in range(4)]


@pytest.mark.parametrize("family,expected", [("llama_gqa", [0, 0, 1, 1]), ("llama_mqa", [0, 0, 0, 0]), ("gpt2", [0, 1, 2, 3])])
def test_gqa_mapping_is_recorded_and_used(family, expected):
    """Query head h reads KV head h // group; the scores prove that is the key it used."""
    lm = tiny_model(family)
    t = kvviz.trace(lm, PROMPT, 3)
    s = t.steps[2]
    for layer in range(lm.info.num_layers):
        ls = s.layers[layer]
        assert ls.kv_head_of.tolist() == expected
        keys = t.keys(layer, 2)  # (num_kv, kv_len, head_dim)
        scale = lm.info.head_dim ** -0.5
        for h, kv in enumerate(expected):
            np.testing.assert_allclose(ls.scores[h, 0], keys[kv] @ ls.query_states[h, 0] * scale, rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_and_uses_transformers_warpers(tiny_llama):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    s = Sampling(greedy=False, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    assert [type(p) for p in s.processors()] == [TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper]
    a = kvviz.trace(tiny_llama, PROMPT, 8, sampling=s)
    b = kvviz.trace(tiny_llama, PROMPT, 8, sampling=s)
    c = kvviz.trace(tiny_llama, PROMPT, 8, sampling=Sampling(greedy=False, temperature=1.5, top_k=20, top_p=0.9, seed=8))
    assert a.generated_ids == b.generated_ids
    assert a.generated_ids != c.generated_ids
    greedy = kvviz.trace(tiny_llama, PROMPT, 8)
    top1 = kvviz.trace(tiny_llama, PROMPT, 8, sampling=Sampling(greedy=False, top_k=1, seed=3))
    assert top1.generated_ids == greedy.generated_ids


def test_interleaved_sessions_in_threads_equal_sessions_alone(tiny_llama):
    """Two users stepping at once on one shared model never see each other's records."""
    configs = [
        (PROMPT, Sampling(greedy=False, temperature=1.2, seed=1)),
        ("The quick brown fox", Sampling()),
        ("Keys and values", Sampling(greedy=False, top_p=0.8, seed=5)),
        ("must be in want", Sampling(greedy=False, top_k=5, seed=9)),
    ]
    alone = [kvviz.trace(tiny_llama, p, 8, sampling=s) for p, s in configs]
    results: dict[int, kvviz.Trace] = {}

    def work(i: int, sync) -> None:
        sess = kvviz.Session(tiny_llama, configs[i][0], 8, sampling=configs[i][1])
        while not sess.done:
            sync()  # lock-step: every thread is mid-run at the same time
            sess.step()
        results[i] = sess.trace()

    run_in_lockstep([functools.partial(work, i) for i in range(len(configs))], timeout=30)
    for i, ref in enumerate(alone):
        got = results[i]
        assert got.generated_ids == ref.generated_ids
        for s_ref, s_got in zip(ref.steps, got.steps):
            for l_ref, l_got in zip(s_ref.layers, s_got.layers):
                np.testing.assert_array_equal(l_ref.weights, l_got.weights)
                np.testing.assert_array_equal(l_ref.key_states, l_got.key_states)


def test_trace_to_dict_holds_the_documented_fields(tiny_llama):
    t = kvviz.trace(tiny_llama, PROMPT, 3)
    d = t.to_dict()
    for key in ("model", "device", "prompt_ids", "generated_ids", "generated_text", "steps"):
        assert key in d
    assert d["device"] == "cpu" and d["model"] == "tiny-llama_gqa"
    assert len(d["steps"]) == 3
    first = d["steps"][0]
    assert first["phase"] == "prefill" and first["key_positions"] == len(t.prompt_ids)
    assert {"step", "token_id", "token", "max_abs_logit_diff", "top_k", "key_positions"} <= set(first)
    assert set(first["top_k"][0]) == {"token_id", "token", "prob"}
    assert d["generated_ids"] == [s["token_id"] for s in d["steps"]]


def test_trace_to_dict_with_arrays_round_trips_every_recorded_row(tiny_llama):
    """`arrays=True` exports what the docstring says, equal to the records, as plain JSON."""
    import json

    t = kvviz.trace(tiny_llama, PROMPT, 2)
    d = json.loads(t.to_json(arrays=True))
    assert "layers" not in t.to_dict()["steps"][0]  # the summary stays small
    for s, rec in zip(d["steps"], t.steps):
        assert len(s["layers"]) == tiny_llama.info.num_layers
        for layer, ls in zip(s["layers"], rec.layers):
            assert set(layer) == {"layer_idx", "kv_head_of", "query_states", "key_states", "value_states", "weights"}
            for name in ("query_states", "key_states", "value_states", "weights"):
                np.testing.assert_allclose(np.array(layer[name]), getattr(ls, name), rtol=1e-6)
            assert layer["kv_head_of"] == ls.kv_head_of.tolist()


def test_trace_memory_grows_with_context_not_with_cache_copies(tiny_llama):
    """Per step the trace stores new rows and one attention row, never a copy of the cache."""
    t = kvviz.trace(tiny_llama, PROMPT, 40, parity=False)
    sizes = [s.nbytes() for s in t.steps[1:]]
    info = tiny_llama.info
    full_cache_copy = 2 * info.num_layers * info.num_key_value_heads * t.steps[-1].cache_len * info.head_dim * 4
    # the last step records (kv_len) attention entries per head, far less than a cache copy
    assert sizes[-1] < full_cache_copy
    growth = sizes[-1] - sizes[0]
    per_position = 2 * info.num_layers * info.num_heads * 4  # scores + weights, float32
    assert growth == per_position * (len(sizes) - 1)


def test_bad_input_is_refused_with_a_clear_message(tiny_llama):
    with pytest.raises(kvviz.InputError, match="empty"):
        kvviz.Session(tiny_llama, "   ", 4)
    with pytest.raises(kvviz.InputError, match="context"):
        kvviz.Session(tiny_llama, PROMPT, 1000, limits=kvviz.Limits(max_new_tokens=5000))
    with pytest.raises(kvviz.InputError, match="at most"):
        kvviz.Session(tiny_llama, PROMPT, 500)
    with pytest.raises(kvviz.InputError, match="limit"):
        kvviz.Session(tiny_llama, "word " * 200, 4)


def test_core_imports_without_streamlit():
    """kvviz (all but kvviz.ui) must import in a process where streamlit cannot be imported."""
    code = (
        "import sys; sys.modules['streamlit'] = None\n"
        "import importlib, pkgutil, kvviz\n"
        "skip = {'kvviz.__main__'}\n"
        "mods = [m.name for m in pkgutil.walk_packages(kvviz.__path__, 'kvviz.') if m.name not in skip]\n"
        "[importlib.import_module(m) for m in mods if not m.startswith(('kvviz.training', 'kvviz.ui'))]\n"
        "print(len(mods))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 8
