"""Measured time through an in-process vLLM engine: the timing half of `replay --measure-time`.

Input: the variants of one replay (advisor/replay/timing.py: the log as it is with prefix
caching on and off, sharing removed, breakers fixed), the configurations to confirm (the
first one this machine can run is timed), `EngineOptions` (the mode), how requests arrive,
and a model folder. Output: one run of replay.json's `time` object (its keys: stage.py).

The variants run on one engine per prefix-caching setting (two engines: caching on, shared
by the variants that cache, and caching off), with the block size and pool pinned as the
confirmation replay's. Before each variant the engine is warmed with one request (its own
cache salt) and its prefix cache is reset, so every variant starts from an empty cache on a
warm engine; each then gets the same requests:

- `sequential` mode: one request at a time, prefill only (`max_tokens=1`): TTFT is the
  request's pure prefill time, with no queueing;
- `concurrent` mode: each request generates its logged output length (`ignore_eos`), and
  arrives either all at once (`burst`: every request due at the start, FCFS in log order,
  so the engine is never idle and the wall time is the time to serve the log at this
  machine's capacity) or at its logged offset divided by `speedup` on this machine's wall
  clock (`paced`: latency at a given load). Not the confirmation replay's cost-model clock:
  here the arrivals and the measurements share one real clock.

The loop steps `LLMEngine` directly (as the concurrent confirmation does): a request's first
token is timed when the step that produced it returns, which is when a streaming client
would receive it; vLLM's own `RequestOutput.metrics.first_token_latency` is recorded beside
it. Counters are vLLM's `prefix_cache_queries` / `prefix_cache_hits` over the timed requests.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

from advisor.replay import timing
from advisor.replay.engine import _metric_counters, _open_llm, _prompt, with_stand_ins
from advisor.replay.plan import (
    CPU_BLOCK_MULTIPLE,
    EngineOptions,
    ReplayConfig,
    ReplayView,
    confirmability,
    max_model_len,
    output_lengths,
)
from advisor.schema import MODE_SEQUENTIAL

WARMUP_TOKENS = 256
WARMUP_SALT = "pc-advise-warmup"


def timed_config(views: Sequence[ReplayView], configs: Sequence[ReplayConfig], opts: EngineOptions,
                 cpu: bool) -> tuple[ReplayConfig | None, str | None]:
    """(the configuration to time, None) or (None, why none can run here): the first of
    `configs` (CPU stand-ins included) that every variant's requests fit."""
    reasons = []
    for cfg in with_stand_ins(configs, cpu):
        why = next((r for v in views if (r := confirmability(v, cfg, opts.mode, opts.max_output_tokens, cpu))), None)
        if why is None:
            return cfg, None
        reasons.append(why)
    return None, "; ".join(dict.fromkeys(reasons))


def measure_run(
    variants: Sequence[timing.Variant], configs: Sequence[ReplayConfig], opts: EngineOptions,
    model_dir: str, arrivals: str, speedup: float, tick: Callable[[int], None] = lambda _n: None,
) -> dict[str, Any]:
    """Time every runnable variant in `opts.mode`; the run's entry in replay.json's time.runs."""
    from vllm.platforms import current_platform

    cpu = bool(current_platform.is_cpu())
    views = [v.view for v in variants if v.view is not None]
    cfg, why = timed_config(views, configs, opts, cpu)
    sequential = opts.mode == MODE_SEQUENTIAL
    run: dict[str, Any] = {
        "mode": opts.mode, "arrivals": timing.ARRIVALS_ONE_AT_A_TIME if sequential else arrivals,
        "speedup": speedup if not sequential and arrivals == "paced" else None,
        "max_num_seqs": opts.max_num_seqs,
        "max_output_tokens": None if sequential else opts.max_output_tokens,
        "block_size": cfg.block_size if cfg else None, "num_blocks": cfg.num_blocks if cfg else None,
        "request_ids": views[0].request_ids if views else [],
    }
    if cfg is None:
        return {**run, "status": timing.STATUS_NOT_RUN, "reason": why, "variants": {}, "ratios": {}}
    if cfg not in configs:
        run["stand_in_for"] = [[c.block_size, c.num_blocks] for c in configs if c.block_size % CPU_BLOCK_MULTIPLE]
    max_len = max(max_model_len(v, opts.mode, opts.max_output_tokens) for v in views)
    by_variant = {v.name: timing.not_run_variant(v) for v in variants if v.view is None}
    for caching in dict.fromkeys(v.prefix_caching for v in variants if v.view is not None):
        llm = _open_llm(model_dir, cfg, max_len, opts, enable_prefix_caching=caching, enforce_eager=cpu)
        try:
            for v in variants:
                if v.view is not None and v.prefix_caching == caching:
                    by_variant[v.name] = timing.summarise(
                        v, _measure_variant(llm, v.view, opts, arrivals, speedup, tick))
        finally:
            del llm
            _release(cpu)
    by_variant = {v.name: by_variant[v.name] for v in variants}  # in the variants' order
    return {**run, "status": timing.STATUS_MEASURED, "reason": None, "variants": by_variant,
            "ratios": timing.ratios(by_variant)}


