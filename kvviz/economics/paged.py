"""A serving engine's KV cache under a stream of requests: allocation, admission, preemption, time.

The input is a sequence of `Request`s, each one real request's token ids: the prompt's ids (equal
ids in equal places are what prefix sharing finds), how many tokens it generated, the
`max_new_tokens` its client sent, and when it arrived (ms). `Workload.requests()` draws synthetic
ones; real runs are replayed with `Request.from_ids(rid, prompt_ids, output_ids, arrival_ms)`.
The knobs are a `Server`: how memory is handed out and what the scheduler does when it runs out.

How memory is handed out (`Server.allocator`, `block_size`, `prefix_sharing`; the allocators are in
`kvviz.economics.blocks`):
- contiguous: each admitted request reserves one contiguous run of slots for prompt +
  max_new_tokens, as servers did before PagedAttention (FasterTransformer, Orca). The unused tail
  of each reservation is internal fragmentation; holes between reservations of different sizes
  that no waiting request fits are external fragmentation. It never runs out mid-request.
- paged (PagedAttention, Kwon et al. 2023, vLLM): blocks of B tokens taken on demand from a free
  list into a per-request block table. Waste is at most B - 1 tokens per request; any free block
  serves anyone, so no external fragmentation.
- prefix sharing (vLLM automatic prefix caching): each *full* prompt block is named by
  hash(parent block's name, its token ids), so equal prefixes get equal names; a request whose
  prompt starts like a cached one reuses those blocks (reference count + 1) and skips their
  prefill. When its last user leaves, a named block stays cached (reclaimable) and is evicted
  least-recently-used only when a new block is needed. (SGLang's RadixAttention keeps the same
  prefixes in a radix tree; the memory accounting is the same.)

What the scheduler does (vLLM's V0 scheduler is the model; first come, first served):
- admission: a request is admitted when its prompt's blocks fit (`reserve="none"`, vLLM), or only
  when prompt + max_new_tokens fit beside every running request's own reservation
  (`reserve="max_new_tokens"`: no preemption ever, fewer requests at once); at most `max_running`
  requests run; `max_new_tokens_cap` truncates what clients ask for (and what is reserved).
- prefill: without chunking, a step that admits requests prefills their whole prompts and the
  running requests wait (their next token is late: the latency spike); with `chunked_prefill`,
  every step first decodes one token for each running request, then fills the rest of its
  `max_batched_tokens` with prompt chunks.
- preemption: when a running request needs a block and none is free, the newest running request
  gives way: `recompute` frees its blocks and queues it again (its prompt and the tokens it made so
  far are prefilled again on re-admission), `swap` copies its cache to `swap_space_tokens` of CPU
  memory and back when memory frees up (PCIe time instead of compute; full swap space: recompute).
- time: a step takes `StepCost.fixed_ms` + per prefilled token + per decoding request + the bytes
  swapped over PCIe. Time to first token = the end of the step that finishes a request's prefill -
  its arrival. The costs are an illustrative model (of the order of an 8B model on one A100), not
  a measurement; the step count and memory are exact for the rules above.
Everything is deterministic for a given request stream. Bytes per token come from a real model's
geometry (`kvviz.geometry.KVGeometry.bytes_per_token`); every layer is treated as global.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from kvviz.economics.blocks import BlockPicture, Cell, ContiguousAllocator, PagedAllocator

ALLOCATORS = ("contiguous", "paged")
RESERVE = ("none", "max_new_tokens")
PREEMPTION = ("recompute", "swap")
DEFAULT_BYTES_PER_TOKEN = 131_072  # Llama-3-8B in fp16, when no model is given
MAX_STEPS = 20_000
MAX_CELL_FRAMES = 120  # block-table pictures kept per run (every k-th step; k doubles as needed)


# -- the request stream -----------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One request as the simulator sees it: token ids and counts, nothing it could not know.

    The scheduler learns `output_len` only when the request stops (as a server does).
    """

    rid: int
    arrival: float  # ms after the start of the stream
    prompt: tuple[int, ...]  # the prompt's token ids (a shared system prompt, then the user's turn)
    output_len: int  # tokens it generates
    max_new_tokens: int  # the cap its client sent: what a contiguous allocator reserves
    system_prompt: int = -1  # which shared system prompt it starts with (-1: none; for colouring)

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError(f"request {self.rid}: the prompt needs at least one token id")
        if not 1 <= self.output_len <= self.max_new_tokens:
            raise ValueError(f"request {self.rid}: output_len must be 1..max_new_tokens ({self.max_new_tokens}), "
                             f"got {self.output_len}")
        if not self.arrival >= 0:
            raise ValueError(f"request {self.rid}: arrival must be >= 0 ms, got {self.arrival}")

    @classmethod
    def from_ids(cls, rid: int, prompt_ids: Sequence[int], output_ids: Sequence[int], arrival_ms: float = 0.0,
                 max_new_tokens: int | None = None) -> Request:
        """A real request: its prompt's token ids, the ids it generated, when it arrived (ms), and
        the max_new_tokens its client sent (default: exactly what it generated)."""
        n = len(output_ids)
        return cls(int(rid), float(arrival_ms), tuple(int(t) for t in prompt_ids), n,
                   n if max_new_tokens is None else int(max_new_tokens))

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.max_new_tokens


