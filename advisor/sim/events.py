"""Concurrent mode: vLLM's v1 scheduler, step by step, on a cost-model clock.

Inputs: one `PrefixCache` (advisor.cache, exact vLLM block rules), each request's prompt block hashes,
prompt length, output length, arrival time and (optional) logged latencies, a
`CostModel`, `max_num_seqs` and (optional) `max_num_batched_tokens`. Output:
`ConcurrentResult`, the hit tokens each request got when it was first scheduled
(vLLM's `num_cached_tokens`), plus evictions, peak blocks in use, preemptions.

The loop is the engine's: one iteration is one `schedule()` + model step of vLLM
0.32's FCFS scheduler (vllm/v1/core/sched/scheduler.py), in the same order:
1. arrivals whose time has come join the tail of the waiting queue;
2. running requests, in running-queue order (admission order), each get their
   next tokens: the rest of the prompt for one still prefilling, else one decode
   token, whose KV slot may need a new block. When the pool has none, the request
   at the END of the running queue is preempted (recompute: its blocks are freed,
   it goes to the FRONT of the waiting queue), again until the block is found or
   the request itself was the one preempted, which ends this phase of the step;
3. only if nobody was preempted in this step, waiting requests are admitted in
   queue order while fewer than `max_num_seqs` run and token budget is left: the
   prefix-cache lookup, then blocks for everything not hit (vLLM's admission gate
   checks the whole sequence fits); the first that does not fit stops admission;
4. after the step, each request whose known tokens are all computed samples one
   token; a request with all its output tokens finishes and frees its blocks
   (tail first) before the next step.
A request resumed after a preemption recomputes its prompt plus the output it had
generated: it looks up all of it (its own freed blocks, decode blocks included,
may still be cached) and vLLM counts that lookup in separate `preempted`
counters; `hit_tokens` keeps the first scheduling's hit, as `num_cached_tokens`.

Clock (the same one advisor.replay's concurrent mode steps the real engine on, so
both see the same arrivals before the same step): it starts at the first arrival;
each step lasts `1 / decode_tps` plus the longest uncached prefill that produced
its first token in that step (`(prompt - hit) / prefill_tps`); when nothing is
running or waiting it jumps to the next arrival. Arrivals are compared with the
clock at the start of each step. With `use_logged_latency` and latencies in the
log, the two rates are calibrated from it (`CostModel.calibrated`).

KV occupancy: a request with O output tokens ends holding `L + O - 1` tokens (the
last sampled token never gets a slot; O = 0 or unknown counts as 1, prefill only).
Its blocks past the prompt's full ones hold output tokens whose text is unknown:
they get hashes nobody else has (stable per request, so a resumed request can hit
its own), and are cached and evicted like any block.

Speed: steps in which nothing can change (every running request decodes inside
its current block, nobody finishes, no arrival is due, and admission stopped in
the last step for a reason such a step cannot change) are taken in one jump; a heap of
`(step, seq, request)` holds each decoding request's next eventful step (it needs
a new block or finishes). Deterministic: ties break by push order, and eventful
requests of one step are served in running-queue order.

Simplifications (stated in docs/simulate.md too):
- a prompt is allocated whole at admission; with a token budget it is computed in
  chunks over several steps (chunked prefill), but its blocks are all taken and
  cached up front, and decode tokens are taken from the budget before prefill
  chunks whatever their queue order;
- no async scheduling, speculative decoding, KV connectors, LoRA slot limits or
  priority policy; the watermark is 0 (vLLM's default);
- a request whose prompt plus output cannot fit the whole pool is refused (never
  scheduled, counted in `refused`), as vLLM refuses one beyond its KV capacity.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from advisor.sim.cache import PrefixCache


@dataclass(frozen=True)
class CostModel:
    """Step time of the batched engine (module docstring)."""

    prefill_tps: float  # uncached prompt tokens per second
    decode_tps: float  # decode steps per second (one token per running request)
    use_logged_latency: bool = True  # calibrate both rates from latency_s / ttft_s when logged

    def __post_init__(self) -> None:
        assert self.prefill_tps > 0 and self.decode_tps > 0

    def calibrated(self, n_tokens: np.ndarray, output_tokens: np.ndarray,
                   latency_s: np.ndarray | None, ttft_s: np.ndarray | None) -> CostModel:
        """The rates the log implies, where it carries latencies (else unchanged).

        decode: median over requests with a latency and more than one output token of
        `(O - 1) / (latency - ttft)`; prefill: median of `prompt / ttft`. Logged times
        include queueing, so both rates are lower bounds of the engine's.
        """
        if not self.use_logged_latency or latency_s is None:
            return self
        lat = np.asarray(latency_s, np.float64)
        ttft = np.asarray(ttft_s, np.float64) if ttft_s is not None else np.full(len(lat), np.nan)
        out = np.asarray(output_tokens, np.int64)
        prompt = np.asarray(n_tokens, np.int64)
        cost = self
        has_ttft = np.isfinite(ttft) & (ttft > 0) & (prompt > 0)
        if has_ttft.any():
            cost = replace(cost, prefill_tps=float(np.median(prompt[has_ttft] / ttft[has_ttft])))
        first = np.where(np.isfinite(ttft), ttft, (prompt / cost.prefill_tps))
        decoding = np.isfinite(lat) & (out > 1) & (lat - first > 0)
        if decoding.any():
            cost = replace(cost, decode_tps=float(np.median((out[decoding] - 1) / (lat - first)[decoding])))
        return cost


@dataclass(frozen=True)
class ConcurrentResult:
    hit_tokens: np.ndarray  # int64 per request (0 when refused)
    scheduled: np.ndarray  # bool per request: it ran (its queries count)
    evictions: int
    peak_blocks_in_use: int
    preemptions: int
    refused: int
    makespan_s: float  # clock at the last finish, seconds after the first arrival
    steps: int = 0  # engine steps taken
    blocks_used: int = 0  # highest block id ever taken + 1 (advisor.fastevents; 0 where not tracked)


def _kv_tokens(n_tokens: int, output_tokens: int) -> int:
    """Tokens a request holds at its end: the prompt plus every fed-back output token."""
    return n_tokens + max(output_tokens - 1, 0)


def run_concurrent(
    cache: PrefixCache,
    block_hashes: Sequence[Sequence[Hashable]],
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
) -> ConcurrentResult:
    """Simulate one configuration with requests overlapping in time (module docstring).

    Arrays are per request, in log order; `arrivals_s` must be finite (seconds, any
    origin). Requests with `n_tokens == 0` (refused at tokenization) never run.
    `max_num_batched_tokens`: vLLM's per-step token budget (None: unlimited).
    Decode blocks get tuple hashes of their own. advisor.fastevents runs this loop
    compiled (tested equal to it); the grid uses that.
    `skip_quiet_steps=False` takes every step one by one (the plain loop that the
    jumps are tested against).
    """
    n = len(n_tokens)
    assert max_num_seqs >= 1
    assert max_num_batched_tokens is None or max_num_batched_tokens >= 1
    bs = cache.block_size
    cost = cost.calibrated(n_tokens, output_tokens, latency_s, ttft_s)
    step_s = 1.0 / cost.decode_tps
    prompt = [int(x) for x in n_tokens]
    target = [max(int(o), 1) for o in output_tokens]  # tokens sampled before finishing
    end_tokens = [_kv_tokens(prompt[i], target[i]) for i in range(n)]
    hits = np.zeros(n, dtype=np.int64)
    scheduled = np.zeros(n, dtype=bool)
    hashes = _with_decode_hashes(cache.block_size, block_hashes, prompt, end_tokens)

    # Per request, valid at the start of step `anchor[i]` (decoding requests advance
    # one token per step in between without being touched).
    computed = [0] * n
    outs = [0] * n
    anchor = [0] * n
    rank = [0] * n  # position in the running queue: admission order
    epoch = [0] * n  # bumps when the request leaves the running queue: heap entries go stale
    heap: list[tuple[int, int, int, int]] = []  # (eventful step, seq, request, epoch)
    seq = 0
    waiting: deque[int] = deque()
    running: dict[int, None] = {}  # the running queue, in order (dicts keep insertion order)
    prefilling: set[int] = set()
    refused = preemptions = 0

    order = [int(i) for i in np.argsort(arrivals_s, kind="stable")]
    arrivals = [float(a) for a in arrivals_s]
    t0 = arrivals[order[0]] if n else 0.0
    clock, last_finish, step, j = t0, t0, 0, 0
    admission_stalled = False  # last step tried admission, and nothing freed since

    def known(i: int) -> int:
        """Tokens the request has: its prompt and every token sampled so far."""
        return prompt[i] + outs[i]

    def materialize(i: int) -> None:
        k = step - anchor[i]
        computed[i] += k
        outs[i] += k
        anchor[i] = step

    def push_next(i: int) -> None:
        """A decoding request, valid at step `step`: its next eventful step."""
        nonlocal seq
        quiet = min(-computed[i] % bs, target[i] - outs[i] - 1)
        heapq.heappush(heap, (step + quiet, seq, i, epoch[i]))
        seq += 1

    def after_sample(i: int) -> bool:
        """True when the request has finished (then its blocks are freed, tail first)."""
        if outs[i] < target[i]:
            push_next(i)
            return False
        leave(i)
        cache.free(str(i))
        return True

    def leave(i: int) -> None:
        del running[i]
        prefilling.discard(i)
        epoch[i] += 1

    def preempt(v: int) -> None:
        nonlocal preemptions
        if v not in prefilling:
            materialize(v)
            cache.grow(str(v), computed[v], hashes[v])  # cache blocks filled while decoding
        leave(v)
        cache.free(str(v))
        computed[v] = 0
        waiting.appendleft(v)
        preemptions += 1

    while j < n or running or waiting:
        # 1. arrivals (an idle engine jumps to the next one)
        if not running and not waiting:
            clock = max(clock, arrivals[order[j]])
        arrived = False
        while j < n and arrivals[order[j]] <= clock:
            i = order[j]
            j += 1
            if prompt[i] <= 0:
                continue
            if not cache.fits(end_tokens[i]):
                refused += 1
                continue
            waiting.append(i)
            arrived = True
        if not (running or waiting):
            continue

        # Quiet steps: nothing but one decode token per running request, in one jump.
        if skip_quiet_steps and admission_stalled and not arrived and not prefilling and running:
            while heap and heap[0][3] != epoch[heap[0][2]]:
                heapq.heappop(heap)
            quiet = heap[0][0] - step if heap else 0
            k = 0
            while k < quiet and (j >= n or arrivals[order[j]] > clock):
                clock += step_s
                k += 1
            step += k
            if k:
                continue

        # 2. running requests, in queue order
        budget = max_num_batched_tokens if max_num_batched_tokens is not None else 1 << 62
        budget -= len(running) - len(prefilling)  # decode tokens first (docstring)
        due: set[int] = set(prefilling)
        while heap and heap[0][0] <= step:
            _, _, i, ep = heapq.heappop(heap)
            if ep == epoch[i]:
                due.add(i)
        decoded: list[int] = []
        chunks: list[tuple[int, int]] = []
        preempted_now = False
        for i in sorted(due, key=rank.__getitem__):
            if i not in running:
                continue  # preempted earlier in this step
            if i in prefilling:
                num_new = min(known(i) - computed[i], budget)
                if num_new <= 0:
                    continue  # no budget left for its next chunk in this step
            else:
                materialize(i)
                num_new = 1
            while not cache.grow(str(i), computed[i] + num_new, hashes[i]):
                victim = next(reversed(running))
                preempt(victim)
                preempted_now = True
                if victim == i:
                    break
            if i not in running:
                break
            if i in prefilling:
                chunks.append((i, num_new))
                budget -= num_new
            else:
                decoded.append(i)

        # 3. waiting requests, unless someone was preempted in this step
        admission_stalled = not preempted_now  # ... until the next finish, if not for budget
        while not preempted_now and waiting and len(running) < max_num_seqs:
            if budget <= 0:
                admission_stalled = False  # the next step has a new budget
                break
            i = waiting[0]
            resumed = bool(scheduled[i])
            total = known(i)
            hit = cache.admit(str(i), hashes[i], total, preempted=resumed)
            if hit is None:
                break
            waiting.popleft()
            running[i] = None
            rank[i] = seq
            seq += 1
            prefilling.add(i)
            computed[i] = hit
            if not resumed:
                scheduled[i] = True
                hits[i] = hit
            num_new = min(total - hit, budget)
            chunks.append((i, num_new))
            budget -= num_new

        # 4. the step runs; sampled tokens; finishes free their blocks before the next step
        prefill_s = 0.0
        step += 1
        finished = False
        for i, num_new in chunks:
            computed[i] += num_new
            if computed[i] < known(i):
                continue  # a chunk of the prompt: nothing sampled yet
            prefilling.discard(i)
            if outs[i] == 0:  # its first token: the replay charges its prefill to this step
                prefill_s = max(prefill_s, (prompt[i] - int(hits[i])) / cost.prefill_tps)
            outs[i] += 1
            anchor[i] = step
            finished |= after_sample(i)
        for i in decoded:
            computed[i] += 1
            outs[i] += 1
            anchor[i] = step
            finished |= after_sample(i)
        clock += step_s + prefill_s
        if finished:
            admission_stalled = False
            last_finish = clock
    assert not running and not waiting, "every admitted request finishes"
    return ConcurrentResult(
        hit_tokens=hits,
        scheduled=scheduled,
        evictions=cache.evictions,
        peak_blocks_in_use=cache.peak_blocks_in_use,
        preemptions=preemptions,
        refused=refused,
        makespan_s=last_finish - t0,
        steps=step,
    )


def _with_decode_hashes(bs: int, block_hashes: Sequence[Sequence[Hashable]], prompt: list[int],
                        end_tokens: list[int]) -> list[Sequence[Hashable]]:
    """Each request's full-block hashes to its end: the prompt's, then its own decode ones."""
    out: list[Sequence[Hashable]] = []
    for i, h in enumerate(block_hashes):
        extra = max(end_tokens[i] // bs - prompt[i] // bs, 0)
        out.append(list(h[: prompt[i] // bs]) + [("decode", i, k) for k in range(extra)])
    return out
