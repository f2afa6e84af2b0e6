"""Regenerate docs/cli.md from the commands' own help: `python docs/gen_cli.py`.

tests/test_cli.py fails when docs/cli.md is out of date, so the reference cannot drift.
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from advisor.cli import main

ORDER = ("run", "ingest", "tokenize", "analyze", "simulate", "recommend", "replay", "report")


def render() -> str:
    runner = CliRunner()
    parts = [
        "# Command reference\n",
        "Generated from each command's `--help` by `python docs/gen_cli.py`; do not edit by hand.\n",
        "`pc-advise LOGS ...` is short for `pc-advise run LOGS ...`. Every stage command except "
        "`ingest` and `run` takes a run folder written by the stages before it.\n",
    ]
    names = [n for n in ORDER if n in main.commands] + sorted(set(main.commands) - set(ORDER))
    for name in names:
        out = runner.invoke(main, [name, "--help"], prog_name="pc-advise", terminal_width=100).output
        parts.append(f"## pc-advise {name}\n\n```text\n{out.rstrip()}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    (Path(__file__).resolve().parent / "cli.md").write_text(render(), encoding="utf-8")
