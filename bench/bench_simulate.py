"""Benchmark: the simulator's fast path against vLLM's own KVCacheManager, and Mooncake traces.

Usage:
    .venv/bin/python bench/bench_simulate.py [--tokens 50e6] [--seed 0] [--no-vllm] [--traces DIR]

1. Generates a seeded token workload of >= --tokens prompt tokens (multi-turn chat
   sessions over shared system prompts, some with a per-request "timestamp" token that
   breaks the shared prefix), then times the full default grid (block sizes 16, 32,
   64, 128 x 8 budgets from 1% to 120% of each block size's working set, plus the
   infinite-cache ceiling) through `advisor.sim.fast.sequential`, sequential mode; then the
   reference policies FIFO and Belady over the B=16 budgets.
2. Replays ONE configuration of the same workload (B=16, the grid's middle budget)
   through vLLM's KVCacheManager, driven standalone as its scheduler would, and
   checks its hit tokens equal the fast path's; prints the wall-time ratio.
3. The simulate stage's own default grid on the same workload (`simulate.simulate_grid`:
   sequential LRU at every budget plus FIFO/Belady reference lines, and the concurrent
   event loop at every budget, with synthetic arrivals and output lengths), timed whole
   (1 and 2 threads) and sequential-only, so the cost of each mode is visible; then the
   ratio of vLLM's one configuration to each grid.
4. Mooncake traces (512-token hash blocks): a 16-budget sweep of the conversation
   trace (seconds, peak RSS) and the infinite-cache ceiling of both traces, next to
   the published cache ratios (40% conversation, 66% synthetic).

Peak RSS is the process's high-water mark (ru_maxrss), printed after each part; the
fast-path part runs before vLLM is imported.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from advisor.sim.fast import policies as fastpolicy
from advisor.sim.fast import sequential as fastsim
from advisor.sim.fast import trace as fasttrace

BLOCK_SIZES = (16, 32, 64, 128)
NUM_BUDGETS = 8


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def chat_prompts(target_tokens: int, rng: np.random.Generator) -> list[tuple[float, int, np.ndarray]]:
    """Chat sessions: system prompt + growing history + new user turn, interleaved in time;
    (arrival second, session, prompt tokens) per request in time order."""
    vocab = 150_000
    systems = [rng.integers(0, vocab, rng.integers(500, 3000), dtype=np.int32) for _ in range(24)]
    prompts: list[tuple[float, int, np.ndarray]] = []
    total = 0
    session = 0
    while total < target_tokens:
        system = systems[int(rng.integers(len(systems)))]
        if rng.random() < 0.15:  # a timestamp early in the system prompt breaks sharing
            system = system.copy()
            system[20] = rng.integers(0, vocab)
        history = system
        t = rng.random() * 3600.0
        for _ in range(int(rng.integers(1, 9))):
            user = rng.integers(0, vocab, int(rng.integers(50, 800)), dtype=np.int32)
            prompt = np.concatenate([history, user])
            prompts.append((t, session, prompt))
            total += len(prompt)
            output = rng.integers(0, vocab, int(rng.integers(50, 500)), dtype=np.int32)
            history = np.concatenate([prompt, output])
            t += 5.0 + 60.0 * rng.random()
        session += 1
    prompts.sort(key=lambda p: (p[0], p[1]))
    return prompts


def make_workload(target_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`chat_prompts` as one token array and its offsets."""
    prompts = chat_prompts(target_tokens, np.random.default_rng(seed))
    offsets = np.zeros(len(prompts) + 1, np.int64)
    offsets[1:] = np.cumsum([len(p[2]) for p in prompts])
    return np.concatenate([p[2] for p in prompts]), offsets


def budgets_for(working_set: int) -> list[int]:
    fractions = np.geomspace(0.01, 1.2, NUM_BUDGETS)
    return sorted({max(int(working_set * f), 1) for f in fractions})


