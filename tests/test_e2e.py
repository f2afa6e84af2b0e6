"""End to end: `pc-advise LOG` on every bundled sample log, as a user runs it.

Each run goes through every stage. Where vLLM is importable the recommendation
is replayed through a real engine (sequential, prefill-only) and must match the
simulator to the token, request by request; `--backend cpu` makes the
recommended block size one this CPU's attention backend can run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from advisor.cli import main

SAMPLES = Path(__file__).resolve().parent.parent / "sample_logs"
LOGS = sorted(p.name for p in SAMPLES.glob("*.jsonl"))

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except Exception:  # noqa: BLE001 - any import failure means: no engine here
    HAVE_VLLM = False


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pc-advise-cache")


def _run(log: str, out: Path, cache: Path, *extra: str) -> tuple[int, str, dict]:
    res = CliRunner().invoke(
        main, [str(SAMPLES / log), "-o", str(out), "--backend", "cpu", "--json", *extra],
        env={"PC_ADVISE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
    )
    summary = json.loads(res.stdout) if res.exit_code == 0 else {}
    return res.exit_code, res.output, summary


@pytest.mark.replay
@pytest.mark.parametrize("log", LOGS)
def test_sample_log_runs_end_to_end(log: str, tmp_path: Path, cache: Path) -> None:
    # the hash trace's 1.9M tokens take ~45 s through the CPU engine: its first 100 requests
    # are replayed (re-predicted for that prefix of the log), which exercises the same path
    extra = ("--replay-limit", "100") if log == "hash_trace_small.jsonl" else ()
    code, output, summary = _run(log, tmp_path, cache, *extra)
    assert code == 0, output

    # Every input line is accounted for.
    ingest = summary["stages"]["ingest"]
    lines = (SAMPLES / log).read_bytes().count(b"\n")
    assert ingest["lines_read"] == lines == ingest["accepted"] + ingest["rejected"]
    rejects = (tmp_path / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rejects) == ingest["rejected"]
    assert pq.read_metadata(tmp_path / "requests.parquet").num_rows == ingest["accepted"]

    for name in ("tokens.parquet", "stats.json", "sim.parquet", "sim_requests.parquet",
                 "recommendation.json", "replay.json", "report.html", "report.md", "manifest.json"):
        assert (tmp_path / name).exists(), name

    rec = json.loads((tmp_path / "recommendation.json").read_text())
    replay = json.loads((tmp_path / "replay.json").read_text())
    if not HAVE_VLLM:
        assert replay["status"] == "not_run"
        return
    assert replay["status"] == "confirmed", replay
    best = rec["recommended"]
    confirmed = {(c["block_size"], c["num_blocks"]) for c in replay["configs"]}
    assert (best["block_size"], best["num_blocks"]) in confirmed
    for c in replay["configs"]:
        assert c["mode"] == "sequential"
        assert c["measured_hit_tokens"] == c["predicted_hit_tokens"], c
        assert c["mismatch_count"] == 0
    # The report states what the replay measured.
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Confirmed" in md or "confirmed" in md


def test_rerun_skips_every_stage_and_changed_options_rerun_downstream(tmp_path: Path, cache: Path) -> None:
    log = "hash_trace_small.jsonl"
    code, output, first = _run(log, tmp_path, cache, "--no-replay")
    assert code == 0, output
    code, output, again = _run(log, tmp_path, cache, "--no-replay")
    assert code == 0, output
    assert all(s["skipped"] for s in again["stages"].values()), again["stages"]
    # A simulate option changes: simulate and everything after it run again; ingest does not.
    code, output, changed = _run(log, tmp_path, cache, "--no-replay", "--num-blocks", "400,800")
    assert code == 0, output
    st = changed["stages"]
    assert st["ingest"]["skipped"] and st["tokenize"]["skipped"] and st["analyze"]["skipped"]
    assert not st["simulate"]["skipped"] and not st["recommend"]["skipped"]
    assert not st["report"]["skipped"]


def test_summary_names_the_recommendation_and_the_replay(tmp_path: Path, cache: Path) -> None:
    code, output, summary = _run("fewshot_template.jsonl", tmp_path, cache, "--no-replay")
    assert code == 0, output
    rows = summary["summary"]
    assert rows["recommended"].startswith("--block-size ")
    assert "vllm serve" in rows["run vLLM with"]
    assert "not run" in rows["replay"] or "skipped" in rows["replay"] or "unconfirmed" in rows["replay"]
