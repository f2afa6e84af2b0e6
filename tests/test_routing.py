"""advisor.sim.routing: N engines behind a router. Stories with hand-counted answers (4-token
blocks, requests far apart unless said), one replica == run_concurrent exactly, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor.cli import main
from advisor.errors import AdvisorError
from advisor.report import html, markdown
from advisor.report.model import build
from advisor.sim import events
from advisor.sim.cache import PrefixCache
from advisor.sim.fast.routing import run_replicas_sequential_compiled
from advisor.sim.routing import (
    ROUTERS,
    follows,
    run_replicas,
    run_replicas_sequential,
    stable_hash,
)
from advisor.sim.steptime import StepTimeModel
from tests.test_fastevents import trace_of
from tests.test_simulate import write_run

B = 4
FLAT = StepTimeModel.from_rates(10_000.0, 100.0)


def chained(tokens: list[int]) -> list[tuple[int, ...]]:
    """Full-block hashes that chain from their parent: block k's hash is the prefix through it."""
    return [tuple(tokens[: B * (k + 1)]) for k in range(len(tokens) // B)]


def run(reqs: list[list[int]], *, replicas: int = 2, router: str = "round-robin", arrivals: list[float] | None = None,
        outs: list[int] | None = None, sessions: list[str | None] | None = None, num_blocks: int | None = None,
        **kw: object):
    arr = np.asarray(arrivals if arrivals is not None else [10.0 * i for i in range(len(reqs))])
    return run_replicas(lambda: PrefixCache(num_blocks, B), [chained(r) for r in reqs],
                        np.asarray([len(r) for r in reqs]), np.asarray(outs or [1] * len(reqs)), arr, FLAT, 256,
                        replicas=replicas, router=router, sessions=sessions, **kw)  # type: ignore[arg-type]


def run_seq(reqs: list[list[int]], engine: str, *, replicas: int = 2, router: str = "round-robin",
            num_blocks: int = 1000, **kw: object):
    """Sequential mode on the reference (tuple hashes, PrefixCache) or the compiled twin (a trace)."""
    if engine == "reference":
        return run_replicas_sequential(lambda: PrefixCache(num_blocks, B), [chained(r) for r in reqs],
                                       np.asarray([len(r) for r in reqs]), replicas=replicas, router=router,
                                       **kw)  # type: ignore[arg-type]
    return run_replicas_sequential_compiled(trace_of(reqs), num_blocks, replicas=replicas, router=router,
                                            **kw)  # type: ignore[arg-type]


ENGINES = pytest.mark.parametrize("engine", ["reference", "compiled"])
A1 = list(range(1, 10))  # 9 tokens: 2 full blocks cached after it runs
A2 = A1 + [10, 11, 12, 13]  # 13 tokens: looks up (13 - 1) // 4 = 3 blocks, 2 of them cached
B1 = list(range(101, 110))
B2 = B1 + [110, 111, 112, 113]


def two_sessions() -> tuple[str, str]:
    """Two session ids that hash to different replicas of 2."""
    names = [f"s{k}" for k in range(10)]
    a = names[0]
    b = next(n for n in names if stable_hash(n) % 2 != stable_hash(a) % 2)
    return a, b


def test_session_routing_keeps_each_conversation_on_one_replica() -> None:
    """A, A, B, B on 2 replicas. Round-robin sends A's second turn to replica 1 and B's to
    replica 1 while B's first went to 0: both second turns miss (0 hits of 44 queries).
    Session routing keeps each on its replica: each second turn hits A1's/B1's 2 blocks = 8."""
    reqs, (sa, sb) = [A1, A2, B1, B2], two_sessions()
    rr = run(reqs, router="round-robin")
    assert rr.replica.tolist() == [0, 1, 0, 1]
    assert rr.hit_tokens.tolist() == [0, 0, 0, 0]
    ss = run(reqs, router="session", sessions=[sa, sa, sb, sb])
    assert ss.replica[0] == ss.replica[1] != ss.replica[2] == ss.replica[3]
    assert ss.hit_tokens.tolist() == [0, 8, 0, 8]
    assert ss.fallbacks == 0 and ss.requests_per_replica.tolist() == [2, 2]


def test_session_router_falls_back_to_round_robin_and_counts() -> None:
    res = run([A1, A2, B1], router="session", sessions=[None, None, "x"])
    assert res.fallbacks == 2
    assert res.replica.tolist()[:2] == [0, 1]  # the fallback's own turn
    assert res.replica[2] == stable_hash("x") % 2


def test_prefix_hash_sends_requests_sharing_the_first_block_together() -> None:
    """P and P' share their first block [1, 2, 3, 4] (and only it): with K = 1 they land on
    one replica, whatever their other blocks, and P' hits that block (4 tokens)."""
    p, p2 = [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 50, 51, 52, 53, 54]
    for other in range(200, 230):
        q = [other, 2, 3, 4, 5]
        res = run([p, q, p2], router="prefix-hash")
        assert res.replica[0] == res.replica[2]
        assert res.hit_tokens.tolist() == [0, 0, 4]
    assert run([[1, 2, 3]], router="prefix-hash").fallbacks == 1  # no full block: round-robin


def test_cache_aware_takes_the_cached_replica_unless_its_load_outweighs_it() -> None:
    """X (9 tokens) at t=0 goes to replica 0 (both idle, empty: tie to the lowest index) and
    finishes. At t=20 L (1,000 new tokens) arrives: nothing cached anywhere, both idle: replica 0.
    X' (13 tokens) arrives at the same instant, after L. Replica 0 holds X's 2 blocks (8 tokens)
    and L's 1,000 uncomputed prompt tokens; replica 1 nothing. Scores, w = load weight:
    replica 0: 8 - w * 1000, replica 1: 0 - w * 0 = 0.
    w = 1: -992 < 0, X' goes to replica 1 and misses; w = 0.001: 8 - 1 = 7 > 0, replica 0, hits 8."""
    x, x2, big = A1, A2, list(range(1000, 2000))
    arrivals = [0.0, 20.0, 20.0]
    heavy = run([x, big, x2], router="cache-aware", arrivals=arrivals, load_weight=1.0)
    assert heavy.replica.tolist() == [0, 0, 1] and heavy.hit_tokens.tolist() == [0, 0, 0]
    light = run([x, big, x2], router="cache-aware", arrivals=arrivals, load_weight=0.001)
    assert light.replica.tolist() == [0, 0, 0] and light.hit_tokens.tolist() == [0, 0, 8]


def test_least_loaded_counts_requests_and_ties_to_the_lowest_index() -> None:
    """Three requests at once on 2 idle replicas: 0 (tie) -> 0; then loads (1, 0) -> 1;
    then (1, 1) -> 0."""
    res = run([A1, B1, A2], router="least-loaded", arrivals=[0.0, 0.0, 0.0])
    assert res.replica.tolist() == [0, 1, 0]
    assert res.requests_per_replica.tolist() == [2, 1] and res.load_spread == pytest.approx(2 / 1.5)


A3 = A2 + [14, 15, 16, 17]  # 17 tokens: looks up 4 blocks; A2 cached 3 (12 tokens), A1 only 2
B3 = B2 + [114, 115, 116, 117]


@ENGINES
def test_sequential_round_robin_splits_two_sessions_and_session_routing_keeps_them(engine: str) -> None:
    """Log order A1 B1 B2 A2 A3 B3, sequential mode, 2 replicas, nothing evicted. Round-robin:
    A1 -> 0, B1 -> 1, B2 -> 0 (holds A1: miss), A2 -> 1 (holds B1: miss), A3 -> 0 (A1's 2 blocks:
    8), B3 -> 1 (B1's 2 blocks: 8): 16 hit tokens of 78. Session routing keeps each on its
    replica: A2 and B2 hit their first turn's 2 blocks (8), A3 and B3 their second's 3 (12): 40,
    what one replica gets."""
    reqs, (sa, sb) = [A1, B1, B2, A2, A3, B3], two_sessions()
    rr = run_seq(reqs, engine)
    assert rr.replica.tolist() == [0, 1, 0, 1, 0, 1]
    assert rr.hit_tokens.tolist() == [0, 0, 0, 0, 8, 8]
    ss = run_seq(reqs, engine, router="session", sessions=[sa, sb, sb, sa, sa, sb])
    assert ss.hit_tokens.tolist() == [0, 0, 8, 8, 12, 12] and ss.fallbacks == 0
    assert len(set(ss.replica[[0, 3, 4]].tolist())) == 1 and len(set(ss.replica[[1, 2, 5]].tolist())) == 1
    one = run_seq(reqs, engine, replicas=1)
    assert one.hit_tokens.tolist() == ss.hit_tokens.tolist() and one.replica.tolist() == [0] * 6


@ENGINES
def test_sequential_prefix_hash_sends_a_hot_prefix_to_one_replica(engine: str) -> None:
    """8 requests share their first two blocks (10 tokens each, 2 blocks looked up). Prefix-hash
    on 4 replicas sends all 8 to one replica: 7 of them hit 8 tokens (56), and that replica gets
    every request (load spread 8 / 2 = 4). Round-robin spreads them evenly (spread 1) and each
    replica's first one misses: (8 - 4) x 8 = 32."""
    reqs = [list(range(1, 9)) + [100 + k, 200 + k] for k in range(8)]
    ph = run_seq(reqs, engine, replicas=4, router="prefix-hash")
    assert len(set(ph.replica.tolist())) == 1
    assert int(ph.hit_tokens.sum()) == 56 and ph.load_spread == 4.0
    rr = run_seq(reqs, engine, replicas=4)
    assert int(rr.hit_tokens.sum()) == 32 and rr.load_spread == 1.0 and rr.requests_per_replica.tolist() == [2] * 4


@ENGINES
def test_sequential_cache_aware_trades_the_hit_against_the_work_done(engine: str) -> None:
    """X (9 tokens) goes to replica 0 (both empty: tie to the lowest index) and computes 9 tokens.
    X' (13 tokens): replica 0 would hit 8 and has done 9 tokens of work, replica 1 nothing:
    scores 8 - 9w and 0. w = 1: -1 < 0, replica 1, a miss; w = 0.5: 3.5 > 0, replica 0, 8 hit."""
    heavy = run_seq([A1, A2], engine, router="cache-aware", load_weight=1.0)
    assert heavy.replica.tolist() == [0, 1] and heavy.hit_tokens.tolist() == [0, 0]
    light = run_seq([A1, A2], engine, router="cache-aware", load_weight=0.5)
    assert light.replica.tolist() == [0, 0] and light.hit_tokens.tolist() == [0, 8]


@ENGINES
def test_sequential_least_loaded_counts_requests_routed_and_children_follow_their_request(engine: str) -> None:
    """Logged request 0 asks for 3 completions (scheduler requests 0, 1, 2, lines 0 0 0), then
    four single ones. Every child goes where the first went. Round-robin counts logged requests:
    0 0 0 | 1 0 1 0. Least-loaded counts requests routed: after line 0 the loads are (3, 0), so
    lines 1, 2, 3 go to replica 1 (loads 3/1, 3/2, 3/3), line 4 to replica 0 (tie)."""
    reqs = [A1, A1, A1, B1, A2, B2, A3]
    lines = np.array([0, 0, 0, 1, 2, 3, 4])
    rr = run_seq(reqs, engine, lines=lines)
    assert rr.replica.tolist() == [0, 0, 0, 1, 0, 1, 0]
    ll = run_seq(reqs, engine, router="least-loaded", lines=lines)
    assert ll.replica.tolist() == [0, 0, 0, 1, 1, 1, 0]
    assert follows(lines, 7).tolist() == [-1, 0, 1, -1, -1, -1, -1]


@ENGINES
def test_sequential_replicas_refuse_what_their_pool_cannot_hold(engine: str) -> None:
    """A 3-block pool per replica: A3 (17 tokens, 5 blocks) is refused where it lands (counted
    there, no hit, not run); the others run."""
    res = run_seq([A1, A3, B1], engine, num_blocks=3)
    assert res.scheduled.tolist() == [True, False, True]
    assert res.refused_per_replica.tolist() == [0, 1] and res.requests_per_replica.tolist() == [2, 1]


def test_unknown_router_and_bad_counts_name_the_fix() -> None:
    with pytest.raises(AdvisorError, match="round-robin"):
        run([A1], router="random")
    with pytest.raises(AdvisorError, match="--replicas"):
        run([A1], replicas=0)
    for engine in ("reference", "compiled"):
        with pytest.raises(AdvisorError, match="--router-load-weight"):
            run_seq([A1], engine, router="cache-aware", load_weight=-1.0)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[list[int]], list[int], list[float], list[str | None]]:
    """Shared prefixes and follow-up turns, empty prompts, bursts and lulls, a few sessions."""
    prefixes = draw(st.lists(st.lists(st.integers(1, 30), min_size=1, max_size=12), min_size=1, max_size=3))
    reqs: list[list[int]] = []
    for _ in range(draw(st.integers(1, 16))):
        if draw(st.integers(0, 12)) == 0:
            reqs.append([])
            continue
        p = draw(st.sampled_from(prefixes))
        if reqs and draw(st.booleans()):
            p = draw(st.sampled_from(reqs))
        reqs.append((list(p) + draw(st.lists(st.integers(1, 30), max_size=8))) or [1])
    n = len(reqs)
    outs = draw(st.lists(st.integers(0, 10), min_size=n, max_size=n))
    gaps = draw(st.lists(st.sampled_from([0.0, 0.0, 0.005, 0.2, 1.0]), min_size=n, max_size=n))
    sessions = draw(st.lists(st.sampled_from([None, "a", "b", "c"]), min_size=n, max_size=n))
    return reqs, outs, list(np.cumsum(gaps)), sessions


CASES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@CASES
@given(workloads(), st.integers(1, 20), st.integers(1, 4), st.booleans(), st.sampled_from(ROUTERS))
def test_one_replica_is_run_concurrent(w, num_blocks: int, max_num_seqs: int, async_scheduling: bool,
                                       router: str) -> None:
    """With one replica every router is the single engine: every field equal."""
    reqs, outs, arrivals, sessions = w
    args = ([chained(r) for r in reqs], np.asarray([len(r) for r in reqs]), np.asarray(outs),
            np.asarray(arrivals), FLAT, max_num_seqs)
    ref = events.run_concurrent(PrefixCache(num_blocks, B), *args, max_num_batched_tokens=max(8, max_num_seqs),
                                async_scheduling=async_scheduling)
    got = run_replicas(lambda: PrefixCache(num_blocks, B), *args, replicas=1, router=router, sessions=sessions,
                       max_num_batched_tokens=max(8, max_num_seqs), async_scheduling=async_scheduling)
    one = got.per_replica[0]
    assert got.hit_tokens.tolist() == ref.hit_tokens.tolist()
    assert got.scheduled.tolist() == ref.scheduled.tolist()
    np.testing.assert_array_equal(got.ttft_s, ref.ttft_s)
    np.testing.assert_array_equal(got.e2e_s, ref.e2e_s)
    assert (one.evictions, one.preemptions, one.refused, one.steps, one.makespan_s, one.peak_blocks_in_use) == (
        ref.evictions, ref.preemptions, ref.refused, ref.steps, ref.makespan_s, ref.peak_blocks_in_use)
    assert got.fallbacks == 0


@CASES
@given(workloads(), st.integers(2, 4), st.sampled_from(ROUTERS), st.booleans())
def test_routes_are_deterministic_and_every_request_runs_once(w, replicas: int, router: str,
                                                              async_scheduling: bool) -> None:
    reqs, outs, arrivals, sessions = w
    a = run(reqs, replicas=replicas, router=router, arrivals=arrivals, outs=outs, sessions=sessions, num_blocks=12,
            async_scheduling=async_scheduling)
    b = run(reqs, replicas=replicas, router=router, arrivals=arrivals, outs=outs, sessions=sessions, num_blocks=12,
            async_scheduling=async_scheduling)
    assert a.replica.tolist() == b.replica.tolist() and a.hit_tokens.tolist() == b.hit_tokens.tolist()
    # each request ran (or not) on its replica only; the others never saw it
    for r, res in enumerate(a.per_replica):
        assert not res.scheduled[a.replica != r].any()
    assert a.requests_per_replica.sum() == sum(1 for r in reqs if r)


def test_cli_simulate_writes_replicas_parquet(tmp_path: Path) -> None:
    """--replicas 1,2 --router round-robin,cache-aware at one budget: per mode (sequential first)
    2 x 2 rows; one replica's rows are sim.parquet's LRU row at that budget whatever the router;
    per-replica memory is the budget given."""
    reqs = [A1, A2, B1, B2, A1 + [20, 21, 22, 23, 24]]
    run_dir = write_run(tmp_path / "run", reqs, output_tokens=[2] * len(reqs))
    res = CliRunner().invoke(main, ["simulate", str(run_dir), "--block-sizes", "4", "--num-blocks", "10",
                                    "--replicas", "1,2", "--router", "round-robin,cache-aware", "--json"])
    assert res.exit_code == 0, res.output
    rows = pq.read_table(run_dir / "replicas.parquet").to_pylist()
    assert [(r["mode"], r["replicas"], r["router"]) for r in rows] == [
        (m, n, router) for m in ("sequential", "concurrent") for n in (1, 2) for router in ("round-robin", "cache-aware")]
    assert all(r["block_size"] == 4 and r["num_blocks"] == 10 and r["queries"] == 58 for r in rows)
    sim = [r for r in pq.read_table(run_dir / "sim.parquet").to_pylist()
           if r["num_blocks"] == 10 and r["policy"] == "lru" and r["window"] == "cold"]
    for r in rows:
        assert len(r["replica_hit_rates"]) == r["replicas"]
        if r["replicas"] == 1:
            (single,) = [s for s in sim if s["mode"] == r["mode"]]
            assert (r["hit_tokens"], r["evictions"], r["ttft_p50_s"]) == (
                single["hit_tokens"], single["evictions"], single.get("ttft_p50_s"))
            assert r["replica_hit_rates"] == [r["hit_rate"]] and r["prefill_spread"] == 1.0
        assert (r["ttft_p50_s"] is None) == (r["mode"] == "sequential")
    # without --replicas the artifact is there and empty
    res = CliRunner().invoke(main, ["simulate", str(run_dir), "--block-sizes", "4", "--num-blocks", "10", "--json"])
    assert res.exit_code == 0, res.output
    assert pq.read_table(run_dir / "replicas.parquet").num_rows == 0


def test_report_shows_replicas_only_when_there_are_rows() -> None:
    """The section tabulates router x replica count at the recommended block size and names the
    biggest gap at the largest count; no rows, no section."""
    def row(n: int, router: str, rate: float) -> dict:
        return {"block_size": 16, "num_blocks": 100, "kv_gib": None, "replicas": n, "router": router,
                "hit_rate": rate, "ttft_p50_s": 0.05}

    rows = [row(1, "round-robin", 0.8), row(1, "session", 0.8), row(4, "round-robin", 0.5), row(4, "session", 0.75)]
    data = build("run", replicas=rows)
    md = markdown.render(data, include_timings=False)
    assert "## Replicas and routers" in md
    assert "With 4 replicas, round-robin loses 25.0 points of hit rate against session routing" in md
    assert "| session | 80.0% · 50 ms | 75.0% · 50 ms |" in md
    assert 'id="replicas"' in html.render(data)
    empty = build("run")
    assert "Replicas and routers" not in markdown.render(empty) and 'id="replicas"' not in html.render(empty)


def test_a_replica_waits_for_requests_still_being_routed_at_its_next_step() -> None:
    """a (1 token) runs alone in step 1, which ends at 0.0101 s; b arrives at 0.005 and c at
    0.01, both before step 2 starts. The single engine admits b and c together in step 2. A
    router hands c over only when it arrives at 0.01, so the replica must not start step 2
    (at 0.0101, past 0.01) before then, or c would wait a step: c's TTFT is step 2's end."""
    reqs, outs, arrivals = [[1], [1], [1]], [1, 1, 1], [0.0, 0.005, 0.01]
    args = ([chained(r) for r in reqs], np.asarray([1, 1, 1]), np.asarray(outs), np.asarray(arrivals), FLAT, 2)
    ref = events.run_concurrent(PrefixCache(2, B), *args, max_num_batched_tokens=8)
    got = run_replicas(lambda: PrefixCache(2, B), *args, replicas=1, router="round-robin",
                       sessions=[None] * 3, max_num_batched_tokens=8)
    assert ref.ttft_s.tolist() == pytest.approx([0.0101, 0.0152, 0.0102])
    assert got.ttft_s.tolist() == pytest.approx(ref.ttft_s.tolist())
