"""Candidate pairs for the breaker search: which earlier request a prompt nearly repeats.

Input: a token `AnalysisView`, its `PrefixPass` and the least tokens a finding needs. Output:
(earlier candidates, later request) pairs in request order, and the tokens chunked
(advisor/analyze/breakers.py, step 1, which aligns each pair).

The part of each prompt past its shared prefix (less a margin) is cut into content-defined
chunks (`hashing.all_content_chunks`). Each chunk is owned by the latest earlier request that
had the same chunk past its own shared prefix. A request votes for each owner with the tokens
of its chunks that owner holds (in the same cache namespace only); the owner with most votes
(ties: the latest request) is a candidate when its votes reach the least tokens and VOTE_SHARE
of the request's tokens past its shared prefix. So are the owner of its deepest owned chunk,
when that owner's votes reach the least tokens, and the previous request of its session.

`candidate_pairs_reference` says this as a loop over requests with a dict of owners (the
readable reference); `candidate_pairs` computes the same from sorted arrays, in a few numpy
passes over all chunks at once, and a test holds the two equal.
"""

from __future__ import annotations

import itertools

import numpy as np

from advisor.analyze.hashing import all_content_chunks
from advisor.analyze.prefixes import AnalysisView, PrefixPass

VOTE_SHARE = 0.15  # of the tokens past the shared prefix that must come from one earlier request
CHUNK_MARGIN = 8  # units before the shared end re-chunked, so chunk boundaries past it are exact

Pairs = list[tuple[tuple[int, ...], int]]


def _chunks(w: AnalysisView, p: PrefixPass, min_tokens: int) -> tuple[np.ndarray, ...]:
    """Every request's chunks past its shared prefix less the margin: (hashes, starts, offsets
    per request, where chunking began per request, whether the request is searched)."""
    lengths = np.diff(w.offsets)
    chunk_from = np.maximum(0, p.shared_tokens - CHUNK_MARGIN)
    searched = lengths - p.shared_tokens >= min_tokens
    starts_at = np.where(searched, w.offsets[:-1] + chunk_from, -1)
    hashes, starts, coff = all_content_chunks(w.values, w.offsets, starts_at)
    return hashes, starts, coff, chunk_from, searched


def _namespace_ids(w: AnalysisView) -> np.ndarray:
    ids: dict[str | None, int] = {}
    return np.array([ids.setdefault(x, len(ids)) for x in w.namespaces], dtype=np.int64)


def _previous_in_session(w: AnalysisView) -> np.ndarray:
    """Per request, the previous request of its session (-1: none, or no session)."""
    last: dict[str, int] = {}
    out = np.full(len(w), -1, dtype=np.int64)
    for r, s in enumerate(w.sessions):
        if s is not None:
            out[r] = last.get(s, -1)
            last[s] = r
    return out


def candidate_pairs_reference(w: AnalysisView, p: PrefixPass, min_tokens: int) -> tuple[Pairs, int]:
    """(earlier candidates, later request) pairs and the tokens chunked (module docstring),
    request by request."""
    last: dict[int, int] = {}
    pairs: Pairs = []
    ns = _namespace_ids(w)
    before_of = _previous_in_session(w)
    all_hashes, all_starts, coff, chunk_from, _ = _chunks(w, p, min_tokens)
    chunked = 0
    for r in range(len(w)):
        units = w.units(r)
        s = int(p.shared_tokens[r])
        room = len(units) - s
        before = int(before_of[r]) if before_of[r] >= 0 else None
        if room < min_tokens:
            continue
        lo = int(chunk_from[r])
        hashes, starts = all_hashes[coff[r] : coff[r + 1]], all_starts[coff[r] : coff[r + 1]]
        chunked += len(units) - lo
        keep = starts + lo >= s
        hashes, lens = hashes[keep], np.diff(np.append(starts, len(units) - lo))[keep]
        if last and len(hashes):
            owners = np.array(list(map(last.get, hashes.tolist(), itertools.repeat(-1))), dtype=np.int64)
            ok = owners >= 0
            ok[ok] = ns[owners[ok]] == ns[r]
            if ok.any():
                who, inv = np.unique(owners[ok], return_inverse=True)
                votes = np.bincount(inv, weights=lens[ok])
                best = int(np.flatnonzero(votes == votes.max())[-1])  # ties: the latest request
                if votes[best] >= max(min_tokens, VOTE_SHARE * room):
                    cands = [int(who[best])]
                    deepest = int(owners[ok][-1])
                    if votes[int(np.searchsorted(who, deepest))] >= min_tokens:
                        cands.append(deepest)
                    if before is not None and ns[before] == ns[r]:
                        cands.append(before)
                    pairs.append((tuple(dict.fromkeys(cands)), r))
        last.update(dict.fromkeys(hashes.tolist(), r))
    return pairs, chunked


