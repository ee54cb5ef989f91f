"""The live run every question's numbers come from: one real decode on the loaded model, measured.

`live_run(lm)` decodes the demo prompt for `LIVE_STEPS` greedy tokens with kvviz's exact cache (each
step checked against a full recompute), weighs the cache it filled, counts FLOPs on the model's
own matrices (`kvviz.economics.cost`), runs the tied-QKV what-if (`whatif.py`) on the same text and
simulates a serving cache with the model's bytes per token (`kvviz.economics.paged`). Everything is
deterministic except the step timings. The result is read-only and may be shared by sessions.

Step numbering as everywhere in kvviz: step 0 is prefill over the n prompt tokens and chooses the
first new token; decode step t feeds the token chosen at step t - 1 (the t-th generated token) at
position n + t - 1, appends its k' and v', and attends over n + t cached keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvviz.economics import cost, paged
from kvviz.engine import DEFAULT_PROMPT
from kvviz.engine.cache import measure
from kvviz.engine.capture import to_numpy
from kvviz.engine.models import LoadedModel
from kvviz.engine.session import InputError, Limits, Session
from kvviz.engine.trace import ModelInfo, Trace
from kvviz.quiz.whatif import TiedAttention, tied_attention, uses_rope

LIVE_STEPS = 12  # recorded steps (prefill + 11 decode steps): enough for "the tenth generated token"
DECODE_STEP = 10  # the step the "which keys" questions look at: it feeds the 10th generated token
FAR_STEP = 100  # "what the cache saves at step 100"
PREFILL_TOKENS = 256  # the prompt of the prefill-vs-decode question (capped by the model's context)


@dataclass(frozen=True)
class Serving:
    """A chat service's cache with this model's bytes per token (`kvviz.economics.paged`)."""

    bytes_per_token: int
    block_size: int
    # the static question: identical requests sharing one system prompt, how many fit at once
    budget_tokens: int
    system_tokens: int
    user_tokens: int
    output_tokens: int
    max_new_tokens: int
    fits: dict[str, int]  # strategy -> requests that fit at once
    # the dynamic one: long generations on a tight paged cache
    oom_budget_tokens: int
    oom_workload: paged.Workload
    oom_summary: dict[str, dict[str, Any]]  # strategy -> SimResult.summary()


SERVING_STATIC = dict(block_size=16, budget_tokens=4096, system_tokens=256, user_tokens=64, output_tokens=128,
                      max_new_tokens=512)
OOM_WORKLOAD = paged.Workload(n_requests=16, system_prompt_tokens=64, user_tokens=(16, 32), output_tokens=(300, 400),
                              max_new_tokens=400, arrival_rate=4.0, seed=0)
OOM_BUDGET_TOKENS = 2048


def serving(bytes_per_token: int) -> Serving:
    s = SERVING_STATIC
    fits = paged.requests_that_fit(s["budget_tokens"], s["block_size"], s["system_tokens"] + s["user_tokens"],
                                   s["output_tokens"], s["max_new_tokens"], shared_len=s["system_tokens"])
    servers = paged.three_allocators(OOM_BUDGET_TOKENS, s["block_size"])
    results = paged.compare(OOM_WORKLOAD.requests(), servers, bytes_per_token, cells=False)
    return Serving(bytes_per_token=bytes_per_token, fits=fits, oom_budget_tokens=OOM_BUDGET_TOKENS,
                   oom_workload=OOM_WORKLOAD, oom_summary={k: r.summary() for k, r in results.items()}, **s)


@dataclass(frozen=True)
class LiveRun:
    name: str
    trace: Trace  # the demo prompt, LIVE_STEPS greedy steps, parity checked at every step
    flops: cost.FlopModel  # counted on the model's own matrices
    weights_bytes: int
    cache_bytes: int  # the run's KVVizCache weighed after the last step (numel x element size)
    cache_formula_bytes: int  # the formula for as many tokens (kvviz.geometry)
    rewrite_max: float  # largest |final cache - each row as its step wrote it|, K and V, all layers (0: never rewritten)
    rope: bool
    focus: tuple[int, int]  # (layer, head) most questions look at: the run's most previous-token head
    tied: TiedAttention | None  # the what-if on the focus head (None: this model cannot run it, see tied_error)
    tied_error: str | None
    serving: Serving

    @property
    def info(self) -> ModelInfo:
        return self.trace.model

    @property
    def n_prompt(self) -> int:
        return len(self.trace.prompt_ids)

    @property
    def last_step(self) -> int:
        return len(self.trace.steps) - 1

    @property
    def bytes_per_token(self) -> int:
        return self.info.bytes_per_token(self.info.dtype)

    def fed_token(self, step: int) -> str:
        """The token a decode step feeds (chosen at the step before); at prefill, the last prompt token."""
        return self.trace.steps[step - 1].token if step else self.trace.prompt_tokens[-1]

    def newest_row(self, step: int, layer: int, head: int) -> np.ndarray:
        """The newest query's attention weights at `step`: (cache_len,)."""
        return self.trace.steps[step].layers[layer].weights[head, -1]

    def shares(self, step: int, layer: int, head: int) -> tuple[float, float, float]:
        """(prompt, earlier generated tokens, the token itself): where the newest query's weight went."""
        row = self.newest_row(step, layer, head)
        n = self.n_prompt
        return float(row[:n].sum()), float(row[n:-1].sum()), float(row[-1])

    def head_with_most(self, score: Any) -> tuple[int, int]:
        """(layer, head) maximising score(layer, head); the first such on ties."""
        pairs = [(layer, head) for layer in range(self.info.num_layers) for head in range(self.info.num_heads)]
        return max(pairs, key=lambda p: score(*p))

    def step_flops(self, context: int) -> dict[str, int]:
        """FLOPs of a cached step and a full recompute at `context` tokens, and the cached step's parts."""
        f = self.flops
        return {
            "cached": f.cached_step(context),
            "recompute": f.recompute_step(context),
            "matmul": 2 * f.matmul_params,
            "attention": 4 * f.num_layers * f.attn_width * context,
            "lm_head": 2 * f.lm_head_params,
        }

    def intensities(self, context: int, prompt_tokens: int) -> dict[str, float]:
        """FLOPs per byte moved: a decode step at `context` (weights + whole cache) vs a prefill (weights once)."""
        cache_bytes = self.info.total_bytes(context, 1, self.info.dtype)
        return {
            "decode": self.flops.cached_step(context) / (self.weights_bytes + cache_bytes),
            "prefill": self.flops.prefill(prompt_tokens) / self.weights_bytes,
            "cache_bytes": cache_bytes,
        }


