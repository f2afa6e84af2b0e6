"""Concurrent mode, compiled: `advisor.sim.events.run_concurrent`'s loop in one kernel.

Inputs: a `BlockTrace` (advisor.sim.fast.trace) (each prompt's full blocks as dense ids), per-request
prompt and output lengths (`n_tokens`, `output_tokens`), arrival times, a
`CostModel` (calibrated here as run_concurrent does), `max_num_seqs`,
`max_num_batched_tokens` and a pool size in usable blocks. Output: the same
`events.ConcurrentResult` as `events.run_concurrent` over an
`advisor.sim.cache.PrefixCache` (tests/test_fastevents.py checks every field, clock and
step count included, on generated workloads under preemption and chunking), plus
`blocks_used`, the highest block id ever taken + 1 (what an infinite pool's run
needs, see `advisor.sim.grid.ceiling_blocks`).

The loop, its order of operations and its clock are run_concurrent's (read its
docstring: it is the readable reference; this is that code on arrays, and its steps
are helpers named as there and in vLLM's scheduler). The cache is advisor.sim.fast.cache's: vLLM's
free queue and per-hash rings (advisor.sim.fast.lists), driven by advisor.sim.fast.cache's compiled
`_admit` / `_allocate` / `_free` (`_grow` caches full blocks itself). Queues on
arrays: the waiting queue is a ring buffer (preempted requests go to its front), the
running queue a doubly linked list over requests (a sentinel at index n: its `prev`
is the queue's end, the preemption victim), the eventful-step heap holds
`(step, seq, request, epoch)` in four arrays and is compacted to its live entries
when full. Decode blocks get hash ids of their own after the prompts' (`request_hashes`),
as `run_concurrent` gives them tuple hashes nobody else has.

The split into helpers follows what numba makes a call cost (each measured on this
kernel while splitting it; keep to it when editing):
- no call in the loop passes more than 30 arguments: past that Python builds a tuple
  for the call, and numba increfs and decrefs every array in it, on every step (5x);
- a helper that takes a view (a slice) of an array pays an incref and a decref for
  every array argument it has, on every call; so the loop, which runs once, takes the
  views of a request's blocks, and only the rare `_preempt` takes one itself;
- a helper LLVM does not inline costs a few percent per step (its arrays are passed
  field by field): the per-step helpers stay small, and step 1 stays in the loop.
"""

from __future__ import annotations

import numpy as np

from advisor.sim.events import ConcurrentResult, CostModel
from advisor.sim.fast.cache import _admit, _allocate, _free
from advisor.sim.fast.lists import compiled, new_free_queue, new_rings, ring_link
from advisor.sim.fast.trace import BlockTrace

