"""Benchmark: the whole tokenize stage against raw `encode_batch` on the same rendered prompts.

Not a test. Uses bench_ingest_tokenize's seeded chat log (multi-turn conversations that resend
their history, agents with shared tools, a shared system prompt; >= 40M prompt tokens at the
default 200 MiB), ingests it once, then times, each in a fresh Python process so no run
inherits another's imports or caches:
  1. load: importing transformers and loading the embedded Qwen2.5 tokenizer;
  2. stage: `tokenize_file_with` as `run_tokenize` runs it, once per executor asked for
     (`--workers 1`: this process; `--workers 2`: two worker processes), tokenizer loads and
     worker start-up included;
  3. raw: the tokenizer's Rust `encode_batch` alone on the same rendered prompts (rendered
     beforehand, the rendering timed apart), in batches of the stage's size; its ids are
     checked equal to every stage run's tokens.parquet, row by row.
It prints the figures, the ratio stage / raw throughput (wall), the CPU seconds of each (its
threads and worker processes included: steadier than wall time on a shared machine), the load
average, and the command, and writes them to bench/out/tokenize/results.json.

    .venv/bin/python bench/bench_tokenize.py                  # 200 MiB log, workers 1 and 2
    .venv/bin/python bench/bench_tokenize.py --mb 20 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "tokenize"
sys.path.insert(0, str(HERE))


def _prepare(mb: float, seed: int) -> Path:
    """The generated log, ingested (both kept in OUT and reused)."""
    from bench_ingest_tokenize import generate

    from advisor.ingest import stage as ing

    log = HERE / "out" / f"chat_{int(mb)}mb_seed{seed}.jsonl"
    if not log.exists():
        log.parent.mkdir(parents=True, exist_ok=True)
        generate(log, int(mb * (1 << 20)), seed)
    requests = OUT / f"requests_{int(mb)}mb_seed{seed}.parquet"
    if not requests.exists():
        opts = ing.IngestOptions(format=None, trace_block_size=512, rate=1.0, max_line_bytes=32 << 20)
        ing.ingest_source(str(log), requests, OUT / "rejects.jsonl", opts)
    return requests


def _cpu_s() -> float:
    """CPU seconds of this process, its threads and its finished children (worker processes)."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def _child(args: argparse.Namespace) -> dict:
    """One timed part in this (fresh) process."""
    from advisor.tokens import stage as tk

    requests, cache = Path(args.requests), OUT / "cache"
    if args.part == "load":
        t = time.perf_counter()
        tk.load_tokenizer(None, cache)
        return {"load_s": time.perf_counter() - t}
    if args.part == "stage":
        from advisor.executor import ExecutorOptions, open_executor

        out = OUT / f"tokens_w{args.workers}.parquet"
        t, cpu = time.perf_counter(), _cpu_s()
        with open_executor(ExecutorOptions(workers=args.workers)) as ex:
            res = tk.tokenize_file_with(ex, requests, out, tk.TokenizeOptions(workers=args.workers), cache)
        return {"stage_s": time.perf_counter() - t, "cpu_s": _cpu_s() - cpu, "tokens": res.tokens,
                "segments": res.segments, "path": str(out)}
    return _raw(requests, cache, tk)


def _raw(requests: Path, cache: Path, tk) -> dict:
    """Render every prompt (timed apart), then encode_batch alone; check the stage's ids."""
    import numpy as np
    import pyarrow.parquet as pq

    from advisor.tokens.chatprompt import render_chat

    tokenizer = tk.load_tokenizer(None, cache)
    texts: list[list[str]] = []
    t = time.perf_counter()
    for batch in pq.ParquetFile(requests).iter_batches(batch_size=tk.BATCH_ROWS, columns=["messages", "tools"]):
        texts.append([render_chat(tokenizer, json.loads(m), json.loads(tl) if tl else None)
                      for m, tl in zip(batch.column("messages").to_pylist(), batch.column("tools").to_pylist())])
    render_s = time.perf_counter() - t
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    ids: list[list[int]] = []
    t, cpu = time.perf_counter(), _cpu_s()
    for batch_texts in texts:
        ids.extend(e.ids for e in encode(batch_texts, add_special_tokens=False))
    raw_s, raw_cpu = time.perf_counter() - t, _cpu_s() - cpu
    flat = np.fromiter((i for row in ids for i in row), dtype=np.int32)
    lengths = np.array([len(row) for row in ids])
    equal = {}
    for f in sorted(OUT.glob("tokens_w*.parquet")):
        col = pq.read_table(f, columns=["token_ids"]).column("token_ids").combine_chunks()
        equal[f.name] = bool(np.array_equal(col.values.to_numpy(), flat)
                             and np.array_equal(np.diff(col.offsets.to_numpy()), lengths))
    return {"render_s": render_s, "raw_s": raw_s, "raw_cpu_s": raw_cpu, "raw_tokens": int(lengths.sum()), "ids_equal": equal}


def _run_child(argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=200.0, help="log size to generate (MiB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", default="1,2", help="executors to time: worker counts, comma-separated")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--requests", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:  # a child: one timed part
        args.workers = int(args.workers) if args.workers.isdigit() else 1
        print(json.dumps(_child(args)))
        return 0

    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("tokens_w*.parquet"):
        old.unlink()
    requests = _prepare(args.mb, args.seed)
    common = ["--requests", str(requests), "--mb", str(args.mb)]
    load = _run_child(["--part", "load", *common])
    stages = {w: _run_child(["--part", "stage", "--workers", w, *common]) for w in args.workers.split(",")}
    raw = _run_child(["--part", "raw", *common])
    raw_tps = raw["raw_tokens"] / raw["raw_s"]
    result = {
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "command": " ".join([".venv/bin/python", "bench/bench_tokenize.py", *sys.argv[1:]]),
        "requests": str(requests), "prompt_tokens": raw["raw_tokens"], "cpus": os.cpu_count(),
        "tokenizer_load_s": round(load["load_s"], 2),
        "render_only_s": round(raw["render_s"], 2),
        "raw_encode_s": round(raw["raw_s"], 2),
        "raw_encode_cpu_s": round(raw.get("raw_cpu_s", 0), 2),
        "raw_tokens_per_s": round(raw_tps),
        "stage": {f"workers={w}": {
            "stage_s": round(s["stage_s"], 2),
            "tokens_per_s": round(s["tokens"] / s["stage_s"]),
            "stage_over_raw": round(s["tokens"] / s["stage_s"] / raw_tps, 2),
            "stage_cpu_s": round(s.get("cpu_s", 0), 2),
            "raw_cpu_over_stage_cpu": round(raw.get("raw_cpu_s", 0) / s["cpu_s"], 2) if s.get("cpu_s") else None,
            "segment_hit_rate": s["segments"].get("hit_rate"),
            "segment_token_hit_rate": s["segments"].get("token_hit_rate"),
            "segments_encoded": s["segments"].get("encoded"),
        } for w, s in stages.items()},
        "ids_equal": raw["ids_equal"],
    }
    assert all(s["tokens"] == raw["raw_tokens"] for s in stages.values()), "token counts differ"
    assert all(raw["ids_equal"].values()) and len(raw["ids_equal"]) == len(stages), "ids differ"
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
