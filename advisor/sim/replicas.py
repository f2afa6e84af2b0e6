"""The replica grid: N vLLM engines behind each router, at one block size's reference budgets.

Inputs: a `Workload`, a block size and its `BlockTrace`, the budgets to run (usable blocks PER
REPLICA: each engine has its own pool, as vLLM sizes one per engine), the `SimulateOptions`
(`replicas`, `routers`, `prefix_hash_blocks`, `router_load_weight`, `modes`, the concurrent
mode's clock, batch limits and scheduling) and each budget's KV GiB. Output: replicas.parquet
rows (schema.REPLICAS), one per mode x budget x replica count x router (sequential rows
first), over the whole log (cold window).

Each row is one `simulate_replicas` run: advisor.sim.fast.routing's compiled twins of
advisor.sim.routing's `run_replicas` (concurrent) and `run_replicas_sequential` (sequential),
tested equal to them (tests/test_fastrouting.py); `engine="reference"` runs the references.
The grid runs where `replicas` lists a count above 1, in each mode of `modes`, at the reference
budgets; its runs go to `options.workers` threads (the kernels release the GIL), or to Ray tasks
when the stage runs on Ray (docs/scale.md). One replica is
the single engine whatever the router (tested), so its run is shared by every router's row.

For the replay (advisor.replay confirms sequential mode to the token, per replica):
`simulate_replicas(workload, block_size, num_blocks, replicas=N, router=..., mode="sequential",
options=...)` gives, per logged request, the replica it went to (`ReplicaRun.replica`; the n
children of a request asking for n completions go where the first went) and its hit tokens
there (`ReplicaRun.config.hit_tokens`), and per replica the totals (`ReplicaRun.per_replica`).
Routes depend on the block size (prefix-hash keys and cache-aware lookups are on its blocks),
on the budget only for cache-aware (and, in concurrent mode, least-loaded: queue lengths), so
a replay recomputes the configuration it replays; nothing per request is stored.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from advisor import schema
from advisor.executor import Executor, Shared
from advisor.sim.cache import PrefixCache, drops_last_hit_block
from advisor.sim.configuration import (
    SCHEDULING_ASYNC,
    ConfigResult,
    SchedulerRequests,
    SimulateOptions,
    Timing,
    TraceHashes,
    block_trace,
    scheduler_requests,
)
from advisor.sim.fast import trace as fasttrace
from advisor.sim.fast.events import Arena, request_hashes
from advisor.sim.fast.routing import (
    router_keys,
    run_replicas_compiled,
    run_replicas_sequential_compiled,
)
from advisor.sim.routing import (
    ReplicaResult,
    check_routing,
    run_replicas,
    run_replicas_sequential,
    spread,
)
from advisor.sim.steptime import StepTimeModel
from advisor.workload import Workload


def wants_replicas(options: SimulateOptions) -> bool:
    """Whether the stage runs the replica grid (a count above 1, in each mode simulated)."""
    return any(r > 1 for r in options.replicas) and bool(options.modes)


def count_replica_configs(options: SimulateOptions, budgets_per_block_size: int) -> int:
    """Runs of the replica grid (a progress bar's share): per mode and budget, every router at
    every count above 1 (one replica's rows are the single-engine grid's runs)."""
    if not wants_replicas(options):
        return 0
    many = sum(1 for r in set(options.replicas) if r > 1)
    return len(options.block_sizes) * len(options.modes) * budgets_per_block_size * many * len(options.routers)


@dataclass(frozen=True)
class ReplicaInputs:
    """What every replica run of one block size shares (`replica_inputs`): the scheduler's
    requests (`SchedulerRequests`) and their trace, arrivals and clock, the keyed routers' keys,
    and the per-request block ids of concurrent mode."""

    workload: Workload
    trace: fasttrace.BlockTrace
    options: SimulateOptions
    reqs: SchedulerRequests
    skip: np.ndarray | None
    arrivals: np.ndarray
    clock: StepTimeModel
    sessions: list[str | None] | None
    keys: dict[str, list[int | None]]
    prepared: tuple[np.ndarray, np.ndarray, np.ndarray] | None


def replica_inputs(workload: Workload, block_size: int, options: SimulateOptions,
                   trace: fasttrace.BlockTrace | None = None) -> ReplicaInputs:
    """`ReplicaInputs` at `block_size` (`trace`: `block_trace(workload, block_size)`, to reuse it)."""
    reqs = scheduler_requests(workload)
    trace = trace if trace is not None else block_trace(workload, block_size)
    skip = reqs.skip_prefix_cache if reqs.skip_prefix_cache.any() else None
    arrivals = reqs.take(workload.arrivals(options.speedup))
    clock = options.step_time_model(reqs.n_tokens, reqs.output_tokens, reqs.take(workload.latency_s),
                                    reqs.take(workload.ttft_s))
    sessions = (list(reqs.take(np.asarray(workload.sessions, dtype=object)))
                if len(workload.sessions) == workload.num_requests else None)
    keys = {r: router_keys(r, trace, reqs.n_tokens, sessions, options.prefix_hash_blocks) for r in options.routers}
    prepared = (request_hashes(trace, reqs.n_tokens, reqs.output_tokens, trace.num_ids)
                if schema.MODE_CONCURRENT in options.modes else None)
    return ReplicaInputs(workload, trace, options, reqs, skip, arrivals, clock, sessions, keys, prepared)


def run_routed(inputs: ReplicaInputs, mode: str, num_blocks: int, replicas: int, router: str,
               engine: str = "auto", arena: Arena | None = None) -> ReplicaResult:
    """One replica run, per scheduler request (advisor.sim.routing's `ReplicaResult`):
    `engine` "auto" runs the compiled twins, "reference" advisor.sim.routing's loops; `arena`:
    the memory this thread's compiled runs reuse."""
    o, reqs, trace = inputs.options, inputs.reqs, inputs.trace
    lines = reqs.line
    speculative = o.speculative if drops_last_hit_block(o.speculative, o.vllm_version) else None
    routing = {"replicas": replicas, "router": router, "sessions": inputs.sessions, "skip_prefix_cache": inputs.skip,
               "prefix_hash_blocks": o.prefix_hash_blocks, "load_weight": o.router_load_weight, "lines": lines}
    concurrent = {"max_num_batched_tokens": o.max_num_batched_tokens,
                  "async_scheduling": o.scheduling == SCHEDULING_ASYNC}
    if engine == "reference":
        def make_cache() -> PrefixCache:
            return PrefixCache(num_blocks, trace.block_size, schema.POLICY_LRU, speculative=o.speculative,
                               vllm_version=o.vllm_version)

        if mode == schema.MODE_SEQUENTIAL:
            return run_replicas_sequential(make_cache, TraceHashes(trace), reqs.n_tokens, **routing)
        return run_replicas(make_cache, TraceHashes(trace), reqs.n_tokens, reqs.output_tokens, inputs.arrivals,
                            inputs.clock, o.max_num_seqs, **routing, **concurrent)
    keys = inputs.keys.get(router)
    if mode == schema.MODE_SEQUENTIAL:
        return run_replicas_sequential_compiled(trace, num_blocks, speculative=speculative, keys=keys, arena=arena,
                                                **routing)
    return run_replicas_compiled(trace, num_blocks, reqs.n_tokens, reqs.output_tokens, inputs.arrivals, inputs.clock,
                                 o.max_num_seqs, speculative=speculative, keys=keys, prepared=inputs.prepared,
                                 arena=arena, **routing, **concurrent)


@dataclass(frozen=True)
class ReplicaRun:
    """One replica configuration per logged request (`simulate_replicas`)."""

    mode: str
    block_size: int
    num_blocks: int  # per replica
    replicas: int
    router: str
    replica: np.ndarray  # int64 per logged request: the replica it went to
    config: ConfigResult  # per logged request, all replicas: queries, hits, scheduled, timing
    routed: ReplicaResult  # per scheduler request, with the per-replica counters

    def per_replica(self) -> list[dict[str, Any]]:
        """Per replica: requests that ran, queries, hit tokens, hit rate (0 with no queries)."""
        out = []
        for r in range(self.replicas):
            mine = (self.replica == r) & self.config.scheduled
            queries, hits = int(self.config.n_tokens[mine].sum()), int(self.config.hit_tokens[mine].sum())
            out.append({"replica": r, "requests": int(mine.sum()), "queries": queries, "hit_tokens": hits,
                        "hit_rate": hits / queries if queries else 0.0})
        return out


def simulate_replicas(workload: Workload, block_size: int, num_blocks: int, *, replicas: int, router: str,
                      mode: str = schema.MODE_SEQUENTIAL, options: SimulateOptions | None = None,
                      inputs: ReplicaInputs | None = None, engine: str = "auto") -> ReplicaRun:
    """ONE replica configuration: `replicas` engines of `num_blocks` usable blocks each behind
    `router`, in `mode` (advisor.sim.routing's module docstring), per logged request (module
    docstring). `options` as `simulate_one`'s (its router settings are used); `inputs`:
    `replica_inputs(...)` to reuse across configurations; `engine` as `run_routed`'s."""
    opts = options or SimulateOptions()
    check_routing(router, replicas, opts.prefix_hash_blocks, opts.router_load_weight)
    if inputs is None or inputs.trace.block_size != block_size:
        inputs = replica_inputs(workload, block_size, opts)
    res = run_routed(inputs, mode, num_blocks, replicas, router, engine)
    return _per_line(inputs, mode, num_blocks, replicas, router, res)


def _per_line(inputs: ReplicaInputs, mode: str, num_blocks: int, replicas: int, router: str,
              res: ReplicaResult) -> ReplicaRun:
    reqs, workload = inputs.reqs, inputs.workload
    n_tokens = reqs.n_tokens
    queries = n_tokens if inputs.skip is None else np.where(inputs.skip, 0, n_tokens)
    timing = None
    if mode == schema.MODE_CONCURRENT:
        assert res.ttft_s is not None and res.e2e_s is not None
        timing = Timing(res.ttft_s, res.e2e_s, max(r.makespan_s for r in res.per_replica),
                        sum(r.busy_s for r in res.per_replica), sum(r.prefill_s for r in res.per_replica),
                        int(np.maximum(reqs.output_tokens, 1)[res.scheduled].sum()))
    config = reqs.per_line(workload, ConfigResult(
        inputs.trace.block_size, num_blocks, schema.POLICY_LRU, mode, queries, res.hit_tokens, res.scheduled,
        res.evictions, int(res.peak_blocks_per_replica.max(initial=0)), res.preemptions, runnable=n_tokens > 0,
        timing=timing))
    replica = res.replica if reqs.line is None else res.replica[np.cumsum(workload.n) - workload.n]
    return ReplicaRun(mode, inputs.trace.block_size, num_blocks, replicas, router, replica, config, res)


def replica_rows(workload: Workload, block_size: int, trace: fasttrace.BlockTrace, budgets: list[int],
                 options: SimulateOptions, kv_gib: Callable[[int], float | None],
                 tick: Callable[[int], None] | None = None, engine: str = "auto", *,
                 singles: Mapping[tuple[str, int | None], ConfigResult] | None = None,
                 executor: Executor | None = None) -> list[dict[str, Any]]:
    """schema.REPLICAS rows at `block_size` for every budget (per replica) in `budgets`, each
    mode of `options.modes` (sequential first), every count and router. `singles`: the
    single-engine grid's LRU results by (mode, budget), which one replica's rows are (tested
    equal); a one-replica cell missing from it is run once for every router. `tick(1)` per run
    of a count above 1. `executor`: one that spans machines (Ray) runs the runs as its pieces
    (`_run_cell`, the inputs shipped once); otherwise `options.workers` threads do."""
    inputs = replica_inputs(workload, block_size, options, trace)
    modes = [m for m in (schema.MODE_SEQUENTIAL, schema.MODE_CONCURRENT) if m in options.modes]
    counts = sorted(set(options.replicas))
    cells = [(mode, nb, count, router) for mode in modes for nb in budgets for count in counts
             for router in options.routers]
    given = singles or {}
    runs = [(mode, nb, count, router) for mode, nb, count, router in cells
            if count > 1 or (router == options.routers[0] and (mode, nb) not in given)]

    arenas: dict[int, Arena] = {}  # per worker thread: its runs reuse their memory

    def run(cell: tuple[str, int, int, str]) -> ReplicaRun:
        mode, nb, count, router = cell
        arena = arenas.setdefault(threading.get_ident(), Arena())
        return _per_line(inputs, mode, nb, count, router, run_routed(inputs, mode, nb, count, router, engine, arena))

    done: dict[tuple[str, int, int, str], ReplicaRun] = {}
    with contextlib.ExitStack() as stack:
        if executor is not None and executor.distributed and len(runs) > 1:
            shared = executor.share(inputs)
            results: Iterable[ReplicaRun] = executor.map(_run_cell, [(shared, cell, engine) for cell in runs])
        else:
            pool = stack.enter_context(ThreadPoolExecutor(max(1, min(options.workers, len(runs)))))
            results = pool.map(run, runs)
        for cell, res in zip(runs, results, strict=True):
            done[cell] = res
            if tick is not None and cell[2] > 1:
                tick(1)
    rows = []
    for mode, nb, count, router in cells:
        if count == 1 and (mode, nb) in given:
            rows.append(_single_row(given[(mode, nb)], router, kv_gib(nb), inputs))
            continue
        res = done[(mode, nb, count, router if count > 1 else options.routers[0])]
        rows.append(_row(res, router, kv_gib(nb), inputs))
    return rows


_WORKER_ARENA: list[Arena] = []  # in an executor's worker process: the memory its runs reuse


def _run_cell(item: tuple[Shared[ReplicaInputs], tuple[str, int, int, str], str]) -> ReplicaRun:
    """One replica run as an executor's piece (a worker process runs one at a time)."""
    shared, (mode, nb, count, router), engine = item
    inputs = shared.get()
    if not _WORKER_ARENA:
        _WORKER_ARENA.append(Arena())
    routed = run_routed(inputs, mode, nb, count, router, engine, _WORKER_ARENA[0])
    return _per_line(inputs, mode, nb, count, router, routed)


def _stats(config: ConfigResult) -> dict[str, Any]:
    """The row's totals and (concurrent mode) times, per logged request (children summed, as
    sim.parquet counts them)."""
    stats: dict[str, Any] = dict.fromkeys(("ttft_p50_s", "ttft_p95_s", "e2e_p50_s", "e2e_p95_s", "makespan_s",
                                           "busy_s", "prefill_s"))
    if config.timing is not None:
        stats.update({k: v for k, v in config.timing.stats().items() if k in stats})
    return {**config.totals(), "evictions": config.evictions, "preemptions": config.preemptions, **stats}


def _row(run: ReplicaRun, router: str, kv_gib: float | None, inputs: ReplicaInputs) -> dict[str, Any]:
    """One row of N replicas."""
    res = run.routed
    computed = np.where(res.scheduled, inputs.reqs.n_tokens - res.hit_tokens, 0)
    return {
        "block_size": run.block_size, "num_blocks": run.num_blocks, "kv_gib": kv_gib, "replicas": run.replicas,
        "router": router, "mode": run.mode, **_stats(run.config), "load_spread": res.load_spread,
        "fallbacks": res.fallbacks,
        "prefill_spread": spread(np.bincount(res.replica, weights=computed, minlength=run.replicas)),
        "replica_hit_rates": [p["hit_rate"] for p in run.per_replica()],
    }


def _single_row(config: ConfigResult, router: str, kv_gib: float | None, inputs: ReplicaInputs) -> dict[str, Any]:
    """One replica's row from the single-engine grid's run: nothing to balance or fall back."""
    stats = _stats(config)
    return {
        "block_size": inputs.trace.block_size, "num_blocks": config.num_blocks, "kv_gib": kv_gib, "replicas": 1,
        "router": router, "mode": config.mode, **stats, "load_spread": 1.0, "fallbacks": 0, "prefill_spread": 1.0,
        "replica_hit_rates": [stats["hit_rate"]],
    }
