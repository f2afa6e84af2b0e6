"""Simulate vLLM's prefix cache over a grid of block sizes x memory budgets (the stage).

Inputs: requests.parquet + tokens.parquet (a `Workload`), `SimulateOptions`, and
optionally a model geometry (advisor.kvmemory) for budgets in GiB. Outputs:
sim.parquet rows (schema.SIM: one per block size x budget x policy x mode x
window, plus the infinite-cache ceiling rows with `num_blocks` null) and
sim_requests.parquet rows (schema.SIM_REQUESTS: per-request hit tokens), and
replicas.parquet rows (schema.REPLICAS: N engines behind each router, advisor.sim.replicas)
where `replicas` lists a count above 1, and offload.parquet rows (schema.OFFLOAD: vLLM's CPU
offload tier at every budget, advisor.sim.offload_grid) where `offload_gib` lists sizes.

Each configuration is advisor.sim.configuration's `simulate_one` (its docstring has the
modes, policies and counting); this module chooses the configurations and turns
their results into rows:
- policies: "lru" (vLLM) in both modes at every budget; "fifo" and "belady" as
  reference lines in sequential mode only, at `reference_budgets` budgets spread
  over each block size's list (ends included; 0 = all);
- windows: "cold" counts every request; "warm" counts only those after the warm-up
  (`warmup`: "50%" of the log by default, "N" requests, or "Ns" seconds after the
  first timestamp). Both come from the same pass: the warm-up requests still fill
  the cache;
- a budget at or past the never-evicting size (`configuration.ceiling_blocks`) takes
  the infinite-cache run's result unsimulated; the others run in `workers` threads, or
  as Ray tasks when the stage runs on Ray (docs/scale.md).

Budgets (`plan_budgets`): explicit `num_blocks`, `budget_tokens` (tokens // block
size), `kv_cache_gib` (needs a model) replace the default sweep; a model with a
GPU adds the GPU's budget. The default sweep is `sweep_points` geometric steps from
1.5% of the block size's working set (distinct full prompt blocks), but never below
the largest request, to 125% of it plus the largest request, so every curve
flattens.

sim_requests.parquet holds, per block size, the ceiling and every LRU budget in
each mode, in that priority, until `max_request_rows` rows (then later budgets are
left out and the counts say so); replay recomputes any configuration exactly with
`simulate_one`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from advisor import kvmemory as kv
from advisor import schema
from advisor.errors import AdvisorError
from advisor.executor import Executor, ExecutorOptions, Shared, remote_executor
from advisor.kvlayout import KVLayout
from advisor.sim.blockstreams import StreamInputs, open_streams
from advisor.sim.cache import drops_last_hit_block
from advisor.sim.configuration import (
    SCHEDULING_ASYNC,
    ConfigResult,
    SimulateOptions,
    ceiling_blocks,
    check_trace_block_size,
    logged_block_traces,
    scheduler_requests,
    simulate_one,
)
from advisor.sim.fast import trace as fasttrace
from advisor.sim.fast.events import request_hashes
from advisor.sim.fast.policies import future_uses
from advisor.sim.hybrid_grid import (
    layout_notes,
    model_layout,
    run_block_sizes,
    working_set_blocks,
)
from advisor.sim.offload_grid import (
    count_offload_configs,
    offload_notes,
    offload_rows,
    offload_skipped,
    wants_offload,
)
from advisor.sim.replicas import count_replica_configs, replica_rows, wants_replicas
from advisor.vllm_versions import facts
from advisor.workload import Workload, load_workload, warm_mask


@dataclass(frozen=True)
class GridResult:
    sim: pa.Table  # schema.SIM
    sim_requests: pa.Table  # schema.SIM_REQUESTS
    notes: list[str] = field(default_factory=list)
    replicas: pa.Table = field(default_factory=schema.REPLICAS.empty_table)  # schema.REPLICAS
    offload: pa.Table = field(default_factory=schema.OFFLOAD.empty_table)  # schema.OFFLOAD


def batch_limits_note(options: SimulateOptions) -> str:
    """Which batch limits concurrent mode used, and where they came from."""
    tier = (f"vllm serve's defaults on {options.gpu}" if options.gpu is not None else
            "vLLM's defaults for a GPU it does not size up for; give --gpu for yours")
    default = SimulateOptions(gpu=options.gpu, workers=1)
    given = (options.max_num_seqs, options.max_num_batched_tokens) != (default.max_num_seqs,
                                                                        default.max_num_batched_tokens)
    budget = options.max_num_batched_tokens
    return (f"concurrent mode: --max-num-seqs {options.max_num_seqs}, --max-num-batched-tokens "
            f"{'unlimited' if budget is None else budget} ({'as given; ' + tier + ' otherwise' if given else tier})")


def scheduling_note(options: SimulateOptions) -> str:
    """Which of vLLM's schedulers concurrent mode ran, and why."""
    what = ("vLLM's AsyncScheduler (step N+1 is scheduled before step N's output is seen), its default on GPUs"
            if options.scheduling == SCHEDULING_ASYNC else
            "vLLM's synchronous Scheduler, what its CPU engine runs")
    default = SimulateOptions(gpu=options.gpu, workers=1).scheduling
    why = "as given" if default != options.scheduling else ("--gpu given" if options.gpu is not None else "no --gpu given")
    return f"concurrent mode: {options.scheduling} scheduling, {what} ({why}; --scheduling sync|async sets it)"


