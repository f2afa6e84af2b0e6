"""Concurrent mode: vLLM's v1 scheduler, step by step, on a cost-model clock.

Inputs: one `PrefixCache` (advisor.sim.cache, exact vLLM block rules), each request's prompt block hashes,
prompt length, output length, arrival time and (optional) logged latencies, a
`CostModel`, `max_num_seqs`, (optional) `max_num_batched_tokens` and sync or async
scheduling. Output:
`ConcurrentResult`, the hit tokens each request got when it was first scheduled
(vLLM's `num_cached_tokens`), plus evictions, peak blocks in use, preemptions.

The loop is the engine's, and its state is vLLM's `Request` counters (`Engine`):
one iteration is one `schedule()` of vLLM 0.32's FCFS scheduler
(vllm/v1/core/sched/scheduler.py) and the processing of a step's output, in its order:
1. arrivals whose time has come join the tail of the waiting queue;
2. running requests, in running-queue order (admission order) while the token budget
   lasts, each get their next tokens: the next chunk of a prompt still prefilling, else
   one decode token, and the KV slots for them (a prompt's blocks are taken and cached
   chunk by chunk, as computed). When the pool is short, the request at the END of the
   running queue is preempted (recompute: its blocks are freed, it goes to the FRONT of
   the waiting queue), again until the slots are found or the request itself was the
   one preempted, which ends this phase of the step;
3. only if nobody was preempted in this step, waiting requests are admitted in queue
   order while fewer than `max_num_seqs` run and budget is left: the prefix-cache
   lookup, then, if the whole sequence fits the free blocks (vLLM's admission gate),
   blocks for the chunk computed now; the first that does not fit stops admission;
4. the step's output is processed in scheduling order: each request whose known tokens
   are all computed samples one token; a request with all its output finishes and
   frees its blocks (tail first) there and then.
Synchronous scheduling (vLLM's `Scheduler`, what its CPU engine runs) processes step
N's output before scheduling step N+1. Async scheduling (`AsyncScheduler`, vLLM's
default on GPUs) schedules step N+1 first, as EngineCore's batch queue of two does: a
request decodes on a placeholder for the token still in flight, one whose last token is
in flight is not scheduled again, a finished request's blocks and seat free a step
later, decode blocks are cached once the output that fills them is seen, and a request
preempted with a token in flight gets it as stale output (it waits for it before it can
be admitted again, and finishes from it if it was its last).
A request resumed after a preemption recomputes its prompt plus the output it had
generated: it looks up all of it (its own freed blocks, decode blocks included, may
still be cached) and vLLM counts that lookup in separate `preempted` counters;
`hit_tokens` keeps the first scheduling's hit, as `num_cached_tokens`. Both modes are
tested request for request against vLLM's own schedulers driven standalone
(tests/test_scheduler_oracle.py).

Clock (the same one advisor.replay's concurrent mode steps the real engine on, so
both see the same arrivals before the same step): it starts at the first arrival;
each scheduled step lasts `1 / decode_tps` plus the longest uncached prefill that
samples its first token in that step (`(prompt - hit) / prefill_tps`); when nothing is
running or waiting it jumps to the next arrival. Arrivals are compared with the clock
at the start of each iteration. With `use_logged_latency` and latencies in the log, the
two rates are calibrated from it (`CostModel.calibrated`).

KV occupancy: a request with O output tokens ends holding `L + O - 1` tokens (the
last sampled token never gets a slot; O = 0 or unknown counts as 1, prefill only).
Its blocks past the prompt's full ones hold output tokens whose text is unknown:
they get hashes nobody else has (stable per request, so a resumed request can hit
its own), and are cached and evicted like any block.

This loop takes every step one by one; advisor.sim.fast.events, its compiled twin,
takes steps in which nothing can change in one jump.

Not modelled (stated in docs/simulate.md too): speculative decoding's scheduling (its
cache rule is the cache's), KV connectors, LoRA slot limits, priority scheduling,
`long_prefill_token_threshold`; the watermark is 0 (vLLM's default). A request whose
prompt plus output cannot fit the whole pool is refused (never scheduled, counted in
`refused`), as vLLM refuses one beyond its KV capacity.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from advisor.sim.cache import PrefixCache
from advisor.sim.steptime import StepTimeModel, seconds_from_totals


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
    blocks_used: int = 0  # highest block id taken + 1, or more if a check asked more (fast.events; 0: untracked)
    # per request, seconds from its arrival to the end of the step that sampled its first
    # token (TTFT) and its last (end-to-end latency); NaN for requests never run
    ttft_s: np.ndarray | None = None
    e2e_s: np.ndarray | None = None
    busy_s: float = 0.0  # the steps' time, summed (the engine's busy time)
    prefill_s: float = 0.0  # the prefill chunks' share of it (the clock's compute term for them)


def _kv_tokens(n_tokens: int, output_tokens: int) -> int:
    """Tokens a request holds at its end: the prompt plus every fed-back output token."""
    return n_tokens + max(output_tokens - 1, 0)


def run_concurrent(
    cache: PrefixCache,
    block_hashes: Sequence[Sequence[Hashable]],
    n_tokens: np.ndarray,
    output_tokens: np.ndarray,
    arrivals_s: np.ndarray,
    clock: StepTimeModel,
    max_num_seqs: int,
    *,
    max_num_batched_tokens: int | None = None,
    async_scheduling: bool = False,
    skip_prefix_cache: np.ndarray | None = None,
) -> ConcurrentResult:
    """Simulate one configuration with requests overlapping in time (module docstring).

    Arrays are per request, in log order; `arrivals_s` must be finite (seconds, any
    origin). Requests with `n_tokens == 0` (refused at tokenization) never run.
    `clock` prices each step (advisor.sim.steptime: the roofline of a model on a GPU, or
    the flat rates). `max_num_batched_tokens`: vLLM's per-step token budget (None:
    unlimited). `async_scheduling`: vLLM's AsyncScheduler (step N+1 is scheduled before
    step N's output is seen) instead of its Scheduler. `skip_prefix_cache`: per request,
    True when it does not read the prefix cache (prompt logprobs; `PrefixCache.admit`);
    the cache's own `speculative` rule applies to every lookup. Decode blocks get tuple
    hashes of their own. advisor.sim.fast.events runs this loop compiled (tested equal
    to it); the grid uses that.
    """
    engine = Engine(cache, block_hashes, n_tokens, output_tokens, arrivals_s, clock, max_num_seqs,
                    max_num_batched_tokens=max_num_batched_tokens, async_scheduling=async_scheduling,
                    skip_prefix_cache=skip_prefix_cache)
    for i in engine.arrival_order():
        engine.add_request(i)
    engine.advance()
    return engine.result()


@dataclass
class _StepOutput:
    """One scheduled step (vLLM's SchedulerOutput, reduced): the requests and their token
    counts in scheduling order, which of them sample a token, and the clock when it ends."""

    scheduled: list[tuple[int, int]]
    samples: dict[int, bool]
    first_tokens: list[int]  # requests sampling their first token in it
    end_clock: float = 0.0


class Engine:
    """One vLLM engine: its FCFS scheduler (sync or async), its KV cache and its clock.

    Requests are the rows of the arrays given (one workload's), handed to the engine with
    `add_request` in arrival order (all of them for one engine; a router's share for a
    replica); `advance(until)` runs the engine's iterations that start before `until`.
    The state is vLLM's `Request` counters, per request i: `num_tokens[i]` (prompt plus
    the output tokens delivered so far), `computed[i]` (num_computed_tokens, advanced
    when a step is scheduled), `placeholders[i]` (async: tokens sampled by scheduled
    steps whose output is not processed yet), `in_flight[i]` and `stale[i]` (a
    preempted request's in-flight tokens, whose output still arrives). `running` is the
    running queue in admission order; `waiting` the waiting queue, preempted requests at
    its front; `pending` the requests handed over that have not arrived by the clock.
    """

    def __init__(self, cache: PrefixCache, block_hashes: Sequence[Sequence[Hashable]], n_tokens: np.ndarray,
                 output_tokens: np.ndarray, arrivals_s: np.ndarray, clock: StepTimeModel, max_num_seqs: int, *,
                 max_num_batched_tokens: int | None = None, async_scheduling: bool = False,
                 skip_prefix_cache: np.ndarray | None = None) -> None:
        assert max_num_seqs >= 1
        assert max_num_batched_tokens is None or max_num_batched_tokens >= max_num_seqs, "vLLM's own rule"
        n = len(n_tokens)
        self.cache = cache
        self.bs = cache.block_size
        self.coef = clock.coefficients
        self.flat = clock.flat
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens if max_num_batched_tokens is not None else 1 << 62
        self.async_scheduling = async_scheduling
        self.skip = [False] * n if skip_prefix_cache is None else [bool(x) for x in skip_prefix_cache]
        self.prompt = [int(x) for x in n_tokens]
        self.target = [max(int(o), 1) for o in output_tokens]  # tokens sampled before finishing
        self.end_tokens = [_kv_tokens(self.prompt[i], self.target[i]) for i in range(n)]
        self.hashes = _with_decode_hashes(self.bs, block_hashes, self.prompt, self.end_tokens)
        self.arrivals = [float(a) for a in arrivals_s]
        self.hits = np.zeros(n, dtype=np.int64)
        self.scheduled = np.zeros(n, dtype=bool)
        self.first_token_at = np.full(n, np.nan)
        self.finished_at = np.full(n, np.nan)
        self.num_tokens = list(self.prompt)
        self.computed = [0] * n
        self.placeholders = [0] * n
        self.in_flight = [0] * n
        self.stale = [0] * n
        self.finished = [False] * n
        self.pending: deque[int] = deque()
        self.waiting: deque[int] = deque()
        self.running: list[int] = []
        self.steps_in_flight: deque[_StepOutput] = deque()
        self.refused = self.preemptions = self.step = 0
        self.busy_s = self.prefill_s = 0.0
        self.t0: float | None = None
        self.clock = self.last_finish = 0.0

    def arrival_order(self) -> list[int]:
        """Every request, by arrival (ties in log order)."""
        return [int(i) for i in np.argsort(np.asarray(self.arrivals), kind="stable")]

    def add_request(self, i: int) -> None:
        """Hand request i to the engine; it arrives at its time (requests in arrival order)."""
        assert not self.pending or self.arrivals[self.pending[-1]] <= self.arrivals[i]
        if self.t0 is None:
            self.t0 = self.clock = self.last_finish = self.arrivals[i]
        self.pending.append(i)

    def busy(self) -> bool:
        return bool(self.running or self.waiting or self.steps_in_flight)

    def load_requests(self) -> int:
        """Requests on the engine now: running, waiting, and handed over but not arrived
        (read-only; advisor.sim.routing's load signals)."""
        return len(self.running) + len(self.waiting) + len(self.pending)

    def load_tokens(self) -> int:
        """Prompt tokens handed to the engine and not computed yet, over the same requests."""
        todo = sum(max(self.prompt[i] - self.computed[i], 0) for q in (self.running, self.waiting) for i in q)
        return todo + sum(self.prompt[i] for i in self.pending)

    def advance(self, until: float = float("inf")) -> None:
        """Run the engine's iterations that start before `until` (EngineCore.step; with async
        scheduling, step_with_batch_queue and its queue of two: step N+1 is scheduled before
        step N's output is processed); an idle engine's clock jumps to its next arrival."""
        while self.pending or self.busy():
            # the next iteration starts now, or (idle) at the next arrival; a request handed over
            # later may still arrive by then, so an iteration at or past `until` waits
            start = self.clock if self.busy() else max(self.clock, self.arrivals[self.pending[0]])
            if start >= until:
                return
            self.clock = start
            self.iteration()

    def iteration(self) -> None:
        self.add_arrivals()
        if self.running or self.waiting:
            out = self.schedule()
            if out.scheduled:
                self.step += 1
                self.clock += self.step_seconds(out)
            out.end_clock = self.clock
            for i in out.first_tokens:
                self.first_token_at[i] = self.clock
            if not self.async_scheduling:
                self.update_from_output(out)
                return
            self.steps_in_flight.appendleft(out)
            if len(self.steps_in_flight) < 2 and out.scheduled:
                return  # the batch queue has room: schedule the next step first
        if self.steps_in_flight:
            self.update_from_output(self.steps_in_flight.pop())

    def result(self) -> ConcurrentResult:
        assert not self.pending and not self.busy(), "every admitted request finishes"
        arrivals = np.asarray(self.arrivals, dtype=np.float64)
        return ConcurrentResult(
            hit_tokens=self.hits,
            scheduled=self.scheduled,
            evictions=self.cache.evictions,
            peak_blocks_in_use=self.cache.peak_blocks_in_use,
            preemptions=self.preemptions,
            refused=self.refused,
            makespan_s=self.last_finish - (self.t0 or 0.0),
            steps=self.step,
            ttft_s=self.first_token_at - arrivals,
            e2e_s=self.finished_at - arrivals,
            busy_s=self.busy_s,
            prefill_s=self.prefill_s,
        )

    def add_arrivals(self) -> None:
        """Requests whose arrival time has come join the tail of the waiting queue; one whose
        end cannot fit the whole pool is refused."""
        while self.pending and self.arrivals[self.pending[0]] <= self.clock:
            i = self.pending.popleft()
            if self.prompt[i] <= 0:
                continue  # refused at tokenization: never runs, not counted
            if not self.cache.fits(self.end_tokens[i]):
                self.refused += 1
                continue
            self.waiting.append(i)

    def schedule(self) -> _StepOutput:
        """vLLM's `Scheduler.schedule()`: running requests first, then (only if nobody was
        preempted) waiting ones; then `_update_after_schedule`."""
        scheduled: list[tuple[int, int]] = []
        budget, preempted = self.schedule_running(scheduled)
        if not preempted:
            self.schedule_waiting(scheduled, budget)
        samples = {}
        first_tokens = []
        for i, num_new in scheduled:
            self.computed[i] += num_new
            self.in_flight[i] += num_new
            samples[i] = self.computed[i] >= self.num_tokens[i] + self.placeholders[i]  # not a prompt chunk
            # its first token: nothing sampled before, delivered or (async) in flight
            if samples[i] and self.num_tokens[i] == self.prompt[i] and self.placeholders[i] == 0:
                first_tokens.append(i)
            if self.async_scheduling and samples[i]:
                self.placeholders[i] += 1
        return _StepOutput(scheduled, samples, first_tokens)

    def schedule_running(self, scheduled: list[tuple[int, int]]) -> tuple[int, bool]:
        """Each running request in queue order, while budget is left, gets its next tokens
        (the rest of its prompt within the budget, or one decode token) and the KV slots
        for them. When the pool is short, the request at the END of the running queue is
        preempted, again until the slots are found or the request itself was preempted,
        which ends this phase. Returns (budget left, whether anyone was preempted)."""
        budget = self.token_budget
        preempted = False
        k = 0
        while k < len(self.running) and budget > 0:
            i = self.running[k]
            if self.placeholders[i] and self.computed[i] + 2 - self.placeholders[i] >= self.prompt[i] + self.target[i]:
                k += 1
                continue  # async: its last token is already in flight
            num_new = min(self.num_tokens[i] + self.placeholders[i] - self.computed[i], budget)
            if num_new <= 0:
                k += 1
                continue
            total = self.computed[i] + num_new
            while not self.cache.grow(str(i), total, self.hashes[i], min(total, self.num_tokens[i])):
                victim = self.running.pop()
                self.preempt(victim)
                preempted = True
                if victim == i:
                    break
            if preempted and i not in self.running:
                break
            scheduled.append((i, num_new))
            budget -= num_new
            k += 1
        return budget, preempted

    def preempt(self, v: int) -> None:
        """Preempt running request v (recompute): its blocks are freed and it goes to the
        FRONT of the waiting queue; output still in flight for it arrives as stale."""
        self.cache.free(str(v))
        self.computed[v] = 0
        self.stale[v] = self.in_flight[v]
        self.placeholders[v] = 0
        self.waiting.appendleft(v)
        self.preemptions += 1

    def schedule_waiting(self, scheduled: list[tuple[int, int]], budget: int) -> None:
        """Waiting requests, in queue order, while fewer than `max_num_seqs` run and budget is
        left: the prefix-cache lookup, then (if the whole sequence fits) blocks for the
        chunk computed now; the first that does not fit stops admission. One whose stale
        output is still in flight is passed over, keeping its place."""
        passed: list[int] = []
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            i = self.waiting[0]
            if self.stale[i]:
                passed.append(self.waiting.popleft())
                continue
            resumed = bool(self.scheduled[i])
            hit = self.cache.admit(str(i), self.hashes[i], self.num_tokens[i], preempted=resumed, token_budget=budget,
                                   skip_prefix_cache=self.skip[i])
            if hit is None:
                break
            self.waiting.popleft()
            self.running.append(i)
            self.computed[i] = hit
            if not resumed:  # vLLM's num_cached_tokens: the first scheduling's hit
                self.scheduled[i] = True
                self.hits[i] = hit
            num_new = min(self.num_tokens[i] - hit, budget)
            scheduled.append((i, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(passed))

    def step_seconds(self, out: _StepOutput) -> float:
        """The step's time on the clock (advisor.sim.steptime). Roofline: from every chunk
        (new tokens, tokens before them) and every decode (its context) in it. Flat: one
        decode step plus the longest uncached prefill that samples its first token in it,
        the clock the replay steps the real engine on. Adds to `busy_s` and `prefill_s`."""
        c = self.coef
        if self.flat:
            longest = max((self.prompt[i] - int(self.hits[i]) for i in out.first_tokens), default=0)
            seconds = seconds_from_totals(c, 0.0, 0.0, 0.0, float(longest))
            self.prefill_s += longest / c.flat_prefill_tps
        else:
            tokens = pairs = kv_read = prefill = 0.0
            for i, num_new in out.scheduled:
                before = self.computed[i] - num_new
                tokens += num_new
                if num_new == 1 and before >= self.prompt[i]:  # a decode: it attends to its context
                    pairs += before
                else:
                    chunk_pairs = num_new * (before + num_new / 2)
                    pairs += chunk_pairs
                    prefill += c.compute_per_token * num_new + c.compute_per_pair * chunk_pairs
                kv_read += before
            seconds = seconds_from_totals(c, tokens, pairs, kv_read)
            self.prefill_s += prefill
        self.busy_s += seconds
        return seconds

    def update_from_output(self, out: _StepOutput) -> None:
        """vLLM's `update_from_output`, in scheduling order: each request whose step sampled
        gets its token; one with all its output finishes and frees its blocks there and
        then (so a step's finishers are freed in scheduling order). Async: the token's
        placeholder is consumed and the blocks it fills are cached."""
        for i, num_new in out.scheduled:
            self.in_flight[i] -= num_new
            stale = self.stale[i] > 0
            if stale:
                self.stale[i] -= num_new
            if self.finished[i] or not out.samples[i]:
                continue
            was_running = not stale and i in self.running
            self.num_tokens[i] += 1
            if self.async_scheduling and not stale:
                self.placeholders[i] -= 1
            if self.async_scheduling and was_running:
                self.cache.cache_blocks(str(i), self.computed[i] - self.placeholders[i], self.hashes[i])
            if self.num_tokens[i] - self.prompt[i] >= self.target[i]:
                self.finish(i, was_running)
                self.finished_at[i] = out.end_clock
                self.last_finish = max(self.last_finish, out.end_clock)

    def finish(self, i: int, was_running: bool) -> None:
        """Request i has all its output: it leaves its queue, and frees its blocks (tail first)."""
        self.finished[i] = True
        if was_running:
            self.running.remove(i)
            self.cache.free(str(i))
        else:
            self.waiting.remove(i)


def _with_decode_hashes(bs: int, block_hashes: Sequence[Sequence[Hashable]], prompt: list[int],
                        end_tokens: list[int]) -> list[Sequence[Hashable]]:
    """Each request's full-block hashes to its end: the prompt's, then its own decode ones."""
    out: list[Sequence[Hashable]] = []
    for i, h in enumerate(block_hashes):
        extra = max(end_tokens[i] // bs - prompt[i] // bs, 0)
        out.append(list(h[: prompt[i] // bs]) + [("decode", i, k) for k in range(extra)])
    return out
