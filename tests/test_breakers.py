"""Cache breakers: found generically (token streams), labelled afterwards from the text.

Story tests of every kind at every depth, against the same log with the breaker held
constant, are in tests/test_breakers_depth.py."""

from __future__ import annotations

import json
import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from advisor.analyze.align import align, regions
from advisor.analyze.breakers import find_breakers
from advisor.analyze.labels import ExampleText, name_example
from advisor.analyze.prefixes import AnalysisView, prefix_pass, workload_from_lists
from advisor.analyze.stage import AnalyzeOptions, analyze

WORDS = ("alpha beta gamma delta policy order refund shipping invoice customer support answer "
         "region vendor license ticket backup cluster").split()


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode_chars(ids) -> str:
    return "".join(chr(int(i)) for i in ids)


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def breakers_of(texts: list[str], block: int = 16):
    w = workload_from_lists([chars(t) for t in texts])
    return find_breakers(w, prefix_pass(w, block), decode_chars, block)


def test_timestamp_before_a_long_identical_body_is_found_labelled_and_shown() -> None:
    rng = random.Random(1)
    body = "\nYou are the billing assistant. " + sentence(rng, 250)
    stamps = [f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
              for _ in range(30)]
    texts = [f"{s}{body}\nQuestion: {sentence(rng, 6)}" for s in stamps]
    res = breakers_of(texts)
    assert len(res.breakers) == 1
    b = res.breakers[0]
    assert b["label"] == "timestamp"
    # where the stamps first differ: the first hour digit, unless every pair shares it
    first = min(next(i for i, (x, y) in enumerate(zip(s, t, strict=True)) if x != y)
                for s, t in zip(stamps, stamps[1:], strict=False) if s != t)
    assert b["position_token"] == first and b["position_block"] == 0
    assert b["requests_affected"] == 29  # every request after the first
    body_len = len(body)
    # each affected request would have shared at least the body
    assert 29 * (body_len - 5) <= b["tokens_lost"] <= 29 * (body_len + 8 + 60)
    assert b["rate_lost"] == b["tokens_lost"] / sum(map(len, texts))
    ex = b["examples"][0]
    assert ex["a_text"] in stamps and ex["b_text"] in stamps and ex["a_text"] != ex["b_text"]
    assert {ex["a_request_id"], ex["b_request_id"]} <= {f"r{i}" for i in range(30)}


def tools_json(rng: random.Random, names: list[str]) -> list[dict]:
    return [{"type": "function", "function": {"name": n, "description": sentence(rng, 25),
                                              "parameters": {"type": "object"}}} for n in names]


def test_reordered_tools_are_found_and_labelled_tool_order() -> None:
    rng = random.Random(2)
    tools = tools_json(rng, ["get_weather", "search_docs", "send_email", "book_flight"])
    head = "You are an agent with tools:\n"
    a = head + json.dumps(tools) + "\nUser: what is the weather"
    b = head + json.dumps(sorted(tools, key=lambda t: t["function"]["name"])) + "\nUser: book it"
    res = breakers_of([a, b])
    assert [x["label"] for x in res.breakers] == ["tool order"]
    br = res.breakers[0]
    assert br["requests_affected"] == 1
    first_name = len(head) + len('[{"type": "function", "function": {"name": "')
    assert br["position_token"] == first_name  # diverges at the first tool name
    # nearly the whole tool list would have been shared in a fixed order
    assert br["tokens_lost"] >= 0.9 * len(json.dumps(tools))


def test_detection_needs_no_text_random_tokens_breaker_is_found_without_decode() -> None:
    rng = random.Random(4)
    body = [rng.randrange(50_000) for _ in range(300)]
    lists = [[rng.randrange(50_000) for _ in range(3)] + body + [rng.randrange(50_000) for _ in range(5)]
             for _ in range(10)]
    w = workload_from_lists(lists)
    res = find_breakers(w, prefix_pass(w, 16), None, 16)
    assert len(res.breakers) == 1
    b = res.breakers[0]
    assert b["label"] == "varying text" and b["position_token"] == 0 and b["requests_affected"] == 9
    assert b["kind"] == "value" and b["examples"] == []
    assert b["tokens_lost"] == 9 * (3 + 300)  # each would share the stamp's span and the body


