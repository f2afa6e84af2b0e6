"""Concurrent mode, compiled: `advisor.sim.events.run_concurrent`'s loop in one kernel.

Inputs: a `BlockTrace` (advisor.sim.fast.trace) (each prompt's full blocks as dense ids),
per-request prompt and output lengths (`n_tokens`, `output_tokens`), arrival times, a
`CostModel` (calibrated here as run_concurrent does), `max_num_seqs`,
`max_num_batched_tokens`, sync or async scheduling and a pool size in usable blocks.
Output: the same `events.ConcurrentResult` as `events.run_concurrent` over an
`advisor.sim.cache.PrefixCache` (tests/test_fastevents.py checks every field, clock and
step count included, on generated workloads under preemption and chunking, in both
scheduling modes), plus `blocks_used`, the highest block id ever taken + 1 (what an
infinite pool's run needs, see `advisor.sim.grid.ceiling_blocks`).

The loop, its order of operations and its clock are run_concurrent's (read its
docstring: it is the readable reference, and vLLM's scheduler is its oracle); this is
that code on arrays, helpers named as there. Per request, vLLM's `Request` counters sit
in one row of `st` (columns below). The cache is advisor.sim.fast.cache's: vLLM's free
queue and per-hash rings (advisor.sim.fast.lists). The running queue is an array in
admission order; the waiting queue a ring buffer (preempted requests go to its front);
the async scheduler's queue of scheduled steps two buffers of (request, tokens, samples).
Decode blocks get hash ids of their own after the prompts' (`request_hashes`), as
`run_concurrent` gives them tuple hashes nobody else has.

Speed: steps in which nothing but one decode token per running request happens are
taken in one jump (`_quiet_steps`): every running request decodes inside its current
block and does not finish, no arrival is due, no request is prefilling, and admission
stopped in the last step for a reason such steps cannot change (the pool, or
`max_num_seqs`). The jump applies what those steps would (counters, the blocks they
fill cached, the clock); tests/test_fastevents.py runs every workload with and without
it.

Kept from measuring numba on this loop: no call passes more than 30 arguments (past
that each call builds a tuple and increfs every array in it, on every step).
"""

from __future__ import annotations

import numpy as np

from advisor.sim.cache import drops_last_hit_block
from advisor.sim.events import ConcurrentResult
from advisor.sim.fast.cache import _admit_flagged, _allocate, _free
from advisor.sim.fast.lists import (
    compiled,
    new_free_queue,
    new_rings,
    ring_link,
)
from advisor.sim.fast.trace import BlockTrace
from advisor.sim.steptime import StepTimeModel

# cnt: the cache's counters, shared with advisor.sim.fast.cache's kernels (which use the first two)
_EVICTIONS, _FREE, _IN_USE, _PEAK, _MAX_BLOCK = 0, 1, 2, 3, 4
# st[i]: request i's counters (events.Engine's names)
_PROMPT, _TARGET, _NTOK, _COMP, _PH, _INFL, _STALE, _SLOTS, _NCACHED, _FIN, _RUN, _SKIP, _NF = range(13)
# out: the run's counters
_O_PREEMPT, _O_REFUSED, _O_STEPS, _O_J = 0, 1, 2, 3


@compiled
def _new_pool(num_blocks, num_ids):  # type: ignore[no-untyped-def]
    """advisor.sim.fast.cache's arrays for a pool of `num_blocks` free blocks and `num_ids` hash ids."""
    nxt, prv = new_free_queue(num_blocks)
    ref = np.zeros(num_blocks, np.int64)
    bhash = np.full(num_blocks, -1, np.int64)
    first_copy, cnext, cprev = new_rings(num_ids, num_blocks)
    cnt = np.zeros(5, np.int64)
    cnt[_FREE] = num_blocks
    cnt[_MAX_BLOCK] = -1
    return nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt


