"""Analyze stage: per-request prefix statistics, the token-granular ceiling, top shared prefixes.

Inputs: one `Workload` (token ids per request as flat Arrow/numpy buffers, or a hash trace's
hash ids, plus request ids, models, sessions) built by `load_workload` from requests.parquet and
tokens.parquet. Outputs: an `Analysis` holding the prefixes.parquet and clusters.parquet tables
and the stats.json object; cli.py writes them.

The central number is `ceiling_tokens` (DESIGN §6): for each request, the longest prefix it shares
with ANY earlier request, in tokens, capped so the last prompt token is recomputed as vLLM does;
summed over requests it is what an infinite, token-granular cache could serve. It is not the
simulator's block ceiling (whole blocks only, per block size), which is never larger.

Hashing primitives (chained block hashes, content-defined chunks) are in advisor/prefixhash.py;
cache breakers in advisor/breakers.py; clusters in advisor/clusters.py.

How it streams: requests are visited in arrival order. Each prompt's full blocks at the analysis
block size get 64-bit chained hashes (a block's hash covers every token before it, and the
request's model, LoRA and cache salt, since vLLM never shares blocks across those). A dict maps a
chained hash to the first request that had it; because hashes are chained, "block d is known"
implies "blocks < d are known", so the matched depth is a binary search. The tokens past the last
matched block are compared token by token only against a few candidate earlier requests: the first
request of each (parent block, first token of the next block), at most 4 per such key: exact
unless more than 4 earlier requests continue one block with the same first token and different
next tokens; then a request's shared length may be undercounted by less than one block (the
full-block part is always exact). Memory grows with distinct blocks
(dict entries) and with total tokens only as flat int32 buffers (never Python objects).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from advisor import schema, workload
from advisor.prefixhash import chained_hashes, common_prefix_len

Decode = Callable[[Sequence[int]], str]

_MASK = (1 << 64) - 1
_MAX_CANDIDATES = 4  # earlier requests compared token by token per (parent block, first token)


# --- the workload as read from the run folder ---
@dataclass
class Workload:
    """Requests in arrival order. `values[offsets[i]:offsets[i+1]]` are request i's units:
    token ids (int32) for token logs, hash ids (int64) for hash traces (`unit_tokens` tokens
    each, the last one possibly partial)."""

    request_ids: list[str]
    n_tokens: np.ndarray  # int64, prompt tokens per request
    values: np.ndarray
    offsets: np.ndarray  # int64, len N+1
    models: list[str | None]
    sessions: list[str | None]
    namespaces: list[str | None]  # "model|lora|cache_salt": requests in different ones never share
    hash_trace: bool = False
    unit_tokens: int = 1  # tokens per unit: 1, or the trace block size

    def __len__(self) -> int:
        return len(self.request_ids)

    def units(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]


def workload_from_lists(
    token_lists: Sequence[Sequence[int]],
    request_ids: Sequence[str] | None = None,
    models: Sequence[str | None] | None = None,
    sessions: Sequence[str | None] | None = None,
) -> Workload:
    """A token Workload from Python lists (tests, small inputs)."""
    return from_workload(workload.Workload.from_token_lists(
        token_lists, request_ids=request_ids, models=models, sessions=sessions))


def load_workload(requests_path: Path, tokens_path: Path) -> Workload:
    """The analysis view of the run folder, read by advisor.workload (the one reader of
    requests + tokens; never the raw request text)."""
    return from_workload(workload.load_workload(requests_path, tokens_path))


def from_workload(w: workload.Workload) -> Workload:
    """Units are token ids, or a hash trace's hash ids (`unit_tokens` tokens each)."""
    n = w.num_requests
    if w.is_hash_trace:
        assert w.hash_ids is not None
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(h) for h in w.hash_ids], out=offsets[1:])
        values = np.concatenate(w.hash_ids) if n else np.zeros(0, np.int64)
    else:
        assert w.token_values is not None and w.token_offsets is not None
        values, offsets = w.token_values, w.token_offsets
    models = list(w.request_models) or [None] * n
    return Workload(
        request_ids=w.request_ids.to_pylist(),
        n_tokens=w.n_tokens,
        values=values, offsets=offsets, models=models, sessions=list(w.sessions) or [None] * n,
        # requests in different namespaces never share a block (the simulator's salts)
        namespaces=[
            None if (m, lo, s) == (None, None, None) else f"{m}|{lo}|{s}"
            for m, lo, s in zip(models, w.lora, w.cache_salt, strict=True)
        ],
        hash_trace=w.is_hash_trace, unit_tokens=w.trace_block_size or 1,
    )


