"""Ingest: every format, every kind of bad line, compression, stdin, refusals, the CLI."""

from __future__ import annotations

import gzip
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from advisor import schema
from advisor.cli import main
from advisor.errors import AdvisorError, InputRefused
from advisor.ingest import reader as ing_reader
from advisor.ingest import stage as ing

SAMPLES = Path(__file__).resolve().parent.parent / "sample_logs"


def j(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


def run_ingest(
    tmp: Path, lines: list[bytes] | bytes, name: str = "log.jsonl", **opts: Any
) -> tuple[ing.IngestResult, list[dict[str, Any]], list[dict[str, Any]]]:
    data = lines if isinstance(lines, bytes) else b"\n".join(lines) + b"\n"
    src = tmp / name
    src.write_bytes(data)
    res = ing.ingest_source(str(src), tmp / "out" / "requests.parquet", tmp / "out" / "rejects.jsonl",
                            ing.IngestOptions(**opts))
    return res, *read_outputs(tmp / "out")


def read_outputs(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = pq.read_table(out / "requests.parquet").to_pylist()
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    return rows, rejects


def one_row(tmp: Path, obj: Any, **opts: Any) -> dict[str, Any]:
    res, rows, rejects = run_ingest(tmp, [j(obj)], **opts)
    assert not rejects, rejects
    return rows[0]


def one_reject(tmp: Path, line: bytes, **opts: Any) -> dict[str, Any]:
    res, rows, rejects = run_ingest(tmp, [j(chat()), line], **opts)
    assert len(rows) == 1 and len(rejects) == 1, (rows, rejects)
    assert rejects[0]["line"] == 2
    return rejects[0]


# --- formats ---------------------------------------------------------------------------
def test_bare_chat_body_keeps_the_request_as_given(tmp_path: Path) -> None:
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "héllo"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    row = one_row(tmp_path, {"model": "qwen", "messages": msgs, "tools": tools, "timestamp": 1700000000.5,
                             "user": "u-7", "cache_salt": "s1", "lora": "ad1", "max_tokens": 64,
                             "chat_template_kwargs": {"enable_thinking": False}})
    assert json.loads(row["messages"]) == msgs and json.loads(row["tools"]) == tools
    assert (row["kind"], row["format"], row["model"]) == ("chat", "openai-chat", "qwen")
    assert row["timestamp"] == 1700000000.5 and row["timestamp_logged"] is True
    assert (row["session_id"], row["cache_salt"], row["lora"]) == ("u-7", "s1", "ad1")
    assert row["max_tokens"] == 64 and row["output_tokens"] is None  # a bound, not a length
    assert json.loads(row["chat_template_kwargs"]) == {"enable_thinking": False}
    assert row["request_id"] == "L1" and row["logged_id"] is None


def test_wrapped_chat_takes_output_length_ids_and_time_from_metadata(tmp_path: Path) -> None:
    line = {"timestamp": "2026-11-03T10:00:05Z", "request_id": "r-1", "session_id": "conv-9",
            "latency_ms": 1500, "ttft": 0.25,
            "request": chat("q", user="someone"),
            "response": {"id": "chatcmpl-x", "choices": [{"message": {"content": "the answer"}}],
                         "usage": {"completion_tokens": 57, "prompt_tokens": 11}}}
    row = one_row(tmp_path, line)
    assert row["timestamp"] == 1793700005.0
    assert (row["request_id"], row["session_id"]) == ("r-1", "conv-9")
    assert (row["output_tokens"], row["prompt_tokens_logged"], row["output_text"]) == (57, 11, "the answer")
    assert (row["latency_s"], row["ttft_s"]) == (1.5, 0.25)


def test_wrapped_chat_without_usage_keeps_the_reply_text_and_no_length(tmp_path: Path) -> None:
    row = one_row(tmp_path, {"created": 1700000000, "request": json.dumps(chat("q")),
                             "response": {"id": "c-2", "choices": [{"message": {"content": "text"}}]}})
    assert (row["output_tokens"], row["output_text"], row["request_id"]) == (None, "text", "c-2")
    assert row["timestamp"] == 1700000000.0  # the request was logged as a JSON string: still read


def test_a_response_of_unknown_shape_keeps_the_request(tmp_path: Path) -> None:
    res, rows, rejects = run_ingest(tmp_path, [
        j({"request": chat(), "response": "plain reply text"}),
        j({"request": chat(), "response": {"choices": [{"message": {"content": [{"type": "text", "text": "a"},
                                                                              {"type": "text", "text": "b"}]}}]}}),
        j({"request": chat(), "response": {"choices": [{"message": {"content": 7}}]}}),
    ])
    assert rejects == []
    assert [r["output_text"] for r in rows] == ["plain reply text", "ab", None]
    assert [r["output_tokens"] for r in rows] == [None, None, None]


def test_batch_lines_use_custom_id_and_the_url(tmp_path: Path) -> None:
    lines = [j({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": chat()}),
             j({"custom_id": "b", "method": "POST", "url": "/v1/completions",
                "body": {"model": "m", "prompt": "Once"}}),
             j({"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}),
             j({"custom_id": "d", "url": "/v1/chat/completions", "body": {"model": "m", "prompt": "x"}})]
    res, rows, rejects = run_ingest(tmp_path, lines, rate=2.0)
    assert [(r["request_id"], r["kind"], r["format"]) for r in rows] == [
        ("a", "chat", "openai-batch"), ("b", "completion", "openai-batch")]
    assert [r["timestamp"] for r in rows] == [0.0, 0.5]  # no time logged: line order at --rate
    assert [r["timestamp_logged"] for r in rows] == [False, False]
    assert "/v1/embeddings" in rejects[0]["reason"]
    assert rejects[1]["line"] == 4 and '"messages"' in rejects[1]["reason"]


def test_completion_text_and_pretokenized_prompts(tmp_path: Path) -> None:
    lines = [j({"prompt": "Classify: x", "timestamp": 5}), j({"prompt_token_ids": [1, 2, 3]}),
             j({"prompt": [7, 8]}), j({"prompt": ["only one"]})]
    res, rows, rejects = run_ingest(tmp_path, lines)
    assert [(r["kind"], r["prompt"], r["prompt_token_ids"]) for r in rows] == [
        ("completion", "Classify: x", None), ("tokens", None, [1, 2, 3]),
        ("tokens", None, [7, 8]), ("completion", "only one", None)]
    assert res.by_kind == {"completion": 2, "tokens": 2}


def test_fields_vllm_treats_apart_are_kept_from_every_request_shape(tmp_path: Path) -> None:
    lines = [j(chat()),
             j(chat(prompt_logprobs=1, n=3)),
             j(chat(echo=True, logprobs=True, top_logprobs=None)),  # chat counts logprobs in top_logprobs
             j({"prompt": "x", "echo": True, "logprobs": 0, "n": 2.0}),
             j({"request": {"prompt_token_ids": [1, 2], "echo": None, "logprobs": 5}, "response": {}}),
             j({"custom_id": "b", "url": "/v1/completions", "body": {"prompt": "y", "prompt_logprobs": -1, "n": 4}}),
             j({"timestamp": 5, "input_length": 4, "output_length": 1, "hash_ids": [1, 2]})]
    res, rows, rejects = run_ingest(tmp_path, lines, trace_block_size=2)
    assert not rejects
    assert [(r["prompt_logprobs"], r["echo"], r["logprobs"], r["n"]) for r in rows] == [
        (None, False, None, 1), (1, False, None, 3), (None, True, 0, 1), (None, True, 0, 2),
        (None, False, 5, 1), (-1, False, None, 4), (None, None, None, None)]


BAD_SAMPLING = [
    (j(chat(n=0)), "n is 0; vLLM serves 1 to 16,384 completions per request"),
    (j(chat(n=20_000)), "n is 20000"),
    (j(chat(n=True)), "n is a boolean; expected an integer >= 1"),
    (j({"prompt": "x", "n": "2"}), "n is a string; expected an integer >= 1"),
    (j({"prompt": "x", "n": 1.5}), "n is a number; expected an integer >= 1"),
    (j(chat(prompt_logprobs=-2)), "prompt_logprobs is -2; expected an integer >= 0 (or -1"),
    (j(chat(prompt_logprobs="1")), "prompt_logprobs is a string"),
    (j(chat(echo="yes")), "echo is a string; expected true or false"),
    (j(chat(logprobs=3)), "logprobs is a number; a chat request takes true or false"),
    (j(chat(logprobs=True, top_logprobs=-3)), "top_logprobs is -3"),
    (j({"prompt": "x", "echo": True, "logprobs": True}), "logprobs is a boolean; expected an integer"),
    (j({"custom_id": "c", "body": {"prompt": "x", "n": -1}}), "n is -1"),
]


@pytest.mark.parametrize("line,reason", BAD_SAMPLING, ids=[r[:24] for _, r in BAD_SAMPLING])
def test_bad_sampling_fields_reject_the_line_and_name_the_fix(tmp_path: Path, line: bytes, reason: str) -> None:
    rej = one_reject(tmp_path, line)
    assert (rej["cause"], rej["line"]) == ("wrong_field", 2)
    assert reason in rej["reason"]


def test_mooncake_trace_times_are_milliseconds_from_the_start(tmp_path: Path) -> None:
    row = one_row(tmp_path, {"timestamp": 27482, "input_length": 1100, "output_length": 52,
                             "hash_ids": [46, 47, 2353]})
    assert row["timestamp"] == pytest.approx(27.482)
    assert (row["kind"], row["format"], row["input_length"], row["output_tokens"]) == (
        "hash_trace", "hash-trace", 1100, 52)
    assert row["hash_ids"] == [46, 47, 2353] and row["trace_block_size"] == 512


def test_bailian_trace_times_are_seconds_and_turns_share_a_session(tmp_path: Path) -> None:
    def turn(chat_id: int, parent: int, t: float) -> bytes:
        return j({"chat_id": chat_id, "parent_chat_id": parent, "timestamp": t, "input_length": 20,
                  "output_length": 3, "type": "text", "turn": 1, "hash_ids": [1, 2]})
    res, rows, _ = run_ingest(tmp_path, [turn(5, -1, 1.5), turn(9, -1, 2.0), turn(12, 5, 3.0),
                                         turn(20, 12, 4.0)], trace_block_size=16)
    assert [r["timestamp"] for r in rows] == [1.5, 2.0, 3.0, 4.0]
    assert [r["session_id"] for r in rows] == ["5", "9", "5", "5"]
    assert [r["request_id"] for r in rows] == ["5", "9", "12", "20"]


def test_hash_count_must_match_the_trace_block_size(tmp_path: Path) -> None:
    line = j({"timestamp": 1, "input_length": 1100, "output_length": 1, "hash_ids": [1, 2, 3]})
    rej = one_reject(tmp_path, line, trace_block_size=256)
    assert "--trace-block-size" in rej["reason"] and "needs 5" in rej["reason"]


@pytest.mark.parametrize("field,value,expected", [
    ("timestamp", 1700000000, 1700000000.0),
    ("timestamp", 1700000000000, 1700000000000.0),  # the field name decides the unit, not the size
    ("timestamp_ms", 1700000000123, 1700000000.123),
    ("created_at", "2026-11-03T10:00:05", 1793700005.0),  # no zone: UTC
    ("time", "2026-11-03T11:00:05+01:00", 1793700005.0),
    ("timestamp", "1700000000.25", 1700000000.25),
])
def test_timestamps_normalise_to_seconds(tmp_path: Path, field: str, value: Any, expected: float) -> None:
    assert one_row(tmp_path, chat(**{field: value}))["timestamp"] == pytest.approx(expected)


def test_one_file_may_mix_formats_and_each_line_is_read_in_its_own(tmp_path: Path) -> None:
    lines = [j(chat()), j({"custom_id": "x", "body": chat()}), j({"prompt": "p"}),
             j({"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [3]})]
    res, rows, _ = run_ingest(tmp_path, lines)
    assert [r["format"] for r in rows] == list(schema.FORMATS[:4])


def test_forced_format_rejects_lines_of_other_formats(tmp_path: Path) -> None:
    res, rows, rejects = run_ingest(tmp_path, [j({"prompt": "p"}), j(chat())], format="completion")
    assert [r["line"] for r in rows] == [1]
    assert rejects[0]["line"] == 2 and "--format completion" in rejects[0]["reason"]


def test_repeated_ids_get_a_suffix_and_keep_the_logged_id(tmp_path: Path) -> None:
    lines = [j(chat(request_id="a")), j(chat(request_id="a")), j(chat(request_id="L4")), j(chat()),
             j(chat(request_id="a"))]
    res, rows, _ = run_ingest(tmp_path, lines)
    assert [r["request_id"] for r in rows] == ["a", "a#2", "L4", "L4#2", "a#3"]
    assert [r["logged_id"] for r in rows] == ["a", "a", "L4", None, "a"]
    assert res.duplicate_ids == 2


def test_crlf_and_bom_and_a_last_line_without_newline(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbf" + j(chat("a")) + b"\r\n" + j(chat("b")) + b"\r\n" + j(chat("c"))
    res, rows, rejects = run_ingest(tmp_path, data)
    assert (res.lines_read, res.accepted, rejects) == (3, 3, [])
    assert [json.loads(r["messages"])[0]["content"] for r in rows] == ["a", "b", "c"]


def test_row_groups_stream_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ing, "ROW_GROUP", 4)
    res, rows, _ = run_ingest(tmp_path, [j({"prompt": f"p{i}"}) for i in range(10)])
    meta = pq.ParquetFile(tmp_path / "out" / "requests.parquet").metadata
    assert meta.num_row_groups == 3 and meta.num_rows == 10
    assert [r["line"] for r in rows] == list(range(1, 11))


def test_row_groups_also_close_on_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ing, "ROW_GROUP_BYTES", 2500)
    res, rows, _ = run_ingest(tmp_path, [j({"prompt": "x" * 1000}) for _ in range(7)])
    assert pq.ParquetFile(tmp_path / "out" / "requests.parquet").metadata.num_row_groups == 3
    assert len(rows) == 7


def test_empty_input_writes_empty_outputs(tmp_path: Path) -> None:
    res, rows, rejects = run_ingest(tmp_path, b"")
    assert (res.lines_read, rows, rejects) == (0, [], [])
    assert pq.read_schema(tmp_path / "out" / "requests.parquet").names == schema.REQUESTS.names


# --- bad lines -------------------------------------------------------------------------
BAD = [
    (b"", "empty", "empty line"),
    (b"   \t", "empty", "empty line"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_utf8", "UTF-8"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "cut of', "invalid_json", "truncated"),
    (b'{"prompt": "a", ', "invalid_json", "truncated"),
    (b'{"prompt": "a"} {"prompt": "b"}', "invalid_json", "one request object per line"),
    (b'{"prompt": "a", "timestamp": NaN}', "invalid_json", "NaN"),
    (b"{'prompt': 'single quotes'}", "invalid_json", "column 2"),
    (b"[1, 2, 3]", "not_object", "JSON array"),
    (b"42", "not_object", "a number"),
    (b'{"hello": "world"}', "unknown_shape", "tried openai-chat"),
    (j(chat(42)), "wrong_field", "messages[0].content is a number; expected a string or a list of content parts"),
    (j({"model": "m", "messages": "hello"}), "wrong_field", "messages is a string; expected a list"),
    (j({"model": "m", "messages": []}), "wrong_field", "at least one message"),
    (j({"messages": [{"role": "wizard", "content": "x"}]}), "wrong_field", "role is 'wizard'"),
    (j({"messages": [{"content": "x"}]}), "wrong_field", "messages[0] has no role"),
    (j({"messages": [{"role": "user", "content": None}]}), "wrong_field", "content is null"),
    (j({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}), "wrong_field",
     "messages[0].content[0].text is a number"),
    (j({"messages": [{"role": "user", "content": ["x"]}]}), "wrong_field", "content[0] is a string"),
    (j(chat(tools={"a": 1})), "wrong_field", "tools is an object; expected a list"),
    (j(chat(model=3)), "wrong_field", "model is a number; expected a string"),
    (j(chat(max_tokens="10")), "wrong_field", "max_tokens is a string"),
    (j(chat(timestamp="yesterday")), "wrong_field", "ISO-8601"),
    (j(chat(timestamp=True)), "wrong_field", "timestamp is a boolean"),
    (j({"prompt_token_ids": [1, -5, 3]}), "wrong_field", "prompt_token_ids[1] is -5"),
    (j({"prompt_token_ids": [1, True]}), "wrong_field", "prompt_token_ids[1] is a boolean"),
    (j({"prompt_token_ids": [1, 2**40]}), "wrong_field", "below 2147483648"),
    (j({"prompt_token_ids": []}), "wrong_field", "at least one token"),
    (j({"prompt": ""}), "wrong_field", "empty string"),
    (j({"prompt": ["a", "b"]}), "wrong_field", "one prompt per line"),
    (j({"prompt": [3, -1]}), "wrong_field", "prompt[1] is -1"),
    (j({"prompt": 5}), "wrong_field", "prompt is a number"),
    (j({"timestamp": 5, "input_length": 700, "output_length": 3, "hash_ids": ["a", 1]}), "wrong_field",
     "hash_ids[0] is a string"),
    (j({"timestamp": 5, "input_length": "700", "hash_ids": [1]}), "wrong_field", "input_length is a string"),
    (j({"timestamp": 5, "hash_ids": [1]}), "unknown_shape", "input_length"),
    (j({"custom_id": "x", "body": "text"}), "wrong_field", "body is a string"),
    (j({"request": chat(), "response": {"usage": {"completion_tokens": -1}}}), "wrong_field",
     "completion_tokens is -1"),
]


@pytest.mark.parametrize("line,cause,reason", BAD, ids=[f"{c}:{r[:30]}" for _, c, r in BAD])
def test_bad_lines_are_rejected_with_a_reason(tmp_path: Path, line: bytes, cause: str, reason: str) -> None:
    rej = one_reject(tmp_path, line)
    assert rej["cause"] == cause
    assert reason in rej["reason"]
    if cause == "invalid_utf8":
        import base64

        assert base64.b64decode(rej["raw_b64"]) == line and "raw" not in rej
    else:
        assert rej["raw"] == line.decode()


def test_an_oversized_line_is_skipped_in_chunks_and_reported(tmp_path: Path) -> None:
    huge = j(chat("x" * 300_000))
    res, rows, rejects = run_ingest(tmp_path, [j(chat("a")), huge, j(chat("b")), huge[:-3]],
                                    max_line_bytes=100_000)
    assert [r["line"] for r in rows] == [1, 3]
    assert [r["line"] for r in rejects] == [2, 4]
    for rej, size in zip(rejects, (len(huge), len(huge) - 3)):
        assert rej["cause"] == "too_long" and "--max-line-mb" in rej["reason"]
        assert rej["raw_truncated"] is True and rej["raw_bytes"] == size
        assert len(rej["raw"]) == ing.RAW_KEEP and huge.decode().startswith(rej["raw"])


def test_a_50_mb_line_is_rejected_without_being_held_in_memory(tmp_path: Path) -> None:
    import tracemalloc

    src = tmp_path / "big.jsonl"
    with open(src, "wb") as f:
        f.write(j(chat()) + b'\n{"prompt": "')
        for _ in range(50):
            f.write(b"y" * (1 << 20))
        f.write(b'"}\n' + j(chat()) + b"\n")
    out = tmp_path / "out"
    res = ing.ingest_source(str(src), out / "requests.parquet", out / "rejects.jsonl", ing.IngestOptions())
    assert (res.lines_read, res.accepted, res.rejected) == (3, 2, 1)
    assert res.first_rejects[0][0] == 2 and "32 MB" in res.first_rejects[0][1]
    # Memory stays near the limit (a line up to the limit is legitimately read), not the line.
    tracemalloc.start()
    try:
        res = ing.ingest_source(str(src), out / "requests.parquet", out / "rejects.jsonl",
                                ing.IngestOptions(max_line_bytes=2 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (res.lines_read, res.accepted, res.rejected) == (3, 2, 1)
    assert peak < 12 << 20, peak


def test_iter_lines_never_returns_more_than_the_limit(tmp_path: Path) -> None:
    from advisor.ingest.reader import Oversize, iter_lines

    stream = io.BufferedReader(io.BytesIO(b"a" * 10_000 + b"\nok\n" + b"b" * 50), 64)  # type: ignore[arg-type]
    out = list(iter_lines(stream, 100))
    assert [n for n, _ in out] == [1, 2, 3]
    assert isinstance(out[0][1], Oversize) and out[0][1].n_bytes == 10_000
    assert out[1][1] == b"ok"
    assert isinstance(out[2][1], bytes) and out[2][1] == b"b" * 50


def test_the_sample_malformed_file_accepts_20_and_rejects_10(tmp_path: Path) -> None:
    res = ing.ingest_source(str(SAMPLES / "malformed.jsonl"), tmp_path / "r.parquet",
                            tmp_path / "rej.jsonl", ing.IngestOptions())
    assert (res.lines_read, res.accepted, res.rejected) == (30, 20, 10)


# --- compression and stdin -------------------------------------------------------------
def test_gzip_and_zstd_are_recognised_by_magic_bytes(tmp_path: Path) -> None:
    plain = b"\n".join(j(chat(str(i))) for i in range(50)) + b"\n"
    half = len(plain) // 2
    variants = {
        "a.jsonl.gz": gzip.compress(plain),
        "b.jsonl": gzip.compress(plain[:half]) + gzip.compress(plain[half:]),  # two members, no .gz
        "c.jsonl.zst": zstandard.ZstdCompressor().compress(plain),
        "d.log": zstandard.ZstdCompressor().compress(plain[:half]) + zstandard.ZstdCompressor().compress(plain[half:]),
        "e.jsonl.gz": plain,  # the name lies: read as plain text
    }
    for name, data in variants.items():
        sub = tmp_path / name.replace(".", "_")
        sub.mkdir()
        res, rows, rejects = run_ingest(sub, data, name=name)
        assert (res.accepted, rejects) == (50, []), name
        assert res.compression == ("none" if name.startswith("e") else "gzip" if "gz" in name or name == "b.jsonl" else "zstd")


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
@pytest.mark.parametrize("damage", ["cut", "garbage after"])
def test_a_damaged_compressed_file_keeps_what_was_read(tmp_path: Path, codec: str, damage: str) -> None:
    import random

    rng = random.Random(7)
    plain = b"\n".join(j(chat(" ".join(str(rng.random()) for _ in range(20)))) for _ in range(2000)) + b"\n"
    data = gzip.compress(plain) if codec == "gzip" else zstandard.ZstdCompressor().compress(plain)
    data = data[: len(data) * 2 // 3] if damage == "cut" else data + b"garbage"
    res, rows, rejects = run_ingest(tmp_path, data, name="x.jsonl")
    assert res.lines_read == res.accepted + res.rejected
    if damage == "cut":
        assert 1000 < res.accepted < 2000  # only the damaged block's lines are lost
    else:
        assert res.accepted == 2000 and res.lines_read == 2001
    assert rejects[-1]["cause"] == "damaged_stream" and codec in rejects[-1]["reason"]
    assert [r["line"] for r in rows] == list(range(1, res.accepted + 1))


def test_stdin_stream(tmp_path: Path) -> None:
    data = gzip.compress(j(chat()) + b"\n\n" + j({"prompt": "p"}) + b"\n")
    res = ing.ingest_source("-", tmp_path / "r.parquet", tmp_path / "rej.jsonl", ing.IngestOptions(),
                            stdin=io.BytesIO(data))
    assert (res.lines_read, res.accepted, res.rejected) == (3, 2, 1)


# --- refusals: nothing written -------------------------------------------------------------
def _parquet_bytes() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"a": [1, 2]}), buf)
    return buf.getvalue()


REFUSED = {
    "parquet": (_parquet_bytes(), "Parquet"),
    "gzipped parquet": (gzip.compress(_parquet_bytes()), "Parquet"),
    "binary": (bytes(range(256)) * 4, "binary"),
    "json array one line": (b'[{"prompt": "a"}, {"prompt": "b"}]\n', "JSON array"),
    "json array pretty": (b'[\n  {"prompt": "a"},\n  {"prompt": "b"}\n]\n', "JSON array"),
    "json object pretty": (b'{\n  "model": "m",\n  "messages": []\n}\n', "several lines"),
    "csv of unknown columns": (b"alpha,beta,gamma\n1,m,hello\n2,m,bye\n", "CSV table"),
    "plain text": (b"hello there\nthis is a note\n", "no line starts with"),
    "utf-16": ('{"prompt": "a"}\n'.encode("utf-16"), "UTF-16"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_non_jsonl_input_is_refused_before_anything_is_written(tmp_path: Path, name: str) -> None:
    data, words = REFUSED[name]
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    out = tmp_path / "out"
    with pytest.raises(InputRefused, match=words):
        ing.ingest_source(str(src), out / "requests.parquet", out / "rejects.jsonl", ing.IngestOptions())
    assert not out.exists()


def test_a_jsonl_file_whose_first_line_is_bad_is_not_refused(tmp_path: Path) -> None:
    res, rows, rejects = run_ingest(tmp_path, [b"", b"[1, 2]", b"garbage", j(chat())])
    assert (res.lines_read, res.accepted, res.rejected) == (4, 1, 3)


def test_bad_options_name_the_flag() -> None:
    with pytest.raises(AdvisorError, match="--rate"):
        ing.IngestOptions(rate=0)
    with pytest.raises(AdvisorError, match="--trace-block-size"):
        ing.IngestOptions(trace_block_size=0)


# --- the invariant, on arbitrary bytes -------------------------------------------------------
GOOD_LINES = [j(chat()), j({"prompt": "p", "request_id": "dup"}), j({"prompt_token_ids": [1, 2]}),
              j({"timestamp": 1, "input_length": 5, "output_length": 1, "hash_ids": [9]})]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(st.one_of(st.binary(max_size=80), st.sampled_from(GOOD_LINES)), max_size=25),
    tail_newline=st.booleans(),
    limit=st.sampled_from([24, 70, 1 << 20]),
    lead=st.booleans(),
)
def test_every_line_lands_in_exactly_one_output(
    lines: list[bytes], tail_newline: bool, limit: int, lead: bool
) -> None:
    """With a good first line the file is JSONL and never refused; without one it may be
    refused, and then nothing at all is written."""
    data = b"\n".join([GOOD_LINES[0], *lines] if lead else lines) + (b"\n" if tail_newline else b"")
    # bytes that open with a compression magic are a compressed stream, whose lines are not
    # these (the compressed-input tests cover them)
    assume(not data.startswith((ing_reader.GZIP_MAGIC, ing_reader.ZSTD_MAGIC)))
    expected = data.split(b"\n") if data else []
    if data.endswith(b"\n"):
        expected.pop()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        try:
            res = ing.ingest_source("-", out / "requests.parquet", out / "rejects.jsonl",
                                    ing.IngestOptions(max_line_bytes=limit), stdin=io.BytesIO(data))
        except InputRefused:
            assert not lead and not out.exists()
            return
        rows, rejects = read_outputs(out)
    assert res.lines_read == len(expected) == res.accepted + res.rejected
    assert sorted([r["line"] for r in rows] + [r["line"] for r in rejects]) == list(range(1, len(expected) + 1))
    assert len({r["request_id"] for r in rows}) == len(rows)
    for r in rejects:
        assert r["reason"]
        kept = r["raw"].encode() if "raw" in r else __import__("base64").b64decode(r["raw_b64"])
        assert expected[r["line"] - 1].rstrip(b"\r").startswith(kept)


# --- CLI -------------------------------------------------------------------------------
def test_cli_ingest_prints_the_three_counts_and_skips_a_rerun(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["ingest", str(SAMPLES / "malformed.jsonl"), "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "read 30, accepted 20, rejected 10" in res.output
    assert "rejected line 3: empty line" in res.output
    assert pl.read_parquet(out / "requests.parquet").height == 20
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "skipped" in again.output


def test_a_change_in_the_tools_code_reruns_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fingerprint covers the package's code: after an upgrade (or an edit in a checkout
    whose version string did not move) the stage reruns instead of keeping stale outputs."""
    from advisor import runfolder

    out = tmp_path / "run"
    args = ["ingest", str(SAMPLES / "malformed.jsonl"), "-o", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert "skipped" in CliRunner().invoke(main, args).output
    monkeypatch.setattr(runfolder, "code_digest", lambda: "another build")
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "skipped" not in again.output


def test_cli_ingest_reads_stdin(tmp_path: Path) -> None:
    data = j(chat()) + b"\n" + j({"prompt": "p"}) + b"\nnot json\n"
    res = CliRunner().invoke(main, ["ingest", "-", "-o", str(tmp_path / "run"), "--json"], input=data)
    assert res.exit_code == 0, res.output
    counts = json.loads(res.stdout)["stages"]["ingest"]
    assert (counts["lines_read"], counts["accepted"], counts["rejected"]) == (3, 2, 1)


def test_cli_refusal_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "table.jsonl"
    src.write_bytes(_parquet_bytes())
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["ingest", str(src), "-o", str(out)])
    assert res.exit_code == 2 and "Parquet" in res.output
    assert not out.exists()
    res = CliRunner().invoke(main, ["ingest", "-", "-o", str(out)], input=b"[1, 2]\n")
    assert res.exit_code == 2 and "JSON array" in res.output and not out.exists()
    res = CliRunner().invoke(main, [str(src), "-o", str(out)])  # the whole pipeline: same
    assert res.exit_code == 2 and "Parquet" in res.output and not out.exists()


def test_cli_format_flag_forces_one_format(tmp_path: Path) -> None:
    src = tmp_path / "t.jsonl"
    src.write_bytes(j({"timestamp": 1, "input_length": 40, "output_length": 1, "hash_ids": [1, 2, 3]}) + b"\n")
    res = CliRunner().invoke(main, ["ingest", str(src), "-o", str(tmp_path / "r"), "--format", "hash-trace",
                                    "--trace-block-size", "16"])
    assert res.exit_code == 0 and "accepted 1, rejected 0" in res.output



KEYS = ["model", "messages", "prompt", "prompt_token_ids", "timestamp", "request", "response", "custom_id",
        "body", "url", "hash_ids", "input_length", "chat_id", "parent_chat_id", "user", "metadata", "lora",
        "cache_salt", "max_tokens", "latency_ms", "request_id", "role", "content", "type", "text", "n", "echo",
        "logprobs", "top_logprobs", "prompt_logprobs"]
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6)
           | st.sampled_from(["\ud800", "2026-11-03T10:00:05Z", "user", "text", "/v1/completions", ""]))
json_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=3),
    max_leaves=6,
)
TEMPLATES = [
    {"timestamp": "2026-11-03T10:00:05Z", "request_id": "r", "session_id": "s", "latency_ms": 5,
     "request": chat("q", user="u", tools=[{"type": "function", "function": {"name": "f"}}], max_tokens=9,
                     cache_salt="c", lora_request={"lora_name": "x"}),
     "response": {"id": "c", "choices": [{"message": {"content": "a"}}],
                  "usage": {"completion_tokens": 3, "prompt_tokens": 4}}},
    {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "t"}]}],
              "n": 2, "echo": True, "logprobs": True, "top_logprobs": 1, "prompt_logprobs": 0}},
    {"prompt": "p", "prompt_token_ids": [1, 2], "timestamp_ms": 5, "metadata": {"conversation_id": 3},
     "n": 3, "echo": False, "logprobs": 2},
    {"chat_id": 2, "parent_chat_id": -1, "timestamp": 1.5, "input_length": 9, "output_length": 1,
     "hash_ids": [1, 2, 3]},
]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in children:
        out += _paths(v, (*prefix, k))
    return out


def _mutate(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    obj = json.loads(json.dumps(obj))
    node = obj
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return obj


@st.composite
def mutated_requests(draw: st.DrawFn) -> dict[str, Any]:
    obj = draw(st.sampled_from(TEMPLATES))
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from(_paths(obj)))
        obj = _mutate(obj, path, draw(json_like))
    return obj


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objs=st.lists(mutated_requests(), max_size=8))
def test_mutated_requests_never_break_the_accounting(objs: list[dict[str, Any]]) -> None:
    """Valid requests with fields replaced by arbitrary JSON: each is a row or a reject, never a crash."""
    data = b"\n".join([GOOD_LINES[0], *(json.dumps(o).encode() for o in objs)]) + b"\n"
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        res = ing.ingest_source("-", out / "requests.parquet", out / "rejects.jsonl",
                                ing.IngestOptions(trace_block_size=4), stdin=io.BytesIO(data))
        rows, rejects = read_outputs(out)
    assert res.lines_read == len(objs) + 1 == res.accepted + res.rejected
    assert sorted([r["line"] for r in rows] + [r["line"] for r in rejects]) == list(range(1, len(objs) + 2))
    for r in rows:
        assert r["kind"] in schema.KINDS and r["format"] in schema.FORMATS


def test_cli_says_when_ids_repeat_and_times_are_synthesized(tmp_path: Path) -> None:
    src = tmp_path / "b.jsonl"
    src.write_bytes(b"\n".join(j({"custom_id": "same", "body": chat()}) for _ in range(3)) + b"\n")
    res = CliRunner().invoke(main, ["ingest", str(src), "-o", str(tmp_path / "r"), "--rate", "4"])
    assert res.exit_code == 0, res.output
    assert "2 repeated request ids" in res.output
    assert "3 requests had no timestamp" in res.output and "--rate 4/s" in res.output


def test_cli_missing_log_names_the_fix_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["ingest", str(tmp_path / "nope.jsonl"), "-o", str(out)])
    assert res.exit_code == 1 and "does not exist" in res.output and not out.exists()


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes need POSIX")
def test_cli_reads_a_named_pipe_once(tmp_path: Path) -> None:
    """A pipe (or bash's <(zcat log.gz)) cannot be checksummed first: it is read once, by ingest."""
    import os
    import threading

    fifo = tmp_path / "log.pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(j(chat()) + b"\n" + j({"prompt": "p"}) + b"\n"))
    writer.start()
    res = CliRunner().invoke(main, ["ingest", str(fifo), "-o", str(tmp_path / "run")])
    writer.join(timeout=10)
    assert res.exit_code == 0 and "read 2, accepted 2, rejected 0" in res.output, res.output
