"""Naming a cache breaker after it has been found: its label, what moved, and the fix.

Input: the decoded text of a few example pairs (the span that differs on each side, with
the text just before it). Output: a label per example, the tools or keys a reordering moved,
and per label a description and a concrete fix. Finding never reads text
(advisor/analyze/breakers.py); this module only names what was found, and says so when it
is not sure: a value that is not wholly a date/time or wholly an id is "varying text", a
reordering that is not of tools or JSON keys is "reordered content".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# what each label's fix is, as advisor/analyze/rewrite.py applies it
VALUE_LABELS = ("timestamp", "uuid/id", "varying text")  # move the value after the shared part
NORMALIZE_LABELS = ("whitespace", "formatting")  # serialize one way: the spans become equal
ORDER_LABELS = ("tool order", "schema key order", "JSON key order", "reordered content")  # one order
LABELS = VALUE_LABELS + NORMALIZE_LABELS + ORDER_LABELS

DESCRIPTIONS = {
    "timestamp": "A date or time changes between prompts that are otherwise the same from here on.",
    "uuid/id": "An id (session, request, user) changes between prompts that are otherwise the same from here on.",
    "varying text": "Text that changes per request or per session (a profile, a name, a retrieved document, "
                    "a value) sits before content the prompts otherwise share.",
    "whitespace": "Prompts differ here only in whitespace.",
    "formatting": "Prompts differ here only in formatting (case, punctuation, separators).",
    "tool order": "The same tools are sent in a different order.",
    "schema key order": "The properties inside a tool's parameter schema come in a different order "
                        "(vLLM keeps the order of the schema as sent).",
    "JSON key order": "The keys of a JSON object in the prompt come in a different order.",
    "reordered content": "The same blocks of text (few-shot examples, passages, list items) come in a "
                         "different order.",
}
FIXES = {
    "timestamp": "Move the date/time after the shared content (e.g. into the last user message), "
                 "or round it so it changes rarely.",
    "uuid/id": "Move the id after the shared content, or send it as request metadata instead of in the prompt.",
    "varying text": "Move the varying text after the shared content (shared instructions, tools and "
                    "examples first, per-request text last).",
    "whitespace": "Normalize whitespace before sending (one template, no trailing or doubled spaces).",
    "formatting": "Render the prompt with one template and one serializer every time.",
    "tool order": "Send the tools sorted by name.",
    "schema key order": "Serialize each tool's parameter schema with sorted keys "
                        "(e.g. json.dumps(schema, sort_keys=True)).",
    "JSON key order": "Serialize JSON in the prompt with sorted keys (e.g. json.dumps(obj, sort_keys=True)).",
    "reordered content": "Emit these blocks in one fixed order (e.g. sort the few-shot examples once).",
}


@dataclass(frozen=True)
class ExampleText:
    """One pair's differing spans, decoded, with the text around them."""

    before: str  # common text just before the divergence
    a_diff: str
    b_diff: str
    a_after: str  # common text just after each span
    b_after: str

    def widened(self, side: str) -> str:
        """The differing text widened to whole words (a changed digit shows its whole date)."""
        diff, after = (self.a_diff, self.a_after) if side == "a" else (self.b_diff, self.b_after)
        left = re.search(r"\S{0,40}$", self.before) if not diff[:1].isspace() else None
        right = re.match(r"\S{0,40}", after) if diff and not diff[-1:].isspace() else None
        return (left.group(0) if left else "") + diff + (right.group(0) if right else "")


@dataclass(frozen=True)
class Naming:
    label: str
    a_order: tuple[str, ...] = ()  # tools / keys in a's order (order labels)
    b_order: tuple[str, ...] = ()


def name_example(ex: ExampleText, order: bool) -> Naming:
    """The label of one example pair; `order`: its spans hold the same tokens reordered."""
    if order:
        named = _named_order(ex)
        if named is not None:
            return named
    wa, wb = ex.widened("a"), ex.widened("b")
    if ex.a_diff.split() == ex.b_diff.split() and wa.split() == wb.split():
        return Naming("whitespace")
    if _squash(wa) == _squash(wb):
        return Naming("formatting")
    if _all_words(wa, wb, _is_datetime_word) and _any_word(wa, wb, _is_strong_datetime):
        return Naming("timestamp")
    if _all_words(wa, wb, _is_id_word):
        return Naming("uuid/id")
    return Naming("reordered content" if order else "varying text")


