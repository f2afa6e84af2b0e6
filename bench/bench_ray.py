"""Benchmark: the same log folder through the whole pipeline here and on a local 2-CPU Ray.

Not a test. Writes a seeded chat log (bench_ingest_tokenize's generator: multi-turn
conversations that resend their history, tool-using agents, a shared system prompt) as
`--files` files whose lines interleave in time, then runs, each into a fresh (emptied) run folder:
  1. local: `pc-advise run LOGS -o OUT/run-local --no-replay --workers 2`
  2. ray:   `pc-advise run LOGS -o OUT/run-ray --no-replay --workers 2 --executor ray`
            (starts a Ray on this machine with 2 CPUs and stops it at the end)
It checks that every artifact is the same bytes (the manifest less wall times and dates;
the reports less their timing tables), prints both commands, the wall time of each command
(the Ray one includes starting Ray) and of each stage, and writes them to bench/out/ray.json.

    .venv/bin/python bench/bench_ray.py              # 20 MB in 4 files, seed 0
    .venv/bin/python bench/bench_ray.py --mb 2       # a quick look
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "ray"
sys.path.insert(0, str(HERE))

from bench_ingest_tokenize import generate  # noqa: E402 - the sibling bench's generator


def write_logs(folder: Path, mb: float, files: int, seed: int) -> int:
    """One generated log dealt line by line into `files` files (each in time order)."""
    folder.mkdir(parents=True, exist_ok=True)
    whole = folder.parent / f"whole_{mb:g}mb_seed{seed}.jsonl"
    lines = generate(whole, int(mb * (1 << 20)), seed)
    outs = [open(folder / f"part{i}.jsonl", "w", encoding="utf-8") for i in range(files)]  # noqa: SIM115
    try:
        with open(whole, encoding="utf-8") as f:
            for i, line in enumerate(f):
                outs[i % files].write(line)
    finally:
        for o in outs:
            o.close()
    whole.unlink()
    return lines


def run(cmd: list[str]) -> float:
    print("$", shlex.join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def stage_times(run_dir: Path) -> dict[str, float]:
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    return {name: e["wall_s"] for name, e in stages.items() if "wall_s" in e}


def artifacts(run_dir: Path) -> dict[str, bytes]:
    """Every file of the run folder, less what differs between two runs: the manifest's wall
    times and dates and the tokenize stage's segment-cache counts, the reports' timing lines
    and run folder name. The stages' fingerprints stay in: they cover the code, so they differ
    only if the code changed between the runs."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.name == "manifest.json":
            stages = json.loads(data)["stages"]
            for e in stages.values():
                e.pop("wall_s", None)
                e.pop("finished_at", None)
                e.get("counts", {}).pop("html_bytes", None)
                e.get("counts", {}).pop("md_bytes", None)
            # the segment cache's hit counts: each worker process keeps its own cache, so they
            # depend on which worker got which batch (tokens.parquet does not)
            stages.get("tokenize", {}).get("counts", {}).pop("segments", None)
            # replay.json (skipped: "confirm it with `pc-advise replay RUN`") names the run folder,
            # so the report's fingerprint, which covers it, differs with the folder's name
            stages.get("report", {}).pop("key", None)
            stages.get("report", {}).get("inputs", {}).pop("replay.json", None)
            data = json.dumps(stages, sort_keys=True).encode()
        elif p.suffix in (".md", ".html") or p.name == "replay.json":
            text = data.decode().replace(str(run_dir), "RUN").replace(f"report: {run_dir.name}", "report: RUN")
            data = re.sub(r"\d+(\.\d+)? (ms|s)\b", "T", text).encode()
        out[str(p.relative_to(run_dir))] = data
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="log size to generate (MiB)")
    ap.add_argument("--files", type=int, default=4, help="files the log is dealt into")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="local workers, and the local Ray's CPUs")
    args = ap.parse_args()

    logs = OUT / f"logs_{args.mb:g}mb_{args.files}files_seed{args.seed}"
    if not logs.exists():
        print(f"writing {logs} ...", flush=True)
        print(f"  {write_logs(logs, args.mb, args.files, args.seed):,} requests", flush=True)
    pc_advise = str(Path(sys.executable).parent / "pc-advise")
    base = [pc_advise, "run", str(logs), "--no-replay", "--force", "-q", "--workers", str(args.workers)]
    results = {}
    for name, extra in (("local", []), ("ray", ["--executor", "ray"])):
        out = OUT / f"run-{name}"
        shutil.rmtree(out, ignore_errors=True)  # fresh: no block streams kept from an earlier run
        results[name] = {"command": shlex.join([*base[:3], "-o", str(out), *base[3:], *extra]),
                         "wall_s": round(run([*base[:3], "-o", str(out), *base[3:], *extra]), 2),
                         "stages_s": stage_times(out)}
    here, there = artifacts(OUT / "run-local"), artifacts(OUT / "run-ray")
    differ = sorted(n for n in set(here) | set(there) if here.get(n) != there.get(n))
    results["equal"] = not differ
    results["differ"] = differ
    results["files_compared"] = len(here)

    print(f"\n{'stage':<10} {'local s':>9} {'ray s':>9}")
    for stage, t in results["local"]["stages_s"].items():
        print(f"{stage:<10} {t:>9.2f} {results['ray']['stages_s'].get(stage, float('nan')):>9.2f}")
    print(f"{'command':<10} {results['local']['wall_s']:>9.2f} {results['ray']['wall_s']:>9.2f}  (ray: incl. starting Ray)")
    print(f"outputs equal: {results['equal']} ({len(here)} files compared)" + (f"; differ: {differ}" if differ else ""))
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "ray.json").write_text(json.dumps({**vars(args), **results}, indent=2))
    return 0 if results["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
