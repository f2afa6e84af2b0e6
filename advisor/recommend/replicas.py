"""Recommend the router and the replica layout: which router, how many replicas, how the GPUs split.

Inputs: replicas.parquet rows (schema.REPLICAS, polars; concurrent rows are used, a `mode`
column when present picks them), the single-engine recommendation (its block size and
budget), sim.parquet (caching off's prefill time, for the time value), `RecommendOptions`
(`gpus`: the GPUs to split; the model, GPU and memory options), the model geometry and GPU
memory when known, and the routers' settings simulated (`RouterSettings`). Output:
recommendation.json's `replicas` section (`recommend_replicas`), or None when no replica
count above 1 was simulated.

The rule (stated in the section's `rule`):
- Layouts. With `gpus` G, a model and a GPU: every simulated replica count R that divides G,
  each replica on t = G / R GPUs (tensor parallel), where vLLM allows t (the attention heads
  divide by it) and the weights fit; its KV pool per replica is what t GPUs leave
  (advisor.kvmemory at TP t), and it is evaluated at the largest simulated budget per replica
  that fits that pool (more memory is not priced: the section says how to simulate it).
  Otherwise (no `gpus`, or the memory per replica unknown) only the router is chosen, at each
  simulated count (of them, those that divide G), at the simulated budget nearest the
  recommended one.
- Value: what the deployment saves in prefill over the whole log (all replicas): prefill
  GPU-seconds against caching off when the rows carry the clock's `prefill_s` and simulate
  ran the caching-off baseline (advisor.recommend.rank's rule), else prefill tokens served
  from the cache (`hit_tokens`).
- Balance limit (`BalanceLimit`): a router is admissible when its p95 TTFT is at most
  `ttft_p95_vs_round_robin` times round-robin's at the same replica count and budget (the
  even split every balancer is measured against; skipped when round-robin was not
  simulated there), when its busiest replica gets at most `load_spread` times the mean
  requests, and when it refused no request. One replica is always admissible.
- Choice: the admissible candidate that saves the most (ties: the more even load, then fewer
  replicas, then the lower p95 TTFT); the runner-up is the candidate of another router (or
  else another layout) that saves the most, admissible or not, with why it lost.

How to deploy the choice (the serve line, the router and where the real one differs) is
advisor.recommend.deploy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from advisor import kvmemory as kv
from advisor.errors import AdvisorError
from advisor.recommend.deploy import SINGLE_ENGINE, RouterSettings, deploy
from advisor.recommend.options import RecommendOptions, resolve_options
from advisor.recommend.rank import round_or_none
from advisor.schema import MODE_CONCURRENT, POLICY_OFF, WINDOW_COLD
from advisor.sim.routing import ROUND_ROBIN, ROUTERS


@dataclass(frozen=True)
class BalanceLimit:
    """How much balance a router may give up for its hits (the module docstring's rule)."""

    ttft_p95_vs_round_robin: float = 1.25
    load_spread: float = 2.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ttft_p95_vs_round_robin": self.ttft_p95_vs_round_robin, "load_spread": self.load_spread,
            "rule": (f"p95 TTFT at most {self.ttft_p95_vs_round_robin:g}x round-robin's at the same replica count "
                     f"and budget, the busiest replica at most {self.load_spread:g}x the mean requests per replica, "
                     "and no request refused"),
        }


