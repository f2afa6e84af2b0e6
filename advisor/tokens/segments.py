"""Encode each distinct segment of a prompt once: the text between a tokenizer's added tokens.

Input: a loaded Hugging Face fast tokenizer and batches of texts. Output: each text's token ids
(native int32 bytes), identical to encoding the whole text with the tokenizer's `encode_batch`.

Why it is exact (tokenizers' `AddedVocabulary::extract_and_normalize`, docs/tokenizer.md):
before anything else the Rust tokenizer cuts the text at its added tokens that are *not*
`normalized` (a leftmost-longest scan; `lstrip`/`rstrip` widen a match over the whitespace
beside it). Every piece between two matches is then normalised, split on the `normalized`
added tokens, pre-tokenized and run through the model **on its own**. So ids(text) =
concatenation of [an added token's id] and ids(piece) for the pieces in order, and a piece seen
before need not be encoded again. `check_tokenizer` decides per tokenizer, from its
tokenizer.json, whether that holds; it does not when
- a pre-tokenizer looks at where a piece sits in the whole text (Metaspace with
  `prepend_scheme: first` adds "▁" only at offset 0), or a component is of a type not known here;
- a split token is `single_word` (whether it matches depends on the characters around it);
- the model is random (BPE dropout), or the tokenizer encodes special tokens as text;
and then every text is encoded whole (the reason is reported). The post-processor (what
`add_special_tokens=True` adds, e.g. BOS) is learnt by probing and added around the pieces;
where it is not a fixed prefix and suffix, completions are encoded whole.

The cache (`SegmentCache`) maps a segment's text to its ids. The dict hashes the text (SipHash)
and confirms a hit by comparing the text itself, so a hit can never be a collision. It is
bounded in bytes (text + ids + a per-entry overhead, estimated) and evicts the least recently
used segment first.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

ID_BYTES = 4  # ids are kept as native int32 bytes: spliced by bytes.join, read by numpy
DEFAULT_CACHE_BYTES = 128 << 20  # per process
ENTRY_OVERHEAD = 160  # bytes per cached segment beyond its text and ids (dict node, objects)

# Rust regex's \s (Unicode White_Space): what lstrip/rstrip swallow. Python's \s differs
# (it also takes U+001C..U+001F), so the class is spelled out.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WS_AT_END = re.compile(f"[{_WS}]*\\Z")
_WS_AT_START = re.compile(f"[{_WS}]*")

# Components that act on one piece of text without looking at where it sits in the whole
# text (tokenizers 0.23). Metaspace is checked apart: prepend_scheme "first" does look.
_PIECEWISE_NORMALIZERS = frozenset({
    "BertNormalizer", "ByteLevel", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "Nmt",
    "Precompiled", "Prepend", "Replace", "Strip", "StripAccents"})
_PIECEWISE_PRE_TOKENIZERS = frozenset({
    "BertPreTokenizer", "ByteLevel", "CharDelimiterSplit", "Digits", "FixedLength",
    "Punctuation", "Split", "UnicodeScripts", "Whitespace", "WhitespaceSplit"})

# Texts the segment path must encode exactly as the whole path does before it is trusted.
_PROBES = ("Hello world", " leading and trailing  ", "中文 e\u0301 ña\n\n  x",
           "a\n\nb\tc  d", "x" * 3)


def _ids_bytes(ids: Sequence[int]) -> bytes:
    return np.asarray(ids, dtype=np.int32).tobytes()


@dataclass(frozen=True)
class SegmentRule:
    """How a tokenizer's encoding splits into independently encoded pieces, if it does."""

    reason: str | None  # None: the rule holds; else why every text is encoded whole
    pattern: re.Pattern[str] | None = None  # the split added tokens, longest first
    token_ids: dict[str, bytes] = field(default_factory=dict)  # added token -> its id
    lstrip: frozenset[str] = frozenset()
    rstrip: frozenset[str] = frozenset()
    special_prefix: bytes | None = None  # what add_special_tokens=True puts around the ids
    special_suffix: bytes | None = None
    special_reason: str | None = None  # why completions are encoded whole, if they are

    @property
    def holds(self) -> bool:
        return self.reason is None

    def split(self, text: str) -> list[str | bytes] | None:
        """The text as pieces in order: str to encode, bytes for an added token's id.

        None when the scan meets a case the Rust scan would handle in a way not mirrored
        here (overlapping matches after an rstrip): encode that text whole."""
        assert self.pattern is not None
        if not self.lstrip and not self.rstrip:
            parts = self.pattern.split(text)  # text, token, text, token, ..., text
            ids = self.token_ids
            return [p if i % 2 == 0 else ids[p] for i, p in enumerate(parts)]
        return self._split_stripping(text)

    def _split_stripping(self, text: str) -> list[str | bytes] | None:
        """tokenizers' `find_matches`, with lstrip/rstrip widening a match over whitespace."""
        assert self.pattern is not None
        out: list[str | bytes] = []
        done = 0  # end of the last match (widened)
        for m in self.pattern.finditer(text):
            start, stop, tok = m.start(), m.end(), m.group()
            if start < done:
                return None
            if tok in self.lstrip:
                start = _WS_AT_END.search(text, done, start).start()  # type: ignore[union-attr]  # >= done
            if tok in self.rstrip:
                stop = _WS_AT_START.match(text, stop).end()  # type: ignore[union-attr]
            out.append(text[done:start])
            out.append(self.token_ids[tok])
            done = stop
        out.append(text[done:])
        return out


