"""Ranking: every simulated budget of the view scored by value for memory, best and runner-up.

Inputs: the view's sim rows (polars, schema.SIM), the allowed block sizes and the blocks
running requests pin (advisor.recommend.constraints), the model geometry when known, and
the GPU's KV budget (advisor.recommend.serve).
Outputs: `Pricing` (how memory is counted and priced), `Point`s (the candidates), `choose`
-> best and runner-up, and the recommendation.json pieces that explain them: `headline`,
`why_lost`, `candidate_rows`, `cost_model`.

A point scores `value - price x GiB` (the cost model in advisor.recommend.stage). The value
is the prefill GPU time the cache saves on the simulator's clock (`prefill_s` of caching off
minus the point's, whole log) when simulate ran concurrent mode with its caching-off
baseline, else the prefill tokens it serves from the cache (`hit_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from advisor import kvmemory as kv
from advisor.errors import AdvisorError

REFERENCE_MODEL = "llama-3.1-8b"


@dataclass(frozen=True)
class Pricing:
    per_token: int  # KV bytes per token: the model's, else the reference geometry's
    has_gib: bool  # GiB are real: a model was given, or simulate priced the rows
    price: float  # value one GiB must buy (lambda), in `unit`
    min_gain_per_gib: float
    # per block size, the prefill seconds of the whole log with caching off (the value is
    # then seconds saved); None: the value is prefill tokens served from the cache
    baseline_prefill_s: dict[int, float] | None = None

    @property
    def unit(self) -> str:
        return "prefill GPU-seconds" if self.baseline_prefill_s else "prefill tokens"

    def value(self, row: dict[str, Any]) -> float:
        """What a sim row's configuration saves, in `unit`."""
        if self.baseline_prefill_s:
            return self.baseline_prefill_s[int(row["block_size"])] - float(row["prefill_s"])
        return float(row["hit_tokens"])


def pricing(view: pl.DataFrame, geom: kv.ModelGeometry | None, tp: int,
            min_gain_per_gib: float, off: pl.DataFrame | None = None) -> tuple[Pricing, list[str]]:
    """How memory is counted and priced, and the note that GiB are unknown when they are.
    `off`: simulate's caching-off rows of the view's mode (schema.POLICY_OFF); with them and
    the view's `prefill_s`, value is time (`Pricing.baseline_prefill_s`)."""
    ref = geom or kv.resolve_model(REFERENCE_MODEL)
    has_gib = geom is not None or view["kv_gib"].drop_nulls().len() > 0
    notes = [] if has_gib else [
        "no --model: memory is pinned in blocks; GiB are unknown (pass --model to get GiB "
        "and --gpu-memory-utilization)"
    ]
    baseline = _baseline_prefill(view, off)
    if baseline:
        # the no-cache prefill time of the whole log: min_gain_per_gib of it per GiB
        price = min_gain_per_gib * max(baseline.values())
    else:
        price = min_gain_per_gib * int(view["queries"].max() or 0)  # type: ignore[arg-type]
    return Pricing(kv.bytes_per_token(ref, tp), has_gib, price, min_gain_per_gib, baseline or None), notes


def _baseline_prefill(view: pl.DataFrame, off: pl.DataFrame | None) -> dict[int, float]:
    """Per block size, caching off's prefill seconds at its largest simulated budget (where
    nothing is preempted), when every finite row of the view has a prefill time too."""
    if off is None or "prefill_s" not in view.columns or off.is_empty():
        return {}
    finite = view.filter(pl.col("num_blocks").is_not_null())
    if finite.is_empty() or finite["prefill_s"].null_count() > 0:
        return {}
    out: dict[int, float] = {}
    for r in off.sort("num_blocks").iter_rows(named=True):
        if r.get("prefill_s") is not None:
            out[int(r["block_size"])] = float(r["prefill_s"])
    sizes = {int(b) for b in finite["block_size"].to_list()}
    return out if sizes <= set(out) else {}


def round_or_none(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


@dataclass(frozen=True)
class Point:
    block_size: int
    num_blocks: int
    kv_gib: float | None  # null without a model
    cost_gib: float  # kv_gib, or the reference-geometry estimate for ranking
    requests: int
    queries: int
    hit_tokens: int
    hit_rate: float
    ceiling_hit_rate: float
    marginal: float  # value per (cost) GiB over the previous point of this block size
    score: float
    fits_gpu: bool
    value: float = 0.0  # what it saves, in the pricing's unit (Pricing.value)
    marginal_tokens: float = 0.0  # prefill tokens per (cost) GiB over the previous point
    prefill_s_saved: float | None = None  # prefill GPU-seconds saved, when the clock gives them

    def as_row(self, tps: float, has_gib: bool) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "kv_gib": round_or_none(self.kv_gib),
            "capacity_tokens": self.num_blocks * self.block_size,
            "queries": self.queries,
            "hit_tokens": self.hit_tokens,
            "hit_rate": round(self.hit_rate, 6),
            "ceiling_hit_rate": round(self.ceiling_hit_rate, 6),
            "prefill_tokens_saved": self.hit_tokens,
            "marginal_tokens_per_gib": round(self.marginal_tokens, 1) if has_gib else None,
            "marginal_value_per_gib": round(self.marginal, 6) if has_gib else None,
            "prefill_s_saved": round_or_none(self.prefill_s_saved, 6),
            "ttft_gain_s": round(self.hit_tokens / tps / self.requests, 6) if self.requests else None,
            "fits_gpu": self.fits_gpu,
        }