@dataclass(frozen=True)
class Layout:
    replicas: int
    tp: int
    num_blocks: int  # the simulated budget per replica it is evaluated at
    pool_blocks: int | None = None  # what its GPUs hold per replica; None: not derived
    gpu_kv_bytes: int | None = None  # KV bytes per GPU at its TP; None: unknown
    kv_gib_per_gpu: float | None = None  # what num_blocks take per GPU at its TP; None: simulate's row says

    @property
    def label(self) -> str:
        return f"{self.replicas} x TP{self.tp}"


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    router: str  # SINGLE_ENGINE for one replica
    row: dict[str, Any]
    value: float
    ttft_vs_rr: float | None  # p95 TTFT over round-robin's at the same layout
    out: str | None  # why it breaks the balance limit; None: admissible
    broken: str | None = None  # the same in a few words (a table cell)

    def key(self) -> tuple[Any, ...]:
        """Rank: what it saves (to 9 digits: sums of seconds that differ in the last bit are a
        tie), then the more even load, fewer replicas, the lower p95 TTFT."""
        ttft = self.row.get("ttft_p95_s")
        return (_digits(self.value), -float(self.row.get("load_spread") or 1.0), -self.layout.replicas,
                -(float(ttft) if ttft is not None else float("inf")))

    def as_row(self, unit_seconds: bool) -> dict[str, Any]:
        r = self.row
        return {
            "replicas": self.layout.replicas, "tensor_parallel_size": self.layout.tp, "router": self.router,
            "gpus_used": self.layout.replicas * self.layout.tp,
            "block_size": int(r["block_size"]), "num_blocks": self.layout.num_blocks,
            "pool_blocks": self.layout.pool_blocks,
            "kv_gib_per_gpu": round_or_none(self.layout.kv_gib_per_gpu if self.layout.kv_gib_per_gpu is not None
                                            else r.get("kv_gib")),
            "hit_rate": round(float(r["hit_rate"]), 6), "hit_tokens": int(r["hit_tokens"]),
            "value": round(self.value, 6) if unit_seconds else int(self.value),
            "load_spread": round(float(r.get("load_spread") or 1.0), 4),
            "ttft_p50_s": round_or_none(r.get("ttft_p50_s"), 6), "ttft_p95_s": round_or_none(r.get("ttft_p95_s"), 6),
            "ttft_p95_vs_round_robin": round_or_none(self.ttft_vs_rr, 4),
            "fallbacks": int(r.get("fallbacks") or 0), "refused": int(r.get("refused") or 0),
            "within_limit": self.out is None, "out_of_limit": self.out, "limit_broken": self.broken,
        }


def recommend_replicas(
    replicas: pl.DataFrame, recommended: dict[str, Any], options: RecommendOptions, *,
    sim: pl.DataFrame | None = None, geom: kv.ModelGeometry | None = None, gpu_gib: float | None = None,
    hash_trace: bool = False, longest_request: int | None = None, routing: RouterSettings = RouterSettings(),
    models: int = 1, limit: BalanceLimit = BalanceLimit(),
) -> dict[str, Any] | None:
    """recommendation.json's `replicas` section (module docstring); None without a count above 1."""
    options = resolve_options(options, {})
    rows = _concurrent(replicas)
    if rows.is_empty() or int(rows["replicas"].max()) <= 1:  # type: ignore[arg-type]
        return None
    bs, notes = _block_size(rows, recommended)
    rows = rows.filter(pl.col("block_size") == bs)
    baseline = _baseline_prefill_s(sim, bs)
    seconds = baseline is not None and "prefill_s" in rows.columns and rows["prefill_s"].null_count() == 0
    layouts, by_layout, layout_notes = _layouts(rows, recommended, options, geom, gpu_gib, bs)
    notes += layout_notes
    cands = _candidates(rows, layouts, limit, baseline if seconds else None)
    unit = "prefill GPU-seconds" if seconds else "prefill tokens"
    if models > 1:
        notes.append(f"this log names {models} models: each replica here serves all of them from one pool (their "
                     "caches kept apart, their memory shared); a real deployment runs each model on replicas of "
                     "its own: run pc-advise on each model's lines for a layout per model")
    out: dict[str, Any] = {
        "choice": "layout" if by_layout else "router", "gpus": options.gpus, "block_size": bs, "value_unit": unit,
        "balance_limit": limit.as_dict(), "rule": _rule_text(by_layout, unit),
        "recommended": None, "runner_up": None, "per_count": None, "candidates": [], "notes": notes,
        "reasoning": [f"No replica layout of the {options.gpus} GPUs could be evaluated (the notes say why)."],
    }
    if not cands:
        return out
    best, runner = _choose(cands, by_layout)
    return {
        **out,
        "recommended": {**best.as_row(seconds), "deploy": deploy(
            best.router, best.layout.replicas, best.layout.tp, best.row, best.layout.num_blocks,
            best.layout.gpu_kv_bytes, options, geom, gpu_gib, hash_trace, longest_request, routing)},
        "runner_up": ({**runner.as_row(seconds), "why_lost": why_lost(runner, best, unit, limit)}
                      if runner is not None else None),
        "per_count": _per_count(cands, seconds) if not by_layout else None,
        "candidates": [c.as_row(seconds) for c in sorted(cands, key=lambda c: (c.layout.replicas, _order(c.router)))],
        "reasoning": _reasoning(best, runner, unit, by_layout, limit, options),
    }


