"""Recommend: the vLLM flags to run, chosen by what the user pays for, with the evidence.

Inputs: sim.parquet rows (schema.SIM) as a polars frame, stats.json as a dict
(or None when analysis did not run), the model geometry and GPU memory when
known (resolved at the CLI edge, advisor.kvmemory), and `RecommendOptions`.
Output: the recommendation.json dict (keys per the cross-stage contract).

Cost model (stated in the output's `cost_model`):
- What the user gets: prefill GPU time saved, when simulate ran concurrent mode with
  its caching-off baseline (the clock's `prefill_s`: caching off's minus the
  configuration's, whole log; advisor.recommend.rank `Pricing.value`); else prefill
  tokens served from the cache (`hit_tokens`), each one prefill token the GPU does not
  compute. The price of a GiB is then in seconds (`min_gain_per_gib` of the log's
  no-cache prefill time) or tokens (of its queries).
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
window when sim.parquet has them, else sequential / cold (advisor.recommend.view,
the same choice the report shows); the reasoning says which.

The steps live beside this module: view (rows), constraints (block sizes, running
requests), rank (pricing, candidates, best and runner-up), serve (GPU budget, flags),
offload (what vLLM's CPU offload tier buys at the recommended GPU budget, from offload.parquet,
and its size), fixes (prompt fixes), groups (reuse groups the recommended budget cannot keep, from
clusters.parquet), timing (what caching buys in time at the
recommended configuration: TTFT and throughput with caching on and off).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from advisor import kvmemory as kv
from advisor.kvlayout import kv_layout
from advisor.recommend.constraints import allowed_block_sizes, running_reserve
from advisor.recommend.deploy import RouterSettings
from advisor.recommend.fixes import Rewrites, price_fixes, prompt_fixes
from advisor.recommend.groups import reuse_group_advice
from advisor.recommend.offload import offload_advice
from advisor.recommend.options import RecommendOptions, resolve_options
from advisor.recommend.rank import (
    candidate_rows,
    candidates,
    choose,
    cost_model,
    headline,
    pricing,
    round_or_none,
    why_lost,
)
from advisor.recommend.replicas import recommend_replicas
from advisor.recommend.serve import (
    MODEL_PLACEHOLDER,
    gpu_kv_budget,
    headroom,
    serve_flags,
)
from advisor.recommend.timing import caching_time, simulate_options_from_record
from advisor.recommend.traces import StoredTrace
from advisor.recommend.view import describe, select_view
from advisor.runfolder import (
    CLUSTERS,
    OFFLOAD,
    PREFIXES,
    RECOMMENDATION,
    REPLICAS,
    REQUESTS,
    SIM,
    STATS,
    TOKENS,
    RunDir,
    StageOutcome,
    write_json,
)
from advisor.schema import MODE_CONCURRENT, POLICY_OFF
from advisor.sim.blockstreams import BLOCKS, StreamInputs, stored_streams
from advisor.workload import Workload, load_workload


def recommend(
    sim: pl.DataFrame,
    stats: dict[str, Any] | None,
    options: RecommendOptions,
    *,
    geom: kv.ModelGeometry | None = None,
    gpu_gib: float | None = None,
    input_kind: str = "tokens",
    longest_request: int | None = None,
    offload_rows: pl.DataFrame | None = None,
) -> dict[str, Any]:
    """The recommendation.json dict for these simulation rows (module docstring);
    `longest_request`: the log's longest prompt + reply, which sets --max-model-len."""
    options = resolve_options(options, {})
    tp, tps = options.tensor_parallel_size, options.prefill_tokens_per_s
    hash_trace = input_kind == "hash_trace"
    layout = kv_layout(options.model, tp=tp) if geom is not None and options.model is not None else None
    if layout is not None and geom is not None:
        geom = layout.pool_geometry(geom)  # budgets in the hybrid pool's blocks (advisor.kvlayout)
    where, view, lru = select_view(sim)
    off = sim.filter((pl.col("policy") == POLICY_OFF) & (pl.col("mode") == where["mode"])
                     & (pl.col("window") == where["window"]) & pl.col("num_blocks").is_not_null())
    pr, notes = pricing(view, geom, tp, options.min_gain_per_gib, off)
    allowed, constraints = allowed_block_sizes(view, options.backend, geom, hash_trace, layout,
                                               options.vllm_version)
    reserve, reserve_line = running_reserve(lru, allowed)
    gpu_kv_bytes, gpu_lines, gpu_notes = gpu_kv_budget(options, geom, gpu_gib)
    points, preempting = candidates(view, allowed, reserve, pr, geom=geom, tp=tp, gpu_kv_bytes=gpu_kv_bytes)
    constraints += [reserve_line, *gpu_lines, *preempting]
    best, runner, fit_notes = choose(points)
    notes += [*gpu_notes, *fit_notes]
    offload, offload_lines = offload_advice(offload_rows, best, where["window"], points, gpu_kv_bytes, tp)
    flags, serve, memory_notes = serve_flags(best, options, geom, gpu_gib, hash_trace, offload,
                                             concurrent=where["mode"] == MODE_CONCURRENT,
                                             longest_request=longest_request, gpu_kv_bytes=gpu_kv_bytes,
                                             layout=layout)
    fixes, fixes_line = prompt_fixes(stats)

    reasoning = [headline(best, pr, hash_trace), describe(where), *offload_lines, *memory_notes]
    hybrid = layout.hybrid_note(geom, best.block_size, longest_request or 1) if layout and geom else None
    if hybrid:
        reasoning.append(hybrid)
    if runner is not None:
        reasoning.append(f"Runner-up B={runner.block_size}, {runner.num_blocks:,} blocks: "
                         f"{why_lost(runner, best, pr)}.")
    if geom is None:
        reasoning.append(f"`{MODEL_PLACEHOLDER}` in the command is a placeholder: replace it with your model.")
    reasoning += [*notes, fixes_line]
    return {
        "input_kind": input_kind,
        "view": where,
        "mode": where["mode"],
        "model": geom.as_dict() if geom is not None else None,
        "kv_layout": layout.as_dict(best.block_size) if layout is not None else None,
        "gpu_gib": round_or_none(gpu_gib),
        "gpu_kv_gib": round_or_none(gpu_kv_bytes / kv.GIB if gpu_kv_bytes is not None else None),
        "recommended": {**best.as_row(tps, pr.has_gib), **where},
        "runner_up": ({**runner.as_row(tps, pr.has_gib), **where, "why_lost": why_lost(runner, best, pr)}
                      if runner is not None else None),
        "vllm_version": options.vllm_version,  # the flags are for this version (advisor.vllm_versions)
        "flags": flags,
        "vllm_serve": serve,
        "reasoning": reasoning,
        "offload": offload,
        "prompt_fixes": fixes,
        "candidates": candidate_rows(points, where, tps, pr.has_gib),
        "constraints": constraints,
        "cost_model": cost_model(pr, tps, headroom(options) if geom is not None and gpu_gib is not None else None, tp),
    }


