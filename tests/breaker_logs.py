"""Generated agent logs with one cache breaker of a known kind, and the same log without it.

A log is `sessions` two-turn conversations of a tool-using agent, interleaved in time. Every
prompt is: a policy document (`head_words` long: a few dozen words, or several thousand so
the breaker sits past 4,000 tokens), the breaker's slot, more policy, twelve tool schemas
(JSON), then the user turn; the second turn repeats the first with a reply and a new question.
The slot holds what varies: per session (an id, a profile, tool order, schema key order, a
JSON blob's key order, few-shot order, whitespace or formatting) or per request (a timestamp, a
retrieved document). `held=True` holds the slot constant: the same log without the breaker.

Tokens come from a word-level tokenizer (`Vocab`: a word with its leading whitespace, or one
punctuation mark, is one token), so decoded texts are real text and JSON splits like BPE's.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

from advisor.analyze.prefixes import AnalysisView, workload_from_lists

_TOKEN = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")
_SYLLABLES = ("ka ri to mu ne sa lo vi de pa chu ren gol fim zar bex tul mon qui ast ber dol "
              "nix por sev tam vog wel yar zem").split()
TOOL_NAMES = ("get_weather search_docs send_email book_flight create_ticket lookup_order refund_payment "
              "list_invoices update_address schedule_call translate_text summarize_thread").split()
PROPERTIES = ("city unit days query limit locale recipient subject body priority order_id amount "
              "currency reason street zip").split()
KINDS = ("session id", "timestamp", "profile", "document", "tool order", "schema key order",
         "JSON key order", "few-shot order", "whitespace", "formatting")
LABEL = {"session id": "uuid/id", "timestamp": "timestamp", "profile": "varying text",
         "document": "varying text", "tool order": "tool order", "schema key order": "schema key order",
         "JSON key order": "JSON key order", "few-shot order": "reordered content",
         "whitespace": "whitespace", "formatting": "formatting"}
PER_REQUEST = ("timestamp", "document")


@dataclass
class Vocab:
    ids: dict[str, int] = field(default_factory=dict)
    words: list[str] = field(default_factory=list)

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in _TOKEN.findall(text):
            if piece not in self.ids:
                self.ids[piece] = len(self.words)
                self.words.append(piece)
            out.append(self.ids[piece])
        return out

    def decode(self, ids) -> str:  # noqa: ANN001
        return "".join(self.words[int(i)] for i in ids)


@dataclass
class Log:
    view: AnalysisView
    vocab: Vocab
    slot_start: int  # token where the slot begins in every first turn
    names: tuple[str, ...] = ()  # the tools / keys the slot reorders


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))


def _prose(rng: random.Random, words: int) -> str:
    out = []
    while len(out) < words:
        n = rng.randint(6, 16)
        sentence = [_word(rng) for _ in range(n)]
        out.extend(sentence[:-1] + [sentence[-1] + "."])
    return " ".join(out[:words])


def _tools(seed: int, keyed: dict[str, list[str]]) -> list[dict]:
    """The twelve tool schemas, each tool's properties in the order `keyed` gives."""
    rng = random.Random(seed)
    tools = []
    for name in TOOL_NAMES:
        said = {p: _prose(rng, 5) for p in sorted(keyed[name])}
        tools.append({"type": "function", "function": {
            "name": name, "description": _prose(rng, 12),
            "parameters": {"type": "object", "properties": {
                p: {"type": "string", "description": said[p]} for p in keyed[name]},
                "required": sorted(keyed[name])[:1]}}})
    return tools


def _permutations(rng: random.Random, items: list[str], n: int) -> list[list[str]]:
    """n distinct orders of `items`, each starting with another item than the one before."""
    out: list[list[str]] = []
    while len(out) < n:
        p = rng.sample(items, len(items))
        if p not in out and (not out or p[0] != out[-1][0]):
            out.append(p)
    return out