# --- options and results ---
@dataclass(frozen=True)
class AnalyzeOptions:
    block_size: int = 16  # analysis block size (tokens); hash traces use the trace's own
    seed: int = 0  # clustering
    max_clusters: int = 12
    top_prefixes: int = 10
    lead_tokens: int = 1024  # leading window used for clustering features and breaker search

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PrefixPass:
    """Per-request results of the streaming pass (arrays of length N)."""

    shared_tokens: np.ndarray  # int64, longest prefix shared with any earlier request
    shared_blocks: np.ndarray  # int64, full analysis blocks of it
    best_match: np.ndarray  # int64, index of that earlier request, -1 when none
    same_session_tokens: np.ndarray  # int64, of shared_tokens, from blocks first seen in-session
    hashes: np.ndarray  # int64, every request's chained block hashes, concatenated
    hash_offsets: np.ndarray  # int64, len N+1
    block_tokens: int  # tokens per hashed block


def _namespace_key(ns: str | None) -> int:
    if ns is None:
        return 0
    import hashlib

    return int.from_bytes(hashlib.blake2b(ns.encode(), digest_size=8).digest(), "little")


def prefix_pass(w: Workload, block_size: int) -> PrefixPass:
    """Longest earlier prefix per request (see the module docstring for the method)."""
    n = len(w)
    unit_block = 1 if w.hash_trace else block_size
    block_tokens = w.unit_tokens if w.hash_trace else block_size
    shared = np.zeros(n, dtype=np.int64)
    best = np.full(n, -1, dtype=np.int64)
    same = np.zeros(n, dtype=np.int64)
    sess_code = _codes(w.sessions)
    first: dict[int, int] = {}  # chained hash -> first request that had it
    cands: dict[int, list[int]] = {}  # (parent hash, first unit of next block) -> requests
    all_hashes: list[np.ndarray] = []
    hash_offsets = np.zeros(n + 1, dtype=np.int64)
    ns_cache: dict[str | None, int] = {}
    for r in range(n):
        units = w.units(r)
        ns = ns_cache.setdefault(w.namespaces[r], _namespace_key(w.namespaces[r]))
        hs = chained_hashes(units, unit_block, ns)
        all_hashes.append(hs)
        hash_offsets[r + 1] = hash_offsets[r] + len(hs)
        hl = hs.tolist()
        lo, hi = 0, len(hl)
        while lo < hi:  # chained hashes: known blocks form a prefix of hl
            mid = (lo + hi) // 2
            if hl[mid] in first:
                lo = mid + 1
            else:
                hi = mid
        m = lo
        parent = hl[m - 1] if m else ns
        b = first[hl[m - 1]] if m else -1
        ext = 0
        tail = units[m * unit_block : (m + 1) * unit_block]
        if len(tail) and not w.hash_trace:
            key = parent ^ (int(tail[0]) * 0x9E3779B97F4A7C15 & _MASK)
            pool = cands.setdefault(key, [])
            for c in ([b] if b >= 0 else []) + pool:
                other = w.units(c)[m * unit_block : (m + 1) * unit_block]
                e = common_prefix_len(tail, other)
                if e > ext:
                    ext, b = e, c
            if len(pool) < _MAX_CANDIDATES:
                pool.append(r)
        if m < len(hl):
            first.update(zip(hl[m:], itertools.repeat(r)))
        if w.hash_trace:
            shared[r] = min(m * block_tokens, int(w.n_tokens[r]))
        else:
            shared[r] = m * block_size + ext
        best[r] = b
        if sess_code[r] >= 0 and shared[r]:
            owners = np.fromiter((first[h] for h in hl[:m]), dtype=np.int64, count=m)
            same_blocks = int(np.count_nonzero(sess_code[owners] == sess_code[r]))
            same[r] = min(same_blocks * block_tokens, int(shared[r]))
            if ext and b >= 0 and sess_code[b] == sess_code[r]:
                same[r] += ext
    hashes = np.concatenate(all_hashes) if all_hashes else np.empty(0, dtype=np.int64)
    blocks = np.minimum(shared // block_tokens, hash_offsets[1:] - hash_offsets[:-1])
    return PrefixPass(shared, blocks, best, same, hashes, hash_offsets, block_tokens)


def _codes(values: Sequence[str | None]) -> np.ndarray:
    """Integer codes of string values; -1 for None."""
    table: dict[str, int] = {}
    return np.array([-1 if v is None else table.setdefault(v, len(table)) for v in values],
                    dtype=np.int64).reshape(-1)


def ceiling_per_request(w: Workload, p: PrefixPass) -> np.ndarray:
    """Tokens an infinite token-granular cache serves: shared tokens, last token recomputed."""
    return np.minimum(p.shared_tokens, np.maximum(w.n_tokens - 1, 0))

# --- the stage: prefix pass + breakers + clusters -> tables and stats.json ---
@dataclass
class Analysis:
    prefixes: pa.Table  # schema.PREFIXES
    clusters: pa.Table  # schema.CLUSTERS
    stats: dict[str, Any]  # stats.json

    def as_counts(self) -> dict[str, Any]:
        s = self.stats
        return {
            "requests": s["requests"], "prompt_tokens": s["prompt_tokens"],
            "ceiling_tokens": s["ceiling_tokens"], "ceiling_rate": round(s["ceiling_rate"], 6),
            "breakers": len(s["breakers"]), "clusters": s["clusters"]["count"],
        }


HIST_EDGES = [0, 1, 16, 64, 256, 1024, 4096, 16384, 65536]
_LINE_MAX = 200


def _first_last_lines(text: str) -> tuple[str, str]:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "", ""
    clip = lambda s: s if len(s) <= _LINE_MAX else s[: _LINE_MAX - 1] + "…"  # noqa: E731
    return clip(lines[0]), clip(lines[-1])


def top_prefixes(
    w: Workload, p: PrefixPass, labels: np.ndarray, decode: Decode | None, top: int
) -> list[dict[str, Any]]:
    """Maximal shared block prefixes ranked by saved tokens = (requests - 1) x length.

    A prefix (a chained block hash) is maximal when no longer prefix is used by as many
    requests; the first request computes it, every later one could reuse it, hence requests - 1.
    """
    if len(p.hashes) == 0:
        return []
    lens = np.diff(p.hash_offsets)
    req = np.repeat(np.arange(len(w), dtype=np.int64), lens)
    depth = np.arange(len(p.hashes), dtype=np.int64) - p.hash_offsets[req]
    parent = np.where(depth > 0, np.roll(p.hashes, 1), 0)
    uniq, first_idx, counts = np.unique(p.hashes, return_index=True, return_counts=True)
    max_child = np.zeros(len(uniq), dtype=np.int64)
    has_parent = depth[first_idx] > 0
    pidx = np.searchsorted(uniq, parent[first_idx][has_parent])
    np.maximum.at(max_child, pidx, counts[has_parent])
    owner = req[first_idx]
    tokens = np.minimum((depth[first_idx] + 1) * p.block_tokens, w.n_tokens[owner])
    saved = (counts - 1) * tokens
    cand = np.flatnonzero((counts >= 2) & (max_child < counts))
    cand = cand[np.lexsort((first_idx[cand], -saved[cand]))][:top]
    out = []
    for rank, u in enumerate(cand.tolist(), start=1):
        users = req[p.hashes == uniq[u]]
        text = decode(w.units(int(owner[u]))[: int(tokens[u])]) if decode and not w.hash_trace else None
        first, last = _first_last_lines(text) if text is not None else (None, None)
        cl, cn = np.unique(labels[users], return_counts=True) if len(labels) else ([], [])
        out.append({
            "rank": rank, "tokens": int(tokens[u]), "requests": int(counts[u]),
            "saved_tokens": int(saved[u]), "first_request_id": w.request_ids[int(owner[u])],
            "text_first": first, "text_last": last,
            "clusters": [int(c) for c in cl], "cluster_requests": [int(n) for n in cn],
        })
    return out


def analyze(w: Workload, options: AnalyzeOptions, decode: Decode | None = None,
            tokenizer: str | None = None) -> Analysis:
    """Run the analysis over a workload; `decode` turns token ids into text (None: no text)."""
    from advisor.breakers import find_breakers
    from advisor.clusters import cluster_labels, features, summarize

    n = len(w)
    block = w.unit_tokens if w.hash_trace else options.block_size
    p = prefix_pass(w, options.block_size)
    ceil = ceiling_per_request(w, p)
    found = find_breakers(w, p, decode if not w.hash_trace else None, options.block_size,
                          options.lead_tokens)
    x = features(w, options.lead_tokens)
    labels, method = cluster_labels(x, options.seed, options.max_clusters)
    clusters = summarize(w, p, labels, x, decode)

    sess_known = np.array([s is not None for s in w.sessions], dtype=bool)
    same_tok = np.minimum(p.same_session_tokens, ceil)
    best_sess = [
        None if b < 0 or w.sessions[r] is None or w.sessions[int(b)] is None
        else w.sessions[r] == w.sessions[int(b)]
        for r, b in enumerate(p.best_match.tolist())
    ]
    resembles: list[str | None] = [None] * n
    diverge: list[int | None] = [None] * n
    for f in found.pairs:
        resembles[f.b], diverge[f.b] = w.request_ids[f.a], f.diverge
    prefixes = pa.table({
        "request_id": w.request_ids,
        "n_tokens": w.n_tokens,
        "shared_tokens": p.shared_tokens,
        "shared_blocks": p.shared_blocks,
        "best_match_id": [w.request_ids[b] if b >= 0 else None for b in p.best_match.tolist()],
        "same_session": best_sess,
        "cluster": labels.astype(np.int32),
        "ceiling_tokens": ceil,
        "same_session_tokens": pa.array(same_tok, mask=~sess_known),
        "resembles_id": resembles,
        "diverge_token": pa.array(diverge, type=pa.int64()),
    }, schema=schema.PREFIXES)

    total = int(w.n_tokens.sum())
    ceiling_tokens = int(ceil.sum())
    by_model: dict[str, dict[str, Any]] = {}
    model_names = [str(v) for v in w.models]  # a missing model is reported as "None"
    model_code = _codes(model_names)
    for m, code in sorted({(name, int(c)) for name, c in zip(model_names, model_code, strict=True)}):
        sel = model_code == code
        t = int(w.n_tokens[sel].sum())
        by_model[m] = {"requests": int(sel.sum()), "prompt_tokens": t,
                       "ceiling_rate": float(ceil[sel].sum() / t) if t else 0.0}
    edges = HIST_EDGES + [max(HIST_EDGES[-1] * 4, int(p.shared_tokens.max(initial=0)) + 1)]
    hist, _ = np.histogram(p.shared_tokens, bins=edges)
    same_total = int(same_tok[sess_known].sum())
    known_ceiling = int(ceil[sess_known].sum())
    stats: dict[str, Any] = {
        "input_kind": "hash_trace" if w.hash_trace else "tokens",
        "requests": n,
        "prompt_tokens": total,
        "ceiling_tokens": ceiling_tokens,
        "ceiling_rate": ceiling_tokens / total if total else 0.0,
        "ceiling_definition": (
            "ceiling_tokens: per request, the longest prefix shared with any earlier request at "
            "token granularity (last prompt token always recomputed), summed: what an infinite, "
            "token-granular cache could serve. The simulator's block ceiling (whole blocks only, "
            "per block size) is a different number and never larger."
            if not w.hash_trace else
            "ceiling_tokens: per request, the prefix shared with any earlier request at the trace's "
            "hash-block granularity (the trace has no tokens), last prompt token recomputed."
        ),
        "requests_with_shared_prefix": int(np.count_nonzero(p.shared_tokens)),
        "by_model": by_model,
        "shared_prefix_hist": {"edges": edges, "counts": hist.tolist()},
        "top_prefixes": top_prefixes(w, p, labels, decode, options.top_prefixes),
        "breakers": found.breakers,
        "breakers_note": None if not w.hash_trace else
            "hash traces carry no token content, so cache breakers cannot be detected",
        "reuse_sources": {
            "sessions_known": bool(sess_known.any()),
            "same_session_tokens": same_total if sess_known.any() else None,
            "cross_request_tokens": (ceiling_tokens - same_total) if sess_known.any() else None,
            "same_session_share": (same_total / known_ceiling if known_ceiling else 0.0)
            if sess_known.any() else None,
            "note": "a shared block counts for the session that first sent it; requests without a "
            "session id count as cross-request" if sess_known.any() else
            "the log has no session or conversation ids, so reuse cannot be split by session",
        },
        "clusters": {
            "count": int(clusters.num_rows), "method": method,
            "items": [
                {k: row[k] for k in ("cluster", "requests", "tokens", "ceiling", "representative_id")}
                for row in clusters.to_pylist()
            ],
        },
        "analysis_block_size": block,
        "tokenizer": tokenizer,
        "options": options.as_dict(),
    }
    return Analysis(prefixes, clusters, stats)
