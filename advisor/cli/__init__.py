"""Command line: parse options, call one library function per stage, report.

`pc-advise LOGS` is `pc-advise run LOGS`. Every stage is also its own command
taking the run folder, so a later stage can rerun alone. Option sets live in
`options.py`; what each stage is given and what it prints in `stages.py`; terminal
output in `console.py`. Every command calls the library (`advisor.pipeline.run`, or one
`run_<stage>`) and nothing else.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from advisor import pipeline
from advisor.analyze.stage import run_analyze
from advisor.cli.console import Console
from advisor.cli.console import fail as _fail
from advisor.cli.options import (
    analyze_options,
    common_options,
    executor_options,
    ingest_options,
    recommend_model_options,
    recommend_options,
    replay_options,
    report_options,
    simulate_options,
    tokenize_options,
)
from advisor.cli.stages import (
    BarProgress,
    api_key,
    cache_dir,
    executor_for,
    options_for,
    print_outcome,
    set_tokenizer_threads,
    stage_kwargs,
)
from advisor.cli.summary import render_table, summary_rows
from advisor.errors import AdvisorError
from advisor.executor import end_without_final_collection, remote_executor
from advisor.ingest.stage import run_ingest
from advisor.recommend.stage import run_recommend
from advisor.replay.stage import run_replay
from advisor.report.stage import run_report
from advisor.runfolder import RunDir
from advisor.sim.routing import ROUTERS
from advisor.sim.stage import run_simulate
from advisor.tokens.stage import run_tokenize
from advisor.version import __version__


class DefaultRunGroup(click.Group):
    """A group where an unknown first argument means `run` (pc-advise LOGS)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            if not args[0].startswith("-") or args[0] == "-":
                args = ["run", *args]
        return super().parse_args(ctx, args)


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
    # transformers advises at import that PyTorch is absent: true, and irrelevant to tokenizing.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _name_main_as_the_package()


def console() -> None:
    """The `pc-advise` console script and `python -m advisor`: the CLI, in a process that
    ends when it returns (`end_without_final_collection`). Tests call `main` instead."""
    end_without_final_collection()
    main()


def _name_main_as_the_package() -> None:
    """Give the `pc-advise` console script the module name `python -m advisor` runs under.

    A worker process started by spawn (tokenize's row batches, simulate's block hashing) first
    re-runs the parent's `__main__` from its file path, unless that module has a package
    `__main__` name; the console script has none, so every worker imported the whole CLI, every
    stage's dependencies with it (measured: 2.5 s of a worker's start-up on the 2-core machine).
    Named `advisor.__main__`, which multiprocessing does not re-import, a worker imports only
    what its pieces need. Scripts that call `advisor.run` keep their own `__main__` untouched.
    """
    script = sys.modules.get("__main__")
    if script is not None and getattr(script, "__spec__", None) is None \
            and Path(sys.argv[0]).name == "pc-advise":
        script.__spec__ = importlib.util.find_spec("advisor.__main__")


def _stage_command(body: Callable[[Console], None], quiet: bool, as_json: bool) -> None:
    """One stage command: run it, turn a user-fixable error into its message and exit code."""
    con = Console(quiet, as_json)
    try:
        body(con)
    except AdvisorError as e:
        _fail(e)
    con.finish()


def log_arguments(f: Callable[..., Any]) -> Callable[..., Any]:
    """LOG and -o/--out: the commands that start from a log (`run`, `ingest`)."""
    f = click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
                     help="Run folder (default ./pc-advise-out/<log name>/).")(f)
    return click.argument("log")(f)


# --- commands ---
@main.command()
@log_arguments
@executor_options
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
    """Run the whole pipeline on LOG: a JSONL log, a vLLM server log, a Parquet or CSV table
    (plain, .gz or .zst), a folder or quoted glob of them, or - for stdin (docs/formats.md).

    \b
    Example:
      pc-advise run sample_logs/rag_documents.jsonl -o out/rag
    """
    rundir = RunDir(out or pipeline.default_out_dir(log))

    def whole(con: Console) -> None:
        con.result["run_dir"] = str(rundir.root)
        set_tokenizer_threads(opts)
        pipeline.run(
            log, rundir.root, force=force, progress=BarProgress(con.quiet), cache_dir=cache_dir(),
            stdin=sys.stdin.buffer if log == "-" else None, api_key=api_key(opts),
            on_stage=lambda outcome: print_outcome(con, rundir, outcome), warn=con.say,
            executor=executor_for(opts), **stage_kwargs(opts),
        )
        rows = summary_rows(rundir)
        con.say("\nSummary")
        con.say(render_table(rows))
        con.result["summary"] = dict(rows)

    _stage_command(whole, quiet, as_json)