# cnt: the cache's counters, shared with advisor.sim.fast.cache's kernels (which use the first two)
_EVICTIONS, _FREE, _IN_USE, _PEAK, _MAX_BLOCK = 0, 1, 2, 3, 4


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
def _grow(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, hashes, hoff,  # type: ignore[no-untyped-def]
          slots, i, total, bs):
    """`cache.PrefixCache.grow` for request i: slots for `total` tokens; newly full blocks
    cached. False, and nothing taken, when the pool has too few free blocks."""
    held = (slots[i] + bs - 1) // bs
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
    for k in range(slots[i] // bs, total // bs):  # advisor.sim.fast.cache's _cache_blocks, without views (module docstring)
        b = blocks[boff[i] + k]
        bhash[b] = hashes[hoff[i] + k]
        ring_link(first_copy, cnext, cprev, bhash[b], b)
    slots[i] = max(slots[i], total)
    return True


@compiled
def _admit_request(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blk, hsh, slots,  # type: ignore[no-untyped-def]
                   i, total, bs):
    """`cache.PrefixCache.admit` for request i (its blocks `blk`, their hash ids `hsh`) and
    its first `total` tokens: its hit blocks, or -1, and nothing taken, when the whole
    sequence does not fit the free blocks (vLLM's gate)."""
    nreq = (total + bs - 1) // bs
    if nreq > len(ref):
        return -1
    k, in_use = _admit(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, hsh, total, bs, blk)
    if k < 0:
        return -1
    for x in range(nreq):
        cnt[_MAX_BLOCK] = max(cnt[_MAX_BLOCK], blk[x])
    slots[i] = total
    cnt[_IN_USE] += in_use
    cnt[_PEAK] = max(cnt[_PEAK], cnt[_IN_USE])
    return k


@compiled
def _heap_push(hs, hq, hi, he, size, step, seq, i, ep):  # type: ignore[no-untyped-def]
    pos = size
    while pos > 0:
        parent = (pos - 1) // 2
        if hs[parent] < step or (hs[parent] == step and hq[parent] < seq):
            break
        hs[pos], hq[pos], hi[pos], he[pos] = hs[parent], hq[parent], hi[parent], he[parent]
        pos = parent
    hs[pos], hq[pos], hi[pos], he[pos] = step, seq, i, ep
    return size + 1


@compiled
def _heap_pop(hs, hq, hi, he, size):  # type: ignore[no-untyped-def]
    size -= 1
    s, q, x, e = hs[size], hq[size], hi[size], he[size]
    pos = 0
    while True:
        c = 2 * pos + 1
        if c >= size:
            break
        if c + 1 < size and (hs[c + 1] < hs[c] or (hs[c + 1] == hs[c] and hq[c + 1] < hq[c])):
            c += 1
        if s < hs[c] or (s == hs[c] and q < hq[c]):
            break
        hs[pos], hq[pos], hi[pos], he[pos] = hs[c], hq[c], hi[c], he[c]
        pos = c
    if size > 0:
        hs[pos], hq[pos], hi[pos], he[pos] = s, q, x, e
    return size


@compiled
def _heap_add(hs, hq, hi, he, size, step, seq, i, epoch):  # type: ignore[no-untyped-def]
    """Push `(step, seq, i, epoch[i])`; when full, first keep only live entries (epoch current)."""
    if size == len(hs):
        old_s, old_q, old_i, old_e = hs.copy(), hq.copy(), hi.copy(), he.copy()
        size = 0
        for e in range(len(old_s)):
            if old_e[e] == epoch[old_i[e]]:
                size = _heap_push(hs, hq, hi, he, size, old_s[e], old_q[e], old_i[e], old_e[e])
    return _heap_push(hs, hq, hi, he, size, step, seq, i, epoch[i])


@compiled
def _run(hashes, hoff, boff, prompt, target, arrivals, order, num_blocks, num_ids, bs,  # type: ignore[no-untyped-def]
         max_num_seqs, token_budget, step_s, prefill_tps, skip_quiet, hits, scheduled, out):
    """The engine's state on arrays, then `_engine_loop` over it. Fills hits/scheduled and
    `out` (evictions, peak, preemptions, refused, steps, blocks used); returns the makespan."""
    n = len(prompt)
    nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt = _new_pool(num_blocks, num_ids)
    # request i holds KV slots for slots[i] tokens: ceil(slots[i] / bs) blocks from
    # blocks[boff[i]], of which the first slots[i] // bs are full, hashed and cached
    blocks, slots = np.zeros(boff[n], np.int64), np.zeros(n, np.int64)
    # per request, valid at the start of step anchor[i] (run_concurrent's names)
    computed, outs, anchor = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    rank, epoch = np.zeros(n, np.int64), np.zeros(n, np.int64)
    is_running, is_prefilling = np.zeros(n, np.bool_), np.zeros(n, np.bool_)
    rnext, rprev = np.full(n + 1, n, np.int64), np.full(n + 1, n, np.int64)  # the running queue; sentinel n
    prefilling = np.empty(n, np.int64)  # unordered (served by rank)
    wq = np.empty(max(n, 1), np.int64)  # the waiting queue, a ring buffer
    cap = 2 * n + 16
    hs, hq, hi, he = np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.int64)
    # one step's lists: due requests, prefill chunks (request, tokens), decodes, finishes
    due, in_due = np.empty(n, np.int64), np.zeros(n, np.bool_)
    chunk_req, chunk_len = np.empty(n, np.int64), np.empty(n, np.int64)
    decoded, finished = np.empty(n, np.int64), np.empty(n, np.int64)
    makespan, preemptions, refused, steps = _engine_loop(
        hashes, hoff, boff, prompt, target, arrivals, order, bs, max_num_seqs, token_budget, step_s, prefill_tps,
        skip_quiet, hits, scheduled, nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, slots, computed,
        outs, anchor, rank, epoch, is_running, is_prefilling, rnext, rprev, prefilling, wq, hs, hq, hi, he, due,
        in_due, chunk_req, chunk_len, decoded, finished)
    out[:] = cnt[_EVICTIONS], cnt[_PEAK], preemptions, refused, steps, cnt[_MAX_BLOCK] + 1
    return makespan


