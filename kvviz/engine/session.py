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

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvviz.engine import capture
from kvviz.engine.cache import KVVizCache
from kvviz.engine.models import LoadedModel, using_threads
from kvviz.engine.sampling import Sampling, choose, new_generator
from kvviz.engine.timing import timed
from kvviz.engine.tokens import token_text
from kvviz.engine.trace import LayerStep, Step, TokenProb, Trace
from kvviz.engine.variant import CacheVariant, Rope
from kvviz.geometry import human_bytes
from kvviz.validate import InputError, text, whole_number
from kvviz.validate import settings as deployment

__all__ = ["InputError", "Limits", "RunAborted", "Session", "trace"]  # InputError: kvviz's one user-facing error


class RunAborted(InputError):
    """A run ended by a fault (out of memory, non-finite logits) mid-way; the steps recorded so far are kept."""


class NonFiniteLogits(ArithmeticError):
    """A forward produced NaN or infinite logits (broken weights, or an overflow): there is no next token."""


@dataclass(frozen=True)
class Limits:
    """Caps that keep one session from taking the machine (shared deployments).

    A deployment sets the defaults with environment variables (KVVIZ_MAX_PROMPT_TOKENS,
    KVVIZ_MAX_NEW_TOKENS, KVVIZ_MAX_TRACE_MB), read and checked in `kvviz.validate.settings` when
    a `Limits()` is made, which is when a session starts without explicit limits.
    """

    max_prompt_tokens: int = field(default_factory=lambda: deployment().max_prompt_tokens)
    max_new_tokens: int = field(default_factory=lambda: deployment().max_new_tokens)
    # the recorded arrays of one run: checked before each step records (prefill estimated up front)
    max_trace_bytes: int = field(default_factory=lambda: deployment().max_trace_mb * 2**20)
    top_k: int = 10  # next-token candidates kept per step


class TraceBudget:
    """The recorded bytes of every live run in the process, against KVVIZ_MAX_TOTAL_TRACE_MB.

    Each Session reserves what a step will record before running it and gives everything back
    when it is garbage-collected (a visitor's new run replaces the old, a closed tab's state is
    dropped), so many visitors together cannot take more than the cap.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.used = 0

    def reserve(self, account: list[int], n: int, cap: int) -> bool:
        """Add `n` bytes to `account` (a one-item list owned by a session) if the total stays under `cap`."""
        with self._lock:
            if self.used + n > cap:
                return False
            self.used += n
            account[0] += n
            return True

    def give_back(self, account: list[int], n: int) -> None:
        """Return `n` of `account`'s bytes (a step recorded less than reserved, or failed)."""
        with self._lock:
            n = min(n, account[0])
            self.used -= n
            account[0] -= n

    def release(self, account: list[int]) -> None:
        with self._lock:
            self.used -= account[0]
            account[0] = 0


BUDGET = TraceBudget()


def is_out_of_memory(error: BaseException) -> bool:
    """True for the ways torch and Python report exhausted memory (CUDA, MPS, CPU allocator)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def encode_prompt(lm: LoadedModel, prompt: str | Sequence[int], limits: Limits | None = None) -> list[int]:
    """Token ids of a prompt (text, or ids already), refusing empty or over-long prompts with a clear message."""
    limits = Limits() if limits is None else limits
    if isinstance(prompt, (list, tuple)):  # token ids already
        ids = [whole_number(i, "each prompt token id", 0, max(lm.info.vocab_size - 1, 0)) for i in prompt]
    else:
        prompt = text(prompt, "the prompt")
        if len(prompt) > 64 * limits.max_prompt_tokens:  # no tokenizer makes fewer than one token per 64 characters
            raise InputError(f"the prompt is {len(prompt):,} characters; the limit is {limits.max_prompt_tokens} tokens: shorten it")
        if not prompt.strip():
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


def check_steps(lm: LoadedModel, n_prompt: int, steps: int, limits: Limits | None = None) -> int:
    limits = Limits() if limits is None else limits
    steps = whole_number(steps, "steps", 1, limits.max_new_tokens)
    room = lm.info.context_length - n_prompt
    if steps > room:
        raise InputError(
            f"{n_prompt} prompt tokens + {steps} steps exceed the model's context of {lm.info.context_length}: "
            f"use at most {room} steps or a shorter prompt"
        )
    return steps


def check_forced_ids(forced_ids: Sequence[int], steps: int, vocab_size: int) -> list[int]:
    """Teacher-forced tokens: one whole number per step, each a token id of the model's vocabulary."""
    if isinstance(forced_ids, (str, bytes)) or not isinstance(forced_ids, Sequence):
        raise InputError(f"forced_ids must be a list of token ids, got {type(forced_ids).__name__}")
    if len(forced_ids) < steps:
        raise InputError(f"{len(forced_ids)} forced tokens for {steps} steps: give one per step")
    return [whole_number(i, "each forced token id", 0, vocab_size - 1) for i in forced_ids]


