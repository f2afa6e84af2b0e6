"""Concurrent mode, compiled: `advisor.sim.events.Engine` on arrays, resumable, and `run_concurrent` on it.

Inputs: a `BlockTrace` (advisor.sim.fast.trace) (each prompt's full blocks as dense ids),
per-request prompt and output lengths (`n_tokens`, `output_tokens`), arrival times, a
`StepTimeModel`, `max_num_seqs`, `max_num_batched_tokens`, sync or async scheduling and a
pool size in usable blocks. Output: the same `events.ConcurrentResult` as
`events.run_concurrent` over an `advisor.sim.cache.PrefixCache` (tests/test_fastevents.py
checks every field, clock and step count included, on generated workloads under preemption
and chunking, in both scheduling modes), plus `blocks_used`, the highest block id ever
taken + 1, or the most blocks an admission or allocation check asked for (in use + asked) where
that is more: the pool from which this run never evicts (`advisor.sim.configuration.ceiling_blocks`).
`run_never_evicting` runs the infinite cache in such a pool, checked (tests/test_never_evicting.py).
Pool and block-table arrays are int32 while ids fit (`index_dtype`).

The loop, its order of operations and its clock are `Engine.advance`'s (read advisor.sim.events:
it is the readable reference, and vLLM's scheduler is its oracle); this is that code on
arrays, and advisor.sim.fast.step holds the Engine's methods under the same names. The state
of one or more engines (`new_engines`; advisor.sim.fast.routing runs N behind a router) is
arrays, one row per engine, so an engine can stop at any time and resume (`_advance(until)`,
`_hand_over`), as the reference's `advance`/`add_request` do:
- per request, shared by the engines (a request runs on one of them): vLLM's `Request`
  counters, one row of `st` (advisor.sim.fast.step's columns), its blocks, hits, times;
- per engine, the pool: advisor.sim.fast.cache's arrays (vLLM's free queue and per-hash rings,
  advisor.sim.fast.lists), one row each;
- per engine, the queues: the running queue in admission order, the waiting queue as a ring
  buffer (preempted requests go to its front), the requests handed over in arrival order
  (`order`; those before `counters[_O_J]` have arrived), and the async scheduler's queue of
  scheduled steps, two buffers of (request, tokens, samples);
- per engine, `counters` (ints) and `times` (floats): the run's counts and where it stands
  (running and waiting counts, steps in flight, clock, last finish).
Decode blocks get hash ids of their own after the prompts' (`request_hashes`), as
`run_concurrent` gives them tuple hashes nobody else has.

Speed: steps in which nothing but one decode token per running request happens are
taken in one jump (`_quiet_steps`): every running request decodes inside its current
block and does not finish, no arrival handed over is due, the next step starts before
`until` (requests still being routed may arrive by then), no request is prefilling, and
admission stopped in the last step for a reason such steps cannot change (the pool, or
`max_num_seqs`). The jump applies what those steps would (counters, the blocks they
fill cached, the clock); tests/test_fastevents.py runs every workload with and without
it.

Kept from measuring numba on this loop: no call passes more than 30 arguments (past
that each call builds a tuple and increfs every array in it, on every step).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from advisor.compiled import compiled
from advisor.sim.cache import drops_last_hit_block
from advisor.sim.events import ConcurrentResult
from advisor.sim.fast.lists import index_dtype, new_free_queue
from advisor.sim.fast.step import (
    _CNT_N,
    _EVICTIONS,
    _FREE,
    _MAX_BLOCK,
    _NEED,
    _NF,
    _NTOK,
    _O_HANDED,
    _O_J,
    _O_N,
    _O_NR,
    _O_NWAIT,
    _O_PREEMPT,
    _O_QLEN,
    _O_QOLD,
    _O_REFUSED,
    _O_STALLED,
    _O_STARTED,
    _O_STEPS,
    _O_WHEAD,
    _PEAK,
    _PROMPT,
    _SKIP,
    _T_BUSY,
    _T_CLOCK,
    _T_LAST,
    _T_N,
    _T_PREFILL,
    _T_START,
    _TARGET,
    _add_arrivals,
    _jump,
    _process,
    _quiet_steps,
    _schedule,
    _step_seconds,
)
from advisor.sim.fast.trace import BlockTrace
from advisor.sim.steptime import StepTimeModel

Engines = tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], np.ndarray, np.ndarray]
Requests = tuple[np.ndarray, ...]


class Arena:
    """Memory that one thread's runs reuse, a buffer per named array, so that a grid of runs does
    not ask the operating system for fresh pages on every run (on some machines that costs as
    much as the run). An array taken is valid until its name is taken again: results copy what
    they keep."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: type, fill: float | None = None) -> np.ndarray:
        size = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = self._buffers[name] = np.empty(size, dtype)
        out = buf[:size].reshape(shape)
        if fill is not None:
            out.fill(fill)
        return out


