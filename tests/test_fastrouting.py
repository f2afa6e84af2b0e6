"""advisor.sim.fast.routing (N compiled engines behind a router) against advisor.sim.routing's
reference loops over advisor.sim.cache.PrefixCache: every field equal, routes and fallbacks
included, in both modes, for every router, under evictions, preemption and chunking.

The reference's own stories and its one-replica identities are in tests/test_routing.py; the
single compiled engine is kept equal to the reference engine in tests/test_fastevents.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor.sim.cache import PrefixCache, sequential_hits_from_hashes
from advisor.sim.configuration import (
    SimulateOptions,
    TraceHashes,
    block_trace,
    simulate_one,
)
from advisor.sim.fast import sequential as fastsim
from advisor.sim.fast.routing import (
    run_replicas_compiled,
    run_replicas_sequential_compiled,
)
from advisor.sim.replicas import replica_rows, simulate_replicas
from advisor.sim.routing import (
    ROUTERS,
    ReplicaResult,
    run_replicas,
    run_replicas_sequential,
)
from advisor.sim.steptime import StepTimeModel
from advisor.workload import Workload as Workload_
from tests.test_fastevents import assert_same, trace_of

B = 4
FLAT = StepTimeModel.from_rates(10_000.0, 100.0)
ROOFLINE = StepTimeModel.for_model("llama-3.1-8b", "h100")
CASES = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Workload = tuple[list[list[int]], list[int], list[float], list[str | None], np.ndarray, list[bool]]


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    """Shared prefixes and follow-up turns, empty prompts, output lengths 0..12, bursts and lulls,
    a few sessions (some missing), requests fanned out to 2-3 children (adjacent, arriving
    together, one logged line), a few that skip the cache read."""
    prefixes = draw(st.lists(st.lists(st.integers(1, 30), min_size=1, max_size=12), min_size=1, max_size=3))
    reqs: list[list[int]] = []
    outs: list[int] = []
    arrivals: list[float] = []
    sessions: list[str | None] = []
    lines: list[int] = []
    skip: list[bool] = []
    t = 0.0
    for line in range(draw(st.integers(1, 14))):
        if draw(st.integers(0, 12)) == 0:
            prompt: list[int] = []
        else:
            p = draw(st.sampled_from(prefixes))
            if reqs and draw(st.booleans()):
                p = draw(st.sampled_from(reqs))
            prompt = (list(p) + draw(st.lists(st.integers(1, 30), max_size=8))) or [1]
        t += draw(st.sampled_from([0.0, 0.0, 0.005, 0.015, 0.02, 0.2, 1.0]))  # steps: ~0.01 s
        session = draw(st.sampled_from([None, "a", "b", "c"]))
        out = draw(st.integers(0, 12))
        flag = draw(st.integers(0, 9)) == 0
        for _ in range(draw(st.sampled_from([1, 1, 1, 1, 2, 3]))):
            reqs.append(prompt)
            outs.append(out)
            arrivals.append(t)
            sessions.append(session)
            lines.append(line)
            skip.append(flag)
    return reqs, outs, arrivals, sessions, np.asarray(lines), skip


def assert_same_routes(ref: ReplicaResult, fast: ReplicaResult) -> None:
    assert fast.mode == ref.mode
    assert fast.replica.tolist() == ref.replica.tolist()
    assert fast.hit_tokens.tolist() == ref.hit_tokens.tolist()
    assert fast.scheduled.tolist() == ref.scheduled.tolist()
    assert fast.fallbacks == ref.fallbacks
    for field in ("requests_per_replica", "evictions_per_replica", "peak_blocks_per_replica", "refused_per_replica"):
        assert getattr(fast, field).tolist() == getattr(ref, field).tolist(), field


@CASES
@given(workloads(), st.integers(1, 4), st.sampled_from(ROUTERS), st.integers(1, 24), st.integers(1, 4),
       st.sampled_from([None, 4, 9]), st.booleans(), st.booleans(), st.sampled_from([None, "eagle"]),
       st.sampled_from([0.0, 0.05, 1.0]), st.sampled_from([1, 2]), st.booleans())
def test_compiled_concurrent_replicas_equal_the_reference(w: Workload, replicas: int, router: str, num_blocks: int,
                                                          max_num_seqs: int, budget: int | None, async_scheduling: bool,
                                                          skip_quiet: bool, speculative: str | None, load_weight: float,
                                                          k: int, roofline: bool) -> None:
    """Every field of every replica's run (clock, steps, preemptions included), each request's
    replica, hits and times: pools of 1-24 blocks of 4 tokens (evictions, preemption, refusals),
    1-4 running, token budgets that chunk prompts, both schedulers, quiet-step jumps on and off."""
    reqs, outs, arrivals, sessions, lines, skip = w
    trace = trace_of(reqs)
    lengths = np.asarray([len(r) for r in reqs], np.int64)
    clock = ROOFLINE if roofline else FLAT
    budget = None if budget is None else max(budget, max_num_seqs)
    flags = np.asarray(skip) if any(skip) else None
    kw = {"replicas": replicas, "router": router, "sessions": sessions, "max_num_batched_tokens": budget,
          "async_scheduling": async_scheduling, "skip_prefix_cache": flags, "prefix_hash_blocks": k,
          "load_weight": load_weight, "lines": lines}
    ref = run_replicas(lambda: PrefixCache(num_blocks, B, speculative=speculative), TraceHashes(trace), lengths,
                       np.asarray(outs), np.asarray(arrivals), clock, max_num_seqs, **kw)  # type: ignore[arg-type]
    fast = run_replicas_compiled(trace, num_blocks, lengths, np.asarray(outs), np.asarray(arrivals), clock,
                                 max_num_seqs, speculative=speculative, skip_quiet_steps=skip_quiet,
                                 **kw)  # type: ignore[arg-type]
    assert_same_routes(ref, fast)
    assert len(fast.per_replica) == len(ref.per_replica) == replicas
    for a, b in zip(ref.per_replica, fast.per_replica, strict=True):
        assert_same(a, b)
    assert ref.ttft_s is not None and fast.ttft_s is not None and ref.e2e_s is not None and fast.e2e_s is not None
    assert np.isnan(fast.ttft_s).tolist() == np.isnan(ref.ttft_s).tolist()
    assert fast.ttft_s[~np.isnan(fast.ttft_s)] == pytest.approx(ref.ttft_s[~np.isnan(ref.ttft_s)], rel=1e-12, abs=1e-12)
    assert fast.e2e_s[~np.isnan(fast.e2e_s)] == pytest.approx(ref.e2e_s[~np.isnan(ref.e2e_s)], rel=1e-12, abs=1e-12)


@CASES
@given(workloads(), st.integers(1, 4), st.sampled_from(ROUTERS), st.integers(1, 12), st.sampled_from([None, "eagle"]),
       st.sampled_from([0.0, 0.05, 1.0]), st.sampled_from([1, 2]))
def test_compiled_sequential_replicas_equal_the_reference(w: Workload, replicas: int, router: str, num_blocks: int,
                                                          speculative: str | None, load_weight: float, k: int) -> None:
    """Each request's replica and hits, each replica's evictions, peak and refusals: pools of 1-12
    blocks of 4 tokens per replica (evictions, requests too long for the pool)."""
    reqs, _, _, sessions, lines, skip = w
    trace = trace_of(reqs)
    flags = np.asarray(skip) if any(skip) else None
    kw = {"replicas": replicas, "router": router, "sessions": sessions, "skip_prefix_cache": flags,
          "prefix_hash_blocks": k, "load_weight": load_weight, "lines": lines}
    ref = run_replicas_sequential(lambda: PrefixCache(num_blocks, B, speculative=speculative), TraceHashes(trace),
                                  trace.num_tokens, **kw)  # type: ignore[arg-type]
    fast = run_replicas_sequential_compiled(trace, num_blocks, speculative=speculative, **kw)  # type: ignore[arg-type]
    assert_same_routes(ref, fast)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.sampled_from(ROUTERS), st.integers(1, 12))
def test_one_sequential_replica_is_the_single_cache(w: Workload, router: str, num_blocks: int) -> None:
    """With one replica every router is today's sequential simulator: the compiled sequential
    replay (advisor.sim.fast.sequential) and PrefixCache's one-at-a-time hits."""
    reqs, _, _, sessions, lines, skip = w
    trace = trace_of(reqs)
    flags = np.asarray(skip)
    single = fastsim.simulate_sequential(trace, num_blocks, flags)
    got = run_replicas_sequential_compiled(trace, num_blocks, replicas=1, router=router, sessions=sessions,
                                           skip_prefix_cache=flags, lines=lines)
    assert got.hit_tokens.tolist() == single.hit_tokens.tolist()
    assert got.scheduled.tolist() == ((trace.num_tokens > 0) & single.fits).tolist()
    assert (got.evictions, int(got.peak_blocks_per_replica[0])) == (single.evictions, single.peak_blocks_in_use)
    assert got.replica.tolist() == [0] * len(reqs) and got.fallbacks == 0
    ref = run_replicas_sequential(lambda: PrefixCache(num_blocks, B), TraceHashes(trace), trace.num_tokens,
                                  replicas=1, router=router, sessions=sessions, skip_prefix_cache=flags, lines=lines)
    assert ref.hit_tokens.tolist() == sequential_hits_from_hashes(TraceHashes(trace), trace.num_tokens.tolist(), B,
                                                                  num_blocks, skip=skip)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.integers(2, 4), st.integers(1, 12))
