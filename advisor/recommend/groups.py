"""Whether the recommended cache keeps the reuse groups that carry most of the hits.

Input: clusters.parquet's rows (schema.CLUSTERS; advisor.analyze.clusters: per reuse group its
share of all hits and its p90 LRU reuse distance in analysis blocks), the analysis block size
(stats.json's `clusters.block_tokens`), and the recommendation's `recommended` row. Output:
recommendation.json's `reuse_groups` (None without groups): the few groups that carry most of
the hits, those whose p90 reuse distance is beyond the recommended budget, the memory that would
keep them, and a note for the reasoning when there are any. No flag: the memory is a number to
weigh against the hit-rate curve, which already prices it.

"A few carry most": the groups with most hits, in order, until they carry half of all hits,
when that takes at most `FEW` groups. A group is beyond the budget when its p90 reuse distance
in tokens exceeds the budget's blocks x block size (distances are counted one request at a
time in full prompt blocks: a lower bound on what a server with running requests needs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FEW = 10
MOST = 0.5


def gib_per_token(best: Mapping[str, Any] | None) -> float | None:
    """KV GiB per cached token at a recommended row (None without a model)."""
    best = best or {}
    if best.get("kv_gib") is None or not best.get("num_blocks") or not best.get("block_size"):
        return None
    return float(best["kv_gib"]) / (int(best["num_blocks"]) * int(best["block_size"]))


def reuse_group_advice(rows: Sequence[Mapping[str, Any]], block_tokens: int,
                       best: Mapping[str, Any]) -> dict[str, Any] | None:
    """recommendation.json's `reuse_groups` (module docstring)."""
    ranked = sorted((r for r in rows if r.get("kind") == "shared" and (r.get("hit_share") or 0) > 0),
                    key=lambda r: (-float(r["hit_share"]), int(r["cluster"])))
    if not ranked:
        return None
    few, carried = [], 0.0
    for r in ranked:
        few.append(r)
        carried += float(r["hit_share"])
        if carried >= MOST:
            break
    out: dict[str, Any] = {"groups": [int(r["cluster"]) for r in few], "hit_share": round(carried, 6),
                           "budget_tokens": None, "beyond": [], "needed_tokens": None, "needed_gib": None,
                           "note": None}
    if carried < MOST or len(few) > FEW or not best.get("num_blocks"):
        return out
    budget = int(best["num_blocks"]) * int(best["block_size"])
    beyond = [(r, float(r["distance_p90_blocks"]) * block_tokens) for r in few
              if r.get("distance_p90_blocks") is not None and float(r["distance_p90_blocks"]) * block_tokens > budget]
    out["budget_tokens"] = budget
    out["beyond"] = [{"cluster": int(r["cluster"]), "hit_share": round(float(r["hit_share"]), 6),
                      "distance_p90_tokens": int(t)} for r, t in beyond]
    if not beyond:
        return out
    needed = int(max(t for _, t in beyond))
    per_token = gib_per_token(best)
    out["needed_tokens"] = needed
    out["needed_gib"] = round(needed * per_token, 3) if per_token else None
    share = sum(float(r["hit_share"]) for r, _ in beyond)
    names = ", ".join(f"#{int(r['cluster'])}" for r, _ in beyond)
    memory = f"{needed:,} tokens of KV cache" + (f" (about {needed * per_token:.2f} GiB)" if per_token else "")
    carry = f"{len(few)} reuse groups carry" if len(few) > 1 else "1 reuse group carries"
    come = f"{len(beyond)} of them ({names}: {share:.0%} of the hits) come" if len(few) > 1 else "its prefix comes"
    out["note"] = (
        f"{carry} {carried:.0%} of the hits, but {come} back after more distinct blocks than the recommended "
        f"budget holds ({budget:,} tokens): keeping 90% of their hits takes an LRU cache of about {memory}, "
        "counted one request at a time (the hit rate against KV memory says what that memory buys).")
    return out
