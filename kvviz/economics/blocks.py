"""Where a serving engine's KV memory goes, block by block: the two allocators and the pictures of them.

- `ContiguousAllocator`: one reservation of prompt + max_new_tokens slots per request, first fit in
  an arena (what servers did before PagedAttention); holes between reservations are external
  fragmentation, the unwritten tail of each is internal fragmentation.
- `PagedAllocator` (PagedAttention, Kwon et al. 2023; vLLM): blocks of B slots from a free list into
  per-request block tables; with prefix sharing, full prompt blocks are named by
  `block_hashes` (a hash chained over the prefix) and shared with reference counts, kept cached
  (least recently used first out) when their last user leaves.
- `BlockPicture`: a compact copy of the block tables at one step, drawn cell by cell on demand.

The scheduler that drives them (admission, preemption, time) is `kvviz.economics.paged`. A request
is anything with `rid`, `prompt` (token ids) and `prompt_len`.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np


class PromptRequest(Protocol):
    """What an allocator reads of a request: its id and its prompt's token ids."""

    @property
    def rid(self) -> int: ...
    @property
    def prompt(self) -> tuple[int, ...]: ...
    @property
    def prompt_len(self) -> int: ...


class InvariantError(AssertionError):
    """The allocator's bookkeeping is inconsistent (a simulator bug, never user input)."""


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


class Cell(NamedTuple):
    """One block of memory (or, for contiguous, one B-token stretch of the arena). A named tuple:
    a run keeps hundreds of block tables of hundreds of cells."""

    owners: tuple[int, ...]  # request ids holding it (several = shared); () = free or cached
    fill: int  # tokens written in it
    cached: bool = False  # unreferenced but kept for future prefix hits (evictable)


