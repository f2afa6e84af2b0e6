"""The "How the reuse is structured" section's numbers, shared by both renderers and the plot.

Input: a `ReportData` whose `clusters` holds clusters.parquet's rows (schema.CLUSTERS: one per
reuse group, plus the one-shots; advisor.analyze.clusters) and whose stats/recommendation give
the analysis block size and, when a model was known, the KV bytes per token of the recommended
configuration. Output: `GroupFacts`: a headline, a compact tree (top levels only, the rest
summed), the per-group table (the groups with most hits; the rest folded into one "other" row,
saying how many), the decoded starts and ends of the listed groups' own prefixes, and the
recommendation's note on groups whose reuse outlives the cache. `group_points` gives the plot
one point per group: its p90 reuse distance in tokens against its share of the hits.
Plain text both renderers escape; None when clusters.parquet has no rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from advisor.recommend.groups import gib_per_token
from advisor.report import facts as fx
from advisor.report.model import ReportData

LISTED = 12  # groups in the table; the rest are summed in one row
TREE_CHILDREN = 4  # children shown under each tree node; the rest summed in one line
TREE_LEVELS = 2
HEADER = ("group", "parent", "members", "prefix", "hit share", "reuse ceiling", "gap p50 / p90",
          "reuse distance p90", "example request")
ONE_SHOT = "one-shot"


@dataclass(frozen=True)
class GroupFacts:
    headline: str
    tree: list[str]
    caption: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    texts: list[tuple[str, str | None, str | None]]  # (group label, start of its own part, end)
    note: str | None  # the recommendation's note on reuse the recommended budget loses


@dataclass(frozen=True)
class GroupPoints:
    points: list[tuple[float, float, int]]  # (p90 reuse distance in tokens, hit share %, requests)
    budget_tokens: float | None  # the recommended budget, in tokens, when known
    caption: str


def _block_tokens(data: ReportData) -> int:
    st = data.stats or {}
    return int((st.get("clusters") or {}).get("block_tokens") or st.get("analysis_block_size") or 16)


def _tokens_and_memory(blocks: Any, block_tokens: int, per_token: float | None) -> str:
    if blocks is None:
        return "—"
    tokens = float(blocks) * block_tokens
    return fx.num(int(tokens)) + " tokens" + (f" ({fx.gib(tokens * per_token)})" if per_token else "")


def _secs(x: Any) -> str:
    return "—" if x is None else fx.secs(x)


def label(row: Mapping[str, Any]) -> str:
    return ONE_SHOT if row.get("kind") == ONE_SHOT else f"#{row.get('cluster')}"


def _subtree_share(rows: list[Mapping[str, Any]]) -> dict[int, tuple[float, int, int]]:
    """Per group: hit share, members and groups of it and everything below it."""
    out = {int(r["cluster"]): [float(r.get("hit_share") or 0), int(r.get("requests") or 0), 1] for r in rows}
    for r in sorted(rows, key=lambda r: -int(r.get("depth") or 0)):  # deepest first: children before parents
        if r.get("parent") is not None and int(r["parent"]) in out:
            s, p = out[int(r["cluster"])], out[int(r["parent"])]
            p[0] += s[0]
            p[1] += s[1]
            p[2] += s[2]
    return {g: (v[0], v[1], v[2]) for g, v in out.items()}


def _tree(shared: list[Mapping[str, Any]]) -> list[str]:
    sub = _subtree_share(shared)
    kids: dict[int | None, list[Mapping[str, Any]]] = {}
    for r in shared:
        kids.setdefault(None if r.get("parent") is None else int(r["parent"]), []).append(r)
    lines: list[str] = []

    def walk(parent: int | None, level: int) -> None:
        children = sorted(kids.get(parent, []), key=lambda r: (-sub[int(r["cluster"])][0], int(r["cluster"])))
        indent = "  " * (level - 1)
        for r in children[:TREE_CHILDREN]:
            g = int(r["cluster"])
            share, members, groups = sub[g]
            below = (f" with the {groups - 1:,} group{'s' if groups > 2 else ''} below it" if groups > 1 else "")
            lines.append(f"{indent}- #{g}: {fx.num(r.get('prefix_tokens'))}-token prefix "
                         f"(+{fx.num(int(r.get('prefix_tokens') or 0) - int(r.get('start_tokens') or 0))} of its own), "
                         f"used by {fx.num(r.get('prefix_requests'))} requests, {fx.pct(share)} of hits{below}")
            if level < TREE_LEVELS:
                walk(g, level + 1)
        rest = children[TREE_CHILDREN:]
        if rest:
            share = sum(sub[int(r["cluster"])][0] for r in rest)
            groups = sum(sub[int(r["cluster"])][2] for r in rest)
            reqs = sum(int(r.get("prefix_requests") or 0) for r in rest)
            more = f"{len(rest):,} more group" + ("s" if len(rest) > 1 else "")
            below = f" ({groups:,} with those below them)" if groups > len(rest) else ""
            lines.append(f"{indent}- … {more}{below}: used by {fx.num(reqs)} requests, {fx.pct(share)} of hits")

    walk(None, 1)
    return lines


def _row(r: Mapping[str, Any], block_tokens: int, per_token: float | None) -> tuple[str, ...]:
    parent = "—" if r.get("parent") is None else f"#{r['parent']}"
    gaps = "—" if r.get("gap_p50_s") is None else f"{_secs(r.get('gap_p50_s'))} / {_secs(r.get('gap_p90_s'))}"
    return (label(r), parent, fx.num(r.get("requests")), fx.num(r.get("prefix_tokens")), fx.pct(r.get("hit_share")),
            fx.pct(r.get("ceiling")), gaps, _tokens_and_memory(r.get("distance_p90_blocks"), block_tokens, per_token),
            str(r.get("representative_id") or ""))


def group_facts(data: ReportData) -> GroupFacts | None:
    if not data.clusters:
        return None
    rows = [dict(r) for r in data.clusters]
    shared = [r for r in rows if r.get("kind") != ONE_SHOT]
    one_shot = next((r for r in rows if r.get("kind") == ONE_SHOT), None)
    bt, per_token = _block_tokens(data), gib_per_token((data.recommendation or {}).get("recommended"))
    ranked = sorted(shared, key=lambda r: (-float(r.get("hit_share") or 0), int(r["cluster"])))
    listed, folded = ranked[:LISTED], ranked[LISTED:]
    table = [_row(r, bt, per_token) for r in listed]
    if folded:
        table.append((f"other ({len(folded):,} groups)", "", fx.num(sum(int(r.get("requests") or 0) for r in folded)),
                      "", fx.pct(sum(float(r.get("hit_share") or 0) for r in folded)), "", "", "", ""))
    if one_shot is not None:
        table.append(_row(one_shot, bt, per_token))
    top_level = sum(1 for r in shared if r.get("parent") is None)
    few = ranked[:5]
    headline = (f"{len(shared):,} reuse groups ({top_level:,} at the top level)"
                + (f"; the {len(few)} with most hits carry {fx.pct(sum(float(r.get('hit_share') or 0) for r in few))} "
                   "of them" if len(shared) > len(few) else "")
                + (f"; {fx.num(one_shot['requests'])} one-shot request"
                   + (" shares" if one_shot["requests"] == 1 else "s share") + " no block with any other"
                   if one_shot is not None else "") + ".")
    caption = ("A group is a run of the prefix tree over block hashes between two branches: its members are the "
               "requests whose deepest shared block lies in it. Hit share and reuse ceiling: of the members' "
               "token-granular ceiling. Gap: time since the block a member's hit ends on was last used; reuse "
               f"distance: distinct blocks ({bt} tokens each) used in between, the LRU cache that keeps 90% of the "
               "group's hits (full prompt blocks, one request at a time)"
               + ("; GiB at the recommended configuration's KV bytes per token." if per_token else "."))
    texts = [(label(r), r.get("prefix_start_text"), r.get("prefix_end_text")) for r in listed
             if r.get("prefix_start_text")]
    note = ((data.recommendation or {}).get("reuse_groups") or {}).get("note")
    return GroupFacts(headline, _tree(shared), caption, HEADER, table, texts, note)


def group_points(data: ReportData) -> GroupPoints | None:
    """One point per group with hits and a measured reuse distance (the plot's data)."""
    bt = _block_tokens(data)
    pts = [(float(r["distance_p90_blocks"]) * bt, float(r.get("hit_share") or 0) * 100, int(r.get("requests") or 0))
           for r in data.clusters if r.get("distance_p90_blocks") is not None and r.get("hit_share")]
    if not pts:
        return None
    best = (data.recommendation or {}).get("recommended") or {}
    budget = (float(best["num_blocks"]) * int(best["block_size"])
              if best.get("num_blocks") and best.get("block_size") else None)
    caption = ("Each reuse group: the LRU cache, in tokens, that keeps 90% of its hits (p90 reuse distance) against "
               "its share of all hits; dot area grows with its requests."
               + (" The dotted line is the recommended budget: groups to its right lose hits to eviction."
                  if budget else ""))
    return GroupPoints(pts, budget, caption)
