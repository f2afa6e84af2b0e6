"""Gateway and tracing exports: LiteLLM payloads and spend logs, Langfuse observations,
OpenTelemetry GenAI spans in OTLP JSON (fixtures: tests/fixtures/make_gateway_fixtures.py,
which names the public definition each follows). Expected values are read off the
fixtures by hand; each format's rows are also checked against the same request written as
a plain wrapped OpenAI line (the reference reader)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor.ingest import stage as ing

FIXTURES = Path(__file__).resolve().parent / "fixtures"
T0 = 1793700000.0
SYS = "You are the support assistant of a parcel company. Answer in two sentences."


def ingest(src: Path | bytes, tmp: Path, name: str = "log.jsonl", **opts: Any
           ) -> tuple[ing.IngestResult, list[dict[str, Any]], list[dict[str, Any]]]:
    tmp.mkdir(parents=True, exist_ok=True)
    if isinstance(src, bytes):
        path = tmp / name
        path.write_bytes(src)
        src = path
    out = tmp / "out"
    res = ing.ingest_source(str(src), out / "requests.parquet", out / "rejects.jsonl", ing.IngestOptions(**opts))
    rows = pq.read_table(out / "requests.parquet").to_pylist()
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert res.lines_read == res.accepted + res.rejected == len(rows) + len(rejects)
    return res, rows, rejects


def reference(tmp: Path, line: dict[str, Any]) -> dict[str, Any]:
    return ingest(json.dumps(line).encode() + b"\n", tmp / "ref")[1][0]


SAME = ("kind", "messages", "tools", "prompt", "model", "max_tokens", "timestamp", "session_id", "output_tokens",
        "output_text", "logged_id")


# --- LiteLLM -------------------------------------------------------------------------------------
def test_litellm_payloads(tmp_path: Path) -> None:
    res, rows, rejects = ingest(FIXTURES / "litellm_payloads.jsonl", tmp_path)
    assert [r["logged_id"] for r in rows] == ["litellm-0001", "litellm-0002", "litellm-0003"]
    assert [r["line"] for r in rejects] == [6, 7]
    assert "status failure" in rejects[0]["reason"] and "store_prompts_in_spend_logs" in rejects[1]["reason"]
    assert res.as_counts()["skipped_lines"] == {"LiteLLM call_type 'aembedding' (not a chat or text generation)": 1,
                                          "answered from LiteLLM's response cache (never reached the model server)": 1}
    first, second, text = rows
    assert (first["format"], first["kind"], first["session_id"]) == ("litellm", "chat", "conv-1")
    assert first["latency_s"] == pytest.approx(1.25) and first["ttft_s"] == pytest.approx(0.2)  # streamed
    assert second["ttft_s"] is None  # not streamed: its first token came with the last
    assert (first["output_tokens"], first["prompt_tokens_logged"], first["output_text"]) == (7, 31, "It is in the depot.")
    assert json.loads(first["tools"])[0]["function"]["name"] == "track_parcel"  # from model_parameters
    assert (text["kind"], text["prompt"], text["max_tokens"]) == ("completion", "Classify the ticket: my parcel is late", 4)
    ref = reference(tmp_path, {"request_id": "litellm-0001", "timestamp": T0 + 1, "session_id": "conv-1", "request": {
        "model": "qwen2.5-7b-instruct", "max_tokens": 128, "stream": True,
        "tools": json.loads(first["tools"]), "messages": json.loads(first["messages"])},
        "response": {"choices": [{"message": {"content": "It is in the depot."}}], "usage": {"completion_tokens": 7}}})
    assert {k: first[k] for k in SAME} == {k: ref[k] for k in SAME}


def test_litellm_spend_logs_read_from_a_csv_export(tmp_path: Path) -> None:
    res, rows, rejects = ingest(FIXTURES / "litellm_spend_logs.csv", tmp_path)
    assert [r["logged_id"] for r in rows] == ["chatcmpl-s1", "chatcmpl-s2"] and [r["line"] for r in rejects] == [4, 5]
    s1 = rows[0]
    assert s1["timestamp"] == T0 + 11.5 and s1["ttft_s"] == pytest.approx(0.2) and s1["latency_s"] == pytest.approx(0.5)
    assert (s1["session_id"], s1["output_tokens"], s1["max_tokens"]) == ("sess-1", 6, 64)
    assert json.loads(s1["messages"]) == [{"role": "system", "content": SYS}, {"role": "user", "content": "Hi"}]
    assert res.as_counts()["by_file_kind"] == {"csv": 1}


# --- Langfuse ------------------------------------------------------------------------------------
def test_langfuse_generations(tmp_path: Path) -> None:
    res, rows, rejects = ingest(FIXTURES / "langfuse_observations.jsonl", tmp_path)
    assert [r["logged_id"] for r in rows] == ["obs-1", "obs-3"] and [r["line"] for r in rejects] == [4, 6]
    assert "level ERROR: upstream 500" in rejects[0]["reason"] and "no known shape" in rejects[1]["reason"]
    assert res.as_counts()["skipped_lines"] == {"a Langfuse SPAN observation (no model call)": 1,
                                          "a Langfuse EVENT observation (no model call)": 1}
    one, three = rows
    assert one["timestamp"] == T0 + 61 and one["ttft_s"] == pytest.approx(0.3) and one["latency_s"] == pytest.approx(1.5)
    assert (one["session_id"], one["output_tokens"], one["max_tokens"], one["output_text"]) == (
        "sess-9", 8, 256, "It left the depot.")  # max_tokens was the string "256"
    assert three["session_id"] == "trace-1"  # no session or user: the trace
    assert json.loads(three["tools"])[0]["function"]["name"] == "track_parcel"
    assert (three["output_text"], three["output_tokens"]) == ("It is out for delivery.", 6)


def test_langfuse_blob_export_names_are_read_too(tmp_path: Path) -> None:
    snake = {"id": "o", "trace_id": "t", "type": "GENERATION", "start_time": "2026-11-03T10:00:00Z",
             "completion_start_time": "2026-11-03T10:00:00.5Z", "end_time": "2026-11-03T10:00:02Z",
             "provided_model_name": "m", "model_parameters": {"max_tokens": 9}, "usage_details": {"output": 3},
             "input": json.dumps([{"role": "user", "content": "hi"}]), "session_id": "s"}
    _, rows, rejects = ingest(json.dumps(snake).encode() + b"\n", tmp_path)
    assert rejects == [] and (rows[0]["timestamp"], rows[0]["ttft_s"], rows[0]["model"]) == (T0, 0.5, "m")
    assert (rows[0]["output_tokens"], rows[0]["session_id"], rows[0]["max_tokens"]) == (3, "s", 9)


# --- OpenTelemetry GenAI ----------------------------------------------------------------------------
def test_otel_spans_of_three_convention_generations(tmp_path: Path) -> None:
    res, rows, rejects = ingest(FIXTURES / "otel_genai_spans.jsonl", tmp_path)
    assert [(r["logged_id"], r["line"]) for r in rows] == [("chatcmpl-o1", 1), ("chatcmpl-o2", 2), ("c1", 3), ("d2", 4)]
    assert len(rejects) == 1 and rejects[0]["line"] == 4 and "Connection refused" in rejects[0]["reason"]
    assert json.loads(rejects[0]["raw"])["spanId"] == "d1"  # the span, not the whole line
    assert res.as_counts()["skipped_lines"] == {"a GenAI execute_tool span (no model call)": 1,
                                          "a span without GenAI attributes (HTTP, database, ...)": 1}
    new, events, indexed, structured = rows
    assert json.loads(new["messages"]) == [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"location": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rainy, 57°F"}]
    assert json.loads(new["tools"])[0]["function"]["name"] == "get_weather"
    assert (new["timestamp"], new["session_id"], new["output_tokens"], new["max_tokens"]) == (T0 + 100, "conv-42", 9, 200)
    assert new["output_text"] == "It is rainy in Paris." and new["latency_s"] == pytest.approx(0.8)
    assert json.loads(events["messages"]) == [{"role": "system", "content": "You are a weather bot."},
                                              {"role": "user", "content": "Weather in Rome?"}]
    assert (events["output_text"], events["session_id"]) == ("Sunny.", "sess-r")  # session.id of the resource
    assert json.loads(indexed["messages"])[1] == {"role": "user", "content": "Weather in Oslo?"}
    assert (indexed["output_text"], indexed["output_tokens"]) == ("Snowy.", 3)
    assert json.loads(indexed["tools"]) == [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    assert json.loads(structured["messages"]) == [{"role": "user", "content": "Weather in Paris?"}]


def test_a_span_without_its_prompt_names_the_setting(tmp_path: Path) -> None:
    line = {"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": "x", "name": "chat m", "startTimeUnixNano": "1",
                                                          "attributes": [{"key": "gen_ai.operation.name",
                                                                          "value": {"stringValue": "chat"}}]}]}]}]}
    _, rows, rejects = ingest(json.dumps(line).encode() + b"\n", tmp_path)
    assert rows == [] and "CAPTURE_MESSAGE_CONTENT" in rejects[0]["reason"]


# --- malformed variants -------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["litellm_payloads.jsonl", "langfuse_observations.jsonl", "otel_genai_spans.jsonl"])
def test_a_cut_export_keeps_its_complete_records(tmp_path: Path, fixture: str) -> None:
    data = (FIXTURES / fixture).read_bytes()
    lines = data.splitlines(keepends=True)
    full = ingest(data, tmp_path / "full")
    cut = b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2]  # the third line cut in half, no newline
    res, rows, rejects = ingest(cut, tmp_path / "cut")
    kept = [r["logged_id"] for r in full[1] if r["line"] <= 2]
    assert [r["logged_id"] for r in rows] == kept
    assert rejects[-1]["line"] == 3 and rejects[-1]["cause"] == "invalid_json" and "truncated" in rejects[-1]["reason"]


WRONG = [
    ({"call_type": "acompletion", "startTime": "yesterday", "messages": [{"role": "user", "content": "x"}]}, "startTime"),
    ({"call_type": "acompletion", "startTime": 1, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"call_type": "acompletion", "startTime": 1, "messages": [{"role": "user", "content": "x"}], "model_parameters": [1]},
     "model_parameters is a list"),
    ({"type": "GENERATION", "traceId": "t", "startTime": "2026-11-03T10:00:00Z", "input": 5}, "input is a number"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": "s", "startTimeUnixNano": "soon", "attributes": [
        {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
        {"key": "gen_ai.input.messages", "value": {"stringValue": json.dumps(
            [{"role": "user", "parts": [{"type": "text", "content": "x"}]}])}}]}]}]}]}, "start is 'soon'"),
]


@pytest.mark.parametrize("obj,words", WRONG, ids=[w for _, w in WRONG])
def test_wrong_fields_reject_the_record_naming_the_field(tmp_path: Path, obj: dict, words: str) -> None:
    _, rows, rejects = ingest(json.dumps(obj).encode() + b"\n", tmp_path)
    assert rows == [] and len(rejects) == 1 and words in rejects[0]["reason"], rejects


def test_a_forced_format_rejects_other_shapes(tmp_path: Path) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for fmt, words in (("otel-genai", "resourceSpans"), ("litellm", "call_type"), ("langfuse", "GENERATION")):
        _, rows, rejects = ingest(json.dumps(chat).encode() + b"\n", tmp_path / fmt, format=fmt)
        assert rows == [] and words in rejects[0]["reason"], (fmt, rejects)


# --- no record breaks the accounting ------------------------------------------------------------------
RECORDS = [json.loads(x) for f in ("litellm_payloads.jsonl", "langfuse_observations.jsonl", "otel_genai_spans.jsonl")
           for x in (FIXTURES / f).read_text(encoding="utf-8").splitlines()]
json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                          max_leaves=6)


def _mutate(obj: Any, path: list[int], value: Any) -> Any:
    """Replace (or drop, for None) the value the path of indices walks to."""
    if not path or not isinstance(obj, (dict, list)) or not obj:
        return value
    keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
    k = keys[path[0] % len(keys)]
    out = dict(obj) if isinstance(obj, dict) else list(obj)
    out[k] = _mutate(obj[k], path[1:], value)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(picks=st.lists(st.tuples(st.integers(0, len(RECORDS) - 1), st.lists(st.integers(0, 50), min_size=1, max_size=6), json_value),
                      min_size=1, max_size=4))
def test_mutated_gateway_records_never_break_the_accounting(picks: list[tuple[int, list[int], Any]]) -> None:
    import tempfile

    lines = [json.dumps(_mutate(RECORDS[i], path, v)).encode() for i, path, v in picks]
    with tempfile.TemporaryDirectory() as tmp:
        res, rows, rejects = ingest(b"\n".join(lines) + b"\n", Path(tmp))
        assert len({r["line"] for r in rows} | {r["line"] for r in rejects}) <= len(lines)
