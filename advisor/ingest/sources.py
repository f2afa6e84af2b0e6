"""The inputs of ingest: a file, a folder, a glob or stdin -> records, in time order.

Input: the LOG argument and `Reading` (the ingest options a reader needs). Output: per file a
`FileTally`, and one stream of `(file index, Record)` pairs.

- `resolve_inputs`: a folder means every file below it (recursively, hidden files left
  out), a pattern with `*`, `?` or `[` the files it matches, both sorted by path; `-` is
  standard input.
- `classify`: what one file is, from its first bytes: Parquet (magic `PAR1`), else, after
  gzip/Zstandard decompression, a vLLM server log (its line prefix), vLLM's JSON-formatted
  log, JSON Lines, or CSV/TSV (a `.csv`/`.tsv` name, or lines that split evenly). Anything
  else is refused (InputRefused) before anything is written: for one file, the run stops;
  in a folder, the file is left out and named in a note (all refused: the run stops).
- `merged_records`: each file is read in its own order (logs are written in time order);
  several files are merged by timestamp, ties kept in file-then-line order (stable). A
  record without a logged time keeps the time of the record before it in its file.
- `parse_file` (an executor's piece: one file of a folder or glob, on a worker): the file's
  records, pickled and compressed in chunks of CHUNK, and its tally; `parsed_records` reads
  them back, in order, for the same merge. The worker opens the file by its path.
"""

from __future__ import annotations

import glob
import heapq
import itertools
import json
import pickle
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from advisor import schema
from advisor.errors import AdvisorError, InputRefused
from advisor.ingest.fields import (
    DAMAGED_STREAM,
    TOO_LONG,
    LineError,
    NotARequest,
    decode_line,
)
from advisor.ingest.formats import parse_otlp, parse_request
from advisor.ingest.otel import is_otlp
from advisor.ingest.reader import (
    CorruptStream,
    Oversize,
    iter_lines,
    open_decompressed,
    read_head,
    refuse_binary,
    refuse_json_document,
    refuse_text,
    sniff_lines,
    table_kind,
)
from advisor.ingest.records import Accepted, FileTally, Record, Rejected
from advisor.ingest.tables import CsvTable, ParquetTable
from advisor.ingest.token_ids import PLACEHOLDER, split_ids
from advisor.ingest.vllm_log import (
    is_json_log_record,
    is_server_log_line,
    server_log_records,
)

# What `classify` says a file is; each kind has its reader.
JSONL, SERVER_LOG, SERVER_LOG_JSON, CSV, TSV, PARQUET = ("jsonl", "vllm-log", "vllm-log-json", "csv", "tsv",
                                                        "parquet")
PARQUET_MAGIC = b"PAR1"
_GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True)
class Reading:
    """What the readers need from IngestOptions (advisor.ingest.stage)."""

    format: str | None
    trace_block_size: int
    max_line_bytes: int
    columns: tuple[tuple[str, str], ...] = ()
    max_log_len: int | None = None
    log_year: int | None = None


@dataclass(frozen=True)
class Input:
    """One file to read: its path and the name rejects and rows give it (None: stdin)."""

    path: Path | None
    name: str | None
    grouped: bool = False  # one of a folder's or a glob's files (refused: left out, not fatal)


def resolve_inputs(log: str, exclude: Path | None = None) -> list[Input]:
    """The files LOG names (see the module docstring), or an error naming the fix. Files
    below `exclude` (the run folder, when it sits inside a folder of logs) are left out."""
    if log == "-":
        return [Input(None, None)]
    path = Path(log)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))
                       and not _below(p, exclude))
        if not files:
            raise AdvisorError(f"{log} is a folder with no files in it; give a folder of logs, a log file, "
                               "or a glob like 'logs/*.jsonl.gz'")
        return [Input(p, str(p.relative_to(path)), grouped=True) for p in files]
    if not path.exists() and any(c in log for c in _GLOB_CHARS):
        files = sorted(Path(p) for p in glob.glob(log, recursive=True)
                       if Path(p).is_file() and not _below(Path(p), exclude))
        if not files:
            raise AdvisorError(f"{log} matches no file; check the pattern (quote it so the shell passes it "
                               "as it is)")
        return [Input(p, str(p), grouped=True) for p in files]
    if not path.exists():
        raise AdvisorError(f"{log} does not exist; give a log file (.jsonl, .jsonl.gz, .jsonl.zst, a vLLM server "
                           "log, .parquet, .csv), a folder or glob of them, or - for stdin")
    return [Input(path, path.name)]


def _below(p: Path, folder: Path | None) -> bool:
    return folder is not None and p.resolve().is_relative_to(folder.resolve())


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def fingerprint_paths(inputs: list[Input]) -> list[Path] | None:
    """The files whose contents decide the stage's output; None when one is a pipe."""
    paths = [i.path for i in inputs]
    if any(p is None or not p.is_file() for p in paths):
        return None
    return paths  # type: ignore[return-value]