def _release(cpu: bool) -> None:
    """Free the engine before the next one starts (on a GPU its weights and pool too)."""
    gc.collect()
    if not cpu:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


def _measure_variant(llm: Any, w: ReplayView, opts: EngineOptions, arrivals: str, speedup: float,
                     tick: Callable[[int], None]) -> timing.Measured:
    _warm_up(llm, w)
    read_counters = _metric_counters()
    llm.reset_prefix_cache()
    q0, h0 = read_counters(llm)
    outs = output_lengths(w, opts.mode, opts.max_output_tokens)
    if opts.mode == MODE_SEQUENTIAL:
        due = None
    elif arrivals == "burst":
        due = [0.0] * len(w.token_ids)
    else:
        due = [a / speedup for a in w.arrival_s]
    m = _step_loop(llm.llm_engine, w, outs, due, tick)
    q1, h1 = read_counters(llm)
    m.engine_queries, m.engine_hits = q1 - q0, h1 - h0
    return m


def _warm_up(llm: Any, w: ReplayView) -> None:
    """One short request before timing, so one-off costs (first kernels, allocator growth)
    fall outside the measurement; its own salt keeps it from sharing with the log."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(w.token_ids, key=len, default=[])
    if not longest:
        return
    prompt = TokensPrompt(prompt_token_ids=longest[:WARMUP_TOKENS], cache_salt=WARMUP_SALT)
    llm.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False), use_tqdm=False)


def _step_loop(engine: Any, w: ReplayView, outs: list[int], due: list[float] | None,
               tick: Callable[[int], None]) -> timing.Measured:
    """Feed and step the engine; per-request times on the wall clock.

    `due`: each request's arrival offset in seconds from the start (None: one at a time,
    each submitted when the previous one finished). A request is added at the first step
    boundary after it is due (as a server's engine loop picks it up), but its TTFT counts
    from when it was due.
    """
    from vllm import SamplingParams

    n = len(w.token_ids)
    ttft: list[float | None] = [None] * n
    e2e: list[float | None] = [None] * n
    cached: list[int | None] = [None] * n
    out_tokens: list[int | None] = [None] * n
    engine_ttft: list[float | None] = [None] * n
    arrival: list[float] = [0.0] * n
    order = [i for i in sorted(range(n), key=lambda k: ((due[k] if due else 0.0), k)) if w.token_ids[i]]
    t0 = time.perf_counter()
    j = 0
    last_end = t0
    while j < len(order) or engine.has_unfinished_requests():
        now = time.perf_counter()
        while j < len(order) and (
                (due is None and not engine.has_unfinished_requests()) or (due is not None and t0 + due[order[j]] <= now)):
            i = order[j]
            j += 1
            arrival[i] = now if due is None else t0 + due[i]
            sp = SamplingParams(max_tokens=outs[i], ignore_eos=True, detokenize=False)
            engine.add_request(f"t{i}", _prompt(w, i), sp)
        if not engine.has_unfinished_requests():
            if j < len(order) and due is not None:  # idle until the next arrival
                time.sleep(max(0.0, t0 + due[order[j]] - time.perf_counter()))
            continue
        for ro in engine.step():
            t = time.perf_counter()
            i = int(ro.request_id[1:])
            if ttft[i] is None and ro.outputs and len(ro.outputs[0].token_ids):
                ttft[i] = t - arrival[i]
            if ro.finished:
                e2e[i] = t - arrival[i]
                last_end = max(last_end, t)
                cached[i] = int(ro.num_cached_tokens or 0)
                out_tokens[i] = len(ro.outputs[0].token_ids) if ro.outputs else 0
                metrics = getattr(ro, "metrics", None)
                latency = getattr(metrics, "first_token_latency", None)
                engine_ttft[i] = float(latency) if latency else None
                tick(1)
    return timing.Measured(ttft, e2e, cached, out_tokens, engine_ttft, wall_s=last_end - t0,
                           engine_queries=0, engine_hits=0)


def device_description() -> str:
    """What ran the engine, for replay.json (the GPU's name, or the CPU's core count)."""
    import os

    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return f"cpu ({os.cpu_count()} logical cores visible)"
    try:
        import torch

        return f"{current_platform.device_name}: {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - the name is a label only
        return str(current_platform.device_name)
