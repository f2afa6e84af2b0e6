"""Benchmark: the whole pc-advise pipeline against one `kvlint analyze`, same log, same tokenizer.

Not a test. Issue #15's side-by-side figure. Both tools read one JSONL file of OpenAI chat
bodies (`messages`, `tools`, `model` and a `timestamp` at the top of each line: the shape
kvlint's `openai` reader takes), made from bench_ingest_tokenize.py's seeded chat log
(multi-turn conversations that resend their history, 30% tool-using agents), and one
tokenizer folder: pc-advise's embedded Qwen2.5 tokenizer, written out with
`ensure_embedded` and passed to both (`--tokenizer` / `--model`).

What each command computes differs, and the comparison is in pc-advise's disfavour:
- pc-advise: `pc-advise run LOG --no-replay --force` — every stage (ingest, tokenize,
  analyze, simulate's default grid of block sizes x budgets x policies x modes and the
  concurrent scheduler runs, recommend, the HTML and Markdown report);
- kvlint: `kvlint analyze LOG --engine vllm --block-size 16` — one block size, an infinite
  cache, the sequential vLLM engine (kvlint 0.1.1; install it in its own venv:
  `python -m venv /tmp/kvl && /tmp/kvl/bin/pip install kvlint==0.1.1`).
kvlint renders a tool-calling assistant turn with empty content (it keeps no `tool_calls`),
so its prompts are a little shorter than pc-advise's; the tokenizer work is otherwise the same.

The two commands run alternately, `--runs` times each, in fresh processes; the figures are
the medians of wall time and the peak RSS of each command's whole process tree (worker
processes included, sampled every 50 ms). Results: bench/out/vs_kvlint.json.

    .venv/bin/python bench/bench_vs_kvlint.py --kvlint /tmp/kvl/bin/kvlint            # 200 MiB, 3 runs
    .venv/bin/python bench/bench_vs_kvlint.py --kvlint /tmp/kvl/bin/kvlint --mb 20 --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_ingest_tokenize import generate  # noqa: E402  (bench scripts import each other by path)
from bench_scale import measure  # noqa: E402

OUT = HERE / "out"


def flat_log(mb: float, seed: int) -> Path:
    """The chat log with each request body at the top of its line (written once, then reused)."""
    OUT.mkdir(parents=True, exist_ok=True)
    nested = OUT / f"chat_{mb:g}mb_seed{seed}.jsonl"
    if not nested.exists():
        generate(nested, int(mb * 2**20), seed)
    flat = OUT / f"chat_{mb:g}mb_seed{seed}_flat.jsonl"
    if not flat.exists():
        part = flat.with_suffix(".part")
        with open(nested, encoding="utf-8") as src, open(part, "w", encoding="utf-8") as dst:
            for line in src:
                row = json.loads(line)
                dst.write(json.dumps({"timestamp": row["timestamp"], **row["request"]}, ensure_ascii=False) + "\n")
        part.rename(flat)
    return flat


def tokenizer_folder() -> Path:
    from advisor.tokens.default_tokenizer import ensure_embedded

    return ensure_embedded(OUT / "tokenizer")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kvlint", required=True, help="the kvlint executable (in its own venv)")
    ap.add_argument("--mb", type=float, default=200.0, help="the chat log's size in MiB (before flattening)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=3, help="runs of each command, alternated")
    ap.add_argument("--block-size", type=int, default=16, help="kvlint's one block size")
    args = ap.parse_args()

    log, tok = flat_log(args.mb, args.seed), tokenizer_folder()
    run_dir = OUT / "vs_kvlint"
    run_dir.mkdir(parents=True, exist_ok=True)
    pc_advise = str(Path(sys.executable).with_name("pc-advise"))
    commands = {
        "pc-advise": [pc_advise, "run", str(log), "--tokenizer", str(tok), "--no-replay", "--force", "-q",
                      "-o", str(run_dir / "pc-advise")],
        "kvlint": [args.kvlint, "analyze", str(log), "--model", str(tok), "--engine", "vllm",
                   "--block-size", str(args.block_size), "--json", str(run_dir / "kvlint.json")],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for i in range(args.runs):
        for name, cmd in commands.items():
            result = measure(cmd, env)
            result["load_average"] = os.getloadavg()[0]
            runs[name].append(result)
            print(f"run {i + 1} {name}: {result['wall_s']} s, {result['peak_rss_gib']} GiB, exit {result['exit']}",
                  flush=True)
            if result["exit"]:
                return 1
    median = {name: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                     "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in rs)} for name, rs in runs.items()}
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "log": str(log), "log_mib": round(log.stat().st_size / 2**20, 1),
        "cpus": os.cpu_count(),
        "commands": {name: " ".join(cmd) for name, cmd in commands.items()},
        "median": median,
        "speedup": round(median["kvlint"]["wall_s"] / median["pc-advise"]["wall_s"], 2),
        "memory_ratio": round(median["kvlint"]["peak_rss_gib"] / max(median["pc-advise"]["peak_rss_gib"], 1e-9), 2),
        "runs": runs,
    }
    manifest = run_dir / "pc-advise" / "manifest.json"
    if manifest.exists():
        stages = json.loads(manifest.read_text()).get("stages", {})
        summary["pc_advise_stage_s"] = {k: v.get("wall_s") for k, v in stages.items() if isinstance(v, dict)}
    (OUT / "vs_kvlint.json").write_text(json.dumps(summary, indent=2))
    for name, cmd in summary["commands"].items():
        print(f"  {name}: {cmd}")
    print(json.dumps({k: summary[k] for k in ("log_mib", "median", "speedup", "memory_ratio")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
