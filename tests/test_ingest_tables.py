"""Ingest of Parquet and CSV tables, and of folders and globs of mixed files.

A table row is read as the JSON line with the same fields would be: the tests check rows
against ingesting those JSON lines (the reference), besides hand-counted stories.
"""

from __future__ import annotations

import gzip
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from advisor.cli import main
from advisor.errors import AdvisorError, InputRefused
from advisor.ingest import stage as ing
from advisor.ingest.tables import parse_columns

SERVER_LOG = Path(__file__).resolve().parent / "fixtures" / "vllm_server.log"
T0 = 1793700000.0
COMPARED = ("kind", "format", "model", "messages", "tools", "prompt", "prompt_token_ids", "timestamp",
            "session_id", "output_tokens", "max_tokens", "logged_id", "n", "cache_salt")


def chat(i: int) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": f"question {i}"}],
            "user": f"s{i % 3}", "max_tokens": 16}


def ingest(src: Path, tmp: Path, **opts: Any) -> tuple[ing.IngestResult, list[dict[str, Any]], list[dict[str, Any]]]:
    out = tmp / f"out-{len(list(tmp.glob('out-*')))}"
    res = ing.ingest_source(str(src), out / "requests.parquet", out / "rejects.jsonl", ing.IngestOptions(**opts))
    rows = pq.read_table(out / "requests.parquet").to_pylist()
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert res.lines_read == res.accepted + res.rejected == len(rows) + len(rejects)
    return res, rows, rejects