# --- rows ---
def _concurrent(replicas: pl.DataFrame) -> pl.DataFrame:
    """The concurrent rows (TTFT and load need a clock); all rows before `mode` existed."""
    if "mode" in replicas.columns:
        return replicas.filter(pl.col("mode") == MODE_CONCURRENT)
    return replicas


def _block_size(rows: pl.DataFrame, recommended: dict[str, Any]) -> tuple[int, list[str]]:
    sizes = sorted(int(b) for b in rows["block_size"].unique().to_list())
    want = recommended.get("block_size")
    if want in sizes:
        return int(want), []
    return sizes[0], [f"the replica grid did not run at the recommended block size {want}; block size {sizes[0]} "
                      "is used (rerun simulate with --block-sizes including it)"]


def _baseline_prefill_s(sim: pl.DataFrame | None, bs: int) -> float | None:
    """Caching off's prefill seconds over the whole log (concurrent, cold window) at `bs`."""
    if sim is None or "prefill_s" not in sim.columns:
        return None
    off = sim.filter((pl.col("policy") == POLICY_OFF) & (pl.col("mode") == MODE_CONCURRENT)
                     & (pl.col("window") == WINDOW_COLD) & (pl.col("block_size") == bs)
                     & pl.col("prefill_s").is_not_null())
    if off.is_empty():
        return None
    return float(off.sort("num_blocks", nulls_last=True)["prefill_s"][-1])


def nearest_budget(budgets: list[int], target: int | None) -> int:
    """The budget nearest `target` (ties: the larger), else the largest."""
    if target is None:
        return max(budgets)
    return min(budgets, key=lambda b: (abs(b - int(target)), -b))


# --- layouts ---
def _layouts(rows: pl.DataFrame, recommended: dict[str, Any], options: RecommendOptions,
             geom: kv.ModelGeometry | None, gpu_gib: float | None, bs: int) -> tuple[list[Layout], bool, list[str]]:
    """The layouts to compare, whether they compete across replica counts (GPUs and memory
    known), and notes on what was left out."""
    counts = sorted(int(c) for c in rows["replicas"].unique().to_list())
    budgets = sorted(int(b) for b in rows["num_blocks"].unique().to_list())
    if options.gpus is not None and options.gpus < 1:
        raise AdvisorError(f"--gpus must be at least 1, got {options.gpus}.")
    if options.gpus is None or geom is None or gpu_gib is None:
        nb = nearest_budget(budgets, recommended.get("num_blocks"))
        return _router_layouts(counts, nb, options, geom, gpu_gib), False, _router_notes(counts, options)
    layouts, notes = _gpu_layouts(counts, budgets, options.gpus, options, geom, gpu_gib, bs)
    return layouts, True, notes


def _router_layouts(counts: list[int], nb: int, options: RecommendOptions, geom: kv.ModelGeometry | None,
                    gpu_gib: float | None) -> list[Layout]:
    """Choosing the router only: each count above 1 (of them, those that fit the GPUs given) at
    simulate's TP and the budget `nb`."""
    tp = options.tensor_parallel_size or 1
    kvb = _gpu_kv_bytes(geom, gpu_gib, options, tp)
    gpus = options.gpus
    allowed = [c for c in counts if c > 1 and (gpus is None or (gpus % c == 0 and c * tp <= gpus))]
    return [Layout(c, tp, nb, None, kvb) for c in (allowed or [c for c in counts if c > 1])]


