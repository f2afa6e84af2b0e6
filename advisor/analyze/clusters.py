"""Reuse groups: requests grouped by the prefixes they share, with how hot each group is and
how long its prefix must stay cached to be reused.

Input: an `AnalysisView`, its `PrefixPass` (the chained block hashes at the analysis block size;
hash ids for traces), arrival times in seconds (NaN where unknown) and a `decode` callable or None.
Output: `Groups`: a group per request (prefixes.parquet's `cluster`) and the clusters.parquet
table (schema.CLUSTERS), one row per group plus one row for the one-shots (requests that share
no full block with any other request).

The groups are advisor.analyze.reuse's prefix tree cut where sharing branches or stops: no
sampling and no seed, so they are the same on every run and under any row order. Per group:
its members (requests whose deepest shared block lies in it), their prompt tokens and reuse
ceiling, its share of all hits, the prefix (where its own part starts, how long it is, the decoded
start and end of its own part), and, over its members' hits, the median and p90 time since the
hit block was last used (seconds, null without timestamps) and the LRU stack distance in blocks
(the cache that keeps the hit). Percentiles are inverted-CDF: a cache of `distance_p90_blocks`
blocks keeps at least 90% of the group's hits. Blocks are at the analysis block size; the report
and the recommendation turn them into bytes with the model's KV bytes per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from advisor import schema
from advisor.analyze.prefixes import (
    AnalysisView,
    Decode,
    PrefixPass,
    ceiling_per_request,
)
from advisor.analyze.reuse import (
    Reuse,
    ReuseTree,
    block_nodes,
    reuse_distances,
    reuse_tree,
)

KIND_SHARED = "shared"
KIND_ONE_SHOT = "one-shot"
_TEXT_TOKENS = 48  # decoded at each end of a group's own part
METHOD = ("prefix tree over chained block hashes, cut where sharing branches or stops (no sampling, "
          "no seed: the same groups on every run and under any row order)")


@dataclass(frozen=True)
class Groups:
    labels: np.ndarray  # int32 per request: its group (the one-shot row's id for one-shots)
    table: pa.Table  # schema.CLUSTERS
    tree: ReuseTree
    reuse: Reuse


def _quantiles(values: np.ndarray) -> tuple[float | None, float | None]:
    """The 0.5 and 0.9 quantiles of the finite values (numpy's inverted_cdf), or None: the
    readable reference, which `_group_quantiles` equals group by group (a test checks)."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None, None
    q = np.quantile(values, [0.5, 0.9], method="inverted_cdf")
    return float(q[0]), float(q[1])


def _group_quantiles(groups: np.ndarray, values: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group 0..n_groups-1, `_quantiles` of its values, in one sort: (p50, p90), NaN for a
    group with no finite value. Each is the sorted value at numpy's inverted_cdf index,
    computed as numpy computes it (n x q - 1, rounded up unless whole, at least 0)."""
    finite = np.isfinite(values)
    groups, values = groups[finite], values[finite]
    order = np.lexsort((values, groups))
    values = values[order]
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.zeros(n_groups, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    out = []
    for q in (0.5, 0.9):
        index = counts * q - 1
        below = np.floor(index)
        at = np.where(index - below == 0, below, below + 1).astype(np.intp)
        at[at < 0] = 0
        got = np.full(n_groups, np.nan)
        has = counts > 0
        got[has] = values[starts[has] + at[has]]
        out.append(got)
    return out[0], out[1]


def _texts(w: AnalysisView, decode: Decode | None, owner: int, start: int, end: int) -> tuple[str | None, str | None]:
    if decode is None or w.hash_trace or end <= start:
        return None, None
    units = w.units(owner)
    head = decode(units[start : min(end, start + _TEXT_TOKENS)])
    tail = decode(units[end - _TEXT_TOKENS : end]) if end - start > _TEXT_TOKENS else None
    return head, tail


def group_requests(w: AnalysisView, p: PrefixPass, times: np.ndarray | None, decode: Decode | None,
                   min_group_tokens: int = 0) -> Groups:
    """The reuse groups of a workload and their clusters.parquet rows (module docstring); a group
    below a branch with fewer than `min_group_tokens` tokens of its own joins its parent."""
    n = len(w)
    nodes = block_nodes(p.hashes, p.hash_offsets)
    tree = reuse_tree(p.hashes, nodes, max(1, -(-min_group_tokens // p.block_tokens)))
    reuse = reuse_distances(nodes)
    del nodes
    g_count = tree.num_groups
    labels = np.where(tree.group < 0, g_count, tree.group).astype(np.int32)
    ceil = ceiling_per_request(w, p)
    t = np.full(n, np.nan) if times is None else np.asarray(times, dtype=np.float64)
    hit = reuse.last_user >= 0
    gap = np.full(n, np.nan)
    gap[hit] = t[hit] - t[reuse.last_user[hit]]
    level = tree.level()
    rows: dict[str, list] = {f.name: [] for f in schema.CLUSTERS}
    figures = _member_figures(labels, g_count + 1, w.n_tokens, ceil, hit, gap, reuse.distance)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(g_count + 2))
    for g in range(g_count + 1):
        members = order[bounds[g] : bounds[g + 1]]
        if g == g_count and len(members) == 0:
            break
        if g < g_count:
            owner = int(tree.owner[g])
            start = min(int(tree.top_depth[g]) * p.block_tokens, int(w.n_tokens[owner]))
            end = min(int(tree.end_depth[g]) * p.block_tokens, int(w.n_tokens[owner]))
            head, tail = _texts(w, decode, owner, start, end)
            parent = int(tree.parent[g]) if tree.parent[g] >= 0 else None
            shape = (parent, int(level[g]), KIND_SHARED, int(tree.users[g]), owner)
        else:
            start = end = 0
            head = tail = None
            shape = (None, 0, KIND_ONE_SHOT, len(members), int(members[0]))
        for k, v in zip(("parent", "depth", "kind", "prefix_requests"), shape[:4], strict=True):
            rows[k].append(v)
        rows["representative_id"].append(w.request_ids[shape[4]])
        rows["cluster"].append(g)
        rows["start_tokens"].append(start)
        rows["prefix_tokens"].append(end)
        rows["prefix_start_text"].append(head)
        rows["prefix_end_text"].append(tail)
        for name, column in figures.items():
            rows[name].append(column[g])
    return Groups(labels, pa.table(rows, schema=schema.CLUSTERS), tree, reuse)


def _member_figures(labels: np.ndarray, n_groups: int, n_tokens: np.ndarray, ceil: np.ndarray,
                    hit: np.ndarray, gap: np.ndarray, distance: np.ndarray) -> dict[str, list[Any]]:
    """Each group's figures over its members (`labels`): size, ceiling, share of hits, gap and
    distance percentiles; clusters.parquet's columns by name, one value per group."""
    requests = np.bincount(labels, minlength=n_groups)
    tokens = np.bincount(labels, weights=n_tokens, minlength=n_groups).astype(np.int64).tolist()
    shared = np.bincount(labels, weights=ceil, minlength=n_groups).astype(np.int64).tolist()
    total_hits = int(ceil.sum())
    out: dict[str, list[Any]] = {
        "requests": requests.tolist(), "tokens": tokens, "shared_tokens": shared,
        "ceiling": [s / t if t else 0.0 for s, t in zip(shared, tokens)],
        "hit_share": [s / total_hits if total_hits else 0.0 for s in shared],
        "reuses": np.bincount(labels[hit], minlength=n_groups).tolist(),
    }
    for name, values in (("gap", gap), ("distance", distance.astype(np.float64))):
        unit = "s" if name == "gap" else "blocks"
        for q, got in zip(("p50", "p90"), _group_quantiles(labels[hit], values[hit], n_groups)):
            out[f"{name}_{q}_{unit}"] = [None if np.isnan(v) else v for v in got.tolist()]
    return out


def summary(groups: Groups, block_tokens: int, listed: int) -> dict:
    """stats.json's `clusters`: counts, the method, and the `listed` groups with most hits."""
    rows = groups.table.to_pylist()
    shared = [r for r in rows if r["kind"] == KIND_SHARED]
    one_shot = next((r["requests"] for r in rows if r["kind"] == KIND_ONE_SHOT), 0)
    top = sorted(shared, key=lambda r: (-r["hit_share"], r["cluster"]))[:listed]
    keys = ("cluster", "parent", "requests", "tokens", "ceiling", "hit_share", "prefix_tokens",
            "distance_p90_blocks", "representative_id")
    return {
        "count": len(shared),
        "top_level": sum(1 for r in shared if r["parent"] is None),
        "one_shot_requests": one_shot,
        "block_tokens": block_tokens,
        "method": METHOD,
        "items": [{k: r[k] for k in keys} for r in top],
    }