def _array(arena: Arena | None, name: str, shape: tuple[int, ...], dtype: type,
           fill: float | None = None) -> np.ndarray:
    """A C-contiguous array from `arena`, or a new one; filled with `fill` unless None."""
    if arena is not None:
        return arena.take(name, shape, dtype, fill)
    return np.empty(shape, dtype) if fill is None else np.full(shape, fill, dtype)


def new_pools(replicas: int, num_blocks: int, num_ids: int, arena: Arena | None = None) -> tuple[np.ndarray, ...]:
    """`replicas` empty pools of `num_blocks` usable blocks over `num_ids` hash ids, one row each:
    advisor.sim.fast.cache's arrays (nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt); all but
    the counters `index_dtype(num_blocks, num_ids)`."""
    nxt, prv = new_free_queue(num_blocks)
    r, nb = replicas, num_blocks
    ix = index_dtype(num_blocks, num_ids)
    pools = (_array(arena, "nxt", (r, nb + 2), ix), _array(arena, "prv", (r, nb + 2), ix),
             _array(arena, "ref", (r, nb), ix, 0), _array(arena, "bhash", (r, nb), ix, -1),
             _array(arena, "first_copy", (r, num_ids), ix, -1), _array(arena, "cnext", (r, nb), ix),
             _array(arena, "cprev", (r, nb), ix), _array(arena, "cnt", (r, _CNT_N), np.int64, 0))
    pools[0][:] = nxt
    pools[1][:] = prv
    pools[7][:, _FREE] = num_blocks
    pools[7][:, _MAX_BLOCK] = -1
    return pools


def new_engines(replicas: int, num_requests: int, num_blocks: int, num_ids: int, max_num_seqs: int,
                arena: Arena | None = None) -> Engines:
    """The state of `replicas` idle engines, each with an empty pool (`new_pools`), for a workload
    of `num_requests`: (pools, queues, counters, times), one row per engine (module docstring)."""
    r, cap = replicas, max(num_requests, 1)
    run_cap = max(min(max_num_seqs, num_requests), 1)  # no more run, or are scheduled in a step
    pools = new_pools(replicas, num_blocks, num_ids, arena)
    queues = (_array(arena, "running", (r, run_cap), np.int64), _array(arena, "wq", (r, cap), np.int64),
              _array(arena, "order", (r, cap), np.int64), _array(arena, "fl_req", (r, 2, run_cap), np.int64),
              _array(arena, "fl_num", (r, 2, run_cap), np.int64), _array(arena, "fl_smp", (r, 2, run_cap), np.bool_),
              _array(arena, "fl_cnt", (r, 2), np.int64, 0), _array(arena, "fl_clock", (r, 2), np.float64, 0))
    return (pools, queues, _array(arena, "counters", (r, _O_N), np.int64, 0),
            _array(arena, "times", (r, _T_N), np.float64, 0))


