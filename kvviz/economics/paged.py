"""A serving cache under a stream of chat requests: contiguous vs paged vs paged + shared prefix.

The situation: many requests share one long system prompt, GPU memory is tight. Three ways to
hold their KV caches, all simulated on the same request stream and the same memory budget:

- contiguous: each admitted request reserves one contiguous run of slots for its maximum length
  (prompt + max_new_tokens), as servers did before PagedAttention (FasterTransformer, Orca). The
  unused tail of each reservation is internal fragmentation; holes between reservations of
  different sizes that no waiting request fits are external fragmentation.
- paged (PagedAttention, Kwon et al. 2023, vLLM): the cache is cut into blocks of B tokens; a
  request holds a block table of ceil(len / B) blocks taken on demand from a free list. Waste is
  at most B - 1 tokens per request; any free block serves anyone, so no external fragmentation.
- paged + prefix sharing (vLLM automatic prefix caching): each *full* prompt block is named by
  hash(parent block's hash, its token ids), so equal prefixes get equal names. A request whose
  prompt starts like a cached one reuses those blocks (reference count + 1) instead of storing
  them again. When its last user leaves, a named block stays cached (reclaimable) and is evicted
  least-recently-used only when a new block is needed and the free list is empty. SGLang's
  RadixAttention keeps the same prefixes in a radix tree; the memory accounting is the same.

When a running request needs a block and none can be found, the newest running request is
preempted (its blocks freed, the request sent back to the queue to be recomputed), as vLLM does.
Time is in decode steps: each running request adds one token per step; an admitted request
prefills its prompt in the step it is admitted. Everything is deterministic for a given seed.
Bytes come from a real model's geometry: `kvviz.economics.memory.KVGeometry.bytes_per_token`.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STRATEGIES: dict[str, str] = {
    "contiguous": "Contiguous, reserved to max length",
    "paged": "Paged blocks (PagedAttention)",
    "prefix": "Paged + prefix sharing",
}


class InvariantError(AssertionError):
    """The allocator's bookkeeping is inconsistent (a simulator bug, never user input)."""


# -- the request stream -----------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    rid: int
    arrival: int  # the step it arrives in
    prompt: tuple[int, ...]  # token ids: a system prompt (maybe shared) then the user's message
    output_len: int  # tokens it will generate (the allocator does not know this in advance)
    max_new_tokens: int  # the cap the client sent: what a contiguous allocator must reserve
    system_prompt: int = -1  # which shared system prompt it starts with (-1: none)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.max_new_tokens


