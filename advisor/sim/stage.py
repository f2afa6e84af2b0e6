"""The simulate stage: requests + tokens -> sim.parquet + sim_requests.parquet + replicas.parquet
+ offload.parquet.

`run_simulate` reads the workload, runs the grid of `SimulateOptions` (advisor.sim.grid) and
writes the tables (replicas.parquet empty unless `replicas` lists a count above 1,
offload.parquet unless `offload_gib` lists sizes); skipped when the inputs and options are
unchanged. The block streams it hashes are kept in the run folder's blocks/ and read back by a
later run on the same tokens (advisor.sim.blockstreams), whatever its other options.
"""

from __future__ import annotations

from pathlib import Path

from advisor.executor import ExecutorOptions
from advisor.runfolder import (
    NO_PROGRESS,
    OFFLOAD,
    REPLICAS,
    REQUESTS,
    SIM,
    SIM_REQUESTS,
    TOKENS,
    Progress,
    RunDir,
    StageOutcome,
)
from advisor.sim.blockstreams import BLOCKS
from advisor.sim.configuration import SimulateOptions
from advisor.sim.grid import count_configs, simulate_run


def run_simulate(
    run_dir: str | Path, options: SimulateOptions | None = None, *, force: bool = False,
    progress: Progress = NO_PROGRESS, executor: ExecutorOptions | None = None,
) -> StageOutcome:
    """The simulate stage on `run_dir` (the grid: block sizes x budgets x policies x modes).
    `executor`: where the block hashing's shards run (None: this machine's cores); it changes
    no result, so it is not part of the fingerprint."""
    options = options or SimulateOptions()
    run = RunDir(Path(run_dir))

    def body(r: RunDir) -> dict:
        with progress.task("simulate", count_configs(options)) as advance:
            return simulate_run(r.require(REQUESTS), r.require(TOKENS), r.path(SIM), r.path(SIM_REQUESTS),
                                options, advance, r.path(REPLICAS), r.path(OFFLOAD), r.path(BLOCKS), executor)

    return run.run_stage("simulate", [run.require(REQUESTS), run.require(TOKENS)], options.as_dict(),
                         [SIM, SIM_REQUESTS, REPLICAS, OFFLOAD], body, force=force)
