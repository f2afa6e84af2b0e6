"""vLLM's prefix cache (LRU), one request at a time, compiled: the same rules as
`advisor.sim.cache.PrefixCache` on arrays.

Input: a `BlockTrace` (advisor.sim.fast.trace) and pool sizes in usable blocks. Output: per
request hit tokens, evictions and peak blocks in use, equal to `PrefixCache` with policy
"lru" (tests/test_fastsim.py keeps them equal under eviction pressure), and the
infinite-cache ceiling.

`simulate_sequential` replays vLLM's free queue and hash -> blocks map over the trace's
ids in a compiled loop (numba when importable; the same code runs as plain Python
otherwise, slowly): a doubly linked free queue in two arrays, per-hash circular lists of
copies (oldest copy first, as vLLM's dict; both in advisor.sim.fast.lists), lazy eviction,
tail-first free. It is the reference algorithm step for step, so it stays exact where the
LRU stack property does not hold (duplicate blocks, unhashed blocks at the queue head);
each budget costs one pass over the blocks. Requests that skip the cache read (`skip`)
and an EAGLE-style drafter's dropped last hit block (`drop_last`) follow
`PrefixCache.admit(skip_prefix_cache=)` and `PrefixCache(speculative=)` (`hit_lookup`).

The infinite-cache ceiling (`ceiling_hits`) needs no simulation: a block hits when its
hash was first cached by an earlier request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from advisor.sim.fast.lists import (
    compiled,
    insert_after,
    insert_before,
    new_free_queue,
    new_rings,
    ring_link,
    ring_lookup,
    ring_unlink,
    unlink,
)
from advisor.sim.fast.trace import BlockTrace


@compiled
def hit_lookup(hashes, cap, first_copy, out, skip, drop_last):  # type: ignore[no-untyped-def]
    """The blocks a request hits, k of them in out[:k], as `cache.PrefixCache` finds them:
    the longest cached run of `hashes[:cap]`; none when the request skips the cache read
    (`skip`); one block fewer under an EAGLE-style drafter (`drop_last`)."""
    if skip:
        return 0
    k = ring_lookup(hashes, cap, first_copy, out)
    if drop_last and k > 0:
        k -= 1
    return k


def request_flags(trace: BlockTrace, skip: np.ndarray | None) -> np.ndarray:
    """`skip` as the kernels take it: a bool per request of `trace` (None: nobody skips)."""
    if skip is None:
        return np.zeros(trace.num_requests, np.bool_)
    skip = np.ascontiguousarray(skip, np.bool_)
    assert skip.shape == (trace.num_requests,)
    return skip


@dataclass(frozen=True)
class SequentialResult:
    """One budget, sequential mode: per-request hit tokens and the counters."""

    num_blocks: int | None
    hit_tokens: np.ndarray  # int64 per request (0 for a request too long for the pool)
    evictions: int
    peak_blocks_in_use: int
    fits: np.ndarray  # bool per request: whether an empty pool holds the prompt

    @property
    def hits(self) -> int:
        return int(self.hit_tokens.sum())


@compiled
def _sequential_lru(ids, offsets, num_tokens, block_size, num_blocks, num_ids, skip, drop_last, hits):  # type: ignore[no-untyped-def]
    n = num_blocks
    head, tail = n, n + 1
    nxt, prv = new_free_queue(n)
    block_id_hash = np.full(n, -1, np.int64)
    first_copy, cnext, cprev = new_rings(num_ids, n)  # oldest cached block of each id; rings of copies
    req = np.empty(n, np.int64)
    evictions = 0
    peak = 0
    for r in range(len(num_tokens)):
        base = offsets[r]
        nfull = offsets[r + 1] - base
        length = num_tokens[r]
        nreq = (length + block_size - 1) // block_size
        if nreq > n or length <= 0:
            hits[r] = 0
            continue
        peak = max(peak, nreq)
        cap = min(nfull, (length - 1) // block_size)
        k = hit_lookup(ids[base:], cap, first_copy, req, skip[r], drop_last)
        for i in range(k):  # a hit pulls the block off the free queue
            unlink(nxt, prv, req[i])
        for i in range(k, nreq):  # pop the head; evict its hash now
            b = nxt[head]
            unlink(nxt, prv, b)
            h = block_id_hash[b]
            if h >= 0:
                ring_unlink(first_copy, cnext, cprev, h, b)
                block_id_hash[b] = -1
                evictions += 1
            req[i] = b
        for i in range(k, nfull):  # cache the new full blocks (no de-duplication)
            b = req[i]
            h = ids[base + i]
            block_id_hash[b] = h
            ring_link(first_copy, cnext, cprev, h, b)
        anchor = head  # free tail-first: unhashed blocks to the head, in that order
        for i in range(nreq - 1, -1, -1):
            b = req[i]
            if block_id_hash[b] < 0:
                insert_after(nxt, prv, anchor, b)
                anchor = b
        for i in range(nreq - 1, -1, -1):  # hashed blocks to the tail
            b = req[i]
            if block_id_hash[b] >= 0:
                insert_before(nxt, prv, tail, b)
        hits[r] = k * block_size
    return evictions, peak


def simulate_sequential(trace: BlockTrace, num_blocks: int | None, skip: np.ndarray | None = None,
                        drop_last: bool = False) -> SequentialResult:
    """vLLM's prefix cache (LRU), one request at a time, prefill only, each freed before
    the next; `num_blocks` usable blocks, None = infinite (the ceiling). `skip`: per
    request, it does not read the cache; `drop_last`: hits drop their last block
    (`cache.drops_last_hit_block`)."""
    bs = trace.block_size
    needed = -(-trace.num_tokens // bs)
    if num_blocks is None:
        hits = ceiling_hits(trace, skip, drop_last)
        return SequentialResult(None, hits, 0, int(needed.max(initial=0)), np.ones(len(hits), bool))
    if num_blocks <= 0:
        raise ValueError("num_blocks must be positive")
    hits = np.zeros(trace.num_requests, np.int64)
    evictions, peak = _sequential_lru(trace.ids, trace.offsets, trace.num_tokens, bs, int(num_blocks), max(trace.num_ids, 1),
                                      request_flags(trace, skip), bool(drop_last), hits)
    return SequentialResult(int(num_blocks), hits, int(evictions), int(peak), needed <= num_blocks)


def sweep_sequential(trace: BlockTrace, budgets: Sequence[int | None]) -> list[SequentialResult]:
    """`simulate_sequential` for each budget (one pass over the blocks each)."""
    return [simulate_sequential(trace, b) for b in budgets]


@compiled
def _ceiling(ids, offsets, num_tokens, block_size, first_req, skip, drop_last, hits):  # type: ignore[no-untyped-def]
    for r in range(len(num_tokens)):
        base = offsets[r]
        cap = min(offsets[r + 1] - base, max(num_tokens[r] - 1, 0) // block_size)
        k = 0
        if not skip[r]:
            while k < cap and first_req[ids[base + k]] < r:
                k += 1
            if drop_last and k > 0:
                k -= 1
        hits[r] = k * block_size


@compiled
def _first_requests(ids, offsets, first_req):  # type: ignore[no-untyped-def]
    for r in range(len(offsets) - 1):
        for i in range(offsets[r], offsets[r + 1]):
            if first_req[ids[i]] > r:
                first_req[ids[i]] = r


def ceiling_hits(trace: BlockTrace, skip: np.ndarray | None = None, drop_last: bool = False) -> np.ndarray:
    """Per-request hit tokens of an infinite cache (vLLM rules, nothing ever evicted); `skip`
    and `drop_last` as `simulate_sequential`'s. A request that skips the read still caches
    its blocks, so it still counts as the first to have them."""
    first_req = np.full(max(trace.num_ids, 1), np.iinfo(np.int64).max, np.int64)
    _first_requests(trace.ids, trace.offsets, first_req)  # the request that first has each id
    hits = np.zeros(trace.num_requests, np.int64)
    _ceiling(trace.ids, trace.offsets, trace.num_tokens, trace.block_size, first_req, request_flags(trace, skip),
             bool(drop_last), hits)
    return hits
