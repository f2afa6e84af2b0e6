"""The simulate stage: grid, budgets, windows, concurrency, hash traces, CLI.

Exactness of the cache rules themselves is tests/test_oracle.py's job (advisor.sim.cache
against vLLM); here the stage is checked for the properties that must hold whatever
the workload, against naive references, and on small stories worked out by hand.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor import kvmemory as kv
from advisor import schema
from advisor.cli import main
from advisor.errors import AdvisorError
from advisor.replay import plan
from advisor.sim import cache as refcache
from advisor.sim import events
from advisor.sim.configuration import SimulateOptions, block_trace, simulate_one
from advisor.sim.fast.events import run_concurrent_compiled
from advisor.sim.grid import plan_budgets, simulate_grid
from advisor.sim.steptime import StepTimeModel
from advisor.workload import (
    Workload,
    cache_namespaces,
    load_workload,
    skips_prefix_cache,
    warm_mask,
)

B = 4
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- workloads ---
@st.composite
def structured(draw: st.DrawFn, max_requests: int = 24) -> list[list[int]]:
    """Requests built from a few shared prefixes (system prompts, documents) plus own text."""
    prefixes = draw(st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=14), min_size=1, max_size=4))
    reqs = []
    for _ in range(draw(st.integers(2, max_requests))):
        p = draw(st.sampled_from(prefixes))
        extra = draw(st.lists(st.integers(1, 50), min_size=0, max_size=10))
        if draw(st.booleans()) and reqs:  # a follow-up turn repeats an earlier request
            p = draw(st.sampled_from(reqs))
        reqs.append(list(p) + extra or [1])
    return reqs


def blocks_needed(reqs: Sequence[Sequence[int]], bs: int = B) -> int:
    return max(-(-len(r) // bs) for r in reqs)


def naive_ceiling(reqs: Sequence[Sequence[int]], bs: int = B) -> list[int]:
    """Infinite cache by definition: full-block prefixes seen before, capped at (L-1)//B blocks."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for r in reqs:
        k = 0
        while k < (len(r) - 1) // bs and tuple(r[: (k + 1) * bs]) in seen:
            k += 1
        out.append(k * bs)
        seen.update(tuple(r[: (j + 1) * bs]) for j in range(len(r) // bs))
    return out


def write_run(root: Path, reqs: Sequence[Sequence[int]], timestamps: Sequence[float] | None = None,
              output_tokens: Sequence[int] | None = None, models: Sequence[str | None] | None = None) -> Path:
    """A run folder with requests.parquet + tokens.parquet written straight from the schemas."""
    n = len(reqs)
    ids = [f"req-{i}" for i in range(n)]
    requests = {name: [None] * n for name in schema.REQUESTS.names}
    requests.update(request_id=ids, line=list(range(1, n + 1)), kind=[schema.KIND_TOKENS] * n,
                    format=[schema.FORMAT_COMPLETION] * n, prompt_token_ids=[list(r) for r in reqs],
                    timestamp=list(timestamps) if timestamps is not None else [float(i) for i in range(n)],
                    output_tokens=list(output_tokens) if output_tokens is not None else [None] * n,
                    model=list(models) if models is not None else [None] * n)
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(requests, schema=schema.REQUESTS), root / "requests.parquet")
    tokens = {name: [None] * n for name in schema.TOKENS.names}
    tokens.update(request_id=ids, token_ids=[list(r) for r in reqs], n_tokens=[len(r) for r in reqs])
    tokens = pa.Table.from_pydict(tokens, schema=schema.TOKENS)
    pq.write_table(tokens, root / "tokens.parquet")
    return root


def hits(w: Workload, num_blocks: int | None, **kw: object) -> np.ndarray:
    return simulate_one(w, B, num_blocks, **kw).hit_tokens  # type: ignore[arg-type]


# --- properties ---
@FAST
@given(structured(), st.integers(0, 12), st.integers(1, 12))
def test_lru_sequential_hits_grow_with_budget(reqs: list[list[int]], extra: int, more: int) -> None:
    """More memory never loses hits (sequential LRU, budgets that hold every request)."""
    w = Workload.from_token_lists(reqs)
    small = blocks_needed(reqs) + extra
    assert hits(w, small).sum() <= hits(w, small + more).sum()


@FAST
@given(structured(), st.integers(0, 8), st.lists(st.sampled_from([None, "a", "b"]), min_size=30, max_size=30))
def test_fast_sequential_equals_the_reference(reqs: list[list[int]], extra: int, loras: list[str | None]) -> None:
    """The grid's sequential runs (fastsim) give the reference's per-request hits, LoRA included."""
    w = Workload.from_token_lists(reqs, lora=loras[: len(reqs)])
    for nb, policy in ((None, "lru"), (blocks_needed(reqs) + extra, "lru"), (blocks_needed(reqs) + extra, "fifo"),
                       (blocks_needed(reqs) + extra, "belady")):
        fast = simulate_one(w, B, nb, policy=policy)
        ref = simulate_one(w, B, nb, policy=policy, engine="reference")
        assert list(fast.hit_tokens) == list(ref.hit_tokens)
        assert (fast.evictions, fast.peak_blocks_in_use) == (ref.evictions, ref.peak_blocks_in_use)


@FAST
@given(structured(), st.integers(0, 8), st.lists(st.tuples(st.floats(0, 0.05), st.integers(0, 12)), min_size=30, max_size=30))
def test_fast_concurrent_equals_the_reference(reqs: list[list[int]], extra: int, shape: list[tuple[float, int]]) -> None:
    """Overlapping requests with output tokens, small pools (preemptions): the compiled cache
    in the event loop gives the reference's hits and counters."""
    w = Workload.from_token_lists(reqs, timestamps=np.cumsum([g for g, _ in shape[: len(reqs)]]),
                                  output_tokens=[o for _, o in shape[: len(reqs)]])
    opts = SimulateOptions(decode_tps=100.0)
    nb = blocks_needed(reqs) + 3 + extra
    fast = simulate_one(w, B, nb, mode="concurrent", options=opts)
    ref = simulate_one(w, B, nb, mode="concurrent", options=opts, engine="reference")
    assert list(fast.hit_tokens) == list(ref.hit_tokens) and list(fast.scheduled) == list(ref.scheduled)
    assert (fast.evictions, fast.peak_blocks_in_use, fast.preemptions) == (ref.evictions, ref.peak_blocks_in_use, ref.preemptions)


@FAST
@given(structured(), st.integers(0, 10))
def test_ceiling_bounds_every_configuration(reqs: list[list[int]], extra: int) -> None:
    """No policy, mode or budget beats the infinite cache, request by request."""
    w = Workload.from_token_lists(reqs, timestamps=[i * 0.01 for i in range(len(reqs))],
                                  output_tokens=[i % 5 for i in range(len(reqs))])
    ceiling = np.array(naive_ceiling(reqs))
    assert list(hits(w, None)) == list(ceiling)
    nb = blocks_needed(reqs) + 3 + extra
    for policy in ("lru", "fifo", "belady"):
        assert (hits(w, nb, policy=policy) <= ceiling).all(), policy
    opts = SimulateOptions(decode_tps=20.0)
    infinite = simulate_one(w, B, None, mode="concurrent", options=opts)
    assert list(infinite.hit_tokens) == list(ceiling) and infinite.evictions == 0
    assert (hits(w, nb, mode="concurrent", options=opts) <= ceiling).all()


@FAST
@given(structured(), st.integers(0, 10))
def test_concurrent_without_overlap_is_sequential(reqs: list[list[int]], extra: int) -> None:
    """Requests that never overlap in time and generate nothing: concurrent == sequential."""
    w = Workload.from_token_lists(reqs, timestamps=[1000.0 * i for i in range(len(reqs))])
    nb = blocks_needed(reqs) + extra
    seq = simulate_one(w, B, nb)
    con = simulate_one(w, B, nb, mode="concurrent")
    assert list(seq.hit_tokens) == list(con.hit_tokens)
    assert (seq.evictions, seq.peak_blocks_in_use) == (con.evictions, con.peak_blocks_in_use)


@FAST
@given(structured(), st.integers(0, 10), st.lists(st.floats(0, 5), min_size=30, max_size=30))
def test_one_running_request_at_a_time_is_sequential(reqs: list[list[int]], extra: int, gaps: list[float]) -> None:
    """max_num_seqs=1, prefill only: whatever the (ordered) arrival times, requests queue and run
    one after the other, so concurrent mode equals sequential mode."""
    w = Workload.from_token_lists(reqs, timestamps=np.cumsum(gaps[: len(reqs)]))
    nb = blocks_needed(reqs) + extra
    con = simulate_one(w, B, nb, mode="concurrent", options=SimulateOptions(max_num_seqs=1))
    assert list(con.hit_tokens) == list(hits(w, nb))


@FAST
@given(structured(), st.integers(0, 20))
def test_warm_window_counts_only_requests_after_warmup(reqs: list[list[int]], warmup: int) -> None:
    w = Workload.from_token_lists(reqs)
    grid = simulate_grid(w, SimulateOptions(block_sizes=(B,), modes=("sequential",), policies=("lru",),
                                            num_blocks=(blocks_needed(reqs) + 2,), warmup=str(warmup)))
    per_request = pl.from_arrow(grid.sim_requests)
    rows = pl.from_arrow(grid.sim)
    for nb in rows["num_blocks"].unique().to_list():
        same = (pl.col("num_blocks").is_null() if nb is None else pl.col("num_blocks") == nb)
        g = per_request.filter(same)
        after = g.slice(warmup)
        warm = rows.filter(same & (pl.col("window") == "warm")).row(0, named=True)
        cold = rows.filter(same & (pl.col("window") == "cold")).row(0, named=True)
        assert warm["requests"] == after.height
        assert warm["queries"] == after["n_tokens"].sum()
        assert warm["hit_tokens"] == after["hit_tokens"].sum()
        assert cold["queries"] == g["n_tokens"].sum() and cold["hit_tokens"] == g["hit_tokens"].sum()


def same_result(a: object, b: object) -> bool:
    fields = ("hit_tokens", "scheduled", "n_tokens")
    return all(list(getattr(a, f)) == list(getattr(b, f)) for f in fields) and all(
        getattr(a, f) == getattr(b, f) for f in ("evictions", "peak_blocks_in_use", "preemptions"))


@FAST
@given(structured(), st.integers(1, 6), st.sampled_from(["auto", "reference"]))
def test_budgets_past_the_ceiling_run_blocks_are_the_ceiling_run(reqs: list[list[int]], extra: int, engine: str) -> None:
    """Sequential, every policy: a pool of at least the blocks the infinite run used gives
    exactly its result; one block fewer evicts (compiled: the threshold is tight)."""
    w = Workload.from_token_lists(reqs)
    ceiling = simulate_one(w, B, None, engine=engine)
    t = ceiling.exact_from
    assert t is not None and t >= blocks_needed(reqs)
    for nb in (t, t + extra):
        for policy in ("lru", "fifo", "belady"):
            assert same_result(simulate_one(w, B, nb, policy=policy, engine=engine), ceiling)
    if engine == "auto" and t - 1 >= blocks_needed(reqs):
        assert simulate_one(w, B, t - 1).evictions > 0


@FAST
@given(structured(), st.integers(1, 6), st.lists(st.tuples(st.floats(0, 0.05), st.integers(0, 12)), min_size=30, max_size=30),
       st.sampled_from(["auto", "reference"]), st.sampled_from([None, 6]))
def test_concurrent_budgets_past_the_ceiling_run_blocks_are_the_ceiling_run(
        reqs: list[list[int]], extra: int, shape: list[tuple[float, int]], engine: str, batched: int | None) -> None:
    """Concurrent (overlap, decode blocks, chunked prefill): the same, preemptions included."""
    w = Workload.from_token_lists(reqs, timestamps=np.cumsum([g for g, _ in shape[: len(reqs)]]),
                                  output_tokens=[o for _, o in shape[: len(reqs)]])
    opts = SimulateOptions(decode_tps=100.0, max_num_batched_tokens=batched, max_num_seqs=3)
    ceiling = simulate_one(w, B, None, mode="concurrent", options=opts, engine=engine)
    t = ceiling.exact_from
    assert t is not None
    for nb in (t, t + extra):
        assert same_result(simulate_one(w, B, nb, mode="concurrent", options=opts, engine=engine), ceiling)
        assert same_result(simulate_one(w, B, nb, mode="concurrent", options=opts,
                                        engine="reference" if engine == "auto" else "auto"), ceiling)


@FAST
@given(structured(), st.lists(st.tuples(st.floats(0, 0.05), st.integers(0, 12)), min_size=30, max_size=30))
def test_grid_rows_past_the_threshold_equal_simulating_them(reqs: list[list[int]], shape: list[tuple[float, int]]) -> None:
    """The grid reuses the ceiling run for budgets past its threshold: every row, on both
    sides of it, equals simulating that configuration on its own."""
    w = Workload.from_token_lists(reqs, timestamps=np.cumsum([g for g, _ in shape[: len(reqs)]]),
                                  output_tokens=[o for _, o in shape[: len(reqs)]])
    opts = SimulateOptions(block_sizes=(B,), decode_tps=100.0, reference_budgets=0)
    t = max(simulate_one(w, B, None, mode=m, options=opts).exact_from or 0 for m in opts.modes)
    lo = blocks_needed([r + [0] * o for r, (_, o) in zip(reqs, shape)])
    budgets = tuple(sorted({lo, max(lo, t - 1), t, t + 3}))
    grid = simulate_grid(w, replace(opts, num_blocks=budgets))
    rows = [r for r in grid.sim.to_pylist() if r["window"] == schema.WINDOW_COLD and r["num_blocks"] is not None]
    for row in rows:
        res = simulate_one(w, B, row["num_blocks"], mode=row["mode"], policy=row["policy"], options=opts,
                           engine="reference")
        tot = res.totals()
        assert (row["hit_tokens"], row["queries"], row["refused"]) == (tot["hit_tokens"], tot["queries"], tot["refused"])
        assert (row["evictions"], row["peak_blocks_in_use"], row["preemptions"]) == (
            res.evictions, res.peak_blocks_in_use, res.preemptions)
    assert len(rows) == len(budgets) * (len(opts.policies) + 2)  # + concurrent lru and caching off


def test_worker_threads_do_not_change_results() -> None:
    rng = np.random.default_rng(3)
    sys_prompt = list(rng.integers(1, 500, 30))
    reqs = [sys_prompt + list(rng.integers(1, 500, int(rng.integers(1, 20)))) for _ in range(30)]
    w = Workload.from_token_lists(reqs, timestamps=np.cumsum(rng.exponential(0.01, 30)),
                                  output_tokens=rng.integers(1, 40, 30))
    opts = SimulateOptions(block_sizes=(B, 8), sweep_points=4, workers=1)
    one = simulate_grid(w, opts)
    two = simulate_grid(w, replace(opts, workers=2))
    assert opts.workers == 1 and replace(opts, workers=2).workers == 2
    assert one.sim.equals(two.sim) and one.sim_requests.equals(two.sim_requests)
    assert "workers" not in opts.as_dict()


def test_warmup_forms() -> None:
    w = Workload.from_token_lists([[1]] * 10, timestamps=[float(i) for i in range(10)])
    assert warm_mask(w, "50%").sum() == 5
    assert warm_mask(w, "3").sum() == 7
    assert warm_mask(w, "7.5s").sum() == 2
    with pytest.raises(AdvisorError, match="--warmup"):
        warm_mask(w, "soon")
    with pytest.raises(AdvisorError, match="timestamps"):
        warm_mask(Workload.from_token_lists([[1]] * 3), "5s")


# --- stories ---
def test_pinned_running_request_costs_hits_that_sequential_keeps() -> None:
    """8 blocks of 4 tokens. X (12-token prompt, 9 output tokens) runs from t=0 to ~0.8 s and
    pins 5 blocks from t=0.5 s. Sa = S+a arrives at 0.6 s and caches S's two blocks; F, an
    unrelated prompt, arrives at 0.65 s and needs 3 blocks: concurrently only 3 are free, so
    it evicts S's blocks and Sb (0.7 s) misses. One at a time, X's blocks are free again,
    F takes X's, and Sb hits all of S (8 tokens)."""
    s = [1, 2, 3, 4, 5, 6, 7, 8]
    reqs = [list(range(100, 112)), s + [9], [200 + i for i in range(9)], s + [10]]
    w = Workload.from_token_lists(reqs, timestamps=[0.0, 0.6, 0.65, 0.7], output_tokens=[9, 0, 0, 0])
    opts = SimulateOptions(decode_tps=10.0)
    seq = hits(w, 8)
    con = hits(w, 8, mode="concurrent", options=opts)
    assert list(seq) == [0, 0, 0, 8]
    assert list(con) == [0, 0, 0, 0]
    assert list(hits(w, None, mode="concurrent", options=opts)) == [0, 0, 0, 8]


def test_preemption_frees_the_latest_request_and_still_finishes_all() -> None:
    """Two long generations in a pool that holds one of them at full length: the later one is
    preempted (recompute), waits, and both finish; hits are counted once per request."""
    reqs = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]]
    w = Workload.from_token_lists(reqs, timestamps=[0.0, 0.001], output_tokens=[12, 12])
    res = simulate_one(w, B, 5, mode="concurrent", options=SimulateOptions(decode_tps=100.0))
    assert res.preemptions >= 1
    assert res.scheduled.all()
    assert list(res.hit_tokens) == [0, 4]


