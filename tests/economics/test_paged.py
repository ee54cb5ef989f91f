"""The serving-cache simulator: allocator invariants, sharing, freeing, eviction, admission,
preemption by recompute and by swap, chunked prefill, time to first token, the step limit, and
the scenarios' before/after stories."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvviz.economics.blocks import ContiguousAllocator, InvariantError, PagedAllocator, block_hashes
from kvviz.economics.paged import (
    SCENARIOS,
    Request,
    Server,
    StepCost,
    Workload,
    compare,
    requests_that_fit,
    simulate,
    summary_table,
    three_allocators,
)

SYSTEM = tuple(range(1000, 1064))  # a 64-token shared system prompt = 4 blocks of 16
COST = StepCost(fixed_ms=10.0, prefill_ms_per_token=0.1, decode_ms_per_request=1.0, pcie_gb_per_s=1.0)


def _req(rid: int, user: tuple[int, ...], out: int = 8, arrival: float = 0, system: tuple[int, ...] = SYSTEM,
         max_new: int = 32) -> Request:
    return Request(rid, arrival, system + user, out, max_new_tokens=max_new, system_prompt=0 if system else -1)


def _pressure(seed: int) -> tuple[Request, ...]:
    return Workload(n_requests=30, system_prompt_tokens=100, n_system_prompts=2, shared_fraction=0.7,
                    long_output_fraction=0.3, long_output_tokens=(200, 400), max_new_tokens=400, arrival_rate=50.0,
                    seed=seed).requests()


def test_block_names_chain_on_the_whole_prefix():
    a = block_hashes(tuple(range(48)), 16)
    b = block_hashes((99, *range(1, 48)), 16)  # only the very first token differs
    assert len(a) == 3 and len(set(a)) == 3
    assert all(x != y for x, y in zip(a, b))  # a changed prefix renames every later block
    assert block_hashes(tuple(range(40)), 16) == a[:2]  # the partial tail block has no name


SERVERS = {
    "contiguous": Server(1200, "contiguous"),
    "paged": Server(1200),
    "prefix": Server(1200, prefix_sharing=True),
    "reserve": Server(1200, reserve="max_new_tokens"),
    "swap": Server(1200, prefix_sharing=True, preemption="swap", swap_space_tokens=2000),
    "swap, little CPU memory": Server(1200, preemption="swap", swap_space_tokens=300),
    "chunked": Server(1200, prefix_sharing=True, chunked_prefill=True, max_batched_tokens=64),
    "capped": Server(1200, max_new_tokens_cap=100, max_running=5),
}


@pytest.mark.parametrize("name", list(SERVERS))
@pytest.mark.parametrize("seed", [0, 1])
def test_invariants_hold_at_every_step_under_pressure(name, seed):
    """Small budget: admissions, growth, preemption, swapping, eviction; checked after every step."""
    server = SERVERS[name]
    r = simulate(_pressure(seed), server, bytes_per_token=100, check=True)
    assert len(r.finished) + len(r.rejected) == 30 and not r.stopped_at_limit
    for s in r.snapshots:
        assert s.used_tokens <= s.reserved_tokens <= r.budget_tokens
        assert s.internal_frag_tokens == s.reserved_tokens - s.used_tokens
        assert s.reserved_tokens + s.free_tokens + s.cached_tokens == r.budget_tokens  # nothing leaks (75 x 16)
        assert len(s.running) <= server.max_running
        assert s.swap_tokens <= server.swap_space_tokens
    assert [s.time_ms for s in r.snapshots] == sorted(s.time_ms for s in r.snapshots)
    for rec in r.finished:  # every finished request made its tokens, within its cap
        assert rec.tokens == min(_pressure(seed)[rec.rid].output_len, server.cap(_pressure(seed)[rec.rid]))
        assert rec.arrival <= rec.admitted <= rec.first_token <= rec.finished


def test_shared_prefix_is_stored_once_with_the_right_reference_counts():
    alloc = PagedAllocator(num_blocks=64, block_size=16, prefix_sharing=True)
    users = [(1, 2, 3), tuple(range(20)), (7,) * 16]
    for rid, user in enumerate(users):
        req = _req(rid, user)
        alloc.admit(req, req.prompt_len)
        alloc.check()
    system_blocks = alloc.tables[0][:4]
    assert all(alloc.tables[r][:4] == system_blocks for r in range(3))  # the same physical blocks
    assert [alloc.refcount[b] for b in system_blocks] == [3, 3, 3, 3]
    assert alloc.prefix_hit_tokens == 2 * 64  # requests 1 and 2 found the 64 system tokens cached
    f = alloc.snapshot_fields(with_cells=True)
    assert f["logical_tokens"] - f["used_tokens"] == 2 * 64  # stored once, used three times
    assert sum(c.owners == (0, 1, 2) for c in f["picture"].cells()) == 4
    # request 2's user part is a full block of its own: named, but nobody shares it
    assert alloc.refcount[alloc.tables[2][4]] == 1


def test_without_sharing_the_prefix_is_stored_per_request():
    alloc = PagedAllocator(num_blocks=64, block_size=16, prefix_sharing=False)
    for rid in range(3):
        req = _req(rid, (rid,))
        alloc.admit(req, req.prompt_len)
    assert len({b for t in alloc.tables.values() for b in t}) == 3 * 5  # 4 system + 1 tail block each
    assert all(alloc.refcount[b] == 1 for t in alloc.tables.values() for b in t)


def test_freed_memory_returns():
    reqs = Workload(n_requests=20, arrival_rate=100.0, seed=3).requests()
    for label, r in compare(reqs, three_allocators(4096)).items():
        last = r.snapshots[-1]
        assert last.running == () and last.reserved_tokens == last.used_tokens == 0
        if "prefix" in label:  # named blocks stay cached, reclaimable
            assert last.free_tokens + last.cached_tokens == 4096 and last.cached_tokens > 0
        else:
            assert last.free_tokens == 4096


def test_a_cached_prefix_survives_its_users_and_is_evicted_lru_tail_first():
    alloc = PagedAllocator(num_blocks=6, block_size=16, prefix_sharing=True)

    def admit(req: Request) -> None:
        alloc.admit(req, req.prompt_len)

    admit(_req(0, tuple(range(32)), system=()))  # 2 full named blocks: 0, 1
    alloc.release(0)
    assert list(alloc.lru) == [1, 0] and alloc.free == [2, 3, 4, 5]  # tail block first in line
    admit(_req(1, tuple(range(32)), system=()))  # the same prompt: both blocks hit, none taken
    assert alloc.tables[1] == [0, 1] and alloc.prefix_hit_tokens == 32 and not alloc.lru
    alloc.release(1)
    admit(_req(2, tuple(range(500, 580)), system=()))  # 5 new blocks: 4 free + 1 evicted
    assert alloc.evictions == 1 and list(alloc.lru) == [0]  # block 1 (the tail) went first
    alloc.check()
    req = _req(3, tuple(range(900, 940)), system=())
    assert not alloc.can_admit(req, req.prompt_len)  # 3 blocks, 1 reclaimable


def test_contiguous_wastes_the_unused_reservation_and_leaves_holes():
    alloc = ContiguousAllocator(capacity_tokens=1000, block_size=16)
    reqs = [_req(0, (1,) * 10), _req(1, (2,) * 50), _req(2, (3,) * 5)]
    for r in reqs:
        alloc.admit(r, r.prompt_len, r.max_len)
    alloc.grow(1, reqs[1].prompt_len + 7)
    f = alloc.snapshot_fields(with_cells=False)
    lens = [reqs[0].prompt_len, reqs[1].prompt_len + 7, reqs[2].prompt_len]
    assert f["internal_frag_tokens"] == sum(r.max_len - n for r, n in zip(reqs, lens))
    alloc.release(1)  # a hole in the middle
    f = alloc.snapshot_fields(with_cells=True)
    assert f["external_frag_tokens"] == reqs[1].max_len  # free, but not in the largest hole
    cells = f["picture"].cells()
    assert len(cells) == 1000 // 16 and cells[0].owners == (0,) and cells[-1].owners == ()
    alloc.check()


def test_paged_waste_is_less_than_one_block_per_request():
    r = simulate(Workload(n_requests=25, seed=5, arrival_rate=50.0).requests(), Server(8192))
    assert all(s.internal_frag_tokens < 16 * max(1, len(s.running)) for s in r.snapshots)
    assert all(s.external_frag_tokens == 0 for s in r.snapshots)


def test_requests_that_fit_by_hand():
    # 4096 tokens = 256 blocks of 16; request = 320 prompt (256 shared) + 64 out, max_new 128
    assert requests_that_fit(4096, 16, 320, 64, 128, shared_len=256) == {
        "contiguous": 4096 // 448,  # 9: each reserves 320 + 128
        "paged": 256 // math.ceil(384 / 16),  # 10: 24 blocks each
        "prefix": (256 - 16) // (24 - 16),  # 30: 16 shared blocks once, 8 private each
    }
    with pytest.raises(ValueError):
        requests_that_fit(4096, 16, 10, 5, 5, shared_len=11)


def test_contiguous_simulation_fits_budget_over_max_len():
    reqs = tuple(_req(i, (i,) * 16, out=10) for i in range(12))  # max_len = 80 + 32 = 112
    r = simulate(reqs, Server(1000, "contiguous"), check=True)
    assert r.peak_running == 1000 // 112


def test_sharing_fits_more_and_finishes_sooner():
    reqs = Workload(n_requests=40, system_prompt_tokens=256, arrival_rate=100.0, seed=0).requests()
    res = compare(reqs, three_allocators(3072), cells=False)
    c, p, s = (res[k] for k in ("contiguous", "paged", "paged + prefix sharing"))
    assert s.peak_running > p.peak_running >= c.peak_running
    assert s.snapshots[-1].time_ms < c.snapshots[-1].time_ms
    assert s.snapshots[-1].prefix_hit_tokens >= 39 * 256 * 0.5


def test_deterministic_for_a_stream():
    a = simulate(Workload(seed=7).requests(), Server(2048, prefix_sharing=True))
    b = simulate(Workload(seed=7).requests(), Server(2048, prefix_sharing=True))
    c = simulate(Workload(seed=8).requests(), Server(2048, prefix_sharing=True))
    assert a.snapshots == b.snapshots and a.summary() == b.summary()
    assert a.snapshots != c.snapshots


def test_a_request_larger_than_the_budget_is_rejected_not_hung():
    reqs = (_req(0, (1,) * 400), _req(1, (2,)))
    r = simulate(reqs, Server(256), check=True)
    assert r.rejected == (0,) and [x.rid for x in r.finished] == [1]
    assert "1 rejected" in r.done_line()


def test_bad_parameters_say_what_to_fix():
    with pytest.raises(ValueError, match="smaller than one block"):
        Server(8, block_size=16)
    with pytest.raises(ValueError, match="unknown allocator"):
        Server(1024, "buddy")
    with pytest.raises(ValueError, match="prefix sharing needs the paged"):
        Server(1024, "contiguous", prefix_sharing=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Workload(output_tokens=(10, 500), max_new_tokens=128)
    with pytest.raises(ValueError, match="output_len"):
        Request(0, 0.0, (1, 2), 0, 5)
    with pytest.raises(ValueError, match="at least one token"):
        Request(0, 0.0, (), 3, 5)
    with pytest.raises(ValueError, match="unique"):
        simulate((_req(0, (1,)), _req(0, (2,))), Server(1024))


def test_check_catches_a_corrupted_refcount_and_a_drifted_count():
    alloc = PagedAllocator(num_blocks=8, block_size=16, prefix_sharing=True)
    req = _req(0, (1, 2))
    alloc.admit(req, req.prompt_len)
    alloc.refcount[alloc.tables[0][0]] += 1
    with pytest.raises(InvariantError, match="reference counts"):
        alloc.check()
    alloc.refcount[alloc.tables[0][0]] -= 1
    alloc.used += 1
    with pytest.raises(InvariantError, match="written tokens"):
        alloc.check()


# -- requests from real runs --------------------------------------------------------------------
def test_real_token_ids_replay_and_share_their_common_prefix():
    """The input issue 14 feeds: each request's prompt ids and generated ids."""
    system = list(range(5, 69))  # 64 tokens = 4 full blocks
    reqs = [Request.from_ids(i, system + [100 + i] * 5, [7] * (3 + i), arrival_ms=10.0 * i) for i in range(4)]
    assert reqs[2].output_len == 5 and reqs[2].max_new_tokens == 5 and reqs[2].arrival == 20.0
    r = simulate(reqs, Server(1024, prefix_sharing=True), check=True)
    assert [x.tokens for x in r.finished] == [3, 4, 5, 6]
    assert r.snapshots[-1].prefix_hit_tokens == 3 * 64  # the three later requests found the system prompt