def _price_fixes(result: dict[str, Any], rewrites: Rewrites | None) -> None:
    """advisor.recommend.fixes.price_fixes at the recommended configuration: each prompt fix's
    hit-rate gain from the simulator, in place of the analysis' estimate."""
    if not result["prompt_fixes"] or rewrites is None:
        return
    best = result["recommended"]
    priced = price_fixes(result["prompt_fixes"], rewrites, int(best["block_size"]), best["num_blocks"])
    if priced is not None:
        result["prompt_fixes"], line = priced
        result["reasoning"] = [line if x.startswith("Top prompt fix:") else x for x in result["reasoning"]]


def _time_section(run: RunDir, sim: pl.DataFrame, result: dict[str, Any],
                  rewrites: Rewrites | None) -> dict[str, Any] | None:
    """advisor.recommend.timing at the recommended configuration, when simulate ran concurrent
    mode (the clock and the arrivals are its) and the run folder has the workload."""
    best = result["recommended"]
    if MODE_CONCURRENT not in set(sim["mode"].to_list()) or best["num_blocks"] is None:
        return None
    if rewrites is None:
        return None
    workload = rewrites.workload
    options = simulate_options_from_record(run.stage_options("simulate"))
    fixed, record = rewrites.applied() if not workload.is_hash_trace else (None, None)
    return caching_time(workload, int(best["block_size"]), int(best["num_blocks"]), options,
                        fixed=fixed, fixed_record=record, traces=rewrites.traces)


def _stored_trace(run: RunDir, workload: Workload) -> StoredTrace:
    """The log's block trace at a block size from simulate's persisted stream (None when the
    run folder has none current for it: the trace is then hashed from the ids)."""
    inputs = StreamInputs.of(workload, run.path(REQUESTS), run.path(TOKENS))
    return lambda bs: stored_streams(inputs, (bs,), run.path(BLOCKS)).get(bs)