def candidate_pairs(w: AnalysisView, p: PrefixPass, min_tokens: int) -> tuple[Pairs, int]:
    """`candidate_pairs_reference`'s result, from all chunks at once (module docstring)."""
    ns = _namespace_ids(w)
    before_of = _previous_in_session(w)
    hashes, starts, coff, chunk_from, searched = _chunks(w, p, min_tokens)
    lengths = np.diff(w.offsets)
    chunked = int((lengths - chunk_from)[searched].sum())
    # each chunk's request, length (to the next chunk's start, or the prompt's end) and whether
    # it lies past the request's shared prefix (kept: only those vote and own)
    per_request = np.diff(coff)
    req = np.repeat(np.arange(len(w), dtype=np.int64), per_request)
    ends = np.append(starts[1:], 0)
    last_of_request = coff[1:][per_request > 0] - 1
    ends[last_of_request] = (lengths - chunk_from)[per_request > 0]
    chunk_len = ends - starts
    kept = starts + chunk_from[req] >= p.shared_tokens[req]
    hashes, req, chunk_len = hashes[kept], req[kept], chunk_len[kept]
    owner = _latest_earlier_owner(hashes, req)
    ok = owner >= 0
    ok[ok] = ns[owner[ok]] == ns[req[ok]]
    req, owner, chunk_len = req[ok], owner[ok], chunk_len[ok]
    if len(req) == 0:
        return [], chunked
    # the votes of each (request, owner): chunks are in request order, so grouping is a stable sort
    order = np.lexsort((owner, req))
    r_sorted, o_sorted = req[order], owner[order]
    first = np.flatnonzero(np.r_[True, (r_sorted[1:] != r_sorted[:-1]) | (o_sorted[1:] != o_sorted[:-1])])
    g_req, g_owner = r_sorted[first], o_sorted[first]
    g_votes = np.add.reduceat(chunk_len[order].astype(np.float64), first)
    # per request: the owner with most votes, ties to the latest (the largest owner)
    by_votes = np.lexsort((g_owner, g_votes, g_req))
    top = by_votes[np.r_[g_req[by_votes][1:] != g_req[by_votes][:-1], True]]
    # per request: the owner of its deepest owned chunk (the last in chunk order), and its votes
    last_chunk = np.flatnonzero(np.r_[req[1:] != req[:-1], True])
    deepest_req, deepest = req[last_chunk], owner[last_chunk]
    at = np.searchsorted(g_req * (len(w) + 1) + g_owner, deepest_req * (len(w) + 1) + deepest)
    deepest_votes = dict(zip(deepest_req.tolist(), zip(deepest.tolist(), g_votes[at].tolist())))
    room = (lengths - p.shared_tokens)[g_req[top]]
    passes = g_votes[top] >= np.maximum(min_tokens, VOTE_SHARE * room)
    pairs: Pairs = []
    for r, best in zip(g_req[top][passes].tolist(), g_owner[top][passes].tolist()):
        cands = [best]
        d, d_votes = deepest_votes[r]
        if d_votes >= min_tokens:
            cands.append(d)
        before = int(before_of[r])
        if before >= 0 and ns[before] == ns[r]:
            cands.append(before)
        pairs.append((tuple(dict.fromkeys(cands)), r))
    return pairs, chunked


def _latest_earlier_owner(hashes: np.ndarray, req: np.ndarray) -> np.ndarray:
    """Per chunk, the latest request before its own that had the same hash (-1: none). `req`
    is non-decreasing (chunks in request order)."""
    owner = np.full(len(hashes), -1, dtype=np.int64)
    if len(hashes) == 0:
        return owner
    order = np.lexsort((req, hashes))  # by hash, then request; stable
    h, r = hashes[order], req[order]
    new_hash = np.r_[True, h[1:] != h[:-1]]
    new_pair = new_hash | np.r_[True, r[1:] != r[:-1]]
    # each (hash, request) run's first position; the element before it is the latest earlier
    # request with the hash, when that element has the same hash
    run_start = np.maximum.accumulate(np.where(new_pair, np.arange(len(h)), 0))
    prev = run_start - 1
    has = (prev >= 0) & ~new_hash[run_start]
    owner[order[has]] = r[prev[has]]
    return owner
