"""N vLLM engines behind a router: which replica each request goes to, and what it gets there.

The readable reference of the replica simulator, in both modes of the single-engine one;
advisor.sim.fast.routing is its compiled twin (tests/test_fastrouting.py keeps them equal).

Concurrent mode (`run_replicas`). Inputs: the arrays of one concurrent run
(advisor.sim.events.run_concurrent's: per request block hashes, prompt tokens, output tokens,
arrival seconds), a `make_cache` giving each replica its own `PrefixCache` (its own block
pool: vLLM's per-engine KV memory), the step clock, the batch limits and the scheduling, a
replica count, a router name and its keys (session ids). In arrival order (ties in log
order), for each request: every replica is advanced to the request's arrival
(`Engine.advance(t)`: the iterations that start before t), the router picks a replica from
what it could see then, and the request is handed to it (`Engine.add_request`); at the end
every replica runs to completion. Replicas do not interact otherwise, so with one replica
every router gives `run_concurrent`'s result exactly.

Sequential mode (`run_replicas_sequential`): the sequential simulator's semantics (log order,
one request at a time, prefill only, each freed before the next; what the replay confirms to
the token) on N caches: each request in log order goes to the replica the router picks and is
admitted and freed on that replica's cache alone. With one replica it is the single cache's
run exactly.

Output: `ReplicaResult`, per request the replica it went to and what it got there (hits,
whether it ran, and in concurrent mode its TTFT and end-to-end latency), per replica its
counters (and in concurrent mode its `ConcurrentResult`), the requests each got and the
router's fallbacks.

Routers (`ROUTERS`; docs/simulate.md, "Replicas and routers", says what each approximates).
The router sees a replica's load and cache through `ReplicaView`; what load means differs by
mode, as a clock exists only in concurrent mode:
- "round-robin": request k (in routing order) goes to replica k mod N;
- "least-loaded": the fewest requests on the replica, ties to the lowest index. Concurrent:
  running + waiting + handed over but not yet arrived. Sequential: requests routed to it so
  far (nothing is ever queued), so it routes as round-robin does, up to fanned-out requests;
- "session": a stable hash of the session id mod N; a request without one falls back to
  round-robin (its own counter) and is counted in `fallbacks`;
- "prefix-hash": a stable hash of the request's first K full-block hashes mod N
  (`prefix_hash_blocks`, K = 1 by default; fewer when the prompt has fewer full blocks); a
  prompt without a full block falls back to round-robin and is counted;
- "cache-aware": the replica with the highest
  `score = cached_prefix_tokens - load_weight * load_tokens`, where `cached_prefix_tokens` is
  what the replica's cache would hit now (`PrefixCache.lookup`, no state change); ties to the
  fewer load tokens, then the lowest index. `load_tokens`, concurrent: the prompt tokens handed
  to it and not yet computed (running, waiting and not yet arrived: `Engine.load_tokens`), the
  prefill work queued on it; sequential: the prompt tokens it computed so far (its prompts
  minus their hits), the prefill work it has done, so the score trades a hit against how far
  the replica is ahead of the others in work.
Stable hashes are blake2b of the key's text, so a run gives the same routes on every machine
and Python (no `hash()` randomisation). With one replica there is nothing to choose: every
request goes to replica 0 and nothing falls back.

A logged request asking for n completions is one request to the router: its n scheduler
requests (adjacent, arriving together) follow the route of the first (`lines`, `follows`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from advisor import schema
from advisor.errors import AdvisorError
from advisor.sim.cache import PrefixCache
from advisor.sim.events import ConcurrentResult, Engine
from advisor.sim.steptime import StepTimeModel

ROUND_ROBIN, LEAST_LOADED, SESSION, PREFIX_HASH, CACHE_AWARE = (
    "round-robin", "least-loaded", "session", "prefix-hash", "cache-aware")
ROUTERS = (ROUND_ROBIN, LEAST_LOADED, SESSION, PREFIX_HASH, CACHE_AWARE)
DEFAULT_PREFIX_HASH_BLOCKS = 1
DEFAULT_LOAD_WEIGHT = 1.0  # one queued prompt token costs as much as one cached token saves


def stable_hash(key: str) -> int:
    """A 64-bit hash of `key` that does not change between processes (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def check_router(router: str) -> None:
    if router not in ROUTERS:
        raise AdvisorError(f"unknown router {router!r}: use one of {', '.join(ROUTERS)}.")


def check_routing(router: str, replicas: int, prefix_hash_blocks: int, load_weight: float) -> None:
    """Errors a user can fix, naming the option."""
    check_router(router)
    if replicas < 1:
        raise AdvisorError(f"replicas must be at least 1, got {replicas}: pass --replicas 1,2,4, ...")
    if prefix_hash_blocks < 1:
        raise AdvisorError(f"--prefix-hash-blocks must be at least 1, got {prefix_hash_blocks}.")
    if load_weight < 0:
        raise AdvisorError(f"--router-load-weight must be >= 0, got {load_weight}.")


def session_key(session: str | None) -> int | None:
    """The "session" router's key of a request: its session id's stable hash (None: no id)."""
    return stable_hash(session) if session else None


def prefix_key(first_blocks: Sequence[Hashable]) -> int | None:
    """The "prefix-hash" router's key of a request from its first K full-block hashes (None: no
    full block)."""
    return stable_hash(repr(list(first_blocks))) if len(first_blocks) else None


def route_keys(router: str, n: int, sessions: Sequence[str | None] | None,
               first_blocks: Callable[[int], Sequence[Hashable]]) -> list[int | None]:
    """Per request, the key a keyed router hashes (None: it falls back); all None for the others.
    `first_blocks(i)`: request i's first K full-block hashes (fewer when it has fewer)."""
    if router == SESSION:
        return [session_key(sessions[i] if sessions is not None else None) for i in range(n)]
    if router == PREFIX_HASH:
        return [prefix_key(first_blocks(i)) for i in range(n)]
    return [None] * n


def follows(lines: np.ndarray | None, n: int) -> np.ndarray:
    """Per request, the request whose route it takes (the previous child of the same logged
    request), else -1."""
    out = np.full(n, -1, np.int64)
    if lines is not None and n > 1:
        lines = np.asarray(lines)
        same = np.flatnonzero(lines[1:] == lines[:-1]) + 1
        out[same] = same - 1
    return out


class ReplicaView(Protocol):
    """What a router sees of one replica (module docstring: its meaning in each mode)."""

    def load_requests(self) -> int: ...

    def load_tokens(self) -> int: ...

    def cached_tokens(self, i: int) -> int: ...


class Router:
    """One routing policy over N replicas; `route(i, replicas)` gives request i's replica.

    Called once per routed request, in routing order, with every replica as the router sees it
    then. `keys`: per request the key of a keyed router (`route_keys`). `fallbacks` counts the
    requests the policy could not key (no session id, no full block) and sent round-robin instead.
    """

    def __init__(self, name: str, replicas: int, *, keys: Sequence[int | None] | None = None,
                 prefix_hash_blocks: int = DEFAULT_PREFIX_HASH_BLOCKS, load_weight: float = DEFAULT_LOAD_WEIGHT) -> None:
        check_routing(name, replicas, prefix_hash_blocks, load_weight)
        self.name = name
        self.n = replicas
        self.keys = keys
        self.load_weight = load_weight
        self.turn = 0  # round-robin's next replica (also the fallback's)
        self.fallbacks = 0

    def _next_turn(self) -> int:
        r = self.turn
        self.turn = (self.turn + 1) % self.n
        return r

    def route(self, i: int, replicas: Sequence[ReplicaView]) -> int:
        if self.n == 1:
            return 0
        if self.name == ROUND_ROBIN:
            return self._next_turn()
        if self.name == LEAST_LOADED:
            loads = [v.load_requests() for v in replicas]
            return loads.index(min(loads))
        if self.name in (SESSION, PREFIX_HASH):
            key = self.keys[i] if self.keys is not None else None
            if key is None:
                self.fallbacks += 1
                return self._next_turn()
            return key % self.n
        best, best_key = 0, None
        for r, v in enumerate(replicas):
            load = v.load_tokens()
            key_r = (-(v.cached_tokens(i) - self.load_weight * load), load, r)
            if best_key is None or key_r < best_key:
                best, best_key = r, key_r
        return best


@dataclass(frozen=True)
class ReplicaResult:
    """N replicas' outcome. Per request (log order): the replica it went to, its hit tokens,
    whether it ran, and (concurrent mode) its TTFT and end-to-end seconds (NaN when it never
    ran), all from that replica; per replica: the requests with a prompt it got, its evictions,
    peak blocks in use and refused requests, and (concurrent mode) its `ConcurrentResult`;
    `fallbacks`: requests the router could not key and sent round-robin."""

    mode: str  # schema.MODE_SEQUENTIAL or MODE_CONCURRENT
    replica: np.ndarray  # int64 per request
    hit_tokens: np.ndarray  # int64
    scheduled: np.ndarray  # bool
    requests_per_replica: np.ndarray  # int64 per replica
    evictions_per_replica: np.ndarray  # int64 per replica
    peak_blocks_per_replica: np.ndarray  # int64 per replica
    refused_per_replica: np.ndarray  # int64 per replica
    fallbacks: int
    per_replica: list[ConcurrentResult] = field(default_factory=list)  # concurrent mode
    ttft_s: np.ndarray | None = None  # float64 per request, concurrent mode
    e2e_s: np.ndarray | None = None

    @property
    def preemptions(self) -> int:
        return sum(r.preemptions for r in self.per_replica)

    @property
    def evictions(self) -> int:
        return int(self.evictions_per_replica.sum())

    @property
    def load_spread(self) -> float:
        """Requests on the busiest replica over the mean per replica (1.0: even)."""
        return spread(self.requests_per_replica)


def spread(per_replica: np.ndarray) -> float:
    """The busiest replica's amount over the mean per replica (1.0: even, or nothing at all)."""
    mean = float(np.mean(per_replica)) if len(per_replica) else 0.0
    return float(np.max(per_replica)) / mean if mean > 0 else 1.0


def concurrent_result(replica: np.ndarray, results: list[ConcurrentResult], n_tokens: np.ndarray,
                      fallbacks: int) -> ReplicaResult:
    """A concurrent run's `ReplicaResult` from each replica's own `ConcurrentResult` (every
    request read from the replica it went to)."""
    n = len(replica)
    hit_tokens = np.zeros(n, dtype=np.int64)
    scheduled = np.zeros(n, dtype=bool)
    ttft = np.full(n, np.nan)
    e2e = np.full(n, np.nan)
    for r, res in enumerate(results):
        mine = replica == r
        hit_tokens[mine] = res.hit_tokens[mine]
        scheduled[mine] = res.scheduled[mine]
        assert res.ttft_s is not None and res.e2e_s is not None
        ttft[mine] = res.ttft_s[mine]
        e2e[mine] = res.e2e_s[mine]
    return ReplicaResult(
        schema.MODE_CONCURRENT, replica, hit_tokens, scheduled, _requests_per_replica(replica, n_tokens, len(results)),
        np.array([r.evictions for r in results], np.int64), np.array([r.peak_blocks_in_use for r in results], np.int64),
        np.array([r.refused for r in results], np.int64), fallbacks, results, ttft, e2e)


def _requests_per_replica(replica: np.ndarray, n_tokens: np.ndarray, replicas: int) -> np.ndarray:
    runnable = np.asarray(n_tokens) > 0
    return np.bincount(replica[runnable], minlength=replicas).astype(np.int64)


class _EngineReplica:
    """A concurrent replica as the router sees it: its engine's queues and cache."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load_requests(self) -> int:
        return self.engine.load_requests()

    def load_tokens(self) -> int:
        return self.engine.load_tokens()

    def cached_tokens(self, i: int) -> int:
        e = self.engine
        return 0 if e.skip[i] else e.cache.lookup(e.hashes[i], e.prompt[i])


def run_replicas(
    make_cache: Callable[[], PrefixCache],
    block_hashes: Sequence[Sequence[Hashable]],
    n_tokens: np.ndarray,
    output_tokens: np.ndarray,
    arrivals_s: np.ndarray,
    clock: StepTimeModel,
    max_num_seqs: int,
    *,
    replicas: int,
    router: str,
    sessions: Sequence[str | None] | None = None,
    max_num_batched_tokens: int | None = None,
    async_scheduling: bool = False,
    skip_prefix_cache: np.ndarray | None = None,
    prefix_hash_blocks: int = DEFAULT_PREFIX_HASH_BLOCKS,
    load_weight: float = DEFAULT_LOAD_WEIGHT,
    lines: np.ndarray | None = None,
) -> ReplicaResult:
    """Concurrent mode: `replicas` engines, each with `make_cache()`'s pool and the same clock
    and limits, fed by `router` (module docstring). Arrays as `run_concurrent`'s, per request in
    log order; `sessions`: per request session id or None (the "session" router's key);
    `lines`: per request the logged request it is a child of (None: one each)."""
    check_routing(router, replicas, prefix_hash_blocks, load_weight)
    n = len(n_tokens)
    engines = [Engine(make_cache(), block_hashes, n_tokens, output_tokens, arrivals_s, clock, max_num_seqs,
                      max_num_batched_tokens=max_num_batched_tokens, async_scheduling=async_scheduling,
                      skip_prefix_cache=skip_prefix_cache) for _ in range(replicas)]
    bs = engines[0].bs
    keys = route_keys(router, n, sessions,
                      lambda i: block_hashes[i][: min(prefix_hash_blocks, int(n_tokens[i]) // bs)])
    route = Router(router, replicas, keys=keys, prefix_hash_blocks=prefix_hash_blocks, load_weight=load_weight)
    views = [_EngineReplica(e) for e in engines]
    follow = follows(lines, n)
    replica = np.zeros(n, dtype=np.int64)
    for i in engines[0].arrival_order():
        t = engines[0].arrivals[i]
        for e in engines:
            e.advance(t)
        r = int(replica[follow[i]]) if follow[i] >= 0 else route.route(i, views)
        replica[i] = r
        engines[r].add_request(i)
    for e in engines:
        e.advance()
    return concurrent_result(replica, [e.result() for e in engines], n_tokens, route.fallbacks)


class _CacheReplica:
    """A sequential replica as the router sees it: its cache and what it was given so far."""

    def __init__(self, cache: PrefixCache, block_hashes: Sequence[Sequence[Hashable]], n_tokens: np.ndarray,
                 skip: np.ndarray | None) -> None:
        self.cache = cache
        self.block_hashes = block_hashes
        self.n_tokens = n_tokens
        self.skip = skip
        self.routed = 0  # requests routed to it so far
        self.prefill = 0  # prompt tokens it computed so far (not hit)

    def load_requests(self) -> int:
        return self.routed

    def load_tokens(self) -> int:
        return self.prefill

    def cached_tokens(self, i: int) -> int:
        if self.skip is not None and self.skip[i]:
            return 0
        return self.cache.lookup(self.block_hashes[i], int(self.n_tokens[i]))


def run_replicas_sequential(
    make_cache: Callable[[], PrefixCache],
    block_hashes: Sequence[Sequence[Hashable]],
    n_tokens: np.ndarray,
    *,
    replicas: int,
    router: str,
    sessions: Sequence[str | None] | None = None,
    skip_prefix_cache: np.ndarray | None = None,
    prefix_hash_blocks: int = DEFAULT_PREFIX_HASH_BLOCKS,
    load_weight: float = DEFAULT_LOAD_WEIGHT,
    lines: np.ndarray | None = None,
) -> ReplicaResult:
    """Sequential mode: `replicas` caches from `make_cache()`; each request in log order goes to
    the replica `router` picks (module docstring) and is admitted and freed there, prefill only,
    as `simulate_one(mode="sequential")` runs one cache. A request too long for a replica's
    whole pool is refused there (hits nothing, does not run). Arguments as `run_replicas`'."""
    check_routing(router, replicas, prefix_hash_blocks, load_weight)
    n = len(n_tokens)
    caches = [make_cache() for _ in range(replicas)]
    bs = caches[0].block_size
    keys = route_keys(router, n, sessions,
                      lambda i: block_hashes[i][: min(prefix_hash_blocks, int(n_tokens[i]) // bs)])
    route = Router(router, replicas, keys=keys, prefix_hash_blocks=prefix_hash_blocks, load_weight=load_weight)
    views = [_CacheReplica(c, block_hashes, n_tokens, skip_prefix_cache) for c in caches]
    follow = follows(lines, n)
    replica = np.zeros(n, dtype=np.int64)
    hit_tokens = np.zeros(n, dtype=np.int64)
    scheduled = np.zeros(n, dtype=bool)
    refused = np.zeros(replicas, np.int64)
    for i in range(n):
        r = int(replica[follow[i]]) if follow[i] >= 0 else route.route(i, views)
        replica[i] = r
        views[r].routed += 1
        prompt = int(n_tokens[i])
        if prompt <= 0:
            continue  # refused at tokenization: never runs
        skip = skip_prefix_cache is not None and bool(skip_prefix_cache[i])
        hit = caches[r].admit(str(i), block_hashes[i], prompt, skip_prefix_cache=skip)
        if hit is None:  # longer than the replica's whole pool: vLLM refuses it
            assert not caches[r].fits(prompt)
            refused[r] += 1
            continue
        caches[r].free(str(i))
        hit_tokens[i] = hit
        scheduled[i] = True
        views[r].prefill += prompt - hit
    return ReplicaResult(
        schema.MODE_SEQUENTIAL, replica, hit_tokens, scheduled, _requests_per_replica(replica, n_tokens, replicas),
        np.array([c.evictions for c in caches], np.int64), np.array([c.peak_blocks_in_use for c in caches], np.int64),
        refused, route.fallbacks)