def test_sequential_least_loaded_routes_as_round_robin_without_fan_out(w: Workload, replicas: int,
                                                                       num_blocks: int) -> None:
    """Without a clock nothing is ever queued: the fewest requests routed so far, ties to the
    lowest index, is round-robin's turn (docs/simulate.md says so)."""
    reqs = w[0]
    trace = trace_of(reqs)
    rr = run_replicas_sequential_compiled(trace, num_blocks, replicas=replicas, router="round-robin")
    ll = run_replicas_sequential_compiled(trace, num_blocks, replicas=replicas, router="least-loaded")
    assert ll.replica.tolist() == rr.replica.tolist() and ll.hit_tokens.tolist() == rr.hit_tokens.tolist()


@pytest.mark.parametrize(("router", "replicas"), [("least-loaded", 1), ("cache-aware", 1), ("cache-aware", 2)])
def test_a_quiet_step_jump_stops_at_an_arrival_still_being_routed(router: str, replicas: int) -> None:
    """a (5 tokens, 12 out) runs alone: step 1 ends at 0.01 + 5/10,000 = 0.0105 s, then it decodes
    inside its second block, steps the jump could take in one go (0.0105, 0.0205, 0.0305 ...).
    b (3 tokens) arrives at 0.015, during step 2, and goes to a's replica (the only one; or
    cache-aware's tie: nothing cached, no prompt tokens queued, the lowest index). It is admitted
    in step 3, which starts at 0.0205 and lasts 0.01 + 3/10,000: TTFT 0.0308 - 0.015 = 0.0158.
    A jump over 0.015 would admit it a step or more late."""
    reqs = [[1, 2, 3, 4, 5], [7, 8, 9]]
    res = run_replicas_compiled(trace_of(reqs), 20, np.array([5, 3]), np.array([12, 2]), np.array([0.0, 0.015]),
                                FLAT, 4, replicas=replicas, router=router)
    assert res.replica.tolist() == [0, 0]
    assert res.ttft_s.tolist() == pytest.approx([0.0105, 0.0158])