@compiled
def _engine_loop(hashes, hoff, boff, prompt, target, arrivals, order, bs, max_num_seqs,  # type: ignore[no-untyped-def]
                 token_budget, step_s, prefill_tps, skip_quiet, hits, scheduled, nxt, prv, ref, bhash, first_copy,
                 cnext, cprev, cnt, blocks, slots, computed, outs, anchor, rank, epoch, is_running, is_prefilling,
                 rnext, rprev, prefilling, wq, hs, hq, hi, he, due, in_due, chunk_req, chunk_len, decoded, finished):
    """run_concurrent's loop, one iteration per schedule() + model step, steps 1-4 as in its
    docstring. Returns (makespan, preemptions, refused, steps)."""
    n = len(prompt)
    nrunning = npf = whead = nwait = hsize = seq = refused = preemptions = step = j = 0
    clock = last_finish = t0 = arrivals[order[0]] if n > 0 else 0.0
    stalled = False  # admission stopped last step for a reason no quiet step can change
    while j < n or nrunning > 0 or nwait > 0:
        arrived = False
        if nrunning == nwait == 0 or (j < n and arrivals[order[j]] <= clock):  # 1. arrivals
            clock, j, nwait, refused, arrived = _add_arrivals(arrivals, order, prompt, boff, len(ref), clock, j, wq,
                                                              whead, nwait, refused, nrunning)
        if nrunning == 0 and nwait == 0:
            continue
        if skip_quiet and stalled and not arrived and npf == 0 and nrunning > 0:  # quiet steps in one jump
            hsize, clock, k = _skip_quiet_steps(hs, hq, hi, he, hsize, epoch, arrivals, order, j, clock, step, step_s)
            step += k
            if k > 0:
                continue
        m, hsize = _due_requests(prefilling, npf, hs, hq, hi, he, hsize, epoch, rank, step, due, in_due)
        budget = token_budget - (nrunning - npf)  # decode tokens first (run_concurrent's docstring)
        q = nch = nd = 0
        stalled = True  # unless a preemption or the budget says otherwise
        while q < m:  # 2. running requests; q < m: the pool is short for due[q]
            q, nch, nd, budget = _schedule_running(
                nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, hashes, hoff, slots, step, bs, due,
                q, m, budget, prompt, computed, outs, anchor, is_running, is_prefilling, chunk_req, chunk_len, nch,
                decoded, nd)
            if q < m:
                npf, whead, nwait = _preempt(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, hashes,
                                             hoff, slots, bs, step, computed, outs, anchor, rnext, rprev, is_running,
                                             is_prefilling, prefilling, npf, epoch, wq, whead, nwait)
                nrunning, preemptions, stalled = nrunning - 1, preemptions + 1, False
                if not is_running[due[q]]:
                    break  # it was the one preempted
        while stalled and nwait > 0 and nrunning < max_num_seqs:  # 3. waiting requests, in queue order
            if budget <= 0:
                stalled = False  # the next step has a new budget
                break
            i = wq[whead]
            k = _admit_request(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks[boff[i]:boff[i + 1]],
                               hashes[hoff[i]:hoff[i + 1]], slots, i, prompt[i] + outs[i], bs)
            if k < 0:
                break  # the first that does not fit stops admission
            whead, nwait, nrunning = (whead + 1) % n, nwait - 1, nrunning + 1
            seq, npf, nch, budget = _start_running(i, k * bs, prompt, outs, seq, rank, computed, hits, scheduled,
                                                   rnext, rprev, is_running, is_prefilling, prefilling, npf,
                                                   chunk_req, chunk_len, nch, budget)
        step += 1  # 4. the step runs
        npf, nrunning, hsize, seq, prefill_s, nfin = _update_from_output(
            bs, step, prefill_tps, prompt, target, hits, computed, outs, anchor, epoch, is_prefilling, prefilling, npf,
            nrunning, hs, hq, hi, he, hsize, seq, chunk_req, chunk_len, nch, decoded, nd, finished)
        for q in range(nfin):  # in finishing order: the free queue's order decides later evictions
            i = finished[q]
            npf = _finish(nxt, prv, ref, bhash, cnt, blocks[boff[i]:boff[i + 1]], slots, bs, i, rnext, rprev,
                          is_running, is_prefilling, prefilling, npf, epoch)
        clock += step_s + prefill_s
        if nfin > 0:
            stalled = False
            last_finish = clock
    return last_finish - t0, preemptions, refused, step