def _range(name: str, lo_hi: tuple[int, int]) -> str | None:
    lo, hi = lo_hi
    return None if 1 <= lo <= hi else f"{name} must be a range lo <= hi with lo >= 1, got {lo_hi}"


@dataclass(frozen=True)
class Workload:
    """A synthetic request stream: lengths drawn uniformly from the (lo, hi) ranges; a share of
    requests paste a long document, a share write a long answer; Poisson arrivals."""

    n_requests: int = 40
    system_prompt_tokens: int = 256
    n_system_prompts: int = 1  # distinct system prompts in use (e.g. one per product)
    shared_fraction: float = 1.0  # share of requests that start with a system prompt
    user_tokens: tuple[int, int] = (16, 96)
    output_tokens: tuple[int, int] = (16, 128)
    max_new_tokens: int = 128
    arrival_rate: float = 10.0  # mean arrivals per second
    long_prompt_fraction: float = 0.0  # share whose user turn is a long document instead
    long_prompt_tokens: tuple[int, int] = (2000, 4000)
    long_output_fraction: float = 0.0  # share that write a long answer instead
    long_output_tokens: tuple[int, int] = (500, 1000)
    vocab_size: int = 32000
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (None if 1 <= self.n_requests <= 100_000 else "n_requests must be 1 to 100,000"),
            (None if 0 <= self.system_prompt_tokens <= 1_000_000 else "system_prompt_tokens must be 0 to 1,000,000"),
            (None if 1 <= self.n_system_prompts <= 1000 else "n_system_prompts must be 1 to 1000"),
            *(None if 0.0 <= f <= 1.0 else f"{name} must be between 0 and 1" for name, f in (
                ("shared_fraction", self.shared_fraction), ("long_prompt_fraction", self.long_prompt_fraction),
                ("long_output_fraction", self.long_output_fraction))),
            _range("user_tokens", self.user_tokens), _range("output_tokens", self.output_tokens),
            _range("long_prompt_tokens", self.long_prompt_tokens), _range("long_output_tokens", self.long_output_tokens),
            (None if max(self.output_tokens[1], self.long_output_tokens[1] if self.long_output_fraction else 0)
             <= self.max_new_tokens else "output lengths' upper ends must be <= max_new_tokens"),
            (None if 0 < self.arrival_rate <= 1e6 else "arrival_rate must be positive (requests per second)"),
        ]
        for msg in checks:
            if msg:
                raise ValueError(msg)

    def typical(self) -> dict[str, int]:
        """The average request: prompt, shared part and output lengths (for `requests_that_fit`)."""
        shared = self.system_prompt_tokens if self.shared_fraction >= 0.5 else 0
        user = (1 - self.long_prompt_fraction) * sum(self.user_tokens) / 2 + self.long_prompt_fraction * sum(
            self.long_prompt_tokens) / 2
        out = (1 - self.long_output_fraction) * sum(self.output_tokens) / 2 + self.long_output_fraction * sum(
            self.long_output_tokens) / 2
        return {"prompt_len": shared + max(1, round(user)), "shared_len": shared, "output_len": max(1, round(out)),
                "max_new_tokens": self.max_new_tokens}

    def requests(self) -> tuple[Request, ...]:
        rng = np.random.default_rng(self.seed)
        systems = [tuple(int(x) for x in rng.integers(0, self.vocab_size, self.system_prompt_tokens))
                   for _ in range(self.n_system_prompts)]
        out, t = [], 0.0
        for rid in range(self.n_requests):
            t += rng.exponential(1000.0 / self.arrival_rate)  # ms
            shared = bool(rng.random() < self.shared_fraction) and self.system_prompt_tokens > 0
            which = int(rng.integers(0, self.n_system_prompts)) if shared else -1
            span = self.long_prompt_tokens if rng.random() < self.long_prompt_fraction else self.user_tokens
            user = tuple(int(x) for x in rng.integers(0, self.vocab_size, int(rng.integers(*span, endpoint=True))))
            span = self.long_output_tokens if rng.random() < self.long_output_fraction else self.output_tokens
            n_out = int(rng.integers(*span, endpoint=True))
            out.append(Request(rid, round(t, 3), (systems[which] if shared else ()) + user, n_out, self.max_new_tokens,
                               which))
        return tuple(out)


# -- the knobs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepCost:
    """How long one step takes: an illustrative model, of the order of an 8B model on one A100."""

    fixed_ms: float = 12.0  # read every weight once per step, whatever the batch
    prefill_ms_per_token: float = 0.08  # ~12k prompt tokens/s of compute
    decode_ms_per_request: float = 0.15  # each running request's own work (its cache read)
    pcie_gb_per_s: float = 20.0  # swap traffic between GPU and CPU memory

    def step_ms(self, prefill_tokens: int, decodes: int, swap_bytes: int) -> float:
        return (self.fixed_ms + self.prefill_ms_per_token * prefill_tokens + self.decode_ms_per_request * decodes
                + swap_bytes / (self.pcie_gb_per_s * 1e6))


