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
  sequential mode only.

Counting is vLLM's: queries += prompt tokens and hits += hit tokens per request
when it is (first) scheduled; hit_rate = hits / queries. A request too long for a
budget's whole pool is never scheduled (vLLM refuses it): it adds no queries and is
counted in the `refused` column. An infinite-cache run also records the blocks it
ever used (`ceiling_blocks`): every budget at least that large gives its very result.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from advisor import kvmemory as kv
from advisor import schema
from advisor.errors import AdvisorError
from advisor.sim.cache import FutureUses, PrefixCache
from advisor.sim.events import CostModel, run_concurrent
from advisor.sim.fast import policies as fastpolicy
from advisor.sim.fast import sequential as fastsim
from advisor.sim.fast import trace as fasttrace
from advisor.sim.fast.events import run_concurrent_compiled
from advisor.workload import Workload


@dataclass(frozen=True)
class SimulateOptions:
    """Every option of the simulate stage (all of it goes into the fingerprint)."""

    block_sizes: tuple[int, ...] = (16, 32, 64, 128)
    num_blocks: tuple[int, ...] = ()
    budget_tokens: tuple[int, ...] = ()
    kv_cache_gib: tuple[float, ...] = ()
    model: str | None = None
    gpu: str | None = None  # catalog name or GiB
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
    sweep_points: int = 10
    reference_budgets: int = 4  # budgets per block size the fifo/belady lines run at (0 = all)
    workers: int = 0  # threads for the grid's configurations, 0 = every core
    max_request_rows: int = 5_000_000

    def __post_init__(self) -> None:
        # Resolved here, once, so the defaults live in this class and the manifest records
        # the values actually simulated (replay reuses them).
        seqs, batched = (kv.vllm_batch_defaults(self.gpu) if self.gpu is not None
                         else kv.VLLM_UNKNOWN_GPU_BATCH_DEFAULTS)
        if self.max_num_seqs is None:
            object.__setattr__(self, "max_num_seqs", seqs)
        if self.max_num_batched_tokens is None:
            object.__setattr__(self, "max_num_batched_tokens", batched)
        if not self.workers:
            object.__setattr__(self, "workers", os.cpu_count() or 1)

    def as_dict(self) -> dict[str, Any]:
        """The options that shape the results (the fingerprint): all but `workers`."""
        d = asdict(self)
        del d["workers"]
        return d

    def cost_model(self) -> CostModel:
        return CostModel(self.prefill_tps, self.decode_tps, self.use_logged_latency)


@dataclass(frozen=True)
class ConfigResult:
    """One configuration's outcome: per-request hits (log order) and pool counters."""

    block_size: int
    num_blocks: int | None  # None = infinite cache
    policy: str
    mode: str
    n_tokens: np.ndarray  # int64, prompt tokens per request
    hit_tokens: np.ndarray  # int64, 0 for requests never scheduled
    scheduled: np.ndarray  # bool: the request ran, its queries count
    evictions: int
    peak_blocks_in_use: int
    preemptions: int = 0
    # Infinite-cache runs only: every pool of at least this many usable blocks gives
    # this very result (`ceiling_blocks`); None where not measured.
    exact_from: int | None = None

    def totals(self, mask: np.ndarray | None = None) -> dict[str, Any]:
        """requests, queries, hit_tokens, hit_rate, refused over the masked requests."""
        m = self.scheduled if mask is None else self.scheduled & mask
        considered = (self.n_tokens > 0) if mask is None else (self.n_tokens > 0) & mask
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
    """Every request's full blocks at `block_size` as dense ids (advisor.sim.fast.trace).

    Equal ids exactly when vLLM's chained block hashes are equal (64-bit keys; see
    advisor.sim.fast.trace for the collision odds). LoRA name and cache_salt become a per-request
    salt, so requests that differ in them never share a block, as in vLLM. Hash
    traces chain their ids at their own block size, the only one they simulate at.
    """
    if workload.is_hash_trace:
        check_trace_block_size(workload, block_size)
        assert workload.hash_values is not None and workload.hash_offsets is not None
        return fasttrace.trace_from_hash_ids(workload.hash_values, workload.hash_offsets, workload.n_tokens,
                                             block_size)
    assert workload.token_values is not None and workload.token_offsets is not None
    return fasttrace.trace_from_tokens(workload.token_values, workload.token_offsets, block_size, _salts(workload))


def block_traces(workload: Workload, block_sizes: Sequence[int]) -> dict[int, fasttrace.BlockTrace]:
    """`block_trace` for several block sizes (token ids are hashed in one pass)."""
    if workload.is_hash_trace:
        return {bs: block_trace(workload, bs) for bs in block_sizes}
    assert workload.token_values is not None and workload.token_offsets is not None
    return fasttrace.traces_from_tokens(workload.token_values, workload.token_offsets, tuple(block_sizes),
                                      _salts(workload))


