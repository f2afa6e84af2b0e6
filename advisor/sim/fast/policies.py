"""Compiled sequential replay of the reference eviction policies, FIFO and Belady.

Inputs: a `BlockTrace` (advisor.sim.fast.trace) and a pool size in usable blocks. Output: a
`SequentialResult` (advisor.sim.fast.sequential) equal to `advisor.sim.cache.PrefixCache` with policy "fifo" or
"belady" fed the same requests one at a time (tests/test_fastsim.py checks hits,
evictions and peak under eviction pressure). The free pool is
`cache.PriorityFreePool` on arrays: unhashed free blocks first (a stack), then the
hashed free blocks in priority order, kept two ways:

- FIFO (priority = when the block was cached, oldest first): `seq_block[s]` is the
  block cached s-th, and a cursor walks s upwards past entries that are dead (the
  block was evicted since) or in use. A block the cursor passed while in use goes
  into a small min-heap of sequence numbers when it is freed again; the next victim
  is the smaller of that heap's top and the cursor's entry. Each caching is passed
  once, so a run costs about what LRU's does.
- Belady (priority = minus the next request position wanting the block's hash, ties
  to the most recently cached block; docs/simulate.md's Belady section has the
  refinements): a binary heap of one packed int64 key per entry, `(priority rank,
  cached order)`, with lazy deletion: an entry is live while its block is free and
  the key is the block's current one (`cur_key`), so a re-keyed or re-used block's
  older entries go stale, and an unchanged key is not pushed again.
"""

from __future__ import annotations

import numpy as np

from advisor.sim.fast.lists import (
    compiled,
    index_dtype,
    new_rings,
    ring_link,
    ring_unlink,
)
from advisor.sim.fast.sequential import (
    SequentialResult,
    hit_lookup,
    request_flags,
    simulate_sequential,
)
from advisor.sim.fast.trace import BlockTrace

_SEQ_BITS = 34  # cached order in a Belady key's low bits (17e9 cachings)


@compiled
def _sift_up(keys, vals, pos, key, val):  # type: ignore[no-untyped-def]
    while pos > 0:
        parent = (pos - 1) // 2
        if keys[parent] <= key:
            break
        keys[pos], vals[pos] = keys[parent], vals[parent]
        pos = parent
    keys[pos], vals[pos] = key, val


@compiled
def _heap_pop(keys, vals, size):  # type: ignore[no-untyped-def]
    """Remove the top of a min-heap of `size` (key, val) entries; the new size."""
    size -= 1
    key, val = keys[size], vals[size]
    pos = 0
    while True:
        c = 2 * pos + 1
        if c >= size:
            break
        if c + 1 < size and keys[c + 1] < keys[c]:
            c += 1
        if key <= keys[c]:
            break
        keys[pos], vals[pos] = keys[c], vals[c]
        pos = c
    if size > 0:
        keys[pos], vals[pos] = key, val
    return size


@compiled
def _take_unhashed(stack, top, is_free, block_id_hash):  # type: ignore[no-untyped-def]
    """Pop the stack of unhashed free blocks (skipping entries no longer so): (block or -1, top)."""
    while top > 0:
        top -= 1
        b = stack[top]
        if is_free[b] and block_id_hash[b] < 0:
            return b, top
    return -1, top


@compiled
def _push_unhashed(stack, top, evict_first, m):  # type: ignore[no-untyped-def]
    """Freed unhashed blocks (collected tail-first) onto the stack: the tail block is taken first."""
    for i in range(m - 1, -1, -1):
        stack[top] = evict_first[i]
        top += 1
    return top