def test_preempted_request_resumes_on_its_own_cached_blocks() -> None:
    """6 blocks of 4 tokens; A (8 tokens) and B (7) arrive together, 9 output tokens each.
    Both are admitted in step 1 (4 blocks); decoding takes the last 2; in step 6 A needs a
    fifth block and vLLM preempts the END of the running queue, B, after 5 of its tokens.
    B's freed blocks stay cached (A takes the unhashed tail block); when A finishes, B
    recomputes prompt + output (12 tokens) and hits its prompt block AND its first decode
    block: 8 tokens, counted as preempted hits, while its reported hit stays the first 0."""
    reqs = [[1, 2, 3, 4, 5, 6, 7, 8], [11, 12, 13, 14, 15, 16, 17]]
    pool = refcache.PrefixCache(6, B)
    res = events.run_concurrent(pool, [refcache.request_block_hashes(r, B) for r in reqs], np.array([8, 7]),
                                np.array([9, 9]), np.zeros(2), StepTimeModel.from_rates(10_000.0, 50.0), 256)
    assert res.preemptions == 1 and list(res.hit_tokens) == [0, 0] and res.scheduled.all()
    assert (pool.queries, pool.hits) == (15, 0)
    assert (pool.preempted_queries, pool.preempted_hits) == (12, 8)
    assert res.steps == 9 + 4  # A: prefill + 8 decodes; B resumes after A and samples its last 4


