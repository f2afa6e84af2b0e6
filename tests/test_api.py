"""The Python API: docs/api.md's examples run as written, `advisor.run` writes the run folder
the CLI writes, options are routed by name, and stages are skipped (or not) at the library
level as the manifest says."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import advisor
from advisor.cli import main
from advisor.pipeline import stage_options
from advisor.runfolder import RunDir

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_logs"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pc-advise-cache")


def test_docs_api_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 3
    (tmp_path / "sample_logs").symlink_to(SAMPLES)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:  # one namespace, in order, as a reader would type them
        exec(compile(block, "docs/api.md", "exec"), namespace)
    assert (tmp_path / "api-out" / "chat" / "report.html").exists()


def _artifacts(root: Path) -> dict[str, object]:
    """A run folder's contents, with what may differ between two runs of it taken out: wall
    times and timestamps."""
    out: dict[str, object] = {}
    for p in sorted(root.iterdir()):
        if p.suffix == ".parquet":
            out[p.name] = pq.read_table(p).to_pylist()
        elif p.name == "manifest.json":
            m = json.loads(p.read_text())
            out[p.name] = {s: {k: v for k, v in e.items() if k not in ("wall_s", "finished_at")}
                           for s, e in m["stages"].items()}
            for k in ("html_bytes", "md_bytes"):  # the reports quote the wall times
                out[p.name]["report"]["counts"].pop(k)
        elif p.name in ("report.md", "report.html"):  # stage timings aside
            out[p.name] = re.sub(r"\d+(\.\d+)? (ms|s)\b", "T", p.read_text())
        elif p.suffix in (".json", ".jsonl"):
            out[p.name] = p.read_text()
    return out


def test_api_run_writes_the_same_run_folder_as_the_cli(tmp_path: Path, cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The same folder written twice, by `pc-advise run` and by `advisor.run`: the same
    artifacts (only wall times and timestamps may differ)."""
    log, run = SAMPLES / "timestamp_system_prompt.jsonl", tmp_path / "run"
    monkeypatch.setenv("PC_ADVISE_CACHE", str(cache))
    res = CliRunner().invoke(main, [str(log), "-o", str(run), "--no-replay", "--block-sizes", "16,32", "-q"])
    assert res.exit_code == 0, res.output
    cli = _artifacts(run)
    shutil.rmtree(run)
    result = advisor.run(log, out=run, cache_dir=cache / "pc-advise", replay=False, block_sizes=(16, 32))
    assert list(result.stages) == ["ingest", "tokenize", "analyze", "simulate", "recommend", "replay", "report"]
    assert not any(o.skipped for o in result.stages.values())
    api = _artifacts(run)
    assert sorted(cli) == sorted(api) and len(cli) >= 10
    for name in cli:
        assert cli[name] == api[name], name


def test_options_are_routed_by_name_to_every_stage_that_has_them() -> None:
    opts = stage_options(model="llama-3.1-8b", gpu="h100", speedup=4.0, rate=2.0)
    assert opts["simulate"].model == opts["recommend"].model == "llama-3.1-8b"
    assert opts["simulate"].speedup == opts["replay"].speedup == 4.0
    assert opts["ingest"].rate == 2.0
    assert opts["simulate"].max_num_seqs == 1024  # vllm serve's default on an H100, resolved once
    assert opts["tokenize"].tokenizer is None  # untouched stages keep their defaults
    with pytest.raises(TypeError, match="unknown option.*blocksize"):
        stage_options(blocksize=16)
    assert set(advisor.option_names()["workers"]) == {"tokenize", "simulate"}


def _log(tmp_path: Path) -> Path:
    dst = tmp_path / "log.jsonl"
    shutil.copy(SAMPLES / "multiturn_chat.jsonl", dst)
    return dst


def test_stage_functions_skip_when_fresh_and_rerun_downstream_of_a_change(tmp_path: Path, cache: Path) -> None:
    run = tmp_path / "run"
    log = _log(tmp_path)
    kw = {"cache_dir": cache}
    assert not advisor.run_ingest(run, log).skipped
    assert not advisor.run_tokenize(run, **kw).skipped
    grid = advisor.SimulateOptions(block_sizes=(32,), modes=("sequential",), policies=("lru",))
    assert not advisor.run_simulate(run, grid).skipped
    # unchanged: every stage is skipped, and says what it recorded
    assert advisor.run_ingest(run, log).skipped
    again = advisor.run_tokenize(run, **kw)
    assert again.skipped and again.counts["rows"] == 87
    assert advisor.run_simulate(run, grid).skipped
    # an option of simulate changes: simulate reruns
    assert not advisor.run_simulate(run, advisor.SimulateOptions(block_sizes=(64,), modes=("sequential",),
                                                                 policies=("lru",))).skipped
    # the log changes: ingest reruns, and so does everything that read its output
    with log.open("a") as f:
        f.write(log.read_text().splitlines()[0] + "\n")
    assert not advisor.run_ingest(run, log).skipped
    assert not advisor.run_tokenize(run, **kw).skipped
    assert not advisor.run_simulate(run, grid).skipped
    # an artifact removed by hand is rebuilt even though nothing else changed
    os.remove(run / "sim.parquet")
    assert not advisor.run_simulate(run, grid).skipped
    # force reruns a fresh stage
    assert advisor.run_simulate(run, grid).skipped and not advisor.run_simulate(run, grid, force=True).skipped


