"""The "Replicas and routers" section's numbers, shared by both renderers and the plot.

Input: a `ReportData` whose `replicas` holds replicas.parquet's rows (schema.REPLICAS) and
whose recommendation may hold the `replicas` section (advisor.recommend.replicas). Output:
`ReplicaFacts`: a caption, a header and rows router x replica count of hit rate and TTFT p50,
one sentence on the biggest gap, the load-balance price table (what each router buys in hits
against round-robin and what it costs in balance), and the chosen deployment with its
runner-up; `replica_series` gives the plot its points. Plain text both renderers escape; None
when there are no rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from advisor.report import facts as fx
from advisor.report.model import ReportData

ROUND_ROBIN = "round-robin"  # advisor.sim.routing's name; the report does not import the simulator


@dataclass(frozen=True)
class Deployment:
    """The recommended deployment, as the renderers show it."""

    headline: str
    lines: list[str]  # runner-up, launch, settings, differences, notes
    serve: str | None  # the per-replica `vllm serve` line


@dataclass(frozen=True)
class ReplicaFacts:
    caption: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    verdict: str
    price_caption: str = ""
    price_header: tuple[str, ...] = ()
    price_rows: list[tuple[str, ...]] = field(default_factory=list)
    deployment: Deployment | None = None
    price_pick: int | None = None  # the recommended row of the price table


@dataclass(frozen=True)
class ReplicaSeries:
    """The plot's points: per router, (x, hit rate, within the balance limit) in x order."""

    xlabel: str
    ticks: list[tuple[float, str]]
    lines: dict[str, list[tuple[float, float, bool]]]
    best: tuple[float, float] | None  # the recommended point
    caption: str


def _section(data: ReportData) -> Mapping[str, Any]:
    return (data.recommendation or {}).get("replicas") or {}


def _concurrent(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("mode", "concurrent") == "concurrent"]


def _budget_rows(data: ReportData) -> list[Mapping[str, Any]]:
    """Rows at the block size and per-replica budget of the recommended deployment (its
    `replicas` section), else at the recommended block size (else the smallest simulated)
    and, of its budgets, the one nearest the recommended block count (else the largest)."""
    rows = _concurrent(data.replicas)
    sec = _section(data)
    want = sec.get("recommended") or ((data.recommendation or {}).get("recommended") or {})
    sizes = sorted({int(r["block_size"]) for r in rows})
    bs = want.get("block_size") if want.get("block_size") in sizes else sizes[0]
    at_bs = [r for r in rows if r["block_size"] == bs]
    budgets = sorted({int(r["num_blocks"]) for r in at_bs})
    target = want.get("num_blocks")
    nb = min(budgets, key=lambda b: (abs(b - int(target)), -b)) if target is not None else budgets[-1]
    return [r for r in at_bs if r["num_blocks"] == nb]


def replica_facts(data: ReportData) -> ReplicaFacts | None:
    if not _concurrent(data.replicas):
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
    price_caption, price_header, price_rows = _price(data, cell, routers, counts)
    best = _section(data).get("recommended") or {}
    pick = next((k for k, r in enumerate(price_rows) if (r[0], r[1]) == (str(best.get("replicas")), best.get("router"))
                 and best.get("num_blocks") == first["num_blocks"]), None)
    return ReplicaFacts(caption, header, table, _verdict(cell, routers, counts[-1]), price_caption, price_header,
                        price_rows, _deployment(data), pick)


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


# --- the load-balance price --------------------------------------------------------------
PRICE_HEADER = ("replicas", "router", "hit rate", "gain", "busiest: requests", "busiest: prefill", "TTFT p95", "p95 ratio",
                "within the limit")