def _router_notes(counts: list[int], options: RecommendOptions) -> list[str]:
    gpus, tp = options.gpus, options.tensor_parallel_size or 1
    if gpus is None:
        return []
    notes = ["--gpus without --model and --gpu: the memory per replica cannot be derived, so the replica counts "
             "are not compared; the router is chosen at each count that divides the GPUs"]
    if not [c for c in counts if c > 1 and gpus % c == 0 and c * tp <= gpus]:
        notes.append(f"no simulated replica count above 1 fits {gpus} GPUs at TP {tp}; every count is shown")
    return notes


def _gpu_layouts(counts: list[int], budgets: list[int], gpus: int, options: RecommendOptions,
                 geom: kv.ModelGeometry, gpu_gib: float, bs: int) -> tuple[list[Layout], list[str]]:
    """Every simulated count R dividing the GPUs, on t = gpus / R GPUs each, at the largest
    simulated budget its pool holds; notes on the layouts left out or evaluated short."""
    out, notes = [], []
    for c in counts:
        if gpus % c:
            continue
        t = gpus // c
        why = _tp_refusal(geom, t)
        if why is None:
            try:
                kvb = kv.kv_bytes_for_gpu(geom, gpu_gib, float(options.gpu_memory_utilization or 0), options.headroom_gib, t)
            except AdvisorError:
                why = f"the weights ({geom.weight_bytes / t / kv.GIB:.1f} GiB per GPU) leave no KV memory"
        if why is not None:
            notes.append(f"{c} x TP{t} left out: {why}")
            continue
        pool = kv.blocks_for_kv_bytes(geom, bs, kvb, t)
        fits = [b for b in budgets if b <= pool]
        if not fits:
            notes.append(f"{c} x TP{t} left out: its pool ({pool:,} blocks per replica) is below every simulated "
                         f"budget; rerun simulate with --num-blocks {pool}")
            continue
        out.append(Layout(c, t, max(fits), pool, kvb, kv.kv_gib_for_blocks(geom, bs, max(fits), t)))
    short = [lay for lay in out if lay.num_blocks < lay.pool_blocks]  # type: ignore[operator]
    if short:
        pools = ",".join(str(lay.pool_blocks) for lay in short)
        notes.append("evaluated below their pools (the largest simulated budget that fits): "
                     + ", ".join(f"{lay.label} at {lay.num_blocks:,} of {lay.pool_blocks:,} blocks" for lay in short)
                     + f"; to price the whole pools, rerun pc-advise simulate with --num-blocks {pools} "
                     f"--block-sizes {bs} and the same --replicas/--router")
    if 1 not in counts:
        notes.append(f"1 x TP{gpus} (one engine on every GPU) was not simulated: add 1 to --replicas to compare it")
    return out, notes


def _tp_refusal(geom: kv.ModelGeometry, t: int) -> str | None:
    """Why vLLM would not shard this model over t GPUs (attention heads per rank), or None."""
    if geom.q_heads is not None and geom.q_heads % t:
        return f"vLLM needs the {geom.q_heads} attention heads to divide by the tensor-parallel size {t}"
    return None


def _gpu_kv_bytes(geom: kv.ModelGeometry | None, gpu_gib: float | None, options: RecommendOptions,
                  tp: int) -> int | None:
    if geom is None or gpu_gib is None:
        return None
    return kv.kv_bytes_for_gpu(geom, gpu_gib, float(options.gpu_memory_utilization or 0), options.headroom_gib, tp)


# --- candidates and the choice ---
def _digits(x: float) -> float:
    return float(f"{x:.9g}")


def _order(router: str) -> int:
    return ROUTERS.index(router) if router in ROUTERS else -1