def test_prompts_that_only_differ_at_the_end_have_no_breaker() -> None:
    rng = random.Random(6)
    template = "Classify the ticket.\n" + sentence(rng, 150)
    texts = [f"{template}\nTicket: {sentence(rng, 12)}" for _ in range(20)]
    assert breakers_of(texts).breakers == []


def test_unrelated_prompts_have_no_breaker() -> None:
    rng = random.Random(7)
    assert breakers_of([sentence(rng, 120) for _ in range(15)]).breakers == []


def test_analyze_records_the_resembling_request_and_divergence() -> None:
    rng = random.Random(8)
    body = sentence(rng, 120)
    texts = [f"user {name}: " + body for name in ("ann", "bob", "cy")]
    a = analyze(workload_from_lists([chars(t) for t in texts]), AnalyzeOptions(), decode_chars)
    assert a.prefixes.column("resembles_id").to_pylist() == [None, "r0", "r1"]
    assert a.prefixes.column("diverge_token").to_pylist() == [None, 5, 5]
    assert a.stats["breakers"][0]["label"] == "varying text"
    assert a.stats["breaker_search"]["candidate_pairs"] == 2
    assert a.stats["breaker_search"]["searched"].startswith("whole prompts")


def test_a_hash_trace_has_no_breakers_and_says_why() -> None:
    w = workload_from_lists([[1, 2, 3]] * 3)
    trace = AnalysisView(w.request_ids, np.array([1024, 1024, 1024]), np.array([7, 8, 7, 8, 7, 9]),
                         np.array([0, 2, 4, 6]), [None] * 3, [None] * 3, [None] * 3, hash_trace=True, unit_tokens=512)
    res = find_breakers(trace, prefix_pass(trace, 16), None, 16)
    assert res.breakers == [] and res.pairs == [] and "hash trace" in res.search["searched"]
    a = analyze(trace, AnalyzeOptions())
    assert a.stats["breakers"] == [] and "cannot be detected" in a.stats["breakers_note"]


def ex(a: str, b: str, before: str = "", after: str = "") -> ExampleText:
    return ExampleText(before, a, b, after, after)


def test_labels_name_what_differs_and_only_when_sure() -> None:
    uuid_a, uuid_b = "3f2a9c1e-77b0-4c1d-9e2f-0a1b2c3d4e5f", "9d0b7e12-1111-4c1d-9e2f-0a1b2c3d4e5f"
    assert name_example(ex(uuid_a, uuid_b, "Request id ", " for you"), False).label == "uuid/id"
    assert name_example(ex(" sess_8f3Kq2x", " sess_01Hq77z", "Session:"), False).label == "uuid/id"
    assert name_example(ex("05 10:22:01", "06 11:02:13", "Now: 2025-03-", " UTC"), False).label == "timestamp"
    assert name_example(ex(" Monday, March 3", " Tuesday, March 4", "Today is"), False).label == "timestamp"
    assert name_example(ex("  ", "\t", "a", "b"), False).label == "whitespace"
    assert name_example(ex("Reply format: JSON.", "reply format - json.", "\n"), False).label == "formatting"
    assert name_example(ex(" Alice", " Bob", "Hello", ","), False).label == "varying text"
    # a profile with a year and an id in it is not a timestamp, nor an id: varying text
    profile = ex(" 2019, tier gold, id 5f3a", " 2021, tier silver, id 9c2e", "member since", ",")
    assert name_example(profile, False).label == "varying text"
    assert name_example(ex(" 17 items", " 42 items"), False).label == "varying text"  # a bare number
    assert name_example(ex("---", "==="), False).label == "formatting"  # only punctuation differs
    assert name_example(ex("B. A.", "A. B."), True).label == "reordered content"


