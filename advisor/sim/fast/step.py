"""One iteration of concurrent mode's engine on arrays: `advisor.sim.events.Engine`'s methods, compiled.

Inputs and outputs: int64/float64/bool numpy arrays changed in place, laid out as
advisor.sim.fast.events describes (the block pool, `st`'s per-request counters, the running
queue, the waiting ring buffer, the buffers of scheduled steps, the engine's counters). Each
function is the Engine method of the same name (`_schedule` is `Engine.schedule`, ...) on
those arrays; advisor.sim.fast.events runs them in `Engine.advance`'s loop, and
tests/test_fastevents.py keeps that loop equal to the reference, field for field.

The quiet-step jump (`_quiet_steps`, `_jump`) has no reference method: it applies in one go
the steps in which nothing but one decode token per running request happens (the module
docstring of advisor.sim.fast.events says when that holds).
"""

from __future__ import annotations

from advisor.compiled import compiled
from advisor.sim.fast.cache import _admit_flagged, _allocate, _free
from advisor.sim.fast.lists import ring_link

# cnt: the cache's counters, shared with advisor.sim.fast.cache's kernels (which use the first two).
# _NEED: the most blocks any admission or allocation check asked the pool for, counting those in use
# (a pool of fewer fails that check; advisor.sim.fast.events' `run_never_evicting` reads it)
_EVICTIONS, _FREE, _IN_USE, _PEAK, _MAX_BLOCK, _NEED, _CNT_N = 0, 1, 2, 3, 4, 5, 6
# st[i]: request i's counters (events.Engine's names)
_PROMPT, _TARGET, _NTOK, _COMP, _PH, _INFL, _STALE, _SLOTS, _NCACHED, _FIN, _RUN, _SKIP, _NF = range(13)
# counters: the engine's integers. The run's counts (preemptions, refused, steps), then where it
# stands: requests of `order` taken in as arrived (J) and handed over (HANDED), the running
# count, the waiting ring's head and length, the steps in flight (count, oldest buffer), whether
# admission stalled in the last step, whether a request was ever handed over
(_O_PREEMPT, _O_REFUSED, _O_STEPS, _O_J, _O_HANDED, _O_NR, _O_WHEAD, _O_NWAIT, _O_QLEN, _O_QOLD, _O_STALLED,
 _O_STARTED, _O_N) = range(13)
# times: the engine's floats. Busy and prefill seconds, then the clock, the last finish, the first arrival
_T_BUSY, _T_PREFILL, _T_CLOCK, _T_LAST, _T_START, _T_N = range(6)


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
    cnt[_NEED] = max(cnt[_NEED], cnt[_IN_USE] + num_new)
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
    if k < 0:  # in_use: the blocks its check asked for
        cnt[_NEED] = max(cnt[_NEED], cnt[_IN_USE] + in_use)
        return -1
    upto = min(k * bs + budget, total)
    taken = (upto + bs - 1) // bs
    for x in range(taken):
        cnt[_MAX_BLOCK] = max(cnt[_MAX_BLOCK], blk[x])
    cnt[_IN_USE] += in_use
    cnt[_PEAK] = max(cnt[_PEAK], cnt[_IN_USE])
    # its check asked for its whole prompt (a chunked prefill takes the rest later)
    cnt[_NEED] = max(cnt[_NEED], cnt[_IN_USE] + (total + bs - 1) // bs - taken)
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
def _add_arrivals(arrivals, order, boff, num_blocks, clock, st, wq, whead, nwait, counters):  # type: ignore[no-untyped-def]
    """`Engine.add_arrivals`: the requests handed over (order[j:handed]) that arrived by the clock
    join the waiting queue's tail; one whose end cannot fit the whole pool is refused. Returns
    (whead, nwait)."""
    n = len(wq)
    j = counters[_O_J]
    while j < counters[_O_HANDED] and arrivals[order[j]] <= clock:
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
def _quiet_steps(arrivals, order, counters, st, running, nr, clock, coef, async_sched, bs, times, until):  # type: ignore[no-untyped-def]
    """How many of the next steps are quiet (module docstring), 0 if the next one is not:
    every running request must be a steady decoder (sync: all its known tokens but the
    last computed; async: one sampled token in flight, the rest computed), and within its
    current block and short of its last token for that many steps. Counts them while no
    arrival handed over is due by the clock and the clock is before `until` (a step starting
    there waits for the requests still being routed), each priced as a step decoding every
    running request (their contexts one longer each step). Returns (steps, clock after them)."""
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
    j, handed = counters[_O_J], counters[_O_HANDED]
    steps = 0
    while steps < k and clock < until and (j >= handed or arrivals[order[j]] > clock):
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
