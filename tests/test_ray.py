"""Ray: the pipeline on a local 2-CPU Ray writes what it writes here, and the flags that choose it.

The story: a folder of three logs (two halves of a chat log interleaved in time, a file of
malformed lines, a text file that is no log) runs ingest -> tokenize -> analyze -> simulate
-> recommend once here and once with `executor=ExecutorOptions(kind="ray")`; every artifact is
the same bytes (the Parquet files and the persisted block streams included: the writers are
deterministic), and the manifests differ only in wall times and the segment cache's counts. Each stage really dispatched its
pieces to Ray (the executor's `map` is spied on in this process). The Ray tests skip with
their reason when Ray is not installed; the pieces' exactness (a folder parsed file by file,
the grid's configurations shipped pickled) is also tested here without Ray, on executors that
run in this process.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor import pipeline
from advisor.cli import main
from advisor.errors import InputRefused
from advisor.executor import ExecutorOptions, InlineExecutor, Shared
from advisor.ingest.sources import resolve_inputs
from advisor.ingest.stage import IngestOptions, _ingest_inputs, run_ingest
from advisor.recommend.stage import run_recommend
from advisor.runfolder import StageOutcome
from advisor.sim.configuration import SimulateOptions
from advisor.sim.grid import simulate_grid
from advisor.tokens.stage import run_tokenize
from advisor.workload import load_workload

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_logs"
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="needs Ray: pip install 'pc-advise[ray]' (what .ci/run's "
                                                    "pass 2 does) to run it")
# Small but complete: 3 row batches to tokenize, both modes, two block sizes, a replica grid
# (its runs are Ray tasks too).
OPTIONS = {"batch_rows": 40, "block_sizes": (16, 32), "sweep_points": 4, "replicas": (1, 2), "workers": 1}


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three logs and a stray text file: a chat log's lines split in two files whose times
    interleave (the merge decides the order), and malformed lines (rejects), one gzipped."""
    folder = tmp_path_factory.mktemp("logs")
    lines = (SAMPLES / "multiturn_chat.jsonl").read_bytes().splitlines(keepends=True)
    (folder / "a.jsonl").write_bytes(b"".join(lines[0::2]))
    (folder / "b.jsonl").write_bytes(b"".join(lines[1::2]))
    (folder / "c.jsonl.gz").write_bytes(gzip.compress((SAMPLES / "malformed.jsonl").read_bytes(), mtime=0))
    (folder / "notes.txt").write_text("these lines are\nno log at all,\njust words\n")
    return folder


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """One local Ray with 2 CPUs for the module; the executors join it and leave it running."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _through_recommend(log: Path, out: Path, executor: ExecutorOptions | None) -> list[StageOutcome]:
    from advisor.analyze.stage import run_analyze
    from advisor.sim.stage import run_simulate

    opts = pipeline.stage_options(**OPTIONS)
    return [
        run_ingest(out, log, opts["ingest"], executor=executor),
        run_tokenize(out, opts["tokenize"], executor=executor),  # the default cache, as the other tests
        run_analyze(out, opts["analyze"]),
        run_simulate(out, opts["simulate"], executor=executor),
        run_recommend(out, opts["recommend"]),
    ]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def _manifest(root: Path) -> dict[str, Any]:
    """The manifest less what differs between two runs of the same code: wall times and when,
    and the segment cache's hit counts (each worker process keeps its own cache, so they
    depend on which worker got which batch; the tokens do not)."""
    stages = json.loads((root / "manifest.json").read_text())["stages"]
    stages["tokenize"]["counts"].pop("segments")
    return {s: {k: v for k, v in e.items() if k not in ("wall_s", "finished_at")} for s, e in stages.items()}


@needs_ray
def test_pipeline_on_ray_writes_the_same_bytes(logs: Path, local_ray: Any, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from advisor.executor_ray import RayExecutor

    pieces: list[str] = []
    real_map = RayExecutor.map

    def spied(self: RayExecutor, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        pieces.append(fn.__name__)
        return real_map(self, fn, items)

    monkeypatch.setattr(RayExecutor, "map", spied)
    local = _through_recommend(logs, tmp_path / "local", None)
    assert not pieces
    on_ray = _through_recommend(logs, tmp_path / "ray", ExecutorOptions(kind="ray"))
    assert not any(o.skipped for o in local + on_ray)
    # the stages ran their pieces on Ray: files, row batches, configurations, replica runs (the
    # block hashing too when tokens.parquet has more than one shard; this log has one)
    assert {"parse_file", "tokenize_piece", "_run_config", "_run_cell"} <= set(pieces), pieces
    assert local_ray.is_initialized()  # a Ray the executor joined is left running
    counts = local[0].counts
    assert (counts["accepted"], counts["rejected"], len(counts["refused_files"])) == (87 + 20, 10, 1)
    assert _manifest(tmp_path / "local") == _manifest(tmp_path / "ray")  # the fingerprints too
    here, there = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert {"requests.parquet", "rejects.jsonl", "tokens.parquet", "sim.parquet", "sim_requests.parquet",
            "replicas.parquet", "recommendation.json"} <= set(here)
    assert list(here) == list(there)
    for name in here:
        assert here[name] == there[name], name
    # the executor is no option of any stage: running the Ray folder here reruns nothing
    again = _through_recommend(logs, tmp_path / "ray", None)
    assert all(o.skipped for o in again)


@needs_ray
def test_cli_ingest_on_ray(logs: Path, local_ray: Any, tmp_path: Path) -> None:
    runner = CliRunner()
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert runner.invoke(main, ["ingest", str(logs), "-o", str(local), "-q"]).exit_code == 0
    res = runner.invoke(main, ["ingest", str(logs), "-o", str(ray_out), "--executor", "ray", "--json"])
    assert res.exit_code == 0, res.output
    assert (local / "requests.parquet").read_bytes() == (ray_out / "requests.parquet").read_bytes()
    assert (local / "rejects.jsonl").read_bytes() == (ray_out / "rejects.jsonl").read_bytes()


@needs_ray
def test_an_unreachable_ray_address_names_the_fix(logs: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["ingest", str(logs), "-o", str(tmp_path), "--executor", "ray",
                                    "--ray-address", "127.0.0.1:1"])
    assert res.exit_code != 0
    assert "--ray-address 127.0.0.1:1: no Ray cluster could be reached there" in res.output
    assert "ray start --head" in res.output


def test_without_ray_installed_the_error_says_how_to_install_it(logs: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    res = CliRunner().invoke(main, ["ingest", str(logs), "-o", str(tmp_path), "--executor", "ray"])
    assert res.exit_code != 0
    assert "pip install 'pc-advise[ray]'" in res.output
    assert not (tmp_path / "requests.parquet").exists()


def test_ray_address_needs_the_ray_executor(logs: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["ingest", str(logs), "-o", str(tmp_path), "--ray-address", "auto"])
    assert res.exit_code != 0 and "add --executor ray" in res.output
    res = CliRunner().invoke(main, ["ingest", str(logs), "-o", str(tmp_path), "--executor", "slurm"])
    assert res.exit_code == 2 and "'local'" in res.output


# --- the pieces, without Ray ---------------------------------------------------------------
class _Shipping(InlineExecutor):
    """Runs here as an executor that spans machines does: every item, result and shared value
    goes through pickle, as it would to a Ray worker."""

    name = "shipping"
    distributed = True

    def __init__(self) -> None:
        self.calls: list[str] = []

    def share(self, value: Any) -> Shared[Any]:
        return Shared(_copy(value))

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        self.calls.append(fn.__name__)
        for item in items:
            yield _copy(fn(_copy(item)))


def _copy(value: Any) -> Any:
    return pickle.loads(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def test_a_folder_parsed_file_by_file_equals_one_pass(logs: Path, tmp_path: Path) -> None:
    """ingest's per-file pieces, merged here: the same requests, rejects and counts, byte for byte."""
    inputs = resolve_inputs(str(logs))
    options = IngestOptions()
    one = _ingest_inputs(inputs, tmp_path / "r1.parquet", tmp_path / "j1.jsonl", options, None)
    ex = _Shipping()
    pieces = _ingest_inputs(inputs, tmp_path / "r2.parquet", tmp_path / "j2.jsonl", options, None, ex)
    assert ex.calls == ["parse_file"]
    assert one.as_counts() == pieces.as_counts()
    assert (one.accepted, one.rejected, len(one.refused_files)) == (87 + 20, 10, 1)  # malformed.jsonl: 20 of 30
    assert (tmp_path / "r1.parquet").read_bytes() == (tmp_path / "r2.parquet").read_bytes()
    assert (tmp_path / "j1.jsonl").read_bytes() == (tmp_path / "j2.jsonl").read_bytes()


