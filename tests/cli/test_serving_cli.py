"""`python -m kvviz reuse | speculate | beam --json`: one JSON object each, equal to transformers'
own `generate` on the bundled model and on a tiny GQA Llama saved as a local checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import kvviz
from kvviz.serving.defaults import REQUESTS, SPECULATE_PROMPT
from kvviz.testing import run_cli

A, B = REQUESTS


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    return {"bundled": kvviz.load_model("bundled"), str(tiny_checkpoint): kvviz.load_model(str(tiny_checkpoint))}


def generate(lm, ids, steps, **kw):
    t = torch.tensor([list(ids)])
    return lm.model.generate(t, max_new_tokens=steps, do_sample=False, pad_token_id=0, **kw)[0, t.shape[1]:].tolist()


def json_of(*args: str) -> dict:
    out = run_cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_reuse_json_as_a_user_runs_it():
    out = subprocess.run([sys.executable, "-m", "kvviz", "reuse", "--prompt", A, "--then", B, "--steps", "4",
                          "--repeats", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)  # exactly one JSON object
    for key in ("reused_tokens", "computed_tokens", "max_abs_logit_diff", "generated_ids", "prefill_ms_saved"):
        assert key in d
    assert d["reused_tokens"] > 0 and d["max_abs_logit_diff"] <= 1e-5


@pytest.mark.parametrize("which", ["bundled", "tiny"])
def test_reuse_second_request(models, tiny_checkpoint, which):
    name = "bundled" if which == "bundled" else str(tiny_checkpoint)
    lm = models[name]
    d = json_of("reuse", "--model", name, "--prompt", A, "--then", B, "--steps", "6", "--block-size", "4",
                "--repeats", "1")
    prompt = d["prompt_ids"]
    assert prompt == list(lm.tokenizer(B)["input_ids"])
    assert d["reused_tokens"] % 4 == 0 and d["reused_tokens"] >= 8
    assert d["reused_tokens"] + d["computed_tokens"] == len(prompt)
    assert d["max_abs_logit_diff"] <= 1e-5
    assert d["generated_ids"] == generate(lm, prompt, 6)
    assert isinstance(d["prefill_ms_saved"], float)
    assert [r["prompt_ids"] for r in d["requests"]] == [d["first"]["prompt_ids"], prompt]  # the ids, for a simulator


def test_reuse_chat_turn(models):
    lm = models["bundled"]
    d = json_of("reuse", "--prompt", A, "--then", " Then she said", "--steps", "5", "--chat", "--repeats", "1")
    first = d["first"]
    history = first["prompt_ids"] + first["generated_ids"]
    assert d["prompt_ids"][: len(history)] == history
    assert d["reused_tokens"] == len(history) - 1
    assert d["max_abs_logit_diff"] <= 1e-5
    assert d["generated_ids"] == generate(lm, d["prompt_ids"], 5)


@pytest.mark.parametrize("which", ["bundled", "tiny"])
def test_speculate(models, tiny_checkpoint, which):
    name = "bundled" if which == "bundled" else str(tiny_checkpoint)
    lm = models[name]
    d = json_of("speculate", "--model", name, "--prompt", SPECULATE_PROMPT, "--steps", "20", "--draft-tokens", "3")
    assert d["generated_ids"] == generate(lm, d["prompt_ids"], 20)
    assert d["generated_ids"] == generate(lm, d["prompt_ids"], 20, prompt_lookup_num_tokens=3)
    assert d["proposed"] > 0
    assert d["rolled_back_rows"] == d["proposed"] - d["accepted"] == sum(s["rolled_back_rows"] for s in d["steps"])
    assert d["accepted"] == sum(s["accepted"] for s in d["steps"])


@pytest.mark.parametrize("which", ["bundled", "tiny"])
def test_beam(models, tiny_checkpoint, which):
    name = "bundled" if which == "bundled" else str(tiny_checkpoint)
    lm = models[name]
    d = json_of("beam", "--model", name, "--prompt", kvviz.engine.DEFAULT_PROMPT, "--beams", "3", "--steps", "10")
    ids = torch.tensor([d["prompt_ids"]])
    out = lm.model.generate(ids, num_beams=3, do_sample=False, max_new_tokens=10, num_return_sequences=3,
                            return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    best = out.sequences[0, ids.shape[1]:].tolist()
    assert d["generated_ids"] == best[: len(d["generated_ids"])]
    assert len(d["beams"]) == 3
    for beam, seq, score in zip(d["beams"], out.sequences[:, ids.shape[1]:].tolist(), out.sequences_scores.tolist()):
        assert seq[: len(beam["ids"])] == beam["ids"]
        assert beam["score"] == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize(("args", "message"), [
    (["reuse", "--prompt", " ", "--then", B], "empty"),
    (["reuse", "--prompt", A, "--then", B, "--repeats", "0"], "repeats"),
    (["speculate", "--prompt", A, "--steps", "0"], "steps"),
    (["speculate", "--prompt", A, "--draft-tokens", "99"], "draft"),
    (["beam", "--prompt", A, "--beams", "0"], "beams"),
    (["beam", "--prompt", A, "--steps", "100000"], "steps"),
])
def test_bad_input_is_one_line(args, message):
    out = run_cli(*args)
    assert out.returncode == 2
    assert out.stderr.startswith("kvviz: error:") and message in out.stderr and out.stderr.count("\n") == 1
