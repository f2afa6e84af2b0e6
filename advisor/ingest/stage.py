"""The ingest stage: a raw request log -> requests.parquet + rejects.jsonl.

Inputs: a JSON Lines log (plain, gzip or Zstandard, recognised by magic bytes; `-` reads
the stream passed as `stdin`) and `IngestOptions`. Outputs, both written to temporary names
and renamed into place:
  requests.parquet  schema.REQUESTS, one row per accepted line in line order, written in
                    row groups of ROW_GROUP rows (fewer when their lines pass ROW_GROUP_BYTES),
                    so a multi-GB log never sits in memory
  rejects.jsonl     one {"line", "cause", "reason", "raw" | "raw_b64"} object per rejected
                    line; "raw_truncated": true and "raw_bytes" when only the first
                    RAW_KEEP bytes of the line are kept (always so past --max-line-mb)
Every line lands in exactly one of them: lines_read == accepted + rejected.

A file that is not JSON Lines at all is refused (InputRefused) before anything is written.
Request shapes are in formats.py, JSON decoding and typed fields in fields.py, bytes,
compression and the refusal sniff in reader.py (all in advisor/ingest/).

Ids: request_id is the logged id (see advisor.ingest.formats) or "L<line>" when the line has none.
A repeated id gets "#2", "#3", ... appended (its occurrence number), so ids stay unique;
`logged_id` keeps the id as logged and the summary counts the repeats (duplicate_ids).
Time: a line without a timestamp gets `accepted_so_far / rate` seconds (its place in line
order at --rate requests per second) and timestamp_logged = false.
Sessions: Alibaba Bailian traces chain turns with chat_id/parent_chat_id; each turn gets
the chat_id of its conversation's first turn as session_id.
"""

from __future__ import annotations

import base64
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from advisor import schema
from advisor.errors import AdvisorError
from advisor.ingest.fields import DAMAGED_STREAM, TOO_LONG, LineError, decode_line
from advisor.ingest.formats import parse_request
from advisor.ingest.reader import (
    RAW_KEEP,
    CorruptStream,
    Oversize,
    iter_lines,
    open_decompressed,
    read_head,
    sniff,
)
from advisor.runfolder import REJECTS, REQUESTS, RunDir, StageOutcome, atomic_path

ROW_GROUP = 8192
ROW_GROUP_BYTES = 64 << 20  # of source lines: long agent prompts flush sooner
FIRST_REJECTS = 20


@dataclass(frozen=True)
class IngestOptions:
    format: str | None = None  # one of schema.FORMATS to force it; None = detect per line
    trace_block_size: int = 512  # tokens per hash id in block-hash traces
    rate: float = 1.0  # requests/s assumed for lines without a timestamp
    max_line_bytes: int = 32 << 20  # longer lines are rejected without being read whole

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in schema.FORMATS:
            raise AdvisorError(f"--format {self.format!r} is unknown; use one of {', '.join(schema.FORMATS)}")
        if self.trace_block_size < 1:
            raise AdvisorError("--trace-block-size must be a positive number of tokens (Mooncake: 512)")
        if not self.rate > 0:
            raise AdvisorError("--rate must be a positive number of requests per second")
        if self.max_line_bytes < 1:
            raise AdvisorError("--max-line-mb must be positive")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IngestResult:
    lines_read: int = 0
    accepted: int = 0
    rejected: int = 0
    first_rejects: list[list[Any]] = field(default_factory=list)  # [[line, reason], ...]
    by_kind: Counter[str] = field(default_factory=Counter)
    by_format: Counter[str] = field(default_factory=Counter)
    rejects_by_cause: Counter[str] = field(default_factory=Counter)
    duplicate_ids: int = 0
    synthesized_timestamps: int = 0
    compression: str = "none"

    def as_counts(self) -> dict[str, Any]:
        return {
            "lines_read": self.lines_read,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "first_rejects": self.first_rejects,
            "by_kind": dict(self.by_kind),
            "by_format": dict(self.by_format),
            "rejects_by_cause": dict(self.rejects_by_cause),
            "duplicate_ids": self.duplicate_ids,
            "synthesized_timestamps": self.synthesized_timestamps,
            "compression": self.compression,
        }


def ingest_source(
    log: str,
    requests_path: Path,
    rejects_path: Path,
    options: IngestOptions,
    stdin: BinaryIO | None = None,
) -> IngestResult:
    """Read `log` (a path, or '-' for `stdin`) into requests.parquet and rejects.jsonl.

    Raises InputRefused, with nothing written, when the input is not JSON Lines at all.
    """
    if log == "-":
        raw = stdin if stdin is not None else sys.stdin.buffer
        return _ingest_stream(raw, requests_path, rejects_path, options)
    with open(check_source(log), "rb") as f:
        return _ingest_stream(f, requests_path, rejects_path, options)


def run_ingest(
    run_dir: str | Path, log: str | Path, options: IngestOptions | None = None, *,
    force: bool = False, stdin: BinaryIO | None = None,
) -> StageOutcome:
    """The ingest stage on `run_dir`: skipped when `log` and the options are unchanged.

    A pipe (`-`, /dev/fd/N) can be read once only: nothing to checksum, so it always runs.
    """
    options = options or IngestOptions()
    log = str(log)
    run = RunDir(Path(run_dir))
    streamed = log == "-" or not check_source(log).is_file()

    def body(r: RunDir) -> dict[str, Any]:
        return ingest_source(log, r.path(REQUESTS), r.path(REJECTS), options, stdin=stdin).as_counts()

    return run.run_stage("ingest", [] if streamed else [Path(log)], {**options.as_dict(), "log": log},
                         [REQUESTS, REJECTS], body, force=force, fingerprintable=not streamed)


