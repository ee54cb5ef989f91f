"""The decode loop: prefill, then one token at a time, each step recorded as a `Step`.

    step 0 (prefill): feed the whole prompt; the cache fills K, V for every prompt position;
                      the attention is the full causal (prompt x prompt) matrix.
    step t >= 1:      feed the token chosen at step t-1; each layer makes q', k', v' for it,
                      appends K <- [K; k'], V <- [V; v'], and q' attends over every cached key.

Optionally each step is checked against a full no-cache forward over the whole sequence: the
largest |logit difference| is the proof that the cache is exact (about 1e-6 in float32).

A `Session` owns everything that is per user (cache, recorder, RNG, records); the model it holds
is shared and only read. Use one Session per browser session, or `trace()` for a whole run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvviz.engine import capture
from kvviz.engine.cache import KVVizCache
from kvviz.engine.models import LoadedModel
from kvviz.engine.sampling import Sampling, choose, new_generator
from kvviz.engine.timing import timed
from kvviz.engine.trace import LayerStep, Step, TokenProb, Trace
from kvviz.engine.variant import CacheVariant


class InputError(ValueError):
    """Bad user input (prompt, steps, limits); the message says how to fix it."""


class RunAborted(InputError):
    """A run ended by a fault (out of memory) mid-way; the steps recorded so far are kept."""


def _env_limit(name: str, default: int) -> int:
    """A positive whole-number limit from the environment (set per deployment), else `default`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be a whole number") from None
    if value < 1:
        raise ValueError(f"environment variable {name} must be at least 1, got {value}")
    return value


@dataclass(frozen=True)
class Limits:
    """Caps that keep one session from taking the machine (shared deployments).

    A deployment sets the defaults with environment variables, read here and nowhere else:
    KVVIZ_MAX_PROMPT_TOKENS, KVVIZ_MAX_NEW_TOKENS, KVVIZ_MAX_TRACE_MB. They are read when a
    `Limits()` is made, which is when a session starts without explicit limits.
    """

    max_prompt_tokens: int = field(default_factory=lambda: _env_limit("KVVIZ_MAX_PROMPT_TOKENS", 512))
    max_new_tokens: int = field(default_factory=lambda: _env_limit("KVVIZ_MAX_NEW_TOKENS", 256))
    # the recorded arrays of one run
    max_trace_bytes: int = field(default_factory=lambda: _env_limit("KVVIZ_MAX_TRACE_MB", 512) * 2**20)
    top_k: int = 10  # next-token candidates kept per step


