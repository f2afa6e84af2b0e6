"""advisor.ingest.token_ids: pre-tokenized lines' id lists read from their bytes must give what
the ordinary reading (json + fields.check_ids) gives, line for line: the same accepted rows,
the same rejections with the same words, and the same requests.parquet.

The reference is the same reader with the fast path switched off (`split_ids` answering None).
Generated lines mix plain id lists with every spelling the fast path must hand back (leading
zeros, negative, fractional, boolean, past-int32 and empty ids, an empty element, odd
whitespace, a second key, the key inside a string or spelt with an escape, the placeholder's
digits elsewhere on the line) and wrap them as bare, "request"-wrapped or broken JSON.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor.ingest import sources
from advisor.ingest import stage as ing
from advisor.ingest.records import Accepted
from advisor.ingest.sources import Reading, jsonl_records
from advisor.ingest.token_ids import PLACEHOLDER, split_ids, token_id_column
from advisor.schema import FORMAT_COMPLETION

CASES = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
READING = Reading(None, 512, 1 << 20)


def records(data: bytes, fast: bool, reading: Reading = READING) -> list[Any]:
    """(line, accepted row with ids as a list | (cause, reason, raw)) per record."""
    with pytest.MonkeyPatch.context() as m:
        if not fast:
            m.setattr(sources, "split_ids", lambda _data: None)
        out = []
        for rec in jsonl_records(io.BytesIO(data), sources.FileTally(None), reading):
            if isinstance(rec, Accepted):
                row = dict(rec.row)
                ids = row.get("prompt_token_ids")
                if ids is not None:
                    row["prompt_token_ids"] = [int(t) for t in ids]
                out.append((rec.line, row, rec.n_bytes))
            else:
                out.append((rec.line, rec.error.cause, rec.error.reason, rec.raw, rec.n_bytes))
        return out


ID_TEXT = st.one_of(
    st.integers(0, 2**31 - 1).map(str),
    st.integers(0, 200).map(str),
    st.sampled_from(["0", "00", "01", "007", "-1", "1.0", "1e3", "true", "false", "null", '"5"', "2147483648",
                     "99999999999999999999999", "1234567890", "[1]", ""]),
)
SEPARATOR = st.sampled_from([",", ", ", " ,", " , ", ",  ", ",\t", ",\n"])


@st.composite
def id_lists(draw: st.DrawFn) -> str:
    if draw(st.booleans()):  # what a writer of logs writes: the fast path's lists
        ids = draw(st.lists(st.one_of(st.integers(0, 2**31 - 1), st.integers(0, 20)), min_size=1, max_size=12))
        return "[" + draw(st.sampled_from([",", ", "])).join(map(str, ids)) + "]"
    items = draw(st.lists(ID_TEXT, max_size=12))
    if not items:
        return draw(st.sampled_from(["[]", "[ ]", "[,]"]))
    text = items[0]
    for item in items[1:]:
        text += draw(SEPARATOR) + item
    pad = draw(st.sampled_from(["", " ", "  "]))
    return "[" + pad + text + draw(st.sampled_from(["", " "])) + "]"


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    ids = draw(id_lists())
    key = draw(st.sampled_from(['"prompt_token_ids"', '"prompt_token_ids"', '"prompt\\u005ftoken_ids"']))
    colon = draw(st.sampled_from([": ", ":", " : "]))
    extras = draw(st.lists(st.sampled_from([
        '"timestamp": 12.5', '"output_tokens": 7', '"model": "m"', '"prompt": "has \\"prompt_token_ids\\": [1, 2]"',
        '"prompt": "1234567890"', '"note": "x"', '"prompt_token_ids": [3, 4]', '"max_tokens": 1234567890',
        '"prompt": [9, 8]', '"session_id": "s1"',
    ]), max_size=3))
    body = ", ".join([f"{key}{colon}{ids}", *extras])
    shape = draw(st.sampled_from(["bare", "bare", "request", "broken", "array"]))
    if shape == "request":
        text = '{"timestamp": 3, "request": {' + body + "}}"
    elif shape == "broken":
        text = "{" + body + ", }"
    elif shape == "array":
        text = "[{" + body + "}]"
    else:
        text = "{" + body + "}"
    return text.encode()


@CASES
@given(st.lists(lines(), min_size=1, max_size=6), st.sampled_from([None, FORMAT_COMPLETION, "chat"]))
def test_fast_path_reads_every_line_as_the_ordinary_path(batch: list[bytes], fmt: str | None) -> None:
    data = b"\n".join(batch) + b"\n"
    reading = Reading(fmt, 512, 1 << 20)
    assert records(data, True, reading) == records(data, False, reading)


def test_plain_lines_do_take_the_fast_path() -> None:
    """The property above is not vacuous: json.dumps' spellings are split; ids come out whole."""
    for sep in (",", ", "):
        line = ('{"timestamp": 1, "prompt_token_ids": [' + sep.join(map(str, [5, 0, 2**31 - 1, 10])) + "]}").encode()
        got = split_ids(line)
        assert got is not None
        rest, ids = got
        assert ids.tolist() == [5, 0, 2**31 - 1, 10] and ids.dtype == np.int32
        assert json.loads(rest) == {"timestamp": 1, "prompt_token_ids": [PLACEHOLDER]}


