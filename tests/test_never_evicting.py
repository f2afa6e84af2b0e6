"""advisor.sim.fast.events.run_never_evicting: concurrent mode's infinite cache in a pool sized by
what the run holds at once, against the readable reference (events.run_concurrent over
cache.PrefixCache(None)) and against the compiled loop in a pool of every block the log allocates.

The property runs every first pool from the largest request up, so a first pool that is too
small (duplicate copies under chunked prefill, requests that skip the cache read, an EAGLE
drafter's dropped block) must be caught and redone; the story tests count a case by hand.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor.sim import cache as refcache
from advisor.sim import events
from advisor.sim.configuration import SimulateOptions, TraceHashes, simulate_one
from advisor.sim.fast.events import (
    num_hash_ids,
    request_hashes,
    run_concurrent_compiled,
    run_never_evicting,
)
from advisor.workload import Workload
from tests.test_fastevents import FLAT, assert_same, trace_of, workloads

B = 4
CASES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def runs(reqs: list[list[int]], outs: list[int], arrivals: list[float], first_pool: int | None, **kw: object
         ) -> tuple[events.ConcurrentResult, events.ConcurrentResult, events.ConcurrentResult, int]:
    """(reference with an infinite cache, compiled in the whole-log pool, run_never_evicting, that pool)."""
    trace = trace_of(reqs)
    lengths = np.asarray([len(r) for r in reqs], np.int64)
    out_arr, arr = np.asarray(outs, np.int64), np.asarray(arrivals, np.float64)
    flags = kw.pop("skip_prefix_cache", None)
    flags = None if flags is None else np.asarray(flags, bool)
    spec = kw.get("speculative")
    ref = events.run_concurrent(refcache.PrefixCache(None, B, speculative=spec), TraceHashes(trace), lengths,  # type: ignore[arg-type]
                                out_arr, arr, FLAT, kw["max_num_seqs"], max_num_batched_tokens=kw.get("budget"),  # type: ignore[arg-type]
                                async_scheduling=bool(kw.get("async_scheduling")), skip_prefix_cache=flags)
    _, _, boff = request_hashes(trace, lengths, out_arr, trace.num_ids)
    whole = 1 + int(boff[-1])
    common = dict(max_num_batched_tokens=kw.get("budget"), async_scheduling=bool(kw.get("async_scheduling")),
                  skip_prefix_cache=flags, speculative=spec)
    big = run_concurrent_compiled(trace, whole, lengths, out_arr, arr, FLAT, kw["max_num_seqs"], **common)  # type: ignore[arg-type]
    got = run_never_evicting(trace, lengths, out_arr, arr, FLAT, kw["max_num_seqs"], first_pool=first_pool,  # type: ignore[arg-type]
                             **common)  # type: ignore[arg-type]
    return ref, big, got, whole


@CASES
@given(workloads(), st.integers(1, 6), st.sampled_from([None, 1, 3, 9, 40]), st.booleans(),
       st.sampled_from([None, "eagle"]), st.integers(0, 60), st.randoms(use_true_random=False))
def test_any_first_pool_gives_the_infinite_run(w: tuple[list[list[int]], list[int], list[float]], max_num_seqs: int,
                                               budget: int | None, async_scheduling: bool, speculative: str | None,
                                               first_pool: int, rnd) -> None:
    """From one block up: the result is the infinite cache's, field for field, and its
    `blocks_used` is the whole-log pool's (the threshold the grid reuses the ceiling from)."""
    reqs, outs, arrivals = w
    budget = None if budget is None else max(budget, max_num_seqs)
    flags = [rnd.random() < 0.2 for _ in reqs]
    ref, big, got, _ = runs(reqs, outs, arrivals, first_pool, max_num_seqs=max_num_seqs, budget=budget,
                            async_scheduling=async_scheduling, skip_prefix_cache=flags, speculative=speculative)
    assert_same(ref, got)
    assert_same(big, got)
    assert got.blocks_used == big.blocks_used and got.evictions == 0 and got.preemptions == 0


def test_duplicate_copies_outgrow_the_distinct_blocks_and_are_caught() -> None:
    """Six requests with the same 8-block prompt arrive together (6 tokens a step). vLLM never
    hits a prompt's last token, so each after the first hits 7 blocks and computes the 8th
    itself, into a block of its own that it caches once full: a second copy of that hash. So
    the infinite cache holds 8 + 5 = 13 blocks, more than the 8 distinct ones: a first pool of
    the distinct hash ids evicts, and run_never_evicting redoes it in a larger pool; the result
    is the reference's, and a pool of 13 is the threshold."""
    prompt = list(range(1, 33))  # 8 full blocks
    reqs, outs, arrivals = [prompt] * 6, [1] * 6, [0.0] * 6
    trace = trace_of(reqs)
    lengths = np.asarray([32] * 6, np.int64)
    ids, _, _ = request_hashes(trace, lengths, np.ones(6, np.int64), trace.num_ids)
    distinct = num_hash_ids(trace, ids, lengths)
    assert distinct == 8
    ref, big, got, whole = runs(reqs, outs, arrivals, distinct, max_num_seqs=6, budget=6)
    assert_same(ref, got)
    assert_same(big, got)
    assert got.blocks_used == 13 and got.hit_tokens.tolist() == [0] + [28] * 5
    tight = run_concurrent_compiled(trace, distinct, lengths, np.ones(6, np.int64), np.zeros(6), FLAT, 6,
                                    max_num_batched_tokens=6)
    assert tight.evictions == 5  # the first try's pool: the duplicates evict
    at = run_concurrent_compiled(trace, got.blocks_used, lengths, np.ones(6, np.int64), np.zeros(6), FLAT, 6,
                                 max_num_batched_tokens=6)
    assert_same(ref, at)  # the threshold itself gives the infinite run


def test_a_chunked_admission_asks_for_its_whole_prompt() -> None:
    """4-token blocks, 6 tokens a step. A (7 tokens, 1 output) takes blocks 0 and 1 in step 1;
    in step 2 it computes its 7th token and B (40 tokens, 10 blocks) is admitted with the 5
    tokens left: vLLM checks B's whole prompt, 2 + 10 = 12 blocks, though B takes only 2 (ids 2,
    3). A finishes: its unhashed block 1 goes to the free queue's head, and B's later chunks take
    it, then ids 4..10. So the highest block id is 10, yet a pool of 11 makes B wait a step: the
    never-evicting pool is 12, and the ceiling's `exact_from` says so."""
    reqs, outs, arrivals = [list(range(1, 8)), list(range(100, 140))], [1, 1], [0.0, 0.0]
    ref, big, got, _ = runs(reqs, outs, arrivals, None, max_num_seqs=3, budget=6)
    assert_same(ref, got)
    assert got.blocks_used == 12
    w = Workload.from_token_lists(reqs, timestamps=arrivals, output_tokens=outs)
    opts = SimulateOptions(decode_tps=100.0, max_num_batched_tokens=6, max_num_seqs=3)
    ceiling = simulate_one(w, B, None, mode="concurrent", options=opts)
    assert ceiling.exact_from == 12
    assert ceiling.timing is not None
    at_11 = simulate_one(w, B, 11, mode="concurrent", options=opts)
    at_12 = simulate_one(w, B, 12, mode="concurrent", options=opts)
    assert at_12.timing is not None and at_11.timing is not None
    assert at_12.timing.ttft_s.tolist() == ceiling.timing.ttft_s.tolist()
    assert at_11.timing.ttft_s[1] > ceiling.timing.ttft_s[1]  # B waited: 11 blocks is not the infinite cache