@dataclass(frozen=True)
class BlockPicture:
    """The memory at one step, kept compact (copies of the block tables, not cells); `cells()`
    draws it block by block when a figure needs that step."""

    num_cells: int
    block_size: int
    tables: tuple[tuple[int, tuple[int, ...]], ...] = ()  # paged: (rid, its physical blocks in order)
    fill: tuple[int, ...] = ()  # paged: tokens written per block
    cached: frozenset[int] = frozenset()  # paged: unreferenced named blocks
    segments: tuple[tuple[int, int, int, int], ...] = ()  # contiguous: (rid, start, size, tokens written)

    def cells(self) -> tuple[Cell, ...]:
        return self._contiguous_cells() if self.segments or not self.fill else self._paged_cells()

    def _paged_cells(self) -> tuple[Cell, ...]:
        owners: dict[int, list[int]] = {}
        for rid, table in self.tables:
            for b in table:
                owners.setdefault(b, []).append(rid)
        return tuple(Cell(tuple(sorted(owners.get(b, ()))), self.fill[b], b in self.cached) for b in range(self.num_cells))

    def _contiguous_cells(self) -> tuple[Cell, ...]:
        b, n = self.block_size, self.num_cells
        owner = np.full(n * b, -1, dtype=np.int64)  # per slot: the reserving request
        written = np.zeros(n * b, dtype=bool)
        for rid, start, size, length in self.segments:
            owner[start : min(start + size, n * b)] = rid
            written[start : min(start + length, n * b)] = True
        o = owner.reshape(n, b)  # (cells, slots)
        # a stretch may straddle reservations (contiguous runs): draw the one holding most of it,
        # among the owners of its first, middle and last slot
        cand = o[:, [0, b // 2, b - 1]]  # (cells, 3)
        counts = (o[:, None, :] == cand[:, :, None]).sum(-1) * (cand >= 0)  # (cells, 3)
        rid = cand[np.arange(n), counts.argmax(1)]
        fills = written.reshape(n, b).sum(1)
        return tuple(Cell((int(r),) if r >= 0 else (), int(f)) for r, f in zip(rid, fills))


# -- allocators -------------------------------------------------------------------------------
class ContiguousAllocator:
    """One contiguous reservation of prompt + max_new_tokens slots per request, first fit in an arena."""

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

    def can_admit(self, req: PromptRequest, length: int, reserve: int) -> bool:
        return any(size >= reserve for _, size in self._holes())

    def admit(self, req: PromptRequest, length: int, reserve: int) -> int:
        """Reserve `reserve` slots and write `length`; returns the prompt tokens found cached (none here)."""
        for start, size in self._holes():
            if size >= reserve:
                self.segments[req.rid] = (start, reserve)
                self.lens[req.rid] = length
                return 0
        raise MemoryError(f"no hole of {reserve} slots")

    def grow(self, rid: int, new_len: int) -> bool:
        # the reservation covers the whole cap: growing never needs memory
        if new_len > self.segments[rid][1]:
            raise InvariantError(f"request {rid} grew past its reservation")
        self.lens[rid] = new_len
        return True

    def release(self, rid: int) -> None:
        del self.segments[rid]
        del self.lens[rid]

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
            out["picture"] = BlockPicture(self.capacity // self.block_size, self.block_size, segments=tuple(
                (rid, start, size, self.lens[rid]) for rid, (start, size) in self.segments.items()))
        return out

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
        self.used = 0  # tokens written in held blocks (kept as blocks change hands; check() recounts)
        self.names: dict[int, list[bytes]] = {}  # rid -> its prompt's block names
        self.prefix_hit_tokens = 0
        self.evictions = 0

    # allocation
    def available(self) -> int:
        """Blocks a new need can take: free ones and cached ones nobody holds (evictable)."""
        return len(self.free) + len(self.lru)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def _take(self) -> int:
        if self.free:
            return heapq.heappop(self.free)
        block, _ = self.lru.popitem(last=False)  # evict the least recently used cached block
        del self.block_of[self.hash_of.pop(block)]
        self.fill[block] = 0
        self.evictions += 1
        return block

    def _names(self, req: PromptRequest) -> list[bytes]:
        """The prompt's block names, hashed once per request (the queue's head is asked every step)."""
        if req.rid not in self.names:
            self.names[req.rid] = block_hashes(req.prompt, self.block_size)
        return self.names[req.rid]

    def _plan(self, req: PromptRequest) -> tuple[list[bytes], list[int | None]]:
        """Names of the prompt's full blocks and, per name, the cached block it hits (or None)."""
        names = self._names(req) if self.sharing else []
        hits: list[int | None] = []
        for h in names:  # a miss breaks the chain: later blocks cannot be hit (their parent differs)
            hit = self.block_of.get(h)
            if hit is None:
                break
            hits.append(hit)
        return names, hits + [None] * (len(names) - len(hits))

    def blocks_needed(self, req: PromptRequest, length: int) -> int:
        """Blocks admitting `req` with `length` tokens takes from `available()`."""
        _, hits = self._plan(req)
        new = self.blocks_for(length) - sum(h is not None for h in hits)
        # hit blocks that sit in the LRU are about to be reused: they cannot also be evicted
        revived = sum(1 for h in hits if h is not None and h in self.lru)
        return new + revived

    def can_admit(self, req: PromptRequest, length: int, reserve: int = 0) -> bool:
        return self.blocks_needed(req, length) <= self.available()

    def admit(self, req: PromptRequest, length: int, reserve: int = 0) -> int:
        """Give `req` blocks for `length` tokens (its prompt, plus tokens it had made when it comes
        back); returns the prompt tokens found cached, which need no prefill (or no copy)."""
        if not self.can_admit(req, length):
            raise MemoryError("not enough free blocks")
        names, hits = self._plan(req)
        table: list[int] = []
        hit_tokens = 0
        for h, hit in zip(names, hits):
            if hit is not None:  # the same prefix is cached: share it
                if self.refcount[hit] == 0:  # revived from the cache: its tokens count as held again
                    self.lru.pop(hit)
                    self.used += self.fill[hit]
                self.refcount[hit] += 1
                hit_tokens += self.block_size
                table.append(hit)
            else:
                b = self._take()
                self.refcount[b] = 1
                self.fill[b] = self.block_size
                self.used += self.block_size
                self.hash_of[b], self.block_of[h] = h, b
                table.append(b)
        # the rest (all of it without sharing; else the partial tail and generated tokens) is private
        for i in range(len(names), self.blocks_for(length)):
            b = self._take()
            self.refcount[b] = 1
            self.fill[b] = min(self.block_size, length - i * self.block_size)
            self.used += self.fill[b]
            table.append(b)
        self.tables[req.rid] = table
        self.lens[req.rid] = length
        self.prefix_hit_tokens += hit_tokens
        return hit_tokens

    def grow(self, rid: int, new_len: int) -> bool:
        table = self.tables[rid]
        if new_len > len(table) * self.block_size:
            if not self.available():
                return False
            table.append(self._take())
            self.refcount[table[-1]] = 1
            self.fill[table[-1]] = 0
        last = table[-1]
        if self.refcount[last] > 1:
            # never happens: only full blocks are shared, so the block written into is private
            raise InvariantError(f"request {rid} would write into shared block {last}")
        fill = new_len - (len(table) - 1) * self.block_size
        self.used += fill - self.fill[last]
        self.fill[last] = fill
        self.lens[rid] = new_len
        return True

    def release(self, rid: int) -> None:
        # newest block first, as vLLM does: a prompt's tail is then evicted before its head,
        # which more requests share
        for b in reversed(self.tables.pop(rid)):
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self.used -= self.fill[b]
                if b in self.hash_of:
                    self.lru[b] = None  # keep the content for future prefix hits
                else:
                    self.fill[b] = 0
                    heapq.heappush(self.free, b)
        del self.lens[rid]

    # accounting
    def snapshot_fields(self, with_cells: bool) -> dict[str, Any]:
        held = self.num_blocks - len(self.free) - len(self.lru)  # every block is free, cached or held
        reserved = held * self.block_size
        out: dict[str, Any] = dict(
            used_tokens=self.used, logical_tokens=sum(self.lens.values()), reserved_tokens=reserved,
            internal_frag_tokens=reserved - self.used, external_frag_tokens=0,
            free_tokens=len(self.free) * self.block_size, cached_tokens=len(self.lru) * self.block_size,
        )
        if with_cells:
            out["picture"] = BlockPicture(self.num_blocks, self.block_size,
                                          tuple((rid, tuple(t)) for rid, t in self.tables.items()),
                                          tuple(self.fill), frozenset(self.lru))
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
            if len(table) != self.blocks_for(self.lens[rid]):
                raise InvariantError(f"request {rid} holds {len(table)} blocks for {self.lens[rid]} tokens")
        if self.used != sum(self.fill[b] for b in held):
            raise InvariantError("the count of written tokens drifted from the blocks' fill")