def _price(data: ReportData, cell: Mapping[tuple[str, int], Mapping[str, Any]], routers: Sequence[str],
           counts: Sequence[int]) -> tuple[str, tuple[str, ...], list[tuple[str, ...]]]:
    """Per replica count above 1 and router: the hits it buys over round-robin and what it
    costs in balance; whether it is within the recommendation's balance limit."""
    sec = _section(data)
    first = next(iter(cell.values()))
    verdicts = {(int(c["replicas"]), str(c["router"])): c for c in sec.get("candidates") or []
                if (c["block_size"], c["num_blocks"]) == (first["block_size"], first["num_blocks"])}
    out = []
    for count in counts:
        if count == 1:
            continue
        rr = cell.get((ROUND_ROBIN, count))
        for router in routers:
            r = cell.get((router, count))
            if r is None:
                continue
            gain = (f"{(float(r['hit_rate']) - float(rr['hit_rate'])) * 100:+.1f} pp" if rr is not None else "—")
            p95 = r.get("ttft_p95_s")
            rr95 = rr.get("ttft_p95_s") if rr is not None else None
            ratio = f"{float(p95) / float(rr95):.2f}x" if p95 is not None and rr95 else "—"
            v = verdicts.get((count, router))
            within = "—" if v is None else ("yes" if v.get("within_limit") else
                                            f"no: {v.get('limit_broken') or v.get('out_of_limit')}")
            prefill = r.get("prefill_spread")
            out.append((str(count), router, fx.pct(r["hit_rate"]), gain, f"{float(r.get('load_spread') or 1.0):.2f}x",
                        "—" if prefill is None else f"{float(prefill):.2f}x", fx.secs(p95), ratio, within))
    limit = (sec.get("balance_limit") or {}).get("rule")
    caption = ("What each router buys against round-robin at the same replica count (gain: points of hit rate) and "
               "what it costs in balance: the busiest replica's requests, and the prompt tokens it computed (prefill), "
               "over the mean per replica (1.00x: even; N x with N replicas: all on one), and p95 TTFT over "
               "round-robin's (p95 ratio; the simulator's clock at the logged arrival rate). The recommended row is "
               "highlighted."
               + (f" The recommendation's balance limit: {limit}." if limit else ""))
    return caption, PRICE_HEADER, out


# --- the chosen deployment -----------------------------------------------------------------
def _deployment(data: ReportData) -> Deployment | None:
    sec = _section(data)
    best = sec.get("recommended")
    if not best:
        return None
    d = best.get("deploy") or {}
    reasoning = list(sec.get("reasoning") or [])
    lines = reasoning[1:]
    if d.get("launch"):
        lines.append(f"How to run it: {d['launch']}.")
    settings = d.get("router_settings") or {}
    if settings:
        lines.append("Router settings simulated: " + "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items())
                     + ".")
    if d.get("differs_from_simulated"):
        lines.append(f"Where the real router differs from the simulated one: {d['differs_from_simulated']}.")
    lines.append(f"Rule: {sec.get('rule')}")
    lines += [f"Note: {n}." for n in sec.get("notes") or []]
    return Deployment(reasoning[0] if reasoning else "", lines, d.get("vllm_serve"))


# --- the plot's points -------------------------------------------------------------------
def replica_series(data: ReportData) -> ReplicaSeries | None:
    """Hit rate against replicas per router. When the recommendation compared layouts of the
    GPUs given, its candidates (each layout at the budget it was judged at); else the rows at
    the table's budget, with the recommendation's balance verdicts when it has them."""
    sec = _section(data)
    best_row = sec.get("recommended") or {}
    best = (float(best_row["replicas"]), float(best_row["hit_rate"]) * 100) if best_row else None
    lines: dict[str, list[tuple[float, float, bool]]] = {}
    if sec.get("choice") == "layout":
        cands = sorted(sec.get("candidates") or [], key=lambda c: int(c["replicas"]))
        for c in cands:
            lines.setdefault(str(c["router"]), []).append(
                (float(c["replicas"]), float(c["hit_rate"]) * 100, bool(c.get("within_limit", True))))
        ticks = sorted({(float(c["replicas"]), f"{c['replicas']} x TP{c['tensor_parallel_size']}") for c in cands})
        return ReplicaSeries("replicas x tensor-parallel size (GPUs each)", ticks, lines, best,
                             "Hit rate over all replicas for each layout of the GPUs given, one line per router "
                             "(each layout at the largest simulated budget its GPUs hold per replica; concurrent "
                             "mode, whole log). Hollow markers: over the balance limit; star: recommended.")
    if not _concurrent(data.replicas):
        return None
    rows = _budget_rows(data)
    within = {(int(c["replicas"]), str(c["router"])): bool(c.get("within_limit", True))
              for c in sec.get("candidates") or []}
    for r in sorted(rows, key=lambda r: int(r["replicas"])):
        key = (int(r["replicas"]), str(r["router"]))
        lines.setdefault(key[1], []).append((float(key[0]), float(r["hit_rate"]) * 100, within.get(key, True)))
    first = rows[0]
    if best is not None and (best_row.get("num_blocks") != first["num_blocks"]
                             or best_row.get("block_size") != first["block_size"]):
        best = None
    counts = sorted({int(r["replicas"]) for r in rows})
    return ReplicaSeries("replicas", [(float(c), str(c)) for c in counts], lines, best,
                         f"Hit rate over all replicas against the replica count, one line per router (block size "
                         f"{first['block_size']}, {fx.num(first['num_blocks'])} blocks per replica; concurrent mode, "
                         "whole log). With one replica every router is the same engine."
                         + (" Hollow markers: over the balance limit; star: recommended." if within else ""))