class Session:
    """One user's step-by-step run on a shared model."""

    def __init__(
        self,
        lm: LoadedModel,
        prompt: str | Sequence[int],
        max_new_tokens: int = 16,
        *,
        bug: CacheVariant | None = None,
        sampling: Sampling | None = None,
        parity: bool = True,
        limits: Limits | None = None,
        stop_at_eos: bool = True,
        forced_ids: Sequence[int] | None = None,
        keep_logits: bool = False,
        record: bool = True,
    ) -> None:
        """`prompt`: text, or token ids already (e.g. a passage of a corpus, fed as it was tokenized).
        `bug`: any cache variant (an injected bug, an eviction policy, a quantised cache; see variant.py).
        `forced_ids`: feed these tokens instead of the session's own choices (teacher forcing; the
        choices are still recorded in each Step), e.g. to run a buggy cache on a clean run's tokens;
        `force_next` does the same one step at a time.
        `keep_logits`: keep each step's last-position logits in `Step.logits` (vocab floats per step).
        `record=False`: record no arrays (each Step has no layers): a scoring run that needs only logits."""
        if not isinstance(lm, LoadedModel):
            raise InputError(f"the model must be a kvviz.LoadedModel (from kvviz.load_model), got {type(lm).__name__}")
        if limits is not None and not isinstance(limits, Limits):
            raise InputError(f"limits must be a kvviz.Limits, got {type(limits).__name__}")
        self.lm = lm
        self.limits = limits = Limits() if limits is None else limits
        self.prompt_ids = encode_prompt(lm, prompt, limits)
        self.prompt = prompt if isinstance(prompt, str) else lm.tokenizer.decode(self.prompt_ids)
        self.max_new_tokens = max_new_tokens = check_steps(lm, len(self.prompt_ids), max_new_tokens, limits)
        vocab = lm.info.vocab_size or lm.model.get_input_embeddings().num_embeddings
        self.forced_ids = None if forced_ids is None else check_forced_ids(forced_ids, max_new_tokens, vocab)
        if bug is not None and not isinstance(bug, CacheVariant):
            raise InputError(f"bug must be a cache variant or None, got {type(bug).__name__}: look names up with kvviz.get_variant")
        if sampling is not None and not isinstance(sampling, Sampling):
            raise InputError(f"sampling must be a kvviz.Sampling, got {type(sampling).__name__}")
        for flag, value in (("parity", parity), ("stop_at_eos", stop_at_eos), ("keep_logits", keep_logits), ("record", record)):
            if not isinstance(value, bool):
                raise InputError(f"{flag} must be True or False, got {type(value).__name__}")
        self.keep_logits = keep_logits
        self.record = record
        self.bug = bug
        self.rope = Rope.of(lm.model)  # for a variant that moves keys to new positions (StreamingLLM)
        self.sampling = sampling or Sampling()
        self.parity = parity
        self.stop_at_eos = stop_at_eos
        self.generator = new_generator(self.sampling)
        self.steps: list[Step] = []
        self._trace_bytes = 0  # running sum of the steps' nbytes (summing every step each time is quadratic)
        self._reserved = [0]  # bytes this run holds in the process-wide BUDGET (given back when collected)
        weakref.finalize(self, BUDGET.release, self._reserved)
        self._token_strs: dict[int, str] = {}  # token id -> its text, see _token_str
        self.ids: list[int] = list(self.prompt_ids)  # every token so far: prompt + generated
        self.stopped_reason: str | None = None
        self._stale_ids = list(lm.tokenizer(bug.stale_prompt)["input_ids"]) if bug is not None and bug.stale_prompt else []
        prefill = self.step_bytes(len(self.prompt_ids), len(self._stale_ids) + len(self.prompt_ids))
        if prefill > limits.max_trace_bytes:  # refused before anything is recorded
            raise InputError(
                f"prefill of this {len(self.prompt_ids)}-token prompt would record about {human_bytes(prefill)}, above "
                f"this server's cap of {human_bytes(limits.max_trace_bytes)} per run: shorten the prompt"
            )
        self.cache = self._new_cache()
        self._eos = set(eos_token_ids(lm))

    # -- public -----------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.stopped_reason is not None

    def step(self) -> Step:
        """Run the next forward (prefill first) and record it. Raises InputError when done, when the
        step would not fit the caps (nothing is run then), and RunAborted on a fault."""
        if self.done:
            raise InputError(f"generation is over: {self.stopped_reason}")
        n = len(self.steps)
        self._reserve(n)
        if n == 0:
            self._run_stale_prefix()
            input_ids = list(self.prompt_ids)
        else:
            input_ids = [self.ids[-1]]
        start = len(self.ids) - len(input_ids)  # text index of the first fed token
        token_index = torch.arange(start, start + len(input_ids))  # (q_len,)
        positions = token_index.unsqueeze(0)  # (1, q_len): the exact cache feeds token i at position i
        if self.bug is not None and self.bug.active(None, n):  # position ids are shared by every layer
            positions = self.bug.positions(positions, n, self.cache.seq_lengths()[0])
        self.cache.begin_step(n, token_index, positions[0])
        try:
            record = self._forward_or_abort(n, input_ids, positions)
            self.steps.append(record)
            self._trace_bytes += record.nbytes()
        finally:  # the reservation was an upper bound (or the step failed): keep only what is recorded
            BUDGET.give_back(self._reserved, self._reserved[0] - self._trace_bytes)
        # the next input: this step's choice, or the forced token (teacher forcing)
        self.ids.append(record.token_id if self.forced_ids is None else self.forced_ids[n])
        if len(self.steps) >= self.max_new_tokens:
            self.stopped_reason = f"reached the {self.max_new_tokens} tokens asked for"
        elif self.stop_at_eos and record.token_id in self._eos:
            self.stopped_reason = "the model emitted its end-of-text token"
        elif len(self.ids) >= self.lm.info.context_length:
            self.stopped_reason = f"the model's context of {self.lm.info.context_length} tokens is full"
        elif self.trace_bytes() + self._next_step_bytes() > self.limits.max_trace_bytes:
            self.stopped_reason = self._cap_reason()
        return record

    def force_next(self, token_id: int) -> None:
        """Feed `token_id` at the next step instead of this session's own choice (teacher forcing one
        step at a time, e.g. a variant cache fed the tokens an exact run chooses as it goes)."""
        if not self.steps or self.done:
            raise InputError("force_next needs a step taken and generation not over")
        self.ids[-1] = int(token_id)

    def run(self) -> Trace:
        while not self.done:
            self.step()
        return self.trace()

    def trace_bytes(self) -> int:
        return self._trace_bytes

    def step_bytes(self, q_len: int, kv_len: int) -> int:
        """What one step records (an upper bound; `Step.nbytes` is the truth): per layer, float32 q' rows
        (num_heads, q_len, head_dim), k' and v' rows (num_kv_heads, q_len, head_dim), scores and
        weights (num_heads, q_len, kv_len), the newest position's attention input (hidden_size,), the
        attended K and V when a bug may rewrite history."""
        info = self.lm.info
        per_layer = 4 * (info.num_heads * q_len * info.head_dim + 2 * info.num_key_value_heads * q_len * info.head_dim
                         + 2 * info.num_heads * q_len * kv_len + info.hidden_size) + 8 * info.num_heads
        if self.bug is not None:
            per_layer += 4 * 2 * info.num_key_value_heads * kv_len * info.head_dim
        logits = 4 * (info.vocab_size or 0) if self.keep_logits else 0
        return info.num_layers * per_layer + logits

    def _next_step_bytes(self) -> int:
        """The next decode step's record: one new row attending over the cache plus itself."""
        return self.step_bytes(1, max(self.cache.seq_lengths() or [0]) + 1)

    def _cap_reason(self) -> str:
        return f"the recorded trace reached this server's cap of {human_bytes(self.limits.max_trace_bytes)} per run"

    def _reserve(self, n: int) -> None:
        """Refuse step `n` before it runs when its record would pass this run's cap or the process's."""
        need = self.step_bytes(len(self.prompt_ids), len(self._stale_ids) + len(self.prompt_ids)) if n == 0 \
            else self._next_step_bytes()
        if self._trace_bytes + need > self.limits.max_trace_bytes:
            self.stopped_reason = self._cap_reason()
            raise InputError(f"generation is over: {self.stopped_reason}")
        cap = deployment().max_total_trace_mb * 2**20
        if not BUDGET.reserve(self._reserved, need, cap):
            raise InputError(
                f"the server is holding {human_bytes(BUDGET.used)} of recorded runs for all its visitors, its cap: "
                "try again in a minute, or with a shorter prompt or fewer steps"
            )

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
    def _forward_or_abort(self, n: int, input_ids: list[int], positions: torch.Tensor) -> Step:
        """`_forward`, with the faults that end this run (not the shared model) turned into RunAborted."""
        try:
            return self._forward(n, input_ids, positions)
        except NonFiniteLogits as e:
            self.stopped_reason = f"the model's {e} logits at step {n} are not finite numbers"
            raise RunAborted(
                f"the model's {e} logits at step {n} are NaN or infinite: its weights or this input are broken, so "
                f"there is no next token; the run stopped and its {n} recorded steps are kept"
            ) from None
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
            ) from None

    def _new_cache(self) -> KVVizCache:
        return KVVizCache(config=self.lm.model.config, bug=self.bug, rope=self.rope)

    def _token_str(self, token_id: int) -> str:
        # byte pieces of a split character read <0xE4>, never "�" (kvviz.engine.tokens). Eleven
        # per step (chosen + top-k), the same candidates recurring: remember them for this session
        text = self._token_strs.get(token_id)
        if text is None:
            text = self._token_strs[token_id] = token_text(self.lm.tokenizer, token_id)
        return text

    def _run_stale_prefix(self) -> None:
        """A bug that leaks the previous request's cache: fill it (in the bug's layers) with that request first."""
        bug = self.bug
        if bug is None or not bug.stale_prompt:
            return
        previous = KVVizCache(config=self.lm.model.config)
        with torch.inference_mode():
            self.lm.model(input_ids=torch.tensor([self._stale_ids], device=self.lm.device), past_key_values=previous,
                          use_cache=True)
        self.cache.load_rows(previous, [i for i in range(self.lm.info.num_layers) if bug.active(i, 0)])

    def _forward(self, n: int, input_ids: list[int], positions: torch.Tensor) -> Step:
        model, device = self.lm.model, self.lm.device
        recorder = capture.StepRecorder(step=n, bug=self.bug, keep_attended=self.bug is not None,
                                        capture=self.record, cache=self.cache)
        ids_t = torch.tensor([input_ids], device=device)  # (1, q_len)

        def forward_and_record() -> Any:
            out = model(input_ids=ids_t, position_ids=positions.to(device), past_key_values=self.cache, use_cache=True)
            recorder.to_host()  # every record of the step in one device -> host transfer
            return out

        with using_threads(self.lm.threads), torch.inference_mode(), capture.recording(recorder):
            time_ms, out = timed(forward_and_record, device)
            logits = out.logits[0, -1].float()  # (vocab,)
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits("cached")

        max_diff = recompute_ms = None
        if self.parity:
            full = torch.tensor([self.ids], device=device)  # (1, seq): everything fed so far, this step included
            with using_threads(self.lm.threads), torch.inference_mode():  # no recorder: plain SDPA, no cache
                recompute_ms, ref_out = timed(lambda: model(input_ids=full, use_cache=False), device)
                ref = ref_out.logits[0, -1].float()
            if not bool(torch.isfinite(ref).all()):
                raise NonFiniteLogits("recomputed")
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
        for i in range(self.lm.info.num_layers if self.record else 0):
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
                    attention_input=att.get("attention_input"),
                    scaling=att.get("scaling"),
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
