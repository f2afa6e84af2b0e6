"""pc-advise: workload analysis and tuning advisor for vLLM prefix caching.

The Python API (docs/api.md): `run` runs the whole pipeline on a log into a run folder;
each stage is also a function over a run folder, `run_<stage>(run_dir, options)`, with
its options dataclass. The command line (`pc-advise`) is a thin layer over these.

The names below are imported on first use: a worker process that imports one stage's
module (tokenize's row batches, simulate's hash shards) then loads that stage alone, not
every stage's dependencies (matplotlib, polars, numba's kernels): about 1 s and 0.1 GiB
less in each worker.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from advisor.version import __version__

# name -> the module that defines it
_WHERE = {
    "AnalyzeOptions": "advisor.analyze.stage", "run_analyze": "advisor.analyze.stage",
    "AdvisorError": "advisor.errors", "InputRefused": "advisor.errors", "MissingStage": "advisor.errors",
    "ExecutorOptions": "advisor.executor",
    "IngestOptions": "advisor.ingest.stage", "run_ingest": "advisor.ingest.stage",
    "RunResult": "advisor.pipeline", "option_names": "advisor.pipeline", "run": "advisor.pipeline",
    "RecommendOptions": "advisor.recommend.options", "run_recommend": "advisor.recommend.stage",
    "ReplayOptions": "advisor.replay.stage", "run_replay": "advisor.replay.stage",
    "ReportOptions": "advisor.report.stage", "run_report": "advisor.report.stage",
    "Progress": "advisor.runfolder", "RunDir": "advisor.runfolder", "StageOutcome": "advisor.runfolder",
    "SimulateOptions": "advisor.sim.configuration", "run_simulate": "advisor.sim.stage",
    "TokenizeOptions": "advisor.tokens.stage", "run_tokenize": "advisor.tokens.stage",
    "Workload": "advisor.workload", "load_workload": "advisor.workload",
}

__all__ = [  # the names of _WHERE and the version (a test holds them equal)
    "AdvisorError", "AnalyzeOptions", "ExecutorOptions", "IngestOptions", "InputRefused", "MissingStage",
    "Progress", "RecommendOptions", "ReplayOptions", "ReportOptions", "RunDir", "RunResult", "SimulateOptions",
    "StageOutcome", "TokenizeOptions", "Workload", "__version__", "load_workload", "option_names",
    "run", "run_analyze", "run_ingest", "run_recommend", "run_replay", "run_report", "run_simulate",
    "run_tokenize",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'advisor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from advisor.analyze.stage import AnalyzeOptions, run_analyze
    from advisor.errors import AdvisorError, InputRefused, MissingStage
    from advisor.executor import ExecutorOptions
    from advisor.ingest.stage import IngestOptions, run_ingest
    from advisor.pipeline import RunResult, option_names, run
    from advisor.recommend.options import RecommendOptions
    from advisor.recommend.stage import run_recommend
    from advisor.replay.stage import ReplayOptions, run_replay
    from advisor.report.stage import ReportOptions, run_report
    from advisor.runfolder import Progress, RunDir, StageOutcome
    from advisor.sim.configuration import SimulateOptions
    from advisor.sim.stage import run_simulate
    from advisor.tokens.stage import TokenizeOptions, run_tokenize
    from advisor.workload import Workload, load_workload