def request_notes(workload: Workload, options: SimulateOptions) -> list[str]:
    """What the stage says about requests vLLM treats apart, and about speculative decoding."""
    notes = []
    skipped = int(workload.skip_prefix_cache.sum())
    if skipped:
        notes.append(f"{skipped:,} requests ask for prompt logprobs (or echo their prompt with logprobs): vLLM does "
                     "not read the prefix cache for them, so they hit nothing and add no queries; their blocks are "
                     "still cached for later requests")
    fanned = workload.n > 1
    if fanned.any():
        notes.append(f"{int(fanned.sum()):,} requests ask for n > 1 completions: vLLM runs them as "
                     f"{int(workload.n[fanned].sum()):,} requests with the same prompt, arriving together (after the "
                     "first, each hits the blocks the first cached); queries and hits of such a request, in "
                     "sim_requests.parquet too, are the sums over its children")
    version = options.vllm_version
    eagle = facts(version).eagle
    if options.speculative is None:
        notes.append("speculative decoding: not modelled (with --speculative-config in vllm serve, pass "
                     "--speculative METHOD)")
    elif drops_last_hit_block(options.speculative, version):
        notes.append(f"speculative decoding: {options.speculative}, whose drafter makes vLLM {version} drop the "
                     "last matched block of every cache hit (modelled)")
    elif options.speculative in eagle.drop_methods and eagle.lookahead_hash_tokens:
        notes.append(f"speculative decoding: {options.speculative}; vLLM {version} hashes each block together "
                     "with the token after it instead of dropping a block, which is not modelled: where a shared "
                     "prefix ends exactly at a block boundary, vLLM hits one block less than simulated")
    else:
        notes.append(f"speculative decoding: {options.speculative}, which leaves vLLM {version}'s cache hits as "
                     "they are")
    return notes


# --- budgets ---
def sweep(working_set: int, largest_request: int, points: int) -> list[int]:
    """Geometric budgets from ~1.5% of the working set (>= the largest request) past 125%."""
    lo = max(largest_request, math.ceil(0.015 * working_set), 1)
    hi = max(math.ceil(1.25 * working_set) + largest_request, 2 * lo)
    values = sorted({int(round(v)) for v in np.geomspace(lo, hi, points)})
    if len(values) < points:  # tiny range: fill linearly
        values = sorted({int(round(v)) for v in np.linspace(lo, hi, points)} | set(values))
    return values


