"""What vLLM's CPU offload tier buys at the recommended GPU budget, and how large to make it.

Inputs: offload.parquet's rows (schema.OFFLOAD, a polars frame; empty when simulate ran without
`--offload-gib`), the recommended point and the view's window, the scored points (for the hint
when the tier was not simulated), the GPU's KV bytes and the TP size.
Output: recommendation.json's `offload` (None when there is nothing to say) and the reasoning
lines. `offload["gib"]` is set only when the tier is recommended; advisor.recommend.serve then
adds `--kv-offloading-size GIB --kv-offloading-backend native` to the serve line.

The rule. At the recommended block size and GPU budget, each simulated size's gain is its CPU
hit rate (the prompt tokens served from the CPU tier, of all queries: what it adds to the GPU's
hit rate). The tier is recommended when the largest gain is at least `MIN_GAIN` (one point of
hit rate); its size is the smallest simulated size whose gain is at least `MOST_OF_GAIN` (90%)
of the largest. The rows are sequential mode (the only mode the tier is simulated in) in the
view's window.

Inclusive, not additive. The connector stores each request's blocks to the CPU as they are
computed, so the tier holds a copy of what the GPU holds: a GPU of G blocks with a CPU tier of
C is worth about max(G, C) blocks of cache, not G + C. Sizing a tier as "the cache wanted
minus the GPU" undersizes it; without a simulation, the hint names the whole cache wanted.
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from advisor import kvmemory as kv
from advisor.recommend.rank import Point, rank_key

MIN_GAIN = 0.01  # the largest size must add at least one point of hit rate
MOST_OF_GAIN = 0.9  # the smallest size reaching 90% of the largest size's gain
RULE = (f"the smallest simulated --kv-offloading-size whose CPU hit rate reaches {MOST_OF_GAIN:.0%} of the "
        f"largest size's, when that largest adds at least {MIN_GAIN * 100:g} point of hit rate at the "
        "recommended GPU budget")


def offload_advice(rows: pl.DataFrame | None, best: Point, window: str, points: list[Point],
                   gpu_kv_bytes: int | None, tp: int) -> tuple[dict[str, Any] | None, list[str]]:
    """recommendation.json's `offload` and its reasoning lines (module docstring)."""
    if rows is None or rows.is_empty():
        return _hint(points, best, gpu_kv_bytes, tp)
    at = rows.filter((pl.col("block_size") == best.block_size) & (pl.col("window") == window))
    if at.is_empty():
        return None, [f"KV offloading: offload.parquet has no rows at block size {best.block_size} in the {window} "
                      "window; rerun `pc-advise simulate` with --offload-gib at the recommended block size."]
    budgets = sorted(set(at["num_blocks"].to_list()))
    budget = min(budgets, key=lambda nb: (abs(nb - best.num_blocks), nb))
    at = at.filter(pl.col("num_blocks") == budget).sort("offload_gib")
    gpu_rate = float(at["gpu_hit_rate"][0])
    sizes = [_size(r) for r in at.iter_rows(named=True) if r["offload_gib"] > 0]
    out: dict[str, Any] = {
        "simulated": True, "mode": "sequential", "window": window, "block_size": best.block_size,
        "num_blocks": budget, "gpu_hit_rate": round(gpu_rate, 6), "sizes": sizes, "rule": RULE,
        "gib": None, "hit_rate": None, "cpu_hit_rate": None,
    }
    where = (f"at --block-size {best.block_size} and {budget:,} GPU blocks"
             + ("" if budget == best.num_blocks else f" (the simulated budget nearest the recommended {best.num_blocks:,})"))
    if not sizes:
        return out, [f"KV offloading: only --offload-gib 0 was simulated {where}; sweep sizes (e.g. 16,64,256) to size it."]
    top = max(s["cpu_hit_rate"] for s in sizes)
    largest = sizes[-1]["offload_gib"]
    if top < MIN_GAIN:
        return out, [f"KV offloading: not recommended. {where}, the GPU alone hits {gpu_rate:.1%}; the simulated CPU "
                     f"tiers (up to {largest:g} GiB) add at most {top * 100:.1f} points (the rule: {RULE})."]
    pick = next(s for s in sizes if s["cpu_hit_rate"] >= MOST_OF_GAIN * top)
    out.update(gib=pick["offload_gib"], hit_rate=pick["hit_rate"], cpu_hit_rate=pick["cpu_hit_rate"])
    line = (f"KV offloading: --kv-offloading-size {pick['offload_gib']:g} (GiB over all TP ranks, --kv-offloading-backend "
            f"native). {where}, the GPU alone hits {gpu_rate:.1%}; with a {pick['offload_gib']:g} GiB CPU tier "
            f"({pick['cpu_chunks']:,} blocks) {pick['hit_rate']:.1%}: +{pick['cpu_hit_rate'] * 100:.1f} points, "
            f"{pick['cpu_hit_tokens']:,} prefill tokens loaded from the CPU instead of computed "
            f"({top * 100:.1f} points at the largest size simulated, {largest:g} GiB; the rule: {RULE}).")
    if pick["load_s"] is not None:
        line += (f" Loading them moves {pick['load_gib']:.2f} GiB over the host link, {pick['load_s']:.3g} s at its "
                 "peak over the whole log, which a request waits for before its prefill.")
    return out, [line, "The CPU tier keeps a copy of what the GPU holds (vLLM stores blocks as they are computed), "
                       "so GPU and CPU together are worth about the larger of the two, not the sum. Sequential "
                       "mode: concurrent offloading (stores finishing after the step, loads delaying a request) is "
                       "not simulated."]


def _size(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("offload_gib", "cpu_chunks", "cpu_hit_tokens", "load_gib", "load_s", "store_s", "evictions",
            "refused_offers")
    return {**{k: r[k] for k in keep}, "hit_rate": round(float(r["hit_rate"]), 6),
            "cpu_hit_rate": round(float(r["cpu_hit_rate"]), 6)}


def _hint(points: list[Point], best: Point, gpu_kv_bytes: int | None,
          tp: int) -> tuple[dict[str, Any] | None, list[str]]:
    """Not simulated: when a larger budget of the chosen block size scores better than the best
    that fits the GPU, the CPU tier it would take, sized inclusively (the whole cache wanted)."""
    beyond = [p for p in points if p.block_size == best.block_size and not p.fits_gpu and p.score > best.score]
    if not beyond or gpu_kv_bytes is None:
        return None, []
    far = max(beyond, key=rank_key)
    gib = math.ceil(far.cost_gib * tp * 10) / 10  # a copy of the whole cache wanted, all ranks
    out = {"simulated": False, "gib": None, "suggested_gib": gib, "block_size": far.block_size,
           "num_blocks": far.num_blocks, "hit_rate": None, "beyond_gpu_hit_rate": round(far.hit_rate, 6), "rule": RULE}
    return out, [
        f"The curve still pays past the GPU: {far.num_blocks:,} blocks would reach {far.hit_rate:.1%} "
        f"(+{(far.hit_rate - best.hit_rate) * 100:.1f} points; the GPU holds {gpu_kv_bytes / kv.GIB:.1f} GiB of KV per "
        f"rank). vLLM's CPU offload tier holds a copy of the GPU's blocks, not the overflow, so it would need about "
        f"the whole {gib:g} GiB (--kv-offloading-size counts all TP ranks), not that minus the GPU. Simulate it before "
        f"serving with it: pc-advise simulate RUN_DIR --offload-gib 0,{gib:g} (loads from the CPU also cost transfer time)."
    ]