def new_requests(ids: np.ndarray, hoff: np.ndarray, boff: np.ndarray, n_tokens: np.ndarray,
                 output_tokens: np.ndarray, arrivals: np.ndarray, skip: np.ndarray | None,
                 num_blocks: int, arena: Arena | None = None) -> Requests:
    """The per-request arrays every engine shares: (hashes, hoff, boff, arrivals, st, blocks,
    hits, scheduled, first_at, finish_at); `ids`/`hoff`/`boff` are `request_hashes`'s; `blocks`
    holds ids of a pool of `num_blocks` (`index_dtype`)."""
    n = len(n_tokens)
    st = _array(arena, "st", (n, _NF), np.int64, 0)
    st[:, _PROMPT] = n_tokens
    st[:, _NTOK] = n_tokens
    st[:, _TARGET] = np.maximum(np.asarray(output_tokens, np.int64), 1)
    if skip is not None:
        st[:, _SKIP] = np.asarray(skip, np.int64)
    blocks = _array(arena, "blocks", (int(boff[n]),), index_dtype(num_blocks), 0)
    return (ids, hoff, boff, np.asarray(arrivals, np.float64), st, blocks,
            _array(arena, "hits", (n,), np.int64, 0), _array(arena, "scheduled", (n,), np.bool_, 0),
            _array(arena, "first_at", (n,), np.float64, np.nan), _array(arena, "finish_at", (n,), np.float64, np.nan))


@compiled
def _engine(pools, queues, counters, times, r):  # type: ignore[no-untyped-def]
    """Engine r's rows: (pool, queue, counters, times), views."""
    nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt = pools
    running, wq, order, fl_req, fl_num, fl_smp, fl_cnt, fl_clock = queues
    return ((nxt[r], prv[r], ref[r], bhash[r], first_copy[r], cnext[r], cprev[r], cnt[r]),
            (running[r], wq[r], order[r], fl_req[r], fl_num[r], fl_smp[r], fl_cnt[r], fl_clock[r]),
            counters[r], times[r])


@compiled
def _hand_over(arrivals, order, counters, times, i):  # type: ignore[no-untyped-def]
    """`Engine.add_request(i)`: request i (handed over in arrival order) arrives at its time;
    the engine's clock starts at the first one's arrival."""
    if counters[_O_STARTED] == 0:
        counters[_O_STARTED] = 1
        times[_T_CLOCK] = times[_T_LAST] = times[_T_START] = arrivals[i]
    order[counters[_O_HANDED]] = i
    counters[_O_HANDED] += 1


