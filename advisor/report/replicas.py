"""The "Replicas and routers" section's numbers, shared by both renderers.

Input: a `ReportData` whose `replicas` holds replicas.parquet's rows (schema.REPLICAS). Output:
`ReplicaFacts` (a caption, a header, rows router x replica count of hit rate and TTFT p50, and
one sentence on the biggest gap), plain text both renderers escape; None when there are no rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from advisor.report import facts as fx
from advisor.report.model import ReportData


@dataclass(frozen=True)
class ReplicaFacts:
    caption: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    verdict: str


def _budget_rows(data: ReportData) -> list[Mapping[str, Any]]:
    """Rows at the recommended block size (else the smallest simulated) and, of its budgets,
    the one nearest the recommended block count (else the largest)."""
    rows = list(data.replicas)
    want = ((data.recommendation or {}).get("recommended") or {})
    sizes = sorted({int(r["block_size"]) for r in rows})
    bs = want.get("block_size") if want.get("block_size") in sizes else sizes[0]
    at_bs = [r for r in rows if r["block_size"] == bs]
    budgets = sorted({int(r["num_blocks"]) for r in at_bs})
    target = want.get("num_blocks")
    nb = min(budgets, key=lambda b: (abs(b - int(target)), -b)) if target is not None else budgets[-1]
    return [r for r in at_bs if r["num_blocks"] == nb]


def replica_facts(data: ReportData) -> ReplicaFacts | None:
    if not data.replicas:
        return None
    rows = _budget_rows(data)
    counts = sorted({int(r["replicas"]) for r in rows})
    routers: list[str] = list(dict.fromkeys(str(r["router"]) for r in rows))
    cell = {(str(r["router"]), int(r["replicas"])): r for r in rows}
    first = rows[0]
    gib = f" ({fx.gib(first['kv_gib'])})" if first.get("kv_gib") is not None else ""
    caption = (f"Block size {first['block_size']}, {fx.num(first['num_blocks'])} blocks{gib} per replica, concurrent "
               "mode, whole log. Each cell: hit rate over all replicas, then TTFT p50 (each request's on the "
               "replica it went to). With one replica every router is the same engine.")
    header = ("router", *(f"{c} replica{'s' if c > 1 else ''}" for c in counts))
    table: list[tuple[str, ...]] = []
    for router in routers:
        table.append((router, *(_cell(cell.get((router, c))) for c in counts)))
    return ReplicaFacts(caption, header, table, _verdict(cell, routers, counts[-1]))


def _cell(row: Mapping[str, Any] | None) -> str:
    return "—" if row is None else f"{fx.pct(row['hit_rate'])} · {fx.secs(row.get('ttft_p50_s'))}"


def _verdict(cell: Mapping[tuple[str, int], Mapping[str, Any]], routers: Sequence[str], count: int) -> str:
    """The gap between the best and the worst router at the largest replica count."""
    at = [(cell[(r, count)]["hit_rate"], r) for r in routers if (r, count) in cell]
    if count == 1 or len(at) < 2:
        return f"With {count} replica{'s' if count > 1 else ''}, one router only was simulated."
    (best_rate, best), (worst_rate, worst) = max(at), min(at)
    if best_rate == worst_rate:
        return f"With {count} replicas, every router simulated gets the same hit rate ({fx.pct(best_rate)})."
    return (f"With {count} replicas, {worst} loses {(best_rate - worst_rate) * 100:.1f} points of hit rate against "
            f"{best} routing ({fx.pct(worst_rate)} vs {fx.pct(best_rate)}).")