# --- reorderings: tools by name, keys at the reordered object's top level ---
_NAME = re.compile(r'"name"\s*:\s*"([^"\\]+)"')
_KEY = re.compile(r'"([^"\\]{1,80})"\s*:')
_OPEN_KEY = re.compile(r'"([^"\\]{1,80})"\s*:\s*\{')
_SCHEMA_KEYS = ("properties",)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _named_order(ex: ExampleText) -> Naming | None:
    cut = len(ex.before)
    ta, tb = ex.before + ex.a_diff, ex.before + ex.b_diff
    na = [m.group(1) for m in _NAME.finditer(ta) if m.end() > cut]
    nb = [m.group(1) for m in _NAME.finditer(tb) if m.end() > cut]
    if len(set(na)) >= 2 and na != nb and sorted(na) == sorted(nb):
        return Naming("tool order", tuple(na), tuple(nb))
    ka, kb = _top_keys(ta, cut), _top_keys(tb, cut)
    if len(set(ka)) >= 2 and ka != kb and sorted(ka) == sorted(kb):
        label = "schema key order" if _open_key(ex.before) in _SCHEMA_KEYS else "JSON key order"
        return Naming(label, tuple(ka), tuple(kb))
    return None


def _open_key(text: str) -> str | None:
    """The key of the innermost JSON object still open at the end of `text` (None: none
    found). Scans back from the end, so a context that starts inside a string does not matter."""
    for m in reversed(list(_OPEN_KEY.finditer(text))):
        rest = _STRING.sub("", text[m.end() :])
        if rest.count("{") + rest.count("[") >= rest.count("}") + rest.count("]"):
            return m.group(1)
    return None


def _top_keys(text: str, cut: int) -> list[str]:
    """JSON keys that start at the top nesting level of text[cut:] (a key begun just before
    `cut` counts: the span often starts inside it)."""
    keys: list[str] = []
    starts = {m.start(): m.group(1) for m in _KEY.finditer(text) if m.end() > cut}
    inside = [s for s in starts if s < cut]
    pos = min(inside) if inside else cut
    depth, in_str, esc = 0, False, False
    for i in range(pos, len(text)):
        c = text[i]
        if in_str:
            esc, in_str = (False, True) if esc else (c == "\\", c != '"')
            continue
        if c == '"':
            if depth == 0 and i in starts:
                keys.append(starts[i])
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth < 0:
                break
    return keys


# --- values: a label only when every differing word is of that kind ---
_MONTHS = ("january|february|march|april|may|june|july|august|september|october|november|december"
           "|jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec")
_DAYS = "monday|tuesday|wednesday|thursday|friday|saturday|sunday|mon|tue|tues|wed|thu|thur|thurs|fri|sat|sun"
_STRONG_DT = re.compile(
    r"\d{4}-\d{1,2}-\d{1,2}(?:[t ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?(?:z|[+-]\d{2}:?\d{2})?"
    r"|\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:z|[ap]\.?m\.?)?"
    r"|\d{1,2}[/.]\d{1,2}[/.]\d{2,4}"
    rf"|(?:{_MONTHS})\.?|(?:{_DAYS})\.?"
    r"|1[5-9]\d{8}(?:\d{3})?(?:\.\d+)?",
)
_WEAK_DT = re.compile(r"\d{1,4}(?:st|nd|rd|th)?|[ap]\.?m\.?|[+-]\d{2}:?\d{2}|at|on|of|-"
                      r"|utc|gmt|z|pst|pdt|est|edt|cst|cdt|mst|mdt|cet|cest|bst|ist|jst|aest")
_ID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    r"|(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{6,}"
    r"|\d{5,}"
    r"|[a-z]+[-_:#][a-z0-9_:#-]*\d[a-z0-9_:#-]*"
    r"|(?=[a-z0-9]*\d)(?=[a-z0-9]*[a-z])[a-z0-9]{8,}",
)
_STRIP = "\"'`.,;:()[]{}<>!?"


def _words(text: str) -> list[str]:
    return [w for w in (x.strip(_STRIP).lower() for x in re.split(r"[\s=]+", text)) if w]


def _all_words(wa: str, wb: str, ok) -> bool:  # noqa: ANN001
    words = _words(wa) + _words(wb)
    return bool(words) and all(ok(w) for w in words)


def _any_word(wa: str, wb: str, ok) -> bool:  # noqa: ANN001
    return any(ok(w) for w in _words(wa)) and any(ok(w) for w in _words(wb))


def _is_strong_datetime(w: str) -> bool:
    return _STRONG_DT.fullmatch(w) is not None


def _is_datetime_word(w: str) -> bool:
    return _is_strong_datetime(w) or _WEAK_DT.fullmatch(w) is not None


def _is_id_word(w: str) -> bool:
    return _ID.fullmatch(w) is not None


def _squash(text: str) -> str:
    return re.sub(r"[\W_]+", "", text).lower()
