"""Seeded generator for the bundled sample logs.

    python sample_logs/generate.py [OUT_DIR]

rewrites every sample file byte-identically (default OUT_DIR: this folder).
Each workload models a prompt habit with a known prefix-cache behaviour; see
sample_logs/README.md. Pure stdlib, so it runs anywhere.
"""

from __future__ import annotations

import json
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

EPOCH0 = 1793700000.0  # 2026-11-03T10:00:00Z, where every workload's clock starts

NOUNS = (
    "cluster invoice pipeline dashboard account report shipment contract server database "
    "migration release budget forecast ticket customer warehouse schedule policy model "
    "dataset endpoint cache queue service incident backup region quota license vendor "
    "deployment order refund subscription workflow notebook sensor gateway tenant"
).split()
VERBS = (
    "review update compare summarise check explain estimate migrate validate export "
    "schedule archive monitor rebuild audit configure diagnose prioritise reconcile draft"
).split()
ADJS = (
    "quarterly stale critical pending regional internal legacy encrypted daily shared "
    "noisy failing archived primary secondary temporary annual overdue detailed minimal"
).split()
NAMES = "Ana Bilal Chen Dara Emeka Farah Goran Hana Ivo Jun Kofi Lena Mateo Nia Omar Priya".split()


def sentence(rng: random.Random) -> str:
    shapes = (
        "The {a} {n} needs a {a2} {n2} before we {v} the {n3}.",
        "Please {v} the {n} and {v2} any {a} {n2} entries.",
        "We noticed that the {n} for the {a} {n2} was {a2} last week.",
        "{Name} asked whether the {n} could {v} the {a} {n2} automatically.",
        "If the {n} is {a}, {v} the {n2} and notify the {n3} owner.",
        "Our {a} {n} reached its {n2} limit during the {a2} {n3} run.",
        "Can you {v} how the {n} affects the {a} {n2}?",
        "The {n2} team will {v} the {a} {n} once the {n3} is {a2}.",
    )
    return rng.choice(shapes).format(
        a=rng.choice(ADJS), a2=rng.choice(ADJS), n=rng.choice(NOUNS), n2=rng.choice(NOUNS),
        n3=rng.choice(NOUNS), v=rng.choice(VERBS), v2=rng.choice(VERBS), Name=rng.choice(NAMES),
    )


def paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def dump(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def system_prompt(rng: random.Random, product: str, rules: int) -> str:
    lines = [f"You are the {product} assistant. Answer precisely and cite the data you used."]
    lines += [f"{i + 1}. {sentence(rng)}" for i in range(rules)]
    lines.append("Never invent figures; if the data is missing, say what is missing.")
    return "\n".join(lines)


def bursty_arrivals(rng: random.Random, n: int, start: float, mean_gap: float) -> list[float]:
    """Arrival times with bursts: most gaps short, some long, so requests overlap."""
    t, out = start, []
    for _ in range(n):
        t += rng.expovariate(1 / (mean_gap * 0.25)) if rng.random() < 0.7 else rng.expovariate(1 / (mean_gap * 2.75))
        out.append(round(t, 3))
    return out


# --- 1. multi-turn chat: each turn repeats the whole history -----------------
def multiturn_chat(rng: random.Random) -> list[str]:
    apps = {
        "ops": system_prompt(rng, "Ops Desk", 18),
        "finance": system_prompt(rng, "Finance Helper", 22),
        "support": system_prompt(rng, "Support Copilot", 15),
    }
    convs = []
    for c in range(14):
        app = rng.choice(sorted(apps))
        start = EPOCH0 + rng.uniform(0, 900)
        convs.append((c, app, start, rng.randint(4, 9)))
    events = []
    for c, app, start, turns in convs:
        messages = [{"role": "system", "content": apps[app]}]
        t = start
        for turn in range(turns):
            messages.append({"role": "user", "content": paragraph(rng, rng.randint(1, 6))})
            reply = paragraph(rng, rng.randint(3, 14))
            prompt_msgs = [dict(m) for m in messages]
            completion_tokens = max(8, int(len(reply.split()) * 1.3))
            events.append((t, {
                "timestamp": iso(t),
                "request": {"model": "qwen2.5-7b-instruct", "messages": prompt_msgs,
                            "user": f"conv-{c:03d}", "max_tokens": 1024},
                "response": {"id": f"chatcmpl-mt-{c:03d}-{turn}",
                             "choices": [{"message": {"role": "assistant", "content": reply}}],
                             "usage": {"completion_tokens": completion_tokens}},
            }))
            messages.append({"role": "assistant", "content": reply})
            t += rng.uniform(15, 120)
    events.sort(key=lambda e: e[0])
    return [dump(e) for _, e in events]


# --- 2. RAG over a handful of long shared documents (an offline Batch API job) --
def rag_documents(rng: random.Random) -> list[str]:
    system = system_prompt(rng, "Knowledge Base", 8)
    docs = []
    for d in range(5):
        sections = [f"## Section {s + 1}: {rng.choice(ADJS).title()} {rng.choice(NOUNS)}s\n"
                    + paragraph(rng, rng.randint(8, 14)) for s in range(rng.randint(9, 14))]
        docs.append(f"# Handbook {d + 1}: {rng.choice(NOUNS).title()} operations\n\n" + "\n\n".join(sections))
    lines = []
    for i in range(150):
        doc = docs[min(int(rng.paretovariate(1.2)) - 1, len(docs) - 1)]  # a few docs are hot
        question = paragraph(rng, rng.randint(1, 3))
        body = {
            "model": "qwen2.5-7b-instruct",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Context:\n{doc}\n\nQuestion: {question}"},
            ],
            "max_tokens": 256,
        }
        lines.append(dump({"custom_id": f"rag-{i:04d}", "method": "POST",
                           "url": "/v1/chat/completions", "body": body}))
    return lines


