"""Hybrid models in the grid: which models run vLLM's hybrid rules, and one configuration of them.

Inputs: `SimulateOptions` (its `model` and tensor-parallel size name the KV cache layout,
advisor.kvlayout), a `BlockTrace` of the scheduler's requests at one block size, a pool size in
usable blocks (None: infinite) and, for concurrent mode, the engine's arrivals, outputs and
clock. Outputs: per scheduler request hit tokens and whether it ran, with the pool's counters
(`HybridSequential`, or events' `ConcurrentResult`), which advisor.sim.configuration's
`simulate_one` turns into a `ConfigResult`; and the stage's notes on what was simulated how.

Which models (`sim_groups`): a model whose layout `needs_hybrid_cache` (several KV cache groups,
or one sliding-window / chunked-local group) and that `HybridPrefixCache` models exactly (no
Mamba group, equal attention pages) runs with its groups: sequential mode on the compiled twin
advisor.sim.fast.hybrid (or the reference with `engine="reference"`), concurrent mode on
advisor.sim.events' `Engine` over a `HybridPrefixCache` (the reference; pure Python). Mamba
hybrids keep the full-attention simulator at the block size vLLM runs, and the notes say what
that leaves out. Full-attention models never reach this module.

The budget is the shared pool's usable blocks, every group taking its blocks from it; the GiB
of a row are `num_blocks + 1` times the layout's bytes per block (kvmemory with the layout's
pool geometry).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from advisor.kvlayout import KVLayout, kv_layout
from advisor.kvmemory import ModelGeometry
from advisor.sim.cache import drops_last_hit_block
from advisor.sim.events import ConcurrentResult, Engine
from advisor.sim.fast import hybrid as fasthybrid
from advisor.sim.fast.trace import BlockTrace
from advisor.sim.hybrid import HybridPrefixCache
from advisor.sim.steptime import StepTimeModel
from advisor.workload import Workload

Groups = tuple[tuple[str, int | None], ...]
MAX_MODEL_LEN = 1 << 40  # vLLM's --max-model-len: any length past every request caps nothing more (module docstring)


@lru_cache(maxsize=16)
def _layout(model: str, tp: int) -> KVLayout:
    return kv_layout(model, tp=tp)


def model_layout(model: str | None, tp: int) -> KVLayout | None:
    """The KV cache layout vLLM builds for `model` at tensor-parallel size `tp` (None: no model)."""
    return None if model is None else _layout(model, tp)


def sim_groups(model: str | None, tp: int) -> Groups | None:
    """The groups `HybridPrefixCache` simulates `model` with; None: the full-attention simulator."""
    layout = model_layout(model, tp)
    return None if layout is None else layout.hybrid_sim_groups()


# --- sequential mode -------------------------------------------------------------------------------
@dataclass(frozen=True)
class HybridSequential:
    """One sequential configuration: per scheduler request hit tokens and whether it ran."""

    hit_tokens: np.ndarray  # int64, 0 where it did not run
    scheduled: np.ndarray  # bool
    evictions: int
    peak_blocks_in_use: int
    exact_from: int | None  # infinite cache: every pool of at least this many blocks gives this result


def sequential_hybrid(trace: BlockTrace, groups: Groups, num_blocks: int | None, skip: np.ndarray | None,
                      engine: str = "auto") -> HybridSequential:
    """Sequential mode (log order, one request at a time, prefill only, each freed before the
    next) over `groups`: the compiled twin, or `HybridPrefixCache` with `engine="reference"`."""
    runnable = trace.num_tokens > 0
    if engine == "reference":
        return _sequential_reference(trace, groups, num_blocks, skip)
    if num_blocks is None:
        res = fasthybrid.ceiling_sequential_hybrid(trace, groups, skip)
        exact_from: int | None = max(res.blocks_used, res.peak_blocks_in_use, 1)
    else:
        res = fasthybrid.simulate_sequential_hybrid(trace, groups, num_blocks, skip)
        exact_from = None
    scheduled = runnable & res.admitted
    return HybridSequential(np.where(scheduled, res.hit_tokens, 0), scheduled, 0 if num_blocks is None else
                            res.evictions, res.peak_blocks_in_use, exact_from)


def _sequential_reference(trace: BlockTrace, groups: Groups, num_blocks: int | None,
                          skip: np.ndarray | None) -> HybridSequential:
    cache = HybridPrefixCache(groups, num_blocks, trace.block_size, max_model_len=MAX_MODEL_LEN)
    n = trace.num_requests
    hits = np.zeros(n, np.int64)
    scheduled = np.zeros(n, bool)
    for i, length in enumerate(trace.num_tokens.tolist()):
        if length <= 0:
            continue
        ids = trace.ids[trace.offsets[i]: trace.offsets[i + 1]].tolist()
        hit = cache.admit(str(i), ids, length, skip_prefix_cache=skip is not None and bool(skip[i]))
        if hit is None:  # the pool cannot hold it even empty: vLLM never schedules it
            continue
        cache.free(str(i))
        hits[i], scheduled[i] = hit, True
    exact_from = max(len(cache.pool.blocks), cache.peak_blocks_in_use, 1) if num_blocks is None else None
    return HybridSequential(hits, scheduled, cache.evictions, cache.peak_blocks_in_use, exact_from)


# --- concurrent mode -------------------------------------------------------------------------------
class SchedulerCache:
    """A `HybridPrefixCache` as `events.Engine` drives it, given what vLLM's KVCacheManager reads
    off the scheduler's `Request`: its prompt length (a resumed request's sliding-window replay
    boundary is its prompt's) and its tokens in flight (`allocate_slots` frees the blocks out of
    the window on the processed-token basis). `attach` hands it the engine's per-request lists."""

    def __init__(self, cache: HybridPrefixCache) -> None:
        self.cache = cache
        self.block_size = cache.block_size
        self.prompt: Sequence[int] = ()
        self.in_flight: Sequence[int] = ()

    def attach(self, engine: Engine) -> None:
        self.prompt, self.in_flight = engine.prompt, engine.in_flight  # the engine's lists, updated in place

    @property
    def evictions(self) -> int:
        return self.cache.evictions

    @property
    def peak_blocks_in_use(self) -> int:
        return self.cache.peak_blocks_in_use

    def fits(self, num_tokens: int) -> bool:
        return self.cache.fits(num_tokens)

    def admit(self, request_id: str, block_hashes: Sequence[Hashable], num_tokens: int, **kw: Any) -> int | None:
        return self.cache.admit(request_id, block_hashes, num_tokens, num_prompt_tokens=self.prompt[int(request_id)],
                                **kw)

    def grow(self, request_id: str, num_tokens_total: int, block_hashes: Sequence[Hashable] = (),
             num_cached_tokens: int | None = None) -> bool:
        return self.cache.grow(request_id, num_tokens_total, block_hashes, num_cached_tokens,
                               num_in_flight_tokens=self.in_flight[int(request_id)])

    def cache_blocks(self, request_id: str, num_tokens: int, block_hashes: Sequence[Hashable] = ()) -> None:
        self.cache.cache_blocks(request_id, num_tokens, block_hashes)

    def free(self, request_id: str) -> None:
        self.cache.free(request_id)


