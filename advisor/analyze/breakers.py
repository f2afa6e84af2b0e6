"""Cache breakers: near-identical prompts whose token streams diverge early.

Input: a token `AnalysisView` and its `PrefixPass` (advisor.analyze.stage); a `decode` callable for text.
Output: a list of breaker dicts (stats.json "breakers", keys per the cross-helper contract).

Finding is generic and never looks at the text:
1. Candidate pairs. Each request's leading window is cut into content-defined chunks
   (`stats.content_chunks`: boundaries depend on local content, so a shifted body still yields
   the same chunks). A dict maps chunk hash -> latest request that had it. A request whose
   longest shared prefix leaves room, but whose chunks *after* that prefix mostly appear in one
   earlier request, is near-identical to that request while losing the prefix early: a pair.
2. Alignment. For a pair (earlier a, later b): p = their common prefix; from p, the first k-gram
   of b that re-appears in a (and then matches for at least `min_run` tokens) marks where the
   common content resumes (b at ra, a at qa). The differing text is a[p:qa] versus b[p:ra].
   Re-aligning repeatedly (a few rounds) follows reordered blocks; the end of the last aligned
   run is how far b would share if the differing spans were equal, so
   tokens_lost = min(end, L-1) - (b's actual ceiling tokens).
3. Grouping. Pairs are joined into families (union-find over the pairs) and split by the block
   where they diverge; each group is one breaker.
Labels come last, from the decoded differing text of the group's example pairs (timestamp, uuid/id,
tool order, whitespace, per-user text, otherwise "unknown"); they name a finding, never make one.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from advisor.analyze.hashing import common_prefix_len, content_chunks, mix64
from advisor.analyze.prefixes import (
    AnalysisView,
    Decode,
    PrefixPass,
    ceiling_per_request,
)

_KGRAM = 8
_MIN_RUN = 16
_ROUNDS = 32
_ALIGN_WINDOW_FACTOR = 4
_EXAMPLES = 3
_TEXT_MAX = 240
_CONTEXT = 24  # tokens of context each side of a differing span, for labels


@dataclass(frozen=True)
class PairFinding:
    a: int  # earlier request
    b: int  # later request, the one that lost its prefix
    diverge: int  # common prefix of a and b, tokens
    a_resume: int  # where the common content resumes in a
    b_resume: int  # ... and in b
    tokens_lost: int


def candidate_pairs(w: AnalysisView, p: PrefixPass, lead_tokens: int, min_tokens: int) -> list[tuple[int, int]]:
    """(earlier, later) pairs of near-identical prompts whose shared prefix stops early."""
    last: dict[int, int] = {}
    pairs: list[tuple[int, int]] = []
    ns_of: dict[str | None, int] = {}
    ns = np.array([ns_of.setdefault(x, len(ns_of)) for x in w.namespaces], dtype=np.int64)
    for r in range(len(w)):
        units = w.units(r)[:lead_tokens]
        hashes, starts = content_chunks(units)
        s = int(p.shared_tokens[r])
        room = len(units) - s
        if last and room >= min_tokens:
            sel = starts >= s
            hl = hashes[sel].tolist()
            if hl:
                lens = np.diff(np.append(starts, len(units)))[sel]
                owners = np.fromiter((last.get(h, -1) for h in hl), dtype=np.int64, count=len(hl))
                ok = owners >= 0
                ok[ok] = ns[owners[ok]] == ns[r]
                if ok.any():
                    votes = Counter()
                    for o, n in zip(owners[ok].tolist(), lens[ok].tolist(), strict=True):
                        votes[o] += n
                    q, v = max(votes.items(), key=lambda kv: (kv[1], kv[0]))
                    if v >= max(min_tokens, 0.3 * room):
                        pairs.append((q, r))
        if len(hashes):
            last.update(zip(hashes.tolist(), itertools.repeat(r)))
    return pairs


def _kgrams(x: np.ndarray, k: int) -> np.ndarray:
    win = np.lib.stride_tricks.sliding_window_view(x.astype(np.uint64), k)
    pos = np.arange(k, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return mix64(win ^ pos).sum(axis=1, dtype=np.uint64)


def align_pair(a: np.ndarray, b: np.ndarray, window: int) -> tuple[int, int, int, int]:
    """(diverge, a_resume, b_resume, aligned_end_in_b) for two token arrays; see module doc.

    k-grams of a[p : p+window] are hashed once; b is scanned from p on, each round from the end
    of the previous aligned run, and every round searches all of a's window (not only forward),
    so blocks that moved earlier (reordered tools) are followed too. A resume point needs a
    match of at least _MIN_RUN tokens, so short boilerplate does not count as re-alignment.
    """
    p = common_prefix_len(a, b)
    wa, wb = a[p : p + window], b[p : p + _ALIGN_WINDOW_FACTOR * window]
    if len(wa) < _KGRAM or len(wb) < _KGRAM:
        return p, p, p, p
    ha, hb = _kgrams(wa, _KGRAM), _kgrams(wb, _KGRAM)
    hits = np.flatnonzero(np.isin(hb, ha))  # offsets in b (from p) whose k-gram occurs in a
    first: tuple[int, int] | None = None
    pb = p
    for _ in range(_ROUNDS):
        found = None
        tried = 0
        for i in hits[np.searchsorted(hits, pb - p) :].tolist():
            if tried == 32:
                break
            tried += 1
            for j in np.flatnonzero(ha == hb[i])[:4].tolist():
                run = common_prefix_len(a[p + j :], b[p + i :])
                if run >= _MIN_RUN:
                    found = (p + j, p + i, run)
                    break
            if found:
                break
        if found is None:
            break
        if first is None:
            first = (found[0], found[1])
        pb = found[1] + found[2]
    if first is None:
        return p, p, p, p
    return p, first[0], first[1], pb


def analyse_pairs(
    w: AnalysisView, p: PrefixPass, pairs: Sequence[tuple[int, int]], window: int, min_tokens: int
) -> list[PairFinding]:
    ceil = ceiling_per_request(w, p)
    found = []
    for a, b in pairs:
        div, qa, ra, end = align_pair(w.units(a), w.units(b), window)
        if ra == div and qa == div:
            continue
        lost = min(end, int(w.n_tokens[b]) - 1) - int(ceil[b])
        if lost >= min_tokens:
            found.append(PairFinding(a, b, div, qa, ra, lost))
    return found


# --- labels: from the text, after the fact ---
_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}|(?<!\d)\d{1,2}:\d{2}(?::\d{2})?(?!\d)|\b\d{1,2}[/.]\d{1,2}[/.]\d{2,4}\b"
    r"|\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.? \d{1,2}\b"
    r"|\b(?:mon|tues?|wed(?:nes)?|thu(?:rs)?|fri|sat(?:ur)?|sun)day\b|\b1[5-9]\d{8}(?:\d{3})?\b",
    re.IGNORECASE,
)
_IDENT = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    r"|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b|\b\d{6,}\b|\b[a-z]+[-_]\d{3,}\b",
    re.IGNORECASE,
)
_JSONISH = re.compile(r'"(?:name|function|tools?|parameters|type)"\s*:')

DESCRIPTIONS = {
    "timestamp": "A date or time changes between otherwise identical prompts, before the shared "
    "content. Move it after the shared part (e.g. into the last user message) or round it.",
    "uuid/id": "A request or user id changes between otherwise identical prompts, before the "
    "shared content. Put ids after the shared part, or in request metadata instead of the prompt.",
    "tool order": "The same tools (or JSON objects) are serialized in a different order, so the "
    "prompts diverge at the first reordered one. Sort tools and JSON keys deterministically.",
    "reordered content": "The same pieces of text appear in a different order. Emit them in a "
    "fixed order.",
    "whitespace": "Prompts differ only in whitespace. Normalize whitespace before sending.",
    "per-user text": "Per-user or per-request text sits before content that is otherwise shared. "
    "Put the shared instructions first and the per-user text after them.",
    "unknown": "Near-identical prompts diverge early here; look at the example texts to see what "
    "varies and move it after the shared content.",
}


def label_pair(a_diff: str, b_diff: str, a_ctx: str, b_ctx: str, a_rest: str, b_rest: str) -> str:
    """Name what differs between two near-identical prompts (texts from their divergence)."""
    if a_diff.split() == b_diff.split():
        return "whitespace"
    da, db = a_diff.strip(), b_diff.strip()
    moved = [d for d in (da, db) if len(d) >= 3]
    if moved and _mostly_in(da, b_rest) and _mostly_in(db, a_rest) and not (da + db).isdigit():
        return "tool order" if _JSONISH.search(a_ctx + b_ctx + a_rest[:4000]) else "reordered content"
    if _TIMESTAMP.search(a_ctx) or _TIMESTAMP.search(b_ctx):
        return "timestamp"
    if _IDENT.search(a_ctx) or _IDENT.search(b_ctx):
        return "uuid/id"
    if re.search(r"[^\W\d_]", da + db):
        return "per-user text"
    return "unknown"


def _mostly_in(diff: str, other: str, k: int = 8) -> bool:
    """True when most of `diff` also occurs in `other` (so it moved rather than changed)."""
    if len(diff) <= k:
        return diff in other
    shingles = {diff[i : i + k] for i in range(0, len(diff) - k + 1)}
    return sum(s in other for s in shingles) >= 0.8 * len(shingles)


def _word(before: str, diff: str, after: str, most: int = 40) -> str:
    """The differing text widened to whole words (a changed digit shows its whole date)."""
    left = re.search(r"\S{0,%d}$" % most, before)
    right = re.match(r"\S{0,%d}" % most, after)
    return (left.group(0) if left else "") + diff + (right.group(0) if right else "")


def _clip(text: str) -> str:
    return text if len(text) <= _TEXT_MAX else text[: _TEXT_MAX - 1] + "…"


def _find(parent: np.ndarray, x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = int(parent[x])
    return x


def group_findings(
    w: AnalysisView, findings: Sequence[PairFinding], decode: Decode | None, block_size: int,
    total_tokens: int, window: int,
) -> list[dict[str, Any]]:
    """One breaker per (family of near-identical prompts, divergence block)."""
    parent = np.arange(len(w), dtype=np.int64)
    for f in findings:
        ra, rb = _find(parent, f.a), _find(parent, f.b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[tuple[int, int], list[PairFinding]] = {}
    for f in findings:
        groups.setdefault((_find(parent, f.b), f.diverge // block_size), []).append(f)
    out = []
    for fs in groups.values():
        pos = int(np.median([f.diverge for f in fs]))
        labels: Counter[str] = Counter()
        examples: list[dict[str, Any]] = []
        seen_texts: set[tuple[str, str]] = set()
        for f in fs[:12]:
            a, b = w.units(f.a), w.units(f.b)
            if decode is None:
                labels["unknown"] += 1
                continue
            a_diff, b_diff = decode(a[f.diverge : f.a_resume]), decode(b[f.diverge : f.b_resume])
            lo = max(0, f.diverge - _CONTEXT)
            before = decode(a[lo : f.diverge])
            a_after, b_after = decode(a[f.a_resume : f.a_resume + _CONTEXT]), decode(b[f.b_resume : f.b_resume + _CONTEXT])
            a_ctx, b_ctx = before + a_diff + a_after, before + b_diff + b_after
            a_rest = decode(a[f.diverge : f.diverge + window])
            b_rest = decode(b[f.diverge : f.diverge + window])
            labels[label_pair(a_diff, b_diff, a_ctx, b_ctx, a_rest, b_rest)] += 1
            if len(examples) < _EXAMPLES and (a_diff, b_diff) not in seen_texts:
                seen_texts.add((a_diff, b_diff))
                examples.append({
                    "a_request_id": w.request_ids[f.a], "b_request_id": w.request_ids[f.b],
                    "a_text": _clip(_word(before, a_diff, a_after)),
                    "b_text": _clip(_word(before, b_diff, b_after)),
                    "a_diff": _clip(a_diff), "b_diff": _clip(b_diff),
                    "a_context": _clip(a_ctx), "b_context": _clip(b_ctx),
                })
        label = labels.most_common(1)[0][0] if labels else "unknown"
        lost = sum(f.tokens_lost for f in fs)
        out.append({
            "label": label,
            "position_token": pos,
            "position_block": pos // block_size,
            "requests_affected": len({f.b for f in fs}),
            "tokens_lost": lost,
            "rate_lost": lost / total_tokens if total_tokens else 0.0,
            "examples": examples,
            "description": DESCRIPTIONS[label],
        })
    return _merge_alike(out, total_tokens)


def _merge_alike(groups: list[dict[str, Any]], total_tokens: int) -> list[dict[str, Any]]:
    """Join family groups with the same label at the same block: one breaker seen in many
    families of prompts (e.g. one timestamp line atop several apps' system prompts)."""
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for g in sorted(groups, key=lambda d: -d["tokens_lost"]):
        key = (g["label"], g["position_block"])
        m = merged.get(key)
        if m is None:
            merged[key] = {**g, "examples": list(g["examples"]), "_pos": [g["position_token"]] * g["requests_affected"]}
            continue
        m["requests_affected"] += g["requests_affected"]
        m["tokens_lost"] += g["tokens_lost"]
        m["_pos"] += [g["position_token"]] * g["requests_affected"]
        m["examples"] = (m["examples"] + g["examples"])[:_EXAMPLES]
    out = []
    for m in merged.values():
        m["position_token"] = int(np.median(m.pop("_pos")))
        m["rate_lost"] = m["tokens_lost"] / total_tokens if total_tokens else 0.0
        out.append(m)
    out.sort(key=lambda d: (-d["tokens_lost"], d["position_token"]))
    return out


@dataclass(frozen=True)
class BreakerResult:
    breakers: list[dict[str, Any]]  # stats.json "breakers", largest loss first
    pairs: list[PairFinding]  # one per affected request


def find_breakers(
    w: AnalysisView, p: PrefixPass, decode: Decode | None, block_size: int, lead_tokens: int
) -> BreakerResult:
    """Every cache breaker of a token workload (none for hash traces: no content to compare)."""
    if w.hash_trace or len(w) < 2:
        return BreakerResult([], [])
    min_tokens = 2 * block_size
    window = _ALIGN_WINDOW_FACTOR * lead_tokens  # a moved block (a tool list) can be long
    pairs = candidate_pairs(w, p, lead_tokens, min_tokens)
    findings = analyse_pairs(w, p, pairs, window, min_tokens)
    total = int(w.n_tokens.sum())
    return BreakerResult(group_findings(w, findings, decode, block_size, total, window), findings)