# --- 3. tool-using agent: long tool schemas, growing trajectories --------------
def tool_schemas(rng: random.Random) -> list[dict]:
    tools = []
    for name in ("search_tickets", "get_invoice", "list_deployments", "restart_service",
                 "query_metrics", "create_report", "send_email", "lookup_customer",
                 "schedule_job", "read_file", "write_file", "run_sql"):
        props = {}
        for p in range(rng.randint(3, 6)):
            pname = f"{rng.choice(ADJS)}_{rng.choice(NOUNS)}"
            props[pname] = {"type": rng.choice(["string", "integer", "boolean"]),
                            "description": sentence(rng)}
        tools.append({"type": "function", "function": {
            "name": name, "description": paragraph(rng, 2),
            "parameters": {"type": "object", "properties": props,
                           "required": sorted(props)[:2]}}})
    return tools


def agent_tools(rng: random.Random) -> list[str]:
    system = system_prompt(rng, "Operations Agent", 12)
    tools = tool_schemas(rng)
    events = []
    for task in range(12):
        # A minority of clients serialise the same tools in another order (a cache breaker).
        reordered = task % 4 == 3
        task_tools = sorted(tools, key=lambda t: t["function"]["name"]) if reordered else tools
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": paragraph(rng, rng.randint(2, 4))}]
        t = EPOCH0 + 3600 + rng.uniform(0, 600)
        for step in range(rng.randint(3, 7)):
            call_name = rng.choice(tools)["function"]["name"]
            args = {"query": sentence(rng), "limit": rng.randint(1, 50)}
            events.append((t, {
                "timestamp": round(t, 3),
                "request": {"model": "qwen2.5-7b-instruct",
                            "messages": [dict(m) for m in messages], "tools": task_tools,
                            "user": f"task-{task:03d}"},
                "response": {"usage": {"completion_tokens": rng.randint(30, 90)}},
            }))
            call_id = f"call_{task:02d}_{step:02d}"
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": [{"id": call_id, "type": "function",
                                             "function": {"name": call_name,
                                                          "arguments": json.dumps(args)}}]})
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": json.dumps({"rows": [sentence(rng) for _ in range(rng.randint(2, 8))]})})
            t += rng.uniform(2, 20)
    events.sort(key=lambda e: e[0])
    return [dump(e) for _, e in events]


# --- 4. few-shot template (completions) -----------------------------------------
def fewshot_template(rng: random.Random) -> list[str]:
    labels = ("billing", "outage", "access", "feature-request", "security")
    shots = []
    for i in range(14):
        shots.append(f"Ticket: {paragraph(rng, rng.randint(2, 4))}\nCategory: {rng.choice(labels)}\n")
    template = ("Classify each support ticket into one of: " + ", ".join(labels) + ".\n\n"
                + "\n".join(shots))
    lines = []
    for t in bursty_arrivals(rng, 160, EPOCH0 + 7200, 4.0):
        prompt = template + f"\nTicket: {paragraph(rng, rng.randint(1, 5))}\nCategory:"
        lines.append(dump({"timestamp": t, "model": "qwen2.5-7b-instruct", "prompt": prompt,
                           "max_tokens": 4}))
    return lines