def generate(kind: str, head_words: int, *, sessions: int = 10, held: bool = False, seed: int = 0,
             document_last: bool = False) -> Log:
    """The log (see the module docstring) with a breaker of `kind`, or without it (`held`).
    `document_last`: the retrieved document comes after the latest question instead of in
    the system prompt (and is not kept in the history): the "document" breaker fixed."""
    rng = random.Random(seed)
    vocab = Vocab()
    head = "<|system|>\nYou are the support agent of Kalori Travel.\n" + _prose(rng, head_words) + "\n"
    tail = "\n" + _prose(rng, 120) + "\nTools:\n"
    fixed_props = {n: rng.sample(PROPERTIES, 3) for n in TOOL_NAMES}
    base_tools = _tools(seed + 1, fixed_props)
    shots = [f"Example: {_prose(rng, 3)}? Answer: {_prose(rng, 30)}\n" for _ in range(5)]
    config = {k: f"{_word(rng)}-{rng.randint(1, 99)}" for k in ("region", "tier", "locale", "channel", "sla",
                                                                   "queue", "escalation", "brand")}
    orders = _permutations(rng, list(TOOL_NAMES), sessions)
    shot_orders = _permutations(rng, list(range(5)), sessions)
    key_orders = _permutations(rng, list(config), sessions)
    prop_orders = [_permutations(random.Random(seed + 7 + s), fixed_props[n], 1)[0]
                   for s in range(sessions) for n in TOOL_NAMES[:1]]
    names: tuple[str, ...] = ()

    def slot_and_tools(s: int, turn: int, r: random.Random) -> tuple[str, list[dict]]:
        """The slot's text and the tools, for session s, turn `turn`."""
        v = 0 if held else s
        if kind == "session id":
            return f"Session id: {random.Random(v).getrandbits(128):032x}\n", base_tools
        if kind == "timestamp":
            t = 0 if held else 2 * s + turn
            return (f"Current time: 2025-03-{1 + t % 28:02d} {(3 * t) % 24:02d}:{(7 * t) % 60:02d}:"
                    f"{(11 * t) % 60:02d} UTC\n"), base_tools
        if kind == "profile":
            q = random.Random(1000 + v)
            return (f"Customer: member since {2012 + q.randint(0, 12)}, tier {q.choice(['gold', 'silver', 'bronze'])}, "
                    f"id {q.getrandbits(16):04x}, name {_word(q).title()} {_word(q).title()}\n"), base_tools
        if kind == "document":
            q = random.Random(2000 + (0 if held else 2 * s + turn))
            return f"Context document:\n{_prose(q, 80)}\n", base_tools
        if kind == "tool order":
            order = orders[v]
            by_name = {t["function"]["name"]: t for t in base_tools}
            return json.dumps([by_name[n] for n in order]) + "\n", base_tools
        if kind == "schema key order":
            return "", _tools(seed + 1, {**fixed_props, TOOL_NAMES[0]: prop_orders[v]})
        if kind == "JSON key order":
            return "Settings: " + json.dumps({k: config[k] for k in key_orders[v]}) + "\n", base_tools
        if kind == "few-shot order":
            return "".join(shots[i] for i in shot_orders[v]), base_tools
        if kind == "whitespace":
            return "Follow these rules." + " " * (1 + v) + "\n", base_tools
        if kind == "formatting":
            forms = ["Reply format: JSON.", "reply format: json.", "Reply Format - JSON.", "REPLY FORMAT: JSON!",
                     "Reply format; JSON", "reply-format: JSON."]
            return forms[v % len(forms)] + "\n", base_tools
        if kind == "none":
            return "", base_tools
        raise ValueError(kind)

    if kind == "tool order":
        names = TOOL_NAMES
    elif kind == "schema key order":
        names = tuple(fixed_props[TOOL_NAMES[0]])
    elif kind == "JSON key order":
        names = tuple(config)
    lists: list[list[int]] = []
    ids: list[str] = []
    sess: list[str] = []
    head_ids = vocab.encode(head)
    questions = [[_prose(rng, 12) for _ in range(2)] for _ in range(sessions)]
    replies = [_prose(rng, 40) for _ in range(sessions)]
    order = [x for s in range(sessions) for x in ((s, 0), (s - 1, 1))[: 2 if s else 1]] + [(sessions - 1, 1)]
    for s, turn in order:
        slot, tools = slot_and_tools(s, turn, rng)
        tools_text = json.dumps(tools)
        last = vocab.encode(slot) if document_last else []
        slot = "" if document_last else slot
        if kind == "tool order":  # the slot holds the tools, at the breaker's depth
            body = vocab.encode(slot) + vocab.encode(tail)
        else:
            body = vocab.encode(slot) + vocab.encode(tail) + vocab.encode(tools_text)
        chat = vocab.encode(f"\n<|user|>\n{questions[s][0]}\n<|assistant|>\n")
        if turn == 1:
            chat += vocab.encode(f"{replies[s]}\n<|user|>\n{questions[s][1]}\n<|assistant|>\n")
        lists.append(head_ids + body + chat + last)
        ids.append(f"s{s}t{turn}")
        sess.append(f"s{s}")
    view = workload_from_lists(lists, request_ids=ids, sessions=sess)
    return Log(view, vocab, len(head_ids), names)
