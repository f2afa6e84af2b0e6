"""CLI surface: every command has help ending with an example and is documented."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from click.testing import CliRunner

from advisor import __version__
from advisor.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
STAGES = ("run", "ingest", "tokenize", "analyze", "simulate", "recommend", "replay", "report")


def test_version() -> None:
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output


def test_every_stage_is_a_command() -> None:
    assert set(STAGES) <= set(main.commands)


def test_every_command_help_ends_with_an_example() -> None:
    for name in main.commands:
        res = CliRunner().invoke(main, [name, "--help"])
        assert res.exit_code == 0, name
        body = res.output.split("Options:")[0]
        assert "Example:" in body, f"{name} --help has no Example: block"
        assert "pc-advise" in body.split("Example:")[1], name


def test_every_command_is_documented() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for name in main.commands:
        assert f"## pc-advise {name}" in text, f"docs/cli.md lacks a section for {name}"


def test_cli_reference_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS.parent / "gen_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert DOCS.read_text(encoding="utf-8") == mod.render(), "run: python docs/gen_cli.py"


def test_bare_log_means_run(tmp_path: Path) -> None:
    """`pc-advise LOG` is `pc-advise run LOG`: both reach the same command."""
    missing = tmp_path / "nope.jsonl"
    a = CliRunner().invoke(main, [str(missing), "-o", str(tmp_path / "a")])
    b = CliRunner().invoke(main, ["run", str(missing), "-o", str(tmp_path / "b")])
    assert a.exit_code == b.exit_code == 1
    assert a.output == b.output
    assert f"{missing} does not exist" in a.output


def test_spawned_workers_of_the_console_script_do_not_rerun_it(monkeypatch):
    """`pc-advise` as a console script names its __main__ `advisor.__main__`, so a spawned
    worker (multiprocessing's own preparation data) does not re-import the whole CLI; any
    other __main__ (a user's script, pytest) is left as it is."""
    import multiprocessing.spawn
    import sys
    import types

    import advisor.cli as cli

    script = types.ModuleType("__main__")
    script.__file__ = "/usr/local/bin/pc-advise"
    script.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", script)
    for argv0, name in (("/home/me/analysis.py", None), ("/usr/local/bin/pc-advise", "advisor.__main__")):
        monkeypatch.setattr(sys, "argv", [argv0, "run", "logs.jsonl"])
        cli._name_main_as_the_package()
        prep = multiprocessing.spawn.get_preparation_data("worker")
        assert prep.get("init_main_from_name") == name
        assert ("init_main_from_path" in prep) is (name is None)
