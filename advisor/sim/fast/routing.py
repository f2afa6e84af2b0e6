"""N vLLM engines behind a router, compiled: `advisor.sim.routing`'s two loops as kernels.

Inputs: a `BlockTrace` (advisor.sim.fast.trace), a pool size in usable blocks PER REPLICA, a
replica count, a router and its settings, and for concurrent mode what
`advisor.sim.fast.events.run_concurrent_compiled` takes. Output: the same
`advisor.sim.routing.ReplicaResult` as `run_replicas` / `run_replicas_sequential` over
`advisor.sim.cache.PrefixCache`s (tests/test_fastrouting.py checks every field, routes and
fallbacks included, on generated workloads under evictions, preemption and chunking, in both
modes and both scheduling modes, for every router).

Concurrent mode (`run_replicas_compiled`): N engines of advisor.sim.fast.events (its state has
one row per engine and each stops at any time, `_advance(until)`), and the routing loop of
`run_replicas` in one kernel (`_route_concurrent`): in arrival order, the replicas run the
iterations that start before the request's arrival, the router chooses, the request is handed
over. Only least-loaded and cache-aware routers read the replicas' state; for the others the
replicas are not advanced before each hand-over but run once all their requests are handed
over, which gives the very same run (an iteration only sees requests that arrived by its
start, and those were all handed over before it) with fewer, longer quiet-step jumps.

Sequential mode (`run_replicas_sequential_compiled`): N pools of advisor.sim.fast.cache (the
compiled `PrefixCache` the concurrent kernel uses); each request in log order is routed, then
admitted and freed on its replica's pool (`_route_sequential`).

The router (`_choose`) is `advisor.sim.routing.Router.route` on arrays: the keyed routers'
targets are computed in Python with the reference's own key functions (`route_keys`), and the
state the others read (queue lengths, queued prompt tokens, cached prefixes) is read from the
engines' rows the way the reference reads it from its engines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from advisor import schema
from advisor.compiled import compiled
from advisor.sim.cache import drops_last_hit_block
from advisor.sim.fast.cache import ALL_TOKENS, _admit_flagged, _free
from advisor.sim.fast.events import (
    Arena,
    _advance,
    _engine,
    _hand_over,
    engine_limits,
    engine_result,
    new_engines,
    new_pools,
    new_requests,
    num_hash_ids,
    request_hashes,
)
from advisor.sim.fast.step import (
    _COMP,
    _O_HANDED,
    _O_J,
    _O_NR,
    _O_NWAIT,
    _O_WHEAD,
    _PROMPT,
    _SKIP,
)
from advisor.sim.fast.trace import BlockTrace
from advisor.sim.routing import (
    CACHE_AWARE,
    DEFAULT_LOAD_WEIGHT,
    DEFAULT_PREFIX_HASH_BLOCKS,
    LEAST_LOADED,
    PREFIX_HASH,
    ROUND_ROBIN,
    SESSION,
    ReplicaResult,
    check_routing,
    concurrent_result,
    follows,
    route_keys,
)
from advisor.sim.steptime import StepTimeModel

_KIND = {ROUND_ROBIN: 0, LEAST_LOADED: 1, SESSION: 2, PREFIX_HASH: 3, CACHE_AWARE: 4}
_RR, _LEAST, _KEYED_SESSION, _KEYED_PREFIX, _CACHE = 0, 1, 2, 3, 4
# per replica, sequential mode: requests routed so far, prompt tokens computed (not hit), refused, peak blocks
_S_ROUTED, _S_PREFILL, _S_REFUSED, _S_PEAK = 0, 1, 2, 3


def router_keys(router: str, trace: BlockTrace, n_tokens: np.ndarray, sessions: Sequence[str | None] | None,
                prefix_hash_blocks: int) -> list[int | None]:
    """`advisor.sim.routing.route_keys` of the requests of `trace` (its dense block ids are the
    hashes the reference routes on)."""
    ids, offsets, bs = trace.ids, trace.offsets, trace.block_size
    lengths = np.minimum(prefix_hash_blocks, np.asarray(n_tokens, np.int64) // bs).tolist()
    starts = offsets[:-1].tolist()
    return route_keys(router, len(lengths), sessions, lambda i: ids[starts[i]:starts[i] + lengths[i]].tolist())


def _targets(keys: Sequence[int | None], replicas: int) -> np.ndarray:
    """Per request, a keyed router's replica (key mod N), -1 where it falls back."""
    return np.array([-1 if k is None else k % replicas for k in keys], np.int64).reshape(-1)


