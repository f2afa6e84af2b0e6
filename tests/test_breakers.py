"""Cache breakers: found generically (token streams), labelled afterwards from the text."""

from __future__ import annotations

import json
import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from advisor.analyze.breakers import align_pair, find_breakers, label_pair
from advisor.analyze.prefixes import prefix_pass, workload_from_lists
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
    return find_breakers(w, prefix_pass(w, block), decode_chars, block, 1024)


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
    assert b["position_token"] <= 5 and b["position_block"] == 0  # inside the 8-char stamp
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
    res = find_breakers(w, prefix_pass(w, 16), None, 16, 1024)
    assert len(res.breakers) == 1
    b = res.breakers[0]
    assert b["label"] == "unknown" and b["position_token"] == 0 and b["requests_affected"] == 9


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
    assert a.stats["breakers"][0]["label"] == "per-user text"


def test_labels_name_what_differs() -> None:
    ctx = "Request id 3f2a9c1e-77b0-4c1d-9e2f-0a1b2c3d4e5f for you"
    assert label_pair("3f2a9c1e", "9d0b7e12", ctx, ctx, "", "") == "uuid/id"
    assert label_pair("Mon, 3 Nov", "Tue, 4 Nov", "today is Monday", "", "", "") == "timestamp"
    assert label_pair("  ", "\t", "a  b", "a\tb", "", "") == "whitespace"
    assert label_pair("Alice", "Bob", "Hello Alice,", "Hello Bob,", "Alice ...", "Bob ...") == "per-user text"
    assert label_pair("%%", "##", "%%", "##", "", "") == "unknown"


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
    diverge, a_resume, b_resume, end = align_pair(a, b, 1024)
    assert diverge == start
    assert (a_resume, b_resume) == (start + a_len, start + b_len)
    assert end == len(b)


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
