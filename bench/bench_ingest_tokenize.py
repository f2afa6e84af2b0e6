"""Benchmark: ingest MB/s and tokenize tokens/s on a generated >= 200 MB chat log.

Not a test. Writes a seeded chat log (multi-turn conversations that repeat
their history, tool-using agents, a shared system prompt) into bench/out/,
then times:
  1. ingest: the log -> requests.parquet (MB of log per second);
  2. tokenize: requests.parquet -> tokens.parquet, the whole stage (prompt
     tokens per second), with the embedded Qwen2.5 tokenizer;
  3. raw: the same tokenizer's Rust `encode_batch` alone on the same rendered
     texts (rendered beforehand, untimed), in the same batch size.
The tokenize stage here runs in this process (tokenize_file, one segment cache);
bench/bench_tokenize.py times the stage as `run_tokenize` runs it (worker processes).
It prints the figures and the ratio tokenize / raw (1.0 = the stage costs no
more than the bare tokenizer), and writes them to bench/out/results.json.

    .venv/bin/python bench/bench_ingest_tokenize.py            # 200 MB, seed 0
    .venv/bin/python bench/bench_ingest_tokenize.py --mb 20    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"

WORDS = (
    "the of and to in is that for it as with was on be by this are or from at an which have "
    "not but they all were one we can there their been if more when will would who so no "
    "cache prefix block token request model server latency memory budget queue tensor layer "
    "attention kernel batch prompt system user assistant tool function result error retry "
    "customer order invoice shipment account balance refund policy contract clause section "
    "patient dose symptom diagnosis trial cohort protocol vaccine gene protein enzyme"
).split()
CJK = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"
CODE = [
    "def handler(event, context):\n    return {'status': 200, 'body': json.dumps(event)}\n",
    "for (let i = 0; i < items.length; i++) { total += items[i].price * items[i].qty; }\n",
    "SELECT id, name, created_at FROM users WHERE org_id = $1 ORDER BY created_at DESC;\n",
]


def _sentence(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.08:
        return "".join(rng.choice(CJK) for _ in range(rng.randint(10, 40))) + "。"
    if r < 0.14:
        return rng.choice(CODE)
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 24))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 10**6)))
    return " ".join(words).capitalize() + rng.choice([".", ".", "?", "!", ":\n"])


def _text(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def generate(path: Path, target_bytes: int, seed: int) -> int:
    """Write conversations until the file reaches target_bytes; returns lines written."""
    rng = random.Random(seed)
    system = "You are a support assistant for ExampleCorp. " + _text(rng, 40)
    tools = [
        {"type": "function", "function": {
            "name": f"tool_{i}", "description": _text(rng, 3),
            "parameters": {"type": "object", "properties": {
                f"arg_{j}": {"type": "string", "description": _text(rng, 1)} for j in range(4)},
                "required": ["arg_0"]}}}
        for i in range(8)
    ]
    written = lines = 0
    t0 = 1_760_000_000.0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            agent = rng.random() < 0.3
            history: list[dict] = [{"role": "system", "content": system}]
            for _turn in range(rng.randint(2, 8)):
                history.append({"role": "user", "content": _text(rng, rng.randint(2, 12))})
                body: dict = {"model": "qwen2.5-7b-instruct", "messages": list(history)}
                if agent:
                    body["tools"] = tools
                line = json.dumps({"timestamp": t0 + lines * 0.05, "request": body,
                                   "response": {"usage": {"completion_tokens": 120}}},
                                  ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                lines += 1
                if agent and rng.random() < 0.6:
                    history.append({"role": "assistant", "content": None, "tool_calls": [{
                        "id": f"call_{lines}", "type": "function", "function": {
                            "name": rng.choice(tools)["function"]["name"],
                            "arguments": json.dumps({"arg_0": _text(rng, 1)})}}]})
                    history.append({"role": "tool", "tool_call_id": f"call_{lines}",
                                    "content": _text(rng, rng.randint(3, 20))})
                else:
                    history.append({"role": "assistant", "content": _text(rng, rng.randint(2, 10))})
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=200.0, help="log size to generate (MiB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--regenerate", action="store_true", help="rewrite the log even if present")
    args = ap.parse_args()

    from advisor.ingest import stage as ing
    from advisor.tokens import stage as tk
    from advisor.tokens.chatprompt import render_chat

    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / f"chat_{int(args.mb)}mb_seed{args.seed}.jsonl"
    if args.regenerate or not log.exists():
        t = time.perf_counter()
        n = generate(log, int(args.mb * (1 << 20)), args.seed)
        print(f"generated {log} ({n} lines) in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    size_mb = log.stat().st_size / 1e6

    # 1. ingest
    requests, rejects = OUT / "requests.parquet", OUT / "rejects.jsonl"
    opts = ing.IngestOptions(format=None, trace_block_size=512, rate=1.0,
                             max_line_bytes=32 << 20)
    t = time.perf_counter()
    counts = ing.ingest_source(str(log), requests, rejects, opts).as_counts()
    ingest_s = time.perf_counter() - t

    # 2. tokenize (the stage), tokenizer loading timed apart
    t = time.perf_counter()
    tokenizer = tk.load_tokenizer(None, OUT / "cache")
    load_s = time.perf_counter() - t
    options = tk.TokenizeOptions(tokenizer=None, workers=args.workers)
    t = time.perf_counter()
    res = tk.tokenize_file(requests, OUT / "tokens.parquet", tokenizer, options)
    tokenize_s = time.perf_counter() - t

    # 3. raw encode_batch on the same rendered texts, same batch size (rendering untimed)
    import pyarrow.parquet as pq

    batch_rows = tk.BATCH_ROWS
    batches: list[list[str]] = []
    t = time.perf_counter()
    for batch in pq.ParquetFile(requests).iter_batches(batch_size=batch_rows,
                                                       columns=["messages", "tools"]):
        batches.append([
            render_chat(tokenizer, json.loads(m), json.loads(tl) if tl else None)
            for m, tl in zip(batch.column("messages").to_pylist(),
                             batch.column("tools").to_pylist())
        ])
    render_s = time.perf_counter() - t
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    raw_tokens = 0
    t = time.perf_counter()
    for texts in batches:
        raw_tokens += sum(len(e.ids) for e in encode(texts, add_special_tokens=False))
    raw_s = time.perf_counter() - t

    result = {
        "log_mb": round(size_mb, 1),
        "lines": counts["lines_read"],
        "accepted": counts["accepted"],
        "ingest_s": round(ingest_s, 2),
        "ingest_mb_per_s": round(size_mb / ingest_s, 2),
        "tokenizer_load_s": round(load_s, 2),
        "tokenize_s": round(tokenize_s, 2),
        "prompt_tokens": res.tokens,
        "tokenize_tokens_per_s": round(res.tokens / tokenize_s),
        "render_only_s": round(render_s, 2),
        "raw_encode_s": round(raw_s, 2),
        "raw_tokens": raw_tokens,
        "raw_encode_tokens_per_s": round(raw_tokens / raw_s),
        "tokenize_over_raw": round((res.tokens / tokenize_s) / (raw_tokens / raw_s), 3),
        "workers": args.workers,
        "cpus": os.cpu_count(),
    }
    assert raw_tokens == res.tokens, "raw and stage token counts differ"
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