def _salts(workload: Workload) -> np.ndarray | None:
    """A 64-bit salt per request from its cache namespace (None: all in the common one)."""
    if all(ns is None for ns in workload.namespaces):
        return None
    memo: dict[str | None, int] = {None: 0}
    out = np.zeros(workload.num_requests, np.uint64)
    for i, ns in enumerate(workload.namespaces):
        if ns not in memo:
            memo[ns] = int.from_bytes(hashlib.blake2b(ns.encode(), digest_size=8).digest(), "little") | 1
        out[i] = memo[ns]
    return out


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
    (sequential only). `trace` (`block_trace(workload, block_size)`) and `future`
    (and `prepared`: `advisor.sim.fast.events.request_hashes(trace, ...)` for concurrent mode,
    `uses`: `advisor.sim.fast.policies.future_uses(trace)` for belady) may be passed to reuse them across budgets of one block size. `engine`: "auto"
    runs sequential mode on advisor.sim.fast.sequential's compiled replays (lru, fifo, belady)
    and concurrent mode on advisor.sim.fast.events' compiled loop, both tested equal to
    cache.py / events.run_concurrent over it; "reference" runs those instead. Returns a `ConfigResult`: `hit_tokens[i]` is request i's (log
    order) vLLM `num_cached_tokens`; `.totals()` the sums.
    """
    opts = options or SimulateOptions()
    if trace is None:
        trace = block_trace(workload, block_size)
    n_tokens = workload.n_tokens
    if mode == schema.MODE_SEQUENTIAL and engine == "auto":
        fast = (fastsim.simulate_sequential(trace, num_blocks) if num_blocks is None
                else fastpolicy.simulate_sequential_policy(trace, num_blocks, policy, uses))
        scheduled = (n_tokens > 0) & fast.fits
        hit_tokens = np.where(scheduled, fast.hit_tokens, 0)
        return ConfigResult(block_size, num_blocks, policy, mode, n_tokens, hit_tokens, scheduled,
                            fast.evictions, fast.peak_blocks_in_use,
                            exact_from=None if num_blocks is not None else
                            _sequential_blocks_used(trace, n_tokens, hit_tokens))
    hashes = TraceHashes(trace)
    if mode == schema.MODE_SEQUENTIAL:
        if policy == schema.POLICY_BELADY and future is None:
            future = FutureUses(hashes, n_tokens.tolist(), block_size)
        cache = PrefixCache(num_blocks, block_size, policy, future)
        hits = np.zeros(len(n_tokens), dtype=np.int64)
        scheduled = np.zeros(len(n_tokens), dtype=bool)
        for i, n in enumerate(n_tokens.tolist()):
            if n <= 0:
                continue
            hit = cache.admit(str(i), hashes[i], n, position=i)
            if hit is None:  # longer than the whole pool: vLLM refuses it
                continue
            cache.free(str(i))
            hits[i] = hit
            scheduled[i] = True
        return ConfigResult(block_size, num_blocks, policy, mode, n_tokens, hits, scheduled,
                            cache.evictions, cache.peak_blocks_in_use,
                            exact_from=max(len(cache.pool.blocks), 1) if num_blocks is None else None)
    if mode != schema.MODE_CONCURRENT:
        raise ValueError(f"unknown mode {mode!r}")
    if policy != schema.POLICY_LRU:
        raise AdvisorError(f"policy {policy!r} is simulated in sequential mode only; use lru for concurrent mode.")
    arrivals = workload.arrivals(opts.speedup)
    if engine == "auto":
        # Infinite cache: a pool with a block for every block the log ever allocates
        # never has to evict (a hashed block is popped only when no unhashed one is free).
        pool = num_blocks if num_blocks is not None else 1 + int(
            (-(-(n_tokens + np.maximum(workload.output_tokens - 1, 0)) // block_size)).sum())
        res = run_concurrent_compiled(
            trace, pool, n_tokens, workload.output_tokens, arrivals, opts.cost_model(), opts.max_num_seqs,
            workload.latency_s, workload.ttft_s, max_num_batched_tokens=opts.max_num_batched_tokens,
            prepared=prepared)
        used = res.blocks_used  # the highest block id ever popped + 1 (`ceiling_blocks`)
    else:
        cache = PrefixCache(num_blocks, block_size, policy)
        res = run_concurrent(
            cache, hashes, n_tokens, workload.output_tokens, arrivals, opts.cost_model(), opts.max_num_seqs,
            workload.latency_s, workload.ttft_s, max_num_batched_tokens=opts.max_num_batched_tokens)
        used = len(cache.pool.blocks)  # the infinite pool's every allocation
    exact_from = None
    if num_blocks is None:
        # at least the largest request's end, which the pool must hold whole
        ends = n_tokens + np.maximum(workload.output_tokens - 1, 0)
        exact_from = max(used, int((-(-ends[n_tokens > 0] // block_size)).max(initial=1)))
    return ConfigResult(block_size, num_blocks, policy, mode, n_tokens, res.hit_tokens, res.scheduled,
                        res.evictions, res.peak_blocks_in_use, res.preemptions, exact_from)


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
    `ConcurrentResult.blocks_used`; sequential: `_sequential_blocks_used`). A pool of at least that many blocks
    never evicts: the free queue holds unhashed blocks (freed ones at its head, then the
    never-used ones in id order) before hashed ones, and allocation pops the head, so a
    hashed block is taken only once every block has been used; it never lacks blocks
    for an admission or a decode slot either (blocks in use are blocks ever used). So
    hits, evictions (0), preemptions, peak and timings are the infinite run's, for
    every policy (fifo and belady also take unhashed free blocks first).
    """
    return ceiling.exact_from
