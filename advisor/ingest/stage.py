"""The ingest stage: request logs -> requests.parquet + rejects.jsonl.

Inputs: LOG (a file, a folder or glob of files, or `-` for the stream passed as `stdin`)
and `IngestOptions`. Each file is JSON Lines, a vLLM server log, a Parquet or a CSV table,
plain, gzip or Zstandard (magic bytes decide; advisor.ingest.sources). Outputs, both
written to temporary names and renamed into place:
  requests.parquet  schema.REQUESTS, one row per accepted unit in file order (several
                    files: merged by time), written in row groups of ROW_GROUP rows (fewer
                    when their source bytes pass ROW_GROUP_BYTES), so a multi-GB log never
                    sits in memory
  rejects.jsonl     one {"line", "cause", "reason", "raw" | "raw_b64"} object per rejected
                    unit ("file" too when there are several files); "raw_truncated": true
                    and "raw_bytes" when only the first RAW_KEEP bytes of it are kept
                    (always so past --max-line-mb)
Every unit (a line; a table row; a server log's request; an OTLP span: records.py) lands
in exactly one of them: lines_read == accepted + rejected. Lines that are no unit at all
are counted in `skipped_lines`, by why.

With `executor` on Ray and several files, each file is parsed as a Ray task
(sources.parse_file) and their records merged here by the same merge: the same outputs,
but every file's records (compressed) are held here until the merge (docs/scale.md).

An input that is no log at all is refused (InputRefused) before anything is written (in a
folder: that file is left out and named). Request shapes are in formats.py (and the
modules it names), JSON decoding and typed fields in fields.py, bytes and compression in
reader.py, files and their kinds in sources.py, server logs in vllm_log.py, tables in
tables.py (all in advisor/ingest/).

Ids: request_id is the logged id (see advisor.ingest.formats) or "L<line>" when the line has
none ("<file>:L<line>" when there are several files). A repeated id gets "#2", "#3", ...
appended (its occurrence number), so ids stay unique; `logged_id` keeps the id as logged and
the summary counts the repeats (duplicate_ids).
Time: a request without a timestamp gets `accepted_so_far / rate` seconds (its place in
order at --rate requests per second) and timestamp_logged = false.
Sessions: Alibaba Bailian traces chain turns with chat_id/parent_chat_id; each turn gets
the chat_id of its conversation's first turn as session_id.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from advisor import schema
from advisor.errors import AdvisorError, InputRefused
from advisor.executor import EXECUTOR_RAY, Executor, ExecutorOptions, open_executor
from advisor.ingest.fields import LineError
from advisor.ingest.reader import RAW_KEEP
from advisor.ingest.records import Accepted, FileTally, Record
from advisor.ingest.sources import (
    FilePiece,
    Input,
    Reading,
    file_records,
    fingerprint_paths,
    merged_records,
    open_input,
    parse_file,
    parsed_records,
    resolve_inputs,
)
from advisor.ingest.token_ids import token_id_column
from advisor.runfolder import REJECTS, REQUESTS, RunDir, StageOutcome, atomic_path

ROW_GROUP = 8192
ROW_GROUP_BYTES = 64 << 20  # of source lines: long agent prompts flush sooner
FIRST_REJECTS = 20
# Token ids are not dictionary-encoded: with vocabularies of 10^5 ids the dictionary overflows and
# is dropped anyway; without it zstd writes them 2x faster and 2.5x smaller (a 100M-token log)
_DICTIONARY = [name for name in schema.REQUESTS.names if name != "prompt_token_ids"]


@dataclass(frozen=True)
class IngestOptions:
    format: str | None = None  # one of schema.FORMATS to force it; None = detect per line
    trace_block_size: int = 512  # tokens per hash id in block-hash traces
    rate: float = 1.0  # requests/s assumed for lines without a timestamp
    max_line_bytes: int = 32 << 20  # longer lines are rejected without being read whole
    # Tables: (target, column) pairs, e.g. (("body", "req_json"), ("timestamp", "ts")); () = by name
    columns: tuple[tuple[str, str], ...] = ()
    max_log_len: int | None = None  # vLLM server logs: the server's --max-log-len, when it had one
    log_year: int | None = None  # vLLM server logs: the year of the first line (the prefix has none)

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in schema.FORMATS:
            raise AdvisorError(f"--format {self.format!r} is unknown; use one of {', '.join(schema.FORMATS)}")
        if self.trace_block_size < 1:
            raise AdvisorError("--trace-block-size must be a positive number of tokens (Mooncake: 512)")
        if not self.rate > 0:
            raise AdvisorError("--rate must be a positive number of requests per second")
        if self.max_line_bytes < 1:
            raise AdvisorError("--max-line-mb must be positive")
        if self.max_log_len is not None and self.max_log_len < 1:
            raise AdvisorError("--max-log-len must be the positive number vllm serve was given")
        if self.log_year is not None and not 1970 <= self.log_year <= 9999:
            raise AdvisorError("--log-year must be a year like 2026")
        object.__setattr__(self, "columns", tuple(tuple(p) for p in self.columns))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reading(self) -> Reading:
        return Reading(self.format, self.trace_block_size, self.max_line_bytes, self.columns,
                       self.max_log_len, self.log_year)


@dataclass
class IngestResult:
    lines_read: int = 0  # units read (lines; table rows; server-log requests; spans) = accepted + rejected
    accepted: int = 0
    rejected: int = 0
    first_rejects: list[list[Any]] = field(default_factory=list)  # [[line, reason], ...]
    by_kind: Counter[str] = field(default_factory=Counter)
    by_format: Counter[str] = field(default_factory=Counter)
    rejects_by_cause: Counter[str] = field(default_factory=Counter)
    duplicate_ids: int = 0
    synthesized_timestamps: int = 0
    compression: str = "none"
    files: list[FileTally] = field(default_factory=list)
    refused_files: list[str] = field(default_factory=list)  # a folder's files that are no log: why
    media_requests: int = 0  # chat requests with images/audio/video parts (their tokens are not counted)
    media_parts: int = 0

    def as_counts(self) -> dict[str, Any]:
        counts = {
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
            "by_file_kind": dict(Counter(t.kind for t in self.files)),
            "skipped_lines": dict(sum((t.skipped for t in self.files), Counter())),
            "notes": self.notes,
            "media_requests": self.media_requests,
        }
        if len(self.files) > 1 or self.refused_files:
            counts["files"] = [t.as_dict() for t in self.files]
            counts["refused_files"] = self.refused_files
        return counts

    @property
    def notes(self) -> list[str]:
        """What was approximated or assumed, each once, with the files it concerns when several."""
        out: dict[str, list[str]] = {}
        for t in self.files:
            for n in t.notes:
                out.setdefault(n, []).append(t.name or "stdin")
        several = len(self.files) > 1
        notes = [f"{n} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if several else n
                 for n, names in out.items()]
        if self.media_requests:
            notes.append(f"{self.media_requests} requests carry {self.media_parts} image, audio or video parts: "
                         "their text is tokenized, the media's own tokens (the model's processor's) are not "
                         "counted, so their prompts are simulated shorter than vLLM ran them")
        return notes


def ingest_source(
    log: str,
    requests_path: Path,
    rejects_path: Path,
    options: IngestOptions,
    stdin: BinaryIO | None = None,
) -> IngestResult:
    """Read `log` (a file, a folder, a glob, or '-' for `stdin`) into requests.parquet and
    rejects.jsonl.

    Raises InputRefused, with nothing written, when no input is a log ingest reads.
    """
    return _ingest_inputs(resolve_inputs(str(log)), requests_path, rejects_path, options, stdin)


def run_ingest(
    run_dir: str | Path, log: str | Path, options: IngestOptions | None = None, *,
    force: bool = False, stdin: BinaryIO | None = None, executor: ExecutorOptions | None = None,
) -> StageOutcome:
    """The ingest stage on `run_dir`: skipped when `log` and the options are unchanged.

    A pipe (`-`, /dev/fd/N) can be read once only: nothing to checksum, so it always runs.
    `executor`: where the files of a folder or glob are parsed; on Ray (`kind="ray"`) each
    file is a task, merged here into the same outputs; otherwise (the default) one pass
    streams them all here. Not part of the fingerprint: the outputs do not depend on it.
    """
    options = options or IngestOptions()
    log = str(log)
    run = RunDir(Path(run_dir))
    inputs = resolve_inputs(log, exclude=run.root)
    paths = fingerprint_paths(inputs)

    def body(r: RunDir) -> dict[str, Any]:
        if executor is None or executor.kind != EXECUTOR_RAY or len(inputs) < 2:
            return _ingest_inputs(inputs, r.path(REQUESTS), r.path(REJECTS), options, stdin).as_counts()
        with open_executor(executor) as ex:
            return _ingest_inputs(inputs, r.path(REQUESTS), r.path(REJECTS), options, stdin, ex).as_counts()

    return run.run_stage("ingest", paths or [], {**options.as_dict(), "log": log},
                         [REQUESTS, REJECTS], body, force=force, fingerprintable=paths is not None)


def _ingest_inputs(
    inputs: list[Input], requests_path: Path, rejects_path: Path, options: IngestOptions,
    stdin: BinaryIO | None, executor: Executor | None = None,
) -> IngestResult:
    """Read `inputs` into the two outputs. With `executor` and several files, each file is
    parsed as a piece of its own (`sources.parse_file`) and the records merged here, the same
    merge in the same order as reading them all here (the default: one streaming pass)."""
    result = IngestResult()
    if executor is not None and len(inputs) > 1:
        streams = _parsed_streams(inputs, options, result, executor)
    else:
        streams = _opened_streams(inputs, options, result, stdin)
    result.compression = ",".join(sorted({t.compression for t in result.files})) if result.files else "none"
    with atomic_path(requests_path) as req_tmp, atomic_path(rejects_path) as rej_tmp:
        with pq.ParquetWriter(req_tmp, schema.REQUESTS, compression="zstd", use_dictionary=_DICTIONARY) as writer, \
                open(rej_tmp, "w", encoding="utf-8") as rejects:
            sink = _Ingester(options, result, writer, rejects, several=len(result.files) > 1)
            for i, rec in merged_records(streams, result.files):
                sink.take(result.files[i], rec)
            sink.flush()
    assert result.lines_read == result.accepted + result.rejected
    return result


def _opened_streams(
    inputs: list[Input], options: IngestOptions, result: IngestResult, stdin: BinaryIO | None,
) -> list[Iterator[Record]]:
    """Every input opened and classified here (or refused) before anything is written."""
    opened = []
    try:
        for item in inputs:
            try:
                opened.append(open_input(item, stdin, options.reading()))
            except InputRefused as e:
                if not item.grouped:
                    raise
                result.refused_files.append(str(e))
        _check_any(opened, result)
    except BaseException:
        for o in opened:
            o.close()
        raise
    result.files = [o.tally for o in opened]
    reading = options.reading()
    return [file_records(o, reading) for o in opened]


def _parsed_streams(
    inputs: list[Input], options: IngestOptions, result: IngestResult, executor: Executor,
) -> list[Iterator[Record]]:
    """Every file parsed by `executor`, one piece per file, in the inputs' order."""
    assert all(item.path is not None and item.grouped for item in inputs)
    parsed = []
    for got in executor.map(parse_file, [FilePiece(item, options.reading()) for item in inputs]):
        if got.refused is not None:
            result.refused_files.append(got.refused)
        else:
            parsed.append(got)
    _check_any(parsed, result)
    result.files = [p.tally for p in parsed]
    return [parsed_records(p) for p in parsed]