def rank_key(p: Point) -> tuple[float, float, int]:
    # Ties go to less memory, then to the block size nearest vLLM's default 16.
    return (p.score, -p.cost_gib, -abs(p.block_size - 16))


def candidates(
    view: pl.DataFrame, allowed: list[int], reserve: dict[int, int], pr: Pricing, *,
    geom: kv.ModelGeometry | None, tp: int, gpu_kv_bytes: int | None,
) -> tuple[list[Point], list[str]]:
    """The scored points along each allowed block size's curve, and the constraint naming
    the budgets left out because the concurrent simulation preempted or refused there."""
    ceilings = _ceilings(view)
    points: list[Point] = []
    preempting: list[str] = []
    for b in allowed:
        rows = view.filter((pl.col("block_size") == b) & pl.col("num_blocks").is_not_null()).sort("num_blocks")
        prev_cost, prev_value, prev_hits = 0.0, 0.0, 0
        for r in rows.iter_rows(named=True):
            nb = int(r["num_blocks"])
            if nb < reserve.get(b, 0):
                continue
            if (r.get("preemptions") or 0) > 0 or (r.get("refused") or 0) > 0:
                # simulate's extra columns: this budget preempted or refused requests at the logged load
                preempting.append(f"{nb:,} blocks at B={b}")
                continue
            # the model recommend was given wins over the one simulate priced the rows with
            kv_gib = kv.kv_gib_for_blocks(geom, b, nb, tp) if geom is not None else r["kv_gib"]
            cost = kv_gib if kv_gib is not None else (nb + 1) * b * pr.per_token / kv.GIB
            hits = int(r["hit_tokens"])
            value = pr.value(r)
            marginal = (value - prev_value) / (cost - prev_cost) if cost > prev_cost else 0.0
            marginal_tokens = (hits - prev_hits) / (cost - prev_cost) if cost > prev_cost else 0.0
            prev_cost, prev_value, prev_hits = cost, value, hits
            fits = gpu_kv_bytes is None or (kv.blocks_for_kv_bytes(geom, b, gpu_kv_bytes, tp) >= nb if geom else True)
            points.append(Point(
                block_size=b, num_blocks=nb, kv_gib=kv_gib, cost_gib=cost, requests=int(r["requests"]),
                queries=int(r["queries"]), hit_tokens=hits, hit_rate=float(r["hit_rate"]),
                ceiling_hit_rate=ceilings.get(b, float(r["ceiling_hit_rate"])), marginal=marginal,
                score=value - pr.price * cost, fits_gpu=fits, value=value, marginal_tokens=marginal_tokens,
                prefill_s_saved=value if pr.baseline_prefill_s else None,
            ))
    if not points:
        raise AdvisorError(
            "every simulated budget is smaller than what running requests pin at the logged concurrency: "
            "rerun `pc-advise simulate` with larger budgets (--kv-cache-gib / --num-blocks)."
        )
    return points, (["budgets where the concurrent simulation preempted or refused requests are not "
                     "recommended: " + ", ".join(preempting)] if preempting else [])


def _ceilings(view: pl.DataFrame) -> dict[int, float]:
    rows = view.filter(pl.col("num_blocks").is_null())
    return {int(r["block_size"]): float(r["hit_rate"]) for r in rows.iter_rows(named=True)}


def choose(points: list[Point]) -> tuple[Point, Point | None, list[str]]:
    """The best point within the GPU, the runner-up, and a note when nothing fits the GPU."""
    notes: list[str] = []
    fitting = [p for p in points if p.fits_gpu]
    if not fitting:
        notes.append(
            "every simulated budget exceeds the GPU's KV memory: rerun `pc-advise simulate` with --model and "
            "--gpu so the sweep includes the GPU's own budget; the smallest simulated budget is shown"
        )
        fitting = [min(points, key=lambda p: p.cost_gib)]
    best = max(fitting, key=rank_key)
    # The runner-up is another block size when one fits, so the choice of size is explained too.
    others = [p for p in points if p.block_size != best.block_size and p.fits_gpu]
    if not others:
        others = [p for p in points if p is not best]
    return best, (max(others, key=rank_key) if others else None), notes


def _amount(x: float, pr: Pricing) -> str:
    return f"{x:,.3g} s" if pr.baseline_prefill_s else f"{x:,.0f}"