@pytest.mark.parametrize("ids", ["[]", "[01]", "[1,,2]", "[1, ,2]", "[1 2]", "[-1]", "[1.5]", "[true]",
                                 "[2147483648]", "[99999999999999999999]", "[1,]", "[,1]"])
def test_lists_json_or_the_id_check_would_refuse_go_the_ordinary_way(ids: str) -> None:
    assert split_ids(('{"prompt_token_ids": ' + ids + "}").encode()) is None


@pytest.mark.parametrize("line", [
    b'{"prompt_token_ids": [1], "x": {"prompt_token_ids": [2]}}',  # the key twice
    b'{"prompt_token_ids": [1], "max_tokens": 1234567890}',  # the placeholder's digits elsewhere
    b'{"prompt": "say \\"prompt_token_ids\\": [1]"}',  # the key only inside a string
])
def test_ambiguous_lines_go_the_ordinary_way(line: bytes) -> None:
    assert split_ids(line) is None


def test_a_row_that_did_not_take_its_ids_from_the_list_is_read_again() -> None:
    """The key in a response, the prompt's own ids in the body: the row's ids are the body's
    [9, 8], not the cut-out list, so the line is read the ordinary way."""
    line = b'{"prompt": [9, 8], "response": {"prompt_token_ids": [1, 2, 3]}}\n'
    assert split_ids(line.strip()) is not None
    got = records(line, True)
    assert got == records(line, False)
    assert got[0][1]["prompt_token_ids"] == [9, 8]


def test_token_id_column_mixes_arrays_lists_and_nulls() -> None:
    col = token_id_column([np.array([1, 2], np.int32), None, [3], np.zeros(0, np.int32)])
    assert col.to_pylist() == [[1, 2], None, [3], []]


def test_requests_parquet_is_the_same_either_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        ids = rng.integers(0, 150_000, int(rng.integers(1, 300))).tolist()
        sep = ", " if i % 2 else ","
        rows.append(f'{{"timestamp": {i}, "output_tokens": 5, "prompt_token_ids": [{sep.join(map(str, ids))}]}}')
    rows += ['{"prompt": "text"}', '{"prompt_token_ids": [1, -2]}', "not json", '{"prompt_token_ids": []}']
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(rows) + "\n")
    tables, rejects = [], []
    for fast in (True, False):
        out = tmp_path / f"out-{fast}"
        out.mkdir()
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(sources, "split_ids", lambda _data: None)
            ing.ingest_source(str(log), out / "requests.parquet", out / "rejects.jsonl", ing.IngestOptions())
        tables.append(pq.read_table(out / "requests.parquet"))
        rejects.append((out / "rejects.jsonl").read_text())
    assert tables[0].equals(tables[1]) and rejects[0] == rejects[1]
    assert tables[0].num_rows == 41 and rejects[0].count("\n") == 3
