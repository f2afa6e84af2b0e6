"""Ranking: every simulated budget of the view scored by value for memory, best and runner-up.

Inputs: the view's sim rows (polars, schema.SIM), the allowed block sizes and the blocks
running requests pin (advisor.recommend.constraints), the model geometry when known, and
the GPU's KV budget (advisor.recommend.serve).
Outputs: `Pricing` (how memory is counted and priced), `Point`s (the candidates), `choose`
-> best and runner-up, and the recommendation.json pieces that explain them: `headline`,
`why_lost`, `candidate_rows`, `cost_model`.

A point scores `hit_tokens - price x GiB` (the cost model in advisor.recommend.stage).
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
    price: float  # prefill tokens one GiB must buy (lambda)
    min_gain_per_gib: float


def pricing(view: pl.DataFrame, geom: kv.ModelGeometry | None, tp: int,
            min_gain_per_gib: float) -> tuple[Pricing, list[str]]:
    """How memory is counted and priced, and the note that GiB are unknown when they are."""
    ref = geom or kv.resolve_model(REFERENCE_MODEL)
    has_gib = geom is not None or view["kv_gib"].drop_nulls().len() > 0
    notes = [] if has_gib else [
        "no --model: memory is pinned in blocks; GiB are unknown (pass --model to get GiB "
        "and --gpu-memory-utilization)"
    ]
    price = min_gain_per_gib * int(view["queries"].max() or 0)  # type: ignore[arg-type]
    return Pricing(kv.bytes_per_token(ref, tp), has_gib, price, min_gain_per_gib), notes


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
    marginal: float  # prefill tokens per (cost) GiB over the previous point of this block size
    score: float
    fits_gpu: bool

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
            "marginal_tokens_per_gib": round(self.marginal, 1) if has_gib else None,
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
        prev_cost, prev_hits = 0.0, 0
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
            marginal = (hits - prev_hits) / (cost - prev_cost) if cost > prev_cost else 0.0
            prev_cost, prev_hits = cost, hits
            fits = gpu_kv_bytes is None or (kv.blocks_for_kv_bytes(geom, b, gpu_kv_bytes, tp) >= nb if geom else True)
            points.append(Point(
                block_size=b, num_blocks=nb, kv_gib=kv_gib, cost_gib=cost, requests=int(r["requests"]),
                queries=int(r["queries"]), hit_tokens=hits, hit_rate=float(r["hit_rate"]),
                ceiling_hit_rate=ceilings.get(b, float(r["ceiling_hit_rate"])), marginal=marginal,
                score=hits - pr.price * cost, fits_gpu=fits,
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


def headline(best: Point, pr: Pricing, hash_trace: bool) -> str:
    """The reasoning's first sentence: what is recommended and why it is the best value."""
    mem = (f"{best.kv_gib:.2f} GiB" if best.kv_gib is not None
           else f"{best.num_blocks * best.block_size:,} cached tokens")
    what = (f"Recommended KV memory (the trace fixes the granularity at {best.block_size} tokens, so no "
            f"--block-size is recommended): {best.num_blocks:,} trace blocks ({mem})" if hash_trace
            else f"Recommended --block-size {best.block_size} with {best.num_blocks:,} blocks ({mem})")
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
    d_hits = r.hit_tokens - best.hit_tokens
    d_cost = r.cost_gib - best.cost_gib
    if not r.fits_gpu:
        return "it does not fit the GPU's KV memory"
    if d_hits > 0 and d_cost > 0:
        return (f"+{(r.hit_rate - best.hit_rate) * 100:.2f} points of hit rate for +{d_cost:.2f} {unit}: "
                f"{d_hits / d_cost:,.0f} tokens per extra GiB, below the price of {price:,.0f}")
    if d_hits <= 0 and abs(d_cost) < 0.005:
        return f"saves {-d_hits:,} fewer prefill tokens with the same memory"
    if d_hits <= 0 and d_cost >= 0:
        return f"saves {-d_hits:,} fewer prefill tokens with {d_cost:.2f} {unit} more"
    if d_hits < 0:
        return (f"saves {d_cost * -1:.2f} {unit} but loses {-d_hits:,} prefill tokens "
                f"({-d_hits / max(-d_cost, 1e-9):,.0f} per GiB saved, above the price of {price:,.0f})")
    return "same value at equal or more memory"


def candidate_rows(points: list[Point], where: dict[str, str], tps: float, has_gib: bool) -> list[dict[str, Any]]:
    """Every point by block size and budget, with its score and its rank by value (GPU fit aside)."""
    ranked = sorted(points, key=rank_key, reverse=True)
    rank = {id(p): i + 1 for i, p in enumerate(ranked)}
    return [{**p.as_row(tps, has_gib), **where, "score": round(p.score, 1), "rank": rank[id(p)]}
            for p in sorted(points, key=lambda p: (p.block_size, p.num_blocks))]


def cost_model(pr: Pricing, tps: float, headroom_gib: float | None, tp: int) -> dict[str, Any]:
    """recommendation.json's `cost_model`: what is counted as value and how memory is priced."""
    return {
        "value": "prefill tokens served from the prefix cache (vLLM prefix_cache_hits)",
        "memory_unit": "GiB of KV cache per GPU" if pr.has_gib else
        f"GiB at a reference geometry ({REFERENCE_MODEL}, {pr.per_token:,} B/token), for ranking only",
        "min_gain_per_gib": pr.min_gain_per_gib,
        "price_tokens_per_gib": round(pr.price, 1),
        "prefill_tokens_per_s": tps,
        "ttft_gain_s": "mean prefill seconds saved per request = hit_tokens / prefill_tokens_per_s / requests",
        "headroom_gib": headroom_gib,
        "tensor_parallel_size": tp,
    }
