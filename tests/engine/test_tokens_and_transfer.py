"""Token display (byte pieces never read "�") and the one-transfer-per-step recording."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvviz
from kvviz.engine import capture
from kvviz.engine.tokens import bytes_text, merged_characters, show_token, token_labels, token_text
from kvviz.testing import tiny_tokenizer

MIXED = "Hello 中文 🙂 café"


def test_byte_pieces_show_as_hex_and_whole_characters_as_themselves():
    assert bytes_text("é".encode()) == "é"
    assert bytes_text(b"\xe4\xb8") == "<0xE4><0xB8>"
    assert bytes_text(b" a\xf0") == " a<0xF0>"
    assert show_token(" a\n") == "␣a⏎" and show_token("") == "∅"
    assert token_labels(["<0xE4>", " x"], 3) == ["3 <0xE4>", "4 ␣x"]


def test_every_token_of_a_mixed_prompt_reads_without_replacement_characters(bundled):
    """Guards issue 11 item 7: 33 of 44 labels of an emoji/Chinese prompt read "�"."""
    tok = bundled.tokenizer
    ids = tok(MIXED)["input_ids"]
    texts = [token_text(tok, i) for i in ids]
    assert not any("\ufffd" in t for t in texts), texts
    assert any(t.startswith("<0x") for t in texts)  # the bundled BPE does split these characters
    # the texts put together are the prompt (the BOS a v2 tokenizer adds aside)
    pieces = [t for t in texts if t not in tok.all_special_tokens]
    joined = b"".join(bytes.fromhex(t[3:5]) if t.startswith("<0x") else t.encode() for t in pieces)
    assert joined.decode() == MIXED
    merged = [m for m in merged_characters(texts) if m]
    assert {"中", "文", "🙂", "é"} <= set("".join(merged))


def test_merged_characters_gives_each_piece_the_characters_it_is_part_of():
    assert merged_characters(["<0xE4><0xB8>", "<0xAD><0xE6>", "<0x96><0x87>", " x"]) == ["中", "中文", "文", None]
    assert merged_characters(["a", "<0xC3>", "<0xA9>", "b"]) == [None, "é", "é", None]


def test_a_trace_never_holds_replacement_characters(bundled):
    t = kvviz.trace(bundled, MIXED, 3, parity=False)
    assert not any("\ufffd" in x for x in t.tokens)
    assert not any("\ufffd" in p.token for s in t.steps for p in s.top_k)


def test_special_tokens_and_tiny_tokenizers_read_as_text():
    tok = tiny_tokenizer()
    assert token_text(tok, tok.eos_token_id) == "<|endoftext|>"
    assert [token_text(tok, i) for i in tok(" cache")["input_ids"]] == [tok.decode([i]) for i in tok(" cache")["input_ids"]]


# -- one transfer per step ---------------------------------------------------------------------------
def test_host_copies_returns_views_of_one_buffer_in_their_shapes():
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.arange(4, dtype=torch.int64)
    c = torch.ones(2, 2, 2).transpose(0, 2)  # not contiguous
    out = capture.host_copies([a, b, c])
    assert [x.shape for x in out] == [(2, 3), (4,), (2, 2, 2)]
    assert out[0].base is out[1].base is out[2].base is not None  # one host buffer
    np.testing.assert_array_equal(out[1], [0, 1, 2, 3])
    split = capture.host_copies([a, b, c], max_bytes=30)  # 24 B + 16 B + 32 B: three groups
    assert len({id(x.base) for x in split}) == 3
    np.testing.assert_array_equal(split[0], out[0])


def test_a_step_moves_its_records_to_the_host_in_one_transfer(tiny_llama, monkeypatch):
    """Guards issue 11 item 10: one device->host transfer per step, not one per layer and tensor."""
    calls = []
    real = capture._one_transfer
    monkeypatch.setattr(capture, "_one_transfer", lambda ts: calls.append(len(ts)) or real(ts))
    session = kvviz.Session(tiny_llama, "The cache grows", 3, stop_at_eos=False, parity=False)
    for expected_steps in (1, 2, 3):
        session.step()
        assert len(calls) == expected_steps
    layers = tiny_llama.info.num_layers
    assert calls[-1] == layers * 7  # k', v', x, q', scores, weights, kv_head_of per layer
    step = session.steps[-1]
    bases = {id(getattr(a, "base", None)) for ls in step.layers for a in (ls.query_states, ls.weights, ls.key_states)}
    assert len(bases) == 1
    ls = step.layers[1]
    assert ls.attention_input.shape == (tiny_llama.model.config.hidden_size,)
    assert ls.kv_head_of.dtype == np.int64 and list(ls.kv_head_of) == [0, 0, 1, 1]
    assert ls.scaling == pytest.approx(tiny_llama.info.head_dim ** -0.5)


def test_recorded_steps_are_unchanged_by_the_single_transfer(tiny_llama):
    """The records equal a plain no-cache forward's attention (float32 noise), masked scores -inf."""
    t = kvviz.trace(tiny_llama, "Keys and values", 2, stop_at_eos=False)
    pre = t.steps[0].layers[0]
    assert np.isneginf(pre.scores[0, 0, 1:]).all() and np.isfinite(pre.scores[0, -1]).all()
    np.testing.assert_allclose(pre.weights.sum(-1), 1.0, atol=1e-5)
    assert all(s.max_abs_logit_diff < 1e-4 for s in t.steps)
