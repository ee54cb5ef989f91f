"""The step page's state in its URL: read a link (validated), and the parameters to write back.

Parameters (all optional; a missing one keeps its default; the quiz and the README link with these):

    prompt        the prompt text                      (default: the first line of Pride and Prejudice)
    tokens        new tokens, 1 … KVVIZ_MAX_NEW_TOKENS (default 24)
    sampling      "greedy" or "sample"                 (default greedy)
    temperature   0.05 … 2      (sampling only)        top_k  0 … 10000 (0 = off)
    top_p         0.05 … 1      (1 = off)              seed   0 … 2**31 - 1
    layer, head   the layer and query head shown, counted from 0
    step          the step shown: 0 = prefill, t = decode step t (the run is computed up to it)

A greedy run, or a sampled one with its seed, is deterministic, so opening the same link (or
reloading) rebuilds the same run. A bad value is dropped with a message saying why; never a traceback.
Pure: no Streamlit here (the page reads `st.query_params` and passes a plain mapping).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

MAX_PROMPT_CHARS = 20_000  # a link is not the place for a book; the session's token limit applies after this
TEMPERATURE = (0.05, 2.0)
TOP_P = (0.05, 1.0)
MAX_TOP_K = 10_000
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class Link:
    """What a link asked for; None = not given (or dropped as invalid)."""

    prompt: str | None = None
    tokens: int | None = None
    sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    layer: int | None = None
    head: int | None = None
    step: int | None = None


def _int(raw: str, lo: int, hi: int) -> int | None:
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value if lo <= value <= hi else None


def _float(raw: str, lo: float, hi: float) -> float | None:
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and lo <= value <= hi else None


def parse_link(params: Mapping[str, str], *, max_tokens: int, num_layers: int, num_heads: int,
               default_tokens: int = 24) -> tuple[Link, list[str]]:
    """The valid part of a link, and one message per value that was dropped (and why).

    A step is checked against the link's own `tokens`, or the page's default when it gives none.
    """
    notes: list[str] = []
    out: dict[str, object] = {}

    def take(name: str, value: object, why: str) -> None:
        if name not in params:
            return
        if value is None:
            shown = params[name] if len(params[name]) <= 40 else params[name][:40] + "…"
            notes.append(f"{name}={shown!r}: {why}")
        else:
            out[name] = value

    if "prompt" in params:
        prompt = params["prompt"]
        take("prompt", prompt if prompt.strip() and len(prompt) <= MAX_PROMPT_CHARS else None,
             f"a prompt must hold some text and at most {MAX_PROMPT_CHARS:,} characters")
    take("tokens", _int(params.get("tokens", ""), 1, max_tokens), f"a whole number from 1 to {max_tokens}")
    if "sampling" in params:
        mode = params["sampling"].strip().lower()
        take("sampling", {"greedy": False, "sample": True}.get(mode), '"greedy" or "sample"')
        if "sampling" in out:
            out["sample"] = out.pop("sampling")
    take("temperature", _float(params.get("temperature", ""), *TEMPERATURE),
         f"a number from {TEMPERATURE[0]} to {TEMPERATURE[1]}")
    take("top_k", _int(params.get("top_k", ""), 0, MAX_TOP_K), f"a whole number from 0 (off) to {MAX_TOP_K}")
    take("top_p", _float(params.get("top_p", ""), *TOP_P), f"a number from {TOP_P[0]} to {TOP_P[1]} (1 = off)")
    take("seed", _int(params.get("seed", ""), 0, MAX_SEED), f"a whole number from 0 to {MAX_SEED}")
    take("layer", _int(params.get("layer", ""), 0, num_layers - 1), f"this model's layers are 0 to {num_layers - 1}")
    take("head", _int(params.get("head", ""), 0, num_heads - 1), f"this model's query heads are 0 to {num_heads - 1}")
    steps = int(out.get("tokens", min(default_tokens, max_tokens)))  # type: ignore[call-overload]
    take("step", _int(params.get("step", ""), 0, steps - 1), f"a step from 0 (prefill) to {steps - 1}")
    return Link(**out), notes  # type: ignore[arg-type]


def link_params(*, prompt: str, tokens: int, sample: bool, temperature: float, top_k: int, top_p: float, seed: int,
                layer: int, head: int, step: int, defaults: Mapping[str, object]) -> dict[str, str]:
    """The URL parameters of the page's state; values equal to `defaults` are left out (shorter links)."""
    values: dict[str, object] = {"prompt": prompt, "tokens": tokens, "sampling": "sample" if sample else "greedy"}
    if sample:
        values.update(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    values.update(layer=layer, head=head, step=step)
    return {k: _text(v) for k, v in values.items() if defaults.get(k) != v}


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


PARAMS = ("prompt", "tokens", "sampling", "temperature", "top_k", "top_p", "seed", "layer", "head", "step")
