"""Reuse across requests (the block-hashed prefix store) and across chat turns, on the bundled
model and a tiny GQA Llama: reused runs equal cold runs and transformers' own `generate`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvviz.engine.session import InputError
from kvviz.serving.hooks import ServingHooks
from kvviz.serving.reuse import Conversation, PrefixStore, reuse_pair, serve

SYSTEM = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."
A = SYSTEM + " Mr. Bennet said"
B = SYSTEM + " Elizabeth replied"


@pytest.fixture(params=["bundled", "tiny"])
def lm(request, bundled, tiny_llama):
    return bundled if request.param == "bundled" else tiny_llama


def ids_of(lm, text: str) -> list[int]:
    return list(lm.tokenizer(text)["input_ids"])


def generate(lm, ids, steps: int) -> list[int]:
    t = torch.tensor([list(ids)])
    out = lm.model.generate(t, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, t.shape[1]:].tolist()


def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_second_request_reuses_the_shared_prefix_and_equals_a_cold_run(lm):
    store = PrefixStore(block_size=4)
    first = serve(lm, store, A, 6, repeats=1)
    second = serve(lm, store, B, 6, repeats=1)
    a, b = ids_of(lm, A), ids_of(lm, B)
    # full blocks of the shared prefix, and never the whole prompt (its last token is always computed)
    expected = min(common_prefix(a, b), len(b) - 1) // 4 * 4
    assert expected >= 8, "the test prompts must share at least two blocks"
    assert first.reused_tokens == 0 and second.reused_tokens == expected
    assert second.computed_tokens == len(b) - expected
    assert [v.status for v in second.blocks[: expected // 4]] == ["hit"] * (expected // 4)
    assert all(v.source == first.name for v in second.blocks[: expected // 4])
    assert second.max_abs_logit_diff <= 1e-5
    assert list(second.output_ids) == list(second.cold_output_ids) == generate(lm, b, 6)
    assert list(first.output_ids) == generate(lm, a, 6)
    # the hit rows are the first request's rows, copied: bit for bit
    np.testing.assert_array_equal(second.keys[:, :, :expected], first.keys[:, :, :expected])
    np.testing.assert_array_equal(second.values[:, :, :expected], first.values[:, :, :expected])
    assert float(second.row_diff.max()) < 1e-4  # and they equal the rows a cold prefill computes


def test_hits_stop_at_the_first_block_that_differs(bundled):
    store = PrefixStore(block_size=4)
    serve(bundled, store, A, 2, repeats=1)
    other = serve(bundled, store, "Emma Woodhouse, handsome, clever, and rich, " + A, 2, repeats=1)
    assert other.reused_tokens == 0
    assert {v.status for v in other.blocks} <= {"stored", "partial"}


def test_a_repeated_request_computes_its_last_token(bundled):
    store = PrefixStore(block_size=4)
    serve(bundled, store, A, 3, repeats=1)
    again = serve(bundled, store, A, 3, repeats=1)
    n = len(ids_of(bundled, A))
    assert again.reused_tokens == (n - 1) // 4 * 4 and again.computed_tokens >= 1
    assert again.max_abs_logit_diff <= 1e-5 and again.same_output


def test_generated_tokens_are_stored_for_the_next_request(tiny_llama):
    """vLLM stores a request's generated blocks too: a follow-up that quotes the reply hits them."""
    store = PrefixStore(block_size=4)
    first = serve(tiny_llama, store, A, 12, repeats=1)
    follow_up = [*first.prompt_ids, *first.output_ids, *ids_of(tiny_llama, " Then")[-1:]]
    second = serve(tiny_llama, store, follow_up, 4, repeats=1)
    held = len(first.prompt_ids) + len(first.output_ids) - 1  # the last generated token was never fed
    assert second.reused_tokens == held // 4 * 4 > len(first.prompt_ids) // 4 * 4
    assert second.max_abs_logit_diff <= 1e-5 and second.same_output


def test_each_store_serves_only_its_own_requests(bundled):
    """One visitor's cached rows never reach another: stores are separate objects."""
    mine, theirs = PrefixStore(block_size=4), PrefixStore(block_size=4)
    serve(bundled, mine, A, 2, repeats=1)
    assert len(theirs) == 0
    assert serve(bundled, theirs, B, 2, repeats=1).reused_tokens == 0
    assert serve(bundled, mine, B, 2, repeats=1).reused_tokens > 0


def test_least_recently_used_blocks_are_evicted(bundled):
    store = PrefixStore(block_size=4, max_blocks=3)
    serve(bundled, store, A, 2, repeats=1)
    assert len(store) == 3
    keys = store.block_keys(ids_of(bundled, A))
    assert list(store.blocks) == keys[-3:]  # the newest blocks stayed
    assert serve(bundled, store, B, 2, repeats=1).reused_tokens == 0  # the prefix's first block is gone


def test_block_names_are_the_paged_simulators():
    """The simulator (economics.paged) names blocks the same way, so it can replay these requests' hits."""
    from kvviz.economics.blocks import block_hashes

    ids = list(range(50, 90))
    assert PrefixStore(block_size=8).block_keys(ids) == block_hashes(tuple(ids), 8)


class OneName(ServingHooks):
    """Every block gets the same name: a stand-in for a key that ignores the tokens."""

    def block_key(self, parent, token_ids):
        return b"same"


def test_a_wrong_block_name_is_caught_by_parity(bundled):
    """A hit from another prompt's block (here every name collides) must show in the evidence."""
    store = PrefixStore(block_size=4, hooks=OneName())
    serve(bundled, store, "Emma Woodhouse, handsome, clever, and rich, with a comfortable home", 2, repeats=1)
    wrong = serve(bundled, store, A, 2, repeats=1)
    assert wrong.reused_tokens > 0
    assert wrong.max_abs_logit_diff > 1e-3
    assert float(wrong.row_diff[:, :4].max()) > 1e-3  # the served rows are not this prompt's


def test_chat_turn_continues_the_previous_turns_cache(lm):
    conv = Conversation(lm)
    one = conv.say(A, 5, repeats=2)
    two = conv.say(" Then she said", 5, repeats=2)
    history = [*one.prompt_ids, *one.output_ids]
    assert list(two.prompt_ids[: len(history)]) == history
    assert two.reused_tokens == len(history) - 1  # every row turn 1 left in the cache
    assert two.computed_tokens == len(two.prompt_ids) - len(history) + 1  # the reply's last token + the message
    assert two.max_abs_logit_diff <= 1e-5
    assert list(two.output_ids) == generate(lm, two.prompt_ids, 5)
    assert conv.cache is not None and conv.cache.get_seq_length() == len(conv.ids) - 1


def test_reuse_pair_and_bad_input(bundled):
    _, second = reuse_pair(bundled, A, B, 2, block_size=8, repeats=1)
    assert second.reused_tokens % 8 == 0 and second.reused_tokens > 0
    with pytest.raises(InputError, match="empty"):
        serve(bundled, PrefixStore(), "   ", 2)
    with pytest.raises(InputError, match="steps"):
        serve(bundled, PrefixStore(), A, 0)
    with pytest.raises(InputError, match="block size"):
        PrefixStore(block_size=0)
    with pytest.raises(InputError, match="empty"):
        Conversation(bundled).say("", 2)
