"""The replica grid: N vLLM engines behind each router, at one block size's reference budgets.

Inputs: a `Workload`, a block size and its `BlockTrace`, the budgets to run (usable blocks PER
REPLICA: each engine has its own pool, as vLLM sizes one per engine), the `SimulateOptions`
(`replicas`, `routers`, `prefix_hash_blocks`, `router_load_weight`, the concurrent mode's clock,
batch limits and scheduling) and each budget's KV GiB. Output: replicas.parquet rows
(schema.REPLICAS), one per budget x replica count x router, over the whole log (cold window).

Each row is advisor.sim.routing.run_replicas on the readable reference engine
(advisor.sim.events.Engine, pure Python: on the order of 50k requests a minute on one core,
docs/simulate.md), so the grid runs only where `replicas` lists a count above 1, and only at the
reference budgets). One replica is the single engine whatever the router (tested), so its
run is shared by every router's row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from advisor import schema
from advisor.sim.cache import PrefixCache
from advisor.sim.configuration import (
    SCHEDULING_ASYNC,
    ConfigResult,
    SimulateOptions,
    Timing,
    TraceHashes,
    scheduler_requests,
)
from advisor.sim.fast import trace as fasttrace
from advisor.sim.routing import ReplicaResult, run_replicas
from advisor.workload import Workload


def wants_replicas(options: SimulateOptions) -> bool:
    """Whether the stage runs the replica grid (a count above 1, concurrent mode on)."""
    return any(r > 1 for r in options.replicas) and schema.MODE_CONCURRENT in options.modes


def count_replica_configs(options: SimulateOptions, budgets_per_block_size: int) -> int:
    """Runs of the replica grid (a progress bar's share): one single engine per budget, plus
    every router at every count above 1."""
    if not wants_replicas(options):
        return 0
    many = sum(1 for r in set(options.replicas) if r > 1)
    return len(options.block_sizes) * budgets_per_block_size * (1 + many * len(options.routers))


def replica_rows(workload: Workload, block_size: int, trace: fasttrace.BlockTrace, budgets: list[int],
                 options: SimulateOptions, kv_gib: Callable[[int], float | None],
                 tick: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """schema.REPLICAS rows at `block_size` for every budget (per replica) in `budgets`."""
    reqs = scheduler_requests(workload)
    n_tokens = reqs.n_tokens
    skip = reqs.skip_prefix_cache if reqs.skip_prefix_cache.any() else None
    queries = n_tokens if skip is None else np.where(skip, 0, n_tokens)
    arrivals = reqs.take(workload.arrivals(options.speedup))
    outputs = reqs.output_tokens
    clock = options.step_time_model(n_tokens, outputs, reqs.take(workload.latency_s), reqs.take(workload.ttft_s))
    sessions = (list(reqs.take(np.asarray(workload.sessions, dtype=object)))
                if len(workload.sessions) == workload.num_requests else None)
    hashes = TraceHashes(trace)
    counts = sorted(set(options.replicas))
    rows: list[dict[str, Any]] = []
    for nb in budgets:
        def make_cache(nb: int = nb) -> PrefixCache:
            return PrefixCache(nb, block_size, schema.POLICY_LRU, speculative=options.speculative,
                               vllm_version=options.vllm_version)

        single: ReplicaResult | None = None
        for count in counts:
            for router in options.routers:
                if count == 1 and single is not None:
                    res = single  # one engine: every router's run is the same
                else:
                    res = run_replicas(make_cache, hashes, n_tokens, outputs, arrivals, clock, options.max_num_seqs,
                                       replicas=count, router=router, sessions=sessions,
                                       max_num_batched_tokens=options.max_num_batched_tokens,
                                       async_scheduling=options.scheduling == SCHEDULING_ASYNC,
                                       skip_prefix_cache=skip, prefix_hash_blocks=options.prefix_hash_blocks,
                                       load_weight=options.router_load_weight)
                    if tick is not None:
                        tick(1)
                    if count == 1:
                        single = res
                rows.append(_row(workload, block_size, nb, kv_gib(nb), count, router, res, queries, outputs))
    return rows


def _row(workload: Workload, block_size: int, nb: int, kv_gib: float | None, count: int, router: str,
         res: ReplicaResult, queries: np.ndarray, outputs: np.ndarray) -> dict[str, Any]:
    """One row: the run per logged request (children summed, as sim.parquet counts them)."""
    reqs = scheduler_requests(workload)
    timing = Timing(res.ttft_s, res.e2e_s, max(r.makespan_s for r in res.per_replica),
                    sum(r.busy_s for r in res.per_replica), sum(r.prefill_s for r in res.per_replica),
                    int(np.maximum(outputs, 1)[res.scheduled].sum()))
    per_line = reqs.per_line(workload, ConfigResult(
        block_size, nb, schema.POLICY_LRU, schema.MODE_CONCURRENT, queries, res.hit_tokens, res.scheduled,
        res.evictions, 0, res.preemptions, runnable=reqs.n_tokens > 0, timing=timing))
    t = per_line.totals()
    assert per_line.timing is not None
    stats = per_line.timing.stats()
    return {
        "block_size": block_size, "num_blocks": nb, "kv_gib": kv_gib, "replicas": count, "router": router,
        **t, "evictions": res.evictions, "preemptions": res.preemptions,
        **{k: stats[k] for k in ("ttft_p50_s", "ttft_p95_s", "e2e_p50_s", "e2e_p95_s", "makespan_s")},
        "load_spread": res.load_spread, "fallbacks": res.fallbacks,
    }
