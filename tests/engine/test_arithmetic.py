"""The arithmetic of one step (kvviz.engine.arithmetic): its pieces recompose what the forward did."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvviz
from kvviz.engine.arithmetic import head_arithmetic, o_proj_bias
from kvviz.engine.capture import attention_modules
from kvviz.testing import tiny_model

PROMPT = "It is a truth universally acknowledged"


def attention_outputs(lm, prompt: str, steps: int) -> tuple[kvviz.Trace, dict[tuple[int, int], np.ndarray]]:
    """A run, and what each layer's attention module returned for the newest position at each step.

    The hooks go on a model private to this test (never the shared one) and are removed after.
    """
    outputs: dict[tuple[int, int], np.ndarray] = {}
    session = kvviz.Session(lm, prompt, steps, stop_at_eos=False)
    handles = []
    for layer, module in attention_modules(lm.model).items():
        def keep(_m, _args, out, layer=layer):
            if torch.is_tensor(out[0]) and len(outputs) < 10_000 and session.cache is not None:
                outputs[(len(session.steps), layer)] = out[0][0, -1].detach().float().numpy().copy()
        handles.append(module.register_forward_hook(keep))
    try:
        session.parity = False  # the recompute's forwards would overwrite the captured outputs
        t = session.run()
    finally:
        for h in handles:
            h.remove()
    return t, outputs


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "qwen2"])
def test_the_pieces_recompose_the_recorded_step(family):
    """Guards item 3 of issue 11: x·W → RoPE → scores → softmax → ·V → o_proj is what the model did.

    Every recomputed piece equals what the forward recorded (q′, k′, v′, scores, weights), and the
    heads' o_proj parts plus the bias sum to the attention module's real output at that step.
    """
    lm = tiny_model(family, seed=3)
    t, outputs = attention_outputs(lm, PROMPT, 4)
    for step in (0, 2, 3):
        for layer in range(lm.info.num_layers):
            parts = [head_arithmetic(lm, t, step, layer, h) for h in range(lm.info.num_heads)]
            for a in parts:
                assert max(a.check.values()) < 1e-4, (family, step, layer, a.head, a.check)
                np.testing.assert_allclose(a.weights.sum(), 1.0, atol=1e-5)
                np.testing.assert_allclose(a.output, a.weights @ a.values, atol=1e-6)
                assert a.keys.shape == (t.steps[step].cache_len, lm.info.head_dim)
                np.testing.assert_allclose(a.keys[-1], a.k_rot, atol=1e-4)  # k′ is K's newest row
            total = sum(a.o_part for a in parts)
            bias = o_proj_bias(lm, layer)
            if bias is not None:
                total = total + bias
            np.testing.assert_allclose(total, outputs[(step, layer)], atol=1e-4, err_msg=f"{family} step {step} L{layer}")


def test_rope_turns_each_pair_by_position_times_its_frequency():
    lm = tiny_model("llama_gqa", seed=3)
    t = kvviz.trace(lm, PROMPT, 3, stop_at_eos=False)
    a = head_arithmetic(lm, t, 2, 1, 3)
    d = lm.info.head_dim
    assert a.rope and a.pairs[0] == (0, d // 2) and len(a.pairs) == d // 2
    theta = 10000.0 ** (-np.arange(0, d, 2) / d)  # Llama's default frequencies
    np.testing.assert_allclose(np.cos(a.angles), np.cos(a.position * theta), atol=1e-5)
    for (i, j), angle in zip(a.pairs, a.angles):  # a plane rotation of each pair: lengths kept
        np.testing.assert_allclose(np.hypot(a.q_rot[i], a.q_rot[j]), np.hypot(a.q[i], a.q[j]), rtol=1e-4, atol=1e-6)
        c, s = np.cos(angle), np.sin(angle)
        np.testing.assert_allclose(a.q_rot[i], a.q[i] * c - a.q[j] * s, atol=1e-5)


def test_learned_positions_have_no_rotation():
    lm = tiny_model("gpt2", seed=3)
    t = kvviz.trace(lm, PROMPT, 2, stop_at_eos=False)
    a = head_arithmetic(lm, t, 1, 0, 1)
    assert not a.rope and a.pairs == ()
    np.testing.assert_array_equal(a.q, a.q_rot)


def test_the_shared_model_is_left_untouched():
    lm = tiny_model("llama_gqa", seed=5)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules()]
    t = kvviz.trace(lm, PROMPT, 2, stop_at_eos=False)
    for h in range(lm.info.num_heads):
        head_arithmetic(lm, t, 1, 0, h)
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())
    assert hooks == [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules()]
