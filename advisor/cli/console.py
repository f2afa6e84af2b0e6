"""Terminal output: stage lines on stderr (silent with -q), a JSON summary with --json."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from advisor.errors import AdvisorError
from advisor.runfolder import StageOutcome


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


def fail(err: AdvisorError) -> None:
    click.echo(f"Error: {err}", err=True)
    sys.exit(err.exit_code)
