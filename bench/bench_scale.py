"""Benchmark: a generated multi-turn log of N prompt tokens through ingest -> tokenize -> simulate.

Not a test. Writes a seeded log into bench/out/scale/ line by line (never held): conversations
under a few shared system prompts, each turn resending the whole history (so most tokens are
repeats, as in real chat traffic). Then runs each stage as its own `pc-advise` command on the
default grid and reports, per stage, the wall time and the peak RSS (the stage's whole process
tree, summed: worker processes count; sampled every 50 ms from /proc, so Linux only), the
command, and simulate's block-stream counts. Two log kinds:
- `--kind ids` (default): `prompt_token_ids` lines, pre-tokenized (tokenize passes the ids
  through): ingest + simulate without the tokenizer's cost;
- `--kind text`: chat `messages` in words, tokenized by the stage with the embedded tokenizer
  (prompt tokens then are only known after tokenize; the log is sized by an estimate);
- `--kind chat --mb M`: bench_ingest_tokenize.py's chat log (multi-turn chats and tool-using
  agents, unicode, code; sized in MiB), the log issue #15's pipeline figures are taken on.
`--all-stages` adds analyze, recommend and report to the stages run one by one, to name the
stage whose memory peaks; `--pipeline` runs `pc-advise run LOG --no-replay` as one command.
With `--rerun`, simulate runs a second time with other budgets and must read the block streams
back instead of hashing (the report shows its time). Results go to bench/out/scale/results-<N>.json.

    .venv/bin/python bench/bench_scale.py --tokens 50M            # a quick look
    .venv/bin/python bench/bench_scale.py --tokens 1B             # the 1-billion-token run
    .venv/bin/python bench/bench_scale.py --kind chat --mb 170 --all-stages   # ~40M tokens, stage by stage
    .venv/bin/python bench/bench_scale.py --kind chat --mb 170 --pipeline     # `pc-advise run LOG --no-replay`
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "scale"
VOCAB = 150_000  # token ids drawn below this (Qwen2.5's vocabulary is 151,643)


def parse_count(text: str) -> int:
    """'50M', '1B', '2e8', '40000000' -> an int."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(text[-1:].upper())
    return int(float(text[:-1]) * scale) if scale else int(float(text))


# --- the log ---
class Words:
    """Seeded text: sentences of common words (about 1.3 tokens a word with Qwen2.5's tokenizer)."""

    WORDS = ("the of and to in is that for it as with was on be by this are or from at an which have not but "
             "they all were one we can there their been if more when will would who so no cache prefix block "
             "token request model server latency memory budget queue tensor layer attention kernel batch prompt "
             "system user assistant tool function result error retry customer order invoice shipment account "
             "balance refund policy contract clause section patient dose symptom diagnosis").split()

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def text(self, words: int) -> str:
        out = " ".join(self.rng.choice(self.WORDS) for _ in range(words))
        return out.capitalize() + "."


def generate(path: Path, tokens: int, kind: str, seed: int) -> dict[str, int]:
    """Write conversations until about `tokens` prompt tokens; return what was written.

    8 system prompts of 300-3,000 tokens; each conversation picks one and runs 2-16 turns of
    30-400 new user tokens, each reply 20-300 tokens and sent back in the next turn's history.
    """
    rng = random.Random(seed)
    words = Words(rng)
    per_word = 1.3  # text kind: a token estimate to size the log by
    systems_ids = [[rng.randrange(VOCAB) for _ in range(rng.randint(300, 3000))] for _ in range(8)]
    systems_text = [words.text(int(len(s) / per_word)) for s in systems_ids]
    written = lines = conversations = 0
    t0 = 1_760_000_000.0
    with open(path, "w", encoding="utf-8") as f:
        while written < tokens:
            conversations += 1
            which = rng.randrange(len(systems_ids))
            ids_text = ", ".join(map(str, systems_ids[which]))  # the history's ids as JSON, grown in place
            length = len(systems_ids[which])
            messages: list[dict[str, str]] = [{"role": "system", "content": systems_text[which]}]
            session = f"conv-{conversations}"
            for _turn in range(rng.randint(2, 16)):
                new, reply = rng.randint(30, 400), rng.randint(20, 300)
                head = json.dumps({"timestamp": t0 + lines * 0.02, "session_id": session, "output_tokens": reply})
                if kind == "ids":
                    ids_text += ", " + ", ".join(str(rng.randrange(VOCAB)) for _ in range(new))
                    length += new
                    f.write(f'{head[:-1]}, "prompt_token_ids": [{ids_text}]}}\n')
                    size = length
                else:
                    messages.append({"role": "user", "content": words.text(int(new / per_word))})
                    body = json.dumps({"model": "qwen2.5-7b-instruct", "messages": messages})
                    f.write(f'{head[:-1]}, "request": {body}}}\n')
                    size = len(systems_ids[which]) + sum(len(m["content"]) for m in messages[1:]) // 5
                written += size
                lines += 1
                if kind == "ids":
                    ids_text += ", " + ", ".join(str(rng.randrange(VOCAB)) for _ in range(reply))
                    length += reply
                else:
                    messages.append({"role": "assistant", "content": words.text(int(reply / per_word))})
                if written >= tokens:
                    break
    return {"lines": lines, "conversations": conversations, "prompt_tokens_written": written}


