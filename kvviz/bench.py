"""Measure what kvviz costs and what the KV cache saves, on this machine, in one run.

    capture_overhead   a kvviz decode step with full recording (`Session.step`, parity off), divided
                       by a plain transformers cached decode step with its default attention (SDPA)
                       and DynamicCache on the same weights, at the same context. Median of paired
                       ratios per context; the headline is the median over contexts (the worst one
                       is `capture_overhead_worst`: on a busy machine it mostly measures the noise).
    cache_speedup      per context length: a full no-cache forward over that many tokens (what a
                       decoder without a cache would do for every new token) / one cached step.
    step_ms, prefill_ms, plain_step_ms, plain_prefill_ms, recompute_ms   medians, milliseconds.
    trace_bytes_per_step   bytes one decode step adds to a kvviz trace: new q'/k'/v' rows plus one
                       attention row per head, so it grows with the context (num_layers x num_heads
                       x 8 bytes per position), never with a copy of the cache (x head_dim).

Method: warm both models up, then per context prefill once and take `warmup + repeats` decode steps
on both models in lock-step (alternating which goes first), so each pair runs at the same context
and machine noise hits both alike. Medians, never means. No Streamlit here; `kvviz bench` prints it.
"""

from __future__ import annotations

import copy
import gc
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvviz.engine.models import LoadedModel, from_model, using_threads
from kvviz.engine.session import Limits, Session
from kvviz.engine.timing import timed
from kvviz.geometry import kv_geometry

# Opening of Pride and Prejudice (public domain): plain English any tokenizer encodes, repeated
# to reach long contexts. The content does not change the timings; its length does.
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered as the rightful property of some one or other of their daughters. "
)
DEFAULT_CONTEXTS = (16, 64, 256, 1024)
# Config-only models for timing at realistic sizes offline (random weights, kvviz's tiny tokenizer).
SYNTHETIC_MODELS = ("random:gpt2-small",)


