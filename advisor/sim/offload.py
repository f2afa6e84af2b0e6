"""Exact reference of vLLM's CPU offload tier (`--kv-offloading-size`, `--kv-offloading-backend
native`): the OffloadingConnector's CPU LRU on top of one full-attention GPU group.

Inputs: per request its full-block hashes, prompt length and GPU hit tokens (what
`cache.PrefixCache` hits; the tier does not change them, see "Sequential mode" below), a
block size, the CPU tier's size in chunks (`cpu_chunks_for_bytes`) and blocks per chunk.
Outputs: per request the CPU hit tokens (vLLM's `external_prefix_cache_hits`), and the tier's
counters (chunks stored, evicted, refused, loaded). Pure Python, no I/O; what vLLM itself is
tested against (tests/test_offload_oracle.py). Paths below are inside the `vllm` package,
read on 0.32.0 (and 0.33.0 / 0.34.0 where they differ).

How `--kv-offloading-size` becomes the connector (config/vllm.py
`VllmConfig._post_init_kv_transfer_config`): backend "native" sets `kv_connector =
"OffloadingConnector"` (unless `VLLM_USE_SIMPLE_KV_OFFLOAD=1`) with `cpu_bytes_to_use =
size x 2^30`; the size is the total over all TP ranks (config/cache.py `kv_offloading_size`).

Sizing (v1/kv_offload/cpu/spec.py `CPUOffloadingSpec.__init__`, distributed/kv_transfer/
kv_connector/v1/offloading/config.py `build_offloading_config`): one CPU chunk holds
`blocks_per_chunk` GPU blocks of every worker (`worker_kv_bytes_per_block x world_size`, or one
copy for MLA under TP on CUDA: `replicated_layout`), rounded up to the host page (4096 B,
`SharedOffloadRegion.BLOCK_SIZE_ALIGNMENT = mmap.PAGESIZE`); `num_chunks = cpu_bytes //
that`. `blocks_per_chunk` is 1 unless kv_connector_extra_config sets `block_size` (tokens,
a multiple of the GPU block) or `blocks_per_chunk`; the CLI flag sets neither.

The keys (offloading/scheduler.py `RequestOffloadState.update_offload_keys`): chunk j of a
request is keyed by the hash of its last block (`block_hashes[k(j+1) - 1]`, k = blocks per
chunk; the hash chains, so it names the whole prefix) and the group index. Only whole chunks
of full blocks have keys.

Lookup, at scheduling (`OffloadingConnectorScheduler.get_num_new_matched_tokens`,
`_lookup_complete_chunks`, `_maximal_prefix_lookup`): called with the GPU hit (`local`, a
block multiple) after `KVCacheManager.get_computed_blocks`; a request that skips the cache
read gets 0. With `tpc` = tokens per chunk and `n` keys: `max_hit = min(prompt, n x tpc)` (no
last-token cap: a prompt that is all cached loads its last block too, and the scheduler then
recomputes the last token, `Scheduler._update_waiting_for_remote_kv`); 0 if `max_hit - local <
tpc`; else count the ready keys from chunk `local // tpc` on; the hit is
`min(max_hit, tpc x (local // tpc + count)) - local`, 0 if below `tpc`. A key still being
stored (HIT_PENDING) or a chunk another request is loading delays the request (concurrent
only). The hit is loaded asynchronously: the request waits in WAITING_FOR_REMOTE_KVS, its
blocks are allocated at once and cached in the GPU prefix cache when the load ends
(`cache_blocks`), so loaded blocks become ordinary GPU-cached blocks.

Counting (v1/core/sched/scheduler.py `Scheduler.schedule`): `prefix_cache_queries/_hits` get
the prompt and the GPU hit as without offloading; `external_prefix_cache_queries` += prompt -
GPU hit (every scheduled request, also those that skip the cache read) and
`external_prefix_cache_hits` += the CPU hit. `num_cached_tokens` = GPU + CPU hit.

Loads and stores (`update_state_after_alloc`, `_build_store_jobs`): a CPU hit is loaded
(`prepare_load`: pinned until `complete_load`) and the request's store cursor moves past it:
neither the GPU-hit chunks nor the loaded ones are offered for storing. Without a CPU hit the
cursor starts at 0, so the GPU-hit chunks are offered again (present ones are kept and
refreshed, missing ones stored anew). At every step that computes tokens, the whole chunks of
the prompt computed so far from the cursor on are offered (`prepare_store`); decode blocks are
not (`offload_prompt_only`, default True). An offer is all or nothing: if its new chunks do
not fit in free plus evictable chunks (the offered ones protected), nothing is stored and the
same chunks are offered again at the next step. Stores complete after the step on the worker
(`complete_store`), until then they are not readable (HIT_PENDING) and not evictable.

The CPU LRU (v1/kv_offload/cpu/manager.py `CPUOffloadingManager`, cpu/policies/lru.py
`LRUCachePolicy`): every chunk has a rank; eviction takes the lowest-ranked evictable ones
(not pinned by a load, not pending a store, not in the offer). A stored chunk is ranked when
inserted; when a request finishes (`on_request_finished`, at the next scheduler step), every
key it loaded or offered (stored or found present) is re-ranked, last chunk first, so its
chunk 0 is the most recent. 0.33 and 0.34 also rank a request's keys as it touches them
(`LRUCachePolicy.on_request_access`: loaded and found-present keys, and new ones at insert,
get `(request rank, -position)` above every older rank), so a chunk just loaded is no longer
the LRU victim of the same request's store; `provisional_ranks(vllm_version)` says which
rule applies. `touch` exists in 0.32/0.33 but the connector never calls it.

Sequential mode (log order, one request at a time, prefill only, each finished before the
next; what `simulate_offload` runs): the engine steps until every transfer has completed and
every finish is processed (`Scheduler.has_requests` counts the connector's pending work), so
nothing is pending or pinned when the next request arrives. The GPU pool sees the same
allocations, in the same order, as without offloading (a load allocates the hit's blocks
first and the rest after it ends), so the GPU hits are `PrefixCache`'s and the CPU tier is a
pass over them. One offer per request: its prompt computed in one step (a prompt chunked
over several steps makes several offers; not modelled). Concurrent mode is not modelled.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from advisor.vllm_versions import facts

HOST_PAGE_BYTES = 4096  # SharedOffloadRegion.BLOCK_SIZE_ALIGNMENT (mmap.PAGESIZE on x86-64 Linux)
PENDING = -1  # a chunk whose store has not completed (vLLM's ChunkStatus.ref_cnt == -1)


def provisional_ranks(vllm_version: str | None) -> bool:
    """Whether vLLM `vllm_version` ranks a request's keys as it touches them (0.33 and later:
    `LRUCachePolicy.on_request_access`) rather than only when it finishes (0.32)."""
    return facts(vllm_version).version != "0.32"


def cpu_chunks_for_bytes(cpu_bytes: int, bytes_per_block_per_rank: int, world_size: int = 1,
                         blocks_per_chunk: int = 1, single_copy: bool = False) -> int:
    """CPU chunks `--kv-offloading-size` buys (`cpu_bytes` = GiB x 2^30, all ranks together):
    `CPUOffloadingSpec`'s arithmetic. `single_copy`: one copy for all ranks (MLA under TP on
    CUDA, vLLM's `replicated_layout`)."""
    assert bytes_per_block_per_rank > 0 and world_size >= 1 and blocks_per_chunk >= 1
    copies = 1 if single_copy else world_size
    per_chunk = bytes_per_block_per_rank * copies * blocks_per_chunk
    aligned = -(-per_chunk // HOST_PAGE_BYTES) * HOST_PAGE_BYTES
    return int(cpu_bytes) // aligned


def chunk_keys(block_hashes: Sequence[Hashable], num_tokens: int, block_size: int,
               blocks_per_chunk: int = 1) -> list[Hashable]:
    """A request's offload keys: the hash of each whole chunk's last full block."""
    num_full = min(len(block_hashes), num_tokens // block_size)
    return [block_hashes[blocks_per_chunk * (j + 1) - 1] for j in range(num_full // blocks_per_chunk)]


@dataclass(eq=False, slots=True)
class Chunk:
    """One CPU chunk: transfers reading it (`ref_cnt`; PENDING while its store runs) and its rank."""

    ref_cnt: int
    rank: tuple[int, int]


@dataclass
class RequestAccess:
    """The keys one request loaded or offered (stored or found present), by chunk position."""

    positions: dict[Hashable, int] = field(default_factory=dict)
    rank: int | None = None  # its provisional rank (0.33+), taken at its first access


class CpuOffloadManager:
    """vLLM's CPUOffloadingManager with the LRU policy, for one KV cache group.

    Invariant: every chunk has a unique rank; the evictable chunks (ref_cnt 0) are evicted
    lowest rank first. `heap` holds (rank, seq, key) entries for evictable chunks, older entries
    of a key invalidated by its current rank (checked when popped). Requests are named by
    any hashable id; a key's position is its chunk index in the request (its end token,
    vLLM's `set_offload_key_position`, orders the same).
    """

    def __init__(self, num_chunks: int, *, provisional: bool = False) -> None:
        assert num_chunks >= 0
        self.num_chunks = num_chunks
        self.provisional = provisional
        self.chunks: dict[Hashable, Chunk] = {}
        self.heap: list[tuple[tuple[int, int], int, Hashable]] = []
        self.requests: dict[Hashable, RequestAccess] = {}
        self.next_rank = 0
        self._seq = 0  # tie-break in the heap for equal ranks of one key (never compares keys)
        self.evictions = 0
        self.num_evictable = 0

    # --- ranks ---
    def _new_rank(self) -> tuple[int, int]:
        self.next_rank += 1
        return (self.next_rank, 0)

    def _set_rank(self, key: Hashable, rank: tuple[int, int]) -> None:
        chunk = self.chunks[key]
        chunk.rank = rank
        if chunk.ref_cnt == 0:
            self._push(key)

    def _push(self, key: Hashable) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (self.chunks[key].rank, self._seq, key))

    def _request(self, req: Hashable) -> RequestAccess:
        return self.requests.setdefault(req, RequestAccess())

    def _request_rank(self, req: Hashable) -> int:
        access = self._request(req)
        if access.rank is None:
            self.next_rank += 1
            access.rank = self.next_rank
        return access.rank

    def _record(self, req: Hashable, keys: Sequence[Hashable], positions: Sequence[int]) -> None:
        """The request saw these keys (vLLM's `_record_request_cache_access`)."""
        access = self._request(req)
        new = [(k, p) for k, p in zip(keys, positions, strict=True) if k not in access.positions]
        for key, pos in new:
            access.positions[key] = pos
        if self.provisional and new:  # LRUCachePolicy.on_request_access (0.33+)
            rank = self._request_rank(req)
            for key, pos in new:
                if key in self.chunks and self.chunks[key].rank < (rank, -pos):
                    self._set_rank(key, (rank, -pos))

    # --- the manager's API ---
    def lookup(self, key: Hashable) -> bool | None:
        """True: stored and readable (HIT); None: its store is pending (HIT_PENDING); False: MISS."""
        chunk = self.chunks.get(key)
        if chunk is None:
            return False
        return None if chunk.ref_cnt == PENDING else True

    def prepare_load(self, req: Hashable, keys: Sequence[Hashable], positions: Sequence[int]) -> None:
        """Pin readable chunks for a load (until `complete_load`)."""
        for key in keys:
            chunk = self.chunks[key]
            assert chunk.ref_cnt >= 0, "loading a chunk whose store is pending"
            if chunk.ref_cnt == 0:
                self.num_evictable -= 1
            chunk.ref_cnt += 1
        self._record(req, keys, positions)

    def complete_load(self, keys: Sequence[Hashable]) -> None:
        for key in keys:
            chunk = self.chunks[key]
            assert chunk.ref_cnt > 0
            chunk.ref_cnt -= 1
            if chunk.ref_cnt == 0:
                self.num_evictable += 1
                self._push(key)

    def touch(self, keys: Sequence[Hashable]) -> None:
        """Make these chunks the most recent, the first one most (0.32/0.33 `touch`; unused by
        the connector)."""
        for key in reversed(keys):
            if key in self.chunks:
                self._set_rank(key, self._new_rank())

    def prepare_store(self, req: Hashable, keys: Sequence[Hashable], positions: Sequence[int]) -> list[Hashable] | None:
        """Offer chunks for storing: returns the keys to store (now PENDING), or None when the
        new ones do not fit in free plus evictable chunks (nothing changes but the request's
        record of the keys it saw)."""
        new = [k for k in keys if k not in self.chunks]
        present = [k for k in keys if k in self.chunks and self.chunks[k].ref_cnt != PENDING]
        seen = set(new) | set(present)
        self._record(req, [k for k in keys if k in seen], [p for k, p in zip(keys, positions, strict=True) if k in seen])
        if not new:
            return []
        free = self.num_chunks - len(self.chunks)
        need = len(new) - free
        if need > 0:
            if need > self.num_evictable:
                return None
            victims = self._victims(need, set(keys))
            if victims is None:
                return None
            for key in victims:
                del self.chunks[key]
            self.num_evictable -= len(victims)
            self.evictions += len(victims)
        pos = dict(zip(keys, positions, strict=True))
        for key in new:
            rank = (self._request_rank(req), -pos[key]) if self.provisional else self._new_rank()
            self.chunks[key] = Chunk(PENDING, rank)
        return new

    def _victims(self, n: int, protected: set[Hashable]) -> list[Hashable] | None:
        """The n lowest-ranked evictable chunks outside `protected` (None, and no change, if fewer)."""
        taken: list[Hashable] = []
        chosen: set[Hashable] = set()
        kept: list[tuple[tuple[int, int], int, Hashable]] = []
        while self.heap and len(taken) < n:
            entry = heapq.heappop(self.heap)
            rank, _, key = entry
            chunk = self.chunks.get(key)
            if chunk is None or chunk.ref_cnt != 0 or chunk.rank != rank or key in chosen:
                continue  # stale: evicted, pinned, re-ranked, or already taken
            if key in protected:
                kept.append(entry)
                continue
            taken.append(key)
            chosen.add(key)
            kept.append(entry)
        if len(taken) < n:
            for entry in kept:
                heapq.heappush(self.heap, entry)
            return None
        for entry in kept:
            if entry[2] not in chosen:
                heapq.heappush(self.heap, entry)
        return taken

    def complete_store(self, keys: Sequence[Hashable]) -> None:
        for key in keys:
            chunk = self.chunks.get(key)
            if chunk is not None and chunk.ref_cnt == PENDING:
                chunk.ref_cnt = 0
                self.num_evictable += 1
                self._push(key)

    def on_request_finished(self, req: Hashable) -> None:
        """Re-rank the request's keys, its last chunk first (so chunk 0 is the most recent)."""
        access = self.requests.pop(req, None)
        if access is None:
            return
        # vLLM sorts by position, then reverses: equal positions keep their reversed first-seen order
        for key in reversed(sorted(access.positions, key=access.positions.__getitem__)):  # noqa: C413
            if key in self.chunks:
                self._set_rank(key, self._new_rank())

    # --- inspection (tests) ---
    def lru_order(self) -> list[Hashable]:
        """Evictable chunks, the next victim first."""
        return sorted((k for k, c in self.chunks.items() if c.ref_cnt == 0), key=lambda k: self.chunks[k].rank)


@dataclass
class OffloadCounters:
    """The tier's counters over a run (chunks, not tokens)."""

    loads: int = 0  # chunks loaded into the GPU
    stores: int = 0  # chunks stored
    evictions: int = 0  # chunks evicted to make room
    refused_offers: int = 0  # offers refused whole (more new chunks than the tier can free)
    refused_chunks: int = 0  # their new chunks


class OffloadTier:
    """The CPU tier in sequential mode: one request at a time, each finished before the next."""

    def __init__(self, num_chunks: int, block_size: int, blocks_per_chunk: int = 1,
                 vllm_version: str | None = "0.32") -> None:
        assert block_size > 0 and blocks_per_chunk > 0
        self.block_size = block_size
        self.blocks_per_chunk = blocks_per_chunk
        self.tokens_per_chunk = block_size * blocks_per_chunk
        self.manager = CpuOffloadManager(num_chunks, provisional=provisional_ranks(vllm_version))
        self.counters = OffloadCounters()
        self._requests = 0

    def lookup(self, keys: Sequence[Hashable], num_tokens: int, local: int) -> int:
        """CPU hit tokens beyond a GPU hit of `local` tokens (no state change)."""
        tpc = self.tokens_per_chunk
        max_hit = min(num_tokens, len(keys) * tpc)
        if max_hit - local < tpc:
            return 0
        start = local // tpc
        count = 0
        for key in keys[start : -(-max_hit // tpc)]:
            if not self.manager.lookup(key):  # a pending store is never seen here (sequential)
                break
            count += 1
        hit = min(max_hit, tpc * (start + count)) - local
        return hit if hit >= tpc else 0

    def run(self, block_hashes: Sequence[Hashable], num_tokens: int, local: int,
            skip_prefix_cache: bool = False) -> int:
        """One request of `num_tokens` prompt tokens whose GPU hit is `local` tokens, scheduled
        and finished: its CPU hit tokens (loaded, then its chunks offered and stored)."""
        assert local % self.block_size == 0
        req = self._requests
        self._requests += 1
        keys = chunk_keys(block_hashes, num_tokens, self.block_size, self.blocks_per_chunk)
        hit = 0 if skip_prefix_cache else self.lookup(keys, num_tokens, local)
        tpc = self.tokens_per_chunk
        start = 0
        if hit:
            start = -(-(local + hit) // tpc)
            load = range(local // tpc, start)
            self.manager.prepare_load(req, [keys[j] for j in load], list(load))
            self.manager.complete_load([keys[j] for j in load])
            self.counters.loads += len(load)
        offer = range(start, len(keys))
        if len(offer):
            before = self.manager.evictions
            stored = self.manager.prepare_store(req, [keys[j] for j in offer], list(offer))
            if stored is None:  # retried at every later step, in vain: nothing changes meanwhile
                self.counters.refused_offers += 1
                self.counters.refused_chunks += sum(1 for j in offer if self.manager.lookup(keys[j]) is False)
            else:
                self.manager.complete_store(stored)
                self.counters.stores += len(stored)
                self.counters.evictions += self.manager.evictions - before
        self.manager.on_request_finished(req)
        return hit


@dataclass(frozen=True)
class OffloadResult:
    """Per request (scheduler order) the CPU hit tokens and vLLM's external queries, and the
    tier's counters. Requests never scheduled (refused by the GPU pool) have 0 of both."""

    cpu_hit_tokens: np.ndarray  # int64
    external_queries: np.ndarray  # int64: prompt - GPU hit, for every scheduled request
    counters: OffloadCounters
    num_chunks: int


def simulate_offload(block_hash_lists: Sequence[Sequence[Hashable]], num_tokens: Sequence[int],
                     gpu_hits: Sequence[int], scheduled: Sequence[bool], block_size: int, num_chunks: int, *,
                     blocks_per_chunk: int = 1, skip: Sequence[bool] | None = None,
                     vllm_version: str | None = "0.32") -> OffloadResult:
    """The CPU tier over a sequential run whose GPU hits are known (module docstring:
    "Sequential mode"). `gpu_hits[i]`, `scheduled[i]`: request i's GPU hit tokens and whether
    the GPU pool ran it (`PrefixCache.admit` not None)."""
    n = len(num_tokens)
    cpu = np.zeros(n, np.int64)
    ext_queries = np.zeros(n, np.int64)
    tier = OffloadTier(num_chunks, block_size, blocks_per_chunk, vllm_version)
    for i in range(n):
        if not scheduled[i] or num_tokens[i] <= 0:
            continue
        cpu[i] = tier.run(block_hash_lists[i], int(num_tokens[i]), int(gpu_hits[i]),
                          bool(skip is not None and skip[i]))
        ext_queries[i] = int(num_tokens[i]) - int(gpu_hits[i])
    return OffloadResult(cpu, ext_queries, tier.counters, num_chunks)