# -- time, admission, preemption ----------------------------------------------------------------
def test_time_to_first_token_and_stalls_follow_the_step_cost():
    """One request alone: its prefill step makes the first token; each decode step one more."""
    r = simulate((_req(0, (1,) * 36, out=4),), Server(1024, cost=COST))  # 100-token prompt
    rec = r.records[0]
    assert rec.ttft_ms == pytest.approx(10 + 0.1 * 100)  # fixed + prefill
    assert rec.finished == pytest.approx(20 + 3 * (10 + 1.0))  # + three decode steps of one request
    assert rec.longest_stall_ms == pytest.approx(11.0) and r.steps == 4


def test_whole_prompt_prefill_freezes_running_requests_and_chunking_does_not():
    """A 2,000-token prompt arrives while a chat decodes: without chunking the chat waits for its
    whole prefill (fixed + 2,000 x 0.1 ms) and then its own decode step (with the document's first
    decode beside it); with chunks of 256 tokens it waits one short step at most."""
    chat = _req(0, (1,), out=40, system=(), max_new=64)
    doc = _req(1, tuple(range(2000)), out=2, arrival=30.0, system=(), max_new=32)
    whole = simulate((chat, doc), Server(4096, max_batched_tokens=4096, cost=COST))
    chunked = simulate((chat, doc), Server(4096, chunked_prefill=True, max_batched_tokens=256, cost=COST))
    stall = {name: r.records[0].longest_stall_ms for name, r in (("whole", whole), ("chunked", chunked))}
    assert stall["whole"] == pytest.approx((10 + 0.1 * 2000) + (10 + 2 * 1.0))
    assert stall["chunked"] == pytest.approx(10 + 1.0 + 0.1 * 255)  # its own token + a 255-token chunk
    assert chunked.records[1].ttft_ms > whole.records[1].ttft_ms  # the document waits longer instead
    assert max(s.prefill_tokens + s.decode_tokens for s in chunked.snapshots) <= 256