# --- the per-tokenizer check ---
def _walk(node: Any) -> list[dict[str, Any]]:
    """A normalizer or pre-tokenizer and the members of its Sequences, flattened."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        members = node.get("normalizers", node.get("pretokenizers", []))
        return [leaf for m in members for leaf in _walk(m)]
    return [node]


def _state(component: Any) -> dict[str, Any] | None:
    """A normalizer's or pre-tokenizer's tokenizer.json entry (None when it has none)."""
    if component is None:
        return None
    state = component.__getstate__()
    return json.loads(state) if isinstance(state, (str, bytes)) else None


def _pipeline_reason(backend: Any) -> str | None:
    for norm in _walk(_state(backend.normalizer)):
        if norm.get("type") not in _PIECEWISE_NORMALIZERS:
            return f"its normalizer {norm.get('type')!r} is not one known to act piece by piece"
    for pre in _walk(_state(backend.pre_tokenizer)):
        kind = pre.get("type")
        if kind == "Metaspace":
            scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
            if scheme == "first":
                return ("its Metaspace pre-tokenizer prepends '▁' only at the start of the whole "
                        "text (prepend_scheme: first)")
        elif kind not in _PIECEWISE_PRE_TOKENIZERS:
            return f"its pre-tokenizer {kind!r} is not one known to act piece by piece"
    if getattr(backend.model, "dropout", None):
        return "its BPE model has dropout (random ids)"
    return None


def check_tokenizer(tokenizer: Any) -> SegmentRule:
    """Whether this tokenizer's ids are the concatenation of its segments' ids (see the module
    docstring), with what the segment path needs; a rule with a reason when not."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        added = backend.get_added_tokens_decoder()  # type: ignore[union-attr]
        reason = _pipeline_reason(backend)
    except Exception:  # not a tokenizers.Tokenizer (a stand-in), or a state not read as expected
        return SegmentRule("its tokenizer pipeline cannot be inspected")
    if reason:
        return SegmentRule(reason)
    if getattr(backend, "encode_special_tokens", False):
        return SegmentRule("it encodes special tokens as plain text (encode_special_tokens)")
    split = {tid: t for tid, t in added.items() if not t.normalized}
    if word := next((t.content for t in split.values() if t.single_word), None):
        return SegmentRule(f"its added token {word!r} matches only as a single word")
    if not split:
        return SegmentRule("it has no added tokens matched before normalisation")
    contents = sorted({t.content for t in split.values()}, key=lambda s: (-len(s), s))
    rule = SegmentRule(
        None,
        re.compile("(" + "|".join(map(re.escape, contents)) + ")"),
        {t.content: _ids_bytes([tid]) for tid, t in split.items()},
        frozenset(t.content for t in split.values() if t.lstrip),
        frozenset(t.content for t in split.values() if t.rstrip),
    )
    rule = _with_special_tokens(rule, backend)
    return _self_checked(rule, backend, contents)


def _encode_whole(backend: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(list(texts), add_special_tokens=add_special_tokens)]


def _with_special_tokens(rule: SegmentRule, backend: Any) -> SegmentRule:
    """Learn what the post-processor adds with add_special_tokens=True: a fixed prefix and
    suffix around the text's ids, checked on several probes, or a reason it is not."""
    probes = ["a", "Hello world", "x y z 123", ""]
    bare = _encode_whole(backend, probes, False)
    full = _encode_whole(backend, probes, True)
    found: tuple[list[int], list[int]] | None = None
    for core, ids in zip(bare, full):
        n = len(ids) - len(core)
        starts = [k for k in range(n + 1) if ids[k:k + len(core)] == core] if core else []
        if core and len(starts) != 1:
            found = None
            break
        if core:
            k = starts[0]
            pair = (ids[:k], ids[k + len(core):])
            if found is not None and pair != found:
                found = None
                break
            found = pair
        elif found is not None and ids != found[0] + found[1]:
            found = None
            break
    if found is None:
        return replace(rule, special_reason="what add_special_tokens adds is not a fixed prefix and suffix")
    return replace(rule, special_prefix=_ids_bytes(found[0]), special_suffix=_ids_bytes(found[1]))


def _self_checked(rule: SegmentRule, backend: Any, contents: list[str]) -> SegmentRule:
    """Defence in depth: probes with added tokens between, around and inside text must give
    the same ids both ways, or the rule is not used."""
    toks = contents[:3]
    texts = list(_PROBES) + [f"{p}{t}{q}{t}" for t in toks for p, q in zip(_PROBES, reversed(_PROBES))]
    texts += [f"{t}  {p} {t}\n" for t in toks for p in _PROBES[:2]]
    encoder = SegmentEncoder(backend, rule, SegmentCache(1 << 20))
    for special in (False, True):
        if special and rule.special_prefix is None:
            continue
        want = [_ids_bytes(ids) for ids in _encode_whole(backend, texts, special)]
        if encoder.encode(texts, special) != want:
            return SegmentRule("a probe's segment ids differ from its whole-text ids")
    return rule


