"""One configuration of the simulator: a block size, a budget, a policy, a mode.

Inputs: a `Workload` (advisor.workload), a block size, a pool size in usable blocks
(None = infinite), and the `SimulateOptions` that shape a run (the concurrent cost
model, `max_num_seqs`, `speedup`). Output: a `ConfigResult`, each request's hit tokens
(vLLM's `num_cached_tokens`) and the pool's counters. advisor.sim.grid runs a grid of
these; advisor.replay.plan recomputes any one of them to predict a replay.

Per block size the blocks are keyed once (`block_trace`: advisor.sim.fast.trace's chained
64-bit keys as dense ids; LoRA name and cache_salt keep requests apart, and so does
the model when a log names several: one key per request, `Workload.namespaces`; hash traces
chain their `hash_ids` at the trace's block size, the only size they simulate at).
Sequential mode runs on advisor.sim.fast's compiled replays of the same rules, concurrent mode
on advisor.sim.fast.events' compiled event loop (tested equal to cache.py, and to
events.run_concurrent over it, under eviction pressure and preemption;
`engine="reference"` runs those instead):
- mode "sequential": log order, one request at a time, prefill only, each freed
  before the next (docs/design.md §5; what the exactness checks and replay confirm);
- mode "concurrent": `advisor.sim.events.run_concurrent` (arrivals, pinning, decode
  blocks, `max_num_seqs`; its docstring states the simplifications);
- policies: "lru" (vLLM) in both modes; "fifo" and "belady" (reference lines) in
  sequential mode only, and for full-attention models only.

A hybrid model (`SimulateOptions.model` whose KV cache groups vLLM runs with its hybrid
rules: sliding window, chunked local; advisor.sim.hybrid_grid `sim_groups`) runs over its
groups instead: sequential mode on advisor.sim.fast.hybrid (equal to advisor.sim.hybrid's
`HybridPrefixCache`), concurrent mode on events' `Engine` over a `HybridPrefixCache`.

The requests simulated are the ones vLLM's scheduler sees (`Workload.fan_out`): a logged
request asking for n completions is n requests with its prompt, adjacent and arriving
together; results are reported per logged request, summed over its children. A request
that asks for prompt logprobs skips the cache read (`Workload.skip_prefix_cache`): it
hits nothing and adds no queries, but caches its blocks. `SimulateOptions.speculative`
applies `vllm_version`'s rule for that drafter to every hit (`cache.drops_last_hit_block`:
0.32 drops the last matched block under EAGLE-style methods).

Counting is vLLM's: queries += prompt tokens and hits += hit tokens per request
when it is (first) scheduled; hit_rate = hits / queries. A request too long for a
budget's whole pool is never scheduled (vLLM refuses it): it adds no queries and is
counted in the `refused` column. An infinite-cache run also records the blocks it
ever used (`ceiling_blocks`): every budget at least that large gives its very result.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from advisor import kvmemory as kv
from advisor import schema
from advisor.errors import AdvisorError
from advisor.sim.blockstreams import request_salts
from advisor.sim.cache import (
    SPECULATIVE_METHODS,
    FutureUses,
    PrefixCache,
    drops_last_hit_block,
)
from advisor.sim.events import run_concurrent
from advisor.sim.fast import policies as fastpolicy
from advisor.sim.fast import sequential as fastsim
from advisor.sim.fast import trace as fasttrace
from advisor.sim.fast.events import run_concurrent_compiled, run_never_evicting
from advisor.sim.hybrid_grid import concurrent_hybrid, sequential_hybrid, sim_groups
from advisor.sim.routing import (
    DEFAULT_LOAD_WEIGHT,
    DEFAULT_PREFIX_HASH_BLOCKS,
    ROUND_ROBIN,
    check_router,
)
from advisor.sim.steptime import DEFAULT_MBU, DEFAULT_MFU, StepTimeModel, gpu_spec
from advisor.vllm_versions import resolve_vllm_version
from advisor.workload import Workload

SCHEDULING_SYNC, SCHEDULING_ASYNC = "sync", "async"
SCHEDULINGS = (SCHEDULING_SYNC, SCHEDULING_ASYNC)
CLOCK_ROOFLINE, CLOCK_FLAT = "roofline", "flat"
CLOCKS = (CLOCK_ROOFLINE, CLOCK_FLAT)


@dataclass(frozen=True)
class SimulateOptions:
    """Every option of the simulate stage (all of it goes into the fingerprint)."""

    block_sizes: tuple[int, ...] = (16, 32, 64, 128)
    num_blocks: tuple[int, ...] = ()
    budget_tokens: tuple[int, ...] = ()
    kv_cache_gib: tuple[float, ...] = ()
    model: str | None = None
    gpu: str | None = None  # catalog name or GiB
    # The vLLM version the deployment runs ("0.34", "0.32.1", ...; None: the newest known,
    # advisor.vllm_versions.DEFAULT_VLLM_VERSION): its defaults below (batch limits) and the
    # flags recommend prints. Stored as "major.minor".
    vllm_version: str | None = None
    gpu_memory_utilization: float = kv.VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
    headroom_gib: float | None = None
    tensor_parallel_size: int = 1
    policies: tuple[str, ...] = (schema.POLICY_LRU, schema.POLICY_FIFO, schema.POLICY_BELADY)
    modes: tuple[str, ...] = (schema.MODE_SEQUENTIAL, schema.MODE_CONCURRENT)
    warmup: str = "50%"
    speedup: float = 1.0
    prefill_tps: float = 10_000.0
    decode_tps: float = 50.0
    use_logged_latency: bool = True
    # Concurrent mode's batch limits (vLLM's flags). None: `vllm serve`'s default on `gpu`
    # (kvmemory.vllm_batch_defaults); without a GPU, the tier vLLM itself falls back to when
    # it cannot tell the device (its non-H100/H200 defaults: 256 sequences, 2,048 tokens).
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    # Concurrent mode's clock (advisor.sim.steptime): "roofline" prices each step from the
    # model's FLOPs and bytes on the GPU (mfu, mbu: the fractions of its peaks reached);
    # "flat" from prefill_tps/decode_tps. None: roofline with --model and a catalog --gpu.
    clock: str | None = None
    mfu: float = DEFAULT_MFU
    mbu: float = DEFAULT_MBU
    # Concurrent mode's scheduler: "async" (vLLM's AsyncScheduler, its default on GPUs) or
    # "sync" (its Scheduler, what a CPU engine runs). None: async with a GPU target, else sync.
    scheduling: str | None = None
    # The speculative-decoding method the deployment runs (vLLM's `--speculative-config`
    # method: "eagle", "eagle3", "mtp", "ngram", ...; None: none). Under vLLM 0.32 EAGLE-style
    # methods drop the last block of every cache hit (advisor.sim.cache.drops_last_hit_block).
    speculative: str | None = None
    sweep_points: int = 10
    reference_budgets: int = 4  # budgets per block size the fifo/belady lines run at (0 = all)
    # N engines behind a router (advisor.sim.routing), in each mode of `modes`, at the reference
    # budgets, each replica with the budget's blocks: replica counts and router names swept;
    # the prefix-hash router's blocks (K) and the cache-aware router's load weight.
    replicas: tuple[int, ...] = (1,)
    routers: tuple[str, ...] = (ROUND_ROBIN,)
    prefix_hash_blocks: int = DEFAULT_PREFIX_HASH_BLOCKS
    router_load_weight: float = DEFAULT_LOAD_WEIGHT
    # vLLM's CPU offload tier (advisor.sim.offload_grid): `--kv-offloading-size` values in GiB
    # (over all TP ranks) simulated at every budget, sequential mode; 0 = the GPU alone; () = none.
    offload_gib: tuple[float, ...] = ()
    workers: int = 0  # threads for the grid's configurations, 0 = every core
    max_request_rows: int = 5_000_000

    def __post_init__(self) -> None:
        # Resolved here, once, so the defaults live in this class and the manifest records
        # the values actually simulated (replay reuses them).
        object.__setattr__(self, "vllm_version", resolve_vllm_version(self.vllm_version))
        seqs, batched = kv.vllm_batch_defaults(self.gpu, self.vllm_version)
        if self.max_num_seqs is None:
            object.__setattr__(self, "max_num_seqs", seqs)
        if self.max_num_batched_tokens is None:
            object.__setattr__(self, "max_num_batched_tokens", batched)
        if self.max_num_batched_tokens < self.max_num_seqs:  # vLLM refuses to start so
            raise AdvisorError(
                f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be at least --max-num-seqs "
                f"({self.max_num_seqs}), as vLLM requires: raise the first or lower the second.")
        if self.clock is None:
            object.__setattr__(self, "clock", CLOCK_ROOFLINE if self._gpu_has_figures() else CLOCK_FLAT)
        if self.clock not in CLOCKS:
            raise AdvisorError(f"unknown clock {self.clock!r}: use one of {', '.join(CLOCKS)}.")
        if self.clock == CLOCK_ROOFLINE and not self._gpu_has_figures():
            raise AdvisorError("the roofline clock needs --model and a GPU named from the catalog (--gpu h100, ...): "
                               "give both, or use --clock flat with --prefill-tps/--decode-tps.")
        if self.scheduling is None:
            object.__setattr__(self, "scheduling", SCHEDULING_ASYNC if self.gpu is not None else SCHEDULING_SYNC)
        if self.scheduling not in SCHEDULINGS:
            raise AdvisorError(f"unknown scheduling {self.scheduling!r}: use one of {', '.join(SCHEDULINGS)}.")
        if self.speculative is not None and self.speculative not in SPECULATIVE_METHODS:
            raise AdvisorError(f"unknown speculative method {self.speculative!r}: use one of "
                               f"{', '.join(SPECULATIVE_METHODS)} (vLLM's --speculative-config methods), or none.")
        if not self.workers:
            object.__setattr__(self, "workers", os.cpu_count() or 1)
        if any(r < 1 for r in self.replicas) or not self.replicas:
            raise AdvisorError(f"--replicas must list counts of at least 1 (e.g. 1,2,4,8), got {list(self.replicas)}.")
        for r in self.routers:
            check_router(r)
        if self.prefix_hash_blocks < 1 or self.router_load_weight < 0:
            raise AdvisorError("--prefix-hash-blocks must be at least 1 and --router-load-weight at least 0.")
        object.__setattr__(self, "offload_gib", tuple(float(g) for g in self.offload_gib))
        if any(not 0 <= g < float("inf") for g in self.offload_gib):
            raise AdvisorError(f"--offload-gib must list sizes in GiB, 0 or more (0: no CPU tier), e.g. 0,16,64,256; "
                               f"got {list(self.offload_gib)}.")
        if self.offload_gib and self.model is None:
            raise AdvisorError("--offload-gib needs --model (a catalog name or a local config.json): the CPU tier's "
                               "size in blocks is vLLM's bytes per block of that model.")

    def _gpu_has_figures(self) -> bool:
        if self.model is None or self.gpu is None:
            return False
        try:
            gpu_spec(self.gpu)
        except AdvisorError:
            return False  # a size in GiB: memory only
        return True

    def as_dict(self) -> dict[str, Any]:
        """The options that shape the results (the fingerprint): all but `workers`."""
        d = asdict(self)
        del d["workers"]
        return d

    def step_time_model(self, n_tokens: np.ndarray, output_tokens: np.ndarray, latency_s: np.ndarray | None,
                        ttft_s: np.ndarray | None) -> StepTimeModel:
        """Concurrent mode's clock (advisor.sim.steptime), calibrated from the log's latencies
        when `use_logged_latency` and it has them (arrays per request)."""
        if self.clock == CLOCK_ROOFLINE:
            assert self.model is not None and self.gpu is not None
            model = StepTimeModel.for_model(self.model, self.gpu, self.tensor_parallel_size, mfu=self.mfu, mbu=self.mbu)
        else:
            model = StepTimeModel.from_rates(self.prefill_tps, self.decode_tps)
        return model.calibrated(n_tokens, output_tokens, latency_s, ttft_s) if self.use_logged_latency else model


@dataclass(frozen=True)
class Timing:
    """Concurrent mode's times on its clock (advisor.sim.steptime): per logged request, the
    seconds from its arrival to the end of the step that sampled its first token (TTFT;
    a fanned-out request's first child) and its last (end-to-end; its last child), NaN when
    it never ran; and the run's makespan (first arrival to last finish), busy time (the
    steps' summed time), the prefill chunks' part of it, and the output tokens generated."""

    ttft_s: np.ndarray
    e2e_s: np.ndarray
    makespan_s: float
    busy_s: float
    prefill_s: float
    output_tokens: int

    def stats(self, mask: np.ndarray | None = None) -> dict[str, float | None]:
        """Percentiles over the masked requests that ran, and the run's rates (whole run)."""
        ttft = self.ttft_s if mask is None else self.ttft_s[mask]
        e2e = self.e2e_s if mask is None else self.e2e_s[mask]
        ttft, e2e = ttft[np.isfinite(ttft)], e2e[np.isfinite(e2e)]
        q = (lambda a, p: float(np.percentile(a, p)) if len(a) else None)  # noqa: E731
        finished = int(np.isfinite(self.e2e_s).sum())
        span = self.makespan_s if self.makespan_s > 0 else None
        return {
            "ttft_p50_s": q(ttft, 50), "ttft_p95_s": q(ttft, 95), "ttft_p99_s": q(ttft, 99),
            "e2e_p50_s": q(e2e, 50), "e2e_p95_s": q(e2e, 95),
            "makespan_s": self.makespan_s, "busy_s": self.busy_s, "prefill_s": self.prefill_s,
            "throughput_rps": finished / span if span else None,
            "output_tps": self.output_tokens / span if span else None,
        }


@dataclass(frozen=True)
class ConfigResult:
    """One configuration's outcome: per-request hits (log order) and pool counters.

    Per logged request: a request fanned out into n children (`Workload.fan_out`) sums
    their queries and hits.
    """

    block_size: int
    num_blocks: int | None  # None = infinite cache
    policy: str
    mode: str
    # int64, the prompt tokens the request counts as queries: its prompt once per child, 0
    # when it skips the cache read (vLLM's prefix_cache_queries)
    n_tokens: np.ndarray
    hit_tokens: np.ndarray  # int64, 0 for requests never scheduled
    scheduled: np.ndarray  # bool: the request ran, its queries count
    evictions: int
    peak_blocks_in_use: int
    preemptions: int = 0
    # Infinite-cache runs only: every pool of at least this many usable blocks gives
    # this very result (`ceiling_blocks`); None where not measured.
    exact_from: int | None = None
    # bool, the request has a prompt to schedule (refused: runnable but never scheduled);
    # None: those with queries
    runnable: np.ndarray | None = None
    timing: Timing | None = None  # concurrent mode: times on its clock

    def totals(self, mask: np.ndarray | None = None) -> dict[str, Any]:
        """requests, queries, hit_tokens, hit_rate, refused over the masked requests."""
        m = self.scheduled if mask is None else self.scheduled & mask
        runnable = self.n_tokens > 0 if self.runnable is None else self.runnable
        considered = runnable if mask is None else runnable & mask
        queries = int(self.n_tokens[m].sum())
        hits = int(self.hit_tokens[m].sum())
        return {
            "requests": int(m.sum()),
            "queries": queries,
            "hit_tokens": hits,
            "hit_rate": hits / queries if queries else 0.0,
            "refused": int((considered & ~m).sum()),
        }


def block_trace(workload: Workload, block_size: int) -> fasttrace.BlockTrace:
    """Every scheduler request's full blocks at `block_size` as dense ids (advisor.sim.fast.trace).

    Equal ids exactly when vLLM's chained block hashes are equal (64-bit keys; see
    advisor.sim.fast.trace for the collision odds). LoRA name and cache_salt become a per-request
    salt, so requests that differ in them never share a block, as in vLLM. Hash
    traces chain their ids at their own block size, the only one they simulate at.
    The requests are the scheduler's (`Workload.fan_out`): a logged request's n children
    are n copies of its blocks.
    """
    return block_traces(workload, (block_size,))[block_size]


def block_traces(workload: Workload, block_sizes: Sequence[int]) -> dict[int, fasttrace.BlockTrace]:
    """`block_trace` for several block sizes (token ids are hashed in one pass)."""
    return {bs: fasttrace.repeat_requests(t, workload.n) for bs, t in logged_block_traces(workload, block_sizes).items()}


def logged_block_traces(workload: Workload, block_sizes: Sequence[int]) -> dict[int, fasttrace.BlockTrace]:
    """The logged requests' block traces (before fan-out), hashed in memory from the workload's
    ids: what advisor.sim.blockstreams streams from the run folder instead, id for id."""
    if workload.is_hash_trace:
        for bs in block_sizes:
            check_trace_block_size(workload, bs)
        assert workload.hash_values is not None and workload.hash_offsets is not None, "a lean workload: no hash ids"
        return {bs: fasttrace.trace_from_hash_ids(workload.hash_values, workload.hash_offsets, workload.n_tokens, bs)
                for bs in block_sizes}
    assert workload.token_values is not None and workload.token_offsets is not None, (
        "a lean workload has no token ids: pass its block traces (advisor.sim.blockstreams)")
    return fasttrace.traces_from_tokens(workload.token_values, workload.token_offsets, tuple(block_sizes),
                                        request_salts(workload))


@dataclass(frozen=True)
class SchedulerRequests:
    """The requests vLLM's scheduler sees (`Workload.fan_out`), per request, in order:
    what every engine of `simulate_one` runs, and `per_line` folds back to the log."""

    line: np.ndarray | None  # int64, the logged request each is a child of (None: one each)
    n_tokens: np.ndarray  # int64 prompt tokens
    output_tokens: np.ndarray  # int64
    skip_prefix_cache: np.ndarray  # bool: it does not read the cache

    def take(self, values: np.ndarray) -> np.ndarray:
        """A per-logged-request array, per scheduler request."""
        return values if self.line is None else values[self.line]

    def per_line(self, workload: Workload, res: ConfigResult) -> ConfigResult:
        """`res` per logged request: children's queries and hits summed; scheduled when they
        ran (children of one request share a prompt, so they fit or are refused alike)."""
        if self.line is None:
            return res
        starts = np.cumsum(workload.n) - workload.n
        timing = res.timing
        if timing is not None:
            timing = replace(timing, ttft_s=np.fmin.reduceat(timing.ttft_s, starts),
                             e2e_s=np.fmax.reduceat(timing.e2e_s, starts))
        return replace(res, n_tokens=np.add.reduceat(res.n_tokens, starts),
                       hit_tokens=np.add.reduceat(res.hit_tokens, starts),
                       scheduled=np.logical_or.reduceat(res.scheduled, starts), runnable=workload.n_tokens > 0,
                       timing=timing)


def scheduler_requests(workload: Workload) -> SchedulerRequests:
    """`workload`'s requests as vLLM's scheduler sees them (`SchedulerRequests`)."""
    line = workload.fan_out if workload.fans_out else None
    take = (lambda v: v) if line is None else (lambda v: v[line])  # noqa: E731
    return SchedulerRequests(line, take(workload.n_tokens), take(workload.output_tokens),
                             take(workload.skip_prefix_cache))


class TraceHashes(Sequence[Any]):
    """Per-request block hashes (dense ids) on access: Python lists for `cache.PrefixCache`,
    int64 array views for tests/array_cache.py's `ArrayPrefixCache` (`arrays=True`)."""

    def __init__(self, trace: fasttrace.BlockTrace, arrays: bool = False) -> None:
        self.trace = trace
        self.arrays = arrays

    def __len__(self) -> int:
        return self.trace.num_requests

    def __getitem__(self, r: int) -> Any:  # type: ignore[override]
        if not 0 <= r < len(self):
            raise IndexError(r)
        ids = self.trace.ids[self.trace.offsets[r] : self.trace.offsets[r + 1]]
        return ids if self.arrays else ids.tolist()

    def __iter__(self) -> Iterator[Any]:
        return (self[r] for r in range(len(self)))


def check_trace_block_size(workload: Workload, block_size: int) -> None:
    if block_size != workload.trace_block_size:
        raise AdvisorError(
            f"this is a block-hash trace at {workload.trace_block_size}-token blocks: it can only be "
            f"simulated at --block-sizes {workload.trace_block_size} (its hash ids carry no tokens "
            f"to re-block); rerun with --block-sizes {workload.trace_block_size}, or re-ingest with "
            f"the right --trace-block-size if {workload.trace_block_size} is wrong."
        )


def simulate_one(
    workload: Workload,
    block_size: int,
    num_blocks: int | None,
    *,
    mode: str = schema.MODE_SEQUENTIAL,
    policy: str = schema.POLICY_LRU,
    trace: fasttrace.BlockTrace | None = None,
    future: FutureUses | None = None,
    options: SimulateOptions | None = None,
    engine: str = "auto",
    prepared: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    uses: tuple[np.ndarray, np.ndarray] | None = None,
) -> ConfigResult:
    """Simulate ONE configuration with vLLM's exact rules (advisor.sim.cache semantics).

    `workload`: a `Workload` (`load_workload(requests.parquet, tokens.parquet)` or
    `Workload.from_token_lists(...)`); `num_blocks`: usable blocks (vLLM's count
    minus the null block), None = infinite; `mode`: "sequential" (log order, one at
    a time, prefill only) or "concurrent" (`options` gives the cost model,
    `max_num_seqs` and `speedup`); `policy`: "lru" (vLLM), "fifo", "belady"
    (sequential only), "off" (concurrent only: prefix caching disabled, the time baseline).
    `trace` (`block_trace(workload, block_size)`) and `future`
    (and `prepared`: `advisor.sim.fast.events.request_hashes(trace, ...)` over
    `scheduler_requests(workload)` for concurrent mode, `uses`:
    `advisor.sim.fast.policies.future_uses(trace, skip)` for belady) may be passed to reuse
    them across budgets of one block size; all are per scheduler request. `engine`: "auto"
    runs sequential mode on advisor.sim.fast.sequential's compiled replays (lru, fifo, belady)
    and concurrent mode on advisor.sim.fast.events' compiled loop, both tested equal to
    cache.py / events.run_concurrent over it; "reference" runs those instead.
    `options.speculative` applies its cache rule; requests skip the cache read and fan out
    as `workload` says (module docstring). Returns a `ConfigResult` per logged request:
    `hit_tokens[i]` is request i's (log order) vLLM `num_cached_tokens`, summed over its
    children; `.totals()` the sums.
    """
    opts = options or SimulateOptions()
    reqs = scheduler_requests(workload)
    if trace is None:
        trace = block_trace(workload, block_size)
    assert trace.num_requests == len(reqs.n_tokens), "trace: block_trace(workload, ...), one per scheduler request"
    n_tokens = reqs.n_tokens
    skip = reqs.skip_prefix_cache if reqs.skip_prefix_cache.any() else None
    drop_last = drops_last_hit_block(opts.speculative, opts.vllm_version)
    queries = n_tokens if skip is None else np.where(skip, 0, n_tokens)  # vLLM counts no lookup it skips
    groups = sim_groups(opts.model, opts.tensor_parallel_size)  # a hybrid model: vLLM's rules per group
    if groups is not None and mode == schema.MODE_SEQUENTIAL:
        if policy != schema.POLICY_LRU:
            raise AdvisorError(f"policy {policy!r} is simulated for full-attention models only; use lru for "
                               f"{opts.model}'s KV cache groups.")
        seq = sequential_hybrid(trace, groups, num_blocks, skip, engine)
        return reqs.per_line(workload, ConfigResult(
            block_size, num_blocks, policy, mode, queries, seq.hit_tokens, seq.scheduled, seq.evictions,
            seq.peak_blocks_in_use, exact_from=seq.exact_from, runnable=n_tokens > 0))
    if mode == schema.MODE_SEQUENTIAL and engine == "auto":
        fast = (fastsim.simulate_sequential(trace, num_blocks, skip, drop_last) if num_blocks is None
                else fastpolicy.simulate_sequential_policy(trace, num_blocks, policy, uses, skip, drop_last))
        scheduled = (n_tokens > 0) & fast.fits
        hit_tokens = np.where(scheduled, fast.hit_tokens, 0)
        return reqs.per_line(workload, ConfigResult(
            block_size, num_blocks, policy, mode, queries, hit_tokens, scheduled, fast.evictions,
            fast.peak_blocks_in_use, exact_from=None if num_blocks is not None else
            _sequential_blocks_used(trace, n_tokens, hit_tokens), runnable=n_tokens > 0))
    hashes = TraceHashes(trace)
    if mode == schema.MODE_SEQUENTIAL:
        if policy == schema.POLICY_BELADY and future is None:
            future = FutureUses(hashes, n_tokens.tolist(), block_size, skip)
        cache = PrefixCache(num_blocks, block_size, policy, future, opts.speculative, opts.vllm_version)
        hits = np.zeros(len(n_tokens), dtype=np.int64)
        scheduled = np.zeros(len(n_tokens), dtype=bool)
        for i, n in enumerate(n_tokens.tolist()):
            if n <= 0:
                continue
            hit = cache.admit(str(i), hashes[i], n, position=i, skip_prefix_cache=skip is not None and bool(skip[i]))
            if hit is None:  # longer than the whole pool: vLLM refuses it
                continue
            cache.free(str(i))
            hits[i] = hit
            scheduled[i] = True
        return reqs.per_line(workload, ConfigResult(
            block_size, num_blocks, policy, mode, queries, hits, scheduled, cache.evictions,
            cache.peak_blocks_in_use, exact_from=max(len(cache.pool.blocks), 1) if num_blocks is None else None,
            runnable=n_tokens > 0))
    if mode != schema.MODE_CONCURRENT:
        raise ValueError(f"unknown mode {mode!r}")
    if policy not in (schema.POLICY_LRU, schema.POLICY_OFF):
        raise AdvisorError(f"policy {policy!r} is simulated in sequential mode only; use lru for concurrent mode.")
    caching_off = policy == schema.POLICY_OFF
    if caching_off:  # nobody reads the cache (what is written is never read, so it need not be told apart)
        skip = np.ones(len(n_tokens), dtype=bool)
    arrivals = reqs.take(workload.arrivals(opts.speedup))
    outputs = reqs.output_tokens
    clock = opts.step_time_model(n_tokens, outputs, reqs.take(workload.latency_s), reqs.take(workload.ttft_s))
    if groups is not None:
        res, used = concurrent_hybrid(
            groups, num_blocks, block_size, hashes, n_tokens, outputs, arrivals, clock, opts.max_num_seqs,
            opts.max_num_batched_tokens, async_scheduling=opts.scheduling == SCHEDULING_ASYNC, skip_prefix_cache=skip)
    elif engine == "auto":
        kwargs: dict[str, Any] = dict(max_num_batched_tokens=opts.max_num_batched_tokens,
                                      async_scheduling=opts.scheduling == SCHEDULING_ASYNC, skip_prefix_cache=skip,
                                      speculative=opts.speculative if drop_last else None, prepared=prepared)
        if num_blocks is None:  # a pool only as large as the run holds at once, checked
            res = run_never_evicting(trace, n_tokens, outputs, arrivals, clock, opts.max_num_seqs, **kwargs)
        else:
            res = run_concurrent_compiled(trace, num_blocks, n_tokens, outputs, arrivals, clock, opts.max_num_seqs,
                                          **kwargs)
        used = res.blocks_used  # the pool from which this run never evicts (`ceiling_blocks`)
    else:
        cache = PrefixCache(num_blocks, block_size, schema.POLICY_LRU, speculative=opts.speculative,
                            vllm_version=opts.vllm_version)
        res = run_concurrent(  # its PrefixCache applies the drafter's rule
            cache, hashes, n_tokens, outputs, arrivals, clock, opts.max_num_seqs,
            max_num_batched_tokens=opts.max_num_batched_tokens,
            async_scheduling=opts.scheduling == SCHEDULING_ASYNC, skip_prefix_cache=skip)
        used = len(cache.pool.blocks)  # the infinite pool's every allocation
    hit_tokens = res.hit_tokens
    assert res.ttft_s is not None and res.e2e_s is not None
    timing = Timing(res.ttft_s, res.e2e_s, res.makespan_s, res.busy_s, res.prefill_s,
                    int(np.maximum(outputs, 1)[res.scheduled].sum()))
    exact_from = None
    if num_blocks is None:
        # at least the largest request's end, which the pool must hold whole
        ends = n_tokens + np.maximum(outputs - 1, 0)
        exact_from = max(used, int((-(-ends[n_tokens > 0] // block_size)).max(initial=1)))
    return reqs.per_line(workload, ConfigResult(
        block_size, num_blocks, policy, mode, queries, hit_tokens, res.scheduled,
        0 if caching_off else res.evictions,  # with caching off vLLM hashes no block: nothing is evicted
        res.peak_blocks_in_use, res.preemptions, exact_from, runnable=n_tokens > 0, timing=timing))


def _sequential_blocks_used(trace: fasttrace.BlockTrace, n_tokens: np.ndarray, hit_tokens: np.ndarray) -> int:
    """Blocks a sequential run with no eviction ever takes from the pool (`ceiling_blocks`).

    Each request frees its blocks before the next: unhashed ones (past its cached full
    blocks) to the free queue's head, where the next allocations take them first; only
    allocations beyond them take a never-used block.
    """
    bs = trace.block_size
    needed = -(-n_tokens // bs)
    run = n_tokens > 0
    new = np.where(run, needed - hit_tokens // bs, 0).tolist()
    unhashed = np.where(run, needed - np.diff(trace.offsets), 0).tolist()
    used = head = 0
    for k, u in zip(new, unhashed):
        taken = min(head, k)
        used += k - taken
        head += u - taken
    return max(used, int(needed.max(initial=1)), 1)


def ceiling_blocks(ceiling: ConfigResult) -> int | None:
    """The smallest budget from which a configuration's result IS the infinite-cache run's.

    `ceiling.exact_from`: the blocks that run ever took from its pool (concurrent:
    `ConcurrentResult.blocks_used`, which also counts the most blocks an admission check asked
    for: a chunked prompt's whole length; sequential: `_sequential_blocks_used`). A pool of at
    least that many blocks never evicts: the free queue holds unhashed blocks (freed ones at its
    head, then the never-used ones in id order) before hashed ones, and allocation pops the head, so a
    hashed block is taken only once every block has been used; it never lacks blocks
    for an admission or a decode slot either (blocks in use are blocks ever used). So
    hits, evictions (0), preemptions, peak and timings are the infinite run's, for
    every policy (fifo and belady also take unhashed free blocks first).
    """
    return ceiling.exact_from