def bench_fast_grid(tokens: np.ndarray, offsets: np.ndarray) -> dict[int, dict[int | None, int]]:
    print(f"\n== fast path: {len(BLOCK_SIZES)} block sizes x {NUM_BUDGETS} budgets + ceiling, sequential ==")
    queries = int(offsets[-1])
    hits: dict[int, dict[int | None, int]] = {}
    start = time.perf_counter()
    traces = fasttrace.traces_from_tokens(tokens, offsets, BLOCK_SIZES)  # hashes tokens once
    print(f"block keys and dense ids, all block sizes: {time.perf_counter() - start:.1f}s")
    for bs in BLOCK_SIZES:
        trace = traces[bs]
        t1 = time.perf_counter()
        budgets: list[int | None] = [*budgets_for(trace.working_set_blocks()), None]
        results = fastsim.sweep_sequential(trace, budgets)
        t2 = time.perf_counter()
        hits[bs] = {r.num_blocks: r.hits for r in results}
        curve = "  ".join(f"{(r.num_blocks or 0):>8}:{r.hits / queries:6.1%}" for r in results)
        print(f"B={bs:<4} blocks={len(trace.ids):>9,} distinct={trace.num_ids:>9,} sweep {t2 - t1:5.1f}s")
        print(f"        {curve}   (0 = infinite)")
    wall = time.perf_counter() - start
    print(f"grid wall time: {wall:.1f}s   peak RSS so far: {rss_mib():,.0f} MiB")
    hits[0] = {0: int(wall * 1000)}
    trace = traces[16]
    for policy in ("fifo", "belady"):
        t0 = time.perf_counter()
        results = [fastpolicy.simulate_sequential_policy(trace, b, policy) for b in budgets_for(trace.working_set_blocks())]
        curve = "  ".join(f"{r.num_blocks:>8}:{r.hits / queries:6.1%}" for r in results)
        print(f"reference policy {policy:<6} B=16, {len(results)} budgets: {time.perf_counter() - t0:5.1f}s\n        {curve}")
    return hits


def bench_vllm_one(tokens: np.ndarray, offsets: np.ndarray, block_size: int, num_blocks: int) -> tuple[float, int]:
    import torch
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
    )
    from vllm.v1.request import Request

    init_none_hash(sha256)
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
    config = KVCacheConfig(num_blocks=num_blocks + 1, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    manager = KVCacheManager(config, max_model_len=1 << 20, scheduler_block_size=block_size,
                             hash_block_size=block_size, enable_caching=True, log_stats=True)
    hasher = get_request_block_hasher(block_size, sha256)
    params = SamplingParams(max_tokens=1)
    start = time.perf_counter()
    for i in range(len(offsets) - 1):
        req = Request(str(i), tokens[offsets[i]:offsets[i + 1]].tolist(), params, None, block_hasher=hasher)
        blocks, num_hit, _ = manager.get_computed_blocks(req)
        if manager.allocate_slots(req, req.num_tokens - num_hit, num_hit, blocks, full_sequence_must_fit=True) is None:
            continue  # longer than the pool: vLLM would refuse it (the fast path gives 0 too)
        manager.record_prefix_cache_stats(req, num_hit)
        manager.free(req)
    wall = time.perf_counter() - start
    stats = manager.make_prefix_cache_stats()
    assert stats is not None
    return wall, int(stats.hits)


def load_trace(path: Path) -> fasttrace.BlockTrace:
    ids: list[int] = []
    offsets = [0]
    lengths = []
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            ids.extend(row["hash_ids"])
            offsets.append(len(ids))
            lengths.append(row["input_length"])
    return fasttrace.trace_from_hash_ids(np.asarray(ids, np.int64), np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), 512)


def bench_mooncake(folder: Path) -> None:
    print("\n== Mooncake traces, 512-token blocks, sequential ==")
    for name, published in (("conversation", 0.40), ("synthetic", 0.66)):
        path = folder / f"{name}_trace.jsonl"
        if not path.exists():
            print(f"{path} missing: skipped")
            continue
        t0 = time.perf_counter()
        trace = load_trace(path)
        queries = int(trace.num_tokens.sum())
        ceiling = fastsim.ceiling_hits(trace).sum()
        t1 = time.perf_counter()
        line = (f"{name}: {trace.num_requests:,} requests, {queries / 1e6:.1f}M prompt tokens, "
                f"{trace.num_ids:,} distinct full blocks; infinite-cache ceiling (vLLM rules) "
                f"{ceiling / queries:.1%} (published cache ratio {published:.0%}); load+ceiling {t1 - t0:.1f}s")
        print(line)
        if name == "conversation":
            budgets = sorted({max(int(trace.num_ids * f), 1) for f in np.geomspace(0.01, 1.2, 16)})
            results = fastsim.sweep_sequential(trace, budgets)
            t2 = time.perf_counter()
            print("  " + "  ".join(f"{r.num_blocks}:{r.hits / queries:.1%}" for r in results))
            print(f"  {len(budgets)}-budget sweep {t2 - t1:.2f}s (whole trace: load, ceiling, sweep {t2 - t0:.2f}s); "
                  f"peak RSS so far {rss_mib():,.0f} MiB")