def previous_token_head(trace: Trace) -> tuple[int, int]:
    """(layer, head) whose queries put the most weight on the position just before them (whole run)."""
    last = len(trace.steps) - 1
    best, where = -1.0, (0, 0)
    for layer in range(trace.model.num_layers):
        for head in range(trace.model.num_heads):
            w = float(np.diagonal(trace.attention_matrix(layer, head, last), offset=-1).mean())
            if w > best:
                best, where = w, (layer, head)
    return where


def rewrite_max(session: Session, trace: Trace) -> float:
    """How far the final cache's rows are from the rows each step appended (0.0 for an append-only cache)."""
    last, worst = len(trace.steps) - 1, 0.0
    for layer in range(trace.model.num_layers):
        kv = session.cache.layer_kv(layer)
        assert kv is not None
        for final, written in ((kv[0][0], trace.keys(layer, last)), (kv[1][0], trace.values(layer, last))):
            worst = max(worst, float(np.abs(to_numpy(final) - written).max()))  # (num_kv, T, head_dim) each
    return worst


def warm_up(lm: LoadedModel, ids: list[int]) -> None:
    """One throwaway forward: the first forwards after loading are slow, and the run's timings are quoted."""
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=False)


def live_run(lm: LoadedModel, prompt: str = DEFAULT_PROMPT, steps: int = LIVE_STEPS) -> LiveRun:
    """Decode, weigh, count and run the what-if on the loaded model (a few hundred ms on the bundled one)."""
    # greedy, parity on; sized by the quiz, not by a visitor's caps (one small run per model and server)
    session = Session(lm, prompt, steps, stop_at_eos=False, limits=Limits(max_new_tokens=steps))
    warm_up(lm, session.prompt_ids)
    trace = session.run()
    if len(trace.steps) < steps:  # the questions cite steps up to LIVE_STEPS - 1
        raise InputError(f"the quiz's live run stopped after {len(trace.steps)} of {steps} steps: {session.stopped_reason}")
    weighed = measure(session.cache, lm.model.config, lm.info.dtype)
    assert weighed is not None  # prefill filled every layer
    fed = list(trace.prompt_ids) + list(trace.generated_ids[:-1])  # every token fed: the last choice never is
    focus = previous_token_head(trace)
    try:
        tied, tied_error = tied_attention(lm, fed, trace.tokens[: len(fed)], *focus), None
    except ValueError as e:  # e.g. partial RoPE: the questions that need it are left out
        tied, tied_error = None, str(e)
    return LiveRun(
        name=lm.name, trace=trace, flops=cost.flop_model(lm.model), weights_bytes=cost.model_weight_bytes(lm.model),
        cache_bytes=weighed.measured_bytes, cache_formula_bytes=weighed.formula_bytes,
        rewrite_max=rewrite_max(session, trace), rope=uses_rope(lm.model.config), focus=focus,
        tied=tied, tied_error=tied_error, serving=serving(lm.info.bytes_per_token(lm.info.dtype)),
    )