@dataclass(frozen=True)
class Workload:
    """A chat service's request stream. Lengths are drawn uniformly from the (lo, hi) ranges."""

    n_requests: int = 40
    system_prompt_tokens: int = 256
    n_system_prompts: int = 1  # distinct system prompts in use (e.g. one per product)
    shared_fraction: float = 1.0  # share of requests that start with a system prompt
    user_tokens: tuple[int, int] = (16, 96)
    output_tokens: tuple[int, int] = (16, 128)
    max_new_tokens: int = 128
    arrival_rate: float = 1.0  # mean arrivals per step (Poisson)
    vocab_size: int = 32000
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.n_requests >= 1, "n_requests must be at least 1"),
            (self.system_prompt_tokens >= 0, "system_prompt_tokens must be >= 0"),
            (self.n_system_prompts >= 1, "n_system_prompts must be at least 1"),
            (0.0 <= self.shared_fraction <= 1.0, "shared_fraction must be between 0 and 1"),
            (1 <= self.user_tokens[0] <= self.user_tokens[1], "user_tokens must be a range lo <= hi, lo >= 1"),
            (1 <= self.output_tokens[0] <= self.output_tokens[1], "output_tokens must be a range lo <= hi, lo >= 1"),
            (self.output_tokens[1] <= self.max_new_tokens, "output_tokens' upper end must be <= max_new_tokens"),
            (self.arrival_rate > 0, "arrival_rate must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def typical(self) -> dict[str, int]:
        """The average request: prompt, shared part and output lengths (for `requests_that_fit`)."""
        shared = self.system_prompt_tokens if self.shared_fraction >= 0.5 else 0
        return {
            "prompt_len": shared + sum(self.user_tokens) // 2,
            "shared_len": shared,
            "output_len": sum(self.output_tokens) // 2,
            "max_new_tokens": self.max_new_tokens,
        }

    def requests(self) -> tuple[Request, ...]:
        rng = np.random.default_rng(self.seed)
        systems = [tuple(int(x) for x in rng.integers(0, self.vocab_size, self.system_prompt_tokens))
                   for _ in range(self.n_system_prompts)]
        out, t = [], 0.0
        for rid in range(self.n_requests):
            t += rng.exponential(1.0 / self.arrival_rate)
            shared = bool(rng.random() < self.shared_fraction) and self.system_prompt_tokens > 0
            which = int(rng.integers(0, self.n_system_prompts)) if shared else -1
            user = tuple(int(x) for x in rng.integers(0, self.vocab_size, int(rng.integers(*self.user_tokens, endpoint=True))))
            prompt = (systems[which] if shared else ()) + user
            n_out = int(rng.integers(*self.output_tokens, endpoint=True))
            out.append(Request(rid, int(t), prompt, n_out, self.max_new_tokens, which))
        return tuple(out)


def block_hashes(prompt: tuple[int, ...], block_size: int) -> list[bytes]:
    """vLLM-style names of a prompt's full blocks: h_i = H(h_{i-1}, tokens of block i).

    Chaining makes a block's name depend on everything before it, so equal names mean equal
    prefixes, not just equal blocks.
    """
    out, parent = [], b""
    for i in range(len(prompt) // block_size):
        chunk = np.asarray(prompt[i * block_size : (i + 1) * block_size], dtype=np.int64).tobytes()
        parent = hashlib.sha256(parent + chunk).digest()[:16]
        out.append(parent)
    return out


# -- what one step looks like -----------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One block of memory (or, for contiguous, one B-token stretch of the arena)."""

    owners: tuple[int, ...]  # request ids holding it (several = shared); () = free or cached
    fill: int  # tokens written in it
    cached: bool = False  # unreferenced but kept for future prefix hits (evictable)


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
    preemptions: int  # cumulative requests preempted for lack of memory
    cells: tuple[Cell, ...] = ()


# -- allocators -------------------------------------------------------------------------------
class ContiguousAllocator:
    """One contiguous reservation of `max_len` slots per request, first fit in an arena."""

    strategy = "contiguous"

    def __init__(self, capacity_tokens: int, block_size: int) -> None:
        self.capacity = capacity_tokens
        self.block_size = block_size  # only for drawing the arena in B-token cells
        self.segments: dict[int, tuple[int, int]] = {}  # rid -> (start, size)
        self.lens: dict[int, int] = {}
        self.prefix_hit_tokens = 0
        self.evictions = 0

    def _holes(self) -> list[tuple[int, int]]:
        """Free (start, size) runs in address order."""
        holes, pos = [], 0
        for start, size in sorted(self.segments.values()):
            if start > pos:
                holes.append((pos, start - pos))
            pos = start + size
        if pos < self.capacity:
            holes.append((pos, self.capacity - pos))
        return holes

    def can_admit(self, req: Request) -> bool:
        return any(size >= req.max_len for _, size in self._holes())

    def admit(self, req: Request) -> None:
        for start, size in self._holes():
            if size >= req.max_len:
                self.segments[req.rid] = (start, req.max_len)
                self.lens[req.rid] = req.prompt_len
                return
        raise MemoryError(f"no hole of {req.max_len} slots")

    def grow(self, rid: int, new_len: int) -> bool:
        # the reservation already covers max_len: growing never needs memory
        if new_len > self.segments[rid][1]:
            raise InvariantError(f"request {rid} grew past its reservation")
        self.lens[rid] = new_len
        return True

    def release(self, rid: int) -> None:
        del self.segments[rid]
        del self.lens[rid]

    def fits_ever(self, req: Request) -> bool:
        return req.max_len <= self.capacity

    def snapshot_fields(self, with_cells: bool) -> dict[str, Any]:
        reserved = sum(size for _, size in self.segments.values())
        used = sum(self.lens.values())
        holes = [size for _, size in self._holes()]
        free = self.capacity - reserved
        out: dict[str, Any] = dict(
            used_tokens=used, logical_tokens=used, reserved_tokens=reserved, internal_frag_tokens=reserved - used,
            external_frag_tokens=free - max(holes, default=0), free_tokens=free, cached_tokens=0,
        )
        if with_cells:
            out["cells"] = self._cells()
        return out

    def _cells(self) -> tuple[Cell, ...]:
        b = self.block_size
        n = self.capacity // b
        owner = np.full(n * b, -1, dtype=np.int64)  # per slot: the reserving request
        written = np.zeros(n * b, dtype=bool)
        for rid, (start, size) in self.segments.items():
            owner[start : min(start + size, n * b)] = rid
            written[start : min(start + self.lens[rid], n * b)] = True
        cells = []
        for i in range(n):
            o = owner[i * b : (i + 1) * b]
            held = o[o >= 0]
            # a stretch may straddle two reservations: draw the one holding most of it
            rid = int(np.bincount(held).argmax()) if held.size else -1
            cells.append(Cell(owners=(rid,) if rid >= 0 else (), fill=int(written[i * b : (i + 1) * b].sum())))
        return tuple(cells)

    def check(self) -> None:
        spans = sorted(self.segments.values())
        for (s0, n0), (s1, _n1) in itertools.pairwise(spans):
            if s0 + n0 > s1:
                raise InvariantError("two reservations overlap")
        if spans and spans[-1][0] + spans[-1][1] > self.capacity:
            raise InvariantError("a reservation runs past the arena")
        for rid, (_, size) in self.segments.items():
            if not 0 < self.lens[rid] <= size:
                raise InvariantError(f"request {rid} has length {self.lens[rid]} in a reservation of {size}")


class PagedAllocator:
    """Blocks of B slots from a free list, per-request block tables; optional prefix sharing."""

    def __init__(self, num_blocks: int, block_size: int, prefix_sharing: bool = False) -> None:
        self.strategy = "prefix" if prefix_sharing else "paged"
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sharing = prefix_sharing
        self.free: list[int] = list(range(num_blocks))  # a heap: lowest id first (compact pictures)
        self.tables: dict[int, list[int]] = {}  # rid -> physical block ids, in token order
        self.lens: dict[int, int] = {}
        self.refcount = [0] * num_blocks
        self.fill = [0] * num_blocks  # tokens written in each block
        self.hash_of: dict[int, bytes] = {}  # block -> its prefix name (full prompt blocks only)
        self.block_of: dict[bytes, int] = {}  # prefix name -> block: each prefix stored once
        self.lru: OrderedDict[int, None] = OrderedDict()  # unreferenced named blocks, oldest first
        self.prefix_hit_tokens = 0
        self.evictions = 0

    # allocation
    def _available(self) -> int:
        return len(self.free) + len(self.lru)

    def _take(self) -> int:
        if self.free:
            return heapq.heappop(self.free)
        block, _ = self.lru.popitem(last=False)  # evict the least recently used cached block
        del self.block_of[self.hash_of.pop(block)]
        self.fill[block] = 0
        self.evictions += 1
        return block

    def _plan(self, req: Request) -> tuple[list[bytes], list[int | None]]:
        """Names of the prompt's full blocks and, per name, the cached block it hits (or None)."""
        names = block_hashes(req.prompt, self.block_size) if self.sharing else []
        return names, [self.block_of.get(h) for h in names]

    def _blocks_needed(self, req: Request) -> int:
        _, hits = self._plan(req)
        total = math.ceil(req.prompt_len / self.block_size)
        new = total - sum(h is not None for h in hits)
        # hit blocks that sit in the LRU are about to be reused: they cannot also be evicted
        revived = sum(1 for h in hits if h is not None and h in self.lru)
        return new + revived

    def can_admit(self, req: Request) -> bool:
        return self._blocks_needed(req) <= self._available()

    def admit(self, req: Request) -> None:
        if not self.can_admit(req):
            raise MemoryError("not enough free blocks")
        names, hits = self._plan(req)
        table: list[int] = []
        for h, hit in zip(names, hits):
            if hit is not None:  # the same prefix is cached: share it
                self.lru.pop(hit, None)
                self.refcount[hit] += 1
                self.prefix_hit_tokens += self.block_size
                table.append(hit)
            else:
                b = self._take()
                self.refcount[b] = 1
                self.fill[b] = self.block_size
                self.hash_of[b], self.block_of[h] = h, b
                table.append(b)
        # the rest (all of it without sharing; else the partial tail) is private
        for i in range(len(names), math.ceil(req.prompt_len / self.block_size)):
            b = self._take()
            self.refcount[b] = 1
            self.fill[b] = min(self.block_size, req.prompt_len - i * self.block_size)
            table.append(b)
        self.tables[req.rid] = table
        self.lens[req.rid] = req.prompt_len

    def grow(self, rid: int, new_len: int) -> bool:
        table = self.tables[rid]
        if new_len > len(table) * self.block_size:
            if not self._available():
                return False
            table.append(self._take())
            self.refcount[table[-1]] = 1
            self.fill[table[-1]] = 0
        last = table[-1]
        if self.refcount[last] > 1:
            # never happens: only full blocks are shared, so the block written into is private
            raise InvariantError(f"request {rid} would write into shared block {last}")
        self.fill[last] = new_len - (len(table) - 1) * self.block_size
        self.lens[rid] = new_len
        return True

    def release(self, rid: int) -> None:
        # newest block first, as vLLM does: a prompt's tail is then evicted before its head,
        # which more requests share
        for b in reversed(self.tables.pop(rid)):
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                if b in self.hash_of:
                    self.lru[b] = None  # keep the content for future prefix hits
                else:
                    self.fill[b] = 0
                    heapq.heappush(self.free, b)
        del self.lens[rid]

    def fits_ever(self, req: Request) -> bool:
        return math.ceil(req.max_len / self.block_size) <= self.num_blocks

    # accounting
    def snapshot_fields(self, with_cells: bool) -> dict[str, Any]:
        held = [b for b in range(self.num_blocks) if self.refcount[b] > 0]
        used = sum(self.fill[b] for b in held)
        reserved = len(held) * self.block_size
        out: dict[str, Any] = dict(
            used_tokens=used, logical_tokens=sum(self.lens.values()), reserved_tokens=reserved,
            internal_frag_tokens=reserved - used, external_frag_tokens=0,
            free_tokens=len(self.free) * self.block_size, cached_tokens=len(self.lru) * self.block_size,
        )
        if with_cells:
            owners: dict[int, list[int]] = {}
            for rid, table in self.tables.items():
                for b in table:
                    owners.setdefault(b, []).append(rid)
            out["cells"] = tuple(
                Cell(owners=tuple(sorted(owners.get(b, ()))), fill=self.fill[b], cached=b in self.lru)
                for b in range(self.num_blocks)
            )
        return out

    def check(self) -> None:
        """Every invariant of the block manager; raises InvariantError on the first broken one."""
        counts = [0] * self.num_blocks
        for table in self.tables.values():
            for b in table:
                counts[b] += 1
        if counts != self.refcount:
            raise InvariantError("reference counts differ from the block tables")
        free, lru = set(self.free), set(self.lru)
        if len(free) != len(self.free):
            raise InvariantError("a block is on the free list twice")
        held = {b for b in range(self.num_blocks) if counts[b] > 0}
        if free & lru or free & held or lru & held:
            raise InvariantError("a block is at once free, cached and/or held")
        if len(free) + len(lru) + len(held) != self.num_blocks:
            raise InvariantError("blocks leaked: free + cached + held != all blocks")
        for b in held:
            if counts[b] > 1 and b not in self.hash_of:
                raise InvariantError(f"block {b} has {counts[b]} owners but is not a named prefix block")
        if {b: h for h, b in self.block_of.items()} != self.hash_of:
            raise InvariantError("the prefix table is not one-to-one")
        for rid, table in self.tables.items():
            if len(table) != math.ceil(self.lens[rid] / self.block_size):
                raise InvariantError(f"request {rid} holds {len(table)} blocks for {self.lens[rid]} tokens")


def make_allocator(strategy: str, budget_tokens: int, block_size: int) -> ContiguousAllocator | PagedAllocator:
    if strategy == "contiguous":
        return ContiguousAllocator(budget_tokens, block_size)
    if strategy in ("paged", "prefix"):
        return PagedAllocator(budget_tokens // block_size, block_size, prefix_sharing=strategy == "prefix")
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


# -- the simulation ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SimResult:
    strategy: str
    block_size: int
    budget_tokens: int
    bytes_per_token: int
    snapshots: tuple[Snapshot, ...]
    admitted_at: dict[int, int] = field(default_factory=dict)  # rid -> step of (last) admission
    finished_at: dict[int, int] = field(default_factory=dict)
    arrivals: dict[int, int] = field(default_factory=dict)
    rejected: tuple[int, ...] = ()  # requests larger than the whole budget

    @property
    def peak_running(self) -> int:
        return max((len(s.running) for s in self.snapshots), default=0)

    @property
    def peak_used_tokens(self) -> int:
        return max((s.used_tokens for s in self.snapshots), default=0)

    @property
    def steps(self) -> int:
        return len(self.snapshots)

    def waits(self) -> list[int]:
        """Steps each finished request waited in the queue (admission - arrival)."""
        return [self.admitted_at[r] - self.arrivals[r] for r in self.finished_at]

    def summary(self) -> dict[str, Any]:
        last = self.snapshots[-1] if self.snapshots else None
        waits = self.waits()
        mean = lambda f: float(np.mean([f(s) for s in self.snapshots])) if self.snapshots else 0.0
        return {
            "strategy": STRATEGIES[self.strategy],
            "finished": len(self.finished_at),
            "steps to finish all": self.steps,
            "peak concurrent requests": self.peak_running,
            "mean concurrent requests": round(mean(lambda s: len(s.running)), 1),
            "mean queue wait (steps)": round(float(np.mean(waits)), 1) if waits else 0.0,
            "p95 queue wait (steps)": round(float(np.percentile(waits, 95)), 1) if waits else 0.0,
            "mean internal frag (%)": round(100 * mean(lambda s: s.internal_frag_tokens / max(1, s.reserved_tokens)), 1),
            "mean external frag (%)": round(100 * mean(lambda s: s.external_frag_tokens / max(1, self.budget_tokens)), 1),
            "prefix hit tokens": last.prefix_hit_tokens if last else 0,
            "evictions": last.evictions if last else 0,
            "preemptions": last.preemptions if last else 0,
            "rejected": len(self.rejected),
        }


def summary_table(results: dict[str, SimResult]) -> list[dict[str, Any]]:
    """One row per measure, one column per strategy (narrow enough to read on a page)."""
    summaries = {k: r.summary() for k, r in results.items()}
    measures = [m for m in next(iter(summaries.values())) if m != "strategy"]
    return [{"": m, **{STRATEGIES[k]: s[m] for k, s in summaries.items()}} for m in measures]


def simulate(
    requests: tuple[Request, ...], strategy: str, budget_tokens: int, block_size: int = 16,
    bytes_per_token: int = 0, max_steps: int = 5000, cells: bool = True, check: bool = False,
) -> SimResult:
    """Run the request stream through one allocator; one Snapshot per step.

    `check=True` verifies every allocator invariant after every step (tests use it).
    """
    if block_size < 1:
        raise ValueError(f"block size must be at least 1, got {block_size}")
    if budget_tokens < block_size:
        raise ValueError(f"the budget ({budget_tokens} tokens) is smaller than one block ({block_size})")
    alloc = make_allocator(strategy, budget_tokens, block_size)
    pending = deque(sorted(requests, key=lambda r: (r.arrival, r.rid)))
    waiting: deque[Request] = deque()
    running: dict[int, tuple[Request, int]] = {}  # rid -> (request, tokens generated), admission order
    admitted_at: dict[int, int] = {}
    finished_at: dict[int, int] = {}
    rejected: list[int] = []
    preemptions = 0
    snaps: list[Snapshot] = []
    step = 0
    while (pending or waiting or running) and step < max_steps:
        while pending and pending[0].arrival <= step:
            waiting.append(pending.popleft())
        # decode: every running request adds one token, oldest first
        for rid in list(running):
            if rid not in running:
                continue  # preempted earlier in this loop
            req, generated = running[rid]
            while not alloc.grow(rid, req.prompt_len + generated + 1):
                victim = next(reversed(running))  # the newest running request gives way
                vreq, _ = running.pop(victim)
                alloc.release(victim)
                waiting.appendleft(vreq)
                preemptions += 1
                if victim == rid:
                    break
            if rid not in running:
                continue
            generated += 1
            if generated >= req.output_len:
                alloc.release(rid)
                del running[rid]
                finished_at[rid] = step
            else:
                running[rid] = (req, generated)
        # admit first come, first served (the head of the queue blocks the rest)
        while waiting:
            head = waiting[0]
            if not alloc.fits_ever(head):
                rejected.append(waiting.popleft().rid)
                continue
            if not alloc.can_admit(head):
                break
            alloc.admit(waiting.popleft())
            running[head.rid] = (head, 0)
            admitted_at[head.rid] = step
        if check:
            alloc.check()
        snaps.append(Snapshot(
            step=step, running=tuple(running), waiting=len(waiting), finished=len(finished_at),
            prefix_hit_tokens=alloc.prefix_hit_tokens, evictions=alloc.evictions, preemptions=preemptions,
            **alloc.snapshot_fields(with_cells=cells),
        ))
        step += 1
    return SimResult(
        strategy, block_size, budget_tokens, bytes_per_token, tuple(snaps), admitted_at, finished_at,
        {r.rid: r.arrival for r in requests}, tuple(rejected),
    )


def compare(
    workload: Workload, budget_tokens: int, block_size: int = 16, bytes_per_token: int = 0, cells: bool = True,
) -> dict[str, SimResult]:
    """The same request stream through all three strategies."""
    reqs = workload.requests()
    return {s: simulate(reqs, s, budget_tokens, block_size, bytes_per_token, cells=cells) for s in STRATEGIES}


# -- the static question: how many such requests fit at once? ---------------------------------
def requests_that_fit(
    budget_tokens: int, block_size: int, prompt_len: int, output_len: int, max_new_tokens: int, shared_len: int = 0,
) -> dict[str, int]:
    """Identical requests (prompt + output tokens, the first `shared_len` prompt tokens shared)
    that fit in a budget at once, per strategy."""
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