# --- the cache ---
class SegmentCache:
    """Segment text -> its ids (int32 bytes), least recently used first; `used` <= `capacity`.

    The size of an entry is estimated: its text (1 byte a character for ASCII, 4 otherwise),
    its ids, and ENTRY_OVERHEAD."""

    def __init__(self, capacity: int = DEFAULT_CACHE_BYTES) -> None:
        self.capacity = capacity
        self.used = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def size(text: str, ids: bytes) -> int:
        return len(text) * (1 if text.isascii() else 4) + len(ids) + ENTRY_OVERHEAD

    def get(self, text: str) -> bytes | None:
        ids = self._entries.get(text)
        if ids is not None:
            self._entries.move_to_end(text)
        return ids

    def put(self, text: str, ids: bytes) -> None:
        size = self.size(text, ids)
        if size > self.capacity or text in self._entries:
            return
        self._entries[text] = ids
        self.used += size
        while self.used > self.capacity:
            old, old_ids = self._entries.popitem(last=False)
            self.used -= self.size(old, old_ids)


@dataclass
class SegmentCounts:
    """What the segment path did (summed over batches and workers)."""

    segments: int = 0  # text segments looked up (empty ones are not counted)
    encoded: int = 0  # of them, encoded (cache misses; a batch encodes a repeated miss once)
    chars: int = 0
    chars_encoded: int = 0
    tokens: int = 0  # ids of those segments
    tokens_encoded: int = 0
    whole_texts: int = 0  # texts encoded whole (the rule does not hold, or a split was not mirrored)

    def add(self, other: SegmentCounts) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


class SegmentEncoder:
    """Encodes batches of texts through a SegmentCache where the tokenizer's rule holds."""

    def __init__(self, backend: Any, rule: SegmentRule, cache: SegmentCache) -> None:
        self.backend = backend
        self.rule = rule
        self.cache = cache
        self.counts = SegmentCounts()

    def take_counts(self) -> SegmentCounts:
        """The counts since the last call (and start again from zero)."""
        counts, self.counts = self.counts, SegmentCounts()
        return counts

    def encode(self, texts: Sequence[str], add_special_tokens: bool) -> list[bytes]:
        """Each text's ids as int32 bytes, as `encode_batch(texts, add_special_tokens)` gives."""
        rule = self.rule
        out: list[bytes] = [b""] * len(texts)
        if not rule.holds or (add_special_tokens and rule.special_prefix is None):
            return self._whole(list(range(len(texts))), texts, add_special_tokens, out)
        rows: list[tuple[int, list[str | bytes]]] = []  # (row, its pieces: ids, or text still to encode)
        whole: list[int] = []
        misses: dict[str, int] = {}  # text -> how many times this batch needs it
        get = self.cache.get
        c = self.counts
        for i, text in enumerate(texts):
            pieces = rule.split(text) if text else None
            if pieces is None:  # an empty text (encoded as the tokenizer does) or an unmirrored scan
                whole.append(i)
                continue
            resolved: list[str | bytes] = []
            for p in pieces:
                if p.__class__ is bytes:
                    resolved.append(p)  # an added token's id
                elif p:
                    c.segments += 1
                    c.chars += len(p)
                    hit = get(p)  # type: ignore[arg-type]
                    if hit is None:
                        misses[p] = misses.get(p, 0) + 1  # type: ignore[index,call-overload]
                        resolved.append(p)
                    else:
                        c.tokens += len(hit) // ID_BYTES
                        resolved.append(hit)
            rows.append((i, resolved))
        new = self._encode_misses(misses)
        pre, post = (rule.special_prefix or b"", rule.special_suffix or b"") if add_special_tokens else (b"", b"")
        for i, resolved in rows:
            out[i] = b"".join([pre, *(p if p.__class__ is bytes else new[p] for p in resolved), post])  # type: ignore[index]
        if whole:
            self._whole(whole, [texts[i] for i in whole], add_special_tokens, out)
        return out

    def _encode_misses(self, misses: dict[str, int]) -> dict[str, bytes]:
        """Encode this batch's distinct misses in one encode_batch call and cache them."""
        c = self.counts
        texts = list(misses)
        new = {t: _ids_bytes(ids) for t, ids in zip(texts, _encode_whole(self.backend, texts, False))}
        for t, ids in new.items():
            self.cache.put(t, ids)
            c.chars_encoded += len(t)
            c.tokens_encoded += len(ids) // ID_BYTES
            c.tokens += misses[t] * (len(ids) // ID_BYTES)
        c.encoded += len(texts)
        return new

    def _whole(self, rows: list[int], texts: Sequence[str], add_special_tokens: bool,
               out: list[bytes]) -> list[bytes]:
        for i, ids in zip(rows, _encode_whole(self.backend, texts, add_special_tokens)):
            out[i] = _ids_bytes(ids)
        self.counts.whole_texts += len(rows)
        return out