def _replicas_section(run: RunDir, sim: pl.DataFrame, result: dict[str, Any], options: RecommendOptions,
                      geom: kv.ModelGeometry | None, gpu_gib: float | None, kind: str,
                      longest_request: int | None) -> dict[str, Any] | None:
    """advisor.recommend.replicas on replicas.parquet, when simulate ran replica counts above 1."""
    if not run.path(REPLICAS).exists():
        return None
    replicas = pl.read_parquet(run.path(REPLICAS))
    if replicas.is_empty():
        return None
    recorded = run.stage_options("simulate")
    routing = RouterSettings(int(recorded.get("prefix_hash_blocks") or 1), float(recorded.get("router_load_weight", 1.0)))
    models = (len({m or "" for m in pq.read_table(run.path(REQUESTS), columns=["model"])["model"].to_pylist()})
              if run.path(REQUESTS).exists() else 1)
    return recommend_replicas(replicas, result["recommended"], options, sim=sim, geom=geom, gpu_gib=gpu_gib,
                              hash_trace=kind == "hash_trace", longest_request=longest_request, routing=routing,
                              models=models)


def _reuse_groups(run: RunDir, stats: dict[str, Any] | None, result: dict[str, Any]) -> dict[str, Any] | None:
    """advisor.recommend.groups on clusters.parquet; its note joins the reasoning."""
    if not run.path(CLUSTERS).exists():
        return None
    block_tokens = int(((stats or {}).get("clusters") or {}).get("block_tokens")
                       or (stats or {}).get("analysis_block_size") or 16)
    advice = reuse_group_advice(pq.read_table(run.path(CLUSTERS)).to_pylist(), block_tokens, result["recommended"])
    if advice is not None and advice["note"]:
        result["reasoning"].append(advice["note"])
    return advice


def run_recommend(run_dir: str | Path, options: RecommendOptions | None = None, *,
                  force: bool = False) -> StageOutcome:
    """The recommend stage on `run_dir`: sim.parquet (+ stats.json) -> recommendation.json."""
    run = RunDir(Path(run_dir))
    sim_path = run.require(SIM)
    options = resolve_options(options or RecommendOptions(), run.stage_options("simulate"))
    inputs = [sim_path] + [p for p in (run.path(STATS), run.path(REQUESTS), run.path(TOKENS), run.path(PREFIXES),
                                       run.path(REPLICAS), run.path(OFFLOAD), run.path(CLUSTERS)) if p.exists()]

    def body(r: RunDir) -> dict[str, Any]:
        geom = kv.resolve_model(options.model) if options.model else None
        gpu_gib = kv.resolve_gpu(options.gpu) if options.gpu else None
        simulated = r.stage_counts("simulate")
        kind = simulated.get("input_kind", "tokens")
        stats = r.read_json(STATS) if r.path(STATS).exists() else None
        sim = pl.read_parquet(sim_path)
        offload_rows = pl.read_parquet(r.path(OFFLOAD)) if r.path(OFFLOAD).exists() else None
        result = recommend(sim, stats, options, geom=geom, gpu_gib=gpu_gib,
                           input_kind=kind, longest_request=simulated.get("longest_request_tokens"),
                           offload_rows=offload_rows)
        # the log and the analysis' prefixes, read once for the fixes' prices and the time section
        workload = (load_workload(r.path(REQUESTS), r.path(TOKENS))
                    if r.path(REQUESTS).exists() and r.path(TOKENS).exists() else None)
        prefixes = pq.read_table(r.path(PREFIXES)) if r.path(PREFIXES).exists() else None
        rewrites = Rewrites(workload, prefixes, stats, _stored_trace(r, workload)) if workload is not None else None
        _price_fixes(result, rewrites)
        result["time"] = _time_section(r, sim, result, rewrites)
        result["reuse_groups"] = _reuse_groups(r, stats, result)
        result["replicas"] = _replicas_section(r, sim, result, options, geom, gpu_gib, kind,
                                               simulated.get("longest_request_tokens"))
        write_json(r.path(RECOMMENDATION), result)
        best = result["recommended"]
        return {
            "block_size": best["block_size"], "num_blocks": best["num_blocks"],
            "kv_gib": best["kv_gib"], "hit_rate": best["hit_rate"],
            "ceiling_hit_rate": best["ceiling_hit_rate"], "vllm_serve": result["vllm_serve"],
            "mode": best.get("mode"), "window": best.get("window"),
            "replicas": result["replicas"]["reasoning"][0] if result["replicas"] else None,
        }

    return run.run_stage("recommend", inputs, options.as_dict(), [RECOMMENDATION], body, force=force)
