"""Concurrent mode: requests arrive at logged times and hold their blocks while they run.

Inputs: one `PrefixCache` (advisor.cache, exact vLLM block rules, or its compiled
twin advisor.fastcache.ArrayPrefixCache), each request's
block hashes, prompt length, output length, arrival time and (optional) logged
latencies, a `CostModel` and `max_num_seqs`. Output: `ConcurrentResult`, the hit
tokens each request got when it was first scheduled, plus evictions, peak blocks
in use and preemptions.

The loop, in Vidur's style: a heap of `(time, rank, seq, event)`, popped in order,
each handler pushing what follows. Deterministic: ties at one instant are broken by
event rank (finishes, then decode growth, then arrivals, so freed blocks are back
before newcomers look) and then by push order.

Service-time model (stated; `CostModel`):
- a request's uncached prompt tokens take `uncached / prefill_tps` seconds
  (prefills of different requests do not slow each other down);
- then every running request advances one output token per `1 / decode_tps`
  seconds (one batched decode step serves all running sequences at once);
- when the log carries `latency_s` (and optionally `ttft_s`), that request's
  timeline is stretched to it instead: prefill = ttft_s (or the cost model,
  capped at the latency), decode spread evenly over the rest.

KV occupancy: at scheduling the whole prompt is allocated (vLLM without chunked
prefill); each fed-back output token then needs a slot, so a request with O
output tokens ends holding `L + O - 1` tokens (the last sampled token never gets a
slot; O = 0 or unknown means prefill only). A new decode block is taken when the
token count crosses a block boundary, and decode blocks, once full, are hashed
with hashes nobody else has (their text is not known).

Admission and preemption, simplified from vLLM's FCFS scheduler:
- waiting requests are admitted strictly in arrival order while fewer than
  `max_num_seqs` run and the pool can hold the head's prompt (no skipping ahead,
  no `max_num_batched_tokens` budget, no chunked prefill);
- when a running request cannot get a decode block, the most recently admitted
  running request is preempted (vLLM's recompute preemption: its blocks are
  freed, it goes back to the front of the waiting queue and later restarts from
  its prompt); its prefix-cache queries and hits are counted only at its first
  scheduling, as vLLM counts recomputation under separate `preempted` counters;
- a request whose prompt plus output cannot fit the whole pool is refused
  (never scheduled, counted in `refused`), as vLLM refuses it.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from advisor.cache import PrefixCache
from advisor.fastcache import ArrayPrefixCache

# Event ranks: lower runs first at the same instant.
_FINISH, _GROW, _ARRIVE = 0, 1, 2


@dataclass(frozen=True)
class CostModel:
    """Service time of one request (module docstring)."""

    prefill_tps: float = 10_000.0  # uncached prompt tokens per second
    decode_tps: float = 50.0  # output tokens per second per running sequence
    use_logged_latency: bool = True  # latency_s / ttft_s from the log win when present

    def __post_init__(self) -> None:
        assert self.prefill_tps > 0 and self.decode_tps > 0


@dataclass(frozen=True)
class ConcurrentResult:
    hit_tokens: np.ndarray  # int64 per request (0 when refused)
    scheduled: np.ndarray  # bool per request: it ran (its queries count)
    evictions: int
    peak_blocks_in_use: int
    preemptions: int
    refused: int
    makespan_s: float  # last finish time, seconds after the first arrival


def _kv_tokens(n_tokens: int, output_tokens: int) -> int:
    """Tokens a request holds at its end: the prompt plus every fed-back output token."""
    return n_tokens + max(output_tokens - 1, 0)


def run_concurrent(
    cache: PrefixCache | ArrayPrefixCache,
    block_hashes: Sequence[Sequence[Hashable]],
    n_tokens: np.ndarray,
    output_tokens: np.ndarray,
    arrivals_s: np.ndarray,
    cost: CostModel,
    max_num_seqs: int,
    latency_s: np.ndarray | None = None,
    ttft_s: np.ndarray | None = None,
) -> ConcurrentResult:
    """Simulate one configuration with requests overlapping in time (module docstring).

    Arrays are per request, in log order; `arrivals_s` must be finite (seconds, any
    origin). Requests with `n_tokens == 0` (refused at tokenization) never run.
    """
    n = len(n_tokens)
    assert max_num_seqs >= 1
    bs = cache.block_size
    hits = np.zeros(n, dtype=np.int64)
    scheduled = np.zeros(n, dtype=bool)
    epoch = np.zeros(n, dtype=np.int64)  # bumps on preemption: older events go stale
    end_tokens = [_kv_tokens(int(n_tokens[i]), int(output_tokens[i])) for i in range(n)]
    order = np.argsort(arrivals_s, kind="stable")
    t0 = float(arrivals_s[order[0]]) if n else 0.0
    heap: list[tuple[float, int, int, int, int, int]] = []
    seq = 0
    waiting: deque[int] = deque()
    running: list[int] = []  # admission order; the last one is preempted first
    refused = preemptions = 0
    last_t = t0

    def push(t: float, rank: int, i: int, tokens: int) -> None:
        nonlocal seq
        heapq.heappush(heap, (t, rank, seq, i, int(epoch[i]), tokens))
        seq += 1

    def decode_step_s(i: int, prefill_s: float) -> float:
        fed_back = end_tokens[i] - int(n_tokens[i])
        if cost.use_logged_latency and latency_s is not None and np.isfinite(latency_s[i]) and fed_back > 0:
            return max(float(latency_s[i]) - prefill_s, 0.0) / fed_back
        return 1.0 / cost.decode_tps

    def prefill_time(i: int, hit: int) -> float:
        model = (int(n_tokens[i]) - hit) / cost.prefill_tps
        if cost.use_logged_latency:
            if ttft_s is not None and np.isfinite(ttft_s[i]):
                return float(ttft_s[i])
            if latency_s is not None and np.isfinite(latency_s[i]):
                return min(model, float(latency_s[i]))
        return model

    def next_event(i: int, now: float, have: int, step_s: float) -> None:
        """After holding `have` tokens at `now`: the next block boundary, or the finish."""
        target = -(-have // bs) * bs + 1  # first token count that needs a new block
        if target <= end_tokens[i]:
            push(now + (target - have) * step_s, _GROW, i, target)
        else:
            push(now + (end_tokens[i] - have) * step_s, _FINISH, i, end_tokens[i])

    step_of: dict[int, float] = {}

    def schedule(now: float) -> None:
        while waiting and len(running) < max_num_seqs:
            i = waiting[0]
            hit = cache.admit(str(i), block_hashes[i], int(n_tokens[i]), preempted=bool(scheduled[i]))
            if hit is None:
                return
            waiting.popleft()
            running.append(i)
            if not scheduled[i]:
                scheduled[i] = True
                hits[i] = hit
            prefill_s = prefill_time(i, hit)
            step_of[i] = decode_step_s(i, prefill_s)
            next_event(i, now + prefill_s, int(n_tokens[i]), step_of[i])

    def preempt_last() -> int:
        nonlocal preemptions
        v = running.pop()
        cache.free(str(v))
        epoch[v] += 1
        waiting.appendleft(v)
        preemptions += 1
        return v

    arrival_pos = 0

    def push_next_arrival() -> None:
        nonlocal arrival_pos
        while arrival_pos < n:
            i = int(order[arrival_pos])
            arrival_pos += 1
            if n_tokens[i] <= 0:
                continue
            if not cache.fits(end_tokens[i]):
                nonlocal refused
                refused += 1
                continue
            push(float(arrivals_s[i]), _ARRIVE, i, 0)
            return

    push_next_arrival()
    while heap:
        now, rank, _, i, ep, tokens = heapq.heappop(heap)
        if rank == _ARRIVE:
            waiting.append(i)
            push_next_arrival()
        elif ep != epoch[i]:
            continue  # the request was preempted after this event was pushed
        elif rank == _GROW:
            while not cache.grow(str(i), tokens):  # decode blocks: hashes nobody else has
                if preempt_last() == i:
                    break
            if i in running:
                next_event(i, now, tokens, step_of[i])
        else:  # _FINISH: the last full block gets its hash, then everything is freed
            ok = cache.grow(str(i), tokens)
            assert ok, "a finishing request needs no new block"
            cache.free(str(i))
            running.remove(i)
            last_t = now
        schedule(now)
    assert not running and not waiting, "every admitted request finishes"
    return ConcurrentResult(
        hit_tokens=hits,
        scheduled=scheduled,
        evictions=cache.evictions,
        peak_blocks_in_use=cache.peak_blocks_in_use,
        preemptions=preemptions,
        refused=refused,
        makespan_s=last_t - t0,
    )
