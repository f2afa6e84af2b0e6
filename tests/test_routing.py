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
from advisor.sim.routing import ROUTERS, run_replicas, stable_hash
from advisor.sim.steptime import StepTimeModel
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


def test_unknown_router_and_bad_counts_name_the_fix() -> None:
    with pytest.raises(AdvisorError, match="round-robin"):
        run([A1], router="random")
    with pytest.raises(AdvisorError, match="--replicas"):
        run([A1], replicas=0)


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
    """--replicas 1,2 --router round-robin,cache-aware at one budget: 2 x 2 rows, one replica's
    rows equal whatever the router; per-replica memory is the budget given."""
    reqs = [A1, A2, B1, B2, A1 + [20, 21, 22, 23, 24]]
    run_dir = write_run(tmp_path / "run", reqs, output_tokens=[2] * len(reqs))
    res = CliRunner().invoke(main, ["simulate", str(run_dir), "--block-sizes", "4", "--num-blocks", "10",
                                    "--replicas", "1,2", "--router", "round-robin,cache-aware", "--json"])
    assert res.exit_code == 0, res.output
    rows = pq.read_table(run_dir / "replicas.parquet").to_pylist()
    assert [(r["replicas"], r["router"]) for r in rows] == [
        (1, "round-robin"), (1, "cache-aware"), (2, "round-robin"), (2, "cache-aware")]
    assert all(r["block_size"] == 4 and r["num_blocks"] == 10 and r["queries"] == 58 for r in rows)
    assert rows[0]["hit_tokens"] == rows[1]["hit_tokens"]
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
