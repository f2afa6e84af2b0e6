"""Benchmark: concurrent mode's compiled event loop (advisor.sim.fast.events) on one workload.

Usage:
    .venv/bin/python bench/bench_concurrent.py [--requests 20000] [--rate 20] [--seed 0]

Generates a seeded log of `--requests` requests over 20 shared system prompts (200-1,500
tokens) plus a 20-400-token tail each, 20-400 output tokens, Poisson arrivals at `--rate`
requests/s, and runs the compiled loop at block size 16 with vLLM's small-GPU batch limits
(256 sequences, 2,048 tokens per step) at three pool sizes (tight: preemptions; roomy; past
the working set), sync and async scheduling, on the flat clock and on the roofline of
llama-3.1-8b on an H100. Prints wall time, engine steps, preemptions and hit rate per run.
A low `--rate` (e.g. 0.5) is the case the quiet-step jumps exist for: long decodes with
few requests running.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from advisor.sim.fast import trace as fasttrace
from advisor.sim.fast.events import run_concurrent_compiled
from advisor.sim.steptime import StepTimeModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    n = args.requests
    systems = [rng.integers(1, 30_000, int(rng.integers(200, 1500))) for _ in range(20)]
    reqs = [np.concatenate([systems[int(rng.integers(0, 20))], rng.integers(1, 30_000, int(rng.integers(20, 400)))])
            for _ in range(n)]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum([len(r) for r in reqs], out=offsets[1:])
    trace = fasttrace.trace_from_tokens(np.concatenate(reqs).astype(np.int32), offsets, 16)
    lengths, outs = np.diff(offsets), rng.integers(20, 400, n)
    arrivals = np.cumsum(rng.exponential(1 / args.rate, n))
    clocks = {"flat": StepTimeModel.from_rates(10_000.0, 50.0), "roofline": StepTimeModel.for_model("llama-3.1-8b", "h100")}
    small = fasttrace.trace_from_tokens(np.concatenate(reqs[:50]).astype(np.int32), offsets[:51], 16)
    run_concurrent_compiled(small, 2000, lengths[:50], outs[:50], arrivals[:50], clocks["flat"], 256)  # compile / load
    print(f"{n:,} requests, {int(lengths.sum()):,} prompt tokens, {args.rate:g} requests/s")
    for clock_name, clock in clocks.items():
        for scheduling in ("sync", "async"):
            for num_blocks in (3_000, 20_000, 200_000):
                t0 = time.perf_counter()
                r = run_concurrent_compiled(trace, num_blocks, lengths, outs, arrivals, clock, 256,
                                            max_num_batched_tokens=2048, async_scheduling=scheduling == "async")
                wall = time.perf_counter() - t0
                print(f"{clock_name:8s} {scheduling:5s} {num_blocks:>7,} blocks: {wall:5.2f}s  steps {r.steps:>9,}  "
                      f"preemptions {r.preemptions:>6,}  hit rate {r.hit_tokens.sum() / lengths.sum():.3f}")


if __name__ == "__main__":
    main()
