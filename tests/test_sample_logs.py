"""The bundled sample logs: reproducible, small, and carrying the structure they claim."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "sample_logs"


def _generator():
    spec = importlib.util.spec_from_file_location("sample_generate", SAMPLES / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLES / name).read_text(encoding="utf-8").splitlines()]


def test_generator_is_deterministic(tmp_path: Path) -> None:
    written = _generator().generate(tmp_path)
    assert written
    for p in written:
        assert p.read_bytes() == (SAMPLES / p.name).read_bytes(), p.name


def test_samples_stay_small() -> None:
    total = sum(p.stat().st_size for p in SAMPLES.iterdir() if p.is_file())
    assert total < 6_000_000


def test_malformed_has_exactly_the_documented_bad_lines() -> None:
    gen = _generator()
    lines = (SAMPLES / "malformed.jsonl").read_bytes().split(b"\n")[:-1]
    bad = {raw for raw, _ in gen.BAD_LINES}
    assert sum(1 for line in lines if line in bad) == len(gen.BAD_LINES)
    for line in lines:
        if line not in bad:
            assert isinstance(json.loads(line), dict)


def test_multiturn_turns_repeat_history() -> None:
    by_conv: dict[str, list[list[dict]]] = {}
    for row in _rows("multiturn_chat.jsonl"):
        by_conv.setdefault(row["request"]["user"], []).append(row["request"]["messages"])
    assert len(by_conv) >= 10
    for turns in by_conv.values():
        for prev, cur in zip(turns, turns[1:]):
            assert cur[: len(prev)] == prev
            assert len(cur) == len(prev) + 2  # previous reply + new user message


def test_timestamp_prompts_differ_only_in_leading_time() -> None:
    systems = [r["request"]["messages"][0]["content"] for r in _rows("timestamp_system_prompt.jsonl")]
    assert all(s.startswith("Current time: ") for s in systems)
    assert len({s.split("\n", 1)[1] for s in systems}) == 1
    assert len({s.split("\n", 1)[0] for s in systems}) > 100


def test_agent_tools_sometimes_reordered() -> None:
    orders = {tuple(t["function"]["name"] for t in r["request"]["tools"]) for r in _rows("agent_tools.jsonl")}
    assert len(orders) == 2
    a, b = orders
    assert sorted(a) == sorted(b) and a != b


def test_hash_trace_shares_prefixes() -> None:
    rows = _rows("hash_trace_small.jsonl")
    firsts = [r["hash_ids"][0] for r in rows]
    assert len(set(firsts)) < len(rows) / 10
    for r in rows:
        assert (len(r["hash_ids"]) - 1) * 512 < r["input_length"] <= len(r["hash_ids"]) * 512