def test_logged_latencies_calibrate_the_step_clock() -> None:
    """Rates from the log: median prompt/ttft, and median (O - 1)/(latency - ttft) over
    requests that decoded; requests without times, or with one output token, do not vote;
    --no-logged-latency keeps the given rates."""
    prompt, out = np.array([1000, 2000, 500, 800]), np.array([11, 21, 1, 5])
    ttft, latency = np.array([0.2, 0.4, 0.05, np.nan]), np.array([0.6, 1.4, 0.05, np.nan])
    clock = SimulateOptions(prefill_tps=1.0, decode_tps=1.0, workers=1).step_time_model(prompt, out, latency, ttft)
    assert clock.flat_prefill_tps == pytest.approx(5000.0)  # 5000, 5000, 10000
    assert clock.decode_tps == pytest.approx(22.5)  # 10 / 0.4 and 20 / 1.0
    ignored = SimulateOptions(use_logged_latency=False, workers=1).step_time_model(prompt, out, latency, ttft)
    assert (ignored.flat_prefill_tps, ignored.decode_tps) == (10_000.0, 50.0)
    nothing = SimulateOptions(workers=1).step_time_model(prompt, out, np.full(4, np.nan), None)
    assert (nothing.flat_prefill_tps, nothing.decode_tps) == (10_000.0, 50.0)


