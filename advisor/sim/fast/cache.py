"""The compiled cache primitives of concurrent mode: `advisor.sim.cache.PrefixCache` (policy
"lru") on arrays, one request operation each (`_allocate`, `_cache_blocks`, `_admit`, `_free`).

Inputs: requests' full-block hashes as dense integer ids (a `BlockTrace`'s ids, all below
`num_ids`), prompt and decode token counts. advisor.sim.fast.events drives them (admission,
allocation and frees; it caches a running request's newly full blocks itself, without
array views, on its per-step path). They are
kept equal to `PrefixCache` through tests/array_cache.py's `ArrayPrefixCache`, which gives
them PrefixCache's request API: tests/test_fastcache.py checks every step of generated
programs of admissions, decode steps and frees under eviction pressure, and
tests/test_oracle.py checks them against vLLM's KVCacheManager.

The state is vLLM's two structures on arrays: the free queue as
next/prev links with head and tail sentinels, and per-hash circular lists of cached
copies (oldest first). A decode block with no known hash gets the id -2: cached
(freed to the tail, counted when evicted) but never hit, like vLLM's unique blocks.

`_admit_flagged` is `_admit` for a request that may skip the cache read and under an
EAGLE-style drafter (`PrefixCache.admit(skip_prefix_cache=)`, `PrefixCache(speculative=)`).
"""

from __future__ import annotations

from advisor.sim.fast.lists import (
    compiled,
    insert_after,
    insert_before,
    ring_link,
    ring_unlink,
    unlink,
)
from advisor.sim.fast.sequential import hit_lookup

_UNIQUE = -2  # hashed, but nobody else has these tokens
_NONE = -1


@compiled
def _allocate(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, start, stop):  # type: ignore[no-untyped-def]
    head = len(ref)
    for i in range(start, stop):
        b = nxt[head]
        unlink(nxt, prv, b)
        cnt[1] -= 1
        h = bhash[b]
        if h != -1:  # lazy eviction
            if h >= 0:
                ring_unlink(first_copy, cnext, cprev, h, b)
            bhash[b] = -1
            cnt[0] += 1
        ref[b] = 1
        blocks[i] = b


@compiled
def _cache_blocks(bhash, first_copy, cnext, cprev, blocks, hashes, start, stop):  # type: ignore[no-untyped-def]
    for i in range(start, stop):
        b = blocks[i]
        h = hashes[i]
        bhash[b] = h
        if h >= 0:
            ring_link(first_copy, cnext, cprev, h, b)


@compiled
def _admit(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, hashes, num_tokens, block_size, blocks):  # type: ignore[no-untyped-def]
    return _admit_flagged(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, hashes, num_tokens, block_size, blocks,
                          False, False, ALL_TOKENS)


ALL_TOKENS = 1 << 62  # a token budget that takes the whole prompt


@compiled
def _admit_flagged(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, hashes, num_tokens, block_size, blocks,  # type: ignore[no-untyped-def]
                   skip, drop_last, token_budget):
    """Admit a request (`PrefixCache.admit`): (hit blocks k, blocks it takes out of the free
    pool), or (-1, blocks it asked for) when its whole sequence does not fit the free blocks. `skip`: it does
    not read the cache (k = 0); `drop_last`: the hit drops its last block
    (`cache.drops_last_hit_block`); `token_budget`: the tokens computed now past the hit (a
    chunked prefill's first chunk): only their blocks are taken and cached now."""
    nfull = num_tokens // block_size
    nreq = (num_tokens + block_size - 1) // block_size
    k = hit_lookup(hashes, min(nfull, max(num_tokens - 1, 0) // block_size), first_copy, blocks, skip, drop_last)
    evictable = 0
    for i in range(k):
        if ref[blocks[i]] == 0:
            evictable += 1
    if nreq - k + evictable > cnt[1]:
        return -1, nreq - k + evictable
    for i in range(k):  # touch: a hit pulls a free block off the queue
        b = blocks[i]
        if ref[b] == 0:
            unlink(nxt, prv, b)
            cnt[1] -= 1
        ref[b] += 1
    upto = min(k * block_size + token_budget, num_tokens)
    nalloc = (upto + block_size - 1) // block_size
    _allocate(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, k, nalloc)
    _cache_blocks(bhash, first_copy, cnext, cprev, blocks, hashes, k, upto // block_size)
    return k, nalloc - k + evictable


@compiled
def _free(nxt, prv, ref, bhash, cnt, blocks, nblocks):  # type: ignore[no-untyped-def]
    """Tail-first: unhashed blocks to the head (in that order), hashed ones to the tail."""
    head, tail = len(ref), len(ref) + 1
    anchor = head
    released = 0
    for i in range(nblocks - 1, -1, -1):
        b = blocks[i]
        ref[b] -= 1
        if ref[b] == 0:
            released += 1
            cnt[1] += 1
            if bhash[b] == -1:
                insert_after(nxt, prv, anchor, b)
                anchor = b
    for i in range(nblocks - 1, -1, -1):
        b = blocks[i]
        if ref[b] == 0 and bhash[b] != -1:
            insert_before(nxt, prv, tail, b)
    return released
