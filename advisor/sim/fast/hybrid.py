"""vLLM's prefix cache for hybrid models, one request at a time, compiled: the rules of
`advisor.sim.hybrid.HybridPrefixCache` (sequential mode, retention 0) on arrays.

Input: a `BlockTrace` (advisor.sim.fast.trace), the KV cache groups in vLLM's order
(`KVLayout.sim_groups()`: kind "full"/"mla", "sliding_window" or "chunked_local", and the
window or chunk size), a pool size in usable blocks and which requests skip the cache read.
Output: per-request hit tokens, evictions, peak blocks in use and the blocks ever taken from
the pool, equal to `HybridPrefixCache` admitting each request whole and freeing it before the
next (`advisor.sim.hybrid.sequential_hits_hybrid`); tests/test_hybrid_grid.py keeps them equal
under eviction pressure, and tests/test_hybrid_oracle.py holds the reference to vLLM.

The state is the reference's on arrays: one free queue for every group (advisor.sim.fast.lists,
head evicted first) and per-(hash, group) rings of cached copies, keyed `hash id * G + group`,
since each group caches and evicts its own copy of a block. A request's blocks are a
`[group, position]` table, -1 for vLLM's null block (positions outside a sliding window or
before the current attention chunk). Per request, as `HybridPrefixCache.admit` then `free`:

1. lookup (`_find_hit`): each spec group (groups with equal specs, full attention first) may
   shorten the candidate hit; repeat until none does; the junction is the longest group hit
   when it is longer than the combined one;
2. touch the hit blocks inside each group's window, then take new blocks group by group
   (lazy eviction from the head of the free queue);
3. cache: full attention and chunked local every new full block; sliding window only the
   `cdiv(window - 1, B)` blocks ending at the replay boundary `(prompt - 1) // B` and at the
   junction (vLLM's default `--prefix-cache-retention-interval 0`);
4. free group by group, each tail first: unhashed blocks to the queue's head, hashed ones to
   its tail.

A request is refused (it changes nothing) when the pool cannot hold its blocks: every group's,
less those before the group's window at the hit (vLLM's admission gate, which a sliding-window
or chunked-local hit can pass on a pool smaller than `G x cdiv(L, B)`).
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
    ring_unlink,
    unlink,
)
from advisor.sim.fast.sequential import request_flags
from advisor.sim.fast.trace import BlockTrace

FULL, SLIDING, CHUNKED = 0, 1, 2
KIND_CODES = {"full": FULL, "mla": FULL, "sliding_window": SLIDING, "chunked_local": CHUNKED}


@dataclass(frozen=True)
class HybridSequentialResult:
    """One budget, sequential mode: per-request hit tokens and the pool's counters."""

    num_blocks: int
    hit_tokens: np.ndarray  # int64 per request (0 for a request too long for the pool)
    evictions: int
    peak_blocks_in_use: int
    blocks_used: int  # blocks ever taken from the pool (highest block id + 1)
    admitted: np.ndarray  # bool per request: it ran (an empty pool held its blocks at its hit)


@dataclass(frozen=True)
class GroupArrays:
    """The groups as the kernel takes them: per group its kind code and window (0: none);
    spec groups (equal specs, looked up together) as member lists, full attention first."""

    kinds: np.ndarray
    windows: np.ndarray
    spec_kinds: np.ndarray
    spec_windows: np.ndarray
    spec_ptr: np.ndarray  # spec s owns members[spec_ptr[s]:spec_ptr[s + 1]]
    members: np.ndarray

    @classmethod
    def of(cls, groups: Sequence[tuple[str, int | None]]) -> GroupArrays:
        kinds = np.array([KIND_CODES[k] for k, _ in groups], np.int64)
        windows = np.array([w or 0 for _, w in groups], np.int64)
        by_spec: dict[tuple[int, int], list[int]] = {}
        for g, (k, w) in enumerate(zip(kinds.tolist(), windows.tolist(), strict=True)):
            by_spec.setdefault((k, w), []).append(g)
        specs = sorted(by_spec.items(), key=lambda kv: kv[0][0] != FULL)  # stable: full first
        ptr = np.zeros(len(specs) + 1, np.int64)
        ptr[1:] = np.cumsum([len(m) for _, m in specs])
        return cls(kinds, windows, np.array([k for (k, _), _ in specs], np.int64),
                   np.array([w for (_, w), _ in specs], np.int64), ptr,
                   np.array([g for _, m in specs for g in m], np.int64))