def check_source(log: str) -> Path:
    """The log's path, or an error naming the fix when there is nothing to read there.

    Regular files, pipes and /dev/fd/N (shell process substitution) are all readable.
    """
    path = Path(log)
    if not path.exists() or path.is_dir():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise AdvisorError(f"{log} {what}; give a .jsonl, .jsonl.gz or .jsonl.zst log, or - for stdin")
    return path


def _ingest_stream(
    raw: BinaryIO, requests_path: Path, rejects_path: Path, options: IngestOptions
) -> IngestResult:
    stream, compression = open_decompressed(raw)
    head, stream = read_head(stream)
    sniff(head, compression)  # raises before any file exists
    result = IngestResult(compression=compression)
    with atomic_path(requests_path) as req_tmp, atomic_path(rejects_path) as rej_tmp:
        with pq.ParquetWriter(req_tmp, schema.REQUESTS, compression="zstd") as writer, \
                open(rej_tmp, "w", encoding="utf-8") as rejects:
            _Ingester(options, result, writer, rejects).run(stream)
    assert result.lines_read == result.accepted + result.rejected
    return result


class _Ingester:
    """Turns lines into buffered columns and reject records; flushes a row group at a time."""

    def __init__(self, options: IngestOptions, result: IngestResult,
                 writer: pq.ParquetWriter, rejects: Any) -> None:
        self.options = options
        self.result = result
        self.writer = writer
        self.rejects = rejects
        self.columns: dict[str, list[Any]] = {name: [] for name in schema.REQUESTS.names}
        self.seen_ids: set[str] = set()
        self.id_counts: dict[str, int] = {}
        self.chat_roots: dict[str, str] = {}
        self.pending_bytes = 0

    def run(self, stream: BinaryIO) -> None:
        for line_no, data in iter_lines(stream, self.options.max_line_bytes):
            self.result.lines_read += 1
            if isinstance(data, Oversize):
                mb = self.options.max_line_bytes / (1 << 20)
                self.reject(line_no, LineError(
                    f"line is {data.n_bytes:,} bytes, longer than the {mb:g} MB limit; "
                    "raise it with --max-line-mb if such requests are real", TOO_LONG,
                ), data.head, data.n_bytes)
                continue
            if isinstance(data, CorruptStream):
                self.reject(line_no, LineError(
                    f"{data}; the lines before it were read, this one and anything after it "
                    "were lost", DAMAGED_STREAM,
                ), b"", 0)
                continue
            try:
                row = parse_request(decode_line(data, line_no == 1), self.options.format,
                                    self.options.trace_block_size)
            except LineError as e:
                self.reject(line_no, e, data, len(data))
                continue
            self.accept(line_no, row, len(data))
        self.flush()

    def accept(self, line_no: int, row: dict[str, Any], n_bytes: int) -> None:
        res = self.result
        row["request_id"] = self.unique_id(row.get("logged_id"), line_no)
        row["line"] = line_no
        if row.get("timestamp") is None:
            row["timestamp"] = res.accepted / self.options.rate
            row["timestamp_logged"] = False
            res.synthesized_timestamps += 1
        else:
            row["timestamp_logged"] = True
        chat = row.pop("_chat", None)
        if chat is not None and row.get("session_id") is None:
            chat_id, parent = chat
            root = self.chat_roots.get(parent, parent) if parent not in (None, "-1") else chat_id
            if chat_id is not None and root is not None:
                self.chat_roots[chat_id] = root
            row["session_id"] = root
        for name, col in self.columns.items():
            col.append(row.get(name))
        res.accepted += 1
        res.by_kind[row["kind"]] += 1
        res.by_format[row["format"]] += 1
        self.pending_bytes += n_bytes
        if len(self.columns["line"]) >= ROW_GROUP or self.pending_bytes >= ROW_GROUP_BYTES:
            self.flush()

    def unique_id(self, logged: str | None, line_no: int) -> str:
        rid = logged if logged is not None else f"L{line_no}"
        if rid in self.seen_ids:
            if logged is not None:
                self.result.duplicate_ids += 1
            n = self.id_counts.get(rid, 1)
            while True:
                n += 1
                candidate = f"{rid}#{n}"
                if candidate not in self.seen_ids:
                    break
            self.id_counts[rid] = n
            rid = candidate
        self.seen_ids.add(rid)
        return rid

    def reject(self, line_no: int, err: LineError, data: bytes, n_bytes: int) -> None:
        res = self.result
        res.rejected += 1
        res.rejects_by_cause[err.cause] += 1
        if len(res.first_rejects) < FIRST_REJECTS:
            res.first_rejects.append([line_no, err.reason])
        record: dict[str, Any] = {"line": line_no, "cause": err.cause, "reason": err.reason}
        kept = data[:RAW_KEEP]
        text = _utf8_prefix(kept, cut=len(kept) < n_bytes)
        if text is None:
            record["raw_b64"] = base64.b64encode(kept).decode("ascii")
        else:
            record["raw"] = text
        if len(kept) < n_bytes:
            record["raw_truncated"] = True
            record["raw_bytes"] = n_bytes
        self.rejects.write(json.dumps(record, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if not self.columns["line"]:
            return  # a writer closed with no row group is still a valid, empty file
        table = pa.Table.from_pydict(self.columns, schema=schema.REQUESTS)
        self.writer.write_table(table, row_group_size=ROW_GROUP)
        for col in self.columns.values():
            col.clear()
        self.pending_bytes = 0


def _utf8_prefix(data: bytes, cut: bool) -> str | None:
    """`data` as text; when `cut`, a character split at the end is dropped. None if not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if cut and e.start >= len(data) - 3 and e.reason == "unexpected end of data":
            return data[: e.start].decode("utf-8")
        return None