def concurrent_hybrid(groups: Groups, num_blocks: int | None, block_size: int, block_hashes: Sequence[Sequence[Hashable]],
                      n_tokens: np.ndarray, output_tokens: np.ndarray, arrivals_s: np.ndarray, clock: StepTimeModel,
                      max_num_seqs: int, max_num_batched_tokens: int, *, async_scheduling: bool,
                      skip_prefix_cache: np.ndarray | None,
                      max_in_flight_tokens: int | None = None) -> tuple[ConcurrentResult, int]:
    """Concurrent mode over `groups`: `events.Engine` (vLLM's scheduler, sync or async) over a
    `HybridPrefixCache` whose sliding-window and chunked-local admission cap is vLLM's for these
    batch limits (`max_in_flight_tokens`, None: `VllmConfig.max_in_flight_tokens` on a GPU, one
    batch of `max_num_batched_tokens`, two with async scheduling). Returns the result and, for
    the infinite cache, the pool from which every budget gives this very result (blocks ever
    allocated, at least the largest request's admission)."""
    if max_in_flight_tokens is None:
        max_in_flight_tokens = (2 if async_scheduling else 1) * max_num_batched_tokens  # max_concurrent_batches
    cache = HybridPrefixCache(groups, num_blocks, block_size, max_model_len=MAX_MODEL_LEN,
                              max_in_flight_tokens=max_in_flight_tokens)
    view = SchedulerCache(cache)
    engine = Engine(view, block_hashes, n_tokens, output_tokens, arrivals_s, clock, max_num_seqs,  # type: ignore[arg-type]
                    max_num_batched_tokens=max_num_batched_tokens, async_scheduling=async_scheduling,
                    skip_prefix_cache=skip_prefix_cache)
    view.attach(engine)
    for i in engine.arrival_order():
        engine.add_request(i)
    engine.advance()
    res = engine.result()
    ends = [e for e, n in zip(engine.end_tokens, engine.prompt, strict=True) if n > 0]
    used = max([len(cache.pool.blocks), 1] + [cache.admission_blocks(e) for e in ends])
    return res, used