@dataclass(frozen=True)
class Server:
    """A serving engine's memory and scheduling settings: the knobs of the scenarios."""

    budget_tokens: int = 4096  # KV slots on the GPU after the weights
    allocator: str = "paged"  # "contiguous" (reserve prompt + max_new_tokens) or "paged" (blocks on demand)
    block_size: int = 16  # tokens per block (contiguous: only how its arena is drawn)
    prefix_sharing: bool = False  # paged only
    reserve: str = "none"  # paged admission: "none" (prompt fits) or "max_new_tokens" (its whole cap fits)
    max_new_tokens_cap: int | None = None  # the server's cap on what clients ask (truncates answers)
    preemption: str = "recompute"  # "recompute" or "swap" (to CPU memory)
    swap_space_tokens: int = 0  # CPU memory for swapped caches, in tokens
    chunked_prefill: bool = False
    max_batched_tokens: int = 2048  # tokens per step: prompt chunks + decodes (chunked); prompts per step (not)
    max_running: int = 256  # requests running at once (vLLM's max_num_seqs)
    cost: StepCost = field(default_factory=StepCost)

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.block_size <= 4096, f"block size must be 1 to 4096, got {self.block_size}"),
            (self.budget_tokens >= self.block_size,
             f"the budget ({self.budget_tokens} tokens) is smaller than one block ({self.block_size})"),
            (self.budget_tokens <= 1 << 24, "the budget must be at most 16M tokens"),
            (self.allocator in ALLOCATORS, f"unknown allocator {self.allocator!r}; choose one of {', '.join(ALLOCATORS)}"),
            (self.reserve in RESERVE, f"reserve must be one of {', '.join(RESERVE)}"),
            (self.preemption in PREEMPTION, f"preemption must be one of {', '.join(PREEMPTION)}"),
            (self.max_new_tokens_cap is None or self.max_new_tokens_cap >= 1, "max_new_tokens_cap must be at least 1"),
            (0 <= self.swap_space_tokens <= 1 << 26, "swap space must be 0 to 64M tokens"),
            (1 <= self.max_batched_tokens <= 1 << 20, "max_batched_tokens must be 1 to 1M"),
            (1 <= self.max_running <= 100_000, "max_running must be 1 to 100,000"),
            (not (self.prefix_sharing and self.allocator == "contiguous"), "prefix sharing needs the paged allocator"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def cap(self, req: Request) -> int:
        """Tokens `req` may generate: its client's max_new_tokens, under the server's cap."""
        return min(req.max_new_tokens, self.max_new_tokens_cap or req.max_new_tokens)

    def describe(self) -> dict[str, str]:
        """The settings in words, for a before/after table."""
        alloc = "contiguous, reserved to prompt + max_new_tokens" if self.allocator == "contiguous" else (
            f"paged, blocks of {self.block_size}" + (" + prefix sharing" if self.prefix_sharing else ""))
        return {
            "memory": alloc,
            "admission": ("whole max_new_tokens reserved" if self.reserve == "max_new_tokens" or self.allocator == "contiguous"
                          else "when the prompt fits") + f", at most {self.max_running} running",
            "max_new_tokens cap": "the client's" if self.max_new_tokens_cap is None else f"{self.max_new_tokens_cap:,}",
            "preemption": ("never needed" if self.allocator == "contiguous" or self.reserve == "max_new_tokens" else
                           "recompute" if self.preemption == "recompute" else
                           f"swap to CPU ({self.swap_space_tokens:,} tokens)"),
            "prefill": (f"chunked, {self.max_batched_tokens:,} tokens per step" if self.chunked_prefill
                        else "whole prompts; decodes wait"),
            "KV budget": f"{self.budget_tokens:,} tokens",
        }


# -- what one step looks like -----------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """The cache after one simulated step. Token counts are physical slots unless said otherwise."""

    step: int
    running: tuple[int, ...]
    waiting: int
    finished: int
    used_tokens: int  # K/V actually written (a shared block counts once)
    logical_tokens: int  # sum of the running requests' lengths (a shared block counts per user)
    reserved_tokens: int  # slots held by running requests (allocated blocks x B, or reservations)
    internal_frag_tokens: int  # reserved but unwritten: reserved - used
    external_frag_tokens: int  # free, but outside the largest free hole (contiguous only)
    free_tokens: int
    cached_tokens: int  # unreferenced prefix blocks kept for reuse (reclaimable)
    prefix_hit_tokens: int  # cumulative prompt tokens served from the cache instead of prefilled
    evictions: int  # cumulative cached blocks evicted
    preemptions: int  # cumulative requests preempted for lack of memory (recompute + swap)
    picture: BlockPicture | None = None  # the block table, kept every few steps (see SimResult.cell_steps)
    time_ms: float = 0.0  # the clock at the end of this step
    step_ms: float = 0.0
    prefill_tokens: int = 0  # prompt tokens computed in this step
    decode_tokens: int = 0  # requests that got a token in this step
    swapped: int = 0  # requests whose cache sits in CPU memory
    swap_tokens: int = 0  # CPU memory in use, tokens
    swaps: int = 0  # cumulative swap-outs (of the preemptions)

    @property
    def cells(self) -> tuple[Cell, ...]:
        """The block table cell by cell (empty at steps whose picture was not kept)."""
        return self.picture.cells() if self.picture else ()


def make_allocator(server: Server) -> ContiguousAllocator | PagedAllocator:
    if server.allocator == "contiguous":
        return ContiguousAllocator(server.budget_tokens, server.block_size)
    return PagedAllocator(server.budget_tokens // server.block_size, server.block_size, server.prefix_sharing)


# -- the result ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request (times in ms from the start of the stream)."""

    rid: int
    arrival: float
    prompt_len: int
    admitted: float | None = None  # the first admission
    first_token: float | None = None
    finished: float | None = None
    tokens: int = 0  # generated (at most the cap)
    truncated: bool = False  # stopped by max_new_tokens before it was done
    preemptions: int = 0
    longest_stall_ms: float = 0.0  # the longest wait between two of its tokens
    rejected: bool = False  # could never fit in the budget

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def queue_ms(self) -> float | None:
        return None if self.admitted is None else self.admitted - self.arrival


def _pct(values: Sequence[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if len(values) else 0.0


@dataclass(frozen=True)
class SimResult:
    server: Server
    bytes_per_token: int
    snapshots: tuple[Snapshot, ...]
    records: tuple[RequestRecord, ...]
    stopped_at_limit: bool = False  # max_steps ran out before every request finished
    recomputed_tokens: int = 0  # prompt + generated tokens prefilled again after a recompute preemption
    swapped_bytes: int = 0  # GPU <-> CPU traffic (both ways)

    @property
    def block_size(self) -> int:
        return self.server.block_size

    @property
    def budget_tokens(self) -> int:
        return self.server.budget_tokens

    @property
    def steps(self) -> int:
        return len(self.snapshots)

    @property
    def n_requests(self) -> int:
        return len(self.records)

    @property
    def finished(self) -> list[RequestRecord]:
        return [r for r in self.records if r.finished is not None]

    @property
    def rejected(self) -> tuple[int, ...]:
        return tuple(r.rid for r in self.records if r.rejected)

    @property
    def peak_running(self) -> int:
        return max((len(s.running) for s in self.snapshots), default=0)

    @property
    def peak_used_tokens(self) -> int:
        return max((s.used_tokens for s in self.snapshots), default=0)

    @property
    def cell_steps(self) -> list[int]:
        """Steps whose block table was kept (for the animation)."""
        return [s.step for s in self.snapshots if s.picture]

    def ttfts(self) -> list[float]:
        return [r.ttft_ms for r in self.records if r.ttft_ms is not None]

    def done_line(self) -> str:
        """'finished all 40 in 812 steps (9.3 s)', or that the run hit its step limit."""
        n, done = self.n_requests, len(self.finished)
        t = self.snapshots[-1].time_ms / 1000 if self.snapshots else 0.0
        if self.stopped_at_limit:
            return f"stopped at the step limit ({self.steps:,} steps, {t:.1f} s): {done} of {n} finished"
        rejected = f", {len(self.rejected)} rejected (larger than the budget)" if self.rejected else ""
        return f"finished {done} of {n} in {self.steps:,} steps ({t:.1f} s){rejected}"

    def summary(self) -> dict[str, Any]:
        last = self.snapshots[-1] if self.snapshots else None
        fin = self.finished
        ttft = self.ttfts()
        queue = [r.queue_ms for r in self.records if r.queue_ms is not None]
        stalls = [r.longest_stall_ms for r in fin]
        seconds = (last.time_ms / 1000) if last else 0.0
        mean = lambda f: float(np.mean([f(s) for s in self.snapshots])) if self.snapshots else 0.0
        return {
            "finished": len(fin),
            "of requests": self.n_requests,
            "stopped at the step limit": "yes" if self.stopped_at_limit else "no",
            "steps": self.steps,
            "simulated seconds": round(seconds, 2),
            "output tokens / s": round(sum(r.tokens for r in fin) / seconds, 1) if seconds else 0.0,
            "peak running requests": self.peak_running,
            "mean running requests": round(mean(lambda s: len(s.running)), 1),
            "mean queue wait (ms)": round(float(np.mean(queue)), 1) if queue else 0.0,
            "p95 queue wait (ms)": _pct(queue, 95),
            "TTFT p50 (ms)": _pct(ttft, 50),
            "TTFT p95 (ms)": _pct(ttft, 95),
            "longest stall between tokens, p95 (ms)": _pct(stalls, 95),
            "preemptions": last.preemptions if last else 0,
            "of which swapped to CPU": last.swaps if last else 0,
            "tokens recomputed": self.recomputed_tokens,
            "MiB swapped over PCIe": round(self.swapped_bytes / 2**20, 1),
            "mean internal frag (%)": round(100 * mean(lambda s: s.internal_frag_tokens / max(1, s.reserved_tokens)), 1),
            "mean external frag (%)": round(100 * mean(lambda s: s.external_frag_tokens / max(1, self.budget_tokens)), 1),
            "prefix hit tokens": last.prefix_hit_tokens if last else 0,
            "evictions": last.evictions if last else 0,
            "truncated by the cap": sum(r.truncated for r in fin),
            "rejected": len(self.rejected),
        }


def summary_table(results: Mapping[str, SimResult]) -> list[dict[str, Any]]:
    """One row per measure, one column per run (narrow enough to read on a page)."""
    summaries = {k: r.summary() for k, r in results.items()}
    measures = list(next(iter(summaries.values())))
    return [{"": m, **{k: s[m] for k, s in summaries.items()}} for m in measures]


# -- the simulation ---------------------------------------------------------------------------
@dataclass
class _Live:
    """A request's progress inside the simulation (mutable; becomes a RequestRecord)."""

    req: Request
    cap: int  # tokens it may generate
    target: int  # tokens it will generate: min(output_len, cap)
    order: int = 0  # admission order (the newest gives way first)
    generated: int = 0
    to_prefill: int = 0  # tokens this admission must compute before its next token
    prefilled: int = 0
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    stall: float = 0.0
    preemptions: int = 0

    @property
    def length(self) -> int:
        """Tokens in its cache: the prompt and every generated token but the newest (not fed yet)."""
        return self.req.prompt_len + max(0, self.generated - 1)

    def emit(self, t: float) -> None:
        """A token came out at time t."""
        if self.first_token is None:
            self.first_token = t
        else:
            self.stall = max(self.stall, t - (self.last_token or t))
        self.last_token = t
        self.generated += 1


class _Scheduler:
    """One run: the queues, the allocator and the clock. `step()` advances one engine step."""

    def __init__(self, requests: Sequence[Request], server: Server, bytes_per_token: int) -> None:
        self.server = server
        self.bpt = bytes_per_token
        self.alloc = make_allocator(server)
        self.pending = deque(sorted(requests, key=lambda r: (r.arrival, r.rid)))
        self.live = {r.rid: _Live(r, server.cap(r), min(r.output_len, server.cap(r))) for r in requests}
        self.waiting: deque[int] = deque()
        self.swapped: deque[int] = deque()
        self.running: dict[int, None] = {}  # rid, in admission order (dicts keep insertion order)
        self.done: dict[int, float] = {}
        self.rejected: set[int] = set()
        self.clock = 0.0
        self.order = itertools.count()
        self.preemptions = self.swaps = 0
        self.swap_tokens = 0
        self.recomputed = self.swapped_bytes = 0

    # -- capacity ----------------------------------------------------------------------------
    def _reserve_len(self, lv: _Live) -> int:
        return lv.req.prompt_len + lv.cap

    def _future_blocks(self) -> int:
        """Blocks the running requests may still take under reserve="max_new_tokens"."""
        a = self.alloc
        assert isinstance(a, PagedAllocator)
        return sum(a.blocks_for(self._reserve_len(self.live[r])) - len(a.tables[r]) for r in self.running)

    def _fits(self, lv: _Live, length: int) -> bool:
        a, s = self.alloc, self.server
        if isinstance(a, ContiguousAllocator):
            return a.can_admit(lv.req, length, self._reserve_len(lv))
        if s.reserve == "max_new_tokens":
            extra = a.blocks_for(self._reserve_len(lv)) - a.blocks_for(length)
            return a.blocks_needed(lv.req, length) + extra <= a.available() - self._future_blocks()
        return a.can_admit(lv.req, length)

    def _fits_ever(self, lv: _Live) -> bool:
        """Could it run alone? If not, it is rejected (else the queue would wait for ever)."""
        a = self.alloc
        if isinstance(a, ContiguousAllocator):
            return self._reserve_len(lv) <= a.capacity
        need = self._reserve_len(lv) if self.server.reserve == "max_new_tokens" else lv.req.prompt_len + lv.target
        return a.blocks_for(need) <= a.num_blocks

    # -- moves ---------------------------------------------------------------------------------
    def _admit(self, rid: int, length: int) -> int:
        """Allocate and start prefilling; returns the tokens to compute (cached prompt blocks skipped)."""
        lv = self.live[rid]
        hit = self.alloc.admit(lv.req, length, self._reserve_len(lv))
        self.running[rid] = None
        lv.order = next(self.order)
        lv.to_prefill, lv.prefilled = max(1, length - hit), 0  # the last token is always computed
        if lv.admitted is None:
            lv.admitted = self.clock
        return lv.to_prefill

    def _preempt_newest(self) -> tuple[int, int]:
        """Free the newest running request's memory; returns (rid, bytes swapped out)."""
        victim = max(self.running, key=lambda r: self.live[r].order)
        lv = self.live[victim]
        length = self.alloc.lens[victim]
        self.alloc.release(victim)
        del self.running[victim]
        lv.preemptions += 1
        self.preemptions += 1
        s = self.server
        if s.preemption == "swap" and lv.prefilled >= lv.to_prefill \
                and self.swap_tokens + length <= s.swap_space_tokens:
            self.swaps += 1
            self.swap_tokens += length
            self.swapped.append(victim)
            return victim, length * self.bpt
        # recompute: back to the head of the queue; its prompt and output so far are prefilled again
        self.waiting.appendleft(victim)
        return victim, 0

    def _swap_in(self, rid: int) -> int:
        """Bring a swapped request back; returns the bytes copied (prompt blocks found cached stay put)."""
        lv = self.live[rid]
        length = lv.length
        hit = self.alloc.admit(lv.req, length, self._reserve_len(lv))
        self.running[rid] = None
        lv.order = next(self.order)
        lv.to_prefill = lv.prefilled = 0
        self.swap_tokens -= length
        return (length - hit) * self.bpt

    # -- one engine step -------------------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        s, a = self.server, self.alloc
        while self.pending and self.pending[0].arrival <= self.clock:
            self.waiting.append(self.pending.popleft().rid)
        if not (self.waiting or self.swapped or self.running) and self.pending:
            self.clock = self.pending[0].arrival  # idle: jump to the next arrival
            while self.pending and self.pending[0].arrival <= self.clock:
                self.waiting.append(self.pending.popleft().rid)
        swap_bytes = 0
        prefill: dict[int, int] = {}  # rid -> prompt tokens computed this step
        decoders: list[int] = []

        def room() -> int:
            return s.max_batched_tokens - len(decoders) - sum(prefill.values())

        def admit_waiting() -> None:
            # first come, first served: the head of the queue blocks those behind it
            while self.waiting and len(self.running) < s.max_running and not self.swapped:
                lv = self.live[self.waiting[0]]
                if not self._fits_ever(lv):
                    self.rejected.add(self.waiting.popleft())
                    continue
                length = lv.req.prompt_len + lv.generated  # after a recompute: the tokens it made too
                if not self._fits(lv, length):
                    break
                if s.chunked_prefill and room() <= 0:
                    break
                if not s.chunked_prefill and prefill and length > room():
                    break  # whole prompts only; the first of a step may exceed the budget alone
                rid = self.waiting.popleft()
                need = self._admit(rid, length)
                if lv.preemptions:
                    self.recomputed += need
                prefill[rid] = min(need, room()) if s.chunked_prefill else need

        if not s.chunked_prefill:
            admit_waiting()  # a step that prefills does not decode (vLLM V0)
        if not prefill:
            # swapped requests come back before anyone new is admitted
            while self.swapped and len(self.running) < s.max_running and self._fits(
                    self.live[self.swapped[0]], self.live[self.swapped[0]].length):
                swap_bytes += self._swap_in(self.swapped.popleft())
            # decode: one token for every running request whose prefill is done, oldest first
            for rid in sorted(self.running, key=lambda r: self.live[r].order):
                lv = self.live[rid]
                if rid not in self.running or lv.prefilled < lv.to_prefill:
                    continue
                if s.chunked_prefill and room() <= 0:
                    break
                while rid in self.running and not a.grow(rid, lv.length + 1):
                    _, out = self._preempt_newest()  # the newest gives way (maybe this one)
                    swap_bytes += out
                if rid in self.running:
                    decoders.append(rid)
            if s.chunked_prefill:
                for rid in self.running:  # prompts already admitted continue in chunks
                    lv = self.live[rid]
                    if lv.prefilled < lv.to_prefill and rid not in prefill and room() > 0:
                        prefill[rid] = min(lv.to_prefill - lv.prefilled, room())
                admit_waiting()
        self.swapped_bytes += swap_bytes
        n_prefill = sum(prefill.values())
        step_ms = s.cost.step_ms(n_prefill, len(decoders), swap_bytes)
        self.clock += step_ms
        t = self.clock
        for rid in decoders:  # their caches grew above; the token they computed comes out now
            self.live[rid].emit(t)
            self._finish_if_done(rid)
        for rid, n in prefill.items():
            lv = self.live[rid]
            lv.prefilled += n
            if lv.prefilled >= lv.to_prefill:  # the prefill's forward pass makes the next token
                lv.emit(t)
                self._finish_if_done(rid)
        return dict(time_ms=t, step_ms=step_ms, prefill_tokens=n_prefill, decode_tokens=len(decoders))

    def _finish_if_done(self, rid: int) -> None:
        lv = self.live[rid]
        if lv.generated >= lv.target:
            self.alloc.release(rid)
            del self.running[rid]
            self.done[rid] = self.clock

    def finished_all(self) -> bool:
        return not (self.pending or self.waiting or self.swapped or self.running)

    def records(self) -> tuple[RequestRecord, ...]:
        out = []
        for rid, lv in sorted(self.live.items()):
            out.append(RequestRecord(
                rid, lv.req.arrival, lv.req.prompt_len, lv.admitted, lv.first_token, self.done.get(rid),
                lv.generated, rid in self.done and lv.target < lv.req.output_len, lv.preemptions, round(lv.stall, 3),
                rid in self.rejected,
            ))
        return tuple(out)


def simulate(requests: Sequence[Request], server: Server, bytes_per_token: int = DEFAULT_BYTES_PER_TOKEN,
             max_steps: int = MAX_STEPS, cells: bool = True, check: bool = False) -> SimResult:
    """Run a request stream through one server; one Snapshot per engine step.

    `cells=True` keeps the block table every few steps (at most MAX_CELL_FRAMES of them) for the
    animation; `check=True` verifies every allocator invariant after every step (tests use it).
    Stops when every request has finished (or been rejected), or after `max_steps` steps
    (`SimResult.stopped_at_limit` then says so).
    """
    if not requests:
        raise ValueError("no requests to simulate")
    if len({r.rid for r in requests}) != len(requests):
        raise ValueError("request ids must be unique")
    if not 1 <= max_steps <= 1_000_000:
        raise ValueError(f"max_steps must be 1 to 1,000,000, got {max_steps}")
    sched = _Scheduler(requests, server, int(bytes_per_token))
    snaps: list[Snapshot] = []
    stride = 1  # keep the block table every `stride` steps; doubled whenever too many are kept
    kept = 0
    while not sched.finished_all() and len(snaps) < max_steps:
        timing = sched.step()
        if check:
            sched.alloc.check()
        step = len(snaps)
        with_cells = cells and step % stride == 0
        snaps.append(Snapshot(
            step=step, running=tuple(sched.running), waiting=len(sched.waiting),
            finished=len(sched.done), prefix_hit_tokens=sched.alloc.prefix_hit_tokens, evictions=sched.alloc.evictions,
            preemptions=sched.preemptions, swapped=len(sched.swapped), swap_tokens=sched.swap_tokens, swaps=sched.swaps,
            **timing, **sched.alloc.snapshot_fields(with_cells=with_cells),
        ))
        kept += with_cells
        if kept > MAX_CELL_FRAMES:  # thin out: keep every other kept frame, then every 2*stride steps
            stride *= 2
            snaps = [replace(x, picture=None) if x.picture and x.step % stride else x for x in snaps]
            kept = sum(bool(x.picture) for x in snaps)
    if cells and snaps and not snaps[-1].picture:  # the last picture is the end state
        snaps[-1] = replace(snaps[-1], picture=sched.alloc.snapshot_fields(with_cells=True)["picture"])
    return SimResult(server, int(bytes_per_token), tuple(snaps), sched.records(),
                     stopped_at_limit=not sched.finished_all(), recomputed_tokens=sched.recomputed,
                     swapped_bytes=sched.swapped_bytes)


def compare(requests: Sequence[Request], servers: Mapping[str, Server], bytes_per_token: int = DEFAULT_BYTES_PER_TOKEN,
            max_steps: int = MAX_STEPS, cells: bool = True) -> dict[str, SimResult]:
    """The same request stream through several servers, keyed as given (e.g. before / after)."""
    return {label: simulate(requests, srv, bytes_per_token, max_steps, cells) for label, srv in servers.items()}


def three_allocators(budget_tokens: int, block_size: int = 16, **knobs: Any) -> dict[str, Server]:
    """Contiguous, paged and paged + prefix sharing on one budget: the classic comparison."""
    return {
        "contiguous": Server(budget_tokens, "contiguous", block_size, **knobs),
        "paged": Server(budget_tokens, "paged", block_size, **knobs),
        "paged + prefix sharing": Server(budget_tokens, "paged", block_size, prefix_sharing=True, **knobs),
    }


# -- the static question: how many such requests fit at once? ---------------------------------
def requests_that_fit(
    budget_tokens: int, block_size: int, prompt_len: int, output_len: int, max_new_tokens: int, shared_len: int = 0,
) -> dict[str, int]:
    """Identical requests (prompt + output tokens, the first `shared_len` prompt tokens shared)
    that fit in a budget at once, per allocator."""
    if min(budget_tokens, block_size, prompt_len, output_len, max_new_tokens) < 1 or not 0 <= shared_len <= prompt_len:
        raise ValueError("budget, block size, prompt and output lengths must be positive; shared_len within the prompt")
    blocks = budget_tokens // block_size
    per_request = math.ceil((prompt_len + output_len) / block_size)
    shared_blocks = shared_len // block_size  # only full blocks can be shared
    private = per_request - shared_blocks
    return {
        "contiguous": budget_tokens // (prompt_len + max_new_tokens),
        "paged": blocks // per_request,
        "prefix": max(0, (blocks - shared_blocks) // private) if blocks >= per_request else 0,
    }


# -- the serving incidents, as guided scenarios ---------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """An incident from the serving material, posed as a question: the traffic, the server as it
    was (`before`), one set of knobs that fixes it (`fix`), why it works, and the measures to watch."""

    title: str
    question: str
    workload: Workload
    before: Server
    fix: Server
    why: str
    watch: tuple[str, ...]  # keys of SimResult.summary() that tell this story


SCENARIOS: dict[str, Scenario] = {
    "fragmentation": Scenario(
        title="Fragmentation: reserving max_new_tokens up front",
        question=(
            "An older server reserves prompt + max_new_tokens (1,024) of contiguous memory for every request, though a "
            "typical answer is about 80 tokens. Its KV memory reads 'full' with a handful of requests running, the queue "
            "grows, and first tokens take seconds. Where does the memory go?"
        ),
        workload=Workload(n_requests=100, system_prompt_tokens=100, user_tokens=(10, 150), output_tokens=(10, 150),
                          max_new_tokens=1024, arrival_rate=10.0),
        before=Server(budget_tokens=8000, allocator="contiguous"),
        fix=Server(budget_tokens=8000, allocator="paged", block_size=16),
        why=(
            "Most of each reservation is never written (internal fragmentation, orange below), and the gaps between "
            "reservations of different sizes are too small for the next one (external fragmentation, red). Paged "
            "blocks are taken as tokens are written and any free block serves anyone: the waste is at most one partly "
            "filled block per request. A bigger block wastes more of each last block (try 128). Lowering the "
            "max_new_tokens cap helps the contiguous server too, but truncates long answers."
        ),
        watch=("TTFT p95 (ms)", "peak running requests", "mean internal frag (%)", "mean queue wait (ms)"),
    ),
    "system_prompts": Scenario(
        title="A chat service with shared system prompts",
        question=(
            "Two products; every request starts with one of two 1,000-token system prompts and a short user turn. "
            "Few requests fit at once, some are preempted, and users queue for seconds. How many more fit when each "
            "system prompt is stored once, and what does the block size change?"
        ),
        workload=Workload(n_requests=150, system_prompt_tokens=1000, n_system_prompts=2, user_tokens=(20, 120),
                          output_tokens=(20, 200), max_new_tokens=512, arrival_rate=12.0),
        before=Server(budget_tokens=8000),
        fix=Server(budget_tokens=8000, prefix_sharing=True),
        why=(
            "Without sharing, each request keeps its own copy of a 1,000-token prompt: most of the memory holds the same "
            "K and V many times. With prefix sharing the full blocks of each system prompt are stored once and "
            "referenced by every request (dark cells marked ×n), and stay cached when their users leave. Only full "
            "blocks are shared, and a bigger block wastes more of each request's last block: compare 16 and 256."
        ),
        watch=("peak running requests", "mean queue wait (ms)", "TTFT p95 (ms)", "prefix hit tokens"),
    ),
    "long_generations": Scenario(
        title="OOMs and latency spikes: a shared prompt, long generations",
        question=(
            "A support bot: every request carries the same 512-token system prompt; most answers are short, but one "
            "in five runs to 1,000–2,000 tokens. The server admits a request as soon as its prompt fits. As the long "
            "answers grow, memory runs out mid-generation: requests are preempted and recomputed again and again, and "
            "new users wait many seconds for a first token. Which knobs stop the storm, and what does each cost?"
        ),
        workload=Workload(n_requests=150, system_prompt_tokens=512, user_tokens=(32, 128), output_tokens=(32, 256),
                          max_new_tokens=2048, long_output_fraction=0.2, long_output_tokens=(1000, 2000),
                          arrival_rate=3.0),
        before=Server(budget_tokens=16_000),
        fix=Server(budget_tokens=16_000, prefix_sharing=True, preemption="swap", swap_space_tokens=64_000),
        why=(
            "Every running request stored its own copy of the system prompt. Sharing it stores its blocks once, so the "
            "same memory holds more answers: more requests run and the queue drains. A preempted request no longer "
            "throws its cache away: swapping it to CPU memory costs a PCIe copy instead of prefilling prompt + output "
            "again (no recomputed tokens). Reserving max_new_tokens at admission ends preemption too, but holds 2,048 "
            "tokens for answers that mostly use 150: few requests run and everyone queues (try it). Lowering the "
            "max_new_tokens cap shrinks the reservation by cutting long answers short."
        ),
        watch=("TTFT p95 (ms)", "tokens recomputed", "longest stall between tokens, p95 (ms)", "peak running requests"),
    ),
    "mixed_prompts": Scenario(
        title="Mixed prompt lengths: one long prompt freezes everyone",
        question=(
            "Most chat prompts are about 100 tokens, but one request in ten pastes a 4,000–8,000-token document. "
            "Whenever one arrives, every running chat stops producing tokens for a second or more. What freezes them, "
            "and what smooths it out?"
        ),
        workload=Workload(n_requests=120, system_prompt_tokens=0, shared_fraction=0.0, user_tokens=(50, 150),
                          output_tokens=(50, 300), max_new_tokens=512, long_prompt_fraction=0.1,
                          long_prompt_tokens=(4000, 8000), arrival_rate=4.0),
        before=Server(budget_tokens=60_000, max_batched_tokens=8192),
        fix=Server(budget_tokens=60_000, chunked_prefill=True, max_batched_tokens=512),
        why=(
            "Without chunking, the step that admits a document prefills all of it, and the running requests get no "
            "token until that step ends. Chunked prefill gives every running request its token first and fills the "
            "rest of the step's token budget with a slice of the document: the long prompt waits a little longer for "
            "its first token, nobody else freezes. A smaller budget smooths more and prefills long prompts more slowly."
        ),
        watch=("longest stall between tokens, p95 (ms)", "TTFT p50 (ms)", "TTFT p95 (ms)", "output tokens / s"),
    ),
}