@compiled
def _add_arrivals(arrivals, order, prompt, boff, num_blocks, clock, j, wq, whead, nwait,  # type: ignore[no-untyped-def]
                  refused, nrunning):
    """Step 1: an idle engine's clock jumps to the next arrival; requests order[j:] that
    arrived by the clock join the waiting queue's tail, but one whose end cannot fit the
    whole pool is refused. Returns (clock, j, nwait, refused, arrived)."""
    n = len(prompt)
    if nrunning == 0 and nwait == 0:
        clock = max(clock, arrivals[order[j]])
    arrived = False
    while j < n and arrivals[order[j]] <= clock:
        i = order[j]
        j += 1
        if prompt[i] <= 0:
            continue  # refused at tokenization: never runs, not counted
        if boff[i + 1] - boff[i] > num_blocks:
            refused += 1
            continue
        wq[(whead + nwait) % n] = i
        nwait += 1
        arrived = True
    return clock, j, nwait, refused, arrived


@compiled
def _skip_quiet_steps(hs, hq, hi, he, hsize, epoch, arrivals, order, j, clock, step, step_s):  # type: ignore[no-untyped-def]
    """Quiet steps up to the heap's next live eventful step, stopping early for an arrival
    due by the clock. Returns (hsize, clock, steps taken)."""
    while hsize > 0 and he[0] != epoch[hi[0]]:
        hsize = _heap_pop(hs, hq, hi, he, hsize)
    quiet = hs[0] - step if hsize > 0 else 0
    k = 0
    while k < quiet and (j >= len(order) or arrivals[order[j]] > clock):
        clock += step_s
        k += 1
    return hsize, clock, k


@compiled
def _due_requests(prefilling, npf, hs, hq, hi, he, hsize, epoch, rank, step, due,  # type: ignore[no-untyped-def]
                  in_due):
    """The running requests with work in this step, into due[:m] in running-queue order:
    every prefilling one, and each decoding one whose eventful step has come (its live
    heap entry; the others decode inside their block). Returns (m, hsize)."""
    m = 0
    for q in range(npf):
        due[m] = prefilling[q]
        in_due[prefilling[q]] = True
        m += 1
    while hsize > 0 and hs[0] <= step:
        i, ep = hi[0], he[0]
        hsize = _heap_pop(hs, hq, hi, he, hsize)
        if ep == epoch[i] and not in_due[i]:
            due[m] = i
            in_due[i] = True
            m += 1
    for q in range(m):
        in_due[due[q]] = False
    _sort_by_rank(due, m, rank)
    return m, hsize


@compiled
def _materialize(i, step, computed, outs, anchor):  # type: ignore[no-untyped-def]
    """Decoding request i computed one token and sampled one in each step since anchor[i]."""
    k = step - anchor[i]
    computed[i] += k
    outs[i] += k
    anchor[i] = step


@compiled
def _schedule_running(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff,  # type: ignore[no-untyped-def]
                      hashes, hoff, slots, step, bs, due, q, m, budget, prompt, computed, outs, anchor, is_running,
                      is_prefilling, chunk_req, chunk_len, nch, decoded, nd):
    """Step 2 from due[q] on: each due request still running gets its next tokens (the
    next prefill chunk within `budget`, or one decode token) and the slots for them.
    Chunks go to chunk_req/chunk_len[:nch], decodes to decoded[:nd]. Stops at the first
    request the pool is short for, taking nothing for it: the caller preempts and calls
    again from there. Returns (q, nch, nd, budget), q == m when every one was served."""
    for k in range(q, m):
        i = due[k]
        if not is_running[i]:
            continue  # preempted earlier in this step
        if is_prefilling[i]:
            num_new = min(prompt[i] + outs[i] - computed[i], budget)
            if num_new <= 0:
                continue  # no budget left for its next chunk in this step
        else:
            _materialize(i, step, computed, outs, anchor)
            num_new = 1
        if not _grow(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, hashes, hoff, slots, i,
                     computed[i] + num_new, bs):
            return k, nch, nd, budget
        if is_prefilling[i]:
            chunk_req[nch] = i
            chunk_len[nch] = num_new
            nch += 1
            budget -= num_new
        else:
            decoded[nd] = i
            nd += 1
    return m, nch, nd, budget