# --- one file ---------------------------------------------------------------------------
@dataclass
class Opened:
    """An input classified and ready to read (tables: their columns already checked)."""

    kind: str
    stream: BinaryIO | None  # None for Parquet (read by path)
    tally: FileTally
    table: ParquetTable | CsvTable | None = None

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
        if self.stream is not None:
            self.stream.close()


def classify(head: bytes, compression: str, name: str | None) -> str:
    """What the decompressed input starting with `head` is (module docstring); raises
    InputRefused, naming the file and the fix, for anything else."""
    label = f"{name} " if name else "the input "
    if not head:
        return JSONL  # an empty log: zero lines read, nothing to refuse
    refuse_binary(head, compression, label)
    lines = sniff_lines(head)
    if not lines:
        return JSONL  # only blank lines: each is rejected as empty
    hits = sum(1 for ln in lines if is_server_log_line(ln.decode("utf-8", "replace")))
    if hits >= 3 or (hits and hits * 3 >= len(lines)):  # other programs' lines may sit between
        return SERVER_LOG
    if refuse_json_document(lines, compression, label):
        return SERVER_LOG_JSON if _json_log(lines) else JSONL
    table = table_kind(lines)
    bare = (name or "").lower().removesuffix(".gz").removesuffix(".zst")
    if bare.endswith(".csv") or (table == "CSV" and not bare.endswith(".tsv")):
        return CSV
    if bare.endswith(".tsv") or table == "TSV":
        return TSV
    refuse_text(head, lines, compression, label)
    raise AssertionError("unreachable")


def _json_log(lines: list[bytes]) -> bool:
    for ln in lines:
        if ln.startswith(b"{"):
            try:
                obj = decode_line(ln)
            except LineError:
                continue
            return is_json_log_record(obj)
    return False


def open_input(item: Input, stdin: BinaryIO | None, reading: Reading) -> Opened:
    """Open one input and decide its kind, refusing it (InputRefused) when none fits or a
    table has no column to read; the caller closes it (`Opened.close`)."""
    tally = FileTally(item.name)
    if item.path is None:
        raw: BinaryIO = stdin if stdin is not None else sys.stdin.buffer
    else:
        raw = open(item.path, "rb")  # noqa: SIM115 - closed by Opened.close
    try:
        if item.path is not None and item.path.is_file():
            magic = raw.read(4)
            raw.seek(0)
            if magic == PARQUET_MAGIC:
                raw.close()
                tally.kind = PARQUET
                return Opened(PARQUET, None, tally, ParquetTable(str(item.path), tally, reading.columns))
        stream, tally.compression = open_decompressed(raw)
        head, stream = read_head(stream)
        if item.path is None and head.startswith(PARQUET_MAGIC):
            raise InputRefused("a Parquet table cannot be read from standard input; give its path")
        kind = classify(head, tally.compression, item.name)
        tally.kind = SERVER_LOG if kind == SERVER_LOG_JSON else kind
        opened = Opened(kind, stream, tally)
        if kind in (CSV, TSV):
            opened.table = CsvTable(stream, tally, reading.columns, reading.max_line_bytes, tab=kind == TSV)
    except BaseException:
        raw.close()
        raise
    return opened


def file_records(opened: Opened, reading: Reading) -> Iterator[Record]:
    """The records of one opened input, in its own order; closes it at the end."""
    t = opened.tally
    try:
        if opened.table is not None:
            yield from opened.table.records(reading.format, reading.trace_block_size)
        elif opened.kind in (SERVER_LOG, SERVER_LOG_JSON):
            assert opened.stream is not None
            yield from server_log_records(iter_lines(opened.stream, reading.max_line_bytes), t,
                                          max_log_len=reading.max_log_len, log_year=reading.log_year,
                                          json_records=opened.kind == SERVER_LOG_JSON)
        else:
            assert opened.stream is not None
            yield from jsonl_records(opened.stream, t, reading)
    finally:
        opened.close()


def jsonl_records(stream: BinaryIO, tally: FileTally, reading: Reading) -> Iterator[Record]:
    """One record per line of a JSON Lines file."""
    for line_no, data in iter_lines(stream, reading.max_line_bytes):
        tally.lines += 1
        if isinstance(data, Oversize):
            mb = reading.max_line_bytes / (1 << 20)
            yield Rejected(line_no, LineError(
                f"line is {data.n_bytes:,} bytes, longer than the {mb:g} MB limit; "
                "raise it with --max-line-mb if such requests are real", TOO_LONG,
            ), data.head, data.n_bytes)
            continue
        if isinstance(data, CorruptStream):
            yield Rejected(line_no, LineError(
                f"{data}; the lines before it were read, this one and anything after it "
                "were lost", DAMAGED_STREAM,
            ), b"", 0)
            continue
        fast = _fast_row(data, line_no, reading)
        if fast is not None:
            yield Accepted(line_no, fast, len(data))
            continue
        try:
            obj = decode_line(data, line_no == 1)
            if is_otlp(obj) and reading.format in (None, schema.FORMAT_OTEL):
                yield from _spans(line_no, obj, data, tally)
                continue
            row = parse_request(obj, reading.format, reading.trace_block_size)
        except NotARequest as e:
            tally.skipped[e.reason] += 1
            continue
        except LineError as e:
            yield Rejected(line_no, e, data, len(data))
            continue
        yield Accepted(line_no, row, len(data))