# -- the machine and the models -------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, torch threads, library versions."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if hasattr(os, "getloadavg"):  # other work on the machine makes every number noisier: say how busy it was
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def synthetic_model(name: str) -> LoadedModel:
    """A randomly initialised model of a real size, built from its config (nothing downloads).

    "random:gpt2-small" is GPT-2 small's shape (12 layers, 12 heads, 768 hidden, 1024 positions,
    50257-token vocabulary). Prompts are encoded with kvviz's tiny tokenizer, whose ids are valid
    in that vocabulary; only the timings mean anything, not the text.
    """
    from transformers import AutoModelForCausalLM, GPT2Config

    from kvviz.testing import tiny_tokenizer

    if name != "random:gpt2-small":
        raise ValueError(f"unknown synthetic model {name!r}; choose one of: {', '.join(SYNTHETIC_MODELS)}")
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = GPT2Config(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return from_model(model, tokenizer, name=name)


def plain_twin(lm: LoadedModel) -> Any:
    """The same model as transformers runs it by default (SDPA attention), no kvviz anywhere.

    Its parameters are the shared model's own tensors (`assign=True`, nothing copied, nothing
    written): two copies of the weights would take turns evicting each other from the CPU caches
    and slow both by the same amount, which would flatter the overhead ratio. The config is
    deep-copied: `from_config(attn_implementation=...)` writes into the config it is given, and the
    shared model reads its attention function from that same object.
    """
    from transformers import AutoModelForCausalLM

    params = next(lm.model.parameters())
    twin = AutoModelForCausalLM.from_config(copy.deepcopy(lm.model.config), attn_implementation="sdpa", dtype=params.dtype)
    twin.load_state_dict(lm.model.state_dict(), assign=True)
    return twin.to(params.device).eval()


# -- helpers ----------------------------------------------------------------------------------------
def prompt_of_length(tokenizer: Any, n_tokens: int) -> str:
    """The longest prefix of the repeated TEXT that encodes to at most `n_tokens` tokens.

    Found by bisection on characters, encoding exactly as a Session does (special tokens included),
    so the session's prompt is `n_tokens` long (or one short where a token spans the cut).
    """
    text = TEXT * (n_tokens // 8 + 2)  # ~47 characters per token asked for: more than any tokenizer needs
    lo, hi = 1, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer(text[:mid], verbose=False)["input_ids"]) <= n_tokens:  # may pass the model max: no warning
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def default_contexts(lm: LoadedModel, steps_per_context: int) -> list[int]:
    """16, 64, 256, 1024 where they fit in the model's context, plus the largest that fits."""
    room = lm.info.context_length - steps_per_context - 1
    contexts = [c for c in DEFAULT_CONTEXTS if c <= room]
    if room < DEFAULT_CONTEXTS[-1] and (not contexts or room > 1.5 * contexts[-1]):
        contexts.append(room)
    return contexts


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# -- the measurements -------------------------------------------------------------------------------
def measure_context(lm: LoadedModel, twin: Any, context: int, *, repeats: int, warmup: int) -> dict[str, Any]:
    """Prefill `context` tokens on both models, then decode in lock-step; times and trace sizes."""
    from transformers import DynamicCache

    device = lm.device
    n_steps = warmup + repeats
    limits = Limits(max_prompt_tokens=context, max_new_tokens=n_steps + 1, max_trace_bytes=2**62)
    sess = Session(lm, prompt_of_length(lm.tokenizer, context), n_steps + 1, parity=False, limits=limits,
                   stop_at_eos=False)
    ids = torch.tensor([sess.prompt_ids], device=device)  # (1, context)
    cache = DynamicCache(config=twin.config)

    def plain_step(token_id: int) -> int:
        logits = twin(input_ids=torch.tensor([[token_id]], device=device), past_key_values=cache, use_cache=True).logits
        return int(logits[0, -1].float().argmax())

    # both models on the threads kvviz gives this model (a Session applies them around its forwards)
    with torch.inference_mode(), using_threads(lm.threads):
        prefill_ms, _ = timed(sess.step, device)
        plain_prefill_ms, _ = timed(lambda: twin(input_ids=ids, past_key_values=cache, use_cache=True), device)
        kvviz_ms: list[float] = []
        plain_ms: list[float] = []
        kv_cache_bytes = 0
        for i in range(n_steps):
            token_id = sess.ids[-1]  # both models get the same token at the same position
            if i % 2:  # alternate the order so neither always runs on a warmer cache
                k, _ = timed(sess.step, device)
                p, _ = timed(lambda t=token_id: plain_step(t), device)
            else:
                p, _ = timed(lambda t=token_id: plain_step(t), device)
                k, _ = timed(sess.step, device)
            if i == 0:
                kv_cache_bytes = sess.cache.nbytes()  # the whole cache at the first decode step
            if i >= warmup:
                kvviz_ms.append(k)
                plain_ms.append(p)
        # a full forward is long and steady: a third as many repeats (at least 3) after one untimed
        n_recompute = max(3, min(10, repeats // 3))
        recompute_ms = [timed(lambda: twin(input_ids=ids, use_cache=False), device)[0] for _ in range(n_recompute + 1)][1:]

    first_decode = sess.steps[1]
    return {
        "context": len(sess.prompt_ids),
        "prefill_ms": prefill_ms,
        "plain_prefill_ms": plain_prefill_ms,
        "step_ms": _median(kvviz_ms),
        "plain_step_ms": _median(plain_ms),
        "forward_ms": _median([s.time_ms for s in sess.steps[1 + warmup :]]),  # the forward + capture only
        "capture_overhead": _median([k / p for k, p in zip(kvviz_ms, plain_ms)]),
        "recompute_ms": _median(recompute_ms),
        "cache_speedup": _median(recompute_ms) / _median(plain_ms),
        "trace_bytes_per_step": first_decode.nbytes(),  # the step that attended over context + 1 keys
        "kv_cache_bytes": kv_cache_bytes,  # what storing a copy of the cache per step would cost instead
    }


def warm_up(lm: LoadedModel, twin: Any) -> None:
    """The first forwards after loading are slow (allocator, kernels): run a few untimed."""
    with torch.inference_mode():
        for _ in range(2):
            Session(lm, prompt_of_length(lm.tokenizer, 12), 4, parity=False, stop_at_eos=False).run()
            ids = torch.tensor([lm.tokenizer(prompt_of_length(lm.tokenizer, 12))["input_ids"]], device=lm.device)
            twin(input_ids=ids, use_cache=False)


def run_bench(
    lm: LoadedModel,
    *,
    contexts: Sequence[int] | None = None,
    repeats: int = 50,
    warmup: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every measurement on `lm` and return a JSON-ready dict (see the module docstring)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    steps_per_context = warmup + repeats + 1
    ctx_list = list(contexts) if contexts else default_contexts(lm, steps_per_context)
    limit = lm.info.context_length - steps_per_context - 1
    bad = [c for c in ctx_list if not 2 <= c <= limit]
    if bad:
        raise ValueError(
            f"contexts {bad} do not fit: each must be between 2 and {limit} tokens for this model "
            f"(context {lm.info.max_positions} minus {steps_per_context} timed steps)"
        )
    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    twin = plain_twin(lm)
    warm_up(lm, twin)
    rows = []
    for c in sorted(ctx_list):
        if progress:
            progress(f"context {c}…")
        gc.collect()
        rows.append(measure_context(lm, twin, c, repeats=repeats, warmup=warmup))
    del twin

    def by_context(key: str) -> dict[str, float]:
        return {str(r["context"]): r[key] for r in rows}

    info = lm.info
    geo = kv_geometry(lm.model.config)
    return {
        "model": {
            "name": info.name, "model_type": info.model_type, "num_layers": info.num_layers,
            "num_heads": info.num_heads, "num_key_value_heads": info.num_key_value_heads,
            "head_dim": info.head_dim, "max_positions": info.max_positions, "dtype": info.dtype,
            "device": info.device, "parameters": sum(p.numel() for p in lm.model.parameters()),
        },
        "machine": {**machine_info(), "load_average_1min_before": load_before},
        "settings": {
            "repeats": repeats, "warmup": warmup, "contexts": [r["context"] for r in rows],
            "baseline": "same weights, attn_implementation='sdpa', DynamicCache (transformers' default)",
            "kvviz_step": "Session.step with full recording, parity check off",
            "statistic": "median",
        },
        "capture_overhead": _median([r["capture_overhead"] for r in rows]),
        "capture_overhead_worst": max(r["capture_overhead"] for r in rows),
        "capture_overhead_by_context": by_context("capture_overhead"),
        "cache_speedup": by_context("cache_speedup"),
        "step_ms": by_context("step_ms"),
        "forward_ms": by_context("forward_ms"),
        "plain_step_ms": by_context("plain_step_ms"),
        "prefill_ms": by_context("prefill_ms"),
        "plain_prefill_ms": by_context("plain_prefill_ms"),
        "recompute_ms": by_context("recompute_ms"),
        "trace_bytes_per_step": by_context("trace_bytes_per_step"),
        "kv_cache_bytes": by_context("kv_cache_bytes"),
        "kv_cache_bytes_per_token": geo.bytes_per_token(info.dtype),
    }


def format_bench(result: dict[str, Any]) -> str:
    """The readable table `kvviz bench` prints without --json."""
    m, mach = result["model"], result["machine"]
    lines = [
        f"model {m['name']} ({m['model_type']}, {m['num_layers']} layers, {m['num_heads']} heads / "
        f"{m['num_key_value_heads']} KV heads, head_dim {m['head_dim']}, {m['dtype']} on {m['device']})",
        f"machine: {mach['cpu']}, {mach['cores']} cores, {mach['torch_threads']} torch threads; "
        f"torch {mach['torch']}, transformers {mach['transformers']}; load average "
        f"{mach.get('load_average_1min_before')} before, {mach.get('load_average_1min')} after",
        f"medians of {result['settings']['repeats']} repeats after {result['settings']['warmup']} warm-up steps",
        "",
        f"{'context':>7}  {'kvviz step':>10}  {'plain step':>10}  {'overhead':>8}  {'recompute':>9}  "
        f"{'cache speed-up':>14}  {'prefill':>8}  {'trace/step':>10}",
    ]
    for c in result["cache_speedup"]:
        lines.append(
            f"{c:>7}  {result['step_ms'][c]:>8.2f}ms  {result['plain_step_ms'][c]:>8.2f}ms  "
            f"{result['capture_overhead_by_context'][c]:>7.2f}x  {result['recompute_ms'][c]:>7.1f}ms  "
            f"{result['cache_speedup'][c]:>13.1f}x  {result['prefill_ms'][c]:>6.1f}ms  "
            f"{result['trace_bytes_per_step'][c] / 1024:>8.1f}KB"
        )
    lines += ["", f"capture_overhead: {result['capture_overhead']:.2f}x, median over contexts "
              f"(worst {result['capture_overhead_worst']:.2f}x; target <= 1.3)"]
    return "\n".join(lines)