@compiled
def _cached(first_copy, G, members, lo, hi, h):  # type: ignore[no-untyped-def]
    """Whether every group of members[lo:hi] has a cached copy of hash id h."""
    for j in range(lo, hi):
        if first_copy[h * G + members[j]] < 0:
            return False
    return True


@compiled
def _record(first_copy, G, members, lo, hi, h, tbl, i):  # type: ignore[no-untyped-def]
    for j in range(lo, hi):
        g = members[j]
        tbl[g, i] = first_copy[h * G + g]


@compiled
def _spec_hit(gr_kind, window, members, lo, hi, hashes, max_length, B, G, first_copy, tbl):  # type: ignore[no-untyped-def]
    """One spec group's hit within `max_length` tokens, its blocks in tbl[member, :len]
    (-1: null); returns len, in blocks (`HybridPrefixCache._group_hit`)."""
    max_blocks = max_length // B
    if gr_kind == FULL:
        k = 0
        while k < max_blocks and _cached(first_copy, G, members, lo, hi, hashes[k]):
            _record(first_copy, G, members, lo, hi, hashes[k], tbl, k)
            k += 1
        return k
    if gr_kind == SLIDING:
        need = (window - 1 + B - 1) // B
        for j in range(lo, hi):
            tbl[members[j], :max_blocks] = -1
        run = 0
        for i in range(max_blocks - 1, -1, -1):
            if not _cached(first_copy, G, members, lo, hi, hashes[i]):
                run = 0
                continue
            _record(first_copy, G, members, lo, hi, hashes[i], tbl, i)
            run += 1
            if run >= need:
                return i + run
        return run  # the run touching block 0, if any
    start = max_length // window * window if max_length > 0 else 0  # chunked local
    for j in range(lo, hi):
        tbl[members[j], : start // B] = -1
    k = start // B
    while k < max_blocks and _cached(first_copy, G, members, lo, hi, hashes[k]):
        _record(first_copy, G, members, lo, hi, hashes[k], tbl, k)
        k += 1
    return k


@compiled
def _find_hit(spec_kinds, spec_windows, spec_ptr, members, hashes, max_length, B, G, first_copy, tbl, spec_len):  # type: ignore[no-untyped-def]
    """(hit tokens, junction): `HybridPrefixCache.find_longest_cache_hit` (0: no junction)."""
    S = len(spec_kinds)
    if G == 1:
        k = _spec_hit(spec_kinds[0], spec_windows[0], members, 0, 1, hashes, max_length, B, G, first_copy, tbl)
        return k * B, 0
    spec_len[:] = -1
    hit_length = max_length
    longest = 0
    simple = S == 2 and spec_kinds[0] == FULL
    while True:
        curr = hit_length
        for s in range(S):
            if spec_kinds[s] == FULL and spec_len[s] >= 0:
                curr = min(curr, spec_len[s])  # full attention is downward-closed: found once
                continue
            k = _spec_hit(spec_kinds[s], spec_windows[s], members, spec_ptr[s], spec_ptr[s + 1], hashes, curr, B, G,
                          first_copy, tbl)
            curr = k * B
            spec_len[s] = curr
            longest = max(longest, curr)
        if curr >= hit_length:
            break
        hit_length = curr
        if simple:
            break
    return hit_length, (longest if longest > hit_length else 0)


@compiled
def _skipped_blocks(kind, window, num_tokens, B):  # type: ignore[no-untyped-def]
    """Blocks before the attention window of the next token (`get_num_skipped_tokens` // B)."""
    if kind == SLIDING:
        return max(0, num_tokens - window + 1) // B
    if kind == CHUNKED:
        return num_tokens // window * window // B
    return 0


@compiled
def _cacheable(kind, window, i, B, boundary, junction):  # type: ignore[no-untyped-def]
    """Whether block i is cached (retention 0: sliding window keeps only the window's blocks
    ending at the replay boundary and at the junction; `reachable_block_mask`)."""
    if kind != SLIDING:
        return True
    need = (window - 1 + B - 1) // B
    stop = boundary // B
    if stop - need <= i < stop:
        return True
    if junction > 0:
        stop = junction // B
        return stop - need <= i < stop
    return False


@compiled
def _take_new(nxt, prv, bhash, first_copy, cnext, cprev, head, req, g, start, stop, cnt):  # type: ignore[no-untyped-def]
    """Pop blocks for positions [start, stop) of group g from the head (lazy eviction)."""
    for i in range(start, stop):
        b = nxt[head]
        unlink(nxt, prv, b)
        key = bhash[b]
        if key >= 0:
            ring_unlink(first_copy, cnext, cprev, key, b)
            bhash[b] = -1
            cnt[0] += 1
        cnt[1] = max(cnt[1], b + 1)
        req[g, i] = b


@compiled
def _free_group(nxt, prv, bhash, head, tail, req, g, nreq):  # type: ignore[no-untyped-def]
    """Group g's blocks back, tail first: unhashed to the head (in that order), hashed to the tail."""
    anchor = head
    for i in range(nreq - 1, -1, -1):
        b = req[g, i]
        if b >= 0 and bhash[b] < 0:
            insert_after(nxt, prv, anchor, b)
            anchor = b
    for i in range(nreq - 1, -1, -1):
        b = req[g, i]
        if b >= 0 and bhash[b] >= 0:
            insert_before(nxt, prv, tail, b)


@compiled
def _run_request(ga_kinds, ga_windows, spec_kinds, spec_windows, spec_ptr, members, hashes, nfull, length, B,  # type: ignore[no-untyped-def]
                 skip, nxt, prv, bhash, first_copy, cnext, cprev, tbl, req, spec_len, cnt):
    """Admit one request whole, cache its blocks, free it; returns (hit tokens, blocks held),
    or (-1, 0) when the pool cannot hold its blocks (vLLM's admission gate on the empty pool:
    each group's blocks but those before its window at the hit)."""
    G = len(ga_kinds)
    n = len(bhash)
    head, tail = n, n + 1
    nreq = (length + B - 1) // B
    n_hit, junction = 0, 0
    if not skip:
        n_hit, junction = _find_hit(spec_kinds, spec_windows, spec_ptr, members, hashes, length - 1, B, G, first_copy,
                                    tbl, spec_len)
    k = n_hit // B
    need = 0
    for g in range(G):
        need += nreq - _skipped_blocks(ga_kinds[g], ga_windows[g], n_hit, B)
    if need > n:
        return -1, 0
    held = 0
    for g in range(G):  # touch every group's hits (inside its window) before any group allocates
        skipped = _skipped_blocks(ga_kinds[g], ga_windows[g], n_hit, B)
        for i in range(k):
            b = tbl[g, i] if i >= skipped else -1
            req[g, i] = b
            if b >= 0:
                unlink(nxt, prv, b)
                held += 1
    for g in range(G):
        _take_new(nxt, prv, bhash, first_copy, cnext, cprev, head, req, g, k, nreq, cnt)
        held += nreq - k
    for g in range(G):
        for i in range(k, nfull):
            b = req[g, i]
            if b >= 0 and _cacheable(ga_kinds[g], ga_windows[g], i, B, length - 1, junction):
                key = hashes[i] * G + g
                bhash[b] = key
                ring_link(first_copy, cnext, cprev, key, b)
    for g in range(G):
        _free_group(nxt, prv, bhash, head, tail, req, g, nreq)
    return n_hit, held


@compiled
def _sequential_hybrid(ids, offsets, num_tokens, B, num_blocks, num_ids, skip, ga_kinds, ga_windows, spec_kinds,  # type: ignore[no-untyped-def]
                       spec_windows, spec_ptr, members, max_nreq, hits, admitted):
    G = len(ga_kinds)
    nxt, prv = new_free_queue(num_blocks)
    bhash = np.full(num_blocks, -1, np.int64)
    first_copy, cnext, cprev = new_rings(num_ids * G, num_blocks)
    tbl = np.empty((G, max_nreq), np.int64)
    req = np.empty((G, max_nreq), np.int64)
    spec_len = np.empty(len(spec_kinds), np.int64)
    cnt = np.zeros(2, np.int64)  # evictions, blocks used
    peak = 0
    for r in range(len(num_tokens)):
        length = num_tokens[r]
        if length <= 0:
            continue
        base = offsets[r]
        n_hit, held = _run_request(ga_kinds, ga_windows, spec_kinds, spec_windows, spec_ptr, members, ids[base:],
                                   offsets[r + 1] - base, length, B, skip[r], nxt, prv, bhash, first_copy, cnext,
                                   cprev, tbl, req, spec_len, cnt)
        if n_hit >= 0:
            hits[r] = n_hit
            admitted[r] = True
            peak = max(peak, held)
    return cnt[0], peak, cnt[1]


def simulate_sequential_hybrid(trace: BlockTrace, groups: Sequence[tuple[str, int | None]], num_blocks: int,
                               skip: np.ndarray | None = None) -> HybridSequentialResult:
    """vLLM's hybrid prefix cache (retention 0), one request at a time, prefill only, each
    freed before the next, over `num_blocks` usable blocks shared by `groups`; `skip`: per
    request, it does not read the cache (module docstring)."""
    if num_blocks <= 0:
        raise ValueError("num_blocks must be positive")
    ga = GroupArrays.of(groups)
    bs = trace.block_size
    needed = -(-trace.num_tokens // bs)
    hits = np.zeros(trace.num_requests, np.int64)
    admitted = np.zeros(trace.num_requests, np.bool_)
    evictions, peak, used = _sequential_hybrid(
        trace.ids, trace.offsets, trace.num_tokens, bs, int(num_blocks), max(trace.num_ids, 1),
        request_flags(trace, skip), ga.kinds, ga.windows, ga.spec_kinds, ga.spec_windows, ga.spec_ptr, ga.members,
        max(int(needed.max(initial=1)), 1), hits, admitted)
    return HybridSequentialResult(int(num_blocks), hits, int(evictions), int(peak), int(used), admitted)


def ceiling_sequential_hybrid(trace: BlockTrace, groups: Sequence[tuple[str, int | None]],
                              skip: np.ndarray | None = None) -> HybridSequentialResult:
    """The infinite cache: `simulate_sequential_hybrid` on a pool that never evicts. Starts
    at a pool of every (hash, group) plus the largest request and doubles it until nothing is
    evicted (at most every block the log allocates, a pool that cannot evict). A pool of at
    least `blocks_used` blocks (and one that holds the largest request) gives this very result:
    a hashed block is taken only once every never-used block has been."""
    G = len(groups)
    needed = -(-trace.num_tokens // trace.block_size)
    total = max(int(G * needed.sum()), 1)
    pool = min(total, G * (max(trace.num_ids, 1) + int(needed.max(initial=1))))
    while True:
        res = simulate_sequential_hybrid(trace, groups, pool, skip)
        if res.evictions == 0:
            return res
        assert pool < total, "a pool of every block the log allocates cannot evict"
        pool = min(2 * pool, total)