def test_order_labels_name_the_tools_and_keys_that_moved() -> None:
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
             for n in ("get_time", "get_weather", "send_email")]
    a, b = json.dumps(tools), json.dumps([tools[1], tools[0], tools[2]])
    cut = a.index("time")  # "get_" is common: the span starts inside the first name
    end = a.index('{"type": "function", "function": {"name": "send_email"')  # in step again from here
    named = name_example(ex(a[cut:end], b[cut:end], a[:cut], a[end:]), True)
    assert named.label == "tool order"
    assert named.a_order == ("get_time", "get_weather") and named.b_order == ("get_weather", "get_time")
    schema = '{"name": "get_weather", "parameters": {"type": "object", "properties": {"'
    sa = 'city": {"type": "string"}, "unit": {"enum": ["c", "f"]}, "days": {"type": "integer"}'
    sb = 'unit": {"enum": ["c", "f"]}, "city": {"type": "string"}, "days": {"type": "integer"}'
    named = name_example(ex(sa, sb, schema, "}}"), True)
    assert named.label == "schema key order" and named.a_order == ("city", "unit", "days")
    assert named.b_order == ("unit", "city", "days")
    blob = name_example(ex('tier": "gold", "region": "eu"', 'region": "eu", "tier": "gold"', 'Settings: {"'), True)
    assert blob.label == "JSON key order" and blob.b_order == ("region", "tier")


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    start=st.integers(0, 40),
    a_len=st.integers(1, 12),
    b_len=st.integers(1, 12),
)
def test_alignment_finds_a_replaced_span(seed: int, start: int, a_len: int, b_len: int) -> None:
    """b = a with a[start:start+a_len] replaced by b_len fresh tokens: the alignment reports
    exactly that span and follows the rest to the end (vs. a naive definition)."""
    rng = np.random.default_rng(seed)
    tail = rng.integers(0, 1000, 200)
    head = rng.integers(0, 1000, start)
    a = np.concatenate([head, rng.integers(2000, 3000, a_len), tail]).astype(np.int32)
    b = np.concatenate([head, rng.integers(4000, 5000, b_len), tail]).astype(np.int32)
    p, runs = align(a, b)
    assert p == start
    [g] = regions(a, b, p, runs)
    assert (g.a0, g.a1, g.b0, g.b1) == (start, start + a_len, start, start + b_len)
    assert g.shared_end == len(b) and not g.order


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), blocks=st.integers(2, 6), size=st.integers(33, 80), depth=st.integers(0, 3000))
def test_alignment_finds_a_reordering_at_any_depth(seed: int, blocks: int, size: int, depth: int) -> None:
    """b = a with `blocks` blocks after `depth` shared tokens shuffled: order regions, one per
    independent part of the shuffle, from the first block that moved to the end of the last,
    each followed by the next, and b shares all of a after the last."""
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, 50_000, size) for _ in range(blocks)]
    perm = rng.permutation(blocks)
    if (perm == np.arange(blocks)).all():
        perm = np.roll(perm, 1)
    head, tail = rng.integers(0, 50_000, depth), rng.integers(0, 50_000, 100)
    a = np.concatenate([head, *parts, tail])
    b = np.concatenate([head, *[parts[i] for i in perm], tail])
    moved = np.flatnonzero(perm != np.arange(blocks))
    first, last = depth + int(moved[0]) * size, depth + (int(moved[-1]) + 1) * size
    p, runs = align(a, b)
    gs = regions(a, b, p, runs)
    assert all(g.order and g.a0 == g.b0 and g.a1 == g.b1 for g in gs)
    assert p == gs[0].b0 == first and gs[-1].b1 == last and gs[-1].shared_end == len(b)
    assert all(x.b1 <= x.shared_end <= y.b0 for x, y in zip(gs, gs[1:], strict=False))
    cuts = {depth + size * k for k in range(blocks + 1)}
    assert {g.b0 for g in gs} <= cuts and {g.b1 for g in gs} <= cuts


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), at=st.integers(0, 300), inserted=st.integers(1, 20))
def test_content_chunks_away_from_an_edit_survive_the_shift(seed: int, at: int, inserted: int) -> None:
    """Chunk boundaries depend on the 4 tokens before them only, so every chunk that starts 4+
    tokens after an insertion reappears, shifted, in the edited sequence."""
    from advisor.analyze.hashing import content_chunks

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 500, 400).astype(np.int32)
    b = np.concatenate([a[:at], rng.integers(0, 500, inserted).astype(np.int32), a[at:]])
    ha, sa = content_chunks(a)
    hb, _ = content_chunks(b)
    assert set(ha[sa >= at + 4].tolist()) <= set(hb.tolist())
    assert len(ha) > 1  # the property is not vacuous: 400 tokens cut into several chunks
