"""The committed Austen checkpoint (issue 3): loadable offline, small, GQA, honest about its data.

Everything here reads committed files only (``kvviz/bundled``, ``data/austen``); nothing trains.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from kvviz.training.prepare_data import load_split, load_split_by_novel

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "kvviz" / "bundled"
DATA = ROOT / "data" / "austen"
PROMPT = "It is a truth universally acknowledged, that"


@functools.lru_cache(maxsize=1)
def _load():
    model = AutoModelForCausalLM.from_pretrained(str(BUNDLED), dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(BUNDLED))


def test_loads_as_float32_llama_with_gqa():
    model, _ = _load()
    cfg = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.max_position_embeddings >= 256
    assert cfg.tie_word_embeddings


def test_checkpoint_is_fp16_safetensors_under_10_mb():
    path = BUNDLED / "model.safetensors"
    assert path.stat().st_size <= 10_000_000
    assert json.loads((BUNDLED / "config.json").read_text())["dtype"] == "float16"


def test_tokenizer_round_trips_and_adds_no_bos():
    """Guards the ByteLevel decoder: spaces, double spaces and newlines survive encode/decode."""
    _, tok = _load()
    text = 'It is a truth universally acknowledged, that  a single man\n"My dear Mr. Bennet," £5.'
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[0] != tok.bos_token_id  # kvviz shows the prompt's own tokens; BOS is opt-in
    assert tok.bos_token == "<|bos|>" and tok.eos_token == "<|endoftext|>"
    assert len(tok) == _load()[0].config.vocab_size


def test_held_out_split_is_last_5_percent_of_each_novel_and_not_trained_on():
    summary = json.loads((DATA / "splits.json").read_text())
    assert len(summary["novels"]) == 6
    for novel in summary["novels"]:
        total = novel["train_paragraphs"] + novel["valid_paragraphs"]
        assert novel["valid_paragraphs"] == max(1, round(0.05 * total)), novel["title"]
    train = set(load_split("train"))
    valid = load_split("valid")
    # Short lines of dialogue ('"What do you mean?"') legitimately recur; real paragraphs must not.
    leaked = [p for p in valid if len(p) >= 40 and p in train]
    assert not leaked
    assert [len(p) for _t, p in load_split_by_novel("valid")] == [n["valid_paragraphs"] for n in summary["novels"]]


def test_greedy_continuation_is_mostly_known_words():
    model, tok = _load()
    x = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0, x["input_ids"].shape[1] :], skip_special_tokens=True)
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    vocabulary = {w.lower() for p in load_split("train") for w in re.findall(r"[A-Za-z]+", p)}
    assert len(words) >= 10, text
    known = sum(w in vocabulary for w in words) / len(words)
    assert known >= 0.8, (known, text)


def test_model_card_numbers_are_committed():
    """eval.json/heads.json exist, match the config, and meet the issue's quality bar."""
    model, _ = _load()
    result = json.loads((BUNDLED / "eval.json").read_text())
    assert result["held_out"]["context_256"]["bits_per_char"] <= 1.55
    heads = json.loads((BUNDLED / "heads.json").read_text())
    assert len(heads["layers"]) == model.config.num_hidden_layers
    assert all(len(row) == model.config.num_attention_heads for row in heads["layers"])
