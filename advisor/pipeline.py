"""The pipeline: every stage in order over one run folder (`advisor.run`).

Each stage is a library function `run_<stage>(run_dir, options, ...) -> StageOutcome` in its
own package; runfolder.STAGES declares what each reads and writes, and `STAGE_FUNCTIONS`
binds the names to those functions. `run` chains them; each one is skipped when its inputs
and options are unchanged since the last run (manifest.json).

Options are passed flat, by the field names of the stages' options dataclasses; a name shared
by several stages reaches all of them (`model` and `gpu` size both the simulation and the
recommendation; `speedup` is the clock of both the simulation and the concurrent replay).
`executor` (an `advisor.executor.ExecutorOptions`) says where ingest, tokenize and simulate run
their pieces: this machine (None, the default) or Ray (docs/scale.md); it changes no output,
so no stage reruns when only it changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from advisor.analyze.stage import AnalyzeOptions, run_analyze
from advisor.errors import AdvisorError
from advisor.executor import (
    EXECUTOR_LOCAL,
    Executor,
    ExecutorOptions,
    ProcessExecutor,
    remote_executor,
)
from advisor.ingest.sources import resolve_inputs
from advisor.ingest.stage import IngestOptions, run_ingest
from advisor.recommend.options import RecommendOptions
from advisor.recommend.stage import run_recommend
from advisor.replay.stage import ReplayOptions, run_replay
from advisor.report.stage import ReportOptions, run_report
from advisor.runfolder import (
    DEFAULT_CACHE_DIR,
    NO_PROGRESS,
    REPORT_HTML,
    REPORT_MD,
    STAGES,
    TOKENS,
    Progress,
    StageOutcome,
)
from advisor.sim.configuration import SimulateOptions
from advisor.sim.stage import run_simulate
from advisor.tokens.stage import TokenizeOptions, run_tokenize, warm_up, warm_up_for

STAGE_FUNCTIONS: dict[str, Callable[..., StageOutcome]] = {
    "ingest": run_ingest, "tokenize": run_tokenize, "analyze": run_analyze,
    "simulate": run_simulate, "recommend": run_recommend, "replay": run_replay, "report": run_report,
}
STAGE_OPTIONS: dict[str, type] = {
    "ingest": IngestOptions, "tokenize": TokenizeOptions, "analyze": AnalyzeOptions,
    "simulate": SimulateOptions, "recommend": RecommendOptions, "replay": ReplayOptions,
    "report": ReportOptions,
}
assert [s.name for s in STAGES] == list(STAGE_FUNCTIONS) == list(STAGE_OPTIONS)


@dataclass(frozen=True)
class RunResult:
    """What `run` did: the run folder and each stage's outcome, in pipeline order."""

    run_dir: Path
    stages: Mapping[str, StageOutcome]

    @property
    def report_html(self) -> Path:
        return self.run_dir / REPORT_HTML

    @property
    def report_md(self) -> Path:
        return self.run_dir / REPORT_MD