def as_jsonl(tmp: Path, objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    src = tmp / "ref.jsonl"
    src.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return ingest(src, tmp)[1]


def same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert [{k: r[k] for k in COMPARED} for r in a] == [{k: r[k] for k in COMPARED} for r in b]


def write_parquet(path: Path, table: pa.Table, row_group_size: int = 4) -> Path:
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


# --- Parquet ---------------------------------------------------------------------------------
def test_a_column_of_json_bodies_reads_like_the_wrapped_jsonl(tmp_path: Path) -> None:
    bodies = [chat(i) for i in range(10)]
    table = pa.table({"ts": [T0 + i for i in range(10)], "req_json": [json.dumps(b) for b in bodies],
                      "rid": [f"r{i}" for i in range(10)], "embedding": [[0.1] * 3] * 10})
    src = write_parquet(tmp_path / "t.parquet", table)
    res, rows, rejects = ingest(src, tmp_path, columns=parse_columns("body=req_json,timestamp=ts,request_id=rid"))
    ref = as_jsonl(tmp_path, [{"timestamp": T0 + i, "request_id": f"r{i}", "request": b} for i, b in enumerate(bodies)])
    same(rows, ref)
    assert rejects == [] and [r["line"] for r in rows] == list(range(1, 11))  # the row numbers
    assert res.as_counts()["by_file_kind"] == {"parquet": 1} and rows[0]["source"] == "t.parquet"


def test_columns_named_like_request_fields_need_no_mapping(tmp_path: Path) -> None:
    msgs = pa.array([[{"role": "user", "content": f"q{i}"}] for i in range(5)])
    ts = pa.array([datetime(2026, 11, 3, 10, 0, i, tzinfo=timezone.utc) for i in range(5)], pa.timestamp("ms", "UTC"))
    src = write_parquet(tmp_path / "t.parquet", pa.table({"messages": msgs, "timestamp": ts, "model": ["m"] * 5,
                                                          "output_tokens": [3, 4, 5, 6, 7], "notes": ["x"] * 5}))
    _, rows, _ = ingest(src, tmp_path)
    assert [json.loads(r["messages"])[0]["content"] for r in rows] == [f"q{i}" for i in range(5)]
    assert [r["timestamp"] for r in rows] == [T0 + i for i in range(5)]  # an Arrow timestamp -> seconds
    assert [r["output_tokens"] for r in rows] == [3, 4, 5, 6, 7]


def test_a_common_body_column_is_found_and_whole_logged_lines_work_too(tmp_path: Path) -> None:
    lines = [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions", "body": chat(i)} for i in range(3)]
    lines.append({"timestamp": 5, "input_length": 4, "output_length": 1, "hash_ids": [7]})
    src = write_parquet(tmp_path / "t.parquet", pa.table({"request_body": [json.dumps(x) for x in lines]}))
    _, rows, _ = ingest(src, tmp_path)
    same(rows, as_jsonl(tmp_path, lines))
    assert [r["format"] for r in rows] == ["openai-batch"] * 3 + ["hash-trace"]


def test_bad_cells_reject_their_row_and_name_it(tmp_path: Path) -> None:
    table = pa.table({"body": [json.dumps(chat(0)), "{not json", json.dumps({"messages": 5}), None, "[1]"]})
    _, rows, rejects = ingest(write_parquet(tmp_path / "t.parquet", table), tmp_path)
    assert len(rows) == 1 and [r["line"] for r in rejects] == [2, 3, 4, 5]
    reasons = [r["reason"] for r in rejects]
    assert "not JSON" in reasons[0] and "messages is a number" in reasons[1]
    assert "no known request shape" in reasons[2] and "not an object" in reasons[3]


def test_a_parquet_file_is_read_a_row_group_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_parquet(tmp_path / "t.parquet", pa.table({"body": [json.dumps(chat(i)) for i in range(40)]}), 8)
    assert pq.ParquetFile(src).metadata.num_row_groups == 5
    groups = []
    real = pq.ParquetFile.iter_batches

    def spy(self: pq.ParquetFile, *a: Any, **kw: Any) -> Any:
        for batch in real(self, *a, **kw):
            groups.append(batch.num_rows)
            yield batch

    def whole(*a: Any, **kw: Any) -> Any:
        raise AssertionError("the table was read whole")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    monkeypatch.setattr(pq, "read_table", whole)
    res = ing.ingest_source(str(src), tmp_path / "o" / "r.parquet", tmp_path / "o" / "j.jsonl", ing.IngestOptions())
    assert res.accepted == 40 and groups == [8] * 5


def test_tables_the_tool_cannot_read_are_refused_naming_the_columns(tmp_path: Path) -> None:
    src = write_parquet(tmp_path / "t.parquet", pa.table({"alpha": [1], "beta": ["x"]}))
    out = tmp_path / "o"
    with pytest.raises(InputRefused, match=r"no column pc-advise knows \(its columns: 'alpha', 'beta'\).*--columns"):
        ing.ingest_source(str(src), out / "r.parquet", out / "j.jsonl", ing.IngestOptions())
    with pytest.raises(InputRefused, match="no column 'req' named in --columns"):
        ing.ingest_source(str(src), out / "r.parquet", out / "j.jsonl", ing.IngestOptions(columns=(("body", "req"),)))
    src.write_bytes(src.read_bytes()[:-30])  # cut off: the footer is gone
    with pytest.raises(InputRefused, match="cannot be read as Parquet"):
        ing.ingest_source(str(src), out / "r.parquet", out / "j.jsonl", ing.IngestOptions())
    assert not out.exists()


def test_column_maps_are_checked() -> None:
    assert parse_columns(" body = b , timestamp=ts,") == (("body", "b"), ("timestamp", "ts"))
    for bad, words in (("body", "target=column"), ("bogus=x", "not a field"), ("body=a,body=b", "twice")):
        with pytest.raises(ValueError, match=words):
            parse_columns(bad)


# --- CSV -------------------------------------------------------------------------------------
def test_csv_rows_read_like_json_lines_and_bad_rows_name_their_line(tmp_path: Path) -> None:
    msgs = json.dumps([{"role": "user", "content": "hi, there\nsecond line"}]).replace('"', '""')
    text = ("timestamp,model,prompt,output_tokens,messages\n"
            f"{T0},m,\"Classify, please:\nthis\",5,\n"   # lines 2-3: a quoted field over two lines
            f"{T0 + 1},m,,,\"{msgs}\"\n"                  # line 4
            f"{T0 + 2},m,too,many,fields,here\n"          # line 5
            f"{T0 + 3},m,007,,\n")                        # line 6: a prompt stays text
    src = tmp_path / "log.csv.gz"
    src.write_bytes(gzip.compress(text.encode()))
    res, rows, rejects = ingest(src, tmp_path)
    assert [r["line"] for r in rows] == [2, 4, 6] and [r["line"] for r in rejects] == [5]
    assert rows[0]["prompt"] == "Classify, please:\nthis" and rows[0]["output_tokens"] == 5
    assert json.loads(rows[1]["messages"])[0]["content"] == "hi, there\nsecond line"
    assert rows[2]["prompt"] == "007" and rows[2]["timestamp"] == T0 + 3
    assert "6 fields, the header 5" in rejects[0]["reason"]
    assert res.as_counts()["by_file_kind"] == {"csv": 1} and res.compression == "gzip"


def test_tsv_and_a_mapped_csv(tmp_path: Path) -> None:
    src = tmp_path / "log.tsv"
    src.write_text("when\tbody\n" + "".join(f"{T0 + i}\t{json.dumps(chat(i))}\n" for i in range(3)))
    _, rows, _ = ingest(src, tmp_path, columns=(("timestamp", "when"),))
    same(rows, as_jsonl(tmp_path, [{"timestamp": T0 + i, "request": chat(i)} for i in range(3)]))


# --- folders and globs -----------------------------------------------------------------------
def _folder(tmp: Path) -> Path:
    d = tmp / "logs"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl.gz").write_bytes(gzip.compress(b"".join(
        json.dumps({"timestamp": T0 + t, "request": chat(t)}).encode() + b"\n" for t in (0, 4, 8))))
    (d / "sub" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        b"".join(json.dumps({"timestamp": T0 + t, "prompt": f"p{t}"}).encode() + b"\n" for t in (1, 4, 9))
        + b"{broken\n"))
    write_parquet(d / "c.parquet", pa.table({"ts": [T0 + 2.0, T0 + 6.0], "req_json": [json.dumps(chat(9))] * 2}))
    (d / "README.md").write_text("# what these logs are\nnotes\n")
    (d / ".hidden.jsonl").write_text("{}\n")
    return d