def bench_stage_grid(tokens: np.ndarray, offsets: np.ndarray, seed: int) -> dict[str, float]:
    """The `simulate` stage's default grid, as `pc-advise simulate` runs it: wall seconds by label."""
    import pyarrow as pa

    from advisor import schema
    from advisor.sim.configuration import SimulateOptions
    from advisor.sim.grid import simulate_grid
    from advisor.workload import Workload

    n = len(offsets) - 1
    rng = np.random.default_rng(seed)
    w = Workload(
        request_ids=pa.array([f"r{i}" for i in range(n)]),
        n_tokens=np.diff(offsets).astype(np.int64),
        output_tokens=rng.integers(16, 400, n).astype(np.int64),
        timestamps=np.cumsum(rng.exponential(0.5, n)),  # ~2 requests/s
        latency_s=np.full(n, np.nan), ttft_s=np.full(n, np.nan),
        lora=[None] * n, cache_salt=[None] * n,
        token_values=tokens, token_offsets=offsets.astype(np.int64),
        hash_values=None, hash_offsets=None, trace_block_size=None,
    )
    # Load (or compile, the first time on a machine) every kernel on a tiny slice first:
    # numba caches them on disk, so this is a one-off cost, not the grid's.
    t0 = time.perf_counter()
    small = Workload.from_token_lists([tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(20)],
                                      output_tokens=[40] * 20, timestamps=list(range(20)))
    simulate_grid(small, SimulateOptions(block_sizes=(16,)))
    print(f"kernels loaded in {time.perf_counter() - t0:.1f}s (one-off; compiles when numba's cache is cold)")
    walls: dict[str, float] = {}
    for label, opts in (
        ("sequential only (lru + fifo/belady lines), 1 thread", SimulateOptions(modes=(schema.MODE_SEQUENTIAL,))),
        ("whole default grid (sequential + concurrent), 1 thread", SimulateOptions()),
        ("whole default grid (sequential + concurrent), 2 threads", SimulateOptions(workers=2)),
    ):
        t0 = time.perf_counter()
        grid = simulate_grid(w, opts)
        walls[label] = time.perf_counter() - t0
        configs = grid.sim.num_rows // 2
        print(f"stage grid, {label}: {configs} configurations ({grid.sim.num_rows} rows) in {walls[label]:.1f}s; "
              f"peak RSS {rss_mib():,.0f} MiB")
    return walls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, default=50e6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--traces", type=Path, default=Path("/work/shared/traces/mooncake"))
    args = ap.parse_args()
    print(f"numba: {fasttrace.HAVE_NUMBA}")
    bench_mooncake(args.traces)
    t0 = time.perf_counter()
    tokens, offsets = make_workload(int(args.tokens), args.seed)
    print(f"\nworkload: {len(offsets) - 1:,} requests, {int(offsets[-1]):,} prompt tokens "
          f"(generated in {time.perf_counter() - t0:.1f}s); peak RSS {rss_mib():,.0f} MiB")
    hits = bench_fast_grid(tokens, offsets)
    grid_s = hits[0][0] / 1000
    print("\n== the simulate stage's default grid on the same workload ==")
    walls = bench_stage_grid(tokens, offsets, args.seed)
    if args.no_vllm:
        return
    bs = 16
    budgets = sorted(b for b in hits[bs] if b is not None)
    budget = budgets[len(budgets) // 2]
    print(f"\n== vLLM KVCacheManager, ONE configuration: B={bs}, {budget:,} blocks ==")
    wall, vllm_hits = bench_vllm_one(tokens, offsets, bs, budget)
    print(f"vLLM: {wall:.1f}s, hit tokens {vllm_hits:,}; fast path hit tokens {hits[bs][budget]:,} "
          f"({'equal' if vllm_hits == hits[bs][budget] else 'DIFFERENT'})   peak RSS {rss_mib():,.0f} MiB")
    print("\n== wall time of vLLM's one configuration / each grid ==")
    print(f"  {wall / grid_s:5.2f}x  exact LRU grid, {len(BLOCK_SIZES)} block sizes x {NUM_BUDGETS} budgets + ceiling "
          f"({grid_s:.1f}s)")
    for label, s in walls.items():
        print(f"  {wall / s:5.2f}x  stage {label} ({s:.1f}s)")


if __name__ == "__main__":
    main()