def headline(best: Point, pr: Pricing, hash_trace: bool) -> str:
    """The reasoning's first sentence: what is recommended and why it is the best value."""
    mem = (f"{best.kv_gib:.2f} GiB" if best.kv_gib is not None
           else f"{best.num_blocks * best.block_size:,} cached tokens")
    what = (f"Recommended KV memory (the trace fixes the granularity at {best.block_size} tokens, so no "
            f"--block-size is recommended): {best.num_blocks:,} trace blocks ({mem})" if hash_trace
            else f"Recommended --block-size {best.block_size} with {best.num_blocks:,} blocks ({mem})")
    if pr.baseline_prefill_s:
        return (
            f"{what}: predicted hit rate {best.hit_rate:.1%} of a {best.ceiling_hit_rate:.1%} block ceiling, "
            f"{best.hit_tokens:,} prefill tokens saved, {best.value:,.3g} s of prefill GPU time over the whole log "
            f"(on the simulator's clock, against caching off). It is the best value once each GiB is priced at "
            f"{pr.price:,.3g} s of prefill time ({pr.min_gain_per_gib * 100:g}% of the log's prefill time without "
            "caching per GiB)" + ("" if pr.has_gib else " at the reference geometry")
            + "; budgets beyond it save less than that per extra GiB."
        )
    return (
        f"{what}: predicted hit rate {best.hit_rate:.1%} of a {best.ceiling_hit_rate:.1%} block ceiling, "
        f"{best.hit_tokens:,} prefill tokens saved. "
        f"It is the best value once each GiB is priced at {pr.price:,.0f} prefill tokens "
        f"({pr.min_gain_per_gib * 100:g} points of hit rate per GiB)"
        + ("" if pr.has_gib else " at the reference geometry")
        + "; budgets beyond it buy less than that per extra GiB."
    )


def why_lost(r: Point, best: Point, pr: Pricing) -> str:
    unit = "GiB" if pr.has_gib else "GiB (reference geometry)"
    price = pr.price
    d_value = r.value - best.value
    d_cost = r.cost_gib - best.cost_gib
    what = "of prefill time" if pr.baseline_prefill_s else "prefill tokens"
    if not r.fits_gpu:
        return "it does not fit the GPU's KV memory"
    if d_value > 0 and d_cost > 0:
        per = ("s of prefill time" if pr.baseline_prefill_s else "tokens")
        return (f"+{(r.hit_rate - best.hit_rate) * 100:.2f} points of hit rate for +{d_cost:.2f} {unit}: "
                f"{_amount(d_value / d_cost, pr)}{'' if pr.baseline_prefill_s else ' ' + per} per extra GiB, "
                f"below the price of {_amount(price, pr)}")
    if d_value <= 0 and abs(d_cost) < 0.005:
        return f"saves {_amount(-d_value, pr)} fewer {what} with the same memory"
    if d_value <= 0 and d_cost >= 0:
        return f"saves {_amount(-d_value, pr)} fewer {what} with {d_cost:.2f} {unit} more"
    if d_value < 0:
        return (f"saves {d_cost * -1:.2f} {unit} but loses {_amount(-d_value, pr)} {what} "
                f"({_amount(-d_value / max(-d_cost, 1e-9), pr)} per GiB saved, above the price of {_amount(price, pr)})")
    return "same value at equal or more memory"


def candidate_rows(points: list[Point], where: dict[str, str], tps: float, has_gib: bool) -> list[dict[str, Any]]:
    """Every point by block size and budget, with its score and its rank by value (GPU fit aside)."""
    ranked = sorted(points, key=rank_key, reverse=True)
    rank = {id(p): i + 1 for i, p in enumerate(ranked)}
    return [{**p.as_row(tps, has_gib), **where, "score": round(p.score, 6), "rank": rank[id(p)]}
            for p in sorted(points, key=lambda p: (p.block_size, p.num_blocks))]


def cost_model(pr: Pricing, tps: float, headroom_gib: float | None, tp: int) -> dict[str, Any]:
    """recommendation.json's `cost_model`: what is counted as value and how memory is priced."""
    return {
        "value": ("prefill GPU-seconds saved over the whole log on the simulator's clock (caching off's "
                  "prefill_s minus the configuration's)" if pr.baseline_prefill_s else
                  "prefill tokens served from the prefix cache (vLLM prefix_cache_hits)"),
        "value_unit": pr.unit,
        "memory_unit": "GiB of KV cache per GPU" if pr.has_gib else
        f"GiB at a reference geometry ({REFERENCE_MODEL}, {pr.per_token:,} B/token), for ranking only",
        "min_gain_per_gib": pr.min_gain_per_gib,
        "price_per_gib": round(pr.price, 6),
        "prefill_tokens_per_s": tps,
        "ttft_gain_s": "mean prefill seconds saved per request = hit_tokens / prefill_tokens_per_s / requests",
        "headroom_gib": headroom_gib,
        "tensor_parallel_size": tp,
    }
