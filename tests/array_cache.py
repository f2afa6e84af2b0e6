"""`ArrayPrefixCache`: the compiled cache primitives of advisor.sim.fast.cache behind
`advisor.sim.cache.PrefixCache`'s request API (`lookup`, `fits`, `admit`, `grow`, `free`,
`free_block_ids`, the counters), so tests can hold them against the reference and against
vLLM step by step. Only tests use it; concurrent mode calls the primitives directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from advisor.sim.cache import drops_last_hit_block
from advisor.sim.fast.cache import (
    _NONE,
    _UNIQUE,
    ALL_TOKENS,
    _admit_flagged,
    _allocate,
    _cache_blocks,
    _free,
)
from advisor.sim.fast.lists import new_free_queue, new_rings, ring_lookup


@dataclass
class _Running:
    blocks: np.ndarray  # capacity >= nblocks
    nblocks: int
    num_cached: int
    hashes: np.ndarray  # per block: dense id, or _UNIQUE


class ArrayPrefixCache:
    """`cache.PrefixCache(num_blocks, block_size, "lru", speculative=)` on arrays; block hashes
    are ids < num_ids."""

    def __init__(self, num_blocks: int, block_size: int, num_ids: int, speculative: str | None = None,
                 vllm_version: str | None = "0.32") -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive (use cache.PrefixCache for an infinite cache)")
        n = num_blocks
        self.num_blocks = n
        self.block_size = block_size
        self.policy = "lru"
        self.drop_last_hit_block = drops_last_hit_block(speculative, vllm_version)
        self._nxt, self._prv = new_free_queue(n)  # head sentinel n, tail sentinel n+1
        self._ref = np.zeros(n, np.int64)
        self._bhash = np.full(n, _NONE, np.int64)
        self._first_copy, self._cnext, self._cprev = new_rings(max(num_ids, 1), n)
        self._cnt = np.asarray([0, n], np.int64)  # evictions, free blocks
        self._scratch = np.zeros(n, np.int64)
        self.running: dict[str, _Running] = {}
        self.queries = 0
        self.hits = 0
        self.preempted_queries = 0
        self.preempted_hits = 0
        self.blocks_in_use = 0
        self.peak_blocks_in_use = 0

    @property
    def evictions(self) -> int:
        return int(self._cnt[0])

    def fits(self, num_tokens: int) -> bool:
        return -(-num_tokens // self.block_size) <= self.num_blocks

    def lookup(self, block_hashes: Sequence[int] | np.ndarray, num_tokens: int) -> int:
        hashes = np.asarray(block_hashes, np.int64)
        cap = min(len(hashes), max(num_tokens - 1, 0) // self.block_size)
        return int(ring_lookup(hashes, cap, self._first_copy, self._scratch)) * self.block_size

    def admit(
        self, request_id: str, block_hashes: Sequence[int] | np.ndarray, num_tokens: int, *,
        position: int | None = None, preempted: bool = False, skip_prefix_cache: bool = False,
    ) -> int | None:
        """As `cache.PrefixCache.admit`: hit tokens, or None (nothing changed)."""
        assert request_id not in self.running, f"request {request_id} is already running"
        hashes = np.asarray(block_hashes, np.int64)
        assert len(hashes) >= num_tokens // self.block_size
        if not self.fits(num_tokens):
            return None
        nreq = -(-num_tokens // self.block_size)
        blocks = np.zeros(max(nreq, 4), np.int64)
        k, in_use = _admit_flagged(self._nxt, self._prv, self._ref, self._bhash, self._first_copy, self._cnext,
                                   self._cprev, self._cnt, hashes, num_tokens, self.block_size, blocks,
                                   skip_prefix_cache, self.drop_last_hit_block, ALL_TOKENS)
        if k < 0:
            return None
        self.running[request_id] = _Running(blocks, nreq, num_tokens // self.block_size, hashes.copy())
        self.blocks_in_use += int(in_use)
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.blocks_in_use)
        if skip_prefix_cache:
            pass
        elif preempted:
            self.preempted_queries += num_tokens
            self.preempted_hits += int(k) * self.block_size
        else:
            self.queries += num_tokens
            self.hits += int(k) * self.block_size
        return int(k) * self.block_size

    def grow(self, request_id: str, num_tokens_total: int, block_hashes: Sequence[int] | np.ndarray = ()) -> bool:
        """As `cache.PrefixCache.grow`: decode slots; newly full blocks cached."""
        req = self.running[request_id]
        need = -(-num_tokens_total // self.block_size)
        num_new = max(need - req.nblocks, 0)
        if num_new > self._cnt[1]:
            return False
        if need > len(req.blocks):
            req.blocks = np.concatenate([req.blocks, np.zeros(max(need, 2 * len(req.blocks)) - len(req.blocks), np.int64)])
        _allocate(self._nxt, self._prv, self._ref, self._bhash, self._first_copy, self._cnext, self._cprev,
                  self._cnt, req.blocks, req.nblocks, req.nblocks + num_new)
        req.nblocks += num_new
        num_full = num_tokens_total // self.block_size
        if num_full > len(req.hashes):
            given = np.asarray(block_hashes, np.int64)[len(req.hashes) : num_full]
            pad = np.full(num_full - len(req.hashes) - len(given), _UNIQUE, np.int64)
            req.hashes = np.concatenate([req.hashes, given, pad])
        if num_full > req.num_cached:
            _cache_blocks(self._bhash, self._first_copy, self._cnext, self._cprev, req.blocks, req.hashes,
                          req.num_cached, num_full)
            req.num_cached = num_full
        self.blocks_in_use += num_new
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.blocks_in_use)
        return True

    def free(self, request_id: str) -> None:
        req = self.running.pop(request_id)
        self.blocks_in_use -= int(_free(self._nxt, self._prv, self._ref, self._bhash, self._cnt, req.blocks, req.nblocks))

    def free_block_ids(self) -> list[int]:
        """The free queue, head (evicted first) to tail."""
        ids, b = [], int(self._nxt[self.num_blocks])
        while b != self.num_blocks + 1:
            ids.append(b)
            b = int(self._nxt[b])
        return ids
