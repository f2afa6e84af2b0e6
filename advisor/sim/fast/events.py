"""Concurrent mode, compiled: `advisor.events.run_concurrent`'s loop in one kernel.

Inputs: a `fastsim.BlockTrace` (each prompt's full blocks as dense ids), per-request
prompt and output lengths (`n_tokens`, `output_tokens`), arrival times, a
`CostModel` (calibrated here as run_concurrent does), `max_num_seqs`,
`max_num_batched_tokens` and a pool size in usable blocks. Output: the same
`events.ConcurrentResult` as `events.run_concurrent` over an
`advisor.cache.PrefixCache` (tests/test_fastevents.py checks every field, clock and
step count included, on generated workloads under preemption and chunking), plus
`blocks_used`, the highest block id ever taken + 1 (what an infinite pool's run
needs, see `advisor.simulate.ceiling_blocks`).

The loop, its order of operations and its clock are run_concurrent's (read its
docstring: it is the readable reference; this is that code on arrays). The cache is
fastcache's: vLLM's free queue and per-hash rings (advisor.fastlists), driven by
fastcache's compiled `_admit` / `_allocate` / `_cache_blocks` / `_free`. Queues on
arrays: the waiting queue is a ring buffer (preempted requests go to its front), the
running queue a doubly linked list over requests (a sentinel at index n: its `prev`
is the queue's end, the preemption victim), the eventful-step heap holds
`(step, seq, request, epoch)` in four arrays and is compacted to its live entries
when full. Decode blocks get hash ids of their own after the prompts' (`request_hashes`),
as `run_concurrent` gives them tuple hashes nobody else has.
"""

from __future__ import annotations

import numpy as np

from advisor.sim.events import ConcurrentResult, CostModel
from advisor.sim.fast.cache import _admit, _allocate, _cache_blocks, _free
from advisor.sim.fast.lists import compiled, new_free_queue, new_rings
from advisor.sim.fast.trace import BlockTrace

# cnt: the cache's counters, shared with fastcache's kernels (which use the first two)
_EVICTIONS, _FREE, _IN_USE, _PEAK, _MAX_BLOCK = 0, 1, 2, 3, 4