def fanned_workload() -> Workload_:
    """Two sessions' turns, one request asking for 3 completions, one that skips the cache read."""
    a, b = list(range(1, 10)), list(range(101, 110))
    return Workload_.from_token_lists(
        [a, b, a + [10, 11, 12, 13], b + [110, 111, 112, 113], a + [20, 21, 22, 23, 24], b],
        timestamps=[0.0, 0.0, 0.01, 0.02, 0.03, 0.5], output_tokens=[3, 2, 4, 1, 5, 2],
        sessions=["s1", "s2", "s1", "s2", None, "s2"], n=[1, 1, 3, 1, 1, 1],
        skip_prefix_cache=[False, False, False, False, False, True])


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
def test_replica_rows_on_the_compiled_engines_are_the_references(mode: str) -> None:
    """The grid's rows (every router, 1-3 replicas, 2 budgets, async scheduling) are the same on
    the compiled twins and on the readable references."""
    w = fanned_workload()
    options = SimulateOptions(modes=(mode,), replicas=(1, 2, 3), routers=ROUTERS, scheduling="async",
                              max_num_seqs=2, max_num_batched_tokens=8, workers=2)
    trace = block_trace(w, B)
    args = (w, B, trace, [6, 40], options, lambda nb: None)
    auto, ref = replica_rows(*args), replica_rows(*args, engine="reference")
    assert len(auto) == 2 * 3 * len(ROUTERS)
    assert [r["mode"] for r in auto] == [mode] * len(auto)
    for a, r in zip(auto, ref, strict=True):
        assert a.keys() == r.keys()
        for key in a:
            if isinstance(a[key], float):  # times: equal up to float summation order
                assert a[key] == pytest.approx(r[key], rel=1e-12), key
            else:
                assert a[key] == r[key], key


def test_simulate_replicas_routes_each_logged_request_once() -> None:
    """Per logged request (the replay's view): the 3 children of request 2 went to one replica,
    counted as one logged request with their summed queries; per-replica totals add up."""
    w = fanned_workload()
    run = simulate_replicas(w, B, 40, replicas=2, router="round-robin", mode="sequential")
    # round-robin per logged request: 0 1 0 1 0 1 (request 2's children all on replica 0)
    assert run.replica.tolist() == [0, 1, 0, 1, 0, 1]
    assert run.routed.replica.tolist() == [0, 1, 0, 0, 0, 1, 0, 1]
    assert run.config.n_tokens.tolist() == [9, 9, 39, 13, 14, 0]  # request 5 skips the read: no queries
    # request 2's first child hits request 0's 2 blocks (8), the other two its 3 (12 each); request 3
    # hits request 1's 2 blocks on replica 1, request 4 request 0's 2 on replica 0
    assert run.config.hit_tokens.tolist() == [0, 0, 32, 8, 8, 0]
    per = run.per_replica()
    assert [p["hit_tokens"] for p in per] == [40, 8] and [p["requests"] for p in per] == [3, 3]
    assert per[0]["hit_rate"] == pytest.approx(40 / 62)


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
def test_one_replica_rows_are_the_single_engine_runs(mode: str) -> None:
    """The grid hands the replica grid its single-engine LRU runs for the one-replica rows: they
    are the rows one replica's own run gives, field for field."""
    w = fanned_workload()
    options = SimulateOptions(modes=(mode,), replicas=(1,), routers=("session", "cache-aware"), max_num_seqs=2,
                              max_num_batched_tokens=8, workers=1)
    trace = block_trace(w, B)
    singles = {(mode, nb): simulate_one(w, B, nb, mode=mode, trace=trace, options=options) for nb in (6, 40)}
    args = (w, B, trace, [6, 40], options, lambda nb: None)
    assert replica_rows(*args, singles=singles) == replica_rows(*args)