def test_recompute_prefills_prompt_and_output_again():
    """3 blocks of 16, two requests of 16 prompt tokens: after one token each, A needs a second
    block; the only free one goes to it and B (the newest) is preempted. B comes back when A is
    done and prefills its prompt and its one token again: 17 tokens."""
    a = _req(0, (1,) * 16, out=20, system=(), max_new=20)
    b = _req(1, (2,) * 16, out=20, system=(), max_new=20)
    r = simulate((a, b), Server(48, cost=COST), check=True)
    assert r.recomputed_tokens == 17 and r.snapshots[-1].preemptions == 1
    assert [x.preemptions for x in r.records] == [0, 1]
    assert r.records[1].finished > r.records[0].finished and r.records[1].tokens == 20


def test_swap_copies_instead_of_recomputing_and_falls_back_when_cpu_memory_is_full():
    reqs = _pressure(0)
    swap = simulate(reqs, Server(1200, preemption="swap", swap_space_tokens=4000), bytes_per_token=1000, check=True)
    last = swap.snapshots[-1]
    assert last.preemptions == last.swaps > 0 and swap.recomputed_tokens == 0
    assert swap.swapped_bytes > 0 and swap.swapped_bytes % (2 * 1000) == 0  # every byte out came back in
    assert any(s.step_ms > COST.fixed_ms for s in swap.snapshots)
    none = simulate(reqs, Server(1200, preemption="swap", swap_space_tokens=10), bytes_per_token=1000)
    assert none.snapshots[-1].swaps == 0 and none.recomputed_tokens > 0  # no room on the CPU: recompute