def test_a_folder_of_no_logs_is_refused_by_the_pieces_too(tmp_path: Path) -> None:
    from advisor.errors import InputRefused

    folder = tmp_path / "words"
    folder.mkdir()
    for name in ("x.txt", "y.txt"):
        (folder / name).write_text("plain words\non lines\nof text\n")
    with pytest.raises(InputRefused, match="no file there is a log"):
        _ingest_inputs(resolve_inputs(str(folder)), tmp_path / "r.parquet", tmp_path / "j.jsonl",
                       IngestOptions(), None, _Shipping())
    assert not (tmp_path / "r.parquet").exists()


def test_grid_configurations_shipped_as_pieces_equal_threads(tmp_path: Path) -> None:
    """The grid's configurations and replica runs as pickled pieces: the same tables as threads."""
    run = tmp_path / "run"
    run_ingest(run, SAMPLES / "hash_trace_small.jsonl")
    run_tokenize(run)
    workload = load_workload(run / "requests.parquet", run / "tokens.parquet")
    options = SimulateOptions(block_sizes=(workload.trace_block_size,), sweep_points=4, replicas=(1, 2),
                              routers=("round-robin", "prefix-hash"), workers=2)
    threads = simulate_grid(workload, options)
    ex = _Shipping()
    shipped = simulate_grid(workload, options, executor=ex)
    assert ex.calls == ["_run_config", "_run_cell"]
    for name in ("sim", "sim_requests", "replicas", "offload"):
        assert getattr(threads, name).equals(getattr(shipped, name)), name
    assert threads.notes == shipped.notes


