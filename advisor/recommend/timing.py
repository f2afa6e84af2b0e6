"""What prefix caching buys in time at the recommended configuration.

Inputs: the workload (and, when analyze found fixable cache breakers, the log after the
fixes: advisor.analyze.rewrite), the recommended block size and budget, and the
`SimulateOptions` the simulate stage ran with (its clock: advisor.sim.steptime). Output:
recommendation.json's `time` section: concurrent mode at the logged arrival rate and with
every request waiting at once (saturated, which gives the request rate the engine
completes at full load), each for the log with prefix caching on and off
(`schema.POLICY_OFF`: the same engine and clock, no cache read), with sharing removed
(every request its own cache salt: the same lengths and arrivals, low overlap), and with
the breakers fixed.

The saturated rate is the highest arrival rate this engine sustains for this log's mix of
lengths and reuse: above it the waiting queue grows without bound. It is measured on the
same log with its arrivals compressed to one instant (the order kept), so reuse follows the
log's order; a real queue at a lower rate interleaves requests differently, which changes
evictions at tight budgets. The ratio on/off is what caching is worth in GPUs: the share
of replicas caching saves at the same peak load is `1 - off / on`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace
from typing import Any

from advisor import schema
from advisor.recommend.traces import Traces
from advisor.sim.configuration import ConfigResult, SimulateOptions, simulate_one
from advisor.workload import Workload

# arrivals divided by this are within microseconds of each other: every request is waiting
SATURATED_SPEEDUP = 1e12


def simulate_options_from_record(recorded: dict[str, Any]) -> SimulateOptions:
    """The simulate stage's options as recorded in the manifest (lists back to tuples)."""
    names = {f.name for f in fields(SimulateOptions)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in names}
    return SimulateOptions(**{**kw, "workers": 1})


def _figures(res: ConfigResult) -> dict[str, Any]:
    assert res.timing is not None
    stats = res.timing.stats()
    t = res.totals()
    return {
        "hit_rate": round(t["hit_rate"], 6),
        **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()},
        "preemptions": res.preemptions,
    }


def caching_time(workload: Workload, block_size: int, num_blocks: int, options: SimulateOptions, *,
                 fixed: Workload | None = None, fixed_record: dict[str, Any] | None = None,
                 traces: Traces | None = None) -> dict[str, Any]:
    """The `time` section (module docstring) for one configuration. Besides caching on and
    off: `sharing_removed`, every request with a salt of its own (the same log with no
    overlap), and `breakers_fixed`, the log after analyze's fixes (`fixed`, from
    advisor.analyze.rewrite; `fixed_record` says what was rewritten, or why nothing was)."""
    opts = replace(options, workers=1)
    traces = traces or Traces(workload)  # each variant's block trace, made once for both loads
    runs: dict[str, dict[str, Any]] = {}
    variants = [("on", workload, schema.POLICY_LRU), ("off", workload, schema.POLICY_OFF)]
    if not workload.is_hash_trace:
        variants.append(("sharing_removed", traces.unshared(workload), schema.POLICY_LRU))
    if fixed is not None:
        variants.append(("breakers_fixed", fixed, schema.POLICY_LRU))
    inputs = {id(w): (traces.trace(w, block_size), traces.prepared(w, block_size)) for _, w, _ in variants}
    loads = (("logged_rate", opts.speedup), ("saturated", SATURATED_SPEEDUP))
    todo = [(load, speedup, name, w, policy) for load, speedup in loads for name, w, policy in variants]

    def one(item: tuple[str, float, str, Workload, str]) -> dict[str, Any]:
        _, speedup, _, w, policy = item
        trace, prepared = inputs[id(w)]
        return _figures(simulate_one(w, block_size, num_blocks, mode=schema.MODE_CONCURRENT, policy=policy,
                                     options=replace(opts, speedup=speedup), trace=trace, prepared=prepared))

    # independent runs over shared, read-only inputs: threads (the compiled runs release the GIL)
    with ThreadPoolExecutor(max(1, min(options.workers, len(todo)))) as pool:
        for (load, _, name, _, _), figures in zip(todo, pool.map(one, todo), strict=True):
            runs.setdefault(load, {})[name] = figures
    clock = opts.step_time_model(workload.n_tokens, workload.output_tokens, workload.latency_s, workload.ttft_s)
    logged, sat = runs["logged_rate"], runs["saturated"]
    on_rps, off_rps = sat["on"]["throughput_rps"], sat["off"]["throughput_rps"]
    gain = on_rps / off_rps if on_rps and off_rps else None
    arrival = arrival_rate(workload, opts.speedup)
    return {
        # the log's own request rate; a variant whose sustained rate is below it is overloaded at
        # the logged rate: its queue grows for the whole log, so its TTFT there measures the log's
        # length more than the engine
        "arrival_rps": round(arrival, 6) if arrival is not None else None,
        "overloaded": {name: bool(arrival is not None and sat[name]["throughput_rps"] is not None
                                  and sat[name]["throughput_rps"] < arrival) for name in sat},
        "block_size": block_size,
        "num_blocks": num_blocks,
        "clock": clock.as_dict(),
        "scheduling": opts.scheduling,
        **runs,
        "ttft_p50_speedup": _ratio(logged["off"]["ttft_p50_s"], logged["on"]["ttft_p50_s"]),
        "ttft_p95_speedup": _ratio(logged["off"]["ttft_p95_s"], logged["on"]["ttft_p95_s"]),
        "saturated_throughput_gain": round(gain, 4) if gain else None,
        "replicas_saved_share": round(1 - 1 / gain, 4) if gain else None,
        "sustained_rate_multiple": _ratio(on_rps, logged["on"]["throughput_rps"]),
        "breakers_fixed": fixed_record,
        "how": ("concurrent mode at the recommended configuration, prefix caching on and off (same engine and "
                "clock); 'saturated' runs every request waiting at once: the request rate the engine completes "
                "at full load, the highest arrival rate it sustains for this log's mix"),
    }


def arrival_rate(workload: Workload, speedup: float = 1.0) -> float | None:
    """Requests per second over the log's arrival span (after `speedup`), or None for a log whose
    requests all arrive at once."""
    t = workload.arrivals(speedup)
    span = float(t.max() - t.min()) if len(t) > 1 else 0.0
    return (len(t) - 1) / span if span > 0 else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None