@compiled
def _advance(reqs, limits, coef, skip_quiet, async_sched, pool, queue, counters, times, passed, until):  # type: ignore[no-untyped-def]
    """`Engine.advance(until)`: the iterations that start before `until`, one per schedule()
    (async: then the previous step's output is processed); an idle engine's clock jumps to its
    next arrival. `limits` = (token budget, max_num_seqs, block size, 1 if a drafter drops the
    last hit block, 1 if the clock is flat); `coef`: the clock's `StepCoefficients`;
    `passed`: scratch room for one step's passed-over requests."""
    hashes, hoff, boff, arrivals, st, blocks, hits, scheduled, first_at, finish_at = reqs
    nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt = pool
    running, wq, order, fl_req, fl_num, fl_smp, fl_cnt, fl_clock = queue
    bs = limits[2]
    nr, whead, nwait = counters[_O_NR], counters[_O_WHEAD], counters[_O_NWAIT]
    qlen, qold = counters[_O_QLEN], counters[_O_QOLD]
    stalled = counters[_O_STALLED] == 1  # admission stopped in the last step for a reason quiet steps cannot change
    clock, last_finish = times[_T_CLOCK], times[_T_LAST]
    while counters[_O_J] < counters[_O_HANDED] or nr > 0 or nwait > 0 or qlen > 0:
        start = clock
        if nr == 0 and nwait == 0 and qlen == 0:
            start = max(clock, arrivals[order[counters[_O_J]]])  # idle: the next arrival
        if start >= until:
            break  # a request handed over later may still arrive by then
        clock = start
        nw0 = nwait
        whead, nwait = _add_arrivals(arrivals, order, boff, len(ref), clock, st, wq, whead, nwait, counters)
        if nr > 0 or nwait > 0:
            if skip_quiet and stalled and nwait == nw0 and (qlen == 1 if async_sched else qlen == 0):
                k, clock = _quiet_steps(arrivals, order, counters, st, running, nr, clock, coef, async_sched, bs,
                                        times, until)
                if k > 0:
                    _jump(bhash, first_copy, cnext, cprev, blocks, boff, hashes, hoff, st, running, nr, k,
                          async_sched, bs, fl_req, fl_num, fl_smp, fl_cnt, fl_clock, qold, clock)
                    counters[_O_STEPS] += k
                    continue
            s = (qold + qlen) % 2
            fl_cnt[s], nr, whead, nwait, stalled = _schedule(
                nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, hashes, hoff, st, running, nr, wq,
                whead, nwait, passed, fl_req[s], fl_num[s], fl_smp[s], limits, async_sched, hits, scheduled,
                counters)
            qlen += 1
            if fl_cnt[s] > 0:
                counters[_O_STEPS] += 1
                clock = _step_seconds(st, fl_req[s], fl_num[s], fl_smp[s], fl_cnt[s], hits, coef, limits[4] == 1,
                                      async_sched, clock, first_at, times)
            fl_clock[s] = clock
            if async_sched and qlen < 2 and fl_cnt[s] > 0:
                continue  # the batch queue has room: schedule the next step first
        if qlen > 0:
            last_finish, nr, whead, nwait, qold, qlen, freed = _process(
                bhash, first_copy, cnext, cprev, nxt, prv, ref, cnt, blocks, boff, hashes, hoff, st, running, nr, wq,
                whead, nwait, fl_req, fl_num, fl_smp, fl_cnt, fl_clock, qold, qlen, async_sched, bs, last_finish, finish_at)
            stalled = stalled and not freed
    counters[_O_NR], counters[_O_WHEAD], counters[_O_NWAIT] = nr, whead, nwait
    counters[_O_QLEN], counters[_O_QOLD], counters[_O_STALLED] = qlen, qold, 1 if stalled else 0
    times[_T_CLOCK], times[_T_LAST] = clock, last_finish


@compiled
def _run_one(reqs, limits, coef, skip_quiet, async_sched, pools, queues, counters, times, passed, order):  # type: ignore[no-untyped-def]
    """`run_concurrent` on engine 0: every request handed over in arrival order, then run to the end."""
    pool, queue, cnt, tms = _engine(pools, queues, counters, times, 0)
    for i in order:
        _hand_over(reqs[3], queue[2], cnt, tms, i)
    _advance(reqs, limits, coef, skip_quiet, async_sched, pool, queue, cnt, tms, passed, np.inf)


def engine_limits(max_num_seqs: int, max_num_batched_tokens: int | None, block_size: int, speculative: str | None,
                  clock: StepTimeModel) -> tuple[np.ndarray, np.ndarray]:
    """`_advance`'s `limits` and `coef` arrays."""
    assert max_num_seqs >= 1
    assert max_num_batched_tokens is None or max_num_batched_tokens >= max_num_seqs, "vLLM's own rule"
    budget = int(max_num_batched_tokens) if max_num_batched_tokens is not None else 1 << 62
    limits = np.array([budget, int(max_num_seqs), block_size, int(drops_last_hit_block(speculative)), int(clock.flat)],
                      np.int64)
    return limits, np.asarray(clock.coefficients, np.float64)