# --- budgets --------------------------------------------------------------------------------------
def working_set_blocks(trace: BlockTrace, groups: Groups) -> int:
    """Pool blocks an infinite cache would hold once for every block a group caches: the
    distinct full blocks in each full-attention and chunked-local group, and in each
    sliding-window group the distinct blocks of the window before each prompt's replay
    boundary (vLLM's retention 0; the blocks kept at shared-prefix junctions come on top)."""
    total = 0
    for kind, window in groups:
        if kind == "sliding_window":
            assert window is not None
            total += _window_tail_blocks(trace, -(-(window - 1) // trace.block_size))
        else:
            total += trace.num_ids
    return total


def _window_tail_blocks(trace: BlockTrace, need: int) -> int:
    """Distinct ids among each request's `need` full blocks before `(prompt - 1) // B`."""
    stop = np.minimum((np.maximum(trace.num_tokens, 1) - 1) // trace.block_size, np.diff(trace.offsets))
    start = np.maximum(stop - need, 0)
    lens = stop - start
    if not lens.sum():
        return 0
    first = np.repeat(trace.offsets[:-1] + start, lens)
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    return int(len(np.unique(trace.ids[first + within])))


def run_block_sizes(layout: KVLayout | None, block_sizes: Sequence[int]) -> tuple[int, ...]:
    """The block sizes vLLM runs for the ones asked (a Mamba hybrid's are raised to hold a
    state, `KVLayout.block_size`), in order, each once."""
    if layout is None:
        return tuple(block_sizes)
    return tuple(dict.fromkeys(layout.block_size(b) for b in block_sizes))


# --- notes ----------------------------------------------------------------------------------------
def layout_notes(layout: KVLayout, geom: ModelGeometry, options: Any, workload: Workload) -> list[str]:
    """What the stage says about the model's KV cache layout: how it is simulated, the block
    sizes vLLM runs it at, and what of the grid does not apply to it."""
    typical = max(int(np.median(workload.n_tokens)) if workload.num_requests else 1, 1)
    notes = list(layout.notes)
    note = layout.hybrid_note(geom, options.block_sizes[0], typical)
    if note:
        notes.append(note)
    ran = run_block_sizes(layout, options.block_sizes)
    if ran != tuple(options.block_sizes):
        notes.append(f"block sizes: vLLM runs {layout.name} at {', '.join(map(str, ran))} for --block-size "
                     f"{', '.join(map(str, options.block_sizes))} (an attention page must hold a Mamba state), so "
                     "those are the sizes simulated")
    if layout.hybrid_sim_groups() is None:
        return notes
    if set(options.policies) - {"lru"}:
        notes.append("fifo and belady reference lines are simulated for full-attention models only: left out for "
                     f"{layout.name}'s KV cache groups")
    if any(r > 1 for r in options.replicas):
        notes.append(f"--replicas: N engines behind a router are not simulated for hybrid models yet ({layout.name})")
    if options.speculative is not None and drops_last_hit_block(options.speculative, options.vllm_version):
        notes.append(f"speculative decoding ({options.speculative}): the dropped last hit block is not modelled for "
                     "hybrid models (vLLM drops one per group and widens the sliding-window run); hits are simulated "
                     "without it, one block more than vLLM's where a hit ends in a shared prefix")
    if "concurrent" in options.modes:
        notes.append("concurrent mode runs hybrid models on the readable reference engine (advisor.sim.events over "
                     "advisor.sim.hybrid: exact, but pure Python and many times slower than the compiled engine), so "
                     f"only at the {options.reference_budgets or 'all'} reference budgets of each block size "
                     "(--reference-budgets; 0 = all), and caching off (the time baseline) at the largest of them; "
                     "sequential mode runs every budget")
    return notes
