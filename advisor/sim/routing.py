"""N vLLM engines behind a router: which replica each request goes to, and what it gets there.

Inputs: the arrays of one concurrent run (advisor.sim.events.run_concurrent's: per request
block hashes, prompt tokens, output tokens, arrival seconds, optional session ids), a
`make_cache` giving each replica its own `PrefixCache` (its own block pool: vLLM's
per-engine KV memory), the step clock, the batch limits and the scheduling, a replica
count and a router name. Output: `ReplicaResult`, each replica's `ConcurrentResult` and the
combined per-request hits, TTFT and end-to-end latency (each request's from the replica it
went to), plus the requests each replica got and the router's fallbacks.

The loop (`run_replicas`), in arrival order (ties in log order), for each request: every
replica is advanced to the request's arrival (`Engine.advance(t)`: the iterations that start
before t), the router picks a replica from what it could see then, and the request is handed
to it (`Engine.add_request`); at the end every replica runs to completion. Replicas do not
interact otherwise, so with one replica every router gives `run_concurrent`'s result exactly.

Routers (`ROUTERS`; docs/simulate.md, "Replicas and routers", says what each approximates):
- "round-robin": request k (in arrival order) goes to replica k mod N;
- "least-loaded": fewest requests on the replica (running + waiting + handed over but not yet
  arrived); ties to the lowest index;
- "session": a stable hash of the session id mod N; a request without one falls back to
  round-robin (its own counter) and is counted in `fallbacks`;
- "prefix-hash": a stable hash of the request's first K full-block hashes mod N
  (`prefix_hash_blocks`, K = 1 by default; fewer when the prompt has fewer full blocks); a
  prompt without a full block falls back to round-robin and is counted;
- "cache-aware": the replica with the highest
  `score = cached_prefix_tokens - load_weight * load_tokens`, where `cached_prefix_tokens` is
  what the replica's cache would hit now (`PrefixCache.lookup`, no state change) and
  `load_tokens` the prompt tokens handed to it and not yet computed (running, waiting and
  not yet arrived: `Engine.load_tokens`); ties to the fewer load tokens, then the lowest index.
Stable hashes are blake2b of the key's text, so a run gives the same routes on every machine
and Python (no `hash()` randomisation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

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


class Router:
    """One routing policy over N engines; `route(i, engines)` gives request i's replica.

    Called once per request, in arrival order, with every engine advanced to its arrival.
    `fallbacks` counts the requests the policy could not key (no session id, no full block)
    and sent round-robin instead.
    """

    def __init__(self, name: str, replicas: int, *, sessions: Sequence[str | None] | None = None,
                 prefix_hash_blocks: int = DEFAULT_PREFIX_HASH_BLOCKS,
                 load_weight: float = DEFAULT_LOAD_WEIGHT) -> None:
        check_router(name)
        if replicas < 1:
            raise AdvisorError(f"replicas must be at least 1, got {replicas}: pass --replicas 1,2,4, ...")
        if prefix_hash_blocks < 1:
            raise AdvisorError(f"--prefix-hash-blocks must be at least 1, got {prefix_hash_blocks}.")
        if load_weight < 0:
            raise AdvisorError(f"--router-load-weight must be >= 0, got {load_weight}.")
        self.name = name
        self.n = replicas
        self.sessions = sessions
        self.k = prefix_hash_blocks
        self.load_weight = load_weight
        self.turn = 0  # round-robin's next replica (also the fallback's)
        self.fallbacks = 0

    def _next_turn(self) -> int:
        r = self.turn
        self.turn = (self.turn + 1) % self.n
        return r

    def _fallback(self) -> int:
        self.fallbacks += 1
        return self._next_turn()

    def route(self, i: int, engines: Sequence[Engine]) -> int:
        if self.n == 1:
            return 0
        if self.name == ROUND_ROBIN:
            return self._next_turn()
        if self.name == LEAST_LOADED:
            loads = [e.load_requests() for e in engines]
            return loads.index(min(loads))
        if self.name == SESSION:
            sid = self.sessions[i] if self.sessions is not None else None
            return stable_hash(sid) % self.n if sid else self._fallback()
        if self.name == PREFIX_HASH:
            e = engines[0]  # every engine holds the same per-request hashes
            full = e.prompt[i] // e.bs
            if full == 0:
                return self._fallback()
            key = repr(list(e.hashes[i][: min(self.k, full)]))
            return stable_hash(key) % self.n
        best, best_key = 0, None
        for r, e in enumerate(engines):
            load = e.load_tokens()
            cached = 0 if e.skip[i] else e.cache.lookup(e.hashes[i], e.prompt[i])
            key = (-(cached - self.load_weight * load), load, r)
            if best_key is None or key < best_key:
                best, best_key = r, key
        return best


@dataclass(frozen=True)
class ReplicaResult:
    """N engines' outcome. Per request (log order): the replica it went to, its hit tokens,
    whether it ran, its TTFT and end-to-end seconds (NaN when it never ran), all from that
    replica; per replica: its `ConcurrentResult` and the requests with a prompt it got;
    `fallbacks`: requests the router could not key and sent round-robin."""

    replica: np.ndarray  # int64 per request
    hit_tokens: np.ndarray  # int64
    scheduled: np.ndarray  # bool
    ttft_s: np.ndarray  # float64
    e2e_s: np.ndarray  # float64
    per_replica: list[ConcurrentResult]
    requests_per_replica: np.ndarray  # int64 per replica
    fallbacks: int

    @property
    def preemptions(self) -> int:
        return sum(r.preemptions for r in self.per_replica)

    @property
    def evictions(self) -> int:
        return sum(r.evictions for r in self.per_replica)

    @property
    def load_spread(self) -> float:
        """Requests on the busiest replica over the mean per replica (1.0: even)."""
        mean = float(self.requests_per_replica.mean()) if len(self.requests_per_replica) else 0.0
        return float(self.requests_per_replica.max()) / mean if mean > 0 else 1.0


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
) -> ReplicaResult:
    """`replicas` engines, each with `make_cache()`'s pool and the same clock and limits, fed by
    `router` (module docstring). Arrays as `run_concurrent`'s, per request in log order;
    `sessions`: per request session id or None (the "session" router's key)."""
    route = Router(router, replicas, sessions=sessions, prefix_hash_blocks=prefix_hash_blocks,
                   load_weight=load_weight)
    engines = [Engine(make_cache(), block_hashes, n_tokens, output_tokens, arrivals_s, clock, max_num_seqs,
                      max_num_batched_tokens=max_num_batched_tokens, async_scheduling=async_scheduling,
                      skip_prefix_cache=skip_prefix_cache) for _ in range(replicas)]
    n = len(n_tokens)
    replica = np.zeros(n, dtype=np.int64)
    for i in engines[0].arrival_order():
        t = engines[0].arrivals[i]
        for e in engines:
            e.advance(t)
        r = route.route(i, engines)
        replica[i] = r
        engines[r].add_request(i)
    for e in engines:
        e.advance()
    results = [e.result() for e in engines]
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
    runnable = np.asarray(n_tokens) > 0
    counts = np.bincount(replica[runnable], minlength=replicas).astype(np.int64)
    return ReplicaResult(replica, hit_tokens, scheduled, ttft, e2e, results, counts, route.fallbacks)