@compiled
def _next_turn(turn):  # type: ignore[no-untyped-def]
    """Round-robin's next replica; turn = [next, replicas, fallbacks]."""
    r = turn[0]
    turn[0] = (turn[0] + 1) % turn[1]
    return r


@compiled
def _cached_tokens(first_copy, ids, start, prompt, skip, bs, drop_last):  # type: ignore[no-untyped-def]
    """`PrefixCache.lookup`: tokens a prompt of `prompt` tokens whose full-block ids start at
    ids[start] would hit now in the pool whose lookup copies are `first_copy`."""
    if skip:
        return 0
    cap = max(prompt - 1, 0) // bs
    k = 0
    while k < cap and first_copy[ids[start + k]] >= 0:
        k += 1
    if drop_last and k > 0:
        k -= 1
    return k * bs


@compiled
def _best(score, load, r, best, best_score, best_load):  # type: ignore[no-untyped-def]
    """The cache-aware choice so far: the higher score, ties to the fewer load tokens, then the
    lower index (r comes in increasing order; best < 0: none yet)."""
    if best < 0 or score > best_score or (score == best_score and load < best_load):
        return r, score, load
    return best, best_score, best_load


@compiled
def _queued_tokens(st, running, wq, order, counters):  # type: ignore[no-untyped-def]
    """`Engine.load_tokens`: prompt tokens not computed yet over running, waiting and handed-over
    requests not yet arrived."""
    total = 0
    for q in range(counters[_O_NR]):
        i = running[q]
        total += max(st[i, _PROMPT] - st[i, _COMP], 0)
    n, head = len(wq), counters[_O_WHEAD]
    for q in range(counters[_O_NWAIT]):
        i = wq[(head + q) % n]
        total += max(st[i, _PROMPT] - st[i, _COMP], 0)
    for q in range(counters[_O_J], counters[_O_HANDED]):
        total += st[order[q], _PROMPT]
    return total


@compiled
def _stateless_route(kind, i, targets, turn, replicas):  # type: ignore[no-untyped-def]
    """The choice of the routers that read no replica state, in both modes: one replica,
    round-robin, and the keyed routers (their target, or the next turn when the key has none);
    -1 for least-loaded and cache-aware, which read the replicas."""
    if replicas == 1:
        return 0
    if kind == _RR:
        return _next_turn(turn)
    if kind == _KEYED_SESSION or kind == _KEYED_PREFIX:
        if targets[i] < 0:
            turn[2] += 1
            return _next_turn(turn)
        return targets[i]
    return -1


@compiled
def _choose(kind, i, targets, turn, load_weight, reqs, limits, pools, queues, counters):  # type: ignore[no-untyped-def]
    """`Router.route(i, engines)` over the engines' rows (concurrent mode)."""
    replicas = counters.shape[0]
    fixed = _stateless_route(kind, i, targets, turn, replicas)
    if fixed >= 0:
        return fixed
    if kind == _LEAST:
        best, best_load = 0, -1
        for r in range(replicas):
            c = counters[r]
            load = c[_O_NR] + c[_O_NWAIT] + c[_O_HANDED] - c[_O_J]
            if best_load < 0 or load < best_load:
                best, best_load = r, load
        return best
    hashes, hoff, st = reqs[0], reqs[1], reqs[4]
    best, best_score, best_load = -1, 0.0, 0
    for r in range(replicas):
        load = _queued_tokens(st, queues[0][r], queues[1][r], queues[2][r], counters[r])
        cached = _cached_tokens(pools[4][r], hashes, hoff[i], st[i, _PROMPT], st[i, _SKIP] == 1, limits[2],
                                limits[3] == 1)
        best, best_score, best_load = _best(cached - load_weight * load, load, r, best, best_score, best_load)
    return best


