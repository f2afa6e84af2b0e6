"""The "CPU offload tier" section's numbers, shared by both renderers and the plot.

Input: a `ReportData` whose `offload` holds offload.parquet's rows (schema.OFFLOAD) and whose
recommendation may hold the `offload` section (advisor.recommend.offload). Output:
`OffloadFacts` (the verdict, a caption, a table of each simulated size at the recommended GPU
budget: GPU hits, CPU hits, both, what the loads move and take, and the sentence on
inclusivity); `offload_series` gives the plot its curves: hit rate against GPU KV memory for
the GPU alone and for GPU plus each CPU tier size. Plain text both renderers escape; None when
offload.parquet has no rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from advisor.report import facts as fx
from advisor.report.model import ReportData

INCLUSIVE = ("vLLM's connector stores each request's blocks to the CPU as they are computed, so the CPU tier "
             "holds a copy of what the GPU holds: the two together are worth about the larger of them, not the "
             "sum. A CPU tier no larger than the GPU's KV memory adds little; past it, it holds what the GPU "
             "evicted.")
HEADER = ("CPU tier", "CPU blocks", "GPU hits", "CPU hits", "both", "CPU evictions", "loaded", "load time")


@dataclass(frozen=True)
class OffloadFacts:
    verdict: str
    caption: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    inclusive: str = INCLUSIVE


@dataclass(frozen=True)
class OffloadSeries:
    """The plot's curves at one block size: per label (GPU alone, + N GiB CPU), (x, hit rate %)."""

    use_gib: bool  # x is the GPU's KV GiB (else its blocks)
    lines: dict[str, list[tuple[float, float]]]
    marked: float | None  # the recommended GPU budget's x
    caption: str


def _section(data: ReportData) -> Mapping[str, Any]:
    return (data.recommendation or {}).get("offload") or {}


def _window(data: ReportData) -> str:
    view = (data.recommendation or {}).get("view") or {}
    windows = {r["window"] for r in data.offload}
    return view.get("window") if view.get("window") in windows else min(windows)


def _block_size(data: ReportData) -> int:
    best = (data.recommendation or {}).get("recommended") or {}
    sizes = {int(r["block_size"]) for r in data.offload}
    bs = best.get("block_size")
    return int(bs) if bs is not None and int(bs) in sizes else min(sizes)


def _rows_at(data: ReportData) -> tuple[int, int, list[Mapping[str, Any]]]:
    """The rows at the recommended block size and the GPU budget nearest the recommended one."""
    bs, window = _block_size(data), _window(data)
    rows = [r for r in data.offload if int(r["block_size"]) == bs and r["window"] == window]
    want = _section(data).get("num_blocks") or ((data.recommendation or {}).get("recommended") or {}).get("num_blocks")
    budgets = sorted({int(r["num_blocks"]) for r in rows})
    nb = min(budgets, key=lambda b: (abs(b - int(want)), b)) if want is not None else budgets[len(budgets) // 2]
    return bs, nb, sorted((r for r in rows if int(r["num_blocks"]) == nb), key=lambda r: float(r["offload_gib"]))


def offload_verdict(rec: Mapping[str, Any] | None) -> str | None:
    """One sentence on the recommendation's `offload`: recommended, not worth it, or not simulated."""
    o = (rec or {}).get("offload") or {}
    if not o:
        return None
    if o.get("gib") is not None:
        return (f"KV offloading recommended: --kv-offloading-size {o['gib']:g} (a {fx.gib(o['gib'])} CPU tier) "
                f"takes the hit rate from {fx.pct(o.get('gpu_hit_rate'))} (GPU alone) to {fx.pct(o.get('hit_rate'))}.")
    if o.get("suggested_gib") is not None:
        return (f"KV offloading not simulated: the curve still climbs past GPU memory; a CPU tier would need about "
                f"{fx.gib(o['suggested_gib'])} (a copy of the whole cache wanted): simulate it with --offload-gib.")
    if o.get("simulated"):
        return (f"KV offloading not recommended: at the recommended GPU budget the simulated CPU tiers add less "
                f"than the rule asks (GPU alone: {fx.pct(o.get('gpu_hit_rate'))}).")
    return None


def offload_facts(data: ReportData) -> OffloadFacts | None:
    if not data.offload:
        return None
    bs, nb, rows = _rows_at(data)
    first = rows[0]
    gpu_mem = f"{fx.gib(first['kv_gib'])} of GPU KV, " if first.get("kv_gib") is not None else ""
    caption = (f"Block size {bs}, {fx.num(nb)} GPU blocks ({gpu_mem}the recommended budget or the nearest simulated), "
               f"{_window(data)} window, sequential mode. Each row a --kv-offloading-size: the GPU's hits, the CPU "
               "tier's (vLLM's external_prefix_cache_hits), both, as shares of prompt tokens; what the loads move over "
               "the host link and take at its peak, the whole log.")
    table = [(("none" if float(r["offload_gib"]) == 0 else fx.gib(r["offload_gib"])), fx.num(r["cpu_chunks"]),
              fx.pct(r["gpu_hit_rate"]), fx.pct(r["cpu_hit_rate"]), fx.pct(r["hit_rate"]), fx.num(r["evictions"]),
              fx.gib(r.get("load_gib")) if float(r["offload_gib"]) else "—",
              (f"{float(r['load_s']):.3g} s" if r.get("load_s") is not None and float(r["offload_gib"]) else "—"))
             for r in rows]
    verdict = offload_verdict(data.recommendation) or _verdict_from_rows(rows)
    return OffloadFacts(verdict, caption, HEADER, table)


def _verdict_from_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    best = max(rows, key=lambda r: float(r["cpu_hit_rate"]))
    return (f"The largest gain from a CPU tier here: +{float(best['cpu_hit_rate']) * 100:.1f} points "
            f"({fx.gib(best['offload_gib'])}), over the GPU's {fx.pct(best['gpu_hit_rate'])}.")


def offload_series(data: ReportData) -> OffloadSeries | None:
    """Hit rate against the GPU's KV memory at the recommended block size, one curve per size."""
    if not data.offload:
        return None
    bs, nb, _ = _rows_at(data)
    window = _window(data)
    rows = [r for r in data.offload if int(r["block_size"]) == bs and r["window"] == window]
    use_gib = all(r.get("kv_gib") is not None for r in rows)
    x = (lambda r: float(r["kv_gib"])) if use_gib else (lambda r: float(r["num_blocks"]))  # noqa: E731
    lines: dict[str, list[tuple[float, float]]] = {}
    gpu = {x(r): float(r["gpu_hit_rate"]) * 100 for r in rows}
    lines["GPU alone"] = sorted(gpu.items())
    for gib in sorted({float(r["offload_gib"]) for r in rows if float(r["offload_gib"]) > 0}):
        lines[f"GPU + {fx.gib(gib)} CPU tier"] = sorted((x(r), float(r["hit_rate"]) * 100) for r in rows
                                                        if float(r["offload_gib"]) == gib)
    marked = next((x(r) for r in rows if int(r["num_blocks"]) == nb), None)
    caption = (f"Hit rate against GPU KV memory at block size {bs} ({window} window, sequential mode): the GPU alone "
               "and with each CPU tier simulated. A tier lifts the curve where the GPU holds less than it; the "
               "dotted line marks the recommended GPU budget.")
    return OffloadSeries(use_gib, lines, marked, caption)