@compiled
def _sequential_fifo(ids, offsets, num_tokens, block_size, num_blocks, num_ids, skip, drop_last, hits,  # type: ignore[no-untyped-def]
                     seq_block):
    n = num_blocks
    stack = np.empty(2 * n, np.int64)
    top = 0
    for i in range(n - 1, -1, -1):
        stack[top] = i
        top += 1
    is_free = np.ones(n, np.bool_)
    block_id_hash = np.full(n, -1, np.int64)
    cached_seq = np.full(n, -1, np.int64)
    seq = 0  # cachings so far
    cursor = 0  # every live free entry below it is in the revisit heap
    rev_seq = np.full(n, -1, np.int64)  # the sequence number of the block's revisit entry, -1: none
    cap = 2 * n + 16
    rkeys = np.empty(cap, np.int64)
    rvals = np.empty(cap, np.int64)
    rsize = 0
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
        if not 0 < nreq <= n:
            hits[r] = 0
            continue
        peak = max(peak, nreq)
        cap_hit = min(nfull, (length - 1) // block_size)
        k = hit_lookup(ids[base:], cap_hit, first_copy, req, skip[r], drop_last)
        for i in range(k):  # touch: out of the free pool
            is_free[req[i]] = False
        for i in range(k, nreq):
            b, top = _take_unhashed(stack, top, is_free, block_id_hash)
            if b < 0:  # the oldest cached free block
                while rsize > 0:
                    c = rvals[0]
                    if is_free[c] and block_id_hash[c] >= 0 and cached_seq[c] == rkeys[0]:
                        break
                    if rev_seq[c] == rkeys[0]:
                        rev_seq[c] = -1
                    rsize = _heap_pop(rkeys, rvals, rsize)
                while cursor < seq:
                    c = seq_block[cursor]
                    if is_free[c] and block_id_hash[c] >= 0 and cached_seq[c] == cursor:
                        break
                    cursor += 1
                if rsize > 0 and (cursor >= seq or rkeys[0] < cursor):
                    b = rvals[0]
                    rev_seq[b] = -1
                    rsize = _heap_pop(rkeys, rvals, rsize)
                else:
                    b = seq_block[cursor]
                    cursor += 1
                ring_unlink(first_copy, cnext, cprev, block_id_hash[b], b)  # lazy eviction
                block_id_hash[b] = -1
                evictions += 1
            is_free[b] = False
            req[i] = b
        for i in range(k, nfull):
            b = req[i]
            h = ids[base + i]
            block_id_hash[b] = h
            cached_seq[b] = seq
            seq_block[seq] = b
            seq += 1
            ring_link(first_copy, cnext, cprev, h, b)
        m = 0
        for i in range(nreq - 1, -1, -1):  # free tail-first
            b = req[i]
            is_free[b] = True
            if block_id_hash[b] < 0:
                evict_first[m] = b
                m += 1
            elif cached_seq[b] < cursor and rev_seq[b] != cached_seq[b]:  # passed while in use
                if rsize == cap:
                    rsize = _compact_revisits(rkeys, rvals, rsize, is_free, block_id_hash, cached_seq, rev_seq)
                _sift_up(rkeys, rvals, rsize, cached_seq[b], b)
                rsize += 1
                rev_seq[b] = cached_seq[b]
        top = _push_unhashed(stack, top, evict_first, m)
        hits[r] = k * block_size
    return evictions, peak


@compiled
def _compact_revisits(keys, vals, size, is_free, block_id_hash, cached_seq, rev_seq):  # type: ignore[no-untyped-def]
    """Keep the live entries (one per free block at most, by `rev_seq`): the new size."""
    old_k, old_v = keys[:size].copy(), vals[:size].copy()
    size = 0
    for e in range(len(old_k)):
        b = old_v[e]
        if is_free[b] and block_id_hash[b] >= 0 and cached_seq[b] == old_k[e]:
            _sift_up(keys, vals, size, old_k[e], b)
            size += 1
        elif rev_seq[b] == old_k[e]:
            rev_seq[b] = -1
    return size


@compiled
def _belady_key(b, h, first_copy, use_pos, use_ptr, use_off, cached_seq, num_requests):  # type: ignore[no-untyped-def]
    """Min-heap key: farthest next use first (no next use, or not h's lookup copy: first of
    all), ties to the most recently cached block."""
    rank = 0
    if first_copy[h] == b and use_ptr[h] < use_off[h + 1]:
        rank = num_requests + 1 - use_pos[use_ptr[h]]
    return (rank << _SEQ_BITS) + ((1 << _SEQ_BITS) - 1 - cached_seq[b])


@compiled
def _push_key(keys, vals, size, cur_key, is_free, key, b):  # type: ignore[no-untyped-def]
    """Free block b's priority is `key`: push it unless its live entry already says so."""
    if cur_key[b] == key:
        return size
    if size == len(keys):  # compact: one live entry per free block at most
        old_k, old_v = keys.copy(), vals.copy()
        size = 0
        for e in range(len(old_k)):
            c = old_v[e]
            if is_free[c] and cur_key[c] == old_k[e]:
                _sift_up(keys, vals, size, old_k[e], c)
                size += 1
    cur_key[b] = key
    _sift_up(keys, vals, size, key, b)
    return size + 1


@compiled
def _sequential_belady(ids, offsets, num_tokens, block_size, num_blocks, num_ids, use_pos, use_off, skip, drop_last,  # type: ignore[no-untyped-def]
                       hits):
    # Next uses: use_pos[use_ptr[h]:use_off[h+1]] are the request positions still to come
    # that want hash h (pointers only move forward).
    n = num_blocks
    nr = len(num_tokens)
    stack = np.empty(2 * n, np.int64)
    top = 0
    for i in range(n - 1, -1, -1):
        stack[top] = i
        top += 1
    cap = 4 * n + 16
    keys = np.empty(cap, np.int64)
    vals = np.empty(cap, np.int64)
    size = 0
    cur_key = np.full(n, -1, np.int64)  # the key of the block's live heap entry, -1: none
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
    for r in range(nr):
        base = offsets[r]
        nfull = offsets[r + 1] - base
        length = num_tokens[r]
        nreq = (length + block_size - 1) // block_size
        cap_hit = min(nfull, max(length - 1, 0) // block_size)
        admitted = 0 < nreq <= n
        k = 0
        if admitted:
            peak = max(peak, nreq)
            k = hit_lookup(ids[base:], cap_hit, first_copy, req, skip[r], drop_last)
            for i in range(k):  # touch: out of the free pool, its heap entry stale
                is_free[req[i]] = False
                cur_key[req[i]] = -1
            for i in range(k, nreq):
                b, top = _take_unhashed(stack, top, is_free, block_id_hash)
                while b < 0:
                    c = vals[0]
                    live = is_free[c] and cur_key[c] == keys[0]
                    size = _heap_pop(keys, vals, size)
                    if live:
                        b = c
                is_free[b] = False
                cur_key[b] = -1
                h = block_id_hash[b]
                if h >= 0:  # lazy eviction
                    f = ring_unlink(first_copy, cnext, cprev, h, b)
                    if f >= 0 and is_free[f]:  # the new lookup copy carries the next use
                        size = _push_key(keys, vals, size, cur_key, is_free,
                                         _belady_key(f, h, first_copy, use_pos, use_ptr, use_off, cached_seq, nr), f)
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
        # Position r has passed (admitted or refused for good): move the next-use
        # pointers of the hashes it wanted, and re-key their free copies.
        for i in range(cap_hit):
            h = ids[base + i]
            while use_ptr[h] < use_off[h + 1] and use_pos[use_ptr[h]] <= r:
                use_ptr[h] += 1
        for i in range(cap_hit):
            h = ids[base + i]
            f = first_copy[h]
            b = f
            while b >= 0:
                if is_free[b]:
                    size = _push_key(keys, vals, size, cur_key, is_free,
                                     _belady_key(b, h, first_copy, use_pos, use_ptr, use_off, cached_seq, nr), b)
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
                else:
                    size = _push_key(keys, vals, size, cur_key, is_free,
                                     _belady_key(b, h, first_copy, use_pos, use_ptr, use_off, cached_seq, nr), b)
            top = _push_unhashed(stack, top, evict_first, m)
        hits[r] = k * block_size
    return evictions, peak


@compiled
def _count_uses(ids, offsets, num_tokens, block_size, wants, use_off):  # type: ignore[no-untyped-def]
    """use_off[h + 1] = how many requests want id h (`future_uses`' counts, before the cumsum)."""
    for r in range(len(num_tokens)):
        if not wants[r]:
            continue
        base = offsets[r]
        cap = min(offsets[r + 1] - base, max(num_tokens[r] - 1, 0) // block_size)
        for i in range(cap):
            use_off[ids[base + i] + 1] += 1


@compiled
def _fill_uses(ids, offsets, num_tokens, block_size, wants, use_off, use_pos):  # type: ignore[no-untyped-def]
    fill = use_off[:-1].copy()
    for r in range(len(num_tokens)):  # in request order: each id's positions come out ascending
        if not wants[r]:
            continue
        base = offsets[r]
        cap = min(offsets[r + 1] - base, max(num_tokens[r] - 1, 0) // block_size)
        for i in range(cap):
            h = ids[base + i]
            use_pos[fill[h]] = r
            fill[h] += 1


def future_uses(trace: BlockTrace, skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For Belady: the request positions wanting each id (its first (L-1)//B blocks; none
    for a request that skips the cache read, `skip`), CSR, as `cache.FutureUses`.

    Computed once per trace; pass it to `simulate_reference_policy` for every budget."""
    wants = ~request_flags(trace, skip)
    use_off = np.zeros(max(trace.num_ids, 1) + 1, np.int64)
    _count_uses(trace.ids, trace.offsets, trace.num_tokens, trace.block_size, wants, use_off)  # no temporaries
    np.cumsum(use_off, out=use_off)
    # request positions: int32 while they fit (a billion-token log has tens of millions of uses)
    use_pos = np.empty(int(use_off[-1]), index_dtype(trace.num_requests))
    _fill_uses(trace.ids, trace.offsets, trace.num_tokens, trace.block_size, wants, use_off, use_pos)
    return use_pos, use_off


def simulate_reference_policy(trace: BlockTrace, num_blocks: int, policy: str,
                              uses: tuple[np.ndarray, np.ndarray] | None = None, skip: np.ndarray | None = None,
                              drop_last: bool = False) -> SequentialResult:
    """Sequential mode (one request at a time, prefill only) under "fifo" or "belady".

    `uses`: `future_uses(trace, skip)`, to reuse it across budgets (Belady only); `skip`
    and `drop_last` as `sequential.simulate_sequential`'s."""
    if policy not in ("fifo", "belady"):
        raise ValueError(f"unknown policy {policy!r}")
    if num_blocks <= 0:
        raise ValueError("num_blocks must be positive")
    bs = trace.block_size
    hits = np.zeros(trace.num_requests, np.int64)
    if policy == "belady":
        assert len(trace.ids) < 1 << _SEQ_BITS and trace.num_requests < 1 << (62 - _SEQ_BITS)
        use_pos, use_off = uses if uses is not None else future_uses(trace, skip)
        evictions, peak = _sequential_belady(trace.ids, trace.offsets, trace.num_tokens, bs, int(num_blocks),
                                             max(trace.num_ids, 1), use_pos, use_off, request_flags(trace, skip),
                                             bool(drop_last), hits)
    else:
        # the block cached at each sequence number: one per cached block, block ids, so int32 while they fit
        seq_block = np.empty(len(trace.ids) + 1, index_dtype(num_blocks))
        evictions, peak = _sequential_fifo(trace.ids, trace.offsets, trace.num_tokens, bs, int(num_blocks),
                                           max(trace.num_ids, 1), request_flags(trace, skip), bool(drop_last), hits,
                                           seq_block)
    return SequentialResult(int(num_blocks), hits, int(evictions), int(peak), -(-trace.num_tokens // bs) <= num_blocks)


def simulate_sequential_policy(trace: BlockTrace, num_blocks: int, policy: str,
                               uses: tuple[np.ndarray, np.ndarray] | None = None, skip: np.ndarray | None = None,
                               drop_last: bool = False) -> SequentialResult:
    """Sequential mode under "lru" (vLLM), "fifo" or "belady" (advisor.sim.cache's rules;
    the last two compiled in advisor.sim.fast.policies; `uses`: its `future_uses(trace, skip)`;
    `skip`, `drop_last`: as `sequential.simulate_sequential`'s)."""
    if policy == "lru":
        return simulate_sequential(trace, num_blocks, skip, drop_last)
    return simulate_reference_policy(trace, num_blocks, policy, uses, skip, drop_last)
