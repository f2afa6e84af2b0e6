"""The report's "KV cache layout" section: the model's KV cache groups as vLLM forms them.

Input: `ReportData.recommendation["kv_layout"]` (advisor.kvlayout `KVLayout.as_dict` at the
recommended block size, written by the recommend stage when a model was given). Output:
`layout_facts` -> the sentence in words, the table's rows (one per kind of group: kind,
window or chunk, groups, layers, the pool bytes a token takes in those groups while it is in
their window, the block size vLLM runs), and what the simulator did with it; None without a
layout. html.py and markdown.py render them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from advisor.report.facts import num
from advisor.report.model import ReportData

LAYOUT_HEADER = ("kind", "window / chunk", "groups", "layers", "pool bytes per token", "block size")

_KIND = {"full": "full attention", "mla": "MLA (one latent per token)", "sliding_window": "sliding window",
         "chunked_local": "chunked local attention", "mamba": "Mamba / linear attention (state)"}


@dataclass(frozen=True)
class LayoutFacts:
    sentence: str  # the layout in words
    rows: list[tuple[str, ...]]  # LAYOUT_HEADER
    simulated: str  # how the simulator treated it


def layout_facts(data: ReportData) -> LayoutFacts | None:
    """The section's content, or None when the recommendation has no layout (no --model)."""
    layout = (data.recommendation or {}).get("kv_layout")
    if not layout:
        return None
    return LayoutFacts(str(layout.get("description") or ""), _rows(layout), _simulated(layout))


def _rows(layout: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """One row per kind and window: groups of equal spec are summed (Gemma 3's six sliding groups)."""
    merged: dict[tuple[str, Any], dict[str, int]] = {}
    for g in layout.get("groups") or []:
        key = (g["kind"], g.get("window"))
        row = merged.setdefault(key, {"groups": 0, "layers": 0, "per_token": 0, "state": 0})
        row["groups"] += 1
        row["layers"] += len(g.get("layers") or [])
        row["per_token"] += int(g.get("pool_bytes_per_token") or 0)  # a block id costs every group's pages
        row["state"] += int(g.get("pool_bytes_per_token") or 0) * int(layout.get("block_size") or 0)
    block = num(layout.get("block_size"))
    out = []
    for (kind, window), r in merged.items():
        per_token = (f"{num(r['state'])} per request (states)" if kind == "mamba" else num(r["per_token"]))
        out.append((_KIND.get(kind, kind), num(window) if window else "—", num(r["groups"]), num(r["layers"]),
                    per_token, block))
    return out


def _simulated(layout: Mapping[str, Any]) -> str:
    bpb = num(layout.get("bytes_per_block"))
    B = layout.get("block_size")
    asked = layout.get("requested_block_size")
    pool = (f"One block id costs {bpb} B in the pool (block size {B}"
            + (f", which vLLM runs for --block-size {asked}" if asked is not None and asked != B else "") + ").")
    if not layout.get("hybrid"):
        return pool + " The simulator runs vLLM's rules for one full-attention group: exact."
    if layout.get("simulated_exactly"):
        return (pool + " The simulator runs vLLM's rules per group (sliding-window groups cache only the blocks "
                "before prompt ends and shared-prefix junctions; chunked-local hits need only the last chunk's "
                "blocks), tested against vLLM's own KV cache manager: exact.")
    return (pool + " The simulator runs it as one full-attention group over the pool's blocks: approximate (the "
            "Mamba layers' prefix caching and state blocks, or unequal page sizes, are not modelled).")
