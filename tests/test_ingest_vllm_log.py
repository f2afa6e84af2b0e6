"""Ingest of vLLM's own server log: the ids as vLLM logged them, joined per request id.

The fixtures (tests/fixtures/vllm_server.log, vllm_server_cut.log) were written by vLLM's
RequestLogger itself (tests/fixtures/vllm_server_log.py); the oracle test below writes them
again through the vLLM that is importable and checks they are what it writes. The expected
values here are read off the fixture by hand (the request list in vllm_server_log.plan).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from advisor.cli import main
from advisor.errors import InputRefused
from advisor.ingest import stage as ing
from advisor.ingest.records import FileTally
from advisor.ingest.vllm_log import server_log_records
from tests.test_ingest_gateways import ingest as ingest_reconciled

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FULL = FIXTURES / "vllm_server.log"
CUT = FIXTURES / "vllm_server_cut.log"
START_2026 = 1793700000.0  # the fixture's clock: 2026-11-03T10:00:00Z
DETAILS = re.compile(r"Request (\S+) details: prompt: .*, prompt_token_ids: (\[[\d, ]*\]), prompt_embeds")


def logged_ids(path: Path) -> dict[str, list[int]]:
    """The prompt_token_ids of each details line, read with a regex (not with ingest's parser)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = DETAILS.search(line)
        if m:
            out[m.group(1)] = json.loads(m.group(2))
    return out


def ingest(tmp: Path, data: bytes | Path, name: str = "server.log", **opts: Any
           ) -> tuple[ing.IngestResult, list[dict[str, Any]], list[dict[str, Any]]]:
    """test_ingest_gateways' reconciling ingest, with this file's argument order."""
    return ingest_reconciled(data, tmp, name, **opts)


# --- the fixture, as a story -----------------------------------------------------------------
def test_every_request_keeps_the_ids_vllm_logged(tmp_path: Path) -> None:
    res, rows, rejects = ingest(tmp_path, FULL, log_year=2026)
    ids = logged_ids(FULL)
    assert (res.lines_read, res.accepted, rejects) == (13, 13, [])
    assert [r["request_id"] for r in rows] == list(ids)  # arrival order, the server's ids
    for r in rows:
        assert r["prompt_token_ids"] == ids[r["request_id"]]
        assert (r["kind"], r["format"], r["model"]) == ("tokens", "vllm-log", "qwen2.5-7b-instruct")
        assert r["timestamp_logged"] is True and r["echo"] is False
    # 78 lines: 3 per request (body, details, Received), 2 per chat reply (ids, text), the rest other loggers'
    assert res.as_counts()["skipped_lines"] == {"not a request line": 78 - 13 * 3 - 12 * 2}
    assert res.by_format == {"vllm-log": 13} and res.by_kind == {"tokens": 13}


def test_times_sessions_and_what_vllm_was_asked_come_from_the_joined_lines(tmp_path: Path) -> None:
    _, rows, _ = ingest(tmp_path, FULL, log_year=2026)
    by = {r["request_id"][:17]: r for r in rows}
    first, n2, top3, lora, salted = (by[f"chatcmpl-5eed000{k}"] for k in "05789")
    assert first["timestamp"] == START_2026 + 2 and first["line"] == 4  # the details line
    assert [r["session_id"] for r in rows[:3]] == ["conv-0"] * 3  # the body's "user"
    assert (first["max_tokens"], first["output_tokens"]) == (64, 15)  # 14 reply ids + <|im_end|>
    assert first["output_text"] is None  # a count was logged: the text is not needed
    assert n2["n"] == 2 and top3["logprobs"] == 3 and top3["prompt_logprobs"] is None
    assert lora["lora"] == "support-adapter" and salted["cache_salt"] == "tenant-b"
    comp = rows[-1]
    assert comp["request_id"] == "cmpl-5eed000c00000000000000000000000c-0"
    # echo + logprobs: vLLM asked for prompt logprobs (so the cache is not read), read off the params
    assert (comp["prompt_logprobs"], comp["logprobs"], comp["output_tokens"]) == (1, 1, None)
    assert comp["prompt"].startswith("Classify: ")


def test_without_a_year_the_times_keep_their_gaps_and_say_so(tmp_path: Path) -> None:
    res, rows, _ = ingest(tmp_path, FULL)
    with_year = ingest(tmp_path / "y", FULL, log_year=2026)[1]
    gaps = [b["timestamp"] - a["timestamp"] for a, b in zip(rows, rows[1:])]
    assert gaps == [b["timestamp"] - a["timestamp"] for a, b in zip(with_year, with_year[1:])]
    assert any("no year" in n and "--log-year" in n for n in res.notes)


def test_ids_cut_by_max_log_len_are_rejected_not_shortened(tmp_path: Path) -> None:
    res, rows, rejects = ingest(tmp_path, CUT)
    full = logged_ids(FULL)
    long_ids = {rid for rid, ids in full.items() if len(ids) >= 256}
    # the cut log holds the same requests plus one long document; ids of 256 tokens or more were cut
    assert {r["logged_id"] for r in rows} == set(full) - long_ids
    assert len(rejects) == len(long_ids) + 1 and {r["cause"] for r in rejects} == {"cut_prompt"}
    assert "--max-log-len 256" in rejects[0]["reason"] and "cut JSON bodies" in rejects[0]["reason"]
    assert any("--max-log-len 256" in n for n in res.notes)
    for r in rows:
        assert r["prompt_token_ids"] == full[r["logged_id"]]


def test_the_max_log_len_option_flags_cut_ids_without_a_cut_body(tmp_path: Path) -> None:
    lines = [ln for ln in CUT.read_bytes().splitlines(keepends=True) if b" JSON body: " not in ln]
    res, rows, rejects = ingest(tmp_path, b"".join(lines))
    assert rejects == [] and len(rows) == 14  # nothing says the ids were cut ...
    res, rows, rejects = ingest(tmp_path / "2", b"".join(lines), max_log_len=256)
    assert len(rejects) == 5 and "ingest option --max-log-len" in rejects[0]["reason"]  # ... unless told


# --- variants of the fixture -------------------------------------------------------------------
def test_an_info_only_log_is_rejected_with_the_flags_to_add(tmp_path: Path) -> None:
    info = b"".join(ln for ln in FULL.read_bytes().splitlines(keepends=True) if b") DEBUG " not in ln)
    res, rows, rejects = ingest(tmp_path, info)
    assert rows == [] and len(rejects) == 13 and {r["cause"] for r in rejects} == {"no_prompt"}
    assert "VLLM_LOGGING_LEVEL=DEBUG" in rejects[0]["reason"] and "--enable-log-requests" in rejects[0]["reason"]
    assert rejects[0]["raw"].startswith("(APIServer pid=4242) INFO") and "Received request" in rejects[0]["raw"]


def test_a_request_without_its_details_line_is_rendered_from_its_body(tmp_path: Path) -> None:
    # vLLM 0.34 with VLLM_REQUEST_BODY_LOG_LEVEL=INFO logs bodies and "Received" lines at INFO
    lines = [ln for ln in FULL.read_bytes().splitlines(keepends=True) if b" details: prompt: " not in ln]
    res, rows, rejects = ingest(tmp_path, b"".join(lines))
    assert rejects == [] and len(rows) == 13
    chat = rows[0]
    assert chat["kind"] == "chat" and chat["format"] == "vllm-log" and chat["prompt_token_ids"] is None
    assert json.loads(chat["messages"])[1]["content"].startswith("Please check")
    assert rows[-1]["kind"] == "completion" and rows[-1]["prompt_logprobs"] == 1
    assert any("rendered from their JSON body" in n for n in res.notes)


def test_a_log_cut_inside_a_details_line_rejects_that_request_only(tmp_path: Path) -> None:
    data = FULL.read_bytes()
    at = data.index(b"prompt_token_ids: [", data.index(b"chatcmpl-5eed0004")) + 40
    res, rows, rejects = ingest(tmp_path, data[:at])
    assert len(rows) == 4 and len(rejects) == 1
    assert rejects[0]["line"] == 28 and "cut?" in rejects[0]["reason"]


def test_a_details_line_past_max_line_mb_rejects_its_request_once(tmp_path: Path) -> None:
    res, rows, rejects = ingest(tmp_path, FULL, max_line_bytes=1500)  # chat details lines are 2.3-3.3 KB
    assert [r["logged_id"] for r in rows] == ["cmpl-5eed000c00000000000000000000000c-0"]
    assert len(rejects) == 12 and {r["cause"] for r in rejects} == {"too_long"}
    assert rejects[0]["raw_truncated"] is True and "--max-line-mb" in rejects[0]["reason"]
    assert "JSON body without a request line" not in res.as_counts()["skipped_lines"]


def test_colours_and_a_container_runtime_time_prefix_are_read(tmp_path: Path) -> None:
    lines = FULL.read_bytes().splitlines(keepends=True)
    coloured = b"".join(re.sub(rb"\) (DEBUG|INFO) ", lambda m: b") \x1b[32m" + m.group(1) + b"\x1b[0m ", ln)
                        .replace(b"(APIServer", b"\x1b[0;36m(APIServer", 1) for ln in lines)
    _, rows, rejects = ingest(tmp_path, coloured, log_year=2026)
    assert rejects == [] and [r["prompt_token_ids"] for r in rows] == list(logged_ids(FULL).values())
    stamped = b"".join(b"2026-11-03T10:00:%06.3fZ " % (i / 100) + ln for i, ln in enumerate(lines))
    _, rows, _ = ingest(tmp_path / "2", stamped)
    assert rows[0]["timestamp"] == pytest.approx(START_2026 + 0.03)  # the details line is line 4


def test_a_gzipped_log_and_one_without_request_lines(tmp_path: Path) -> None:
    import gzip

    _, rows, _ = ingest(tmp_path, gzip.compress(FULL.read_bytes()), name="server.log.gz")
    assert len(rows) == 13
    quiet = b"".join(ln for ln in FULL.read_bytes().splitlines(keepends=True) if b"request" not in ln.lower())
    res, rows, rejects = ingest(tmp_path / "2", quiet)
    assert rows == rejects == [] and res.as_counts()["skipped_lines"]["not a request line"] > 0
    assert any("--enable-log-requests" in n for n in res.notes)


def test_a_text_file_that_is_no_log_is_still_refused(tmp_path: Path) -> None:
    src = tmp_path / "notes.txt"
    src.write_bytes(b"INFO some other program\nno prefix here\n")
    with pytest.raises(InputRefused, match="no line starts with"):
        ing.ingest_source(str(src), tmp_path / "o" / "r.parquet", tmp_path / "o" / "j.jsonl", ing.IngestOptions())


# --- the join, under any interleaving ----------------------------------------------------------
def _requests(path: Path) -> list[list[tuple[int, bytes]]]:
    """The fixture's lines grouped per request (in order), other lines left out."""
    groups: dict[str, list[tuple[int, bytes]]] = {}
    for no, line in enumerate(path.read_bytes().splitlines(), 1):
        m = re.search(rb"(?:Request|Received request|Generated response) (?:chatcmpl-|cmpl-)?(5eed[0-9a-f]{4})", line)
        if m:
            groups.setdefault(m.group(1).decode(), []).append((no, line))
    return list(groups.values())


GROUPS = _requests(FULL)


@settings(max_examples=60, deadline=None)
@given(order=st.permutations(range(sum(len(g) for g in GROUPS))), drop=st.sets(st.integers(0, 77), max_size=6))
def test_any_interleaving_gives_the_same_requests(order: list[int], drop: set[int]) -> None:
    """Lines of different requests interleave in any order (each request's own lines in
    order): every request is read the same; dropped lines lose requests only as counted."""
    slots = [i for i, g in enumerate(GROUPS) for _ in g]
    pos = [0] * len(GROUPS)
    lines = []
    for k in order:  # a random merge of the per-request sequences
        g = slots[k]
        lines.append(GROUPS[g][pos[g]])
        pos[g] += 1
    lines = [(i + 1, data) for i, (_, data) in enumerate(lines) if i not in drop]
    tally = FileTally("t")
    records = list(server_log_records(iter(lines), tally, max_log_len=None, log_year=2026))
    accepted = {r.row["logged_id"]: r.row for r in records if hasattr(r, "row")}
    expected = logged_ids(FULL)
    for rid, row in accepted.items():
        if row["kind"] == "tokens":
            assert row["prompt_token_ids"] == expected[rid]
    kept_ids = {re.search(rb"(?:chatcmpl|cmpl)-5eed[^: ]*", d).group().decode() for _, d in lines
                if b" details: prompt: " in d or b"Received request" in d}
    assert len(records) == len(kept_ids)  # one unit per request id that has a request line
    if not drop:
        assert set(accepted) == set(expected)


# --- the CLI -----------------------------------------------------------------------------------
def test_cli_ingest_names_the_format_and_the_notes(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["ingest", str(FULL), "-o", str(tmp_path / "run"), "--log-year", "2026"])
    assert res.exit_code == 0, res.output
    assert "read 13, accepted 13, rejected 0" in res.output
    assert "vllm-log 13" in res.output and "15 lines skipped" in res.output
    res = CliRunner().invoke(main, ["ingest", str(CUT), "-o", str(tmp_path / "cut"), "--max-log-len", "256"])
    assert res.exit_code == 0 and "cut_prompt" in res.output


# --- the fixture is what vLLM writes ------------------------------------------------------------
def _generator():
    import sys

    if str(FIXTURES) not in sys.path:
        sys.path.insert(0, str(FIXTURES))
    import vllm_server_log

    return vllm_server_log


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenizer-cache")


@pytest.mark.oracle
def test_the_fixtures_are_what_vllms_request_logger_writes(tmp_path: Path, cache: Path) -> None:
    written = _generator().main(tmp_path, cache)

    def same(p: Path) -> list[str]:  # [file:line] of the logging call differs between vLLM versions
        return [re.sub(r" \[[^\]]+:\d+\] ", " [*] ", ln) for ln in p.read_text(encoding="utf-8").splitlines()]

    for new in written:
        assert same(new) == same(FIXTURES / new.name), new.name


@pytest.mark.oracle
def test_a_log_through_vllms_json_formatter_reads_the_same(tmp_path: Path, cache: Path) -> None:
    from advisor.tokens.stage import load_tokenizer

    path = tmp_path / "server.jsonl"
    _generator().write(path, None, long_prompt=False, tokenizer=load_tokenizer(None, cache), json_format=True)
    assert json.loads(path.read_text().splitlines()[0])["asctime"].startswith("2026-11-03 10:00:00")
    res, rows, rejects = ingest(tmp_path, path)
    assert rejects == [] and res.as_counts()["by_file_kind"] == {"vllm-log": 1}
    assert [r["prompt_token_ids"] for r in rows] == list(logged_ids(FULL).values())
    assert rows[0]["timestamp"] == START_2026 + 2  # its asctime has the year: no note needed
    assert not any("no year" in n for n in res.notes)