@compiled
def _route_concurrent(reqs, limits, coef, skip_quiet, async_sched, pools, queues, counters, times, passed,  # type: ignore[no-untyped-def]
                      order, kind, targets, follow, load_weight, turn, replica):
    """`run_replicas`' loop: in arrival `order`, every replica advanced to the arrival (only for
    the routers that read their state: module docstring), the route, the hand-over; then every
    replica runs to the end. Fills `replica`; turn[2] counts the fallbacks."""
    arrivals = reqs[3]
    replicas = counters.shape[0]
    reads_state = kind == _LEAST or kind == _CACHE
    for i in order:
        if reads_state:
            for r in range(replicas):
                pool, queue, cnt, tms = _engine(pools, queues, counters, times, r)
                _advance(reqs, limits, coef, skip_quiet, async_sched, pool, queue, cnt, tms, passed, arrivals[i])
        if follow[i] >= 0:
            r = replica[follow[i]]
        else:
            r = _choose(kind, i, targets, turn, load_weight, reqs, limits, pools, queues, counters)
        replica[i] = r
        _hand_over(arrivals, queues[2][r], counters[r], times[r], i)
    for r in range(replicas):
        pool, queue, cnt, tms = _engine(pools, queues, counters, times, r)
        _advance(reqs, limits, coef, skip_quiet, async_sched, pool, queue, cnt, tms, passed, np.inf)


def run_replicas_compiled(
    trace: BlockTrace,
    num_blocks: int,
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
    speculative: str | None = None,
    prefix_hash_blocks: int = DEFAULT_PREFIX_HASH_BLOCKS,
    load_weight: float = DEFAULT_LOAD_WEIGHT,
    lines: np.ndarray | None = None,
    keys: Sequence[int | None] | None = None,
    skip_quiet_steps: bool = True,
    prepared: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    arena: Arena | None = None,
) -> ReplicaResult:
    """`advisor.sim.routing.run_replicas` with `num_blocks` usable blocks per replica, compiled
    (module docstring). Arguments as `run_concurrent_compiled`'s and `run_replicas`'; `keys`:
    `router_keys(...)` for this router, to reuse across replica counts and budgets; `arena`: the
    memory this thread's runs reuse (advisor.sim.fast.events.Arena)."""
    check_routing(router, replicas, prefix_hash_blocks, load_weight)
    assert num_blocks >= 1
    n = len(n_tokens)
    limits, coef = engine_limits(max_num_seqs, max_num_batched_tokens, trace.block_size, speculative, clock)
    ids, hoff, boff = prepared or request_hashes(trace, n_tokens, output_tokens, trace.num_ids)
    reqs = new_requests(ids, hoff, boff, n_tokens, output_tokens, arrivals_s, skip_prefix_cache, int(num_blocks), arena)
    engines = new_engines(replicas, n, int(num_blocks), num_hash_ids(trace, ids, n_tokens), max_num_seqs, arena)
    if keys is None:
        keys = router_keys(router, trace, n_tokens, sessions, prefix_hash_blocks)
    turn = np.array([0, replicas, 0], np.int64)
    replica = np.zeros(n, np.int64)
    order = np.argsort(reqs[3], kind="stable").astype(np.int64)
    _route_concurrent(reqs, limits, coef, skip_quiet_steps, async_scheduling, *engines, np.empty(max(n, 1), np.int64),
                      order, _KIND[router], _targets(keys, replicas), follows(lines, n), float(load_weight), turn,
                      replica)
    results = [engine_result(reqs, engines, r, replica == r) for r in range(replicas)]
    return concurrent_result(replica, results, n_tokens, int(turn[2]))


@compiled
def _choose_sequential(kind, i, targets, turn, load_weight, ids, offsets, num_tokens, skip, bs, drop_last,  # type: ignore[no-untyped-def]
                       first_copy, per):
    """`Router.route(i, caches)` over the pools' rows (sequential mode: load is what was routed
    and computed so far, `per`)."""
    replicas = per.shape[0]
    fixed = _stateless_route(kind, i, targets, turn, replicas)
    if fixed >= 0:
        return fixed
    if kind == _LEAST:
        best = 0
        for r in range(1, replicas):
            if per[r, _S_ROUTED] < per[best, _S_ROUTED]:
                best = r
        return best
    best, best_score, best_load = -1, 0.0, 0
    for r in range(replicas):
        load = per[r, _S_PREFILL]
        cached = _cached_tokens(first_copy[r], ids, offsets[i], num_tokens[i], skip[i], bs, drop_last)
        best, best_score, best_load = _best(cached - load_weight * load, load, r, best, best_score, best_load)
    return best


