"""Cache breakers: near-identical prompts whose token streams part and later agree again.

Input: a token `AnalysisView` and its `PrefixPass` (advisor.analyze.stage); a `decode` callable
for text, or None. Output: a `BreakerResult`: the breaker records (stats.json "breakers"), one
`PairFinding` per place a request differs from its partner, and what was searched.

Finding is generic and never looks at the text; it reads whole prompts, with no window:
1. Candidate pairs. The part of each prompt past its shared prefix is cut into content-defined
   chunks (`hashing.content_chunks`, all requests at once by `all_content_chunks`: boundaries depend on local content, so shifted text
   yields the same chunks). Each chunk is owned by the latest request that had it past its
   own shared prefix. A request whose remaining chunks come, for at least VOTE_SHARE of their
   tokens (and two blocks), from one earlier request is near-identical to it while losing its
   prefix: a pair. The earlier request holding its deepest such chunk and the previous request
   of its session are candidates too; the alignment keeps the one it loses most to
   (advisor/analyze/candidates.py). Cost: one pass over the tokens past each shared prefix.
2. Alignment (advisor/analyze/align.py). Each pair is aligned over the whole of b: the chain of
   runs b shares with a, cut into regions, each a changed value or a reordering followed by
   content shared again. A region's price is what b would share if that region agreed, given
   the regions before it agree: min(shared_end, L - 1) - max(b's ceiling, region start).
   Summed over a request's regions that is what the request loses to all of them.
3. Grouping. Pairs are joined into families (union-find); within a family, regions whose spans
   overlap (or lie within a block of each other) are one breaker. Requests affected are every
   request with a region in it; tokens lost the sum of their prices.
4. Naming (advisor/analyze/labels.py), from a few decoded examples, after the fact; one
   family's reorderings of one kind (e.g. schema keys in several tools) are one breaker, and
   one breaker seen in several families (one timestamp atop several apps) is merged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from advisor.analyze import labels as lb
from advisor.analyze.align import a_window, align, regions
from advisor.analyze.candidates import candidate_pairs
from advisor.analyze.prefixes import (
    AnalysisView,
    Decode,
    PrefixPass,
    ceiling_per_request,
)

_EXAMPLES = 3
_NAMED = 12  # example pairs decoded per breaker for its label
_NAMED_SITES = 200  # sites named from text, the costliest first; the rest keep their structural label
_SURE = 2 / 3  # share of the decoded examples that must agree on a specific label
_TEXT_MAX = 240
_CONTEXT = 24  # tokens of context each side of a differing span, shown with the example
_NAME_CONTEXT = 96  # tokens before a span read to name it (the enclosing JSON object)


@dataclass(frozen=True)
class PairFinding:
    """One region where request b differs from its earlier partner a (align.Region)."""

    a: int  # earlier request
    b: int  # later request, the one that loses reuse
    diverge: int  # where the differing span starts in b
    a_start: int  # ... and in a
    a_resume: int  # where the common content resumes in a
    b_resume: int  # ... and in b
    shared_end: int  # b's tokens shared with a once this region agrees
    order: bool  # the spans hold the same tokens in another order
    tokens_lost: int


@dataclass(frozen=True)
class BreakerResult:
    breakers: list[dict[str, Any]]  # stats.json "breakers", largest loss first
    pairs: list[PairFinding]  # every priced region, in request order
    search: dict[str, Any]  # stats.json "breaker_search": what was searched


def analyse_pairs(
    w: AnalysisView, p: PrefixPass, pairs: Sequence[tuple[Sequence[int], int]], min_tokens: int
) -> tuple[list[PairFinding], int]:
    """Every region between each later request and the candidate it loses most to that is
    followed by at least `min_tokens` of shared content and costs at least that many, and the
    tokens aligned."""
    ceil = ceiling_per_request(w, p)
    found: list[PairFinding] = []
    aligned = 0
    for cands, b in pairs:
        ub = w.units(b)
        last = int(w.n_tokens[b]) - 1
        best: list[PairFinding] = []
        for a in cands:
            ua = w.units(a)
            start, runs = align(ua, ub)
            aligned += len(ub) - start + min(len(ua) - start, a_window(len(ub) - start))
            mine = []
            for g in regions(ua, ub, start, runs):
                lost = min(g.shared_end, last) - max(int(ceil[b]), g.b0)
                resumed = g.shared_end - (g.b0 if g.order else g.b1)  # content shared again after it
                if lost >= min_tokens and resumed >= min_tokens:
                    mine.append(PairFinding(a, b, g.b0, g.a0, g.a1, g.b1, g.shared_end, g.order, lost))
            if sum(f.tokens_lost for f in mine) > sum(f.tokens_lost for f in best):
                best = mine
        found.extend(best)
    return found, aligned


# --- grouping ---
def _find(parent: np.ndarray, x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = int(parent[x])
    return x


def _spans(w: AnalysisView, findings: Sequence[PairFinding], block_size: int) -> list[tuple[int, list[PairFinding]]]:
    """(family, findings) per breaker site: families by union-find over the pairs, sites by
    overlapping differing spans (within a block) inside a family."""
    parent = np.arange(len(w), dtype=np.int64)
    for f in findings:
        ra, rb = _find(parent, f.a), _find(parent, f.b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    keyed = sorted(((_find(parent, f.b), f.diverge, i) for i, f in enumerate(findings)))
    out: list[tuple[int, list[PairFinding]]] = []
    fam, end = -1, -1
    for root, start, i in keyed:
        f = findings[i]
        if root != fam or start > end + block_size:
            out.append((root, []))
            fam, end = root, -1
        out[-1][1].append(f)
        end = max(end, f.b_resume)
    return out


def _clip(text: str) -> str:
    return text if len(text) <= _TEXT_MAX else text[: _TEXT_MAX - 1] + "…"


def _example_text(w: AnalysisView, f: PairFinding, decode: Decode, context: int) -> lb.ExampleText:
    a, b = w.units(f.a), w.units(f.b)
    return lb.ExampleText(
        before=decode(b[max(0, f.diverge - context) : f.diverge]),
        a_diff=decode(a[f.a_start : f.a_resume]), b_diff=decode(b[f.diverge : f.b_resume]),
        a_after=decode(a[f.a_resume : f.a_resume + _CONTEXT]), b_after=decode(b[f.b_resume : f.b_resume + _CONTEXT]),
    )


def _spread(fs: Sequence[PairFinding], k: int) -> list[PairFinding]:
    """Up to k findings spread over the list (the first is always one of them)."""
    if len(fs) <= k:
        return list(fs)
    return [fs[int(i)] for i in np.linspace(0, len(fs) - 1, k).round().astype(int)]


def _name_site(w: AnalysisView, fs: Sequence[PairFinding], decode: Decode | None) -> dict[str, Any]:
    """Label, moved names and examples of one breaker site (its findings)."""
    kinds = Counter(f.order for f in fs)
    fallback = "reordered content" if kinds[True] > kinds[False] else "varying text"
    if decode is None:
        return {"label": fallback, "examples": [], "orders": None}
    names: Counter[str] = Counter()
    orders: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    examples: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for f in _spread(fs, _NAMED):
        named = lb.name_example(_example_text(w, f, decode, _NAME_CONTEXT), f.order)
        names[named.label] += 1
        if orders is None and named.a_order:
            orders = (named.a_order, named.b_order)
        ex = _example_text(w, f, decode, _CONTEXT)
        if len(examples) < _EXAMPLES and (ex.a_diff, ex.b_diff) not in seen:
            seen.add((ex.a_diff, ex.b_diff))
            examples.append({
                "a_request_id": w.request_ids[f.a], "b_request_id": w.request_ids[f.b],
                "a_text": _clip(ex.widened("a")), "b_text": _clip(ex.widened("b")),
                "a_diff": _clip(ex.a_diff), "b_diff": _clip(ex.b_diff),
                "a_context": _clip(ex.before + ex.a_diff + ex.a_after),
                "b_context": _clip(ex.before + ex.b_diff + ex.b_after),
            })
    label, n = names.most_common(1)[0]
    if n < _SURE * sum(names.values()):
        label = fallback
    return {"label": label, "examples": examples, "orders": orders if label in lb.ORDER_LABELS else None}


def _site_record(w: AnalysisView, fam: int, fs: Sequence[PairFinding], decode: Decode | None) -> dict[str, Any]:
    named = _name_site(w, fs, decode)
    same_session = [w.sessions[f.a] is not None and w.sessions[f.a] == w.sessions[f.b] for f in fs]
    known = all(w.sessions[f.a] is not None and w.sessions[f.b] is not None for f in fs)
    return {
        **named, "family": fam,
        "start": min(f.diverge for f in fs), "end": max(f.b_resume for f in fs),
        "requests": {f.b for f in fs}, "tokens_lost": sum(f.tokens_lost for f in fs),
        "varies": "per request" if any(same_session) else ("per session" if known else None),
    }


def _merge(sites: list[dict[str, Any]], block_size: int) -> list[dict[str, Any]]:
    """One breaker per label: a family's reorderings of one kind (one serializer to fix), and
    sites of one label at overlapping spans across families (one template line). A sweep by
    start: linear in the sites."""
    merged: list[dict[str, Any]] = []
    by_family: dict[tuple[str, int], dict[str, Any]] = {}  # (order label, family) -> its breaker
    latest: dict[str, dict[str, Any]] = {}  # label -> the breaker whose span the sweep is in
    for s in sorted(sites, key=lambda d: (d["start"], -d["tokens_lost"])):
        label = s["label"]
        m = by_family.get((label, s["family"])) if label in lb.ORDER_LABELS else None
        cur = latest.get(label)
        if m is None and cur is not None and s["start"] <= cur["end"] + block_size:
            m = cur
        if m is None:
            m = {**s, "families": {s["family"]}, "requests": set(s["requests"])}
            merged.append(m)
        else:
            m["families"].add(s["family"])
            m["start"], m["end"] = min(m["start"], s["start"]), max(m["end"], s["end"])
            m["requests"] |= s["requests"]
            m["tokens_lost"] += s["tokens_lost"]
            m["examples"] = (m["examples"] + s["examples"])[:_EXAMPLES]
            m["orders"] = m["orders"] or s["orders"]
            m["varies"] = "per request" if "per request" in (m["varies"], s["varies"]) else m["varies"]
        if label in lb.ORDER_LABELS:
            by_family[(label, s["family"])] = m
        if cur is None or m["end"] >= cur["end"]:
            latest[label] = m
    return merged


def _moved(orders: tuple[tuple[str, ...], tuple[str, ...]] | None) -> list[str]:
    if not orders:
        return []
    a, b = orders
    return [x for i, x in enumerate(b) if i >= len(a) or a[i] != x]


def _describe(label: str, orders: tuple[tuple[str, ...], tuple[str, ...]] | None, varies: str | None) -> tuple[str, str]:
    """(what it is, the fix), concretely: the tools or keys named."""
    what, fix = lb.DESCRIPTIONS[label], lb.FIXES[label]
    if orders:
        a, b = orders
        what += f" One request sends {', '.join(a)}; another {', '.join(b)}."
        if label == "tool order":
            fix = f"Send the tools sorted by name: {', '.join(sorted(set(a)))}."
    if varies and label in lb.VALUE_LABELS:
        what += f" It varies {varies}."
    return what, fix


def _record(m: dict[str, Any], block_size: int, total_tokens: int) -> dict[str, Any]:
    what, fix = _describe(m["label"], m["orders"], m["varies"])
    return {
        "label": m["label"],
        "kind": "order" if m["label"] in lb.ORDER_LABELS else "value",
        "position_token": m["start"],
        "position_block": m["start"] // block_size,
        "end_token": m["end"],
        "requests_affected": len(m["requests"]),
        "tokens_lost": m["tokens_lost"],
        "rate_lost": m["tokens_lost"] / total_tokens if total_tokens else 0.0,
        "varies": m["varies"],
        "moved": _moved(m["orders"]),
        "orders": [list(m["orders"][0]), list(m["orders"][1])] if m["orders"] else None,
        "examples": m["examples"],
        "description": f"{what} {fix}",
        "fix": fix,
    }


def group_findings(
    w: AnalysisView, findings: Sequence[PairFinding], decode: Decode | None, block_size: int, total_tokens: int,
) -> list[dict[str, Any]]:
    """The breaker records of these findings, largest loss first."""
    spans = sorted(_spans(w, findings, block_size), key=lambda x: -sum(f.tokens_lost for f in x[1]))
    sites = [_site_record(w, fam, fs, decode if k < _NAMED_SITES else None) for k, (fam, fs) in enumerate(spans)]
    out = [_record(m, block_size, total_tokens) for m in _merge(sites, block_size)]
    out.sort(key=lambda d: (-d["tokens_lost"], d["position_token"]))
    return out


def find_breakers(w: AnalysisView, p: PrefixPass, decode: Decode | None, block_size: int) -> BreakerResult:
    """Every cache breaker of a token workload (none for hash traces: no content to compare)."""
    if w.hash_trace or len(w) < 2:
        return BreakerResult([], [], {"searched": "nothing: a hash trace has no token content"
                                      if w.hash_trace else "nothing: fewer than two requests"})
    min_tokens = 2 * block_size
    pairs, chunked = candidate_pairs(w, p, min_tokens)
    findings, aligned = analyse_pairs(w, p, pairs, min_tokens)
    total = int(w.n_tokens.sum())
    search = {
        "searched": "whole prompts: every token past each request's shared prefix is chunked, and each "
                    "candidate pair is aligned over the whole later prompt (and the earlier one up to "
                    f"twice that length plus {a_window(0):,} tokens past their common prefix)",
        "tokens_chunked": chunked, "candidate_pairs": len(pairs), "tokens_aligned": aligned,
        "requests_with_breaker": len({f.b for f in findings}),
    }
    return BreakerResult(group_findings(w, findings, decode, block_size, total), findings, search)
