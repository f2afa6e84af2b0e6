"""Clusters of requests that share prompt structure (scikit-learn, seeded, deterministic).

Input: a `AnalysisView` and its `PrefixPass` (advisor.analyze.stage), a `decode` callable or None.
Output: a cluster label per request, and the clusters.parquet table (schema.CLUSTERS).

Features. Each request's leading window (`lead_tokens`) is cut into content-defined chunks
(`stats.content_chunks`; for hash traces each hash id is a chunk) and the chunks are hashed into a
fixed 128-dimensional vector (the hashing trick, signed to cancel collisions), weighted by chunk
length and by how early the chunk sits (weight 1 / (1 + start / 256)), then L2-normalised. Why:
what a prefix cache can reuse is decided by the beginning of a prompt, so the leading content
should dominate; content chunks rather than chained block hashes keep prompts that differ only in
an early variable span (a timestamp, a reordered tool) in one cluster, which is exactly where a
cluster with a low own ceiling points at a cache breaker. The vectors are small and fixed in
size, so memory grows with requests, not tokens.

Number of clusters: k-means (k-means++ init, fixed `seed`) for every k in 2..max_clusters
(bounded by the number of distinct vectors), scored by the silhouette on a seeded sample of at
most 2,000 requests; the best k wins, and a single cluster is kept when no k reaches a silhouette
of 0.25 (no real structure to split). Fitting uses a seeded sample of at most 4,000 requests and
then labels every request; labels are renumbered by size (0 = largest), ties by first request.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from advisor import schema
from advisor.analyze.hashing import common_prefix_len, content_chunks, mix64
from advisor.analyze.prefixes import (
    AnalysisView,
    Decode,
    PrefixPass,
    ceiling_per_request,
)

DIM = 128
_FIT_SAMPLE = 4_000
_SIL_SAMPLE = 2_000
_MIN_SILHOUETTE = 0.25
_TEXT_TOKENS = 64


def features(w: AnalysisView, lead_tokens: int) -> np.ndarray:
    """(N, DIM) float32 prefix-structure vectors; see the module docstring."""
    out = np.zeros((len(w), DIM), dtype=np.float32)
    for r in range(len(w)):
        if w.hash_trace:
            units = w.units(r)[: max(1, lead_tokens // w.unit_tokens)]
            hashes = units.astype(np.uint64)
            starts = np.arange(len(units), dtype=np.int64) * w.unit_tokens
            lens = np.full(len(units), w.unit_tokens, dtype=np.float64)
            hashes = mix64(hashes)
        else:
            units = w.units(r)[:lead_tokens]
            hashes, starts = content_chunks(units)
            lens = np.diff(np.append(starts, len(units))).astype(np.float64)
        if len(hashes) == 0:
            continue
        weight = lens / (1.0 + starts / 256.0)
        sign = np.where((hashes >> np.uint64(63)) == 1, -1.0, 1.0)
        idx = (hashes % np.uint64(DIM)).astype(np.int64)
        vec = np.bincount(idx, weights=weight * sign, minlength=DIM)
        norm = np.linalg.norm(vec)
        if norm > 0:
            out[r] = vec / norm
    return out


def cluster_labels(x: np.ndarray, seed: int, max_clusters: int) -> tuple[np.ndarray, str]:
    """A label per row (0 = largest cluster) and a sentence saying how k was chosen.

    Runs single-threaded: on small matrices BLAS/OpenMP thread pools only add overhead, and
    on a shared machine they oversubscribe the cores (measured 13x slower).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _cluster_labels(x, seed, max_clusters)


def _cluster_labels(x: np.ndarray, seed: int, max_clusters: int) -> tuple[np.ndarray, str]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int32), "no requests"
    distinct = len(np.unique(x.round(5), axis=0))
    k_max = min(max_clusters, distinct - 1)
    if n < 4 or k_max < 2:
        return np.zeros(n, dtype=np.int32), "one cluster (too few distinct requests to split)"
    rng = np.random.default_rng(seed)
    fit_x = x[np.sort(rng.choice(n, _FIT_SAMPLE, replace=False))] if n > _FIT_SAMPLE else x
    sil_idx = np.sort(rng.choice(len(fit_x), _SIL_SAMPLE, replace=False)) if len(fit_x) > _SIL_SAMPLE else None
    best: tuple[float, int, KMeans | None] = (-1.0, 1, None)
    for k in range(2, k_max + 1):
        km = KMeans(n_clusters=k, n_init=2, max_iter=100, random_state=seed).fit(fit_x)
        lab = km.labels_
        sx, sl = (fit_x, lab) if sil_idx is None else (fit_x[sil_idx], lab[sil_idx])
        if len(np.unique(sl)) < 2:
            continue
        score = float(silhouette_score(sx, sl))
        if score > best[0] + 1e-9:
            best = (score, k, km)
    score, k, model = best
    if model is None or score < _MIN_SILHOUETTE:
        return np.zeros(n, dtype=np.int32), (
            f"one cluster: k-means for k=2..{k_max} never reached silhouette {_MIN_SILHOUETTE}"
            f" (best {max(score, 0):.2f})"
        )
    raw = np.concatenate([model.predict(x[i : i + 50_000]) for i in range(0, n, 50_000)])
    sizes = np.bincount(raw, minlength=k)
    firsts = np.array([np.flatnonzero(raw == c)[0] if sizes[c] else n for c in range(k)])
    order = sorted(range(k), key=lambda c: (-sizes[c], firsts[c]))
    remap = np.empty(k, dtype=np.int32)
    remap[order] = np.arange(k, dtype=np.int32)
    labels = remap[raw]
    return labels, (
        f"k-means on hashed leading content (content-defined chunks; hash ids for traces), "
        f"k={len(np.unique(labels))} chosen by silhouette"
        f" ({score:.2f}) among k=2..{k_max}, seed {seed}"
    )


def summarize(
    w: AnalysisView, p: PrefixPass, labels: np.ndarray, x: np.ndarray, decode: Decode | None
) -> pa.Table:
    """One clusters.parquet row per cluster: size, tokens, own ceiling, representative prefix."""
    ceil = ceiling_per_request(w, p)
    rows: dict[str, list] = {f.name: [] for f in schema.CLUSTERS}
    for c in np.unique(labels).tolist():
        members = np.flatnonzero(labels == c)
        centroid = x[members].mean(axis=0)
        rep = int(members[np.argmin(((x[members] - centroid) ** 2).sum(axis=1))])
        rep_h = p.hashes[p.hash_offsets[rep] : p.hash_offsets[rep + 1]]
        common = len(rep_h)
        for m in members.tolist():
            if common == 0:
                break
            common = min(common, common_prefix_len(rep_h, p.hashes[p.hash_offsets[m] : p.hash_offsets[m + 1]]))
        prefix_tokens = min(common * p.block_tokens, int(w.n_tokens[members].min()))
        units = w.units(rep)
        tokens = int(w.n_tokens[members].sum())
        shared = int(ceil[members].sum())
        rows["cluster"].append(c)
        rows["requests"].append(len(members))
        rows["tokens"].append(tokens)
        rows["shared_tokens"].append(shared)
        rows["ceiling"].append(shared / tokens if tokens else 0.0)
        rows["representative_id"].append(w.request_ids[rep])
        rows["prefix_tokens"].append(prefix_tokens)
        text = decode is not None and not w.hash_trace
        rows["prefix_text"].append(decode(units[:prefix_tokens]) if text and prefix_tokens else None)
        rows["representative_text"].append(decode(units[:_TEXT_TOKENS]) if text else None)
    return pa.table(rows, schema=schema.CLUSTERS)
