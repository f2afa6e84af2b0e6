"""Benchmark the analyze stage: wall time and peak RSS.

    python bench/bench_analyze.py synthetic [--tokens 50000000] [--seed 0]
    python bench/bench_analyze.py mooncake /work/shared/traces/mooncake/conversation_trace.jsonl

Each workload is written as a run folder (requests.parquet + tokens.parquet, as ingest and
tokenize would) and analysed in a fresh child process, so the peak RSS is the analysis alone
(reading the Parquet files included). The synthetic workload is seeded: 40 apps with system
prompts of 500-3,000 tokens, a fifth of them starting with a 6-token varying "timestamp" (a cache
breaker); conversations of 1-8 turns that repeat their history, interleaved in time. The breaker
search reads whole prompts (advisor/analyze/breakers.py); `breaker_search` says how much. The
reuse groups (advisor/analyze/reuse.py) get the written timestamps, one request per second.
Before/after figures of the reuse groups (which replaced k-means) are in docs/analyze.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from advisor import schema  # noqa: E402


def _write_run(run: Path, token_lists: pa.Array | None, n_tokens: np.ndarray,
               hash_ids: pa.Array | None, sessions: list[str | None], block: int | None) -> None:
    n = len(n_tokens)
    req = {f.name: pa.nulls(n, f.type) for f in schema.REQUESTS}
    req.update({
        "request_id": pa.array([f"r{i}" for i in range(n)]),
        "line": pa.array(np.arange(1, n + 1)),
        "timestamp": pa.array(np.arange(n, dtype=np.float64)),
        "kind": pa.array(["hash_trace" if hash_ids is not None else "tokens"] * n),
        "format": pa.array(["hash-trace" if hash_ids is not None else "completion"] * n),
        "model": pa.array(["bench-model"] * n),
        "session_id": pa.array(sessions, pa.string()),
    })
    if hash_ids is not None:
        req["hash_ids"] = hash_ids
        req["input_length"] = pa.array(n_tokens)
        req["trace_block_size"] = pa.array(np.full(n, block, dtype=np.int32))
    run.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(req, schema=schema.REQUESTS), run / "requests.parquet")
    tok = {f.name: pa.nulls(n, f.type) for f in schema.TOKENS}
    tok["request_id"] = req["request_id"]
    tok["n_tokens"] = pa.array(n_tokens.astype(np.int64))
    if token_lists is not None:
        tok["token_ids"] = token_lists
    pq.write_table(pa.table(tok, schema=schema.TOKENS), run / "tokens.parquet",
                   row_group_size=2048)


def synthetic(run: Path, total_tokens: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vocab = 150_000
    apps = [rng.integers(0, vocab, rng.integers(500, 3000), dtype=np.int32) for _ in range(40)]
    stamped = set(rng.choice(40, 8, replace=False).tolist())
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    sessions: list[str] = []
    active: list[dict] = []
    made = sid = 0
    while made < total_tokens:
        while len(active) < 64:
            app = int(rng.integers(0, 40))
            active.append({"app": app, "turns": int(rng.integers(1, 9)), "hist": [], "id": sid})
            sid += 1
        k = int(rng.integers(0, len(active)))
        s = active[k]
        s["hist"].append(rng.integers(0, vocab, rng.integers(50, 300), dtype=np.int32))
        parts = [apps[s["app"]], *s["hist"]]
        if s["app"] in stamped:
            parts.insert(0, rng.integers(0, vocab, 6, dtype=np.int32))
        prompt = np.concatenate(parts)
        pieces.append(prompt)
        lengths.append(len(prompt))
        sessions.append(f"s{s['id']}")
        made += len(prompt)
        s["hist"].append(rng.integers(0, vocab, rng.integers(100, 400), dtype=np.int32))  # reply
        s["turns"] -= 1
        if s["turns"] == 0:
            active.pop(k)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(pieces)))
    _write_run(run, lists, np.array(lengths), None, sessions, None)


def mooncake(run: Path, trace: Path, block: int) -> None:
    hashes, lengths = [], []
    with open(trace, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                hashes.append(row["hash_ids"])
                lengths.append(row["input_length"])
    _write_run(run, None, np.array(lengths), pa.array(hashes, pa.list_(pa.int64())),
               [None] * len(lengths), block)


def measure(run: Path) -> None:
    """Child process: load + analyze one run folder, print timings and peak RSS as JSON."""
    from advisor.analyze import stage as st

    t0 = time.perf_counter()
    workload = st.load_workload(run / "requests.parquet", run / "tokens.parquet")
    w = st.from_workload(workload)
    t1 = time.perf_counter()
    result = st.analyze(w, st.AnalyzeOptions(), decode=None, times=workload.timestamps)
    t2 = time.perf_counter()
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "requests": result.stats["requests"], "prompt_tokens": result.stats["prompt_tokens"],
        "ceiling_rate": round(result.stats["ceiling_rate"], 4),
        "breakers": len(result.stats["breakers"]), "reuse_groups": result.stats["clusters"]["count"],
        "top_level_groups": result.stats["clusters"]["top_level"],
        "one_shot_requests": result.stats["clusters"]["one_shot_requests"],
        "breaker_search": {k: v for k, v in result.stats["breaker_search"].items() if k != "searched"},
        "load_s": round(t1 - t0, 2), "analyze_s": round(t2 - t1, 2),
        "peak_rss_mib": round(rss_mib, 1),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synthetic")
    s.add_argument("--tokens", type=int, default=50_000_000)
    s.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("mooncake")
    m.add_argument("trace", type=Path)
    m.add_argument("--trace-block-size", type=int, default=512)
    c = sub.add_parser("_measure")
    c.add_argument("run", type=Path)
    args = ap.parse_args()
    if args.cmd == "_measure":
        measure(args.run)
        return
    with tempfile.TemporaryDirectory(prefix="bench-analyze-") as tmp:
        run = Path(tmp)
        t0 = time.perf_counter()
        if args.cmd == "synthetic":
            synthetic(run, args.tokens, args.seed)
        else:
            mooncake(run, args.trace, args.trace_block_size)
        print(f"workload written in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        out = subprocess.run([sys.executable, __file__, "_measure", str(run)], check=True,
                             capture_output=True, text=True)
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
