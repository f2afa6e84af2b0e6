"""Parquet and CSV request tables -> one record per row, streamed (a row group, a CSV block).

Input: a Parquet file (read with pyarrow one row group at a time, only the columns used) or
a CSV/TSV text stream (plain, gzip or Zstandard; read row by row), and a column mapping.
Output: `Accepted` / `Rejected` records, one per table row; `line` is the row's line in
the CSV file (its first line, for a field spanning several) or the Parquet row number.

A row is turned into the object a JSON line would be, then read like one
(advisor.ingest.formats.parse_request), so every format works in a table too:
- with `--columns target=column,...` each named column is given the target's name; a
  `body` column holds a whole request body (the common case: one JSON-encoded column of
  bodies) or a whole logged line (a wrapper, a Batch API line, a gateway record);
- without it, columns already named like a request field or a body column
  (`COMMON_BODY_COLUMNS`) are used as they are; other columns are not read.
Text cells holding JSON (an array or object) are decoded, except in text fields (prompt,
system); CSV cells are typed as JSON would type them (integers, numbers, true/false; an
empty cell is null). Parquet timestamps become epoch seconds.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Mapping
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any, BinaryIO

import pyarrow.parquet as pq

from advisor import schema
from advisor.errors import InputRefused
from advisor.ingest.fields import LineError, NotARequest
from advisor.ingest.formats import KNOWN_KEYS, detect, parse_request
from advisor.ingest.records import Accepted, FileTally, Record, Rejected

BATCH_ROWS = 1024  # rows converted at a time within a row group
BODY = "body"
# Column names taken for a JSON body (or a whole logged line) when --columns does not say.
COMMON_BODY_COLUMNS = ("body", "request", "request_body", "req_body", "payload", "request_json",
                       "proxy_server_request")
TEXT_TARGETS = frozenset({"prompt", "system", "output_text", "content", "text", "completion"})
_INT = re.compile(r"-?\d{1,19}")
_FLOAT = re.compile(r"-?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?")


def parse_columns(spec: str) -> tuple[tuple[str, str], ...]:
    """'messages=req_body,timestamp=ts' -> (("messages", "req_body"), ("timestamp", "ts"))."""
    pairs = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        target, sep, column = item.partition("=")
        target, column = target.strip(), column.strip()
        if not sep or not target or not column:
            raise ValueError(f"{item!r} is not target=column (e.g. messages=req_body,timestamp=ts)")
        if target != BODY and target not in KNOWN_KEYS:
            raise ValueError(f"{target!r} is not a field pc-advise reads; use body or one of "
                             f"{', '.join(sorted(KNOWN_KEYS))}")
        pairs.append((target, column))
    targets = [t for t, _ in pairs]
    if len(set(targets)) != len(targets):
        raise ValueError("a target is named twice")
    return tuple(pairs)


class _Mapping:
    """Which table columns are read, and under which name each lands in the row object."""

    def __init__(self, names: list[str], columns: tuple[tuple[str, str], ...], what: str) -> None:
        missing = [c for _, c in columns if c not in names]
        if missing:
            raise InputRefused(f"{what} has no column {', '.join(map(repr, missing))} named in --columns "
                               f"(its columns: {_shown(names)})")
        self.rename: dict[str, str] = {c: t for t, c in columns}
        taken = set(self.rename.values())
        if BODY not in taken:
            body = next((c for c in COMMON_BODY_COLUMNS if c in names and c not in self.rename), None)
            if body is not None and not any(c in names for c in ("messages", "prompt", "prompt_token_ids")):
                self.rename[body] = BODY
                taken.add(BODY)
        for name in names:
            if name not in self.rename and name in KNOWN_KEYS and name not in taken:
                self.rename[name] = name
        if not self.rename:
            raise InputRefused(
                f"{what} has no column pc-advise knows (its columns: {_shown(names)}); name them with "
                "--columns, e.g. --columns body=request_json,timestamp=ts (a column of JSON request "
                "bodies) or messages=msgs,model=model_name (docs/formats.md, Tables)")

    @property
    def columns(self) -> list[str]:
        return list(self.rename)

    def line(self, cells: Mapping[str, Any]) -> dict[str, Any]:
        """One row's cells -> the object a JSON line with the same fields would decode to."""
        obj: dict[str, Any] = {}
        for column, target in self.rename.items():
            value = _cell(cells.get(column), target)
            if value is not None:
                obj[target] = value
        body = obj.pop(BODY, None)
        if isinstance(body, str):
            try:
                body = json.loads(body)
            except ValueError:
                raise LineError(f"the body column holds text that is not JSON ({body[:40]!r}...)") from None
        if body is None:
            return obj
        if not isinstance(body, dict):
            raise LineError("the body column holds a JSON value that is not an object")
        if "request" in body or detect(body) not in (None, schema.FORMAT_CHAT, schema.FORMAT_COMPLETION):
            return {**body, **obj}  # a whole logged line (wrapper, Batch API, Anthropic, gateway record)
        return {**obj, "request": body}


