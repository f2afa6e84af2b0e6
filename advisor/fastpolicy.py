"""Compiled sequential replay of the reference eviction policies, FIFO and Belady.

Inputs: a `fastsim.BlockTrace` and a pool size in usable blocks. Output: a
`fastsim.SequentialResult` equal to `advisor.cache.PrefixCache` with policy "fifo" or
"belady" fed the same requests one at a time (tests/test_fastsim.py checks hits,
evictions and peak under eviction pressure). The free pool is `cache.PriorityFreePool`
on arrays: unhashed free blocks first (a stack), then a binary heap of hashed free
blocks ordered by (priority, -cached_seq) with lazy deletion by version numbers.
Belady's refinements are cache.py's (see its module docstring): ties go to the most
recently cached block, and a hash's copies other than its lookup copy count as never used.
"""

from __future__ import annotations

import numpy as np

from advisor.fastlists import compiled, new_rings, ring_link, ring_lookup, ring_unlink
from advisor.fastsim import BlockTrace, SequentialResult


@compiled
def _heap_push(hp, ht, hb, hv, size, prio, tie, block, version):  # type: ignore[no-untyped-def]
    i = size
    hp[i], ht[i], hb[i], hv[i] = prio, tie, block, version
    while i > 0:
        parent = (i - 1) // 2
        if hp[parent] < hp[i] or (hp[parent] == hp[i] and ht[parent] <= ht[i]):
            break
        hp[i], hp[parent] = hp[parent], hp[i]
        ht[i], ht[parent] = ht[parent], ht[i]
        hb[i], hb[parent] = hb[parent], hb[i]
        hv[i], hv[parent] = hv[parent], hv[i]
        i = parent
    return size + 1


@compiled
def _heap_pop(hp, ht, hb, hv, size):  # type: ignore[no-untyped-def]
    size -= 1
    hp[0], ht[0], hb[0], hv[0] = hp[size], ht[size], hb[size], hv[size]
    i = 0
    while True:
        left, small = 2 * i + 1, i
        for c in (left, left + 1):
            if c < size and (hp[c] < hp[small] or (hp[c] == hp[small] and ht[c] < ht[small])):
                small = c
        if small == i:
            return size
        hp[i], hp[small] = hp[small], hp[i]
        ht[i], ht[small] = ht[small], ht[i]
        hb[i], hb[small] = hb[small], hb[i]
        hv[i], hv[small] = hv[small], hv[i]
        i = small


@compiled
def _push_free(hp, ht, hb, hv, size, prio, tie, b, version, is_free):  # type: ignore[no-untyped-def]
    """Push free block b with a new version (its older entries go stale)."""
    if size == len(hp):  # compact: at most one live entry per free block remains
        old_p, old_t, old_b, old_v = hp.copy(), ht.copy(), hb.copy(), hv.copy()
        size = 0
        for e in range(len(old_p)):
            if old_v[e] == version[old_b[e]] and is_free[old_b[e]]:
                size = _heap_push(hp, ht, hb, hv, size, old_p[e], old_t[e], old_b[e], old_v[e])
    version[b] += 1
    return _heap_push(hp, ht, hb, hv, size, prio, tie, b, version[b])


@compiled
def _belady_prio(b, h, first_copy, use_pos, use_ptr, use_off, never):  # type: ignore[no-untyped-def]
    """Minus the next use of h for its lookup copy; `never` for other copies or no next use."""
    if first_copy[h] != b or use_ptr[h] >= use_off[h + 1]:
        return never
    return -use_pos[use_ptr[h]]