def test_a_stage_without_its_input_names_the_command_to_run(tmp_path: Path) -> None:
    with pytest.raises(advisor.MissingStage, match="run `pc-advise ingest` for this run folder first"):
        advisor.run_tokenize(tmp_path)
    advisor.run_ingest(tmp_path, _log(tmp_path))
    with pytest.raises(advisor.MissingStage, match="tokens.parquet does not exist: run `pc-advise tokenize`"):
        advisor.run_simulate(tmp_path)


def test_run_dir_records_each_stage_with_its_options(tmp_path: Path, cache: Path) -> None:
    run = tmp_path / "run"
    advisor.run_ingest(run, _log(tmp_path), advisor.IngestOptions(rate=3.0))
    rd = RunDir(run)
    assert rd.stage_options("ingest")["rate"] == 3.0
    assert rd.stage_counts("ingest")["accepted"] == 87
    assert rd.stage_options("simulate") == {}


def test_stages_recording_on_two_threads_keep_every_entry(tmp_path: Path) -> None:
    """The pipeline runs analyze beside simulate: the manifest must end with both entries
    whichever finishes first (its read-change-write is not interleaved)."""
    from concurrent.futures import ThreadPoolExecutor

    rd = RunDir(tmp_path)
    names = [f"stage{i}" for i in range(40)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda s: rd.record(s, "k", {}, {}, 0.0, {"n": s}), names))
    assert sorted(rd.manifest()["stages"]) == sorted(names)
    assert all(rd.stage_counts(s) == {"n": s} for s in names)


def test_the_package_names_load_on_first_use_and_are_what_they_name() -> None:
    """`advisor.X` is the object its module defines; a worker importing one stage's module
    does not load the others (checked in a fresh interpreter)."""
    import subprocess
    import sys

    assert set(advisor.__all__) == {*advisor._WHERE, "__version__"}
    for name, module in advisor._WHERE.items():
        assert getattr(advisor, name) is getattr(__import__(module, fromlist=[name]), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        advisor.nope  # noqa: B018
    code = ("import sys, advisor.tokens.stage; "
            "print(sorted(m for m in ('advisor.pipeline', 'advisor.analyze.stage', 'advisor.sim.stage', "
            "'advisor.report.stage', 'matplotlib', 'polars') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tokenize_workers_start_early_only_for_a_large_log_that_tokenize_will_read(tmp_path: Path) -> None:
    from advisor.pipeline import WARM_LOG_BYTES, _tokenize_workers
    from advisor.tokens.stage import TokenizeOptions

    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.truncate(WARM_LOG_BYTES)  # sparse: only its size is read
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokens.parquet").write_bytes(b"")
    two = TokenizeOptions(workers=2)
    cases = [(_log(tmp_path), two, False),  # a small log: tokenize runs it in one process
             (big, TokenizeOptions(workers=1), False),  # one worker: nothing to start
             (big, two, False)]  # tokens.parquet is there: tokenize is likely skipped
    for log, options, force in cases:
        with _tokenize_workers(log, run, None, options, force, tmp_path) as workers:
            assert workers is None, (log, options)
    with _tokenize_workers(big, run, advisor.ExecutorOptions(kind="ray"), two, True, tmp_path) as workers:
        assert workers is None  # Ray runs the pieces


def test_the_early_start_sizes_the_log_and_never_fails_on_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from advisor.pipeline import _log_bytes

    logs = tmp_path / "logs"
    (logs / "day1").mkdir(parents=True)
    (logs / "a.jsonl").write_bytes(b"x" * 10)
    (logs / "day1" / "b.jsonl").write_bytes(b"y" * 5)
    assert _log_bytes(logs) == 15 and _log_bytes(logs / "a.jsonl") == 10
    assert _log_bytes("-") == 0 and _log_bytes(str(logs / "*.jsonl")) == 10  # stdin; a glob, as ingest reads it
    assert _log_bytes(tmp_path / "missing.jsonl") == 0  # ingest names the problem

    def unreadable(self: Path, pattern: str) -> None:
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "rglob", unreadable)
    assert _log_bytes(logs) == 0  # ingest reports what it cannot read