def default_out_dir(log: str | Path) -> Path:
    """./pc-advise-out/<input name without .jsonl/.gz/.zst>/ ('stdin' for '-')."""
    if str(log) == "-":
        return Path("pc-advise-out") / "stdin"
    name = Path(log).name
    if any(c in name for c in "*?["):  # a glob: name the run after its folder
        name = Path(log).parent.name or "glob"
    for suffix in (".zst", ".gz", ".jsonl", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return Path("pc-advise-out") / (name or "log")


def option_names() -> dict[str, list[str]]:
    """Every option `run` takes, with the stages it reaches."""
    names: dict[str, list[str]] = {}
    for stage, cls in STAGE_OPTIONS.items():
        for f in dataclasses.fields(cls):
            if f.init:
                names.setdefault(f.name, []).append(stage)
    return names


def stage_options(**options: Any) -> dict[str, Any]:
    """Flat options -> one options object per stage (each with its own defaults)."""
    known = option_names()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    out = {}
    for stage, cls in STAGE_OPTIONS.items():
        mine = {f.name for f in dataclasses.fields(cls) if f.init}
        out[stage] = cls(**{k: v for k, v in options.items() if k in mine})
    return out


WARM_LOG_BYTES = 32 << 20  # from this size on, tokenize's worker processes start during ingest


@contextlib.contextmanager
def _tokenize_workers(log: str | Path, run_dir: Path, executor: ExecutorOptions | None,
                      options: TokenizeOptions, force: bool, cache_dir: Path) -> Iterator[Executor | None]:
    """Tokenize's local worker processes, started before ingest and loading the tokenizer while
    ingest reads the log (seconds per process), when tokenize will want them: a log of
    `WARM_LOG_BYTES` or more, more than one worker, no Ray, and no tokens.parquet to keep. Else
    None: tokenize opens its own (or none, for a small log)."""
    workers = options.workers or os.cpu_count() or 1
    size = _log_bytes(log)
    if ((executor is not None and executor.kind != EXECUTOR_LOCAL) or workers <= 1 or size < WARM_LOG_BYTES
            or (not force and (run_dir / TOKENS).exists())):
        yield None
        return
    with ProcessExecutor(workers) as pool:
        pool.prestart(warm_up, warm_up_for(options, cache_dir))
        yield pool


def _log_bytes(log: str | Path) -> int:
    """The size on disk of the files ingest will read (`resolve_inputs`: a file, a folder's or a
    glob's files); 0 for stdin or what cannot be read (ingest names that problem, not this guess)."""
    try:
        return sum(i.path.stat().st_size for i in resolve_inputs(str(log)) if i.path is not None)
    except (AdvisorError, OSError):
        return 0


def run(
    log: str | Path,
    out: str | Path | None = None,
    *,
    force: bool = False,
    progress: Progress = NO_PROGRESS,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    stdin: BinaryIO | None = None,
    api_key: str | None = None,
    on_stage: Callable[[StageOutcome], None] = lambda outcome: None,
    warn: Callable[[str], None] = lambda message: None,
    executor: ExecutorOptions | None = None,
    **options: Any,
) -> RunResult:
    """Run every stage on `log` into `out` (default ./pc-advise-out/<log name>/).

    `options` are the stages' options by name (see `option_names()`); `on_stage` is called
    with each stage's outcome as it finishes; `executor`: where ingest, tokenize and simulate
    run their pieces (None: here; Ray: one Ray, started or joined, for all three). Raises
    AdvisorError for what a user can fix.
    """
    opts = stage_options(**options)
    run_dir = Path(out) if out is not None else default_out_dir(log)
    done: dict[str, StageOutcome] = {}

    def record(outcome: StageOutcome) -> None:
        done[outcome.stage] = outcome
        on_stage(outcome)
        release_free_memory()

    with remote_executor(executor):  # one Ray for the stages that use it
        with _tokenize_workers(log, run_dir, executor, opts["tokenize"], force, cache_dir) as workers:
            record(run_ingest(run_dir, log, opts["ingest"], force=force, stdin=stdin, executor=executor))
            record(run_tokenize(run_dir, opts["tokenize"], force=force, progress=progress, cache_dir=cache_dir,
                                executor=workers or executor))
        # analyze and simulate read the same inputs and neither reads the other's outputs: analyze
        # (mostly one core) runs on a thread beside simulate (whose compiled runs release the
        # GIL); their outcomes are recorded in stage order.
        with ThreadPoolExecutor(1, thread_name_prefix="pc-advise-analyze") as beside:
            analyzed = beside.submit(run_analyze, run_dir, opts["analyze"], force=force, cache_dir=cache_dir)
            try:
                simulated = run_simulate(run_dir, opts["simulate"], force=force, progress=progress,
                                         executor=executor)
            finally:
                wait([analyzed])  # never leave the thread writing into the run folder
            record(analyzed.result())
        record(simulated)
    record(run_recommend(run_dir, opts["recommend"], force=force))
    record(run_replay(run_dir, opts["replay"], force=force, progress=progress, cache_dir=cache_dir,
                      api_key=api_key, warn=warn))
    record(run_report(run_dir, opts["report"], force=force))
    return RunResult(run_dir, done)


def release_free_memory() -> None:
    """Give memory a finished stage freed back to the system before the next one starts.

    The stages of `run` share one process, and freed memory otherwise stays with its allocator:
    after ingest on a 200 MiB log, Arrow's pool and the C heap kept 0.34 GiB of a 0.56 GiB
    process, through tokenize, whose worker processes peak beside it. Arrow's pool releases
    what it holds unused; glibc's `malloc_trim` returns free heap pages (skipped where the C
    library has none). Nothing a stage holds is touched.
    """
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc_with_malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc_with_malloc_trim()