def test_reserving_max_new_tokens_never_preempts():
    reqs = _pressure(1)
    optimistic = simulate(reqs, Server(1200))
    reserved = simulate(reqs, Server(1200, reserve="max_new_tokens"), check=True)
    assert optimistic.snapshots[-1].preemptions > 0 and reserved.snapshots[-1].preemptions == 0
    assert reserved.peak_running < optimistic.peak_running


def test_the_cap_truncates_and_max_running_limits():
    reqs = _pressure(0)
    r = simulate(reqs, Server(1200, max_new_tokens_cap=50, max_running=3))
    assert r.peak_running == 3
    assert r.summary()["truncated by the cap"] == sum(q.output_len > 50 for q in reqs) > 0
    assert max(x.tokens for x in r.finished) == 50


def test_the_step_limit_is_reported_not_called_finished():
    """Issue 15 item 5: 500 requests reported 'finished all in 5000 steps' with 395 of 500 done."""
    reqs = Workload(n_requests=500, arrival_rate=200.0, seed=0).requests()
    r = simulate(reqs, Server(2048), max_steps=300, cells=False)
    assert r.stopped_at_limit and r.steps == 300
    assert len(r.finished) < 500
    assert r.done_line().startswith("stopped at the step limit (300 steps") and f"{len(r.finished)} of 500" in r.done_line()
    assert r.summary()["stopped at the step limit"] == "yes"
    full = simulate(reqs[:20], Server(2048), cells=False)
    assert not full.stopped_at_limit and full.done_line().startswith("finished 20 of 20")