@compiled
def _route_sequential(ids, offsets, num_tokens, skip, bs, drop_last, pools, kind, targets, follow, load_weight,  # type: ignore[no-untyped-def]
                      turn, replica, hits, scheduled, per, blocks):
    """`run_replicas_sequential`'s loop: each request in log order routed, then admitted and
    freed on its replica's pool. Fills replica/hits/scheduled and `per` (per replica); `blocks`:
    room for one request's blocks."""
    nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt = pools
    num_blocks = ref.shape[1]
    for i in range(len(num_tokens)):
        if follow[i] >= 0:
            r = replica[follow[i]]
        else:
            r = _choose_sequential(kind, i, targets, turn, load_weight, ids, offsets, num_tokens, skip, bs, drop_last,
                                   first_copy, per)
        replica[i] = r
        per[r, _S_ROUTED] += 1
        n = num_tokens[i]
        if n <= 0:
            continue  # refused at tokenization: never runs
        nreq = (n + bs - 1) // bs
        if nreq > num_blocks:  # longer than the replica's whole pool: vLLM refuses it
            per[r, _S_REFUSED] += 1
            continue
        k, _ = _admit_flagged(nxt[r], prv[r], ref[r], bhash[r], first_copy[r], cnext[r], cprev[r], cnt[r],
                              ids[offsets[i]:offsets[i + 1]], n, bs, blocks, skip[i], drop_last, ALL_TOKENS)
        _free(nxt[r], prv[r], ref[r], bhash[r], cnt[r], blocks, nreq)
        hits[i] = k * bs
        scheduled[i] = True
        per[r, _S_PREFILL] += n - k * bs
        per[r, _S_PEAK] = max(per[r, _S_PEAK], nreq)


def run_replicas_sequential_compiled(
    trace: BlockTrace,
    num_blocks: int,
    *,
    replicas: int,
    router: str,
    sessions: Sequence[str | None] | None = None,
    skip_prefix_cache: np.ndarray | None = None,
    speculative: str | None = None,
    prefix_hash_blocks: int = DEFAULT_PREFIX_HASH_BLOCKS,
    load_weight: float = DEFAULT_LOAD_WEIGHT,
    lines: np.ndarray | None = None,
    keys: Sequence[int | None] | None = None,
    arena: Arena | None = None,
) -> ReplicaResult:
    """`advisor.sim.routing.run_replicas_sequential` over the requests of `trace` with
    `num_blocks` usable blocks per replica, compiled (module docstring); `speculative` is the
    caches' rule (`PrefixCache(speculative=)`), `keys` and `arena` as `run_replicas_compiled`'s."""
    check_routing(router, replicas, prefix_hash_blocks, load_weight)
    assert num_blocks >= 1
    n = trace.num_requests
    if keys is None:
        keys = router_keys(router, trace, trace.num_tokens, sessions, prefix_hash_blocks)
    skip = np.zeros(n, np.bool_) if skip_prefix_cache is None else np.asarray(skip_prefix_cache, np.bool_)
    pools = new_pools(replicas, int(num_blocks), max(trace.num_ids, 1), arena)
    turn = np.array([0, replicas, 0], np.int64)
    replica, hits = np.zeros(n, np.int64), np.zeros(n, np.int64)
    scheduled = np.zeros(n, np.bool_)
    per = np.zeros((replicas, 4), np.int64)
    _route_sequential(trace.ids, trace.offsets, trace.num_tokens, skip, trace.block_size,
                      bool(drops_last_hit_block(speculative)), pools, _KIND[router], _targets(keys, replicas),
                      follows(lines, n), float(load_weight), turn, replica, hits, scheduled, per,
                      np.empty(max(int(num_blocks), 1), np.int64))
    runnable = trace.num_tokens > 0
    counts = np.bincount(replica[runnable], minlength=replicas).astype(np.int64)
    return ReplicaResult(schema.MODE_SEQUENTIAL, replica, hits, scheduled, counts, pools[7][:, 0].copy(),
                         per[:, _S_PEAK].copy(), per[:, _S_REFUSED].copy(), int(turn[2]))
