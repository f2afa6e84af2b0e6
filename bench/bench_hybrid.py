"""Benchmark: hybrid models (sliding window) in the simulator, against full attention.

Usage:
    .venv/bin/python bench/bench_hybrid.py [--requests 2000] [--tokens 4096] [--seed 0]

1. A seeded workload of --requests prompts of --tokens tokens (eight 2,000-token system
   prompts, then distinct text), arrivals ~0.5 s apart, 20-200 output tokens.
2. One sequential configuration of gpt-oss-20b's KV cache groups (B=16, 40,000 blocks): the
   readable reference (`advisor.sim.hybrid.sequential_hits_hybrid`) against the compiled twin
   (`advisor.sim.fast.hybrid`), with their hits compared.
3. The sequential grid (`--modes sequential`, 4 block sizes x 10 budgets, GPU budget of an
   H100) for Llama-3.1-8B (full attention, fifo/belady lines included), gpt-oss-20b and
   Gemma 3 27B.
4. One concurrent configuration (B=16, 20,000 blocks): the compiled full-attention engine
   against the hybrid reference engine (events.Engine over HybridPrefixCache).

docs/simulate.md ("Hybrid models", Speed) has the figures.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from advisor import kvmemory as kv
from advisor.sim.configuration import (
    SimulateOptions,
    TraceHashes,
    block_trace,
    simulate_one,
)
from advisor.sim.fast.hybrid import simulate_sequential_hybrid
from advisor.sim.grid import simulate_grid
from advisor.sim.hybrid import sequential_hits_hybrid
from advisor.workload import Workload

GPT_OSS = (("sliding_window", 128), ("full", None))


def workload(requests: int, tokens: int, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, 150_000, 2000).tolist() for _ in range(8)]
    prompts = [systems[int(rng.integers(8))] + rng.integers(0, 150_000, max(tokens - 2000, 1)).tolist()
               for _ in range(requests)]
    return Workload.from_token_lists(prompts, timestamps=np.cumsum(rng.exponential(0.5, requests)).tolist(),
                                     output_tokens=rng.integers(20, 200, requests).tolist())


def timed(fn):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    w = workload(args.requests, args.tokens, args.seed)
    print(f"{w.num_requests:,} requests, {int(w.n_tokens.sum()):,} prompt tokens")
    trace = block_trace(w, 16)
    hashes = TraceHashes(trace)
    ref, t_ref = timed(lambda: sequential_hits_hybrid([hashes[i] for i in range(trace.num_requests)],
                                                      trace.num_tokens.tolist(), GPT_OSS, 16, 40_000))
    simulate_sequential_hybrid(trace, GPT_OSS, 40_000)  # compile
    fast, t_fast = timed(lambda: simulate_sequential_hybrid(trace, GPT_OSS, 40_000))
    print(f"one sequential configuration (gpt-oss groups, B=16): reference {t_ref:.2f} s, compiled {t_fast:.3f} s, "
          f"hits equal: {fast.hit_tokens.tolist() == ref}")
    for model in ("llama-3.1-8b", "gpt-oss-20b", "gemma-3-27b"):
        options = SimulateOptions(model=model, gpu="h100", modes=("sequential",), workers=1)
        simulate_grid(w, options, kv.resolve_model(model))  # compile
        grid, t = timed(lambda options=options, model=model: simulate_grid(w, options, kv.resolve_model(model)))
        print(f"sequential grid, {model}: {t:.2f} s, {grid.sim.num_rows} rows")
    for model in ("llama-3.1-8b", "gpt-oss-20b"):
        options = SimulateOptions(model=model, gpu="h100", workers=1)
        _, t = timed(lambda options=options: simulate_one(w, 16, 20_000, mode="concurrent", options=options))
        print(f"one concurrent configuration, {model} (B=16, 20,000 blocks): {t:.2f} s")


if __name__ == "__main__":
    main()