@compiled
def _preempt(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, hashes, hoff,  # type: ignore[no-untyped-def]
             slots, bs, step, computed, outs, anchor, rnext, rprev, is_running, is_prefilling, prefilling, npf,
             epoch, wq, whead, nwait):
    """Preempt the request at the END of the running queue (recompute): it leaves the
    running queue, its blocks are freed and it goes to the FRONT of the waiting queue.
    Returns (npf, whead, nwait)."""
    v = rprev[len(computed)]
    if not is_prefilling[v]:  # blocks it filled while decoding are cached before they are freed
        _materialize(v, step, computed, outs, anchor)
        _grow(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, boff, hashes, hoff, slots, v, computed[v], bs)
    npf = _finish(nxt, prv, ref, bhash, cnt, blocks[boff[v]:boff[v + 1]], slots, bs, v, rnext, rprev, is_running,
                  is_prefilling, prefilling, npf, epoch)
    computed[v] = 0
    whead = (whead - 1) % len(computed)
    wq[whead] = v
    return npf, whead, nwait + 1


@compiled
def _start_running(i, hit, prompt, outs, seq, rank, computed, hits, scheduled, rnext,  # type: ignore[no-untyped-def]
                   rprev, is_running, is_prefilling, prefilling, npf, chunk_req, chunk_len, nch, budget):
    """Step 3 for request i, just admitted with `hit` tokens cached: it joins the END of the
    running queue, prefilling, and its first chunk is scheduled within `budget` (a resumed
    request recomputes its output too). A first scheduling records its hit (`hits`, vLLM's
    num_cached_tokens). Returns (seq, npf, nch, budget)."""
    n = len(computed)
    last = rprev[n]
    rnext[last] = i
    rprev[i] = last
    rnext[i] = n
    rprev[n] = i
    is_running[i] = True
    rank[i] = seq
    is_prefilling[i] = True
    prefilling[npf] = i
    computed[i] = hit
    if not scheduled[i]:
        scheduled[i] = True
        hits[i] = hit
    chunk_req[nch] = i
    chunk_len[nch] = min(prompt[i] + outs[i] - hit, budget)
    return seq + 1, npf + 1, nch + 1, budget - chunk_len[nch]


@compiled
def _update_from_output(bs, step, prefill_tps, prompt, target, hits, computed, outs, anchor,  # type: ignore[no-untyped-def]
                        epoch, is_prefilling, prefilling, npf, nrunning, hs, hq, hi, he, hsize, seq, chunk_req,
                        chunk_len, nch, decoded, nd, finished):
    """Step 4, after step `step` ran, chunks then decodes: each request whose known tokens
    are all computed samples one token. One with all its output goes to finished[:nfin]
    (`_finish`, not counted in nrunning); the others get their next eventful step on the
    heap (a new block, or their last token). Returns (npf, nrunning, hsize, seq, prefill_s,
    nfin): prefill_s, the longest uncached prefill that sampled its first token in this step."""
    prefill_s = 0.0
    nfin = 0
    for q in range(nch + nd):
        if q < nch:
            i = chunk_req[q]
            computed[i] += chunk_len[q]
            if computed[i] < prompt[i] + outs[i]:
                continue  # a chunk of the prompt: nothing sampled yet
            is_prefilling[i] = False
            npf = _remove(prefilling, npf, i)
            if outs[i] == 0:
                prefill_s = max(prefill_s, (prompt[i] - hits[i]) / prefill_tps)
        else:
            i = decoded[q - nch]
            computed[i] += 1
        outs[i] += 1
        anchor[i] = step
        if outs[i] < target[i]:
            quiet = min((bs - computed[i] % bs) % bs, target[i] - outs[i] - 1)
            hsize = _heap_add(hs, hq, hi, he, hsize, step + quiet, seq, i, epoch)
            seq += 1
        else:
            finished[nfin] = i
            nfin += 1
    return npf, nrunning - nfin, hsize, seq, prefill_s, nfin