def is_out_of_memory(error: BaseException) -> bool:
    """True for the ways torch and Python report exhausted memory (CUDA, MPS, CPU allocator)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def encode_prompt(lm: LoadedModel, prompt: str, limits: Limits | None = None) -> list[int]:
    """Token ids of a prompt, refusing empty or over-long prompts with a clear message."""
    limits = Limits() if limits is None else limits
    if not prompt or not prompt.strip():
        raise InputError("the prompt is empty: type some text to start from")
    ids = list(lm.tokenizer(prompt)["input_ids"])
    if not ids:
        raise InputError("the prompt produced no tokens: type some text to start from")
    cap = min(limits.max_prompt_tokens, lm.info.context_length - 1)
    if len(ids) > cap:
        raise InputError(
            f"the prompt is {len(ids)} tokens; the limit is {cap} "
            f"(model context {lm.info.context_length}, kvviz cap {limits.max_prompt_tokens}): shorten it"
        )
    return ids


def eos_token_ids(lm: LoadedModel) -> list[int]:
    """The ids that end generation: the tokenizer's end-of-text and the generation config's."""
    eos = lm.tokenizer.eos_token_id
    gen_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    out = []
    for e in (eos, gen_eos):
        if isinstance(e, int):
            out.append(e)
        elif isinstance(e, (list, tuple)):
            out.extend(int(x) for x in e)
    return out


def check_steps(lm: LoadedModel, n_prompt: int, steps: int, limits: Limits | None = None) -> None:
    limits = Limits() if limits is None else limits
    if steps < 1:
        raise InputError(f"steps must be at least 1, got {steps}")
    if steps > limits.max_new_tokens:
        raise InputError(f"steps must be at most {limits.max_new_tokens}, got {steps}")
    room = lm.info.context_length - n_prompt
    if steps > room:
        raise InputError(
            f"{n_prompt} prompt tokens + {steps} steps exceed the model's context of {lm.info.context_length}: "
            f"use at most {room} steps or a shorter prompt"
        )


class Session:
    """One user's step-by-step run on a shared model."""

    def __init__(
        self,
        lm: LoadedModel,
        prompt: str,
        max_new_tokens: int = 16,
        *,
        bug: CacheVariant | None = None,
        sampling: Sampling | None = None,
        parity: bool = True,
        limits: Limits | None = None,
        stop_at_eos: bool = True,
        forced_ids: Sequence[int] | None = None,
        keep_logits: bool = False,
    ) -> None:
        """`forced_ids`: feed these tokens instead of the session's own choices (teacher forcing; the
        choices are still recorded in each Step), e.g. to run a buggy cache on a clean run's tokens.
        `keep_logits`: keep each step's last-position logits in `Step.logits` (vocab floats per step)."""
        self.lm = lm
        self.prompt = prompt
        self.limits = limits = Limits() if limits is None else limits
        self.prompt_ids = encode_prompt(lm, prompt, limits)
        check_steps(lm, len(self.prompt_ids), max_new_tokens, limits)
        self.max_new_tokens = max_new_tokens
        if forced_ids is not None and len(forced_ids) < max_new_tokens:
            raise InputError(f"{len(forced_ids)} forced tokens for {max_new_tokens} steps: give one per step")
        self.forced_ids = None if forced_ids is None else list(forced_ids)
        self.keep_logits = keep_logits
        if bug is not None and not isinstance(bug, CacheVariant):
            raise TypeError(f"bug must be a CacheVariant or None, got {bug!r}: look names up with kvviz.get_bug")
        self.bug = bug
        self.sampling = sampling or Sampling()
        self.parity = parity
        self.stop_at_eos = stop_at_eos
        self.generator = new_generator(self.sampling)
        self.cache = self._new_cache()
        self.steps: list[Step] = []
        self._trace_bytes = 0  # running sum of the steps' nbytes (summing every step each time is quadratic)
        self._token_strs: dict[int, str] = {}  # token id -> its text, see _token_str
        self.ids: list[int] = list(self.prompt_ids)  # every token so far: prompt + generated
        self.stopped_reason: str | None = None
        self._eos = set(eos_token_ids(lm))

    # -- public -----------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.stopped_reason is not None

    def step(self) -> Step:
        """Run the next forward (prefill first) and record it. Raises InputError when done."""
        if self.done:
            raise InputError(f"generation is over: {self.stopped_reason}")
        n = len(self.steps)
        if n == 0:
            self._run_stale_prefix()
            input_ids = list(self.prompt_ids)
        else:
            input_ids = [self.ids[-1]]
            if self.bug is not None and self.bug.fresh_cache_each_step and self.bug.active(0, n):
                self.cache = self._new_cache()
        start = len(self.ids) - len(input_ids)  # position of the first fed token
        positions = torch.arange(start, start + len(input_ids)).unsqueeze(0)  # (1, q_len)
        if self.bug is not None and self.bug.start_step <= n:
            positions = self.bug.positions(positions, n)
        try:
            record = self._forward(n, input_ids, positions)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            # end this run only: the shared model is untouched and the steps so far stay readable
            self.stopped_reason = f"out of memory at step {n}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise RunAborted(
                f"ran out of memory at step {n} ({len(self.ids)} tokens in context); the run stopped and its "
                f"{n} recorded steps are kept. Try a shorter prompt, fewer steps or a smaller model."
            ) from e
        self.steps.append(record)
        self._trace_bytes += record.nbytes()
        # the next input: this step's choice, or the forced token (teacher forcing)
        self.ids.append(record.token_id if self.forced_ids is None else self.forced_ids[n])
        if len(self.steps) >= self.max_new_tokens:
            self.stopped_reason = f"reached the {self.max_new_tokens} tokens asked for"
        elif self.stop_at_eos and record.token_id in self._eos:
            self.stopped_reason = "the model emitted its end-of-text token"
        elif len(self.ids) >= self.lm.info.context_length:
            self.stopped_reason = f"the model's context of {self.lm.info.context_length} tokens is full"
        elif self.trace_bytes() > self.limits.max_trace_bytes:
            self.stopped_reason = f"the recorded trace reached its cap of {self.limits.max_trace_bytes // 2**20} MiB"
        return record

    def run(self) -> Trace:
        while not self.done:
            self.step()
        return self.trace()

    def trace_bytes(self) -> int:
        return self._trace_bytes

    def trace(self) -> Trace:
        tok = self.lm.tokenizer
        gen = [s.token_id for s in self.steps]
        return Trace(
            model=self.lm.info,
            prompt=self.prompt,
            prompt_ids=tuple(self.prompt_ids),
            prompt_tokens=tuple(self._token_str(i) for i in self.prompt_ids),
            steps=tuple(self.steps),
            sampling=self.sampling.to_dict(),
            bug=None if self.bug is None else self.bug.name,
            generated_text=tok.decode(gen, skip_special_tokens=True) if gen else "",
        )

    # -- internals --------------------------------------------------------------------------
    def _new_cache(self) -> KVVizCache:
        return KVVizCache(config=self.lm.model.config, bug=self.bug)

    def _token_str(self, token_id: int) -> str:
        # ~8 us per decode call and eleven per step (chosen + top-k), with the same candidates
        # recurring step after step: remember them for this session
        text = self._token_strs.get(token_id)
        if text is None:
            text = self._token_strs[token_id] = self.lm.tokenizer.decode([token_id])
        return text

    def _run_stale_prefix(self) -> None:
        """A bug that leaks the previous request's cache: fill it with that request first."""
        if self.bug is None or not self.bug.stale_prompt:
            return
        stale_ids = list(self.lm.tokenizer(self.bug.stale_prompt)["input_ids"])
        previous = KVVizCache(config=self.lm.model.config)
        with torch.inference_mode():
            self.lm.model(input_ids=torch.tensor([stale_ids], device=self.lm.device), past_key_values=previous, use_cache=True)
        self.cache.load_rows(previous)

    def _forward(self, n: int, input_ids: list[int], positions: torch.Tensor) -> Step:
        model, device = self.lm.model, self.lm.device
        recorder = capture.StepRecorder(step=n, bug=self.bug, keep_attended=self.bug is not None)
        self.cache.step = n
        ids_t = torch.tensor([input_ids], device=device)  # (1, q_len)
        with torch.inference_mode(), capture.recording(recorder):
            time_ms, out = timed(
                lambda: model(input_ids=ids_t, position_ids=positions.to(device), past_key_values=self.cache, use_cache=True),
                device,
            )
            logits = out.logits[0, -1].float()  # (vocab,)

        max_diff = recompute_ms = None
        if self.parity:
            full = torch.tensor([self.ids], device=device)  # (1, seq): everything fed so far, this step included
            with torch.inference_mode():  # no recorder: plain SDPA, no cache
                recompute_ms, ref_out = timed(lambda: model(input_ids=full, use_cache=False), device)
                ref = ref_out.logits[0, -1].float()
            max_diff = float((ref - logits).abs().max().item())

        with torch.inference_mode():
            # the ids so far matter only to sampling warpers; building the tensor costs O(context) per step
            seen = torch.empty(1, 0, dtype=torch.long) if self.sampling.is_greedy else torch.tensor([self.ids], device=device)
            token_id = choose(logits, seen, self.sampling, self.generator)
            logp = torch.log_softmax(logits, dim=-1)  # (vocab,)
            probs = logp.exp()
            p, idx = probs.topk(min(self.limits.top_k, probs.shape[-1]))
            entropy = float(-(probs * logp).sum().item())
        top_k = tuple(TokenProb(int(i), self._token_str(int(i)), float(q)) for q, i in zip(p.tolist(), idx.tolist()))

        layers = []
        for i in range(self.lm.info.num_layers):
            k_new, v_new = recorder.new_kv[i]
            att: dict[str, Any] = recorder.attention[i]
            layers.append(
                LayerStep(
                    layer_idx=i,
                    query_states=att["query_states"],
                    key_states=k_new,
                    value_states=v_new,
                    scores=att["scores"],
                    weights=att["weights"],
                    kv_head_of=att["kv_head_of"],
                    attended_keys=att.get("attended_keys"),
                    attended_values=att.get("attended_values"),
                )
            )
        return Step(
            step=n,
            input_ids=tuple(input_ids),
            positions=tuple(int(x) for x in positions[0].tolist()),
            layers=tuple(layers),
            token_id=token_id,
            token=self._token_str(token_id),
            prob=float(probs[token_id].item()),
            top_k=top_k,
            cache_len=int(self.cache.seq_lengths()[0]),
            time_ms=time_ms,
            max_abs_logit_diff=max_diff,
            recompute_ms=recompute_ms,
            entropy=entropy,
            logits=capture.to_numpy(logits) if self.keep_logits else None,
        )


def trace(lm: LoadedModel, prompt: str, steps: int = 16, **kwargs: Any) -> Trace:
    """Run prefill + decode for `steps` new tokens and return the whole recorded Trace."""
    return Session(lm, prompt, steps, **kwargs).run()
