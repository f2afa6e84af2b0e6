"""Benchmark: the replica grid (N engines behind each router) against the single-engine grid.

Usage:
    .venv/bin/python bench/bench_replicas.py [--tokens 50e6] [--seed 0] [--workers 2]
                                             [--replicas 1,2,4,8] [--modes sequential,concurrent]

1. Generates a seeded token workload of >= --tokens prompt tokens: bench_simulate.py's chat
   sessions (system prompts shared by many sessions, a growing history per session, some
   timestamps breaking the shared prefix), keeping each request's session id and its time
   (sessions start over an hour, turns 5-65 s apart), and 16-400 output tokens.
2. Times the simulate stage's default grid without replicas (`simulate_grid`, every default:
   block sizes 16-128, 10 budgets, sequential + concurrent, fifo/belady and caching-off lines),
   then the same grid with `--replicas` x every router (the replica grid runs at the
   reference budgets, 4 per block size, in both modes), each with `--workers` threads; prints
   both wall times, their ratio (the issue's target: the replica grid within 4x the
   single-engine grid), the replica grid's own share, and the peak RSS after each.
3. Prints the replica rows at block size 16 and the largest reference budget: hit rate,
   load spread and TTFT p95 per router and replica count.

Peak RSS is the process's high-water mark (ru_maxrss).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import pyarrow as pa
from bench_simulate import (
    chat_prompts,  # run as python bench/bench_replicas.py: bench/ is on the path
)

from advisor import schema
from advisor.sim.configuration import SimulateOptions
from advisor.sim.grid import simulate_grid
from advisor.sim.routing import ROUTERS
from advisor.workload import Workload


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """CPU seconds of the process so far, all threads (less noisy than wall time on a shared machine)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_workload(target_tokens: int, seed: int) -> Workload:
    """bench_simulate.py's chat sessions, with session ids, times and output lengths kept."""
    rng = np.random.default_rng(seed)
    prompts = chat_prompts(target_tokens, rng)
    n = len(prompts)
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([len(p[2]) for p in prompts])
    nan = np.full(n, np.nan)
    return Workload(
        request_ids=pa.array([f"r{i}" for i in range(n)]), n_tokens=np.diff(offsets),
        output_tokens=rng.integers(16, 400, n).astype(np.int64), timestamps=np.array([p[0] for p in prompts]),
        latency_s=nan, ttft_s=nan, lora=[None] * n, cache_salt=[None] * n,
        token_values=np.concatenate([p[2] for p in prompts]), token_offsets=offsets,
        hash_values=None, hash_offsets=None, trace_block_size=None, sessions=[f"s{p[1]}" for p in prompts],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, default=50e6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--replicas", default="1,2,4,8")
    ap.add_argument("--modes", default="sequential,concurrent")
    args = ap.parse_args()
    t0 = time.perf_counter()
    w = make_workload(int(args.tokens), args.seed)
    print(f"workload: {w.num_requests:,} requests, {int(w.n_tokens.sum()):,} prompt tokens, "
          f"{len(set(w.sessions)):,} sessions over {w.timestamps.max() - w.timestamps.min():,.0f} s "
          f"(generated in {time.perf_counter() - t0:.1f}s); peak RSS {rss_mib():,.0f} MiB")
    modes = tuple(args.modes.split(","))
    counts = tuple(int(x) for x in args.replicas.split(","))
    t0 = time.perf_counter()  # load (or compile) every kernel on a small slice first: a one-off cost
    small = Workload.from_token_lists([w.token_values[w.token_offsets[i]:w.token_offsets[i + 1]].tolist()
                                       for i in range(30)], output_tokens=[40] * 30, timestamps=list(range(30)),
                                      sessions=w.sessions[:30])
    simulate_grid(small, SimulateOptions(block_sizes=(16,), modes=modes, replicas=(1, 2), routers=ROUTERS))
    print(f"kernels loaded in {time.perf_counter() - t0:.1f}s (one-off; compiles when numba's cache is cold)")

    single = SimulateOptions(modes=modes, workers=args.workers)
    t0, c0 = time.perf_counter(), cpu_s()
    grid = simulate_grid(w, single)
    single_s, single_cpu = time.perf_counter() - t0, cpu_s() - c0
    print(f"\nsingle-engine default grid ({args.workers} threads): {grid.sim.num_rows // 2} configurations in "
          f"{single_s:.1f}s ({single_cpu:.1f} CPU s); peak RSS {rss_mib():,.0f} MiB")

    many = SimulateOptions(modes=modes, workers=args.workers, replicas=counts, routers=ROUTERS)
    t0, c0 = time.perf_counter(), cpu_s()
    grid = simulate_grid(w, many)
    both_s, both_cpu = time.perf_counter() - t0, cpu_s() - c0
    rows = grid.replicas.to_pylist()
    print(f"the same grid with replicas {args.replicas} x {len(ROUTERS)} routers ({args.workers} threads): "
          f"{len(rows)} replica rows, {both_s:.1f}s ({both_cpu:.1f} CPU s) in all, the replica grid's share "
          f"{both_s - single_s:.1f}s ({both_cpu - single_cpu:.1f} CPU s); peak RSS {rss_mib():,.0f} MiB")
    print(f"replica grid / single-engine grid: {(both_s - single_s) / single_s:.2f}x wall, "
          f"{(both_cpu - single_cpu) / single_cpu:.2f}x CPU (whole grid with replicas / without: "
          f"{both_s / single_s:.2f}x wall; the issue's target: within 4x)")

    at16 = [r for r in rows if r["block_size"] == 16]
    nb = max(r["num_blocks"] for r in at16)
    print(f"\nblock size 16, {nb:,} blocks per replica:")
    for mode in (m for m in (schema.MODE_SEQUENTIAL, schema.MODE_CONCURRENT) if m in modes):
        print(f"  {mode}: hit rate / load spread{' / TTFT p95' if mode == schema.MODE_CONCURRENT else ''}")
        for router in ROUTERS:
            cells = []
            for count in counts:
                (r,) = [r for r in at16 if (r["mode"], r["num_blocks"], r["replicas"], r["router"]) ==
                        (mode, nb, count, router)]
                ttft = f" {r['ttft_p95_s']:.2f}s" if r["ttft_p95_s"] is not None else ""
                cells.append(f"{count}: {r['hit_rate']:6.1%} {r['load_spread']:4.2f}{ttft}")
            print(f"    {router:13s} " + "  ".join(cells))


if __name__ == "__main__":
    main()
