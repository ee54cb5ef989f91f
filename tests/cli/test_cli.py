"""`python -m kvviz trace` on checkpoints saved to disk: once as a user runs it (a subprocess), the
rest in-process through `cli.main` (the same code, without a fresh interpreter per case)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import kvviz
from kvviz.engine.sampling import Sampling
from kvviz.testing import run_cli, tiny_model

PROMPT = "It is a truth universally acknowledged, that"


def run_subprocess(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvviz", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_checkpoint_model(tiny_checkpoint):
    return kvviz.load_model(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    """A model family kvviz was not tuned on (learned positions, MHA), saved as a local checkpoint."""
    lm = tiny_model("gpt2", seed=3)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path, lm


def test_trace_json_is_one_object_matching_transformers_generate(gpt2_checkpoint):
    path, lm = gpt2_checkpoint
    out = run_subprocess("trace", "--model", str(path), "--prompt", PROMPT, "--steps", "6", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)  # exactly one JSON object: anything else fails to parse
    assert d["model"] == str(path) and d["device"] == "cpu"
    assert len(d["steps"]) == 6 and len(d["generated_ids"]) == 6
    ids = torch.tensor([d["prompt_ids"]])
    ref = lm.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert d["generated_ids"] == ref[0, ids.shape[1]:].tolist()
    for i, s in enumerate(d["steps"]):
        assert s["step"] == i
        assert s["max_abs_logit_diff"] < 1e-4
        assert s["key_positions"] == len(d["prompt_ids"]) + i
        assert s["top_k"][0]["prob"] >= s["top_k"][-1]["prob"]
    assert d["generated_text"] == lm.tokenizer.decode(d["generated_ids"])


def test_trace_table_and_out_file(tiny_checkpoint, tmp_path):
    out_file = tmp_path / "t.json"
    out = run_cli("trace", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--steps", "3", "--out", str(out_file))
    assert out.returncode == 0, out.stderr
    assert "prefill" in out.stdout and "decode" in out.stdout and "generated:" in out.stdout
    assert json.loads(out_file.read_text())["steps"][0]["phase"] == "prefill"


def test_sampling_flags_are_seeded(tiny_checkpoint, tiny_checkpoint_model):
    """The flags reach the sampler: the CLI equals the API with the same Sampling, and differs from greedy."""
    args = ["trace", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--steps", "8", "--json",
            "--temperature", "1.3", "--top-k", "50", "--top-p", "0.95", "--seed", "4"]
    a = run_cli(*args)
    assert a.returncode == 0, a.stderr
    da = json.loads(a.stdout)
    assert da["sampling"] == {"greedy": False, "temperature": 1.3, "top_k": 50, "top_p": 0.95, "seed": 4}
    sampling = Sampling(greedy=False, temperature=1.3, top_k=50, top_p=0.95, seed=4)
    api = kvviz.trace(tiny_checkpoint_model, PROMPT, 8, sampling=sampling, parity=False)
    assert da["generated_ids"] == list(api.generated_ids)
    greedy = kvviz.trace(tiny_checkpoint_model, PROMPT, 8, parity=False)
    other_seed = kvviz.trace(tiny_checkpoint_model, PROMPT, 8, parity=False,
                             sampling=Sampling(greedy=False, temperature=1.3, top_k=50, top_p=0.95, seed=5))
    assert da["generated_ids"] != list(greedy.generated_ids)
    assert da["generated_ids"] != list(other_seed.generated_ids)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "hello", "--steps", "0"], "at least 1"),
        (["--prompt", "hello", "--steps", "100000"], "at most"),
        (["--prompt", "word " * 400], "limit"),
        (["--prompt", "hello", "--model", "/no/such/dir"], "no model directory"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(tiny_checkpoint, args, needle):
    if "--model" not in args:
        args = [*args, "--model", str(tiny_checkpoint)]
    out = run_cli("trace", *args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert needle in lines[0]
