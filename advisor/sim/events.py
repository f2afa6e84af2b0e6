"""Concurrent mode: vLLM's v1 scheduler, step by step, on a cost-model clock.

Inputs: one `PrefixCache` (advisor.sim.cache, exact vLLM block rules), each request's prompt block hashes,
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
    blocks_used: int = 0  # highest block id ever taken + 1 (advisor.sim.fast.events; 0 where not tracked)


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
    Decode blocks get tuple hashes of their own. advisor.sim.fast.events runs this loop
    compiled (tested equal to it); the grid uses that.
    `skip_quiet_steps=False` takes every step one by one (the plain loop that the
    jumps are tested against).
    """
    assert max_num_seqs >= 1
    assert max_num_batched_tokens is None or max_num_batched_tokens >= 1
    cost = cost.calibrated(n_tokens, output_tokens, latency_s, ttft_s)
    scheduler = _Scheduler(cache, block_hashes, n_tokens, output_tokens, arrivals_s, cost, max_num_seqs,
                           max_num_batched_tokens)
    return scheduler.run(skip_quiet_steps)


class _Scheduler:
    """vLLM's FCFS scheduler and its engine's clock, for one `run_concurrent` call.

    `run` is the engine loop; each step of the module docstring is a method (`add_arrivals`,
    `schedule_running`, `schedule_waiting`, `update_from_output`). Invariants at the start
    of each step:
    - `computed[i]` and `outs[i]` are valid at step `anchor[i]`: a decoding request
      advances one token per step in between without being touched (`materialize`);
    - `running` is the running queue in admission order (`rank`); `prefilling` holds the
      running requests whose known tokens are not all computed; `waiting` is the waiting
      queue, preempted requests at its front;
    - every decoding request has one live heap entry `(step, seq, request, epoch)`: the
      next step in which it needs a new block or finishes. `epoch[i]` bumps when the
      request leaves the running queue, which makes its older entries stale.
    """

    def __init__(self, cache: PrefixCache, block_hashes: Sequence[Sequence[Hashable]], n_tokens: np.ndarray,
                 output_tokens: np.ndarray, arrivals_s: np.ndarray, cost: CostModel, max_num_seqs: int,
                 max_num_batched_tokens: int | None) -> None:
        n = len(n_tokens)
        self.cache = cache
        self.bs = cache.block_size
        self.step_s = 1.0 / cost.decode_tps
        self.prefill_tps = cost.prefill_tps
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens if max_num_batched_tokens is not None else 1 << 62
        self.prompt = [int(x) for x in n_tokens]
        self.target = [max(int(o), 1) for o in output_tokens]  # tokens sampled before finishing
        self.end_tokens = [_kv_tokens(self.prompt[i], self.target[i]) for i in range(n)]
        self.hashes = _with_decode_hashes(self.bs, block_hashes, self.prompt, self.end_tokens)
        self.hits = np.zeros(n, dtype=np.int64)
        self.scheduled = np.zeros(n, dtype=bool)
        self.computed = [0] * n
        self.outs = [0] * n
        self.anchor = [0] * n
        self.rank = [0] * n  # position in the running queue: admission order
        self.epoch = [0] * n
        self.heap: list[tuple[int, int, int, int]] = []  # (eventful step, seq, request, epoch)
        self.seq = 0
        self.waiting: deque[int] = deque()
        self.running: dict[int, None] = {}  # the running queue, in order (dicts keep insertion order)
        self.prefilling: set[int] = set()
        self.refused = self.preemptions = 0
        self.order = [int(i) for i in np.argsort(arrivals_s, kind="stable")]
        self.arrivals = [float(a) for a in arrivals_s]
        self.t0 = self.arrivals[self.order[0]] if n else 0.0
        self.clock, self.last_finish, self.step, self.j = self.t0, self.t0, 0, 0

    def run(self, skip_quiet: bool) -> ConcurrentResult:
        """The engine loop: one iteration is one schedule() + model step; with `skip_quiet`,
        steps in which nothing can change are taken in one jump."""
        stalled = False  # last step tried admission, and nothing freed since
        while self.j < len(self.order) or self.running or self.waiting:
            arrived = self.add_arrivals()  # 1.
            if not (self.running or self.waiting):
                continue
            quiet = skip_quiet and stalled and not arrived and not self.prefilling and bool(self.running)
            if quiet and self.skip_quiet_steps():
                continue
            chunks, decoded, budget, preempted = self.schedule_running()  # 2.
            # 3. only if nobody was preempted; what stops admission then lasts until a finish,
            # unless it was the budget
            stalled = not preempted and self.schedule_waiting(chunks, budget)
            if self.update_from_output(chunks, decoded):  # 4.
                stalled = False
                self.last_finish = self.clock
        assert not self.running and not self.waiting, "every admitted request finishes"
        return ConcurrentResult(
            hit_tokens=self.hits,
            scheduled=self.scheduled,
            evictions=self.cache.evictions,
            peak_blocks_in_use=self.cache.peak_blocks_in_use,
            preemptions=self.preemptions,
            refused=self.refused,
            makespan_s=self.last_finish - self.t0,
            steps=self.step,
        )

    def add_arrivals(self) -> bool:
        """Step 1: arrivals whose time has come join the tail of the waiting queue (an idle
        engine's clock first jumps to the next one); one whose end cannot fit the whole
        pool is refused. True when one joined."""
        if not self.running and not self.waiting:
            self.clock = max(self.clock, self.arrivals[self.order[self.j]])
        arrived = False
        while self.j < len(self.order) and self.arrivals[self.order[self.j]] <= self.clock:
            i = self.order[self.j]
            self.j += 1
            if self.prompt[i] <= 0:
                continue  # refused at tokenization: never runs, not counted
            if not self.cache.fits(self.end_tokens[i]):
                self.refused += 1
                continue
            self.waiting.append(i)
            arrived = True
        return arrived

    def skip_quiet_steps(self) -> int:
        """Steps with nothing but one decode token per running request, in one jump: up to
        the next live eventful step, or until an arrival is due. Returns the steps taken."""
        heap = self.heap
        while heap and heap[0][3] != self.epoch[heap[0][2]]:
            heapq.heappop(heap)
        quiet = heap[0][0] - self.step if heap else 0
        k = 0
        while k < quiet and (self.j >= len(self.order) or self.arrivals[self.order[self.j]] > self.clock):
            self.clock += self.step_s
            k += 1
        self.step += k
        return k

    def due_requests(self) -> list[int]:
        """The running requests with work in this step, in running-queue order: every
        prefilling one, and each decoding one whose eventful step has come."""
        due = set(self.prefilling)
        while self.heap and self.heap[0][0] <= self.step:
            _, _, i, ep = heapq.heappop(self.heap)
            if ep == self.epoch[i]:
                due.add(i)
        return sorted(due, key=self.rank.__getitem__)

    def schedule_running(self) -> tuple[list[tuple[int, int]], list[int], int, bool]:
        """Step 2: each due running request gets its next tokens (the rest of its prompt
        within the budget, or one decode token) and the KV slots for them. When the pool is
        short, the request at the END of the running queue is preempted, again until the
        slots are found or the request itself was preempted, which ends this phase.
        Returns (prefill chunks as (request, tokens), decoding requests, budget left,
        whether anyone was preempted)."""
        budget = self.token_budget - (len(self.running) - len(self.prefilling))  # decode tokens first (docstring)
        chunks: list[tuple[int, int]] = []
        decoded: list[int] = []
        preempted = False
        for i in self.due_requests():
            if i not in self.running:
                continue  # preempted earlier in this step
            if i in self.prefilling:
                num_new = min(self.known(i) - self.computed[i], budget)
                if num_new <= 0:
                    continue  # no budget left for its next chunk in this step
            else:
                self.materialize(i)
                num_new = 1
            while not self.cache.grow(str(i), self.computed[i] + num_new, self.hashes[i]):
                victim = next(reversed(self.running))
                self.preempt(victim)
                preempted = True
                if victim == i:
                    break
            if i not in self.running:
                break
            if i in self.prefilling:
                chunks.append((i, num_new))
                budget -= num_new
            else:
                decoded.append(i)
        return chunks, decoded, budget, preempted

    def preempt(self, v: int) -> None:
        """Preempt running request v (recompute): its blocks are freed and it goes to the
        FRONT of the waiting queue, to recompute its prompt and output when resumed."""
        if v not in self.prefilling:
            self.materialize(v)
            self.cache.grow(str(v), self.computed[v], self.hashes[v])  # cache blocks filled while decoding
        self.finish(v)
        self.computed[v] = 0
        self.waiting.appendleft(v)
        self.preemptions += 1

    def schedule_waiting(self, chunks: list[tuple[int, int]], budget: int) -> bool:
        """Step 3: waiting requests, in queue order, while fewer than `max_num_seqs` run and
        budget is left: the prefix-cache lookup, then blocks for everything not hit; the
        first that does not fit stops admission. Each admitted one joins the END of the
        running queue, prefilling, its first chunk appended to `chunks`. Returns False
        when admission stopped for want of budget (the next step has a new one)."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            if budget <= 0:
                return False
            i = self.waiting[0]
            resumed = bool(self.scheduled[i])
            total = self.known(i)
            hit = self.cache.admit(str(i), self.hashes[i], total, preempted=resumed)
            if hit is None:
                break
            self.waiting.popleft()
            self.running[i] = None
            self.rank[i] = self.seq
            self.seq += 1
            self.prefilling.add(i)
            self.computed[i] = hit
            if not resumed:  # vLLM's num_cached_tokens: the first scheduling's hit
                self.scheduled[i] = True
                self.hits[i] = hit
            num_new = min(total - hit, budget)
            chunks.append((i, num_new))
            budget -= num_new
        return True

    def update_from_output(self, chunks: list[tuple[int, int]], decoded: list[int]) -> bool:
        """Step 4: the step runs (the clock advances by its cost) and each request whose
        known tokens are all computed samples one token; finished requests free their
        blocks before the next step. True when one finished."""
        prefill_s = 0.0
        self.step += 1
        finished = False
        for i, num_new in chunks:
            self.computed[i] += num_new
            if self.computed[i] < self.known(i):
                continue  # a chunk of the prompt: nothing sampled yet
            self.prefilling.discard(i)
            if self.outs[i] == 0:  # its first token: the replay charges its prefill to this step
                prefill_s = max(prefill_s, (self.prompt[i] - int(self.hits[i])) / self.prefill_tps)
            self.outs[i] += 1
            self.anchor[i] = self.step
            finished |= self.after_sample(i)
        for i in decoded:
            self.computed[i] += 1
            self.outs[i] += 1
            self.anchor[i] = self.step
            finished |= self.after_sample(i)
        self.clock += self.step_s + prefill_s
        return finished

    def after_sample(self, i: int) -> bool:
        """True when the request has finished (then its blocks are freed, tail first); else
        its next eventful step goes on the heap."""
        if self.outs[i] < self.target[i]:
            self.push_next(i)
            return False
        self.finish(i)
        return True

    def finish(self, i: int) -> None:
        """Request i leaves the running queue (finished or preempted) and frees its blocks;
        its heap entries go stale."""
        del self.running[i]
        self.prefilling.discard(i)
        self.epoch[i] += 1
        self.cache.free(str(i))

    def known(self, i: int) -> int:
        """Tokens the request has: its prompt and every token sampled so far."""
        return self.prompt[i] + self.outs[i]

    def materialize(self, i: int) -> None:
        """Decoding request i computed one token and sampled one in each step since its anchor."""
        k = self.step - self.anchor[i]
        self.computed[i] += k
        self.outs[i] += k
        self.anchor[i] = self.step

    def push_next(self, i: int) -> None:
        """A decoding request, valid at this step: its next eventful step (a new block, or its
        last token)."""
        quiet = min(-self.computed[i] % self.bs, self.target[i] - self.outs[i] - 1)
        heapq.heappush(self.heap, (self.step + quiet, self.seq, i, self.epoch[i]))
        self.seq += 1


def _with_decode_hashes(bs: int, block_hashes: Sequence[Sequence[Hashable]], prompt: list[int],
                        end_tokens: list[int]) -> list[Sequence[Hashable]]:
    """Each request's full-block hashes to its end: the prompt's, then its own decode ones."""
    out: list[Sequence[Hashable]] = []
    for i, h in enumerate(block_hashes):
        extra = max(end_tokens[i] // bs - prompt[i] // bs, 0)
        out.append(list(h[: prompt[i] // bs]) + [("decode", i, k) for k in range(extra)])
    return out
