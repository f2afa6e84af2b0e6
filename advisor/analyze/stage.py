"""Analyze stage: per-request prefix statistics, the token-granular ceiling, top shared prefixes.

Inputs: one `AnalysisView` (token ids per request as flat Arrow/numpy buffers, or a hash trace's
hash ids, plus request ids, models, sessions) built by `load_workload` from requests.parquet and
tokens.parquet. Outputs: an `Analysis` holding the prefixes.parquet and clusters.parquet tables
and the stats.json object; `run_analyze` reads the run folder and writes them.

The central number is `ceiling_tokens` (docs/design.md §6): for each request, the longest prefix it shares
with ANY earlier request, in tokens, capped so the last prompt token is recomputed as vLLM does;
summed over requests it is what an infinite, token-granular cache could serve. It is not the
simulator's block ceiling (whole blocks only, per block size), which is never larger.

Hashing primitives (chained block hashes, content-defined chunks) are in advisor/analyze/hashing.py;
cache breakers in advisor/analyze/breakers.py; reuse groups in advisor/analyze/reuse.py and clusters.py.

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

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from advisor import schema
from advisor.analyze.breakers import find_breakers
from advisor.analyze.clusters import group_requests, summary
from advisor.analyze.prefixes import (
    AnalysisView,
    Decode,
    PrefixPass,
    _codes,
    ceiling_per_request,
    from_workload,
    prefix_pass,
)
from advisor.errors import AdvisorError
from advisor.runfolder import (
    CLUSTERS,
    DEFAULT_CACHE_DIR,
    PREFIXES,
    REQUESTS,
    STATS,
    TOKENS,
    RunDir,
    StageOutcome,
    write_json,
    write_table,
)
from advisor.tokens.decode import load_decoder
from advisor.tokens.stage import tokenizer_spec_of
from advisor.workload import load_workload


# --- options and results ---
@dataclass(frozen=True)
class AnalyzeOptions:
    analysis_block_size: int = 16  # tokens per block counted; hash traces use the trace's own
    cluster_seed: int = 0  # kept for old command lines: the reuse groups use no randomness
    max_clusters: int = 12  # groups listed in stats.json (clusters.parquet keeps every group)
    min_group_tokens: int = 64  # a reuse group below a branch with less of its own joins its parent
    top_prefixes: int = 10

    def __post_init__(self) -> None:
        if self.analysis_block_size < 1 or self.max_clusters < 1:
            raise AdvisorError("--analysis-block-size and --max-clusters must be at least 1.")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
            "top_level_clusters": s["clusters"]["top_level"], "one_shot_requests": s["clusters"]["one_shot_requests"],
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
    w: AnalysisView, p: PrefixPass, labels: np.ndarray, decode: Decode | None, top: int
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


def analyze(w: AnalysisView, options: AnalyzeOptions, decode: Decode | None = None,
            tokenizer: str | None = None, times: np.ndarray | None = None) -> Analysis:
    """Run the analysis over a workload; `decode` turns token ids into text (None: no text);
    `times`: arrival seconds per request (NaN or None where the log has none)."""
    n = len(w)
    block = w.unit_tokens if w.hash_trace else options.analysis_block_size
    p = prefix_pass(w, options.analysis_block_size)
    ceil = ceiling_per_request(w, p)
    found = find_breakers(w, p, decode if not w.hash_trace else None, options.analysis_block_size)
    groups = group_requests(w, p, times, decode, options.min_group_tokens)
    labels, clusters = groups.labels, groups.table

    sess_known = np.array([s is not None for s in w.sessions], dtype=bool)
    same_tok = np.minimum(p.same_session_tokens, ceil)
    best_sess = [
        None if b < 0 or w.sessions[r] is None or w.sessions[int(b)] is None
        else w.sessions[r] == w.sessions[int(b)]
        for r, b in enumerate(p.best_match.tolist())
    ]
    resembles: list[str | None] = [None] * n
    diverge: list[int | None] = [None] * n
    for f in found.pairs:  # in request order, each request's regions by position: keep its first
        if resembles[f.b] is None:
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
        "breaker_search": found.search,
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
        "clusters": summary(groups, p.block_tokens, options.max_clusters),
        "analysis_block_size": block,
        "tokenizer": tokenizer,
        "options": options.as_dict(),
    }
    return Analysis(prefixes, clusters, stats)


def _logged_times(requests: Path, timestamps: np.ndarray) -> np.ndarray:
    """Arrival seconds as logged: NaN where ingest placed a request at --rate (`timestamp_logged`
    false), so a reuse gap is never a made-up number."""
    if "timestamp_logged" not in pq.read_schema(requests).names:
        return timestamps
    logged = pq.read_table(requests, columns=["timestamp_logged"]).column(0).to_numpy(zero_copy_only=False)
    return np.where(logged == False, np.nan, timestamps)  # noqa: E712 - null (unknown) counts as logged


def run_analyze(
    run_dir: str | Path, options: AnalyzeOptions | None = None, *, force: bool = False,
    cache_dir: Path = DEFAULT_CACHE_DIR,
) -> StageOutcome:
    """The analyze stage on `run_dir`: requests + tokens -> prefixes, clusters, stats.json.

    Texts are decoded with the tokenizer tokens.parquet names; when it cannot be loaded the
    numbers are still computed and the counts carry a note saying why no text is shown.
    """
    options = options or AnalyzeOptions()
    run = RunDir(Path(run_dir))

    def body(r: RunDir) -> dict[str, Any]:
        tokens_path = r.require(TOKENS)
        workload = load_workload(r.require(REQUESTS), tokens_path)
        view = from_workload(workload)
        decode, spec, notes = None, None, []
        if not view.hash_trace:
            spec = tokenizer_spec_of(tokens_path)
            if spec is not None:
                try:
                    decode = load_decoder(spec, cache_dir)
                except AdvisorError as e:  # numbers need no text: analyze on, undecoded
                    notes.append(f"cannot decode token ids, so no texts are shown ({e})")
        result = analyze(view, options, decode, spec, _logged_times(r.require(REQUESTS), workload.timestamps))
        write_table(r.path(PREFIXES), result.prefixes)
        write_table(r.path(CLUSTERS), result.clusters)
        write_json(r.path(STATS), result.stats)
        return {**result.as_counts(), "notes": notes}

    return run.run_stage("analyze", [run.require(REQUESTS), run.require(TOKENS)], options.as_dict(),
                         [PREFIXES, CLUSTERS, STATS], body, force=force)