def _candidates(rows: pl.DataFrame, layouts: list[Layout], limit: BalanceLimit,
                baseline_s: float | None) -> list[Candidate]:
    out = []
    for lay in layouts:
        at = [r for r in rows.filter((pl.col("replicas") == lay.replicas) & (pl.col("num_blocks") == lay.num_blocks))
              .iter_rows(named=True)]
        if lay.replicas == 1:  # one engine: every router's row is the same run
            at = at[:1]
        rr = next((r for r in at if r["router"] == ROUND_ROBIN), None)
        for r in at:
            value = baseline_s - float(r["prefill_s"]) if baseline_s is not None else float(r["hit_tokens"])
            ratio = _ratio(r.get("ttft_p95_s"), rr.get("ttft_p95_s") if rr is not None else None)
            router = SINGLE_ENGINE if lay.replicas == 1 else str(r["router"])
            why = _out_of_limit(r, ratio, lay.replicas, limit)
            out.append(Candidate(lay, router, r, value, ratio, why[0] if why else None, why[1] if why else None))
    return out


def _ratio(a: Any, b: Any) -> float | None:
    return float(a) / float(b) if a is not None and b is not None and float(b) > 0 else None


def _out_of_limit(r: dict[str, Any], ttft_vs_rr: float | None, replicas: int,
                  limit: BalanceLimit) -> tuple[str, str] | None:
    """Why a row breaks the balance limit, as a sentence and in a few words; None: it does not."""
    if replicas == 1:
        return None
    if int(r.get("refused") or 0) > 0:
        return f"it refused {int(r['refused']):,} requests", f"{int(r['refused']):,} refused"
    spread = float(r.get("load_spread") or 1.0)
    if spread > limit.load_spread + 1e-9:
        return (f"its busiest replica gets {spread:.2f}x the mean requests per replica (limit {limit.load_spread:g}x)",
                f"busiest {spread:.2f}x (limit {limit.load_spread:g}x)")
    if ttft_vs_rr is not None and ttft_vs_rr > limit.ttft_p95_vs_round_robin + 1e-9:
        return (f"its p95 TTFT is {ttft_vs_rr:.2f}x round-robin's at {replicas} replicas (limit "
                f"{limit.ttft_p95_vs_round_robin:g}x)", f"p95 {ttft_vs_rr:.2f}x (limit {limit.ttft_p95_vs_round_robin:g}x)")
    return None


def _choose(cands: list[Candidate], by_layout: bool) -> tuple[Candidate, Candidate | None]:
    """The best admissible candidate and the runner-up (module docstring). Choosing the
    router only, the comparison is at the largest count."""
    pool = cands if by_layout else [c for c in cands if c.layout.replicas == max(x.layout.replicas for x in cands)]
    admissible = [c for c in pool if c.out is None] or pool
    best = max(admissible, key=lambda c: (*c.key(), -_order(c.router)))
    others = [c for c in pool if c is not best and c.router != best.router] or [c for c in pool if c is not best]
    runner = max(others, key=lambda c: (*c.key(), -_order(c.router))) if others else None
    return best, runner


def _per_count(cands: list[Candidate], seconds: bool) -> list[dict[str, Any]]:
    """Choosing the router only: the best router at each count, with its runner-up."""
    out = []
    for count in sorted({c.layout.replicas for c in cands}):
        at = [c for c in cands if c.layout.replicas == count]
        best, runner = _choose(at, by_layout=True)
        out.append({"replicas": count, "router": best.router, "hit_rate": round(float(best.row["hit_rate"]), 6),
                    "value": round(best.value, 6) if seconds else int(best.value), "within_limit": best.out is None,
                    "runner_up": runner.router if runner is not None else None})
    return out


def _amount(x: float, unit: str) -> str:
    return f"{x:,.3g} s of prefill" if unit.endswith("seconds") else f"{x:,.0f} prefill tokens"


def _fewer(x: float, unit: str) -> str:
    return f"{x:,.3g} s less prefill time" if unit.endswith("seconds") else f"{x:,.0f} fewer prefill tokens"