def _shown(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")


def _cell(value: Any, target: str) -> Any:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc).timestamp()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and target not in TEXT_TARGETS:
        s = value.strip()
        if s[:1] in ("[", "{"):
            try:
                return json.loads(s)
            except ValueError:
                return value
    return value


def _csv_cell(text: str, target: str) -> Any:
    """A CSV cell typed as JSON would type it (CSV has no types)."""
    if text == "":
        return None
    if target in TEXT_TARGETS:
        return text
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    if text in ("true", "false", "True", "False"):
        return text in ("true", "True")
    return text


def _record(line: int, mapping: _Mapping, cells: Mapping[str, Any], forced: str | None,
            trace_block_size: int, tally: FileTally) -> Record | None:
    try:
        obj = mapping.line(cells)
        row = parse_request(obj, forced, trace_block_size)
    except NotARequest as e:
        tally.skipped[e.reason] += 1
        return None
    except LineError as e:
        raw = json.dumps({k: cells.get(k) for k in mapping.columns}, default=str, ensure_ascii=False).encode()
        return Rejected(line, e, raw, len(raw))
    return Accepted(line, row, sum(len(str(v)) for v in cells.values()))


class ParquetTable:
    """A Parquet file whose columns were checked when it was opened (before anything is written)."""

    def __init__(self, path: str, tally: FileTally, columns: tuple[tuple[str, str], ...]) -> None:
        what = f"{tally.name or path} (a Parquet table)"
        try:
            self.file = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
            raise InputRefused(f"{tally.name or path} starts like Parquet but cannot be read as Parquet ({e})") \
                from None
        self.mapping = _Mapping(self.file.schema_arrow.names, columns, what)
        self.tally = tally

    def records(self, forced: str | None, trace_block_size: int) -> Iterator[Record]:
        """One record per row, a row group at a time (only the mapped columns are read)."""
        row = 0
        try:
            for group in range(self.file.num_row_groups):
                for batch in self.file.iter_batches(batch_size=BATCH_ROWS, row_groups=[group],
                                                    columns=self.mapping.columns):
                    for cells in batch.to_pylist():
                        row += 1
                        self.tally.lines += 1
                        rec = _record(row, self.mapping, cells, forced, trace_block_size, self.tally)
                        if rec is not None:
                            yield rec
        finally:
            self.file.close()

    def close(self) -> None:
        self.file.close()


class CsvTable:
    """A CSV (TSV: `tab`) stream whose header was read and checked when it was opened."""

    def __init__(self, stream: BinaryIO, tally: FileTally, columns: tuple[tuple[str, str], ...],
                 max_field_bytes: int, tab: bool) -> None:
        csv.field_size_limit(max(max_field_bytes, 1 << 20))
        self.text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")
        self.reader = csv.reader(self.text, delimiter="\t" if tab else ",")
        what = f"{tally.name or 'the input'} (a {'TSV' if tab else 'CSV'} table)"
        try:
            self.header = next(self.reader, [])
        except csv.Error as e:
            raise InputRefused(f"{what}: its header line cannot be read ({e})") from None
        self.mapping = _Mapping(self.header, columns, what) if self.header else None
        self.tally = tally

    def records(self, forced: str | None, trace_block_size: int) -> Iterator[Record]:
        """One record per data row; `line` is the row's first line in the file."""
        try:
            yield from self._rows(forced, trace_block_size)
        finally:
            self.text.close()

    def _rows(self, forced: str | None, trace_block_size: int) -> Iterator[Record]:
        if self.mapping is None:
            return
        tally, header, reader = self.tally, self.header, self.reader
        tally.lines += 1
        index = {name: i for i, name in enumerate(header) if name in self.mapping.rename}
        start = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                tally.lines += 1
                yield Rejected(start, LineError(f"the CSV row cannot be read: {e}"), b"", 0)
                start = reader.line_num + 1
                continue
            tally.lines += 1
            line, start = start, reader.line_num + 1
            if len(fields) != len(header):
                raw = ",".join(fields)[:4096].encode()
                yield Rejected(line, LineError(f"the row has {len(fields)} fields, the header {len(header)}; "
                                               "quote fields that hold commas or newlines"), raw, len(raw))
                continue
            cells = {name: _csv_cell(fields[i], self.mapping.rename[name]) for name, i in index.items()}
            rec = _record(line, self.mapping, cells, forced, trace_block_size, tally)
            if rec is not None:
                yield rec

    def close(self) -> None:
        self.text.close()
