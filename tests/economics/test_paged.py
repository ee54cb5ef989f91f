"""The serving-cache simulator: allocator invariants, sharing, freeing, eviction, fits-in-budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvviz.economics.paged import (
    STRATEGIES,
    ContiguousAllocator,
    InvariantError,
    PagedAllocator,
    Request,
    Workload,
    block_hashes,
    compare,
    requests_that_fit,
    simulate,
    summary_table,
)

SYSTEM = tuple(range(1000, 1064))  # a 64-token shared system prompt = 4 blocks of 16


def _req(rid: int, user: tuple[int, ...], out: int = 8, arrival: int = 0, system: tuple[int, ...] = SYSTEM) -> Request:
    return Request(rid, arrival, system + user, out, max_new_tokens=32, system_prompt=0 if system else -1)


def test_block_names_chain_on_the_whole_prefix():
    a = block_hashes(tuple(range(48)), 16)
    b = block_hashes((99, *range(1, 48)), 16)  # only the very first token differs
    assert len(a) == 3 and len(set(a)) == 3
    assert all(x != y for x, y in zip(a, b))  # a changed prefix renames every later block
    assert block_hashes(tuple(range(40)), 16) == a[:2]  # the partial tail block has no name


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("seed", [0, 1])
def test_invariants_hold_at_every_step_under_pressure(strategy, seed):
    """Small budget: admissions, growth, preemption, eviction; checked after every step."""
    w = Workload(n_requests=30, system_prompt_tokens=100, n_system_prompts=2, shared_fraction=0.7,
                 arrival_rate=2.0, seed=seed)
    r = simulate(w.requests(), strategy, budget_tokens=1200, block_size=16, check=True)
    assert len(r.finished_at) + len(r.rejected) == 30
    for s in r.snapshots:
        assert s.used_tokens <= s.reserved_tokens <= r.budget_tokens
        assert s.internal_frag_tokens == s.reserved_tokens - s.used_tokens
        assert s.reserved_tokens + s.free_tokens + s.cached_tokens == r.budget_tokens  # nothing leaks (1200 = 75 x 16)


def test_shared_prefix_is_stored_once_with_the_right_reference_counts():
    alloc = PagedAllocator(num_blocks=64, block_size=16, prefix_sharing=True)
    users = [(1, 2, 3), tuple(range(20)), (7,) * 16]
    for rid, user in enumerate(users):
        alloc.admit(_req(rid, user))
        alloc.check()
    system_blocks = alloc.tables[0][:4]
    assert all(alloc.tables[r][:4] == system_blocks for r in range(3))  # the same physical blocks
    assert [alloc.refcount[b] for b in system_blocks] == [3, 3, 3, 3]
    assert alloc.prefix_hit_tokens == 2 * 64  # requests 1 and 2 found the 64 system tokens cached
    f = alloc.snapshot_fields(with_cells=True)
    assert f["logical_tokens"] - f["used_tokens"] == 2 * 64  # stored once, used three times
    assert sum(c.owners == (0, 1, 2) for c in f["cells"]) == 4
    # request 2's user part is a full block of its own: named, but nobody shares it
    assert alloc.refcount[alloc.tables[2][4]] == 1


def test_without_sharing_the_prefix_is_stored_per_request():
    alloc = PagedAllocator(num_blocks=64, block_size=16, prefix_sharing=False)
    for rid in range(3):
        alloc.admit(_req(rid, (rid,)))
    assert len({b for t in alloc.tables.values() for b in t}) == 3 * 5  # 4 system + 1 tail block each
    assert all(alloc.refcount[b] == 1 for t in alloc.tables.values() for b in t)


def test_freed_memory_returns():
    w = Workload(n_requests=20, arrival_rate=3.0, seed=3)
    for strategy, r in compare(w, budget_tokens=4096, block_size=16).items():
        last = r.snapshots[-1]
        assert last.running == () and last.reserved_tokens == last.used_tokens == 0
        if strategy == "prefix":  # named blocks stay cached, reclaimable
            assert last.free_tokens + last.cached_tokens == 4096 and last.cached_tokens > 0
        else:
            assert last.free_tokens == 4096


def test_a_cached_prefix_survives_its_users_and_is_evicted_lru_tail_first():
    alloc = PagedAllocator(num_blocks=6, block_size=16, prefix_sharing=True)
    alloc.admit(_req(0, tuple(range(32)), system=()))  # 2 full named blocks: 0, 1
    alloc.release(0)
    assert list(alloc.lru) == [1, 0] and alloc.free == [2, 3, 4, 5]  # tail block first in line
    alloc.admit(_req(1, tuple(range(32)), system=()))  # the same prompt: both blocks hit, none taken
    assert alloc.tables[1] == [0, 1] and alloc.prefix_hit_tokens == 32 and not alloc.lru
    alloc.release(1)
    alloc.admit(_req(2, tuple(range(500, 580)), system=()))  # 5 new blocks: 4 free + 1 evicted
    assert alloc.evictions == 1 and list(alloc.lru) == [0]  # block 1 (the tail) went first
    alloc.check()
    assert not alloc.can_admit(_req(3, tuple(range(900, 940)), system=()))  # 3 blocks, 1 reclaimable


def test_contiguous_wastes_max_len_minus_len_per_request():
    alloc = ContiguousAllocator(capacity_tokens=1000, block_size=16)
    reqs = [_req(0, (1,) * 10), _req(1, (2,) * 50), _req(2, (3,) * 5)]
    for r in reqs:
        alloc.admit(r)
    alloc.grow(1, reqs[1].prompt_len + 7)
    f = alloc.snapshot_fields(with_cells=False)
    lens = [reqs[0].prompt_len, reqs[1].prompt_len + 7, reqs[2].prompt_len]
    assert f["internal_frag_tokens"] == sum(r.max_len - n for r, n in zip(reqs, lens))
    alloc.release(1)  # a hole in the middle
    f = alloc.snapshot_fields(with_cells=False)
    assert f["external_frag_tokens"] == reqs[1].max_len  # free, but not in the largest hole
    alloc.check()


def test_paged_waste_is_less_than_one_block_per_request():
    w = Workload(n_requests=25, seed=5, arrival_rate=2.0)
    r = simulate(w.requests(), "paged", 8192, block_size=16)
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
    r = simulate(reqs, "contiguous", budget_tokens=1000, block_size=16, check=True)
    assert r.peak_running == 1000 // 112


def test_sharing_fits_more_and_finishes_sooner():
    w = Workload(n_requests=40, system_prompt_tokens=256, arrival_rate=2.0, seed=0)
    res = compare(w, budget_tokens=3072, block_size=16, cells=False)
    assert res["prefix"].peak_running > res["paged"].peak_running >= res["contiguous"].peak_running
    assert res["prefix"].steps < res["contiguous"].steps
    assert res["prefix"].snapshots[-1].prefix_hit_tokens >= 39 * 256 * 0.5


def test_deterministic_for_a_seed():
    a = simulate(Workload(seed=7).requests(), "prefix", 2048, cells=True)
    b = simulate(Workload(seed=7).requests(), "prefix", 2048, cells=True)
    c = simulate(Workload(seed=8).requests(), "prefix", 2048, cells=True)
    assert a.snapshots == b.snapshots and a.summary() == b.summary()
    assert a.snapshots != c.snapshots


def test_a_request_larger_than_the_budget_is_rejected_not_hung():
    reqs = (_req(0, (1,) * 400), _req(1, (2,)))
    r = simulate(reqs, "paged", budget_tokens=256, block_size=16, check=True)
    assert r.rejected == (0,) and list(r.finished_at) == [1]


def test_bad_parameters_say_what_to_fix():
    with pytest.raises(ValueError, match="smaller than one block"):
        simulate(Workload().requests(), "paged", budget_tokens=8, block_size=16)
    with pytest.raises(ValueError, match="unknown strategy"):
        simulate(Workload().requests(), "buddy", budget_tokens=1024)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Workload(output_tokens=(10, 500), max_new_tokens=128)


def test_check_catches_a_corrupted_refcount():
    alloc = PagedAllocator(num_blocks=8, block_size=16, prefix_sharing=True)
    alloc.admit(_req(0, (1, 2)))
    alloc.refcount[alloc.tables[0][0]] += 1
    with pytest.raises(InvariantError, match="reference counts"):
        alloc.check()


# -- the figures ------------------------------------------------------------------------------
def test_block_table_figure_frames_grid_and_shared_cells():
    from kvviz.figures import paged as fp

    res = compare(Workload(n_requests=12, arrival_rate=2.0, seed=2), budget_tokens=1600, block_size=16)
    fig = fp.block_tables(res, max_frames=25, cols=16)
    assert len(fig.data) == 3 and all(t.type == "heatmap" for t in fig.data)
    assert len(fig.frames) <= 25 and len(fig.layout.sliders[0].steps) == len(fig.frames)
    assert [b.label for b in fig.layout.updatemenus[0].buttons] == ["▶ Play", "❚❚ Pause"]
    for frame in fig.frames:
        for trace in frame.data:
            z = np.asarray(trace.z, dtype=float)
            assert z.shape == (math.ceil(100 / 16), 16)  # 1600 tokens = 100 blocks
            text = np.asarray(trace.text)
            assert np.all((z == 1) == np.char.startswith(text.astype(str), "×"))  # dark = shared, marked ×n
            assert np.all(np.isnan(z) == (text == ""))  # blank = free
    shared = [(np.asarray(f.data[2].z, dtype=float) == 1).sum() for f in fig.frames]
    assert max(shared) == 256 // 16 and all((np.asarray(f.data[1].z, dtype=float) == 1).sum() == 0 for f in fig.frames)


def test_memory_figures_traces_and_shares():
    from kvviz.figures import paged as fp

    res = compare(Workload(n_requests=10, seed=1), budget_tokens=2048, block_size=16, bytes_per_token=1024, cells=False)
    fig = fp.memory_over_time(res)
    assert len(fig.data) == 9  # held, written, running per strategy
    assert fig.data[0].y[0] == pytest.approx(res["contiguous"].snapshots[0].reserved_tokens * 1024 / 2**20)
    assert "MiB held" in fig.layout.yaxis.title.text
    where = fp.where_memory_goes(res)
    totals = np.sum([np.asarray(t.x) for t in where.data], axis=0)
    assert totals == pytest.approx([100, 100, 100])


def test_summary_table_has_a_column_per_strategy():
    res = compare(Workload(n_requests=8, seed=4), budget_tokens=2048, cells=False)
    rows = summary_table(res)
    assert [r[""] for r in rows][:2] == ["finished", "steps to finish all"]
    assert all(set(r) == {"", *STRATEGIES.values()} for r in rows)
    assert rows[0][STRATEGIES["prefix"]] == 8
