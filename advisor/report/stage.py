"""The report stage: report.html (self-contained) and report.md from whatever the run folder holds.

Inputs: any of manifest.json, rejects.jsonl, stats.json, prefixes.parquet, clusters.parquet,
requests.parquet, sim.parquet, sim_requests.parquet, recommendation.json, replay.json (a missing
one is named in the report with the command that writes it; no number is invented).
Outputs: report.html, report.md.

`run_report` is the stage function. Layout: `model` gathers one `ReportData`; `html.render` and `markdown.render` are pure
`ReportData -> str`; `plots` draws the inline SVG figures; `write_report` is the only writer.
"""


from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import advisor.runfolder as rf
from advisor.errors import MissingStage
from advisor.report import html as html_report
from advisor.report import markdown as md_report
from advisor.report.model import INPUTS, load
from advisor.runfolder import MANIFEST, REPORT_HTML, REPORT_MD, RunDir, StageOutcome


def input_paths(root: Path) -> list[Path]:
    """The artifacts present now (the stage's fingerprint covers exactly these)."""
    run = rf.RunDir(Path(root))
    return [run.path(n) for n in INPUTS if run.path(n).exists()]


def write_report(root: Path, redact: bool = False) -> dict[str, Any]:
    """Render both reports from the run folder and write them atomically; returns counts."""
    run = rf.RunDir(Path(root))
    if not input_paths(root):
        raise MissingStage(
            f"{run.root} holds no pc-advise artifacts: run `pc-advise run LOGS -o {run.root}` first."
        )
    data = load(run.root, redact=redact)
    page = html_report.render(data)
    doc = md_report.render(data)
    rf.write_text(run.path(rf.REPORT_HTML), page)
    rf.write_text(run.path(rf.REPORT_MD), doc)
    return {
        "html_bytes": len(page.encode()),
        "md_bytes": len(doc.encode()),
        "missing": sorted(data.missing),
        "redacted": redact,
    }


@dataclass(frozen=True)
class ReportOptions:
    redact: bool = False  # prompt text replaced by its length and a short hash; numbers unchanged


def run_report(run_dir: str | Path, options: ReportOptions | None = None, *, force: bool = False) -> StageOutcome:
    """The report stage on `run_dir`: skipped when the artifacts and options are unchanged."""
    redact = (options or ReportOptions()).redact
    run = RunDir(Path(run_dir))
    # manifest.json is left out of the fingerprint: recording this stage rewrites it.
    inputs = [p for p in input_paths(run.root) if p.name != MANIFEST]
    if not inputs:
        write_report(run.root, redact)  # raises MissingStage naming `pc-advise run`
    return run.run_stage("report", inputs, {"redact": redact}, [REPORT_HTML, REPORT_MD],
                         lambda r: write_report(r.root, redact), force=force)
