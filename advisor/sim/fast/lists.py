"""Array-backed linked lists shared by the compiled simulators (sequential, policies, cache, events).

Inputs and outputs: int64 numpy arrays, changed in place. Two structures, as in vLLM's
block pool:

- the free queue: `nxt`/`prv` links over blocks 0..n-1 plus a head sentinel (n) and a
  tail sentinel (n+1); the block at the head is evicted first;
- per-hash rings of cached copies: `first_copy[h]` is the oldest cached block with hash
  id h (the one a lookup finds; -1 when none), and `cnext`/`cprev` link the copies of
  one hash into a circle, oldest first.

Both are doubly linked lists, so `unlink`, `insert_after` and `insert_before` serve
both (a queue's tail sentinel and a ring's first copy play the same part for
`insert_before`); `ring_lookup`, `ring_link` and `ring_unlink` add `first_copy`.

The loops are compiled with `advisor.compiled.compiled`. Compiled functions here are called from compiled
functions in other modules; numba's on-disk cache does not notice when a callee in
another file changes, so after editing this module clear advisor/__pycache__/*.nb[ic].
"""

from __future__ import annotations

import numpy as np

from advisor.compiled import compiled


@compiled
def new_free_queue(n):  # type: ignore[no-untyped-def]
    """Links of a free queue holding blocks 0..n-1 in order; head sentinel n, tail n+1."""
    nxt = np.empty(n + 2, np.int64)
    prv = np.empty(n + 2, np.int64)
    for i in range(n):
        prv[i] = i - 1
        nxt[i] = i + 1
    prv[0] = n
    nxt[n - 1] = n + 1
    nxt[n] = 0
    prv[n + 1] = n - 1
    prv[n] = nxt[n + 1] = -1  # nothing precedes the head or follows the tail
    return nxt, prv


@compiled
def new_rings(num_ids, n):  # type: ignore[no-untyped-def]
    """No hash cached: `first_copy` of num_ids hash ids, ring links of n blocks."""
    return np.full(num_ids, -1, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)


@compiled
def unlink(nxt, prv, b):  # type: ignore[no-untyped-def]
    """Take b out of its list (popping the free queue's head is unlinking nxt[head])."""
    nxt[prv[b]] = nxt[b]
    prv[nxt[b]] = prv[b]


@compiled
def insert_after(nxt, prv, anchor, b):  # type: ignore[no-untyped-def]
    """Put b right after `anchor` (a block, or the free queue's head sentinel)."""
    after = nxt[anchor]
    nxt[anchor] = b
    prv[b] = anchor
    nxt[b] = after
    prv[after] = b


@compiled
def insert_before(nxt, prv, pos, b):  # type: ignore[no-untyped-def]
    """Put b right before `pos`: at the free queue's tail when pos is the tail sentinel,
    last in a ring when pos is the ring's first element."""
    insert_after(nxt, prv, prv[pos], b)


@compiled
def ring_lookup(hashes, cap, first_copy, out):  # type: ignore[no-untyped-def]
    """Longest cached prefix of `hashes[:cap]`: its length k, its blocks in out[:k]."""
    k = 0
    while k < cap:
        b = first_copy[hashes[k]]
        if b < 0:
            break
        out[k] = b
        k += 1
    return k


@compiled
def ring_link(first_copy, cnext, cprev, h, b):  # type: ignore[no-untyped-def]
    """Cache block b under hash id h: the newest copy, last in h's ring."""
    f = first_copy[h]
    if f < 0:
        first_copy[h] = b
        cnext[b] = b
        cprev[b] = b
    else:
        insert_before(cnext, cprev, f, b)


@compiled
def ring_unlink(first_copy, cnext, cprev, h, b):  # type: ignore[no-untyped-def]
    """Evict block b's copy of hash id h. Returns h's new lookup copy when b was the
    lookup copy and other copies remain, else -1."""
    if cnext[b] == b:
        first_copy[h] = -1
        return -1
    unlink(cnext, cprev, b)
    if first_copy[h] == b:
        first_copy[h] = cnext[b]
        return cnext[b]
    return -1


def index_dtype(*bounds: int) -> type:
    """int32 for arrays whose values (block ids with the free queue's two sentinels, hash ids,
    reference counts, request positions) stay below every bound and 2**31 - 2; int64 past that.
    Half the bytes per pool slot and per request block: a billion-token log's runs hold tens of
    millions."""
    return np.int32 if max(bounds, default=0) < np.iinfo(np.int32).max - 2 else np.int64
