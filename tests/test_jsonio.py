"""advisor.jsonio: orjson where it reads and writes what the standard library does, the
standard library everywhere else; and ingest, which reads every line through it."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from advisor.ingest.fields import LineError, decode_line, dump_json
from advisor.ingest.stage import IngestOptions, ingest_source
from advisor.jsonio import MISS, NonFinite, dumps_compact, fast_loads, finite_or_marked, loads

_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text())
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _same(a, b) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0 here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans())
def test_loads_reads_what_json_reads(value, ascii_only):
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert _same(loads(text), json.loads(text))
    assert _same(loads(text.encode()), json.loads(text))


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_dumps_compact_writes_what_json_writes_up_to_float_spelling(value):
    text = dumps_compact(value)
    assert _same(json.loads(text), value)
    if not _has_float(value):
        assert text == json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _has_float(v) -> bool:
    if isinstance(v, dict):
        return any(_has_float(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_float(x) for x in v)
    return isinstance(v, float)


@pytest.mark.parametrize("text, why", [
    ('{"a": 18446744073709551616}', "2**64: orjson would read a float"),
    ('{"a": -9223372036854775809}', "below -2**63: orjson would read a float"),
    ('{"a": 123456789012345678901234567890}', "30 digits"),
    ('{"a": 1e400}', "beyond a double"),
    ('{"a": NaN}', "not JSON; json reads it"),
    ('{"a": "\\ud800"}', "a lone surrogate"),
    ('{"a": 1,}', "invalid JSON"),
])
def test_texts_orjson_would_read_otherwise_are_left_to_the_standard_library(text, why):
    assert fast_loads(text) is MISS, why
    assert fast_loads(text.encode()) is MISS, why


def test_integers_at_the_64_bit_edges_are_read_exactly_either_way():
    for n in (2**64 - 1, -(2**63), 9999999999999999999, 1733320000000000000):  # the last: a ns timestamp
        text = json.dumps({"n": n})
        assert _same(loads(text), {"n": n})
    assert fast_loads('{"t": 1733320000000000000}') == {"t": 1733320000000000000}  # no fallback needed


def test_an_overflowing_number_is_written_back_as_the_standard_library_writes_it():
    value = json.JSONDecoder(parse_float=finite_or_marked).decode('{"max": 1e400, "min": -1e400, "x": 0.5}')
    assert isinstance(value["max"], NonFinite) and value["max"] == math.inf and value["x"].__class__ is float
    assert dumps_compact(value) == '{"max":Infinity,"min":-Infinity,"x":0.5}'  # orjson alone writes null


def test_integers_beyond_64_bits_are_written_exactly():
    assert dumps_compact([2**64, -(2**63) - 1]) == "[18446744073709551616,-9223372036854775809]"


# --- ingest reads every line through it ---------------------------------------------------------
def test_decode_line_gives_the_same_object_and_the_same_refusals():
    assert decode_line(b'{"a": [1, 2.5, "\\u00e9"]}\n') == {"a": [1, 2.5, "é"]}
    assert decode_line("\ufeff{\"a\": 1}".encode(), first_line=True) == {"a": 1}
    with pytest.raises(LineError, match="invalid JSON"):
        decode_line("\ufeff{\"a\": 1}".encode())  # a byte order mark is allowed on the first line only
    with pytest.raises(LineError, match="lone UTF-16 surrogate"):
        decode_line(b'{"a": "\\ud800"}')
    with pytest.raises(LineError, match="NaN is not valid JSON"):
        decode_line(b'{"a": NaN}')
    with pytest.raises(LineError, match="not a JSON object"):
        decode_line(b"[1, 2]")
    with pytest.raises(LineError, match="not valid UTF-8"):
        decode_line(b'{"a": "\xff"}')
    assert decode_line(b'{"n": 123456789012345678901234567890}')["n"] == 123456789012345678901234567890
    assert dump_json(decode_line(b'{"m": 1e400}')) == '{"m":Infinity}'


def test_ingest_keeps_big_integers_and_overflowing_numbers_in_the_texts_it_writes(tmp_path):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "number", "maximum": 1e400}}}}}]
    big = [{"role": "user", "content": "order", "name": "u"},
           {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
               "name": "f", "arguments": {"n": 123456789012345678901234567890}}}]}]
    plain = [{"role": "user", "content": "héllo \u2028 \"quoted\" \\ back"}]
    lines = [
        json.dumps({"timestamp": 1.0, "messages": plain, "tools": tools}).replace("Infinity", "1e400"),
        json.dumps({"timestamp": 2.0, "messages": big}),
        json.dumps({"timestamp": 3.0, "messages": plain}, ensure_ascii=False),
    ]
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = ingest_source(str(log), tmp_path / "requests.parquet", tmp_path / "rejects.jsonl", IngestOptions())
    assert (result.accepted, result.rejected) == (3, 0)
    rows = pq.read_table(tmp_path / "requests.parquet").to_pylist()
    assert rows[0]["tools"] == json.dumps(tools, separators=(",", ":"))  # orjson alone: "maximum":null
    assert "123456789012345678901234567890" in rows[1]["messages"]  # orjson alone: 1.2345678901234568e+29
    assert [json.loads(r["messages"]) for r in rows] == [plain, big, plain]


def test_any_bytes_like_text_is_read():
    for text in (b'{"a": [1, 2]}', bytearray(b'{"a": [1, 2]}'), memoryview(b'{"a": [1, 2]}')):
        assert fast_loads(text) == {"a": [1, 2]}
    assert fast_loads(bytearray(b'{"a": 18446744073709551616}')) is MISS