# --- 5. a system prompt that starts with the current time (a cache breaker) -------
def timestamp_system_prompt(rng: random.Random) -> list[str]:
    instructions = system_prompt(rng, "Travel Planner", 40)
    lines = []
    for i, t in enumerate(bursty_arrivals(rng, 120, EPOCH0 + 10800, 9.0)):
        system = f"Current time: {iso(t)}.\n{instructions}"
        lines.append(dump({
            "timestamp": iso(t),
            "request": {"model": "qwen2.5-7b-instruct",
                        "messages": [{"role": "system", "content": system},
                                     {"role": "user", "content": paragraph(rng, rng.randint(1, 4))}],
                        "user": f"traveller-{rng.randint(1, 40):03d}"},
            "response": {"usage": {"completion_tokens": rng.randint(40, 300)}},
        }))
    return lines


# --- 6. malformed lines among good ones -----------------------------------------------
# Each bad line and why it is bad; docs/formats.md lists them too.
BAD_LINES: tuple[tuple[bytes, str], ...] = (
    (b"", "empty line"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "cut of', "truncated JSON"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "caf\xe9"}]}', "not valid UTF-8 (latin-1 byte)"),
    (b'{"model": "m", "messages": [{"role": "user", "content": 42}]}', "content is a number"),
    (b'{"model": "m", "messages": "hello"}', "messages is not a list"),
    (b'{"hello": "world"}', "no known request shape"),
    (b'[1, 2, 3]', "a JSON array, not an object"),
    (b'{"timestamp": 5, "input_length": 700, "output_length": 3, "hash_ids": ["a", 1]}', "hash id not an integer"),
    (b'{"prompt_token_ids": [1, -5, 3]}', "negative token id"),
    (b'{"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}', "unknown role"),
)


def malformed(rng: random.Random) -> list[bytes]:
    good = [dump({"timestamp": EPOCH0 + 20000 + i,
                  "model": "qwen2.5-7b-instruct",
                  "messages": [{"role": "user", "content": paragraph(rng, 2)}]}).encode()
            for i in range(20)]
    out: list[bytes] = []
    bad = list(BAD_LINES)
    for i, g in enumerate(good):
        out.append(g)
        if i % 2 == 1 and bad:
            out.append(bad.pop(0)[0])
    return out


# --- 7. a small block-hash trace in Mooncake's format --------------------------------
def hash_trace_small(rng: random.Random) -> list[str]:
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        return ids

    system_blocks = [fresh(rng.randint(2, 6)) for _ in range(4)]
    sessions: dict[int, list[int]] = {}
    lines, t = [], 0
    for _ in range(300):
        t += int(rng.expovariate(1 / 400))
        s = rng.randint(0, 29)
        if s in sessions and rng.random() < 0.7:
            ids = sessions[s] + fresh(rng.randint(1, 3))  # next turn: history + new blocks
        else:
            ids = list(rng.choice(system_blocks)) + fresh(rng.randint(1, 8))
        sessions[s] = ids
        input_length = (len(ids) - 1) * 512 + rng.randint(1, 512)
        lines.append(dump({"timestamp": t, "input_length": input_length,
                           "output_length": rng.randint(1, 600), "hash_ids": ids}))
    return lines


WORKLOADS = {
    "multiturn_chat.jsonl": multiturn_chat,
    "rag_documents.jsonl": rag_documents,
    "agent_tools.jsonl": agent_tools,
    "fewshot_template.jsonl": fewshot_template,
    "timestamp_system_prompt.jsonl": timestamp_system_prompt,
    "hash_trace_small.jsonl": hash_trace_small,
}


def generate(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (name, make) in enumerate(WORKLOADS.items()):
        lines = make(random.Random(1000 + i))
        path = out_dir / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    path = out_dir / "malformed.jsonl"
    path.write_bytes(b"\n".join(malformed(random.Random(999))) + b"\n")
    written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    for p in generate(target):
        print(f"{p}  {p.stat().st_size / 1e3:.0f} kB")
