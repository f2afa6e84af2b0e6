"""advisor.sim.fast.events (the compiled concurrent loop) against advisor.sim.events.run_concurrent over
advisor.sim.cache.PrefixCache: every field equal, clock and step count included.

run_concurrent over cache.PrefixCache is the readable reference; tests/test_replay.py checks it
(and, through simulate_one, this kernel) against vLLM's engine request by request.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor.sim import cache as refcache
from advisor.sim import events
from advisor.sim.configuration import TraceHashes
from advisor.sim.fast import trace as fasttrace
from advisor.sim.fast.events import run_concurrent_compiled
from advisor.sim.steptime import StepTimeModel

B = 4
FLAT = StepTimeModel.from_rates(10_000.0, 100.0)
ROOFLINE = StepTimeModel.for_model("llama-3.1-8b", "h100")
CASES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def trace_of(reqs: list[list[int]], bs: int = B) -> fasttrace.BlockTrace:
    offsets = np.zeros(len(reqs) + 1, np.int64)
    np.cumsum([len(r) for r in reqs], out=offsets[1:])
    tokens = np.asarray([t for r in reqs for t in r], np.int32)
    return fasttrace.trace_from_tokens(tokens, offsets, bs)


def both(reqs: list[list[int]], outs: list[int], arrivals: list[float], num_blocks: int, *,
         max_num_seqs: int = 256, budget: int | None = None, skip: bool = True, async_scheduling: bool = False,
         skip_prefix_cache: list[bool] | None = None, speculative: str | None = None,
         clock: StepTimeModel = FLAT) -> tuple[events.ConcurrentResult, events.ConcurrentResult]:
    trace = trace_of(reqs)
    lengths = np.asarray([len(r) for r in reqs], np.int64)
    out_arr, arr = np.asarray(outs, np.int64), np.asarray(arrivals, np.float64)
    flags = None if skip_prefix_cache is None else np.asarray(skip_prefix_cache, bool)
    ref = events.run_concurrent(refcache.PrefixCache(num_blocks, B, speculative=speculative), TraceHashes(trace), lengths,
                                out_arr, arr, clock, max_num_seqs, max_num_batched_tokens=budget,
                                async_scheduling=async_scheduling, skip_prefix_cache=flags)
    fast = run_concurrent_compiled(trace, num_blocks, lengths, out_arr, arr, clock, max_num_seqs,
                                   max_num_batched_tokens=budget, skip_quiet_steps=skip,
                                   async_scheduling=async_scheduling, skip_prefix_cache=flags, speculative=speculative)
    return ref, fast


def assert_same(ref: events.ConcurrentResult, fast: events.ConcurrentResult) -> None:
    assert fast.hit_tokens.tolist() == ref.hit_tokens.tolist()
    assert fast.scheduled.tolist() == ref.scheduled.tolist()
    got = (fast.evictions, fast.peak_blocks_in_use, fast.preemptions, fast.refused, fast.steps)
    assert got == (ref.evictions, ref.peak_blocks_in_use, ref.preemptions, ref.refused, ref.steps)
    # the clock: equal up to float summation order (a jump adds k steps' times one by one too)
    assert fast.makespan_s == pytest.approx(ref.makespan_s, rel=1e-12, abs=1e-12)
    for a, b in ((fast.ttft_s, ref.ttft_s), (fast.e2e_s, ref.e2e_s)):
        assert np.isnan(a).tolist() == np.isnan(b).tolist()
        assert a[~np.isnan(a)] == pytest.approx(b[~np.isnan(b)], rel=1e-12, abs=1e-12)
    assert (fast.busy_s, fast.prefill_s) == pytest.approx((ref.busy_s, ref.prefill_s), rel=1e-12, abs=1e-12)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[list[int]], list[int], list[float]]:
    """A few shared prefixes, follow-up turns, empty (refused-at-tokenization) prompts,
    output lengths 0..14, bursts (gap 0) and lulls."""
    prefixes = draw(st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=14), min_size=1, max_size=4))
    reqs: list[list[int]] = []
    for _ in range(draw(st.integers(1, 24))):
        if draw(st.integers(0, 15)) == 0:
            reqs.append([])
            continue
        p = draw(st.sampled_from(prefixes))
        if reqs and draw(st.booleans()):
            p = draw(st.sampled_from(reqs))
        reqs.append((list(p) + draw(st.lists(st.integers(1, 40), max_size=10))) or [1])
    n = len(reqs)
    outs = draw(st.lists(st.integers(0, 14), min_size=n, max_size=n))
    gaps = draw(st.lists(st.sampled_from([0.0, 0.0, 0.005, 0.01, 0.2, 1.0]), min_size=n, max_size=n))
    return reqs, outs, list(np.cumsum(gaps))


@CASES
@given(workloads(), st.integers(1, 30), st.integers(1, 6), st.sampled_from([None, 1, 3, 9, 40]), st.booleans(),
       st.booleans(), st.sampled_from([None, "eagle"]), st.randoms(use_true_random=False))
def test_compiled_loop_equals_the_reference_loop(w: tuple[list[list[int]], list[int], list[float]], num_blocks: int,
                                                  max_num_seqs: int, budget: int | None, skip: bool,
                                                  async_scheduling: bool, speculative: str | None, rnd) -> None:
    """Pools from one block (most requests refused, constant preemption) to roomy; token
    budgets (chunked prefill) or none (never below max_num_seqs: vLLM's rule); quiet-step
    jumps on and off (the reference steps one by one); sync and async scheduling; some
    requests skipping the cache read; an EAGLE drafter's shorter hits."""
    reqs, outs, arrivals = w
    budget = None if budget is None else max(budget, max_num_seqs)
    flags = [rnd.random() < 0.2 for _ in reqs]
    assert_same(*both(reqs, outs, arrivals, num_blocks, max_num_seqs=max_num_seqs, budget=budget, skip=skip,
                      async_scheduling=async_scheduling, skip_prefix_cache=flags, speculative=speculative))


@CASES
@given(workloads(), st.integers(4, 30), st.integers(1, 4), st.sampled_from([None, 8, 40]), st.booleans(), st.booleans())
def test_compiled_loop_runs_on_the_roofline_clock(w: tuple[list[list[int]], list[int], list[float]], num_blocks: int,
                                                  max_num_seqs: int, budget: int | None, skip: bool,
                                                  async_scheduling: bool) -> None:
    """The roofline clock (a step's time from its chunks and decode contexts) gives the same
    steps, times and hits in both loops, quiet jumps included."""
    reqs, outs, arrivals = w
    budget = None if budget is None else max(budget, max_num_seqs)
    assert_same(*both(reqs, outs, [a / 1000 for a in arrivals], num_blocks, max_num_seqs=max_num_seqs, budget=budget,
                      skip=skip, async_scheduling=async_scheduling, clock=ROOFLINE))


def test_pressure_is_real_in_the_generated_cases() -> None:
    """The property above is not vacuous: a tight pool evicts and preempts."""
    rng = np.random.default_rng(3)
    shared = list(rng.integers(1, 40, 12))
    reqs = [shared + list(rng.integers(1, 40, int(rng.integers(0, 9)))) for _ in range(20)]
    for async_scheduling in (False, True):
        ref, fast = both(reqs, [12] * 20, [0.001 * i for i in range(20)], 12, max_num_seqs=4,
                         async_scheduling=async_scheduling)
        assert_same(ref, fast)
        assert ref.preemptions > 0 and ref.evictions > 0 and ref.hit_tokens.sum() > 0


def test_blocks_used_counts_the_pool_a_never_evicting_run_touches() -> None:
    """Two requests one after the other, 3 and 2 blocks (outputs included). The first frees its
    unhashed tail block to the queue's head and its two cached blocks to the tail, behind the
    97 never-used ones: the second takes the freed tail block, then never-used block 3. So 4 of
    the 100 blocks are ever used, and nothing is evicted."""
    reqs = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [11, 12, 13, 14, 15]]
    ref, fast = both(reqs, [1, 2], [0.0, 5.0], 100)
    assert_same(ref, fast)
    assert fast.blocks_used == 4 and fast.evictions == 0