@compiled
def _cache_upto(bhash, first_copy, cnext, cprev, blocks, boff, hashes, hoff, st, i, num_tokens, bs):  # type: ignore[no-untyped-def]
    """`PrefixCache.cache_blocks`: request i's blocks that its first `num_tokens` fill get their hashes."""
    for k in range(st[i, _NCACHED], num_tokens // bs):
        b = blocks[boff[i] + k]
        bhash[b] = hashes[hoff[i] + k]
        ring_link(first_copy, cnext, cprev, bhash[b], b)
    st[i, _NCACHED] = max(st[i, _NCACHED], num_tokens // bs)


@compiled
def _take_blocks(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, st, i, total, bs):  # type: ignore[no-untyped-def]
    """Blocks for request i's first `total` tokens (nothing taken, False, when the pool is short)."""
    held = (st[i, _SLOTS] + bs - 1) // bs
    num_new = max((total + bs - 1) // bs - held, 0)
    if num_new > cnt[_FREE]:
        return False
    if num_new > 0:
        start = boff[i] + held
        _allocate(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, start, start + num_new)
        for k in range(start, start + num_new):
            cnt[_MAX_BLOCK] = max(cnt[_MAX_BLOCK], blocks[k])
        cnt[_IN_USE] += num_new
        cnt[_PEAK] = max(cnt[_PEAK], cnt[_IN_USE])
    st[i, _SLOTS] = max(st[i, _SLOTS], total)
    return True


@compiled
def _admit(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, hashes, hoff, st, i, budget,  # type: ignore[no-untyped-def]
           limits):
    """`PrefixCache.admit(..., token_budget=budget)` for waiting request i (advisor.sim.fast.cache's
    `_admit_flagged`): its hit tokens, or -1 (nothing taken) when its whole sequence does not
    fit the free blocks."""
    bs = limits[2]
    total = st[i, _NTOK]
    blk = blocks[boff[i]:boff[i + 1]]
    k, in_use = _admit_flagged(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, hashes[hoff[i]:hoff[i + 1]],
                               total, bs, blk, st[i, _SKIP] == 1, limits[3] == 1, budget)
    if k < 0:
        return -1
    upto = min(k * bs + budget, total)
    for x in range((upto + bs - 1) // bs):
        cnt[_MAX_BLOCK] = max(cnt[_MAX_BLOCK], blk[x])
    cnt[_IN_USE] += in_use
    cnt[_PEAK] = max(cnt[_PEAK], cnt[_IN_USE])
    st[i, _SLOTS] = upto
    st[i, _NCACHED] = upto // bs
    return k * bs


@compiled
def _release(nxt, prv, ref, bhash, cnt, blocks, boff, st, i, bs):  # type: ignore[no-untyped-def]
    """`PrefixCache.free`: request i's blocks go back, tail first."""
    cnt[_IN_USE] -= _free(nxt, prv, ref, bhash, cnt, blocks[boff[i]:boff[i + 1]], (st[i, _SLOTS] + bs - 1) // bs)
    st[i, _SLOTS] = 0
    st[i, _NCACHED] = 0


@compiled
def _run(hashes, hoff, boff, prompt, target, skip, arrivals, order, num_blocks, num_ids, limits,  # type: ignore[no-untyped-def]
         coef, skip_quiet, async_sched, hits, scheduled, out, first_at, finish_at, times):
    """The engine's state on arrays, then `_engine_loop` over it. `limits` = (token budget,
    max_num_seqs, block size, 1 if a drafter drops the last hit block, 1 if the clock is
    flat); `coef`: the clock's `StepCoefficients`. Fills hits/scheduled, `out`
    (evictions, peak, preemptions, refused, steps, blocks used), the per-request times
    first_at/finish_at and `times` (busy, prefill seconds); returns the makespan."""
    n = len(prompt)
    pool = _new_pool(num_blocks, num_ids)
    blocks = np.zeros(boff[n], np.int64)
    st = np.zeros((n, _NF), np.int64)
    st[:, _PROMPT] = prompt
    st[:, _NTOK] = prompt
    st[:, _TARGET] = target
    st[:, _SKIP] = skip
    cap = max(n, 1)
    running, wq, passed = np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.int64)
    # the steps scheduled and not yet processed (async: at most two): requests, tokens, samples
    fl_req, fl_num, fl_smp = np.empty((2, cap), np.int64), np.empty((2, cap), np.int64), np.empty((2, cap), np.bool_)
    fl_cnt, fl_clock = np.zeros(2, np.int64), np.zeros(2, np.float64)
    counters = np.zeros(4, np.int64)
    makespan = _engine_loop(hashes, hoff, boff, arrivals, order, limits, coef, skip_quiet, async_sched, hits,
                            scheduled, pool, blocks, st, running, wq, passed, fl_req, fl_num, fl_smp, fl_cnt,
                            fl_clock, counters, first_at, finish_at, times)
    cnt = pool[7]
    out[0], out[1], out[5] = cnt[_EVICTIONS], cnt[_PEAK], cnt[_MAX_BLOCK] + 1
    out[2], out[3], out[4] = counters[_O_PREEMPT], counters[_O_REFUSED], counters[_O_STEPS]
    return makespan


@compiled
def _engine_loop(hashes, hoff, boff, arrivals, order, limits, coef, skip_quiet, async_sched,  # type: ignore[no-untyped-def]
                 hits, scheduled, pool, blocks, st, running, wq, passed, fl_req, fl_num, fl_smp, fl_cnt, fl_clock,
                 counters, first_at, finish_at, times):
    """`Engine.advance`: one iteration per schedule() (async: then the previous step's
    output is processed). Returns the makespan."""
    n = st.shape[0]
    bs = limits[2]
    nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt = pool
    nr = whead = nwait = qlen = qold = 0
    clock = last_finish = t0 = arrivals[order[0]] if n > 0 else 0.0
    stalled = False  # admission stopped in the last step for a reason quiet steps cannot change
    while counters[_O_J] < n or nr > 0 or nwait > 0 or qlen > 0:
        if nr == 0 and nwait == 0 and qlen == 0:
            clock = max(clock, arrivals[order[counters[_O_J]]])  # idle: the next arrival
        nw0 = nwait
        whead, nwait = _add_arrivals(arrivals, order, boff, len(ref), clock, st, wq, whead, nwait, counters)
        if nr > 0 or nwait > 0:
            if skip_quiet and stalled and nwait == nw0 and (qlen == 1 if async_sched else qlen == 0):
                k, clock = _quiet_steps(arrivals, order, counters, st, running, nr, clock, coef, async_sched, bs,
                                        times)
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
    return last_finish - t0


@compiled
def _add_arrivals(arrivals, order, boff, num_blocks, clock, st, wq, whead, nwait, counters):  # type: ignore[no-untyped-def]
    """Requests order[j:] that arrived by the clock join the waiting queue's tail; one whose
    end cannot fit the whole pool is refused. Returns (whead, nwait)."""
    n = st.shape[0]
    j = counters[_O_J]
    while j < n and arrivals[order[j]] <= clock:
        i = order[j]
        j += 1
        if st[i, _PROMPT] <= 0:
            continue  # refused at tokenization: never runs, not counted
        if boff[i + 1] - boff[i] > num_blocks:
            counters[_O_REFUSED] += 1
            continue
        wq[(whead + nwait) % n] = i
        nwait += 1
    counters[_O_J] = j
    return whead, nwait


@compiled
def _schedule(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, hashes, hoff, st,  # type: ignore[no-untyped-def]
              running, nr, wq, whead, nwait, passed, req, num, smp, limits, async_sched, hits, scheduled, counters):
    """`Engine.schedule` into one step's buffers (req/num/smp); `limits` = (token budget,
    max_num_seqs, block size). Returns (m scheduled, nr, whead, nwait, stalled): stalled
    when admission stopped for the pool or `max_num_seqs`."""
    budget, m, nr, whead, nwait, preempted = _schedule_running(
        nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, hashes, hoff, st, running, nr, wq, whead,
        nwait, req, num, limits, counters)
    stalled = False
    if not preempted:
        m, nr, whead, nwait, stalled = _schedule_waiting(
            nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, hashes, hoff, st, running, nr, wq,
            whead, nwait, passed, req, num, m, budget, limits, hits, scheduled)
    for q in range(m):  # _update_after_schedule
        i = req[q]
        st[i, _COMP] += num[q]
        st[i, _INFL] += num[q]
        smp[q] = st[i, _COMP] >= st[i, _NTOK] + st[i, _PH]  # not a prompt chunk: it samples
        if async_sched and smp[q]:
            st[i, _PH] += 1
    return m, nr, whead, nwait, stalled


@compiled
def _schedule_running(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, hashes,  # type: ignore[no-untyped-def]
                      hoff, st, running, nr, wq, whead, nwait, req, num, limits, counters):
    """`Engine.schedule_running`: each running request in queue order, while budget is
    left, gets its next tokens and their slots, preempting from the END of the running
    queue while the pool is short. Returns (budget, m, nr, whead, nwait, preempted)."""
    budget, bs = limits[0], limits[2]
    preempted = False
    m = k = 0
    while k < nr and budget > 0:
        i = running[k]
        ph = st[i, _PH]
        if ph > 0 and st[i, _COMP] + 2 - ph >= st[i, _PROMPT] + st[i, _TARGET]:
            k += 1
            continue  # async: its last token is already in flight
        num_new = min(st[i, _NTOK] + ph - st[i, _COMP], budget)
        if num_new <= 0:
            k += 1
            continue
        total = st[i, _COMP] + num_new
        lost = False
        while not _take_blocks(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, st, i, total, bs):
            nr -= 1
            v = running[nr]
            whead, nwait = _preempt(nxt, prv, ref, bhash, cnt, blocks, boff, st, v, wq, whead, nwait, bs)
            counters[_O_PREEMPT] += 1
            preempted = True
            if v == i:
                lost = True
                break
        if lost:
            break
        _cache_upto(bhash, first_copy, cnext, cprev, blocks, boff, hashes, hoff, st, i, min(total, st[i, _NTOK]), bs)
        req[m] = i
        num[m] = num_new
        m += 1
        budget -= num_new
        k += 1
    return budget, m, nr, whead, nwait, preempted


@compiled
def _preempt(nxt, prv, ref, bhash, cnt, blocks, boff, st, v, wq, whead, nwait, bs):  # type: ignore[no-untyped-def]
    """`Engine.preempt` of v, already off the running queue: its blocks are freed and it
    goes to the FRONT of the waiting queue; its in-flight output arrives stale. Returns
    (whead, nwait)."""
    _release(nxt, prv, ref, bhash, cnt, blocks, boff, st, v, bs)
    st[v, _RUN] = 0
    st[v, _COMP] = 0
    st[v, _STALE] = st[v, _INFL]
    st[v, _PH] = 0
    whead = (whead - 1) % len(wq)
    wq[whead] = v
    return whead, nwait + 1


@compiled
def _schedule_waiting(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, hashes,  # type: ignore[no-untyped-def]
                      hoff, st, running, nr, wq, whead, nwait, passed, req, num, m, budget, limits, hits, scheduled):
    """`Engine.schedule_waiting`: waiting requests in queue order while fewer than
    max_num_seqs run and budget is left; one with stale output in flight is passed over,
    keeping its place. Returns (m, nr, whead, nwait, stalled)."""
    n = len(wq)
    max_num_seqs = limits[1]
    npassed = 0
    stalled = True
    while nwait > 0 and nr < max_num_seqs:
        if budget <= 0:
            stalled = False  # the next step has a new budget
            break
        i = wq[whead]
        if st[i, _STALE] > 0:
            passed[npassed] = i
            npassed += 1
            whead, nwait = (whead + 1) % n, nwait - 1
            stalled = False  # it becomes admissible once its output arrives
            continue
        hit = _admit(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, hashes, hoff, st, i, budget,
                     limits)
        if hit < 0:
            break  # the first that does not fit stops admission
        whead, nwait = (whead + 1) % n, nwait - 1
        running[nr] = i
        nr += 1
        st[i, _RUN] = 1
        st[i, _COMP] = hit
        if not scheduled[i]:  # vLLM's num_cached_tokens: the first scheduling's hit
            scheduled[i] = True
            hits[i] = hit
        req[m] = i
        num[m] = min(st[i, _NTOK] - hit, budget)
        budget -= num[m]
        m += 1
    for q in range(npassed - 1, -1, -1):
        whead = (whead - 1) % n
        wq[whead] = passed[q]
        nwait += 1
    return m, nr, whead, nwait, stalled


@compiled
def _seconds(coef, tokens, pairs, kv_read, longest):  # type: ignore[no-untyped-def]
    """advisor.sim.steptime.seconds_from_totals on the coefficients' array."""
    compute = coef[0] * tokens + coef[1] * pairs
    memory = coef[2] + coef[3] * (kv_read + tokens)
    return max(compute, memory) + coef[4] + longest / coef[5]


@compiled
def _step_seconds(st, req, num, smp, m, hits, coef, flat, async_sched, clock, first_at,  # type: ignore[no-untyped-def]
                  times):
    """`Engine.step_seconds` of the step in req/num/smp[:m], scheduled at `clock`: the clock
    at its end. Records the first tokens it samples there; adds to times (busy, prefill)."""
    tokens = pairs = kv_read = prefill = 0.0
    longest = 0
    for q in range(m):
        i = req[q]
        first = smp[q] and st[i, _NTOK] == st[i, _PROMPT] and st[i, _PH] == (1 if async_sched else 0)
        if first:
            longest = max(longest, st[i, _PROMPT] - hits[i])
        before = st[i, _COMP] - num[q]
        tokens += num[q]
        if num[q] == 1 and before >= st[i, _PROMPT]:
            pairs += before
        else:
            chunk_pairs = num[q] * (before + num[q] / 2)
            pairs += chunk_pairs
            prefill += coef[0] * num[q] + coef[1] * chunk_pairs
        kv_read += before
    if flat:
        seconds = _seconds(coef, 0.0, 0.0, 0.0, float(longest))
        prefill = longest / coef[5]
    else:
        seconds = _seconds(coef, tokens, pairs, kv_read, 0.0)
    times[0] += seconds
    times[1] += prefill
    clock += seconds
    for q in range(m):
        i = req[q]
        if smp[q] and st[i, _NTOK] == st[i, _PROMPT] and st[i, _PH] == (1 if async_sched else 0):
            first_at[i] = clock
    return clock


@compiled
def _process(bhash, first_copy, cnext, cprev, nxt, prv, ref, cnt, blocks, boff, hashes, hoff, st,  # type: ignore[no-untyped-def]
             running, nr, wq, whead, nwait, fl_req, fl_num, fl_smp, fl_cnt, fl_clock, qold, qlen, async_sched, bs,
             last_finish, finish_at):
    """`Engine.update_from_output` of the oldest scheduled step. Returns (last_finish, nr,
    whead, nwait, qold, qlen, freed): freed when a request finished."""
    s = qold
    freed = False
    for q in range(fl_cnt[s]):
        i = fl_req[s, q]
        st[i, _INFL] -= fl_num[s, q]
        stale = st[i, _STALE] > 0
        if stale:
            st[i, _STALE] -= fl_num[s, q]
        if st[i, _FIN] or not fl_smp[s, q]:
            continue
        was_running = not stale and st[i, _RUN] == 1
        st[i, _NTOK] += 1
        if async_sched and not stale:
            st[i, _PH] -= 1
        if async_sched and was_running:
            _cache_upto(bhash, first_copy, cnext, cprev, blocks, boff, hashes, hoff, st, i, st[i, _COMP] - st[i, _PH],
                        bs)
        if st[i, _NTOK] - st[i, _PROMPT] >= st[i, _TARGET]:
            st[i, _FIN] = 1
            finish_at[i] = fl_clock[s]
            freed = True
            last_finish = max(last_finish, fl_clock[s])
            if was_running:
                nr = _remove(running, nr, i)
                st[i, _RUN] = 0
                _release(nxt, prv, ref, bhash, cnt, blocks, boff, st, i, bs)
            else:
                whead, nwait = _remove_waiting(wq, whead, nwait, i)
    return last_finish, nr, whead, nwait, (qold + 1) % 2, qlen - 1, freed


@compiled
def _remove(items, count, x):  # type: ignore[no-untyped-def]
    """Drop x from items[:count], keeping the order; the new count."""
    q = 0
    while items[q] != x:
        q += 1
    for r in range(q, count - 1):
        items[r] = items[r + 1]
    return count - 1


@compiled
def _remove_waiting(wq, whead, nwait, x):  # type: ignore[no-untyped-def]
    """Drop x from the waiting ring buffer, keeping the order. Returns (whead, nwait)."""
    n = len(wq)
    q = 0
    while wq[(whead + q) % n] != x:
        q += 1
    for r in range(q, nwait - 1):
        wq[(whead + r) % n] = wq[(whead + r + 1) % n]
    return whead, nwait - 1


@compiled
def _quiet_steps(arrivals, order, counters, st, running, nr, clock, coef, async_sched, bs, times):  # type: ignore[no-untyped-def]
    """How many of the next steps are quiet (module docstring), 0 if the next one is not:
    every running request must be a steady decoder (sync: all its known tokens but the
    last computed; async: one sampled token in flight, the rest computed), and within its
    current block and short of its last token for that many steps. Counts them while no
    arrival is due by the clock, each priced as a step decoding every running request (their
    contexts one longer each step). Returns (steps, clock after them)."""
    k = 1 << 62
    contexts = 0.0
    for q in range(nr):
        i = running[q]
        c, t = st[i, _COMP], st[i, _NTOK]
        contexts += c
        if async_sched:
            if st[i, _PH] != 1 or c != t:
                return 0, clock
            left = st[i, _PROMPT] + st[i, _TARGET] - t - 1
        else:
            if c != t - 1 or t == st[i, _PROMPT]:  # (the step that samples its first token is not quiet)
                return 0, clock
            left = st[i, _TARGET] - (t - st[i, _PROMPT]) - 1
        k = min(k, (-c) % bs, left)
        if k <= 0:
            return 0, clock
    n = st.shape[0]
    j = counters[_O_J]
    steps = 0
    while steps < k and (j >= n or arrivals[order[j]] > clock):
        seconds = _seconds(coef, float(nr), contexts, contexts, 0.0)
        times[0] += seconds
        clock += seconds
        contexts += nr
        steps += 1
    return steps, clock


@compiled
def _jump(bhash, first_copy, cnext, cprev, blocks, boff, hashes, hoff, st, running, nr, k, async_sched,  # type: ignore[no-untyped-def]
          bs, fl_req, fl_num, fl_smp, fl_cnt, fl_clock, qold, clock):
    """Apply k quiet steps: each running request computes and samples k tokens and the
    blocks they fill are cached; async: the step in flight becomes the last of them."""
    for q in range(nr):
        i = running[q]
        st[i, _COMP] += k
        st[i, _NTOK] += k
        st[i, _SLOTS] = max(st[i, _SLOTS], st[i, _COMP])
        _cache_upto(bhash, first_copy, cnext, cprev, blocks, boff, hashes, hoff, st, i,
                    st[i, _COMP] - 1 if async_sched else st[i, _COMP], bs)
        if async_sched:
            st[i, _INFL] = 1
            fl_req[qold, q] = i
            fl_num[qold, q] = 1
            fl_smp[qold, q] = True
    if async_sched:
        fl_cnt[qold] = nr
        fl_clock[qold] = clock


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
    flat = np.empty(int(hoff[-1]), np.int64)
    req = np.repeat(np.arange(len(prompt), dtype=np.int64), pfull)
    k = np.arange(len(req), dtype=np.int64) - np.repeat(np.cumsum(pfull) - pfull, pfull)
    flat[hoff[req] + k] = trace.ids[trace.offsets[req] + k]
    req = np.repeat(np.arange(len(prompt), dtype=np.int64), extra)
    k = np.arange(len(req), dtype=np.int64) - np.repeat(np.cumsum(extra) - extra, extra)
    flat[hoff[req] + pfull[req] + k] = decode_ids_from + np.arange(len(req), dtype=np.int64)
    boff = np.zeros(len(prompt) + 1, np.int64)
    np.cumsum(-(-end // bs), out=boff[1:])
    return flat, hoff, boff


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
    n = len(n_tokens)
    assert max_num_seqs >= 1 and num_blocks >= 1
    assert max_num_batched_tokens is None or max_num_batched_tokens >= max_num_seqs, "vLLM's own rule"
    bs = trace.block_size
    ids, hoff, boff = prepared or request_hashes(trace, n_tokens, output_tokens, trace.num_ids)
    prompt = np.asarray(n_tokens, np.int64)
    target = np.maximum(np.asarray(output_tokens, np.int64), 1)
    arrivals = np.asarray(arrivals_s, np.float64)
    order = np.argsort(arrivals, kind="stable").astype(np.int64)
    hits = np.zeros(n, np.int64)
    scheduled = np.zeros(n, np.bool_)
    first_at, finish_at = np.full(n, np.nan), np.full(n, np.nan)
    out, times = np.zeros(6, np.int64), np.zeros(2, np.float64)
    # prompt ids < trace.num_ids, then one id per decode block (request_hashes)
    num_ids = max(trace.num_ids + len(ids) - int((prompt // bs).sum()), 1)
    budget = int(max_num_batched_tokens) if max_num_batched_tokens is not None else 1 << 62
    limits = np.array([budget, int(max_num_seqs), bs, int(drops_last_hit_block(speculative)), int(clock.flat)],
                      np.int64)
    coef = np.asarray(clock.coefficients, np.float64)
    skip = np.zeros(n, np.int64) if skip_prefix_cache is None else np.asarray(skip_prefix_cache, np.int64)
    makespan = _run(ids, hoff, boff, prompt, target, skip, arrivals, order, int(num_blocks), num_ids, limits, coef,
                    skip_quiet_steps, async_scheduling, hits, scheduled, out, first_at, finish_at, times)
    return ConcurrentResult(
        hit_tokens=hits, scheduled=scheduled, evictions=int(out[0]), peak_blocks_in_use=int(out[1]),
        preemptions=int(out[2]), refused=int(out[3]), makespan_s=float(makespan), steps=int(out[4]),
        blocks_used=int(out[5]), ttft_s=first_at - arrivals, e2e_s=finish_at - arrivals, busy_s=float(times[0]),
        prefill_s=float(times[1]),
    )