def why_lost(r: Candidate, best: Candidate, unit: str, limit: BalanceLimit) -> str:
    """One sentence: why `r` is not the recommendation."""
    more = r.value - best.value
    sign = (_digits(r.value) > _digits(best.value)) - (_digits(r.value) < _digits(best.value))
    hr = f"hit rate {float(r.row['hit_rate']):.1%} vs {float(best.row['hit_rate']):.1%}"
    if r.out is not None and sign > 0:
        return f"it would save {_amount(more, unit)} more, but {r.out}: over the balance limit"
    if r.out is not None:
        saves = f"saves {_fewer(-more, unit)} ({hr})" if sign < 0 else "saves as much"
        return f"{r.out}, over the balance limit, and it {saves}"
    if sign < 0:
        return f"saves {_fewer(-more, unit)} ({hr})"
    return "saves as much; the recommendation has the more even load, fewer replicas or the lower p95 TTFT"


def _rule_text(by_layout: bool, unit: str) -> str:
    what = ("every layout of the GPUs given (replicas x tensor parallel size) and router" if by_layout
            else "every router at each simulated replica count (no --gpus with --model and --gpu: counts are not "
                 "compared, the recommendation is at the largest)")
    return (f"Of {what}, the one that saves the most {unit} over the whole log within the balance limit; ties go to "
            "the more even load (headroom at peak), then fewer replicas (the simpler deployment), then the lower p95 "
            "TTFT.")


def _what(c: Candidate, by_layout: bool) -> str:
    if c.router == SINGLE_ENGINE:
        return f"one engine on all {c.layout.tp} GPUs (TP{c.layout.tp})"
    return f"{c.router} over {c.layout.label if by_layout else str(c.layout.replicas) + ' replicas'}"


def _balance_line(c: Candidate) -> str:
    """What the candidate's load looks like: the busiest replica's share of the requests."""
    n = c.layout.replicas
    if n == 1:
        return "One engine: nothing to balance."
    spread = float(c.row.get("load_spread") or 1.0)
    ttft = f", p95 TTFT {c.ttft_vs_rr:.2f}x round-robin's" if c.ttft_vs_rr is not None else ""
    hot = "; at a higher rate than the log's, that replica saturates first" if spread > 1.2 else ""
    return (f"Balance: the busiest of the {n} replicas gets {spread / n:.1%} of the requests (an even split: "
            f"{1 / n:.1%}){ttft}{hot}.")


def _reasoning(best: Candidate, runner: Candidate | None, unit: str, by_layout: bool, limit: BalanceLimit,
               options: RecommendOptions) -> list[str]:
    r = best.row
    where = (f"{best.layout.label} ({best.layout.replicas * best.layout.tp} GPUs)" if by_layout
             else f"{best.layout.replicas} replicas")
    head = (f"Recommended {best.router} routing over {where}, {best.layout.num_blocks:,} blocks of "
            f"{int(r['block_size'])} per replica: hit rate {float(r['hit_rate']):.1%} over all replicas, "
            f"{_amount(best.value, unit)} saved over the whole log (concurrent mode, logged arrivals)")
    if best.router == SINGLE_ENGINE:
        head = (f"Recommended one engine on all {best.layout.tp} GPUs (TP{best.layout.tp}), {best.layout.num_blocks:,} "
                f"blocks of {int(r['block_size'])}: hit rate {float(r['hit_rate']):.1%}, {_amount(best.value, unit)} "
                "saved over the whole log")
    lines = [head + ".", _balance_line(best)]
    if best.out is not None:
        lines.append(f"No candidate is within the balance limit ({limit.as_dict()['rule']}); the best is shown: "
                     f"{best.out}.")
    if runner is not None:
        lines.append(f"Runner-up: {_what(runner, by_layout)}: {why_lost(runner, best, unit, limit)}.")
    if not by_layout and options.gpus is None:
        lines.append("Pass --gpus N (with --model and --gpu) to choose the replica count and tensor-parallel split too.")
    return lines