def test_prepared_hashes_give_decode_blocks_their_own_ids() -> None:
    from advisor.sim.fast.events import request_hashes

    trace = trace_of([[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9]])
    flat, hoff, boff = request_hashes(trace, np.array([9, 5]), np.array([8, 5]), trace.num_ids)
    # full blocks to the end: request 0 has 2 prompt + (9 + 7) // 4 - 2 = 2 decode blocks,
    # request 1 has 1 + (5 + 4) // 4 - 1 = 1; room for 4 and ceil(9 / 4) = 3 blocks
    assert hoff.tolist() == [0, 4, 6] and boff.tolist() == [0, 4, 7]
    assert flat[0] == flat[4]  # the shared first block
    decode = [flat[2], flat[3], flat[5]]
    assert decode == list(range(trace.num_ids, trace.num_ids + 3))
    with pytest.raises(AssertionError):
        run_concurrent_compiled(trace, 0, np.array([9, 5]), np.array([8, 5]), np.zeros(2), FLAT, 4)


def test_async_scheduling_preempts_a_request_whose_last_token_is_in_flight() -> None:
    """3 blocks of 4. b samples its 2nd (last) token in step 3; the async scheduler plans
    step 4 before that output is seen, so b still holds its 2 blocks when a's 5th token needs
    a block, and b (last in the running queue) is preempted; it then finishes from its
    in-flight token without running again. The synchronous scheduler sees b finish first:
    no preemption. (vLLM's own schedulers do the same: tests/test_scheduler_oracle.py.)"""
    reqs, outs, arrivals = [[1, 2], [1, 1, 2, 1, 1, 2]], [5, 2], [0.0, 0.01]
    clock = StepTimeModel.from_rates(1e12, 100.0)
    got = {}
    for async_scheduling in (False, True):
        ref, fast = both(reqs, outs, arrivals, 3, max_num_seqs=3, async_scheduling=async_scheduling, clock=clock)
        assert_same(ref, fast)
        got[async_scheduling] = ref
    assert got[False].preemptions == 0 and got[True].preemptions == 1
    assert got[False].hit_tokens.tolist() == got[True].hit_tokens.tolist() == [0, 0]
