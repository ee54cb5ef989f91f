"""Beam search on one cache: equal to transformers' `generate(num_beams=...)`, and the real cache's
rows follow the surviving beams (each slot holds the rows of its own text)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvviz.engine.session import InputError
from kvviz.serving.beam import beam_search
from kvviz.serving.common import forward, new_cache
from kvviz.serving.hooks import ServingHooks
from kvviz.serving.records import PROMPT_ROW

PROMPTS = ["It is a truth universally acknowledged, that", "Elizabeth said"]


@pytest.fixture(params=["bundled", "tiny"])
def lm(request, bundled, tiny_llama):
    return bundled if request.param == "bundled" else tiny_llama


def generate_beams(lm, ids, n, steps):
    t = torch.tensor([list(ids)])
    out = lm.model.generate(t, num_beams=n, do_sample=False, max_new_tokens=steps, num_return_sequences=n,
                            return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    return out.sequences[:, t.shape[1]:].tolist(), out.sequences_scores.tolist()


@pytest.mark.parametrize(("prompt", "n", "steps"), [(PROMPTS[0], 2, 6), (PROMPTS[1], 3, 12), (PROMPTS[0], 4, 16)])
def test_beams_equal_transformers_generate(lm, prompt, n, steps):
    """All n beams and their scores (the best first); "Elizabeth said" ends beams early on the bundled model."""
    run = beam_search(lm, prompt, n, steps)
    seqs, scores = generate_beams(lm, run.prompt_ids, n, steps)
    for h, seq, score in zip(run.beams, seqs, scores):
        assert seq[: len(h.ids)] == list(h.ids) and all(t == 0 for t in seq[len(h.ids):])  # generate pads with 0
        assert h.score == pytest.approx(score, abs=1e-4)
    assert [len(h.parents) for h in run.beams] == [len(h.ids) for h in run.beams]


class Watch(ServingHooks):
    def reorder(self, cache, beam_idx):
        self.cache = cache
        super().reorder(cache, beam_idx)


class SkipReorder(Watch):
    """The bug reorder_cache prevents: slots keep their own rows while their text moved on."""

    def reorder(self, cache, beam_idx):
        self.cache = cache


def slot_rows_match_their_text(lm, run, cache) -> bool:
    """Slot b of the cache holds exactly the rows a prefill of slot b's text computes."""
    tokens = run.row_tokens()[-1]  # (num_beams, rows): the token whose row each cell holds
    for b in range(run.num_beams):
        cold = new_cache(lm)
        forward(lm, cold, tokens[b].tolist())
        for i in range(lm.info.num_layers):
            got, ref = cache.layer_kv(i)[0][b], cold.layer_kv(i)[0][0]  # (kv_heads, rows, head_dim)
            if not torch.allclose(got, ref, atol=1e-4, rtol=0):
                return False
    return True


def test_each_slot_holds_the_rows_of_its_own_text(lm):
    hooks = Watch()
    run = beam_search(lm, PROMPTS[0], 3, 12, hooks=hooks)
    assert run.steps[0].cache_shape == (3, len(run.prompt_ids))  # the prompt, prefilled once, in every slot
    assert run.steps[-1].cache_shape == (3, len(run.prompt_ids) + len(run.steps) - 1)
    assert slot_rows_match_their_text(lm, run, hooks.cache)
    # shared history is copies: equal provenance -> bit-identical rows in the real cache
    prov, keys = run.provenance()[-1], hooks.cache.layer_kv(0)[0]  # keys: (beams, kv_heads, rows, head_dim)
    for col in range(prov.shape[1]):
        for b in range(1, run.num_beams):
            if prov[b, col] == prov[0, col]:
                assert torch.equal(keys[b, :, col], keys[0, :, col])
    assert (prov[:, : len(run.prompt_ids)] == PROMPT_ROW).all()
    assert run.distinct_rows() < prov.size  # beams share at least the prompt


def test_skipping_the_reorder_leaves_slots_with_other_beams_rows(bundled):
    hooks = SkipReorder()
    run = beam_search(bundled, PROMPTS[0], 3, 12, hooks=hooks)
    assert any(list(s.beam_idx) != list(range(3)) for s in run.steps[1:]), "beams must have swapped"
    assert not slot_rows_match_their_text(bundled, run, hooks.cache)


def test_provenance_follows_the_reorders():
    from kvviz.serving.records import BeamRun, BeamStep

    steps = (BeamStep(1, (0, 0), (5, 6), (-1.0, -2.0), (), (2, 2)),
             BeamStep(2, (1, 1), (7, 8), (-3.0, -3.5), (), (2, 3)),
             BeamStep(3, (0, 1), (9, 9), (-4.0, -4.5), (), (2, 4)))
    run = BeamRun((1, 2), {}, 2, 3, 1.0, steps, (), 0, 0)
    prov = run.provenance()
    np.testing.assert_array_equal(prov[0], [[-1, -1], [-1, -1]])
    np.testing.assert_array_equal(prov[1], [[-1, -1, 3], [-1, -1, 3]])  # both continue slot 1 of step 1 (token 6)
    np.testing.assert_array_equal(prov[2], [[-1, -1, 3, 4], [-1, -1, 3, 5]])
    np.testing.assert_array_equal(run.row_tokens()[2], [[1, 2, 6, 7], [1, 2, 6, 8]])
    assert run.distinct_rows() == 5


def test_bad_input(bundled):
    with pytest.raises(InputError, match="beams"):
        beam_search(bundled, PROMPTS[0], 0, 4)
    with pytest.raises(InputError, match="beams"):
        beam_search(bundled, PROMPTS[0], 99, 4)
    with pytest.raises(InputError, match="empty"):
        beam_search(bundled, " ", 2, 4)