def _check_any(files: list[Any], result: IngestResult) -> None:
    if not files:
        raise InputRefused("no file there is a log pc-advise reads:\n  " + "\n  ".join(result.refused_files))


class _Ingester:
    """Turns records into buffered columns and reject lines; flushes a row group at a time."""

    def __init__(self, options: IngestOptions, result: IngestResult,
                 writer: pq.ParquetWriter, rejects: Any, several: bool) -> None:
        self.options = options
        self.result = result
        self.writer = writer
        self.rejects = rejects
        self.several = several
        self.columns: dict[str, list[Any]] = {name: [] for name in schema.REQUESTS.names}
        self.seen_ids: set[str] = set()
        self.id_counts: dict[str, int] = {}
        self.chat_roots: dict[str, str] = {}
        self.pending_bytes = 0

    def take(self, tally: FileTally, rec: Record) -> None:
        self.result.lines_read += 1
        tally.units += 1
        if isinstance(rec, Accepted):
            tally.accepted += 1
            self.accept(tally.name, rec.line, rec.row, rec.n_bytes)
        else:
            self.reject(tally.name, rec.line, rec.error, rec.raw, rec.n_bytes)

    def accept(self, source: str | None, line_no: int, row: dict[str, Any], n_bytes: int) -> None:
        res = self.result
        fallback = f"{source}:L{line_no}" if self.several else f"L{line_no}"
        row["request_id"] = self.unique_id(row.get("logged_id"), fallback)
        row["line"] = line_no
        row["source"] = source
        if row.get("timestamp") is None:
            row["timestamp"] = res.accepted / self.options.rate
            row["timestamp_logged"] = False
            res.synthesized_timestamps += 1
        else:
            row["timestamp_logged"] = True
        media = row.pop("_media", 0)
        if media:
            res.media_requests += 1
            res.media_parts += media
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

    def unique_id(self, logged: str | None, fallback: str) -> str:
        rid = logged if logged is not None else fallback
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

    def reject(self, source: str | None, line_no: int, err: LineError, data: bytes, n_bytes: int) -> None:
        res = self.result
        res.rejected += 1
        res.rejects_by_cause[err.cause] += 1
        if len(res.first_rejects) < FIRST_REJECTS:
            res.first_rejects.append([line_no, f"{source}: {err.reason}" if self.several else err.reason])
        record: dict[str, Any] = {"line": line_no, "cause": err.cause, "reason": err.reason}
        if self.several:
            record["file"] = source
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
        columns: dict[str, Any] = dict(self.columns)  # ids as arrays (advisor.ingest.token_ids) go in whole
        columns["prompt_token_ids"] = token_id_column(self.columns["prompt_token_ids"])
        table = pa.Table.from_pydict(columns, schema=schema.REQUESTS)
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
