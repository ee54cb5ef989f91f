"""Tiny, seeded models built from configs, for tests and offline demos (nothing downloads).

Each family kvviz claims to support has a builder here: Llama with GQA, GPT-2 (MHA, learned
positions, no `num_key_value_groups` on its attention), Qwen2 (GQA, qkv biases) and an MQA Llama.
The tokenizer is a small byte-level BPE trained in-process, so any text encodes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from kvviz.engine.models import LoadedModel, from_model

_CORPUS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "must be in want of a wife. The cache grows by one row at every step of decoding.",
    "Keys and values are stored so that the next query can attend to every earlier token.",
    "The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun.",
]


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    """A byte-level BPE (vocab ~ 384) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


FAMILIES = ("llama_gqa", "llama_mqa", "gpt2", "qwen2")


def tiny_config(family: str, vocab_size: int = 384, max_positions: int = 128) -> Any:
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    if family == "llama_gqa":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=max_positions, **common)
    if family == "llama_mqa":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1, max_position_embeddings=max_positions, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=max_positions, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=max_positions, **common)
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def tiny_model(family: str = "llama_gqa", seed: int = 0, max_positions: int = 128) -> LoadedModel:
    """A seeded float32 CPU model of `family`, ready for kvviz (attention routed through capture)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, max_positions=max_positions)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init is near uniform attention; scale up so heads differ and greedy choices are stable
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return from_model(model, tiny_tokenizer(), name=f"tiny-{family}")


def run_in_lockstep(workers: Sequence[Callable[[Callable[[], None]], None]], timeout: float = 120.0) -> None:
    """Run each worker in its own thread; a worker calls the `sync()` it is given to wait until every
    worker reaches the same point (so they really are mid-run at once). Re-raises the first error."""
    barrier = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def sync() -> None:
        barrier.wait(timeout=timeout)

    def guarded(worker: Callable[[Callable[[], None]], None]) -> None:
        try:
            worker(sync)
        except BaseException as e:  # the first error is the cause; the others are the aborted barrier
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=guarded, args=(w,)) for w in workers]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """`python -m kvviz ARGS` in this process (`cli.main`, stdout and stderr captured): the same
    code path as the command without the 5-10 s of a fresh interpreter importing torch."""
    import contextlib
    import io

    from kvviz.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own usage errors
            code = int(e.code or 0)
    return CliResult(code, out.getvalue(), err.getvalue())


# -- the step page's view, driven from AppTest ------------------------------------------------------------
def step_view_act(at: Any, **action: Any) -> Any:
    """Send one action as the step view's browser code does (`kvviz/ui/stepview/view.js`: an id one
    past the last acknowledged, then `do`, ...) and rerun the page. `at` is a streamlit AppTest."""
    at.session_state["step_pending"] = [{"id": int(at.session_state["step_ack"]) + 1, **action}]
    return at.run()


def step_view_payload(at: Any) -> dict[str, Any]:
    """The step view's payload, as the browser receives it (the page draws exactly one step view)."""
    import json

    (view,) = at.get("bidi_component")
    return json.loads(view.proto.json)