# --- measuring a command ---
def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for row in f:
                    if row.startswith("VmRSS:"):
                        total += int(row.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def measure(cmd: list[str], env: dict[str, str]) -> dict[str, object]:
    """Run `cmd`; its wall time, the peak RSS of its process tree, its exit status and output tail."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - t
    if proc.returncode:
        print(output[-4000:], file=sys.stderr)
    return {"command": " ".join(cmd), "wall_s": round(wall, 2), "peak_rss_gib": round(peak[0] / 2**30, 3),
            "exit": proc.returncode, "output_tail": output[-600:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=parse_count, default=10**9, help="prompt tokens to generate (50M, 1B, ...)")
    ap.add_argument("--kind", choices=("ids", "text", "chat"), default="ids")
    ap.add_argument("--mb", type=float, default=170.0, help="--kind chat: the log's size in MiB")
    ap.add_argument("--all-stages", action="store_true", help="also run analyze, recommend and report")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pipeline", action="store_true", help="run `pc-advise LOG --no-replay` instead of the stages")
    ap.add_argument("--rerun", action="store_true", help="simulate again with other budgets (streams read back)")
    ap.add_argument("--keep-log", action="store_true", help="keep the generated log (default: deleted after ingest)")
    ap.add_argument("--resume", action="store_true", help="reuse the run folder's requests.parquet: tokenize on")
    args = ap.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    size = f"{int(args.mb)}mb" if args.kind == "chat" else str(args.tokens)
    name = f"{args.kind}_{size}_seed{args.seed}"
    log, run = OUT / f"{name}.jsonl", OUT / name
    exe = str(Path(sys.executable).with_name("pc-advise"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result: dict[str, object] = {"tokens_target": None if args.kind == "chat" else args.tokens, "kind": args.kind,
                                 "cpus": os.cpu_count()}
    resume = args.resume and (run / "requests.parquet").exists()
    t = time.perf_counter()
    if resume:
        result["log"] = "resumed: generated and ingested before"
    elif args.kind == "chat":
        sys.path.insert(0, str(HERE))
        from bench_ingest_tokenize import generate as generate_chat

        result["log"] = {"lines": generate_chat(log, int(args.mb * (1 << 20)), args.seed)}
    else:
        result["log"] = generate(log, args.tokens, args.kind, args.seed)
    result["generate_s"] = round(time.perf_counter() - t, 1)
    result["log_gib"] = round(log.stat().st_size / 2**30, 3) if log.exists() else None
    print(json.dumps(result), file=sys.stderr)
    stages: dict[str, object] = {}
    if args.pipeline:
        stages["pipeline"] = measure([exe, "run", str(log), "-o", str(run), "--no-replay", "--force"], env)
    else:
        commands = [("ingest", [exe, "ingest", str(log), "-o", str(run), "--force"]),
                    ("tokenize", [exe, "tokenize", str(run), "--force"])]
        if args.all_stages:
            commands.append(("analyze", [exe, "analyze", str(run), "--force"]))
        commands.append(("simulate", [exe, "simulate", str(run), "--force", "--json"]))
        if args.all_stages:
            commands += [("recommend", [exe, "recommend", str(run), "--force"]),
                         ("report", [exe, "report", str(run), "--force"])]
        for stage, cmd in commands[1:] if resume else commands:
            stages[stage] = measure(cmd, env)
            print(stage, json.dumps({k: v for k, v in stages[stage].items() if k != "output_tail"}), file=sys.stderr)
            if stage == "ingest" and not args.keep_log and log.exists():
                log.unlink()
            if stages[stage]["exit"]:
                break
        if args.rerun and not stages["simulate"]["exit"]:
            stages["simulate_rerun"] = measure([exe, "simulate", str(run), "--sweep-points", "6", "--json"], env)
    result["stages"] = stages
    manifest = run / "manifest.json"
    if manifest.exists():
        recorded = json.loads(manifest.read_text())["stages"]
        sim = recorded.get("simulate", {}).get("counts", {})
        result["prompt_tokens"] = sim.get("prompt_tokens", recorded.get("tokenize", {}).get("counts", {}).get("tokens"))
        result["requests"] = sim.get("requests")
        result["block_streams"] = sim.get("block_streams")
        result["configs"] = sim.get("configs")
    out = OUT / f"results-{name}{'-pipeline' if args.pipeline else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