_LINE = st.one_of(
    st.builds(lambda t, u, i: json.dumps({**({"timestamp": t} if t is not None else {}), **({"id": i} if i else {}),
                                         "messages": [{"role": "user", "content": u}]}),
              st.one_of(st.none(), st.floats(1.7e9, 1.7e9 + 100, allow_nan=False)),
              st.text(max_size=12), st.sampled_from(["", "r1", "r2"])),
    st.sampled_from(["", "not json", '{"no": "request"}', "[1, 2]"]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.lists(_LINE, max_size=8), min_size=2, max_size=4))
def test_any_folder_parsed_file_by_file_equals_one_pass(tmp_path: Path, files: list[list[str]]) -> None:
    """Files in or out of time order, lines without times or ids, repeated ids, rejects, empty
    files: the per-file pieces merged here write what one pass writes."""
    case = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    (case / "logs").mkdir(parents=True)
    for i, lines in enumerate(files):
        (case / "logs" / f"f{i}.jsonl").write_text("".join(f"{ln}\n" for ln in lines))
    inputs = resolve_inputs(str(case / "logs"))
    try:
        one = _ingest_inputs(inputs, case / "r1.parquet", case / "j1.jsonl", IngestOptions(), None)
    except InputRefused as refused:  # no file is a log: the pieces must refuse it the same way
        with pytest.raises(InputRefused) as also:
            _ingest_inputs(inputs, case / "r2.parquet", case / "j2.jsonl", IngestOptions(), None, _Shipping())
        assert str(also.value) == str(refused)
        return
    pieces = _ingest_inputs(inputs, case / "r2.parquet", case / "j2.jsonl", IngestOptions(), None, _Shipping())
    assert one.as_counts() == pieces.as_counts()
    assert (case / "r1.parquet").read_bytes() == (case / "r2.parquet").read_bytes()
    assert (case / "j1.jsonl").read_bytes() == (case / "j2.jsonl").read_bytes()