@compiled
def _sequential_ranked(ids, offsets, num_tokens, block_size, num_blocks, num_ids, belady, use_pos, use_off, hits):  # type: ignore[no-untyped-def]
    # cache.PriorityFreePool step for step: unhashed free blocks first (a stack), then
    # a heap of hashed free blocks by (priority, -cached_seq) with lazy deletion. FIFO:
    # priority = when the block was cached. Belady: minus the next request position
    # wanting its hash (use_pos[use_ptr[h]:use_off[h+1]], pointers only move forward),
    # `never` for copies other than the hash's lookup copy (first_copy).
    n = num_blocks
    never = -(1 << 62)
    stack = np.empty(n, np.int64)
    top = 0
    for i in range(n - 1, -1, -1):
        stack[top] = i
        top += 1
    hp = np.empty(4 * n + 16, np.int64)
    ht = np.empty(4 * n + 16, np.int64)
    hb = np.empty(4 * n + 16, np.int64)
    hv = np.empty(4 * n + 16, np.int64)
    size = 0
    version = np.zeros(n, np.int64)
    is_free = np.ones(n, np.bool_)
    cached_seq = np.zeros(n, np.int64)
    seq = 0
    use_ptr = use_off[:-1].copy()
    block_id_hash = np.full(n, -1, np.int64)
    first_copy, cnext, cprev = new_rings(num_ids, n)
    req = np.empty(n, np.int64)
    evict_first = np.empty(n, np.int64)
    evictions = 0
    peak = 0
    for r in range(len(num_tokens)):
        base = offsets[r]
        nfull = offsets[r + 1] - base
        length = num_tokens[r]
        nreq = (length + block_size - 1) // block_size
        cap = min(nfull, max(length - 1, 0) // block_size)
        admitted = 0 < nreq <= n
        k = 0
        if admitted:
            peak = max(peak, nreq)
            k = ring_lookup(ids[base:], cap, first_copy, req)
            for i in range(k):  # touch: out of the free pool, its heap entry stale
                is_free[req[i]] = False
                version[req[i]] += 1
            for i in range(k, nreq):
                b = -1
                while top > 0 and b < 0:
                    top -= 1
                    if is_free[stack[top]] and block_id_hash[stack[top]] < 0:
                        b = stack[top]
                while b < 0:
                    c, v = hb[0], hv[0]
                    size = _heap_pop(hp, ht, hb, hv, size)
                    if v == version[c] and is_free[c]:
                        b = c
                is_free[b] = False
                h = block_id_hash[b]
                if h >= 0:  # lazy eviction
                    f = ring_unlink(first_copy, cnext, cprev, h, b)
                    if belady and f >= 0 and is_free[f]:  # the new lookup copy carries the next use
                        size = _push_free(hp, ht, hb, hv, size,
                                          _belady_prio(f, h, first_copy, use_pos, use_ptr, use_off, never),
                                          -cached_seq[f], f, version, is_free)
                    block_id_hash[b] = -1
                    evictions += 1
                req[i] = b
            for i in range(k, nfull):
                b = req[i]
                h = ids[base + i]
                block_id_hash[b] = h
                seq += 1
                cached_seq[b] = seq
                ring_link(first_copy, cnext, cprev, h, b)
        if belady:
            # Position r has passed (admitted or refused for good): move the next-use
            # pointers of the hashes it wanted, and re-key their free copies.
            for i in range(cap):
                h = ids[base + i]
                while use_ptr[h] < use_off[h + 1] and use_pos[use_ptr[h]] <= r:
                    use_ptr[h] += 1
            for i in range(cap):
                h = ids[base + i]
                f = first_copy[h]
                b = f
                while b >= 0:
                    if is_free[b]:
                        size = _push_free(hp, ht, hb, hv, size, _belady_prio(b, h, first_copy, use_pos, use_ptr, use_off, never),
                                          -cached_seq[b], b, version, is_free)
                    b = cnext[b]
                    if b == f:
                        b = -1
        if admitted:
            m = 0
            for i in range(nreq - 1, -1, -1):  # free tail-first
                b = req[i]
                is_free[b] = True
                h = block_id_hash[b]
                if h < 0:
                    evict_first[m] = b
                    m += 1
                elif belady:
                    size = _push_free(hp, ht, hb, hv, size, _belady_prio(b, h, first_copy, use_pos, use_ptr, use_off, never),
                                      -cached_seq[b], b, version, is_free)
                else:
                    size = _push_free(hp, ht, hb, hv, size, cached_seq[b], -cached_seq[b], b, version, is_free)
            for i in range(m - 1, -1, -1):
                stack[top] = evict_first[i]
                top += 1
        hits[r] = k * block_size
    return evictions, peak


def future_uses(trace: BlockTrace) -> tuple[np.ndarray, np.ndarray]:
    """For Belady: the request positions wanting each id (its first (L-1)//B blocks), CSR."""
    full = np.diff(trace.offsets)
    cap = np.minimum(full, np.maximum(trace.num_tokens - 1, 0) // trace.block_size)
    req = np.repeat(np.arange(trace.num_requests, dtype=np.int64), full)
    j = np.arange(len(trace.ids), dtype=np.int64) - trace.offsets[:-1][req]
    wanted = j < cap[req]
    order = np.argsort(trace.ids[wanted], kind="stable")  # positions stay ascending per id
    use_pos = req[wanted][order]
    use_off = np.zeros(max(trace.num_ids, 1) + 1, np.int64)
    np.cumsum(np.bincount(trace.ids[wanted], minlength=max(trace.num_ids, 1)), out=use_off[1:])
    return use_pos, use_off


def simulate_reference_policy(trace: BlockTrace, num_blocks: int, policy: str) -> SequentialResult:
    """Sequential mode (one request at a time, prefill only) under "fifo" or "belady"."""
    if policy not in ("fifo", "belady"):
        raise ValueError(f"unknown policy {policy!r}")
    if num_blocks <= 0:
        raise ValueError("num_blocks must be positive")
    bs = trace.block_size
    hits = np.zeros(trace.num_requests, np.int64)
    if policy == "belady":
        use_pos, use_off = future_uses(trace)
    else:
        use_pos, use_off = np.zeros(1, np.int64), np.zeros(max(trace.num_ids, 1) + 1, np.int64)
    evictions, peak = _sequential_ranked(trace.ids, trace.offsets, trace.num_tokens, bs, int(num_blocks),
                                         max(trace.num_ids, 1), policy == "belady", use_pos, use_off, hits)
    return SequentialResult(int(num_blocks), hits, int(evictions), int(peak), -(-trace.num_tokens // bs) <= num_blocks)
