"""vLLM's CPU offload tier in sequential mode, compiled: `advisor.sim.offload.simulate_offload`
on arrays.

Input: a `BlockTrace` (advisor.sim.fast.trace: each request's full blocks as dense ids, the
block size), per request its GPU hit tokens and whether it ran (advisor.sim.fast.sequential's
run at the budget), the tier's size in chunks, blocks per chunk, who skips the cache read,
and the version's ranking rule (`advisor.sim.offload.provisional_ranks`). Output: the same
`OffloadResult` as the reference; tests/test_offload.py keeps them equal under eviction
pressure and refused offers, for both ranking rules.

Why a linked list is the reference's ranks here. In sequential mode nothing is pinned or
pending when a request's offer evicts, so every chunk is evictable and vLLM's rank order is a
list: a stored chunk goes to the tail (most recent), a finished request moves the chunks it
touched to the tail last chunk first, and eviction walks from the head past the offer's own
chunks. Under 0.33+'s provisional ranks a load moves the loaded chunks to the tail first
(largest position first), so the same request's offer evicts older chunks before them; the
offer's own present chunks also get provisional ranks, but they are protected in the one
eviction that follows and re-ranked when the request finishes, so where they sit meanwhile
changes nothing. A chunk's key is its last block's id (ids are chained prefix keys, so one
request never repeats one).
"""

from __future__ import annotations

import numpy as np

from advisor.compiled import compiled
from advisor.sim.fast.lists import insert_before, unlink
from advisor.sim.fast.sequential import request_flags
from advisor.sim.fast.trace import BlockTrace
from advisor.sim.offload import OffloadCounters, OffloadResult

# counters[i]: loads, stores, evictions, refused offers, refused chunks (OffloadCounters' order)
_LOADS, _STORES, _EVICTIONS, _REFUSED_OFFERS, _REFUSED_CHUNKS = range(5)


@compiled
def _to_tail(nxt, prv, tail, key):  # type: ignore[no-untyped-def]
    unlink(nxt, prv, key)
    insert_before(nxt, prv, tail, key)


@compiled
def _sequential_tier(ids, offsets, num_tokens, block_size, per_chunk, num_chunks, num_ids, gpu_hits, scheduled,  # type: ignore[no-untyped-def]
                     skip, provisional, cpu_hits, ext_queries, counters):
    head, tail = num_ids, num_ids + 1
    nxt = np.empty(num_ids + 2, np.int64)
    prv = np.empty(num_ids + 2, np.int64)
    nxt[head], prv[tail] = tail, head
    present = np.zeros(num_ids, np.bool_)
    guard = np.full(num_ids, -1, np.int64)  # == r: in request r's offer (protected from its eviction)
    tpc = block_size * per_chunk
    size = 0
    for r in range(len(num_tokens)):
        n = num_tokens[r]
        if not scheduled[r] or n <= 0:
            continue
        local = gpu_hits[r]
        ext_queries[r] = n - local
        base = offsets[r] + per_chunk - 1
        nkeys = min(offsets[r + 1] - offsets[r], n // block_size) // per_chunk  # key j: ids[base + per_chunk * j]
        hit = 0
        max_hit = min(n, nkeys * tpc)
        if not skip[r] and max_hit - local >= tpc:
            start = local // tpc
            j = start
            while j < nkeys and present[ids[base + per_chunk * j]]:
                j += 1
            hit = min(max_hit, tpc * j) - local
            if hit < tpc:
                hit = 0
        cpu_hits[r] = hit
        first = 0  # the offer's first chunk; the touched range is [lo, nkeys)
        lo = 0
        if hit > 0:
            lo = local // tpc
            first = -(-(local + hit) // tpc)
            counters[_LOADS] += first - lo
            if provisional:  # loaded chunks ranked above all older ones, the largest position lowest
                for j in range(first - 1, lo - 1, -1):
                    _to_tail(nxt, prv, tail, ids[base + per_chunk * j])
        new = 0
        kept = 0
        for j in range(first, nkeys):
            key = ids[base + per_chunk * j]
            if present[key]:
                guard[key] = r
                kept += 1
            else:
                new += 1
        if new > 0:
            need = new - (num_chunks - size)
            if need > size - kept:
                counters[_REFUSED_OFFERS] += 1
                counters[_REFUSED_CHUNKS] += new
            else:
                b = nxt[head]
                while need > 0:
                    after = nxt[b]
                    if guard[b] != r:
                        unlink(nxt, prv, b)
                        present[b] = False
                        size -= 1
                        need -= 1
                        counters[_EVICTIONS] += 1
                    b = after
                for j in range(first, nkeys):
                    key = ids[base + per_chunk * j]
                    if not present[key]:
                        present[key] = True
                        insert_before(nxt, prv, tail, key)
                        size += 1
                counters[_STORES] += new
        for j in range(nkeys - 1, lo - 1, -1):  # the finish: touched chunks to the tail, last chunk first
            key = ids[base + per_chunk * j]
            if present[key]:
                _to_tail(nxt, prv, tail, key)
    return size


def simulate_offload_compiled(trace: BlockTrace, gpu_hits: np.ndarray, scheduled: np.ndarray, num_chunks: int, *,
                              blocks_per_chunk: int = 1, skip: np.ndarray | None = None,
                              provisional: bool = False) -> OffloadResult:
    """The CPU tier over a sequential run (`advisor.sim.offload.simulate_offload`'s result, per
    scheduler request of `trace`)."""
    n = trace.num_requests
    cpu = np.zeros(n, np.int64)
    ext = np.zeros(n, np.int64)
    counters = np.zeros(5, np.int64)
    _sequential_tier(trace.ids, trace.offsets, trace.num_tokens, trace.block_size, int(blocks_per_chunk),
                     int(num_chunks), max(trace.num_ids, 1), np.ascontiguousarray(gpu_hits, np.int64),
                     np.ascontiguousarray(scheduled, np.bool_), request_flags(trace, skip), bool(provisional),
                     cpu, ext, counters)
    return OffloadResult(cpu, ext, OffloadCounters(*(int(c) for c in counters)), int(num_chunks))
