"""Recommend: the vLLM flags to run, chosen by what the user pays for, with the evidence.

Inputs: sim.parquet rows (schema.SIM) as a polars frame, stats.json as a dict
(or None when analysis did not run), the model geometry and GPU memory when
known (resolved at the CLI edge, advisor.kvmemory), and `RecommendOptions`.
Output: the recommendation.json dict (keys per the cross-stage contract).

Cost model (stated in the output's `cost_model`):
- What the user gets: prefill tokens served from the cache (`hit_tokens`), each
  one prefill token the GPU does not compute; at `prefill_tokens_per_s` that is
  the TTFT / GPU time saved.
- What the user pays: KV memory in GiB. A GiB is "worth it" when it buys at
  least `min_gain_per_gib` of hit rate (default 0.001 = 0.1 points per GiB),
  i.e. a price of `lambda = min_gain_per_gib x queries` prefill tokens per GiB.
- Each candidate scores `hit_tokens - lambda x GiB`; the recommendation is the
  best score within the GPU's KV memory. Maximising this is the same as walking
  each block size's curve while the next GiB still buys more than lambda
  tokens (marginal value, shown per candidate as `marginal_tokens_per_gib`),
  so a 0.3-point gain that needs 40 GiB more (0.0075 points/GiB) never wins.
- Without a model, memory is counted in cache tokens and priced at a reference
  geometry (Llama-3.1-8B, 128 KiB per token) for ranking only; GiB fields are
  null then and the flags pin blocks (`--num-gpu-blocks-override`).

Rows used: LRU (vLLM's policy); concurrent mode and the warm (steady-state)
window when sim.parquet has them, else sequential / cold; the reasoning says
which.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import polars as pl

from advisor import kvmemory as kv
from advisor.errors import AdvisorError
from advisor.schema import (
    MODE_CONCURRENT,
    MODE_SEQUENTIAL,
    POLICY_LRU,
    WINDOW_COLD,
    WINDOW_WARM,
)

BACKEND_BLOCK_MULTIPLE = {"cuda": 16, "cpu": 32}  # FlashAttention/Triton; vLLM CPU backend
REFERENCE_MODEL = "llama-3.1-8b"
MODEL_PLACEHOLDER = "<MODEL>"


@dataclass(frozen=True)
class RecommendOptions:
    model: str | None = None  # catalog name or local folder; None = memory in blocks only
    gpu: str | None = None  # catalog name or GiB
    gpu_memory_utilization: float = kv.VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
    headroom_gib: float | None = None  # None = kvmemory.DEFAULT_HEADROOM_GIB
    tensor_parallel_size: int = 1
    backend: str = "cuda"
    prefill_tokens_per_s: float = 10_000.0
    min_gain_per_gib: float = 0.001

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Point:
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
            "kv_gib": _round(self.kv_gib),
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


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def _pick_view(lru: pl.DataFrame) -> tuple[str, str]:
    finite = lru.filter(pl.col("num_blocks").is_not_null())
    have = set(zip(finite["mode"].to_list(), finite["window"].to_list()))
    for mode in (MODE_CONCURRENT, MODE_SEQUENTIAL):
        for window in (WINDOW_WARM, WINDOW_COLD):
            if (mode, window) in have:
                return mode, window
    raise AdvisorError(
        "sim.parquet has no finite-budget LRU rows to choose from: rerun `pc-advise simulate` "
        "with at least one memory budget (--num-blocks or --kv-cache-gib)."
    )


def recommend(
    sim: pl.DataFrame,
    stats: dict[str, Any] | None,
    options: RecommendOptions,
    *,
    geom: kv.ModelGeometry | None = None,
    gpu_gib: float | None = None,
    input_kind: str = "tokens",
) -> dict[str, Any]:
    """The recommendation.json dict for these simulation rows (module docstring)."""
    tp = options.tensor_parallel_size
    tps = options.prefill_tokens_per_s
    reasoning: list[str] = []
    constraints: list[str] = []
    flags_note: list[str] = []

    lru = sim.filter(pl.col("policy") == POLICY_LRU)
    if lru.height == 0:
        raise AdvisorError("sim.parquet has no lru rows: rerun `pc-advise simulate` (LRU is vLLM's policy).")
    mode, window = _pick_view(lru)
    view = lru.filter((pl.col("mode") == mode) & (pl.col("window") == window))
    reasoning.append(
        f"Read the {mode} simulation, {window} window ("
        + ("steady state after the warm-up; the cold figure counts the cache filling up" if window == WINDOW_WARM
           else "whole log, including the cache filling up")
        + ("; arrivals at logged times with running requests holding their blocks)" if mode == MODE_CONCURRENT
           else "; one request at a time, so memory for running requests is not modelled)")
    )

    # --- memory per block: the model's, or a reference geometry for ranking only ---
    ref = geom or kv.resolve_model(REFERENCE_MODEL)
    per_token = kv.bytes_per_token(ref, tp)
    has_gib = geom is not None or view["kv_gib"].drop_nulls().len() > 0
    if geom is None and not has_gib:
        flags_note.append(
            "no --model: memory is pinned in blocks; GiB are unknown (pass --model to get GiB "
            "and --gpu-memory-utilization)"
        )

    # --- allowed block sizes ---
    sizes = sorted(int(b) for b in view["block_size"].unique().to_list())
    allowed = list(sizes)
    hash_trace = input_kind == "hash_trace"
    if hash_trace:
        constraints.append(
            f"hash trace: the block size is fixed by the trace ({', '.join(map(str, sizes))} tokens per hash); "
            "only the memory budget is recommended"
        )
    else:
        mult = BACKEND_BLOCK_MULTIPLE.get(options.backend)
        if mult is None:
            raise AdvisorError(f"unknown --backend {options.backend!r}: use one of {', '.join(BACKEND_BLOCK_MULTIPLE)}.")
        why = ""
        if options.backend == "cuda" and geom is not None and geom.mla_latent_dim is not None:
            mult = 64  # vLLM 0.32's FlashMLA kernel pages hold 64 tokens (CUTLASS MLA on Blackwell: 128)
            why = " (MLA model: FlashMLA's page; on Blackwell's CUTLASS MLA use a multiple of 128)"
        dropped = [b for b in allowed if b % mult]
        allowed = [b for b in allowed if b % mult == 0]
        constraints.append(f"backend {options.backend}: --block-size must be a multiple of {mult}{why}"
                           + (f" (dropped {', '.join(map(str, dropped))})" if dropped else ""))
        if geom is not None and geom.forced_block_size:
            allowed = [b for b in allowed if b == geom.forced_block_size]
            constraints.append(f"{geom.name} is a hybrid model: vLLM forces --block-size {geom.forced_block_size}")
    if not allowed:
        raise AdvisorError(
            f"no simulated block size ({', '.join(map(str, sizes))}) is allowed by the {options.backend} backend: "
            f"rerun `pc-advise simulate` with block sizes that are multiples of "
            f"{BACKEND_BLOCK_MULTIPLE.get(options.backend)}."
        )

    # --- memory for running requests at the logged concurrency ---
    reserve: dict[int, int] = {}
    conc = lru.filter((pl.col("mode") == MODE_CONCURRENT) & pl.col("num_blocks").is_not_null())
    for b in allowed:
        rows = conc.filter(pl.col("block_size") == b)
        if rows.height:
            reserve[b] = int(rows["peak_blocks_in_use"].max())  # type: ignore[arg-type]
    if reserve:
        constraints.append(
            "running requests at the logged concurrency pin up to "
            + ", ".join(f"{n:,} blocks at B={b}" for b, n in sorted(reserve.items()))
            + "; smaller budgets would preempt or queue them and are not recommended"
        )
    else:
        constraints.append("no concurrent simulation: memory for running requests is not checked")

    # --- GPU budget ---
    gpu_kv_bytes: int | None = None
    if geom is not None and gpu_gib is not None:
        gpu_kv_bytes = kv.kv_bytes_for_gpu(geom, gpu_gib, options.gpu_memory_utilization, options.headroom_gib, tp)
        constraints.append(
            f"GPU: {gpu_gib:.1f} GiB x {options.gpu_memory_utilization:g} - {geom.weight_bytes / tp / kv.GIB:.1f} GiB "
            f"weights - {_headroom(options):.1f} GiB activation headroom = {gpu_kv_bytes / kv.GIB:.1f} GiB for KV per GPU"
        )
    elif gpu_gib is not None:
        flags_note.append("--gpu given without --model: weights unknown, so the GPU's KV budget is not checked")

    # --- candidates along each block size's curve ---
    price = options.min_gain_per_gib * _queries(view)
    ceilings = _ceilings(view)
    points: list[_Point] = []
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
            cost = kv_gib if kv_gib is not None else (nb + 1) * b * per_token / kv.GIB
            hits = int(r["hit_tokens"])
            marginal = (hits - prev_hits) / (cost - prev_cost) if cost > prev_cost else 0.0
            prev_cost, prev_hits = cost, hits
            fits = gpu_kv_bytes is None or (kv.blocks_for_kv_bytes(geom, b, gpu_kv_bytes, tp) >= nb if geom else True)
            points.append(_Point(
                block_size=b, num_blocks=nb, kv_gib=kv_gib, cost_gib=cost, requests=int(r["requests"]),
                queries=int(r["queries"]), hit_tokens=hits, hit_rate=float(r["hit_rate"]),
                ceiling_hit_rate=ceilings.get(b, float(r["ceiling_hit_rate"])), marginal=marginal,
                score=hits - price * cost, fits_gpu=fits,
            ))
    if preempting:
        constraints.append("budgets where the concurrent simulation preempted or refused requests are not "
                           "recommended: " + ", ".join(preempting))
    if not points:
        raise AdvisorError(
            "every simulated budget is smaller than what running requests pin at the logged concurrency: "
            "rerun `pc-advise simulate` with larger budgets (--kv-cache-gib / --num-blocks)."
        )

    def key(p: _Point) -> tuple[float, float, int]:
        return (p.score, -p.cost_gib, -abs(p.block_size - 16))

    fitting = [p for p in points if p.fits_gpu]
    if not fitting:
        flags_note.append(
            "every simulated budget exceeds the GPU's KV memory: rerun `pc-advise simulate` with --model and "
            "--gpu so the sweep includes the GPU's own budget; the smallest simulated budget is shown"
        )
        fitting = [min(points, key=lambda p: p.cost_gib)]
    best = max(fitting, key=key)
    runner = _runner_up(points, best, key)

    # --- offloading: the curve still pays past the GPU ---
    offload = None
    beyond = [p for p in points if p.block_size == best.block_size and not p.fits_gpu and p.score > best.score]
    if beyond and gpu_kv_bytes is not None:
        far = max(beyond, key=key)
        extra = max(0.0, (far.cost_gib - gpu_kv_bytes / kv.GIB) * tp)
        offload = {"gib": round(math.ceil(extra * 10) / 10, 1), "hit_rate": round(far.hit_rate, 6),
                   "block_size": far.block_size, "num_blocks": far.num_blocks}
        reasoning.append(
            f"The curve still pays past the GPU: {far.num_blocks:,} blocks would reach {far.hit_rate:.1%} "
            f"(+{(far.hit_rate - best.hit_rate) * 100:.1f} points, {far.marginal:,.0f} tokens/GiB at the margin); "
            f"vLLM 0.32's CPU KV offloading (--kv-offloading-size {offload['gib']} GiB, total over TP ranks, "
            "--kv-offloading-backend native) holds the rest. The simulator counts offloaded blocks like GPU "
            "blocks; a CPU hit still costs a transfer, so the real gain is somewhat lower."
        )

    where = {"policy": POLICY_LRU, "mode": mode, "window": window}
    rec = {**best.as_row(tps, has_gib), **where}
    flags, serve, mem_notes = _serve_flags(best, options, geom, gpu_gib, hash_trace, offload,
                                           concurrent=mode == MODE_CONCURRENT)
    reasoning.extend(mem_notes)
    reasoning.insert(0, _headline(best, price, has_gib, options, hash_trace))
    if runner is not None:
        reasoning.append(f"Runner-up B={runner.block_size}, {runner.num_blocks:,} blocks: {_why_lost(runner, best, price, has_gib)}.")
    if geom is None:
        reasoning.append(f"`{MODEL_PLACEHOLDER}` in the command is a placeholder: replace it with your model.")
    reasoning.extend(flags_note)

    fixes, fixes_note = _prompt_fixes(stats)
    reasoning.append(fixes_note)
    all_rows = sorted(points, key=lambda p: (p.block_size, p.num_blocks))
    ranked = sorted(points, key=key, reverse=True)
    rank = {id(p): i + 1 for i, p in enumerate(ranked)}  # by value (score), GPU fit aside
    return {
        "input_kind": input_kind,
        "view": where,
        "mode": mode,
        "model": geom.as_dict() if geom is not None else None,
        "gpu_gib": _round(gpu_gib),
        "gpu_kv_gib": _round(gpu_kv_bytes / kv.GIB if gpu_kv_bytes is not None else None),
        "recommended": rec,
        "runner_up": ({**runner.as_row(tps, has_gib), **where, "why_lost": _why_lost(runner, best, price, has_gib)}
                      if runner is not None else None),
        "flags": flags,
        "vllm_serve": serve,
        "reasoning": reasoning,
        "offload": offload,
        "prompt_fixes": fixes,
        "candidates": [{**p.as_row(tps, has_gib), **where, "score": round(p.score, 1), "rank": rank[id(p)]}
                       for p in all_rows],
        "constraints": constraints,
        "cost_model": {
            "value": "prefill tokens served from the prefix cache (vLLM prefix_cache_hits)",
            "memory_unit": "GiB of KV cache per GPU" if has_gib else
            f"GiB at a reference geometry ({REFERENCE_MODEL}, {per_token:,} B/token), for ranking only",
            "min_gain_per_gib": options.min_gain_per_gib,
            "price_tokens_per_gib": round(price, 1),
            "prefill_tokens_per_s": tps,
            "ttft_gain_s": "mean prefill seconds saved per request = hit_tokens / prefill_tokens_per_s / requests",
            "headroom_gib": _headroom(options) if geom is not None and gpu_gib is not None else None,
            "tensor_parallel_size": tp,
        },
    }


def _headroom(options: RecommendOptions) -> float:
    return kv.DEFAULT_HEADROOM_GIB if options.headroom_gib is None else options.headroom_gib


def _queries(view: pl.DataFrame) -> int:
    return int(view["queries"].max() or 0)  # type: ignore[arg-type]


def _ceilings(view: pl.DataFrame) -> dict[int, float]:
    rows = view.filter(pl.col("num_blocks").is_null())
    return {int(r["block_size"]): float(r["hit_rate"]) for r in rows.iter_rows(named=True)}


def _runner_up(points: list[_Point], best: _Point, key: Any) -> _Point | None:
    others = [p for p in points if p.block_size != best.block_size and p.fits_gpu]
    if not others:
        others = [p for p in points if p is not best]
    return max(others, key=key) if others else None


def _headline(best: _Point, price: float, has_gib: bool, options: RecommendOptions, hash_trace: bool) -> str:
    mem = f"{best.kv_gib:.2f} GiB" if best.kv_gib is not None else f"{best.num_blocks * best.block_size:,} cached tokens"
    what = (f"Recommended KV memory (the trace fixes the granularity at {best.block_size} tokens, so no "
            f"--block-size is recommended): {best.num_blocks:,} trace blocks ({mem})" if hash_trace
            else f"Recommended --block-size {best.block_size} with {best.num_blocks:,} blocks ({mem})")
    return (
        f"{what}: predicted hit rate "
        f"{best.hit_rate:.1%} of a {best.ceiling_hit_rate:.1%} block ceiling, {best.hit_tokens:,} prefill tokens saved. "
        f"It is the best value once each GiB is priced at {price:,.0f} prefill tokens "
        f"({options.min_gain_per_gib * 100:g} points of hit rate per GiB)"
        + ("" if has_gib else " at the reference geometry")
        + "; budgets beyond it buy less than that per extra GiB."
    )


def _why_lost(r: _Point, best: _Point, price: float, has_gib: bool) -> str:
    unit = "GiB" if has_gib else "GiB (reference geometry)"
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


def _serve_flags(
    best: _Point, options: RecommendOptions, geom: kv.ModelGeometry | None, gpu_gib: float | None,
    hash_trace: bool, offload: dict[str, Any] | None, concurrent: bool,
) -> tuple[list[str], str, list[str]]:
    """The flags, the `vllm serve` line, and notes on how the memory flag was chosen."""
    tp = options.tensor_parallel_size
    notes: list[str] = []
    flags = ["--enable-prefix-caching"]  # the default in vLLM 0.32; stated so a config diff shows it
    if not hash_trace:
        flags.append(f"--block-size {best.block_size}")
    need = kv.kv_bytes_for_blocks(geom, best.block_size, best.num_blocks, tp) if geom is not None else None
    if geom is not None and gpu_gib is not None and need is not None:
        util = kv.utilization_for_kv_bytes(geom, gpu_gib, need, options.headroom_gib, tp)
        util = min(options.gpu_memory_utilization, math.ceil(util * 100) / 100)
        if not concurrent:
            # Running requests were not simulated: do not shrink the pool below what vLLM would take.
            notes.append(
                f"The prefix cache needs {need / kv.GIB:.2f} GiB per GPU (--gpu-memory-utilization {util:.2f} "
                f"would give it); the flag keeps {options.gpu_memory_utilization:.2f} because the sequential "
                "simulation does not size the memory running requests need. To pin the cache exactly, use "
                f"--kv-cache-memory-bytes {need}."
            )
            util = options.gpu_memory_utilization
        else:
            notes.append(f"--gpu-memory-utilization {util:.2f} gives the KV cache {need / kv.GIB:.2f} GiB per GPU "
                         f"(or pin it exactly with --kv-cache-memory-bytes {need}). That is the least memory "
                         "that buys this hit rate at the logged load; on a GPU that serves nothing else, "
                         f"{options.gpu_memory_utilization:.2f} costs nothing and leaves room for bursts.")
        flags.append(f"--gpu-memory-utilization {util:.2f}")
    elif need is not None:
        flags.append(f"--kv-cache-memory-bytes {need}")
    elif not hash_trace:
        flags.append(f"--num-gpu-blocks-override {best.num_blocks + 1}")  # vLLM counts the null block
    else:
        blocks16 = -(-best.num_blocks * best.block_size // 16)
        flags.append(f"--num-gpu-blocks-override {blocks16 + 1}")
        notes.append(f"The trace's {best.num_blocks:,} blocks of {best.block_size} tokens are "
                     f"{blocks16:,} blocks at vLLM's default --block-size 16 (plus the null block).")
    if tp > 1:
        flags.append(f"--tensor-parallel-size {tp}")
    if offload is not None:
        flags.append(f"--kv-offloading-size {offload['gib']}")
        flags.append("--kv-offloading-backend native")
    if geom is not None and geom.serve_name:
        model = geom.serve_name
    else:
        model = options.model or MODEL_PLACEHOLDER
    return flags, " ".join(["vllm serve", model, *flags]), notes


def _prompt_fixes(stats: dict[str, Any] | None) -> tuple[list[dict[str, Any]], str]:
    if stats is None:
        return [], ("No stats.json (the analyze stage did not run), so no prompt fixes are suggested; "
                    "run `pc-advise analyze RUN_DIR` to find what breaks reuse.")
    fixes = []
    for br in stats.get("breakers") or []:
        gain = float(br.get("rate_lost") or 0.0)
        fixes.append({
            "breaker": br.get("label", "unknown"),
            "hit_rate_gain": round(gain, 6),
            "description": br.get("description", ""),
            "position_token": br.get("position_token"),
            "requests_affected": br.get("requests_affected"),
            "tokens_lost": br.get("tokens_lost"),
        })
    fixes.sort(key=lambda f: -f["hit_rate_gain"])
    if not fixes:
        return [], "The analysis found no cache breakers: the prompts already share what they can."
    top = fixes[0]
    return fixes, (f"Top prompt fix: {top['breaker']} (up to +{top['hit_rate_gain'] * 100:.1f} points of hit rate, "
                   "token-granular estimate from the analysis; the block-level gain is at most that).")
