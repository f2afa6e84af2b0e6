"""What prefix caching buys in time, measured on a GPU: the driver behind bench/gpu_throughput.sh.

Usage (on a machine with an NVIDIA GPU and vLLM's CUDA build; bench/gpu_throughput.sh checks both):
    python bench/gpu_throughput.py [--model llama-3.1-8b | --model /path/to/model] [--out DIR]
                                   [--logs sample_logs/fewshot_template.jsonl,...] [--modes concurrent|sequential|both]
                                   [--arrivals burst|paced] [--replay-limit N]

For each log (default: a high-overlap one, sample_logs/fewshot_template.jsonl, where nearly
every prompt is a shared template; and a low-overlap one, sample_logs/timestamp_system_prompt.jsonl,
whose timestamp breaks the shared system prompt, so its breakers-fixed variant shows what
the fix buys): the whole pipeline with `--model` and this GPU (the prediction), then
`pc-advise replay --measure-time`: the log as it is with prefix caching on and off,
sharing removed (a cache salt per request) and breakers fixed, each through a fresh
in-process vLLM engine with CUDA graphs. A catalog name is built as its real architecture
with random weights (`random:<name>`: hits and time depend on shapes, not weights); a
local folder is served as it is. Prints one table and writes DIR/gpu_throughput.json
(per log: the replay.json `time` object, documented in advisor/replay/stage.py, and the
recommendation it timed). Exits 2 without a usable CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LOGS = ("sample_logs/fewshot_template.jsonl", "sample_logs/timestamp_system_prompt.jsonl")
NO_GPU = 2


def gpu_or_exit() -> tuple[str, float]:
    """(the GPU's name, its memory in GiB), or exit 2 saying why this cannot run here."""
    try:
        import torch
    except ImportError:
        sys.exit(_refuse("torch is not importable here; install vLLM's CUDA build (pip install 'pc-advise[vllm]')"))
    if not torch.cuda.is_available():
        sys.exit(_refuse("torch sees no CUDA GPU (torch.cuda.is_available() is False: a CPU-only torch, or no "
                         "driver)"))
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory / (1 << 30)


def _refuse(why: str) -> int:
    print(f"gpu_throughput: {why}. This benchmark times a real GPU; run it on a machine with an NVIDIA GPU, or "
          "use `pc-advise replay RUN --measure-time` to check the mechanism on a CPU.", file=sys.stderr)
    return NO_GPU


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b", help="catalog name (random weights) or local model folder")
    ap.add_argument("--out", default="gpu-throughput-out")
    ap.add_argument("--logs", default=",".join(DEFAULT_LOGS))
    ap.add_argument("--modes", default="concurrent", choices=["sequential", "concurrent", "both"])
    ap.add_argument("--arrivals", default="burst", choices=["burst", "paced"])
    ap.add_argument("--replay-limit", type=int, default=5000)
    args = ap.parse_args()
    name, gib = gpu_or_exit()

    import advisor
    from advisor import kvmemory
    from advisor.cli.stages import cache_dir

    gpu = kvmemory.gpu_key(name) or f"{gib:.1f}"
    local = (Path(args.model) / "config.json").exists()
    replay_model = args.model if local else f"random:{args.model}"
    out = Path(args.out)
    results: dict[str, object] = {"gpu": name, "gpu_spec": gpu, "model": args.model, "replay_model": replay_model,
                                  "logs": {}}
    for log in filter(None, args.logs.split(",")):
        log_path = (ROOT / log) if not Path(log).exists() else Path(log)
        run_dir = out / log_path.name.split(".")[0]
        print(f"== {log_path.name}: pipeline (--model {args.model} --gpu {gpu}) ...", flush=True)
        advisor.run(log_path, out=run_dir, model=args.model, gpu=gpu, replay=False, cache_dir=cache_dir())
        print(f"== {log_path.name}: replay --measure-time ({args.modes}, {args.arrivals}) ...", flush=True)
        advisor.run_replay(run_dir, advisor.ReplayOptions(
            replay=True, measure_time=True, replay_mode=args.modes, time_arrivals=args.arrivals,
            replay_model=replay_model, replay_limit=args.replay_limit), cache_dir=cache_dir())
        advisor.run_report(run_dir)
        replay = json.loads((run_dir / "replay.json").read_text())
        rec = json.loads((run_dir / "recommendation.json").read_text())
        results["logs"][log_path.name] = {  # type: ignore[index]
            "run_dir": str(run_dir), "recommended": rec.get("recommended"), "vllm_serve": rec.get("vllm_serve"),
            "replay_status": replay.get("status"), "time": replay.get("time")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_throughput.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"\nwritten: {out / 'gpu_throughput.json'}")
    return 0


def table(results: dict[str, object]) -> str:
    """The measured variants of every log, one row each, then the on/off ratios."""
    rows = [("log", "mode", "variant", "hit rate", "TTFT p50 ms", "p95", "p99", "e2e p50 ms", "req/s", "out tok/s")]
    ratio_rows = [("log", "mode", "on/off TTFT p50", "on/off TTFT p95", "on/off req/s", "fixed/on TTFT p50")]
    for log, entry in results["logs"].items():  # type: ignore[attr-defined]
        t = entry["time"] or {}
        for run in t.get("runs", []):
            for name, v in run.get("variants", {}).items():
                if v.get("status") != "measured":
                    rows.append((log, run["mode"], name, "not run", "", "", "", "", "", ""))
                    continue
                ms = [(x * 1000 if x is not None else float("nan")) for x in
                      (v["ttft_s"]["p50"], v["ttft_s"]["p95"], v["ttft_s"]["p99"], v["e2e_s"]["p50"])]
                hr = v["counters"]["hit_rate"]
                rows.append((log, run["mode"], name, "-" if hr is None else f"{hr:.1%}",
                             *(f"{x:.1f}" for x in ms), f"{v['throughput']['requests_per_s']:.2f}",
                             f"{v['throughput']['output_tokens_per_s']:.0f}"))
            r = run.get("ratios") or {}
            on, fixed = r.get("on_vs_off") or {}, r.get("fixed_vs_on") or {}
            ratio_rows.append((log, run["mode"], *(_x(d.get(k)) for d, k in (
                (on, "ttft_p50"), (on, "ttft_p95"), (on, "requests_per_s"), (fixed, "ttft_p50")))))
    return _fmt(rows) + "\n\n" + _fmt(ratio_rows)


def _x(v: float | None) -> str:
    return "-" if v is None else f"x{v:.2f}"


def _fmt(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)


if __name__ == "__main__":
    sys.exit(main())