@pytest.mark.parametrize("key", list(SCENARIOS))
def test_each_scenario_is_an_incident_its_fix_fixes(key):
    """The before run shows the incident and the fix improves every measure the scenario watches
    (lower is better for time, preemption and fragmentation; higher for capacity and hits)."""
    sc = SCENARIOS[key]
    res = compare(sc.workload.requests(), {"before": sc.before, "after": sc.fix}, cells=False)
    before, after = res["before"].summary(), res["after"].summary()
    assert not res["before"].stopped_at_limit and not res["after"].stopped_at_limit
    higher = {"peak running requests", "prefix hit tokens", "output tokens / s"}
    for measure in sc.watch:
        if key == "mixed_prompts" and measure.startswith("TTFT"):
            continue  # the honest price of chunking: long prompts wait a little longer
        if measure in higher:
            assert after[measure] >= before[measure], (key, measure)
        else:
            assert after[measure] < before[measure], (key, measure)


# -- the figures ------------------------------------------------------------------------------
def test_block_table_figure_frames_grid_and_shared_cells():
    from kvviz.figures import paged as fp

    res = compare(Workload(n_requests=12, arrival_rate=100.0, seed=2).requests(), three_allocators(1600))
    fig = fp.block_tables(res, max_frames=25, cols=16)
    assert len(fig.data) == 3 and all(t.type == "heatmap" for t in fig.data)
    assert len(fig.frames) == 25 and len(fig.layout.sliders[0].steps) == len(fig.frames)
    assert [b.label for b in fig.layout.updatemenus[0].buttons] == ["▶ Play", "❚❚ Pause"]
    for frame in fig.frames:
        for trace in frame.data:
            z = np.asarray(trace.z, dtype=float)
            assert z.shape == (math.ceil(100 / 16), 16)  # 1600 tokens = 100 blocks
            text = np.asarray(trace.text).astype(str)
            assert np.all((z == fp.SHARED_Z) == np.char.startswith(text, "×"))  # dark = shared, marked ×n
            assert np.all(((z == fp.FREE_Z) | np.isnan(z)) == (text == ""))  # faint = free
            assert np.isnan(z).sum() == 7 * 16 - 100  # only the last row's padding is not memory
            assert np.all((z == fp.CACHED_Z) == (text == "c"))
    shared = [(np.asarray(f.data[2].z, dtype=float) == fp.SHARED_Z).sum() for f in fig.frames]
    assert max(shared) == 256 // 16
    assert all((np.asarray(f.data[1].z, dtype=float) == fp.SHARED_Z).sum() == 0 for f in fig.frames)


def test_over_time_ttft_and_where_memory_goes():
    from kvviz.figures import paged as fp

    reqs = Workload(n_requests=10, seed=1).requests()
    res = compare(reqs, {"before": Server(2048), "after": Server(2048, prefix_sharing=True)}, bytes_per_token=1024,
                  cells=False)
    fig = fp.over_time(res)
    assert len(fig.data) == 12  # held, written, running, queued, preempted, swapped per run
    assert fig.data[0].y[0] == pytest.approx(res["before"].snapshots[0].reserved_tokens * 1024 / 2**20)
    assert fig.data[0].x[-1] == pytest.approx(res["before"].snapshots[-1].time_ms / 1000)
    assert "MiB held" in fig.layout.yaxis.title.text
    t = fp.ttft(res)
    assert [tr.name.split(" (")[0] for tr in t.data] == ["before", "after"]
    assert len(t.data[0].x) == 10 and list(t.data[0].y)[-1] == 100 and t.layout.xaxis.type == "log"
    where = fp.where_memory_goes(res)
    totals = np.sum([np.asarray(t.x) for t in where.data], axis=0)
    assert totals == pytest.approx([100, 100])
    long = simulate(Workload(n_requests=60, arrival_rate=5.0, seed=1).requests(), Server(2048), cells=False)
    thinned = fp.over_time({"x": long}, max_points=100)
    assert len(thinned.data[0].x) <= 102 and thinned.data[0].x[-1] == pytest.approx(long.snapshots[-1].time_ms / 1000)


def test_summary_table_has_a_column_per_run():
    res = compare(Workload(n_requests=8, seed=4).requests(), three_allocators(2048), cells=False)
    rows = summary_table(res)
    assert [r[""] for r in rows][:3] == ["finished", "of requests", "stopped at the step limit"]
    assert all(set(r) == {"", *res} for r in rows)
    assert rows[0]["paged + prefix sharing"] == 8