def test_a_folder_of_mixed_files_is_merged_in_time_order(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    res, rows, rejects = ingest(d, tmp_path, columns=(("timestamp", "ts"), ("body", "req_json")))
    assert [(r["source"], r["timestamp"] - T0) for r in rows] == [
        ("a.jsonl.gz", 0), ("sub/b.jsonl.zst", 1), ("c.parquet", 2), ("a.jsonl.gz", 4), ("sub/b.jsonl.zst", 4),
        ("c.parquet", 6), ("a.jsonl.gz", 8), ("sub/b.jsonl.zst", 9)]  # equal times: file order (a before b)
    assert rows[0]["request_id"] == "a.jsonl.gz:L1" and rows[2]["request_id"] == "c.parquet:L1"
    assert rejects == [{"line": 4, "cause": "invalid_json", "reason": rejects[0]["reason"], "file": "sub/b.jsonl.zst",
                        "raw": "{broken"}]
    counts = res.as_counts()
    assert counts["by_file_kind"] == {"jsonl": 2, "parquet": 1}
    assert [f["file"] for f in counts["files"]] == ["a.jsonl.gz", "c.parquet", "sub/b.jsonl.zst"]
    assert len(counts["refused_files"]) == 1 and counts["refused_files"][0].startswith("README.md ")
    assert res.first_rejects[0][1].startswith("sub/b.jsonl.zst: ")


def test_a_glob_picks_its_files_and_the_cli_reports_them(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    (d / "server.log").write_bytes(SERVER_LOG.read_bytes())
    res, rows, _ = ingest(Path(str(d / "**" / "*.jsonl.*")), tmp_path)
    assert {r["source"] for r in rows} == {str(d / "a.jsonl.gz"), str(d / "sub" / "b.jsonl.zst")}
    out = tmp_path / "run"
    cli = CliRunner().invoke(main, ["ingest", str(d), "-o", str(out), "--columns", "timestamp=ts,body=req_json",
                                    "--log-year", "2026"])
    assert cli.exit_code == 0, cli.output
    assert "4 files read (jsonl 2, parquet 1, vllm-log 1), merged in time order" in cli.output
    assert "accepted by format: openai-chat 5, completion 3, vllm-log 13" in cli.output
    assert "left out: README.md" in cli.output


def test_a_run_folder_inside_the_log_folder_is_not_read_back(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    args = ["ingest", str(d), "-o", str(d / "run"), "--columns", "timestamp=ts,body=req_json", "--json"]
    first = CliRunner().invoke(main, args)
    again = CliRunner().invoke(main, [*args, "--force"])
    assert first.exit_code == again.exit_code == 0, again.output
    counts = [json.loads(r.stdout)["stages"]["ingest"]["accepted"] for r in (first, again)]
    assert counts == [8, 8]  # requests.parquet in d/run is no input the second time


def test_nothing_to_read_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdvisorError, match="no files in it"):
        ing.ingest_source(str(tmp_path / "empty"), tmp_path / "r.parquet", tmp_path / "j.jsonl", ing.IngestOptions())
    with pytest.raises(AdvisorError, match="matches no file"):
        ing.ingest_source(str(tmp_path / "*.jsonl"), tmp_path / "r.parquet", tmp_path / "j.jsonl", ing.IngestOptions())
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "notes.txt").write_text("hello\n")
    with pytest.raises(InputRefused, match="no file there is a log"):
        ing.ingest_source(str(tmp_path / "only"), tmp_path / "r.parquet", tmp_path / "j.jsonl", ing.IngestOptions())


@settings(max_examples=50, deadline=None)
@given(files=st.lists(st.lists(st.integers(0, 20), max_size=6), min_size=2, max_size=4))
def test_the_merge_is_by_time_then_file_then_line(files: list[list[int]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "logs"
        d.mkdir()
        for k, times in enumerate(files):
            (d / f"f{k}.jsonl").write_text("".join(
                json.dumps({"timestamp": t, "prompt": f"{k}:{n}"}) + "\n" for n, t in enumerate(sorted(times))))
        res, rows, _ = ingest(d, Path(tmp))
        got = [(r["timestamp"], r["source"], r["line"]) for r in rows]
        assert got == sorted(got) and len(rows) == sum(map(len, files))
        assert not res.notes  # every file is in time order