def test_the_clock_is_the_roofline_with_a_model_and_a_catalog_gpu() -> None:
    assert SimulateOptions(workers=1).clock == "flat"
    assert SimulateOptions(model="llama-3.1-8b", gpu="h100", workers=1).clock == "roofline"
    assert SimulateOptions(model="llama-3.1-8b", gpu="80", workers=1).clock == "flat"  # GiB only: no peaks
    with pytest.raises(AdvisorError, match="roofline clock needs --model"):
        SimulateOptions(gpu="h100", clock="roofline", workers=1)


def test_too_long_request_is_refused_not_counted() -> None:
    w = Workload.from_token_lists([[1] * 9, [2] * 30, [1] * 9])
    res = simulate_one(w, B, 4)
    assert list(res.scheduled) == [True, False, True]
    t = res.totals()
    assert t["refused"] == 1 and t["queries"] == 18


def test_lora_and_cache_salt_separate_caches() -> None:
    p = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    w = Workload.from_token_lists([p, p, p, p], lora=[None, "a", "a", None], cache_salt=[None, None, None, "s"])
    assert list(hits(w, None)) == [0, 0, 8, 0]


def test_requests_for_different_models_never_share_a_block(tmp_path: Path) -> None:
    """One engine serves one model: the same prompt under another model is a miss. Within a
    model, hits as usual; a single-model log keeps its own cache salts unchanged."""
    p = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    run = write_run(tmp_path / "two", [p, p, p, p], models=["a", "b", "a", None])
    w = load_workload(run / "requests.parquet", run / "tokens.parquet")
    assert w.models == ("", "a", "b")
    for mode in ("sequential", "concurrent"):
        assert list(hits(w, None, mode=mode)) == [0, 0, 8, 0]
    grid = simulate_grid(w, SimulateOptions(block_sizes=(B,), modes=("sequential",), policies=("lru",)))
    assert any("3 models in this log" in n for n in grid.notes)
    one = write_run(tmp_path / "one", [p, p], models=["a", "a"])
    w1 = load_workload(one / "requests.parquet", one / "tokens.parquet")
    assert w1.cache_salt == [None, None] and list(hits(w1, None)) == [0, 8]
    grid = simulate_grid(w1, SimulateOptions(block_sizes=(B,), modes=("sequential",), policies=("lru",)))
    assert not any("models in this log" in n for n in grid.notes)


