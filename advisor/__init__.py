"""pc-advise: workload analysis and tuning advisor for vLLM prefix caching.

The Python API (docs/api.md): `run` runs the whole pipeline on a log into a run folder;
each stage is also a function over a run folder, `run_<stage>(run_dir, options)`, with
its options dataclass. The command line (`pc-advise`) is a thin layer over these.
"""

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
from advisor.version import __version__
from advisor.workload import Workload, load_workload

__all__ = [
    "AdvisorError", "AnalyzeOptions", "ExecutorOptions", "IngestOptions", "InputRefused", "MissingStage",
    "Progress", "RecommendOptions", "ReplayOptions", "ReportOptions", "RunDir", "RunResult", "SimulateOptions",
    "StageOutcome", "TokenizeOptions", "Workload", "__version__", "load_workload", "option_names",
    "run", "run_analyze", "run_ingest", "run_recommend", "run_replay", "run_report", "run_simulate",
    "run_tokenize",
]