@compiled
def _grow(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, hashes, nblocks, ncached, i, total, bs):  # type: ignore[no-untyped-def]
    """`cache.PrefixCache.grow` for request i: slots for `total` tokens; newly full blocks cached."""
    need = (total + bs - 1) // bs
    num_new = max(need - nblocks[i], 0)
    if num_new > cnt[_FREE]:
        return False
    if num_new > 0:
        _allocate(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks, nblocks[i], nblocks[i] + num_new)
        for k in range(nblocks[i], nblocks[i] + num_new):
            cnt[_MAX_BLOCK] = max(cnt[_MAX_BLOCK], blocks[k])
        nblocks[i] += num_new
    cnt[_IN_USE] += num_new
    cnt[_PEAK] = max(cnt[_PEAK], cnt[_IN_USE])
    full = total // bs
    if full > ncached[i]:
        _cache_blocks(bhash, first_copy, cnext, cprev, blocks, hashes, ncached[i], full)
        ncached[i] = full
    return True


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
    n = len(prompt)
    # the cache: fastcache's arrays
    nxt, prv = new_free_queue(num_blocks)
    ref = np.zeros(num_blocks, np.int64)
    bhash = np.full(num_blocks, -1, np.int64)
    first_copy, cnext, cprev = new_rings(num_ids, num_blocks)
    cnt = np.zeros(5, np.int64)
    cnt[_FREE] = num_blocks
    cnt[_MAX_BLOCK] = -1
    blocks = np.zeros(boff[n], np.int64)
    nblocks = np.zeros(n, np.int64)
    ncached = np.zeros(n, np.int64)
    # per request, valid at the start of step anchor[i] (run_concurrent's names)
    computed = np.zeros(n, np.int64)
    outs = np.zeros(n, np.int64)
    anchor = np.zeros(n, np.int64)
    rank = np.zeros(n, np.int64)
    epoch = np.zeros(n, np.int64)
    is_running = np.zeros(n, np.bool_)
    is_prefilling = np.zeros(n, np.bool_)
    rnext = np.empty(n + 1, np.int64)  # the running queue; sentinel n
    rprev = np.empty(n + 1, np.int64)
    rnext[n] = n
    rprev[n] = n
    nrunning = 0
    prefilling = np.empty(n, np.int64)  # unordered (served by rank)
    npf = 0
    wq = np.empty(max(n, 1), np.int64)  # the waiting queue, a ring buffer
    whead = 0
    nwait = 0
    cap = 2 * n + 16
    hs = np.empty(cap, np.int64)
    hq = np.empty(cap, np.int64)
    hi = np.empty(cap, np.int64)
    he = np.empty(cap, np.int64)
    hsize = 0
    due = np.empty(n, np.int64)
    in_due = np.zeros(n, np.bool_)
    chunk_req = np.empty(n, np.int64)
    chunk_len = np.empty(n, np.int64)
    decoded = np.empty(n, np.int64)
    seq = 0
    refused = 0
    preemptions = 0
    t0 = arrivals[order[0]] if n > 0 else 0.0
    clock = t0
    last_finish = t0
    step = 0
    j = 0
    stalled = False

    while j < n or nrunning > 0 or nwait > 0:
        # 1. arrivals (an idle engine jumps to the next one)
        if nrunning == 0 and nwait == 0:
            clock = max(clock, arrivals[order[j]])
        arrived = False
        while j < n and arrivals[order[j]] <= clock:
            i = order[j]
            j += 1
            if prompt[i] <= 0:
                continue
            if boff[i + 1] - boff[i] > num_blocks:  # its whole end cannot fit the pool: refused
                refused += 1
                continue
            wq[(whead + nwait) % n] = i
            nwait += 1
            arrived = True
        if nrunning == 0 and nwait == 0:
            continue

        # quiet steps in one jump
        if skip_quiet and stalled and not arrived and npf == 0 and nrunning > 0:
            while hsize > 0 and he[0] != epoch[hi[0]]:
                hsize = _heap_pop(hs, hq, hi, he, hsize)
            quiet = hs[0] - step if hsize > 0 else 0
            k = 0
            while k < quiet and (j >= n or arrivals[order[j]] > clock):
                clock += step_s
                k += 1
            step += k
            if k > 0:
                continue

        # 2. running requests, in queue order
        budget = token_budget - (nrunning - npf)
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
        _sort_by_rank(due, m, rank)
        nch = 0
        nd = 0
        preempted_now = False
        for q in range(m):
            i = due[q]
            if not is_running[i]:
                continue  # preempted earlier in this step
            if is_prefilling[i]:
                num_new = min(prompt[i] + outs[i] - computed[i], budget)
                if num_new <= 0:
                    continue
            else:
                kk = step - anchor[i]
                computed[i] += kk
                outs[i] += kk
                anchor[i] = step
                num_new = 1
            while not _grow(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks[boff[i]:boff[i + 1]],
                            hashes[hoff[i]:hoff[i + 1]], nblocks, ncached, i, computed[i] + num_new, bs):
                v = rprev[n]  # preempt the end of the running queue (recompute)
                if not is_prefilling[v]:
                    kk = step - anchor[v]
                    computed[v] += kk
                    outs[v] += kk
                    anchor[v] = step
                    _grow(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, blocks[boff[v]:boff[v + 1]],
                          hashes[hoff[v]:hoff[v + 1]], nblocks, ncached, v, computed[v], bs)
                npf = _leave(v, rnext, rprev, is_running, is_prefilling, prefilling, npf, epoch)
                nrunning -= 1
                cnt[_IN_USE] -= _free(nxt, prv, ref, bhash, cnt, blocks[boff[v]:boff[v + 1]], nblocks[v])
                nblocks[v] = 0
                computed[v] = 0
                whead = (whead - 1) % n
                wq[whead] = v
                nwait += 1
                preemptions += 1
                preempted_now = True
                if v == i:
                    break
            if not is_running[i]:
                break
            if is_prefilling[i]:
                chunk_req[nch] = i
                chunk_len[nch] = num_new
                nch += 1
                budget -= num_new
            else:
                decoded[nd] = i
                nd += 1
        for q in range(m):
            in_due[due[q]] = False

        # 3. waiting requests, unless someone was preempted in this step
        stalled = not preempted_now
        while not preempted_now and nwait > 0 and nrunning < max_num_seqs:
            if budget <= 0:
                stalled = False
                break
            i = wq[whead]
            resumed = scheduled[i]
            total = prompt[i] + outs[i]
            if (total + bs - 1) // bs > num_blocks:
                break
            blk = blocks[boff[i]:boff[i + 1]]
            k, in_use = _admit(nxt, prv, ref, bhash, first_copy, cnext, cprev, cnt, hashes[hoff[i]:hoff[i + 1]],
                               total, bs, blk)
            if k < 0:
                break
            nreq = (total + bs - 1) // bs
            for x in range(nreq):
                cnt[_MAX_BLOCK] = max(cnt[_MAX_BLOCK], blk[x])
            nblocks[i] = nreq
            ncached[i] = total // bs
            cnt[_IN_USE] += in_use
            cnt[_PEAK] = max(cnt[_PEAK], cnt[_IN_USE])
            hit = k * bs
            whead = (whead + 1) % n
            nwait -= 1
            last = rprev[n]  # append to the running queue
            rnext[last] = i
            rprev[i] = last
            rnext[i] = n
            rprev[n] = i
            is_running[i] = True
            nrunning += 1
            rank[i] = seq
            seq += 1
            is_prefilling[i] = True
            prefilling[npf] = i
            npf += 1
            computed[i] = hit
            if not resumed:
                scheduled[i] = True
                hits[i] = hit
            num_new = min(total - hit, budget)
            chunk_req[nch] = i
            chunk_len[nch] = num_new
            nch += 1
            budget -= num_new

        # 4. the step runs; sampled tokens; finishes free their blocks before the next step
        prefill_s = 0.0
        step += 1
        finished = False
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
            if outs[i] < target[i]:  # its next eventful step: a new block, or its last token
                quiet = min((bs - computed[i] % bs) % bs, target[i] - outs[i] - 1)
                hsize = _heap_add(hs, hq, hi, he, hsize, step + quiet, seq, i, epoch)
                seq += 1
            else:
                npf = _leave(i, rnext, rprev, is_running, is_prefilling, prefilling, npf, epoch)
                nrunning -= 1
                cnt[_IN_USE] -= _free(nxt, prv, ref, bhash, cnt, blocks[boff[i]:boff[i + 1]], nblocks[i])
                nblocks[i] = 0
                finished = True
        clock += step_s + prefill_s
        if finished:
            stalled = False
            last_finish = clock
    out[0] = cnt[_EVICTIONS]
    out[1] = cnt[_PEAK]
    out[2] = preemptions
    out[3] = refused
    out[4] = step
    out[5] = cnt[_MAX_BLOCK] + 1
    return last_finish - t0


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