# --- requests vLLM treats apart: n > 1, prompt logprobs, speculative decoding ---
P9 = [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_n_children_arrive_together_and_hit_the_first_childs_blocks() -> None:
    """n = 3: three requests with one prompt; the 2nd and 3rd hit the blocks the 1st cached.
    Reported per logged request: queries and hits summed over its children."""
    w = Workload.from_token_lists([P9, [7] * 9, P9], n=[3, 1, 2])
    assert w.fan_out.tolist() == [0, 0, 0, 1, 2, 2]
    for engine in ("auto", "reference"):
        for mode in ("sequential", "concurrent"):
            res = simulate_one(w, B, 40, mode=mode, engine=engine)
            assert res.hit_tokens.tolist() == [16, 0, 16] and res.n_tokens.tolist() == [27, 9, 18], (engine, mode)
            assert res.totals() == {"requests": 3, "queries": 54, "hit_tokens": 32, "hit_rate": 32 / 54, "refused": 0}
    res = simulate_one(w, B, 40, options=SimulateOptions(speculative="eagle", vllm_version="0.32", workers=1))
    assert res.hit_tokens.tolist() == [8, 0, 8]  # each child's 2-block hit drops one (0.32's EAGLE rule)
    res = simulate_one(w, B, 40, options=SimulateOptions(speculative="eagle", vllm_version="0.34", workers=1))
    assert res.hit_tokens.tolist() == [16, 0, 16]  # 0.34 drops nothing (its lookahead hashes are not modelled)


def test_prompt_logprob_requests_hit_nothing_count_nothing_and_still_cache_their_blocks() -> None:
    w = Workload.from_token_lists([P9, P9, [5] * 9, [5] * 9], skip_prefix_cache=[False, True, True, False])
    for engine in ("auto", "reference"):
        for nb in (None, 3, 40):
            res = simulate_one(w, B, nb, engine=engine)
            assert res.hit_tokens.tolist() == [0, 0, 0, 8] and res.n_tokens.tolist() == [9, 0, 0, 9], (engine, nb)
            assert res.totals() == {"requests": 4, "queries": 18, "hit_tokens": 8, "hit_rate": 8 / 18, "refused": 0}
    assert simulate_one(w, B, 2).totals()["refused"] == 4  # 3 blocks each: refused, skipping or not


def test_which_requests_skip_the_cache_read_follows_vllms_openai_server() -> None:
    """Prompt logprobs asked; or echo: a chat request always asks then (top_logprobs is never
    null), a completion only with logprobs."""
    kinds = ["chat", "chat", "chat", "completion", "completion", "tokens", "completion", "chat"]
    table = pa.table({"kind": kinds,
                      "prompt_logprobs": pa.array([None, 0, None, None, None, None, -1, None], pa.int64()),
                      "echo": [False, False, True, True, True, True, False, None],
                      "logprobs": pa.array([None, None, None, None, 0, 3, None, 5], pa.int64())})
    assert skips_prefix_cache(table).tolist() == [False, True, True, False, True, True, True, False]
    assert skips_prefix_cache(table.select(["kind"])).tolist() == [False] * 8  # a run from before the columns


@FAST
@given(structured(), st.integers(0, 8), st.data())
def test_fanned_out_workloads_equal_their_children_simulated_one_by_one(reqs: list[list[int]], extra: int,
                                                                       data: st.DataObject) -> None:
    """A workload with n and skip flags equals the workload of its children written out (n = 1),
    summed back per logged request; compiled equals reference, in every policy."""
    n = data.draw(st.lists(st.integers(1, 3), min_size=len(reqs), max_size=len(reqs)))
    skip = data.draw(st.lists(st.booleans(), min_size=len(reqs), max_size=len(reqs)))
    speculative = data.draw(st.sampled_from([None, "eagle", "ngram"]))
    opts = SimulateOptions(speculative=speculative, vllm_version="0.32", workers=1)
    w = Workload.from_token_lists(reqs, n=n, skip_prefix_cache=skip)
    children = Workload.from_token_lists([r for r, k in zip(reqs, n) for _ in range(k)],
                                         skip_prefix_cache=[s for s, k in zip(skip, n) for _ in range(k)])
    line = np.repeat(np.arange(len(reqs)), n)
    for nb, policy in ((None, "lru"), (blocks_needed(reqs) + extra, "lru"), (blocks_needed(reqs) + extra, "fifo"),
                       (blocks_needed(reqs) + extra, "belady")):
        fast = simulate_one(w, B, nb, policy=policy, options=opts)
        ref = simulate_one(w, B, nb, policy=policy, options=opts, engine="reference")
        one_by_one = simulate_one(children, B, nb, policy=policy, options=opts)
        assert fast.hit_tokens.tolist() == ref.hit_tokens.tolist()
        assert (fast.evictions, fast.peak_blocks_in_use) == (ref.evictions, ref.peak_blocks_in_use)
        assert fast.hit_tokens.tolist() == np.bincount(line, one_by_one.hit_tokens, len(reqs)).astype(int).tolist()
        assert fast.n_tokens.tolist() == np.bincount(line, one_by_one.n_tokens, len(reqs)).astype(int).tolist()
        assert fast.totals() == {**one_by_one.totals(), "requests": len(reqs)}


@FAST
@given(structured(), st.integers(0, 8), st.data())
def test_concurrent_fan_out_skips_and_eagle_compiled_equal_the_reference(reqs: list[list[int]], extra: int,
                                                                         data: st.DataObject) -> None:
    """Concurrent mode with n > 1, prompt-logprob requests and 0.32's EAGLE rule: the compiled
    loop, given the flags by `simulate_one`, equals the reference loop over PrefixCache."""
    if not {"skip_prefix_cache", "speculative"} <= set(inspect.signature(run_concurrent_compiled).parameters):
        pytest.skip("advisor/sim/fast/events.py does not take the request flags yet")
    k = len(reqs)
    w = Workload.from_token_lists(
        reqs, timestamps=np.cumsum(data.draw(st.lists(st.floats(0, 0.05), min_size=k, max_size=k))),
        output_tokens=data.draw(st.lists(st.integers(0, 12), min_size=k, max_size=k)),
        n=data.draw(st.lists(st.integers(1, 3), min_size=k, max_size=k)),
        skip_prefix_cache=data.draw(st.lists(st.booleans(), min_size=k, max_size=k)))
    opts = SimulateOptions(decode_tps=100.0, speculative=data.draw(st.sampled_from([None, "eagle"])),
                           vllm_version="0.32", workers=1)
    nb = blocks_needed(reqs) + 3 + extra
    fast = simulate_one(w, B, nb, mode="concurrent", options=opts)
    ref = simulate_one(w, B, nb, mode="concurrent", options=opts, engine="reference")
    assert fast.hit_tokens.tolist() == ref.hit_tokens.tolist() and fast.n_tokens.tolist() == ref.n_tokens.tolist()
    assert (fast.evictions, fast.peak_blocks_in_use, fast.preemptions) == (ref.evictions, ref.peak_blocks_in_use,
                                                                           ref.preemptions)


def test_the_grid_notes_skipped_and_fanned_out_requests_and_speculative_decoding() -> None:
    w = Workload.from_token_lists([P9, P9, P9], n=[1, 4, 1], skip_prefix_cache=[False, False, True])
    grid = simulate_grid(w, SimulateOptions(block_sizes=(B,), policies=("lru",), speculative="eagle",
                                            vllm_version="0.32", workers=1))
    text = "\n".join(grid.notes)
    assert "1 requests ask for prompt logprobs" in text
    assert "1 requests ask for n > 1 completions: vLLM runs them as 4 requests" in text
    assert "eagle, whose drafter makes vLLM 0.32 drop the last matched block of every cache hit" in text
    per = grid.sim_requests.filter(pa.compute.is_null(grid.sim_requests["num_blocks"]))
    seq = per.filter(pa.compute.equal(per["mode"], "sequential")).to_pydict()
    assert (seq["n_tokens"], seq["hit_tokens"]) == ([9, 36, 0], [0, 16, 0])  # 4 children x 1 block (eagle)
    cold = grid.sim.filter(pa.compute.and_(pa.compute.is_null(grid.sim["num_blocks"]),
                                           pa.compute.equal(grid.sim["window"], "cold"))).to_pylist()
    seq_cold = [(r["requests"], r["queries"], r["hit_tokens"]) for r in cold if r["mode"] == "sequential"]
    assert seq_cold == [(3, 45, 16)]
    if not {"skip_prefix_cache", "speculative"} <= set(inspect.signature(run_concurrent_compiled).parameters):
        assert "concurrent mode does not model" in text  # until advisor/sim/fast/events.py takes them
    plain = simulate_grid(Workload.from_token_lists([P9]), SimulateOptions(block_sizes=(B,), workers=1))
    assert any("speculative decoding: not modelled" in n for n in plain.notes)
    newer = simulate_grid(w, SimulateOptions(block_sizes=(B,), speculative="mtp", vllm_version="0.34", workers=1))
    assert any("mtp; vLLM 0.34 hashes each block together with the token after it" in n for n in newer.notes)
    ngram = simulate_grid(w, SimulateOptions(block_sizes=(B,), speculative="ngram", vllm_version="0.32", workers=1))
    assert any("ngram, which leaves vLLM 0.32's cache hits as they are" in n for n in ngram.notes)
    with pytest.raises(AdvisorError, match="unknown speculative method 'eagle9'"):
        SimulateOptions(speculative="eagle9")


def test_a_run_folder_carries_n_and_the_skip_flags_to_the_workload(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [P9, P9, P9])
    req = pq.read_table(run / "requests.parquet")
    for name, values in (("n", [1, 3, None]), ("prompt_logprobs", [None, None, 2])):
        req = req.set_column(req.schema.get_field_index(name), name, pa.array(values, pa.int64()))
    pq.write_table(req, run / "requests.parquet")
    w = load_workload(run / "requests.parquet", run / "tokens.parquet")
    assert w.n.tolist() == [1, 3, 1] and w.skip_prefix_cache.tolist() == [False, False, True]
    res = CliRunner().invoke(main, ["simulate", str(run), "--block-sizes", "4", "--speculative", "mtp",
                                    "--vllm-version", "0.32", "--json"])
    assert res.exit_code == 0, res.output
    notes = json.loads(res.stdout)["stages"]["simulate"]["notes"]
    assert any("mtp, whose drafter" in n for n in notes) and any("n > 1" in n for n in notes)
    bad = CliRunner().invoke(main, ["simulate", str(run), "--speculative", "eagle9"])
    assert bad.exit_code == 2 and "eagle9" in bad.output


def test_replay_predicts_requests_treated_apart_as_it_replays_them() -> None:
    """The replay sends each logged request once, without n or prompt logprobs: its prediction
    is then the simulator on what it sends, not sim_requests.parquet's per-request sums."""
    w = Workload.from_token_lists([P9, P9, P9], n=[1, 2, 1], skip_prefix_cache=[False, False, True])
    view = plan.from_workload(w)
    assert view.treated_apart == 2
    grid = simulate_grid(w, SimulateOptions(block_sizes=(B,), num_blocks=(40,), modes=("sequential",),
                                            policies=("lru",), workers=1))
    hits, source = plan.predicted_hits(view, plan.ReplayConfig(B, 40), plan.EngineOptions(), grid.sim_requests)
    assert (hits, source) == ([0, 8, 8], "simulate_one (sequential)")
    plain = plan.from_workload(Workload.from_token_lists([P9, P9]))
    assert plain.treated_apart == 0


def test_cache_namespaces_keep_the_salt_and_add_the_model_only_when_needed() -> None:
    assert cache_namespaces(["m", "m"], [None, "s"]) == [None, "s"]
    assert cache_namespaces([None, None], [None, None]) == [None, None]
    got = cache_namespaces(["a", "b", "a", None], [None, None, "s", None])
    assert got == ["model=a", "model=b", "model=a|salt=s", "model="]
    assert len(set(got)) == 4


def test_hash_trace_simulates_at_its_block_size_only(tmp_path: Path) -> None:
    """A Mooncake-style trace: hits follow shared hash-id prefixes, capped at (L-1)//B blocks;
    the partial last block (input_length not a multiple of 512) is never hashed."""
    ids = [[1, 2, 3], [1, 2, 4], [1, 2, 3, 5], [9]]
    lengths = [3 * 512, 2 * 512 + 100, 4 * 512, 300]
    w = Workload.from_hash_trace(ids, lengths, 512)
    assert list(simulate_one(w, 512, None).hit_tokens) == [0, 1024, 1536, 0]
    with pytest.raises(AdvisorError, match="--block-sizes 512"):
        simulate_one(w, 16, None)
    grid = simulate_grid(w, SimulateOptions(block_sizes=(512,), budget_tokens=(4 * 512, 8 * 512)))
    assert set(grid.sim["num_blocks"].drop_null().to_pylist()) == {4, 8}


def test_model_catalog_budget_is_kv_bytes_over_bytes_per_block() -> None:
    """llama-3.1-8b: 32 layers x 8 KV heads x 128 dims x K and V x 2 bytes = 128 KiB per token;
    1 GiB at block size 16 is 2**30 // (16 * 128 KiB) = 512 blocks, one of them vLLM's null block."""
    geom = kv.resolve_model("llama-3.1-8b")
    w = Workload.from_token_lists([[1] * 20])
    budgets, _ = plan_budgets(w, SimulateOptions(kv_cache_gib=(1.0,)), geom, 16, block_trace(w, 16))
    assert budgets == [2**30 // (16 * 32 * 8 * 128 * 2 * 2) - 1]
    grid = simulate_grid(w, SimulateOptions(block_sizes=(16,), kv_cache_gib=(1.0,), modes=("sequential",)), geom)
    gib = [g for g in grid.sim["kv_gib"].to_pylist() if g is not None]
    assert gib and all(abs(g - 1.0) < 1e-9 for g in gib)
    with pytest.raises(AdvisorError, match="--model"):
        plan_budgets(w, SimulateOptions(kv_cache_gib=(1.0,)), None, 16, block_trace(w, 16))


def test_default_sweep_spans_the_working_set_and_flattens() -> None:
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 1000, 40)) for _ in range(6)]
    reqs = [docs[int(rng.integers(0, 6))] + list(rng.integers(1, 1000, 5)) for _ in range(60)]
    w = Workload.from_token_lists(reqs)
    grid = simulate_grid(w, SimulateOptions(block_sizes=(B,), modes=("sequential",), policies=("lru",)))
    cold = pl.from_arrow(grid.sim).filter(pl.col("window") == "cold")
    budgets = cold["num_blocks"].drop_nulls()
    assert len(budgets) >= 8
    ws = len({tuple(r[: (j + 1) * B]) for r in reqs for j in range(len(r) // B)})
    assert budgets.min() <= max(0.05 * ws, blocks_needed(reqs)) and budgets.max() >= ws
    rates = cold.drop_nulls("num_blocks").sort("num_blocks")["hit_rate"].to_numpy()
    assert (np.diff(rates) >= 0).all()
    assert rates[0] < rates[-1] == pytest.approx(cold["ceiling_hit_rate"][0])


# --- CLI ---
def test_cli_concurrent_mode_schedules_like_vllm_serve_on_the_given_gpu(tmp_path: Path) -> None:
    """--gpu sets vllm serve's own batch defaults for concurrent mode; explicit flags win."""
    reqs = [[1, 2, 3, 4, 5, 6, 7, 8, 9]] * 4
    run = write_run(tmp_path / "run", reqs, output_tokens=[3] * 4)
    base = ["simulate", str(run), "--block-sizes", "4", "--num-blocks", "8", "--json", "--force"]

    def notes(*extra: str) -> list[str]:
        res = CliRunner().invoke(main, [*base, *extra])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)["stages"]["simulate"]["notes"]

    # never unlimited: without --gpu, vLLM's own fallback tier, and the note says so
    assert notes()[0] == ("concurrent mode: --max-num-seqs 256, --max-num-batched-tokens 2048 (vLLM's "
                          "defaults for a GPU it does not size up for; give --gpu for yours)")
    assert notes("--model", "llama-3.1-8b", "--gpu", "h100")[0] == (
        "concurrent mode: --max-num-seqs 1024, --max-num-batched-tokens 8192 (vllm serve's defaults on h100)")
    assert notes("--model", "llama-3.1-8b", "--gpu", "h100", "--max-num-seqs", "64")[0] == (
        "concurrent mode: --max-num-seqs 64, --max-num-batched-tokens 8192 (as given; vllm serve's defaults on "
        "h100 otherwise)")


def test_cli_concurrent_mode_schedules_async_on_a_gpu_and_sync_otherwise(tmp_path: Path) -> None:
    """vLLM runs AsyncScheduler by default on GPUs and the synchronous one on CPU; the note
    says which the run used and why, and --scheduling overrides; the results follow it."""
    reqs = [[1, 2, 3, 4, 5, 6, 7, 8, 9]] * 4
    run = write_run(tmp_path / "run", reqs, output_tokens=[3] * 4)
    base = ["simulate", str(run), "--block-sizes", "4", "--num-blocks", "8", "--json", "--force"]

    def note(*extra: str) -> str:
        res = CliRunner().invoke(main, [*base, *extra])
        assert res.exit_code == 0, res.output
        return next(n for n in json.loads(res.stdout)["stages"]["simulate"]["notes"] if "scheduling," in n)

    assert note().startswith("concurrent mode: sync scheduling, vLLM's synchronous Scheduler")
    assert note().endswith("(no --gpu given; --scheduling sync|async sets it)")
    assert note("--model", "llama-3.1-8b", "--gpu", "h100").startswith("concurrent mode: async scheduling, vLLM's "
                                                                         "AsyncScheduler")
    assert "(as given;" in note("--model", "llama-3.1-8b", "--gpu", "h100", "--scheduling", "sync")
    bad = CliRunner().invoke(main, [*base, "--max-num-seqs", "300", "--max-num-batched-tokens", "256"])
    assert bad.exit_code != 0 and "must be at least --max-num-seqs (300)" in bad.output


def test_cli_simulate_writes_both_artifacts_and_skips_when_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    sys_prompt = list(rng.integers(1, 500, 70))
    reqs = [sys_prompt + list(rng.integers(1, 500, int(rng.integers(1, 30)))) for _ in range(40)]
    run = write_run(tmp_path / "run", reqs, output_tokens=[10] * 40)
    args = ["simulate", str(run), "--block-sizes", "16,32", "--sweep-points", "8", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)["stages"]["simulate"]
    assert out["skipped"] is False and out["requests"] == 40
    sim = pq.read_table(run / "sim.parquet")
    assert set(schema.SIM.names) <= set(sim.column_names)
    assert set(sim["block_size"].to_pylist()) == {16, 32}
    assert set(sim["policy"].to_pylist()) == {"lru", "fifo", "belady", "off"}
    assert set(sim["mode"].to_pylist()) == {"sequential", "concurrent"}
    # concurrent rows carry times on the clock; caching off is their baseline and never hits
    rows = sim.to_pylist()
    conc = [r for r in rows if r["mode"] == "concurrent" and r["num_blocks"] is not None]
    assert all(r["ttft_p50_s"] is not None and r["throughput_rps"] > 0 for r in conc)
    assert all(r["ttft_p50_s"] is None for r in rows if r["mode"] == "sequential")
    off = [r for r in conc if r["policy"] == "off"]
    assert off and all(r["hit_tokens"] == 0 and r["evictions"] == 0 for r in off)
    on = {(r["block_size"], r["num_blocks"], r["window"]): r for r in conc if r["policy"] == "lru"}
    for r in off:  # the shared system prompt makes prefill cheaper with caching on
        assert on[(r["block_size"], r["num_blocks"], r["window"])]["prefill_s"] < r["prefill_s"]
    ceiling = sim.filter(pa.compute.is_null(sim["num_blocks"]))
    assert ceiling.num_rows == 2 * 2 * 2  # block sizes x modes x windows
    per_req = pq.read_table(run / "sim_requests.parquet")
    assert per_req.schema.equals(schema.SIM_REQUESTS)
    assert json.loads((run / "manifest.json").read_text())["stages"]["simulate"]["options"]["block_sizes"] == [16, 32]
    again = CliRunner().invoke(main, args[:-1])
    assert again.exit_code == 0 and "skipped" in again.output


def test_cli_simulate_explains_missing_inputs_and_bad_block_size(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["simulate", str(tmp_path / "empty")])
    assert res.exit_code == 1 and "pc-advise ingest" in res.output
    run = write_run(tmp_path / "run", [[1, 2, 3]])
    res = CliRunner().invoke(main, ["simulate", str(run), "--block-sizes", "0"])
    assert res.exit_code == 1 and "positive" in res.output


def test_cli_simulates_a_hash_trace_at_its_block_size(tmp_path: Path) -> None:
    ids = [[1, 2, 3], [1, 2, 4], [1, 2, 3, 5], [9]]
    lengths = [3 * 512, 2 * 512 + 100, 4 * 512, 300]
    n = len(ids)
    requests = {name: [None] * n for name in schema.REQUESTS.names}
    requests.update(request_id=[f"t{i}" for i in range(n)], line=list(range(1, n + 1)),
                    kind=[schema.KIND_HASH_TRACE] * n, format=[schema.FORMAT_HASH_TRACE] * n,
                    timestamp=[0.0, 1.0, 2.0, 3.0], hash_ids=ids, input_length=lengths,
                    trace_block_size=[512] * n, output_tokens=[5] * n)
    run = tmp_path / "trace"
    run.mkdir()
    pq.write_table(pa.Table.from_pydict(requests, schema=schema.REQUESTS), run / "requests.parquet")
    tokens = {name: [None] * n for name in schema.TOKENS.names}
    tokens.update(request_id=requests["request_id"], n_tokens=lengths)
    pq.write_table(pa.Table.from_pydict(tokens, schema=schema.TOKENS), run / "tokens.parquet")
    res = CliRunner().invoke(main, ["simulate", str(run), "--budget-tokens", "4096"])
    assert res.exit_code == 0, res.output
    sim = pl.read_parquet(run / "sim.parquet")
    assert sim["block_size"].unique().to_list() == [512]
    assert sorted(sim["num_blocks"].unique().to_list(), key=lambda x: (x is not None, x)) == [None, 8]
    ceiling = sim.filter(pl.col("num_blocks").is_null() & (pl.col("window") == "cold")).row(0, named=True)
    assert ceiling["hit_tokens"] == 1024 + 1536 and ceiling["queries"] == sum(lengths)
    res = CliRunner().invoke(main, ["simulate", str(run), "--block-sizes", "16"])
    assert res.exit_code == 1 and "--block-sizes 512" in res.output


def test_run_takes_simulate_options_and_defines_each_flag_once() -> None:
    """simulate_options goes on `run` too; flags other stages share (--workers, --speedup) exist once."""
    for name in ("run", "simulate"):
        flags = [o for p in main.commands[name].params for o in getattr(p, "opts", [])]
        assert len(flags) == len(set(flags)), name
        assert {"--block-sizes", "--num-blocks", "--warmup", "--max-num-seqs"} <= set(flags)
