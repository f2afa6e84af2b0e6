"""Stage bookkeeping shared by every command: skip when fresh, time, record.

A stage is a function `(RunDir) -> counts` that reads its inputs from the run
folder and writes its outputs there. `run_stage` fingerprints the inputs and
options, skips the stage when the manifest says it already ran on exactly
these, and otherwise runs it and records the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.runfolder import RunDir, StageTimer


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    skipped: bool
    wall_s: float
    counts: Mapping[str, Any] = field(default_factory=dict)


def run_stage(
    run: RunDir,
    stage: str,
    inputs: list[Path],
    options: Mapping[str, Any],
    outputs: list[str],
    body: Callable[[RunDir], Mapping[str, Any]],
    force: bool = False,
    fingerprintable: bool = True,
) -> StageOutcome:
    """Run `body` unless its inputs and options are unchanged since the last run.

    `fingerprintable=False` (stdin input) always runs: there is nothing to hash up front.
    """
    key, sums = run.fingerprint(stage, inputs, options) if fingerprintable else ("", {})
    if fingerprintable and not force and run.is_fresh(stage, key, outputs):
        prev = run.manifest()["stages"][stage]
        return StageOutcome(stage, True, 0.0, prev.get("counts", {}))
    with StageTimer() as t:
        counts = body(run)
    run.record(stage, key, sums, options, t.elapsed, counts)
    return StageOutcome(stage, False, t.elapsed, counts)
