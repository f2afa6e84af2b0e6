"""The offload grid: vLLM's CPU offload tier at every GPU budget x `--offload-gib` of a block size.

Inputs: a `Workload`, a block size and its `BlockTrace`, the GPU budgets (usable blocks), the
`SimulateOptions` (`offload_gib`: the sizes swept, `--kv-offloading-size` in GiB over all TP
ranks; 0 = no CPU tier, the GPU alone), the model geometry (bytes per block: the tier's size in
chunks, the bytes moved) and the GPU (its host link, for transfer seconds). Output:
offload.parquet rows (schema.OFFLOAD), one per budget x size x window.

Each row is sequential mode (log order, one request at a time, prefill only): the GPU hits are
advisor.sim.fast.sequential's LRU run at the budget (the tier does not change them: see
advisor.sim.offload, "Sequential mode"), and the CPU tier is advisor.sim.offload's
`simulate_offload` over them, run compiled (advisor.sim.fast.offload, tested equal to it: one
pass over the blocks per size, about 15 million blocks a second).
Concurrent mode is not simulated with the tier: its timing (stores finishing after the step,
loads delaying the request, chunks being loaded delaying others) is not modelled.

Sizing (`tier_chunks`): vLLM's arithmetic on `kvmemory.bytes_per_block` for `--model` (per rank,
times the TP size, or one copy for MLA under TP), one GPU block per chunk (the flag sets no
other). Transfer time (`load_s`, `store_s`): the bytes one rank moves over its own host link at
the datasheet's one-way peak (advisor.sim.steptime `GpuSpec.host_link_bytes_per_s`), the whole
log; null without a figure. Real copies reach less than the peak, and stores overlap compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from advisor import kvmemory as kv
from advisor import schema
from advisor.errors import AdvisorError
from advisor.sim.cache import drops_last_hit_block
from advisor.sim.configuration import SimulateOptions, scheduler_requests
from advisor.sim.fast import sequential as fastsim
from advisor.sim.fast import trace as fasttrace
from advisor.sim.fast.offload import simulate_offload_compiled
from advisor.sim.hybrid_grid import sim_groups
from advisor.sim.offload import (
    OffloadCounters,
    OffloadResult,
    cpu_chunks_for_bytes,
    provisional_ranks,
)
from advisor.sim.steptime import GpuSpec, gpu_spec
from advisor.workload import Workload

BLOCKS_PER_CHUNK = 1  # what --kv-offloading-size gives (no kv_connector_extra_config block_size)


def wants_offload(options: SimulateOptions) -> bool:
    """Whether the stage runs the offload grid (`offload_gib` lists sizes)."""
    return bool(options.offload_gib)


def count_offload_configs(options: SimulateOptions, budgets_per_block_size: int) -> int:
    """Runs of the offload grid (a progress bar's share): one per budget and nonzero size."""
    if not wants_offload(options):
        return 0
    sizes = sum(1 for g in set(options.offload_gib) if g > 0)
    return len(options.block_sizes) * budgets_per_block_size * sizes


def tier_chunks(geom: kv.ModelGeometry, block_size: int, offload_gib: float, tp: int) -> int:
    """CPU chunks `--kv-offloading-size offload_gib` gives this model at `block_size` (advisor.sim.offload
    `cpu_chunks_for_bytes`: the size is over all `tp` ranks)."""
    single_copy = geom.mla_latent_dim is not None and tp > 1
    return cpu_chunks_for_bytes(int(offload_gib * kv.GIB), kv.bytes_per_block(geom, block_size, tp), tp,
                                BLOCKS_PER_CHUNK, single_copy)


def offload_skipped(options: SimulateOptions) -> str | None:
    """Why the offload grid does not run for these options (None: it runs)."""
    if wants_offload(options) and sim_groups(options.model, options.tensor_parallel_size) is not None:
        return (f"--offload-gib: not simulated for {options.model}: vLLM's connector offloads each of its KV cache "
                "groups apart, sliding-window groups looked up by their window (not modelled)")
    return None


def offload_notes(options: SimulateOptions) -> list[str]:
    """What the stage says about the offload grid: what it is, what it assumes, what it leaves out."""
    if not wants_offload(options):
        return []
    skipped = offload_skipped(options)
    if skipped is not None:
        return [skipped]
    sizes = ", ".join(f"{g:g}" for g in options.offload_gib)
    notes = [f"offload.parquet: vLLM's CPU offload tier (--kv-offloading-size {sizes} GiB over all TP ranks, "
             "--kv-offloading-backend native) at every GPU budget, sequential only (one request at a time, prefill "
             "only; the connector's timing under concurrency, stores finishing after the step and loads delaying "
             "the request, is not modelled): GPU hits, CPU hits (vLLM's external_prefix_cache_hits) and misses; the "
             "tier holds a copy of what the GPU computed, so the two together are worth about the larger, not the sum"]
    spec = _gpu(options)
    if spec is None or spec.host_link_bytes_per_s is None:
        notes.append("offload: no transfer time (load_s, store_s): the GPU's host link bandwidth is unknown "
                     "(--gpu naming a catalog GPU whose datasheet states its PCIe figure gives it: h100, h200, "
                     "a100, l40s, l4)")
    else:
        notes.append(f"offload: transfer time at {spec.name}'s host link, {spec.pcie_gbps:g} GB/s both ways "
                     f"({spec.pcie_gbps / 2:g} GB/s one way; {spec.source}), a peak real copies stay below")
    if options.speculative is not None and drops_last_hit_block(options.speculative, options.vllm_version):
        notes.append("offload: with an EAGLE-style drafter the GPU hit drops its last block and the CPU lookup starts "
                     "there; that combination is not checked against vLLM")
    return notes


def _gpu(options: SimulateOptions) -> GpuSpec | None:
    if options.gpu is None:
        return None
    try:
        return gpu_spec(options.gpu)
    except AdvisorError:  # a size in GiB
        return None


def offload_rows(workload: Workload, block_size: int, trace: fasttrace.BlockTrace, budgets: list[int],
                 options: SimulateOptions, geom: kv.ModelGeometry, kv_gib: Callable[[int], float | None],
                 warm: np.ndarray, tick: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """schema.OFFLOAD rows at `block_size`: every budget in `budgets` x every size x window."""
    reqs = scheduler_requests(workload)
    skip = reqs.skip_prefix_cache if reqs.skip_prefix_cache.any() else None
    drop_last = drops_last_hit_block(options.speculative, options.vllm_version)
    tp = options.tensor_parallel_size
    provisional = provisional_ranks(options.vllm_version)
    per_block = kv.bytes_per_block(geom, block_size, tp)  # one rank
    spec = _gpu(options)
    link = spec.host_link_bytes_per_s if spec is not None else None
    sizes = sorted(set(options.offload_gib))
    rows: list[dict[str, Any]] = []
    for nb in budgets:
        gpu = fastsim.simulate_sequential(trace, nb, skip, drop_last)
        scheduled = (reqs.n_tokens > 0) & gpu.fits
        gpu_hits = np.where(scheduled, gpu.hit_tokens, 0)
        queries = np.where(scheduled & ~reqs.skip_prefix_cache, reqs.n_tokens, 0)  # vLLM's prefix_cache_queries
        for gib in sizes:
            chunks = tier_chunks(geom, block_size, gib, tp) if gib > 0 else 0
            if gib > 0:
                res = simulate_offload_compiled(trace, gpu_hits, scheduled, chunks, blocks_per_chunk=BLOCKS_PER_CHUNK,
                                                skip=skip, provisional=provisional)
                if tick is not None:
                    tick(1)
            else:  # no connector: the GPU alone, no external counters
                none = np.zeros(len(reqs.n_tokens), np.int64)
                res = OffloadResult(none, none, OffloadCounters(), 0)
            moved = _transfers(res, per_block, tp, link)
            for window, mask in ((schema.WINDOW_COLD, None), (schema.WINDOW_WARM, warm)):
                rows.append({
                    "block_size": block_size, "num_blocks": nb, "kv_gib": kv_gib(nb), "offload_gib": float(gib),
                    "cpu_chunks": chunks, "blocks_per_chunk": BLOCKS_PER_CHUNK, "window": window,
                    **_totals(workload.num_requests, reqs.line, queries, scheduled, gpu_hits, res, mask), **moved,
                })
    return rows


def _transfers(res: OffloadResult, per_block: int, tp: int, link: float | None) -> dict[str, Any]:
    c = res.counters
    load_bytes = c.loads * BLOCKS_PER_CHUNK * per_block  # one rank
    store_bytes = c.stores * BLOCKS_PER_CHUNK * per_block
    return {
        "loads": c.loads, "stores": c.stores, "evictions": c.evictions,
        "refused_offers": c.refused_offers, "refused_chunks": c.refused_chunks,
        "load_gib": load_bytes * tp / kv.GIB, "store_gib": store_bytes * tp / kv.GIB,
        "load_s": load_bytes / link if link else None, "store_s": store_bytes / link if link else None,
    }


def _fold(line: np.ndarray | None, values: np.ndarray, num_requests: int) -> np.ndarray:
    """Per scheduler request -> per logged request (children summed)."""
    if line is None:
        return values
    return np.bincount(line, weights=values, minlength=num_requests).astype(values.dtype)


def _totals(num_requests: int, line: np.ndarray | None, queries: np.ndarray, scheduled: np.ndarray,
            gpu_hits: np.ndarray, res: OffloadResult, mask: np.ndarray | None) -> dict[str, Any]:
    """The hit columns over the masked logged requests that ran (per scheduler request in)."""
    ran = _fold(line, scheduled.astype(np.int64), num_requests) > 0
    m = ran if mask is None else ran & mask
    q, g, c, e = (int(_fold(line, v, num_requests)[m].sum())
                  for v in (queries, gpu_hits, res.cpu_hit_tokens, res.external_queries))
    rate = (lambda x: x / q if q else 0.0)  # noqa: E731
    return {
        "requests": int(m.sum()), "queries": q, "gpu_hit_tokens": g, "cpu_hit_tokens": c, "miss_tokens": q - g - c,
        "gpu_hit_rate": rate(g), "cpu_hit_rate": rate(c), "hit_rate": rate(g + c), "external_queries": e,
    }