@main.command()
@log_arguments
@ingest_options
@executor_options
@common_options
def ingest(log: str, out: Path | None, quiet: bool, as_json: bool, force: bool, **opts: Any) -> None:
    """Read LOG into requests.parquet; bad lines go to rejects.jsonl with a reason.

    LOG is a JSONL log (OpenAI, Anthropic, LiteLLM, Langfuse, OTLP JSON, block-hash trace), a
    vLLM server log, a Parquet or CSV table, a folder or quoted glob of them, or - for stdin.

    \b
    Example:
      pc-advise ingest logs.jsonl.gz -o out/
      cat logs.jsonl | pc-advise ingest - -o out/
      pc-advise ingest vllm-server.log --log-year 2026 -o out/
      pc-advise ingest 'exports/*.parquet' --columns body=request_json,timestamp=ts -o out/
      pc-advise ingest 'logs/day-*.jsonl.zst' --executor ray -o out/
    """
    rundir = RunDir(out or pipeline.default_out_dir(log))
    stdin = sys.stdin.buffer if log == "-" else None

    def body(con: Console) -> None:
        executor = executor_for(opts)
        with remote_executor(executor):
            print_outcome(con, rundir, run_ingest(rundir.root, log, options_for("ingest", opts), force=force,
                                                  stdin=stdin, executor=executor))

    _stage_command(body, quiet, as_json)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@tokenize_options
@executor_options
@common_options
def tokenize(run_dir: Path, quiet: bool, as_json: bool, force: bool, **opts: Any) -> None:
    """Render and tokenize the requests of RUN_DIR into tokens.parquet.

    \b
    Example:
      pc-advise tokenize pc-advise-out/multiturn_chat --tokenizer ./my-tokenizer
    """
    def body(con: Console) -> None:
        set_tokenizer_threads(opts)
        executor = executor_for(opts)
        with remote_executor(executor):
            print_outcome(con, RunDir(run_dir), run_tokenize(
                run_dir, options_for("tokenize", opts), force=force, progress=BarProgress(con.quiet),
                cache_dir=cache_dir(), executor=executor))

    _stage_command(body, quiet, as_json)


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
    _stage_command(lambda con: print_outcome(con, RunDir(run_dir), run_analyze(
        run_dir, options_for("analyze", opts), force=force, cache_dir=cache_dir())), quiet, as_json)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@simulate_options
@executor_options
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
      pc-advise simulate out/ --executor ray --ray-address auto
    """
    def body(con: Console) -> None:
        executor = executor_for(opts)
        with remote_executor(executor):
            print_outcome(con, RunDir(run_dir), run_simulate(
                run_dir, options_for("simulate", opts), force=force, progress=BarProgress(con.quiet),
                executor=executor))

    _stage_command(body, quiet, as_json)

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
    _stage_command(lambda con: print_outcome(con, RunDir(run_dir), run_recommend(
        run_dir, options_for("recommend", opts), force=force)), quiet, as_json)


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
@click.option("--measure-time", is_flag=True, default=False,
              help="Also time the replay on this machine's wall clock: the log as it is with prefix caching "
              "on and off, with sharing removed (a cache salt per request), and with analyze's cache breakers "
              "fixed; TTFT, end-to-end latency, throughput and vLLM's counters go to replay.json's time "
              "section. On a CPU with the tiny model it measures the mechanism, on a GPU the real thing "
              "(--replay-model random:<catalog model> builds the real architecture with random weights).")
@click.option("--time-arrivals", type=click.Choice(["burst", "paced"]), default=None,
              help="Concurrent mode of --measure-time: burst (every request due at the start, so the engine is "
              "loaded and the wall time is its capacity) or paced (logged offsets / --time-speedup on the wall "
              "clock) [default: burst].")
@click.option("--time-speedup", type=float, default=None,
              help="--time-arrivals paced: divide logged arrival offsets by this [default: --speedup's].")
@click.option("--replicas", "replay_replicas", type=click.IntRange(min=1), default=None,
              help="Replay through this many engines, each request on the replica --router sent it to in the "
              "simulator (sequential mode, per replica to the token) [default: 1, or one per --replay-url URL].")
@click.option("--router", "replay_router", type=click.Choice(ROUTERS), default=None,
              help="The router of a --replicas replay [default: recommendation.json's at that replica count].")
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
      pc-advise replay out/ --replicas 2 --router session --check 0
      pc-advise replay out/ --replay-url http://10.0.0.1:8000,http://10.0.0.2:8000 --router prefix-hash
      pc-advise replay out/ --measure-time --replay-mode both
      pc-advise replay out/ --measure-time --replay-model random:llama-3.2-1b
    """
    def body(con: Console) -> None:
        rundir = RunDir(run_dir)
        outcome = run_replay(run_dir, options_for("replay", {**opts, "replay": True}), force=force,
                             progress=BarProgress(con.quiet), cache_dir=cache_dir(),
                             api_key=api_key(opts), warn=con.say)
        print_outcome(con, rundir, outcome)
        con.result["replay"] = dict(outcome.counts)

    _stage_command(body, quiet, as_json)

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
    _stage_command(lambda con: print_outcome(con, RunDir(run_dir), run_report(
        run_dir, options_for("report", opts), force=force)), quiet, as_json)