def num_hash_ids(trace: BlockTrace, ids: np.ndarray, n_tokens: np.ndarray) -> int:
    """Hash ids `request_hashes`' output uses: the prompts' (< trace.num_ids), then one per decode block."""
    return max(trace.num_ids + len(ids) - int((np.asarray(n_tokens, np.int64) // trace.block_size).sum()), 1)


def engine_result(reqs: Requests, engines: Engines, r: int, mine: np.ndarray | None = None) -> ConcurrentResult:
    """Engine r's `ConcurrentResult`; `mine`: the requests it got (None: all of them)."""
    _, _, _, arrivals, _, _, hits, scheduled, first_at, finish_at = reqs
    pools, _, counters, times = engines
    cnt, c, t = pools[7][r], counters[r], times[r]
    ttft, e2e = first_at - arrivals, finish_at - arrivals
    if mine is not None:
        hits, scheduled = np.where(mine, hits, 0), scheduled & mine
        ttft, e2e = np.where(mine, ttft, np.nan), np.where(mine, e2e, np.nan)
    return ConcurrentResult(
        hit_tokens=hits, scheduled=scheduled, evictions=int(cnt[_EVICTIONS]), peak_blocks_in_use=int(cnt[_PEAK]),
        preemptions=int(c[_O_PREEMPT]), refused=int(c[_O_REFUSED]), makespan_s=float(t[_T_LAST] - t[_T_START]),
        steps=int(c[_O_STEPS]), blocks_used=max(int(cnt[_MAX_BLOCK]) + 1, int(cnt[_NEED])), ttft_s=ttft, e2e_s=e2e,
        busy_s=float(t[_T_BUSY]), prefill_s=float(t[_T_PREFILL]))


def request_hashes(trace: BlockTrace, n_tokens: np.ndarray, output_tokens: np.ndarray,
                   decode_ids_from: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each request's full-block ids to its end (prompt's, then its own decode blocks'),
    flat with offsets `hoff`, and `boff`: offsets of room for every block it can hold."""
    bs = trace.block_size
    prompt = np.asarray(n_tokens, np.int64)
    end = prompt + np.maximum(np.asarray(output_tokens, np.int64) - 1, 0)
    pfull = prompt // bs
    assert (np.diff(trace.offsets) >= pfull).all(), "the trace holds every full prompt block"
    extra = np.maximum(end // bs - pfull, 0)
    hoff = np.zeros(len(prompt) + 1, np.int64)
    np.cumsum(pfull + extra, out=hoff[1:])
    flat = np.empty(int(hoff[-1]), index_dtype(decode_ids_from + int(extra.sum()), trace.num_ids))
    _fill_request_hashes(flat, hoff, trace.ids, trace.offsets, pfull, extra, decode_ids_from)  # no temporaries per block
    boff = np.zeros(len(prompt) + 1, np.int64)
    np.cumsum(-(-end // bs), out=boff[1:])
    return flat, hoff, boff


@compiled
def _fill_request_hashes(flat, hoff, ids, offsets, pfull, extra, decode_ids_from):  # type: ignore[no-untyped-def]
    """`request_hashes`' flat ids: each request's prompt blocks' ids, then its decode blocks
    numbered on from `decode_ids_from` in request order."""
    next_id = decode_ids_from
    for r in range(len(pfull)):
        h, o = hoff[r], offsets[r]
        for k in range(pfull[r]):
            flat[h + k] = ids[o + k]
        h += pfull[r]
        for k in range(extra[r]):
            flat[h + k] = next_id
            next_id += 1


def run_concurrent_compiled(
    trace: BlockTrace,
    num_blocks: int,
    n_tokens: np.ndarray,
    output_tokens: np.ndarray,
    arrivals_s: np.ndarray,
    clock: StepTimeModel,
    max_num_seqs: int,
    *,
    max_num_batched_tokens: int | None = None,
    async_scheduling: bool = False,
    skip_prefix_cache: np.ndarray | None = None,
    speculative: str | None = None,
    skip_quiet_steps: bool = True,
    prepared: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> ConcurrentResult:
    """`events.run_concurrent` over `num_blocks` usable blocks, compiled (module docstring).

    Arguments as run_concurrent's, with the cache given as a trace and a pool size;
    decode blocks get ids from `trace.num_ids` on; `speculative` is the cache's rule
    (`PrefixCache(speculative=)`). `skip_quiet_steps=False` takes every step one by one.
    `prepared`: `request_hashes(...)` for this trace and these lengths, to reuse it
    across pool sizes.
    """
    assert num_blocks >= 1
    limits, coef = engine_limits(max_num_seqs, max_num_batched_tokens, trace.block_size, speculative, clock)
    ids, hoff, boff = prepared or request_hashes(trace, n_tokens, output_tokens, trace.num_ids)
    reqs = new_requests(ids, hoff, boff, n_tokens, output_tokens, arrivals_s, skip_prefix_cache, int(num_blocks))
    n = len(n_tokens)
    engines = new_engines(1, n, int(num_blocks), num_hash_ids(trace, ids, n_tokens), max_num_seqs)
    order = np.argsort(reqs[3], kind="stable").astype(np.int64)
    _run_one(reqs, limits, coef, skip_quiet_steps, async_scheduling, *engines, np.empty(max(n, 1), np.int64), order)
    return engine_result(reqs, engines, 0)


def run_never_evicting(
    trace: BlockTrace,
    n_tokens: np.ndarray,
    output_tokens: np.ndarray,
    arrivals_s: np.ndarray,
    clock: StepTimeModel,
    max_num_seqs: int,
    *,
    prepared: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    first_pool: int | None = None,
    **engine: Any,
) -> ConcurrentResult:
    """`run_concurrent_compiled` with an infinite cache (`PrefixCache(None)`), in a pool sized
    by what the run holds at once rather than by every block it ever allocates.

    A pool of `total` blocks (every request's whole sequence, `1 +` the sum of its blocks)
    never evicts, never preempts and refuses nothing: it is the infinite cache. A smaller pool
    P (at least the largest request, so nothing is refused) runs a prefix of that run
    identically, block ids included: both pop the free queue's head, which holds freed
    unhashed blocks, then never-used ones in id order, then hashed ones, and decide
    admission and allocation by comparing a request's ask with the free count (P minus the
    blocks in use). They part at the first step where P's run must do otherwise: pop a
    hashed block (an eviction) or fail a check (blocks in use + the ask > P, recorded in
    `_NEED` before the check). So a run in P that evicted nothing and whose `_NEED` stayed
    within P IS the infinite run, and its `blocks_used` (the larger of the highest block id + 1
    and `_NEED`) is a pool from which every pool gives this very run (the grid's ceiling
    threshold). Otherwise P is doubled, up to `total`; the memory is that of the pool run.

    `first_pool`: the pool tried first; None: the distinct hash ids (prompt blocks and each
    request's own decode blocks, all of which a never-evicting run caches), plus a copy of the
    largest request and two blocks per running request, plus 1/8 for duplicate copies: vLLM
    caches a second copy of a block a request computes although the hash is cached (a prompt
    of whole blocks recomputes its last one, since its last token is never a hit; an EAGLE
    drafter drops the last hit block; a request may skip the cache read), or is cached by
    another request meanwhile (concurrent chunked prefills of one prefix). `engine`: the
    keyword arguments of `run_concurrent_compiled` (batch budget, scheduling, flags).
    """
    ids, hoff, boff = prepared or request_hashes(trace, n_tokens, output_tokens, trace.num_ids)
    sizes = np.diff(boff)
    total = 1 + int(boff[-1])
    largest = int(sizes.max(initial=1))
    if first_pool is None:
        distinct = num_hash_ids(trace, ids, n_tokens)
        first_pool = distinct + distinct // 8 + largest + 2 * max_num_seqs
    pool = min(total, max(int(first_pool), largest, 1))
    while True:
        res = run_concurrent_compiled(
            trace, pool, n_tokens, output_tokens, arrivals_s, clock, max_num_seqs, prepared=(ids, hoff, boff), **engine)
        if pool >= total or (res.evictions == 0 and res.blocks_used <= pool):
            return res
        pool = min(total, 2 * pool)