def plan_budgets(
    workload: Workload,
    options: SimulateOptions,
    geom: kv.ModelGeometry | None,
    block_size: int,
    trace: fasttrace.BlockTrace,
    layout: KVLayout | None = None,
) -> tuple[list[int], list[str]]:
    """Usable block counts to simulate at `block_size`, and notes on where they came from.
    `layout`: a hybrid model's KV cache groups, when the grid runs them (`hybrid_sim_groups`):
    the sweep then spans the pool blocks all groups hold, not one full-attention group's."""
    notes: list[str] = []
    if options.kv_cache_gib and geom is None:
        raise AdvisorError("--kv-cache-gib needs --model (a catalog name or a local config.json) to turn GiB into blocks.")
    if options.gpu is not None and geom is None:
        notes.append(f"block size {block_size}: --gpu without --model adds no budget (weights and KV "
                     "bytes per block unknown); pass --model to simulate the GPU's KV memory")
    tp = options.tensor_parallel_size
    budgets = set(options.num_blocks)
    budgets.update(t // block_size for t in options.budget_tokens)
    if geom is not None:
        budgets.update(kv.blocks_for_kv_bytes(geom, block_size, int(g * kv.GIB), tp) for g in options.kv_cache_gib)
        if options.gpu is not None:
            gpu_gib = kv.resolve_gpu(options.gpu)
            kv_bytes = kv.kv_bytes_for_gpu(geom, gpu_gib, options.gpu_memory_utilization,
                                           options.headroom_gib, tp)
            gpu_blocks = kv.blocks_for_kv_bytes(geom, block_size, kv_bytes, tp)
            budgets.add(gpu_blocks)
            notes.append(f"block size {block_size}: GPU budget {gpu_gib:.1f} GiB x {options.gpu_memory_utilization:g} "
                         f"minus weights and headroom = {kv_bytes / kv.GIB:.2f} GiB = {gpu_blocks:,} blocks")
    if not (options.num_blocks or options.budget_tokens or options.kv_cache_gib):
        n = workload.n_tokens
        if schema.MODE_CONCURRENT in options.modes:  # a running request also holds its output
            n = n + np.maximum(workload.output_tokens - 1, 0)
        largest = int(max((-(-int(x) // block_size) for x in n.tolist()), default=1))
        ws = trace.working_set_blocks()
        if layout is not None:  # every group takes blocks from the one pool
            largest = layout.admission_blocks(int(n.max(initial=1)), block_size)
            ws = working_set_blocks(trace, layout.sim_groups())
        budgets.update(sweep(ws, largest, options.sweep_points))
        notes.append(f"block size {block_size}: working set {ws:,} blocks, largest request {largest:,} blocks")
    if any(b <= 0 for b in budgets):
        notes.append(f"block size {block_size}: budgets of 0 blocks left out")
    return sorted(b for b in budgets if b > 0), notes


# --- the grid ---
def _kv_gib(geom: kv.ModelGeometry | None, bs: int, nb: int | None, tp: int) -> float | None:
    return None if geom is None or nb is None else kv.kv_gib_for_blocks(geom, bs, nb, tp)


def count_configs(options: SimulateOptions) -> int:
    """About how many configurations `simulate_grid` runs (a progress bar's length)."""
    explicit = len(set(options.num_blocks)) + len(set(options.budget_tokens)) + len(set(options.kv_cache_gib))
    n_budgets = (explicit or options.sweep_points) + (1 if options.gpu is not None else 0)
    n_ref = n_budgets if options.reference_budgets <= 0 else min(options.reference_budgets, n_budgets)
    layout = model_layout(options.model, options.tensor_parallel_size)
    hybrid = layout is not None and layout.hybrid_sim_groups() is not None
    per_bs = len(options.modes) + n_budgets * len(options.modes)
    if hybrid and schema.MODE_CONCURRENT in options.modes:  # concurrent at the reference budgets only
        per_bs -= n_budgets - n_ref
    if schema.MODE_SEQUENTIAL in options.modes and not hybrid:
        per_bs += n_ref * (len(options.policies) - 1)
    if schema.MODE_CONCURRENT in options.modes:
        per_bs += 1 if hybrid else n_ref  # caching off
    replicas = 0 if hybrid else count_replica_configs(options, n_ref)
    offload = 0 if offload_skipped(options) else count_offload_configs(options, n_budgets)
    return len(run_block_sizes(layout, options.block_sizes)) * per_bs + replicas + offload


def grid_block_sizes(options: SimulateOptions, geom: kv.ModelGeometry | None) -> tuple[int, ...]:
    """The block sizes the grid runs: `options.block_sizes`, or the one a hybrid model's vLLM runs."""
    layout = model_layout(options.model, options.tensor_parallel_size) if geom is not None else None
    return run_block_sizes(layout, options.block_sizes)


def simulate_grid(
    workload: Workload,
    options: SimulateOptions,
    geom: kv.ModelGeometry | None = None,
    progress: Callable[[int], None] | None = None,
    traces: Mapping[int, fasttrace.BlockTrace] | None = None,
    executor: Executor | None = None,
) -> GridResult:
    """Every configuration of the grid: sim rows and per-request rows (module docstring).
    `executor`: an open executor that spans machines (Ray: `advisor.executor.remote_executor`)
    runs the configurations and replica runs as its pieces; None: this machine's threads.
    `traces`: the logged requests' block trace at each block size run (advisor.sim.blockstreams;
    the workload may then be lean); None: hashed here from the workload's ids."""
    _validate(workload, options)
    notes: list[str] = []
    if schema.MODE_CONCURRENT in options.modes:
        notes.append(batch_limits_note(options))
        notes.append(scheduling_note(options))
    if len(workload.models) > 1:
        notes.append(f"{len(workload.models)} models in this log: each is simulated as its own cache (no block "
                     "shared across models) in one pool of memory; each model is its own vLLM deployment, so "
                     "for a per-deployment budget run pc-advise on each model's lines")
    notes.extend(request_notes(workload, options))
    notes.extend(offload_notes(options))
    layout = model_layout(options.model, options.tensor_parallel_size) if geom is not None else None
    if layout is not None and geom is not None:
        geom = layout.pool_geometry(geom)  # budgets and GiB in the hybrid pool's blocks
        notes.extend(layout_notes(layout, geom, options, workload))
    hybrid = layout if layout is not None and layout.hybrid_sim_groups() is not None else None
    policies = options.policies if hybrid is None else (schema.POLICY_LRU,)  # fifo/belady: full attention only
    block_sizes = grid_block_sizes(options, geom)
    warm = warm_mask(workload, options.warmup)
    reqs = scheduler_requests(workload)
    tp = options.tensor_parallel_size
    rows: list[dict[str, Any]] = []
    replica_table: list[dict[str, Any]] = []
    offload_table: list[dict[str, Any]] = []  # the CPU offload tier (advisor.sim.offload_grid)
    req_tables: list[pa.Table] = []
    req_rows = 0
    left_out = 0
    tick = progress or (lambda _n: None)

    def keep_requests(res: ConfigResult) -> None:
        nonlocal req_rows, left_out
        if req_rows + workload.num_requests > options.max_request_rows:
            left_out += 1
            return
        req_rows += workload.num_requests
        req_tables.append(_request_rows(workload, res))

    logged = dict(traces) if traces is not None else logged_block_traces(workload, block_sizes)
    for bs in block_sizes:
        trace = fasttrace.repeat_requests(logged.pop(bs), workload.n)  # one block size held at a time
        budgets, budget_notes = plan_budgets(workload, options, geom, bs, trace, hybrid)
        notes.extend(budget_notes)
        ceilings: dict[tuple[str, str], float] = {}
        ceiling_runs: dict[str, ConfigResult] = {}
        prepared = (request_hashes(trace, reqs.n_tokens, reqs.output_tokens, trace.num_ids)
                    if schema.MODE_CONCURRENT in options.modes else None)
        for mode in options.modes:
            res = simulate_one(workload, bs, None, mode=mode, trace=trace, options=options, prepared=prepared)
            ceiling_runs[mode] = res
            for window, mask in ((schema.WINDOW_COLD, None), (schema.WINDOW_WARM, warm)):
                t = res.totals(mask)
                ceilings[(mode, window)] = t["hit_rate"]
            rows.extend(_sim_rows(res, warm, ceilings, None))
            keep_requests(res)
            tick(1)
        ref_budgets = _spread(budgets, options.reference_budgets)
        configs = [(nb, mode, policy) for nb in budgets for mode in options.modes
                   for policy in policies
                   if policy == schema.POLICY_LRU or (mode == schema.MODE_SEQUENTIAL and nb in ref_budgets)
                   if hybrid is None or mode == schema.MODE_SEQUENTIAL or nb in ref_budgets]  # hybrid: slow engine
        if schema.MODE_CONCURRENT in options.modes:  # the baseline: caching off, same engine and clock
            off_budgets = sorted(ref_budgets) if hybrid is None else [max(ref_budgets)]  # the one later stages read
            configs += [(nb, schema.MODE_CONCURRENT, schema.POLICY_OFF) for nb in off_budgets]
        uses = future_uses(trace, reqs.skip_prefix_cache) if schema.POLICY_BELADY in policies else None
        singles: dict[tuple[str, int | None], ConfigResult] = {}  # the replica grid's one-replica rows
        for res in _run_configs(workload, bs, trace, configs, options, tick, ceiling_runs, prepared, uses, executor):
            rows.extend(_sim_rows(res, warm, ceilings, _kv_gib(geom, bs, res.num_blocks, tp)))
            if res.policy == schema.POLICY_LRU:
                keep_requests(res)
                singles[(res.mode, res.num_blocks)] = res
        if wants_replicas(options) and hybrid is None:  # N engines, each with the budget's blocks, at the reference budgets
            replica_table.extend(replica_rows(workload, bs, trace, sorted(ref_budgets), options,
                                              lambda nb, bs=bs: _kv_gib(geom, bs, nb, tp), tick, singles=singles,
                                              executor=executor))
        if wants_offload(options) and offload_skipped(options) is None and geom is not None:  # every budget
            offload_table.extend(offload_rows(workload, bs, trace, budgets, options, geom,
                                              lambda nb, bs=bs: _kv_gib(geom, bs, nb, tp), warm, tick))
    if left_out:
        notes.append(f"sim_requests.parquet: {left_out} configurations left out (max_request_rows "
                     f"{options.max_request_rows:,}); simulate_one recomputes them")
    sim = pa.Table.from_pylist(rows, schema=SIM_OUT)
    sim_requests = pa.concat_tables(req_tables) if req_tables else schema.SIM_REQUESTS.empty_table()
    if replica_table:
        notes.append(f"replicas.parquet: {len(replica_table)} rows (replicas {_csv(sorted(set(options.replicas)))} x "
                     f"routers {_csv(options.routers)} x modes {_csv(options.modes)}; memory per replica = the budget's "
                     "blocks)")
    return GridResult(sim, sim_requests, notes, pa.Table.from_pylist(replica_table, schema=schema.REPLICAS),
                      pa.Table.from_pylist(offload_table, schema=schema.OFFLOAD))


def _csv(values: Any) -> str:
    return ",".join(map(str, values))


def _as_budget(ceiling: ConfigResult, num_blocks: int, policy: str) -> ConfigResult:
    return replace(ceiling, num_blocks=num_blocks, policy=policy, exact_from=None)


@dataclass(frozen=True)
class ConfigInputs:
    """What every configuration of one block size reads (shared once with the executor's
    pieces: `_run_config`)."""

    workload: Workload
    block_size: int
    trace: fasttrace.BlockTrace
    options: SimulateOptions
    prepared: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    uses: tuple[np.ndarray, np.ndarray] | None


def _run_config(item: tuple[Shared[ConfigInputs], tuple[int, str, str]]) -> ConfigResult:
    """One configuration (an executor's piece, or a thread's)."""
    shared, (nb, mode, policy) = item
    i = shared.get()
    return simulate_one(i.workload, i.block_size, nb, mode=mode, policy=policy, trace=i.trace, options=i.options,
                        prepared=i.prepared, uses=i.uses)


def _run_configs(workload: Workload, bs: int, trace: fasttrace.BlockTrace, configs: list[tuple[int, str, str]],
                 options: SimulateOptions, tick: Callable[[int], None],
                 ceiling_runs: dict[str, ConfigResult] | None = None,
                 prepared: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 uses: tuple[np.ndarray, np.ndarray] | None = None,
                 executor: Executor | None = None) -> list[ConfigResult]:
    """Results of `configs` in their order. A budget at or past its mode's
    `ceiling_blocks` takes the ceiling run's result (`ceiling_runs`, by mode) unsimulated.
    The others run as `executor`'s pieces when it spans machines (Ray: the inputs shipped
    once), else in `options.workers` threads when > 1 (the compiled kernels release the GIL
    and the threads share the trace); each is independent, so the results do not depend on
    where they ran."""
    done: dict[tuple[int, str, str], ConfigResult] = {}
    for config in configs:
        nb, mode, policy = config
        ceiling = (ceiling_runs or {}).get(mode) if policy != schema.POLICY_OFF else None
        threshold = ceiling_blocks(ceiling) if ceiling is not None else None
        if threshold is not None and nb >= threshold:
            assert ceiling is not None
            done[config] = _as_budget(ceiling, nb, policy)
            tick(1)

    todo = [c for c in configs if c not in done]
    inputs = ConfigInputs(workload, bs, trace, options, prepared, uses)
    with contextlib.ExitStack() as stack:
        if executor is not None and executor.distributed and len(todo) > 1:
            shared = executor.share(inputs)
            results: Iterable[ConfigResult] = executor.map(_run_config, [(shared, c) for c in todo])
        elif options.workers > 1 and len(todo) > 1:
            pool = stack.enter_context(ThreadPoolExecutor(min(options.workers, len(todo))))
            results = pool.map(_run_config, [(Shared(inputs), c) for c in todo])
        else:
            results = (_run_config((Shared(inputs), c)) for c in todo)
        for config, res in zip(todo, results, strict=True):
            done[config] = res
            tick(1)
    return [done[c] for c in configs]


def _spread(budgets: list[int], k: int) -> set[int]:
    """`k` budgets spread over the sorted list, ends included (all of them when k is 0)."""
    if k <= 0 or k >= len(budgets):
        return set(budgets)
    return {budgets[int(i)] for i in np.round(np.linspace(0, len(budgets) - 1, k))}


SIM_OUT = schema.SIM


def _sim_rows(res: ConfigResult, warm: np.ndarray, ceilings: dict[tuple[str, str], float],
              kv_gib: float | None) -> list[dict[str, Any]]:
    out = []
    for window, mask in ((schema.WINDOW_COLD, None), (schema.WINDOW_WARM, warm)):
        t = res.totals(mask)
        out.append({
            "block_size": res.block_size, "num_blocks": res.num_blocks, "kv_gib": kv_gib,
            "policy": res.policy, "mode": res.mode, "window": window,
            **t,
            "evictions": res.evictions, "peak_blocks_in_use": res.peak_blocks_in_use,
            "ceiling_hit_rate": ceilings[(res.mode, window)], "preemptions": res.preemptions,
            **(res.timing.stats(mask) if res.timing is not None else {}),
        })
    return out


def _request_rows(workload: Workload, res: ConfigResult) -> pa.Table:
    n = workload.num_requests
    return pa.table({
        "request_id": workload.request_ids,
        "block_size": pa.array(np.full(n, res.block_size, dtype=np.int32)),
        "num_blocks": pa.array([res.num_blocks] * n, type=pa.int64()),
        "mode": pa.array([res.mode] * n, type=pa.string()),
        "n_tokens": pa.array(res.n_tokens),
        "hit_tokens": pa.array(res.hit_tokens),
    }, schema=schema.SIM_REQUESTS)


def _validate(workload: Workload, options: SimulateOptions) -> None:
    if not options.block_sizes:
        raise AdvisorError("no block sizes given: pass --block-sizes, e.g. 16,32,64,128.")
    if any(b <= 0 for b in options.block_sizes):
        raise AdvisorError(f"block sizes must be positive, got {list(options.block_sizes)}.")
    for p in options.policies:
        if p not in (schema.POLICY_LRU, schema.POLICY_FIFO, schema.POLICY_BELADY):
            raise AdvisorError(f"unknown policy {p!r}: use lru, fifo, belady.")
    if schema.POLICY_LRU not in options.policies:
        raise AdvisorError("--policies must include lru (vLLM's policy; later stages read it).")
    for m in options.modes:
        if m not in (schema.MODE_SEQUENTIAL, schema.MODE_CONCURRENT):
            raise AdvisorError(f"unknown mode {m!r}: use sequential, concurrent.")
    if options.speedup <= 0 or options.max_num_seqs < 1:
        raise AdvisorError("--speedup must be > 0 and --max-num-seqs >= 1.")
    if workload.is_hash_trace:
        for bs in options.block_sizes:
            check_trace_block_size(workload, bs)


# --- the stage at the edge ---
def simulate_run(
    requests_path: Path,
    tokens_path: Path,
    sim_path: Path,
    sim_requests_path: Path,
    options: SimulateOptions,
    progress: Callable[[int], None] | None = None,
    replicas_path: Path | None = None,
    offload_path: Path | None = None,
    blocks_dir: Path | None = None,
    executor: ExecutorOptions | None = None,
) -> dict[str, Any]:
    """Read the run folder's inputs, simulate the grid, write both outputs; return counts.

    The workload is read lean and its block traces streamed (advisor.sim.blockstreams): token
    ids are never all held. `blocks_dir`: where the streams are kept between runs (None:
    hashed, not kept); `executor`: where their shards are hashed."""
    from advisor.runfolder import write_table

    workload = load_workload(requests_path, tokens_path, ids=False)
    if workload.is_hash_trace and options.block_sizes == SimulateOptions().block_sizes:
        options = replace(options, block_sizes=(workload.trace_block_size,))
    geom = kv.resolve_model(options.model) if options.model else None
    _validate(workload, options)  # before hashing: a bad block size fails at once
    traces, streamed = open_streams(StreamInputs.of(workload, requests_path, tokens_path),
                                    grid_block_sizes(options, geom), blocks_dir, executor)
    with remote_executor(executor) as remote:  # Ray: the configurations as its tasks
        grid = simulate_grid(workload, options, geom, progress, traces, executor=remote)
    del traces
    write_table(sim_path, grid.sim, SIM_OUT)
    write_table(sim_requests_path, grid.sim_requests, schema.SIM_REQUESTS)
    if replicas_path is not None:
        write_table(replicas_path, grid.replicas, schema.REPLICAS)
    if offload_path is not None:
        write_table(offload_path, grid.offload, schema.OFFLOAD)
    return {**summary_counts(grid, workload), "block_streams": streamed.as_dict()}


def summary_counts(grid: GridResult, workload: Workload) -> dict[str, Any]:
    sim = grid.sim
    ceil = sim.filter(pc.and_(pc.is_null(sim["num_blocks"]),
                              pc.and_(pc.equal(sim["window"], schema.WINDOW_COLD),
                                      pc.equal(sim["mode"], schema.MODE_SEQUENTIAL))))
    return {
        "requests": workload.num_requests,
        "input_kind": "hash_trace" if workload.is_hash_trace else "tokens",
        "prompt_tokens": int(workload.n_tokens.sum()),
        # the longest sequence one request reaches (prompt + reply): sizes vLLM's --max-model-len
        "longest_request_tokens": int((workload.n_tokens + np.maximum(workload.output_tokens, 1)).max(initial=0)),
        "configs": sim.num_rows // 2,
        "sim_request_rows": grid.sim_requests.num_rows,
        "ceiling_by_block_size": {
            str(b): round(r, 6) for b, r in zip(ceil["block_size"].to_pylist(), ceil["hit_rate"].to_pylist())
        },
        "notes": grid.notes,
    }