def _fast_row(data: bytes, line_no: int, reading: Reading) -> dict[str, Any] | None:
    """A pre-tokenized line's row with its ids read from the bytes (advisor.ingest.token_ids), or
    None: read it the ordinary way (also whenever this way would reject it, for the same words).
    The row is kept only if its ids are the placeholder's (the list that was cut out) and the
    placeholder shows nowhere else in it."""
    if reading.format not in (None, schema.FORMAT_COMPLETION):
        return None
    split = split_ids(data)
    if split is None:
        return None
    line, ids = split
    try:
        obj = decode_line(line, line_no == 1)
        if is_otlp(obj):
            return None
        row = parse_request(obj, reading.format, reading.trace_block_size)
    except (LineError, NotARequest):
        return None
    got = row.get("prompt_token_ids")
    if row.get("kind") != schema.KIND_TOKENS or not (isinstance(got, list) and got == [PLACEHOLDER]):
        return None
    mark = str(PLACEHOLDER)
    if any(isinstance(v, str) and mark in v for v in row.values()):
        return None
    row["prompt_token_ids"] = ids
    return row


def _spans(line_no: int, obj: dict[str, Any], data: bytes, tally: FileTally) -> Iterator[Record]:
    """The model-call spans of one OTLP line, each a unit of its own (on the same line)."""
    seen = 0
    for got, span in parse_otlp(obj):
        seen += 1
        if isinstance(got, NotARequest):
            tally.skipped[got.reason] += 1
        elif isinstance(got, LineError):
            raw = json.dumps(span, ensure_ascii=False).encode()
            yield Rejected(line_no, got, raw, len(raw))
        else:
            yield Accepted(line_no, got, len(data) // seen)
    if not seen:
        tally.skipped["an OTLP line without spans"] += 1


# --- one file as an executor's piece ----------------------------------------------------
CHUNK = 2048  # records per compressed chunk of a parsed file


@dataclass(frozen=True)
class FilePiece:
    """One file of a folder or glob to parse on a worker (`parse_file`)."""

    item: Input
    reading: Reading


@dataclass
class ParsedFile:
    """A file's records, parsed on a worker: its tally after the whole file was read, and the
    records in file order as zstd-compressed pickles of CHUNK records each; or why the
    file is no log (`refused`, as `open_input` says it)."""

    tally: FileTally | None
    refused: str | None = None
    chunks: list[bytes] = field(default_factory=list)


def parse_file(piece: FilePiece) -> ParsedFile:
    """Open, classify and read one file (module docstring)."""
    try:
        opened = open_input(piece.item, None, piece.reading)
    except InputRefused as e:
        return ParsedFile(None, str(e))
    records = file_records(opened, piece.reading)
    compressor = zstandard.ZstdCompressor(level=1)
    chunks = []
    while batch := list(itertools.islice(records, CHUNK)):
        chunks.append(compressor.compress(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)))
    return ParsedFile(opened.tally, None, chunks)


def parsed_records(parsed: ParsedFile) -> Iterator[Record]:
    """The records of `parse_file`'s result, in file order; each chunk is dropped once read."""
    decompressor = zstandard.ZstdDecompressor()
    for i, chunk in enumerate(parsed.chunks):
        parsed.chunks[i] = b""
        yield from pickle.loads(decompressor.decompress(chunk))


# --- many files -------------------------------------------------------------------------
def merged_records(streams: list[Iterator[Record]], tallies: list[FileTally]) -> Iterator[tuple[int, Record]]:
    """One file: its records as they come. Several: merged by logged time (stable); a file
    whose own times go back is still read in its order, and a note says so."""
    if len(streams) == 1:
        for rec in streams[0]:
            yield 0, rec
        return

    def keyed(i: int, records: Iterator[Record]) -> Iterator[tuple[float, int, int, Record]]:
        last = float("-inf")
        for seq, rec in enumerate(records):
            if isinstance(rec, Accepted) and rec.row.get("timestamp") is not None:
                if rec.row["timestamp"] < last:
                    tallies[i].note("the file is not in time order: merged in its own order, so the merged "
                                    "requests are not all in time order either")
                last = max(last, rec.row["timestamp"])
            yield last, i, seq, rec

    for _, i, _, rec in heapq.merge(*itertools.starmap(keyed, enumerate(streams))):
        yield i, rec