@compiled
def _finish(nxt, prv, ref, bhash, cnt, blk, slots, bs, i, rnext, rprev, is_running,  # type: ignore[no-untyped-def]
            is_prefilling, prefilling, npf, epoch):
    """Request i (its blocks `blk`), finished or preempted, leaves the running queue and
    frees its blocks, tail first (`cache.PrefixCache.free`). Returns npf."""
    npf = _leave(i, rnext, rprev, is_running, is_prefilling, prefilling, npf, epoch)
    cnt[_IN_USE] -= _free(nxt, prv, ref, bhash, cnt, blk, (slots[i] + bs - 1) // bs)
    slots[i] = 0
    return npf


@compiled
def _sort_by_rank(items, count, rank):  # type: ignore[no-untyped-def]
    """Sort items[:count] by rank in place (ranks are distinct; usually a handful of items)."""
    if count > 32:
        items[:count] = items[:count][np.argsort(rank[items[:count]])]
        return
    for a in range(1, count):
        x = items[a]
        b = a - 1
        while b >= 0 and rank[items[b]] > rank[x]:
            items[b + 1] = items[b]
            b -= 1
        items[b + 1] = x


@compiled
def _remove(items, count, x):  # type: ignore[no-untyped-def]
    """Drop x from the unordered list items[:count]; the new count."""
    for q in range(count):
        if items[q] == x:
            items[q] = items[count - 1]
            return count - 1
    return count


@compiled
def _leave(i, rnext, rprev, is_running, is_prefilling, prefilling, npf, epoch):  # type: ignore[no-untyped-def]
    """Request i leaves the running queue (finished or preempted); its heap entries go stale."""
    rnext[rprev[i]] = rnext[i]
    rprev[rnext[i]] = rprev[i]
    is_running[i] = False
    if is_prefilling[i]:
        is_prefilling[i] = False
        npf = _remove(prefilling, npf, i)
    epoch[i] += 1
    return npf


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
    cost: CostModel,
    max_num_seqs: int,
    latency_s: np.ndarray | None = None,
    ttft_s: np.ndarray | None = None,
    *,
    max_num_batched_tokens: int | None = None,
    skip_quiet_steps: bool = True,
    prepared: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> ConcurrentResult:
    """`events.run_concurrent` over `num_blocks` usable blocks, compiled (module docstring).

    Arguments as run_concurrent's, with the cache given as a trace and a pool size;
    decode blocks get ids from `trace.num_ids` on. `prepared`: `request_hashes(...)`
    for this trace and these lengths, to reuse it across pool sizes.
    """
    n = len(n_tokens)
    assert max_num_seqs >= 1 and num_blocks >= 1
    assert max_num_batched_tokens is None or max_num_batched_tokens >= 1
    bs = trace.block_size
    cost = cost.calibrated(n_tokens, output_tokens, latency_s, ttft_s)
    flat, hoff, boff = prepared or request_hashes(trace, n_tokens, output_tokens, trace.num_ids)
    prompt = np.asarray(n_tokens, np.int64)
    target = np.maximum(np.asarray(output_tokens, np.int64), 1)
    arrivals = np.asarray(arrivals_s, np.float64)
    order = np.argsort(arrivals, kind="stable").astype(np.int64)
    hits = np.zeros(n, np.int64)
    scheduled = np.zeros(n, np.bool_)
    out = np.zeros(6, np.int64)
    # prompt ids < trace.num_ids, then one id per decode block (request_hashes)
    num_ids = max(trace.num_ids + len(flat) - int((prompt // bs).sum()), 1)
    makespan = _run(flat, hoff, boff, prompt, target, arrivals, order, int(num_blocks), num_ids, bs, int(max_num_seqs),
                    int(max_num_batched_tokens) if max_num_batched_tokens is not None else 1 << 62,
                    1.0 / cost.decode_tps, float(cost.prefill_tps), skip_quiet_steps, hits, scheduled, out)
    return ConcurrentResult(
        hit_tokens=hits, scheduled=scheduled, evictions=int(out[0]), peak_blocks_in_use=int(out[1]),
        preemptions=int(out[2]), refused=int(out[3]), makespan_s=float(makespan), steps=int(out[4]),
        blocks_used=int(out[5]),
    )
