"""Byte level of ingest: open a log, undo its compression, split lines, word refusals.

Input: a path or a binary stream (stdin). Output: `(line_number, payload)` pairs where
the payload is the line's bytes (without its newline), or an `Oversize` record for a line
longer than the limit, which is never held in memory whole: it is read in chunks and
skipped to its newline.

Compression is recognised by magic bytes (gzip `1f 8b`, Zstandard `28 b5 2f fd`), never by
the file name alone. `read_head` takes the first 64 KiB of the decompressed stream, from
which advisor.ingest.sources decides what the file is; the `refuse_*` helpers here raise
`InputRefused`, naming the file and the fix, for what it is not (binary data, one JSON
array document, pretty-printed JSON, text).
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from advisor.errors import InputRefused

SNIFF_BYTES = 64 * 1024
SNIFF_LINES = 50
READ_CHUNK = 1 << 20
ZSTD_IN = 64 * 1024  # compressed bytes fed to the zstd decompressor at a time
RAW_KEEP = 64 * 1024  # bytes of a rejected line kept in rejects.jsonl

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Magic bytes of files people mistake for logs, and what to call them in the refusal.
_BINARY_MAGIC = (
    (b"PAR1", "a Parquet file"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"%PDF", "a PDF document"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"BZh", "a bzip2 file (decompress it first, or recompress as .gz or .zst)"),
    (b"\xfd7zXZ\x00", "an xz file (decompress it first, or recompress as .gz or .zst)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"\x7fELF", "an executable"),
    (b"\x89PNG", "a PNG image"),
    (b"ARROW1", "an Arrow IPC file"),
)

_JSONL_HINT = (
    "pc-advise reads JSON Lines (one request object per line), vLLM server logs, and Parquet or "
    ".csv tables (see docs/formats.md; `jq -c '.[]' file.json > file.jsonl` converts a JSON array)."
)


@dataclass(frozen=True)
class Oversize:
    """A line longer than the limit: its length and its first bytes only."""

    n_bytes: int
    head: bytes


class _Prepend(io.RawIOBase):
    """A raw stream that serves `head` first, then the rest of `stream`."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = memoryview(head)
        self._read = getattr(stream, "read1", stream.read)  # never wait to fill the buffer

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._head.nbytes:
            n = min(len(b), self._head.nbytes)
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._read(len(b))
        n = len(data)
        b[:n] = data
        return n


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    parts: list[bytes] = []
    while n > 0:
        data = stream.read(n)
        if not data:
            break
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


class CorruptStream(Exception):
    """The compressed stream broke off or is damaged; carries the decompressor's words."""


class _Guarded(io.RawIOBase):
    """Turns a decompressor's errors into CorruptStream so the line reader can report them."""

    def __init__(self, stream: BinaryIO, what: str) -> None:
        # read1: one decompression step at a time, so damage loses only the bytes after it
        self._read = getattr(stream, "read1", stream.read)
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            data = self._read(len(b))
        except (EOFError, OSError, zlib.error, ValueError) as e:
            raise CorruptStream(f"the {self._what} stream is damaged or cut off ({e})") from e
        n = len(data)
        b[:n] = data
        return n


def open_decompressed(raw: BinaryIO) -> tuple[BinaryIO, str]:
    """Wrap `raw` in the decompressor its magic bytes call for; returns (stream, compression)."""
    magic = _read_exact(raw, 4)
    src: BinaryIO = io.BufferedReader(_Prepend(magic, raw), READ_CHUNK)  # type: ignore[arg-type]
    if magic.startswith(GZIP_MAGIC):
        inner: BinaryIO = gzip.GzipFile(fileobj=src, mode="rb")  # type: ignore[assignment]
        return io.BufferedReader(_Guarded(inner, "gzip"), READ_CHUNK), "gzip"  # type: ignore[arg-type]
    if magic == ZSTD_MAGIC:
        return io.BufferedReader(_Zstd(src), READ_CHUNK), "zstd"  # type: ignore[arg-type]
    return src, "none"


class _Zstd(io.RawIOBase):
    """Zstandard frames one after another; a frame cut off at the end raises CorruptStream.

    (zstandard's stream_reader ends quietly at a truncated frame, so frames are fed to a
    decompressobj here and the end of input checked against the frame's end.) Input goes
    in ZSTD_IN pieces so one piece's output stays small however well the log compresses.
    """

    def __init__(self, src: BinaryIO) -> None:
        import zstandard

        self._zstd = zstandard
        self._src = src
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._fed = False  # the current frame has received input
        self._out = memoryview(b"")
        self._error: CorruptStream | None = None  # raised once the output before it is served

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._out.nbytes:
            if self._error is not None:
                raise self._error
            chunk = self._src.read(ZSTD_IN)
            if not chunk:
                if self._fed and not self._obj.eof:
                    raise CorruptStream("the zstd stream is cut off (its last frame is incomplete)")
                return 0
            out: list[bytes] = []
            try:
                while chunk:
                    out.append(self._obj.decompress(chunk))
                    self._fed = True
                    chunk = b""
                    if self._obj.eof:  # the next frame starts in the unused bytes
                        chunk = self._obj.unused_data
                        self._obj = self._zstd.ZstdDecompressor().decompressobj()
                        self._fed = False
            except self._zstd.ZstdError as e:
                self._error = CorruptStream(f"the zstd stream is damaged ({e})")
            self._out = memoryview(b"".join(out))
        n = min(len(b), self._out.nbytes)
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


class _Failing(io.RawIOBase):
    """A stream whose next read raises the error met while the head was read."""

    def __init__(self, error: CorruptStream) -> None:
        self._error = error

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        raise self._error


def read_head(stream: BinaryIO) -> tuple[bytes, BinaryIO]:
    """The first SNIFF_BYTES of `stream`, and a stream that still yields everything.

    A damaged compressed stream inside the head is not raised here: the lines before the
    damage are still read, and the damage then surfaces where it is.
    """
    parts: list[bytes] = []
    n = SNIFF_BYTES
    rest: BinaryIO = stream
    while n > 0:
        try:
            data = stream.read1(n)  # type: ignore[attr-defined]
        except CorruptStream as e:
            rest = _Failing(e)  # type: ignore[assignment]
            break
        if not data:
            break
        parts.append(data)
        n -= len(data)
    head = b"".join(parts)
    return head, io.BufferedReader(_Prepend(head, rest), READ_CHUNK)  # type: ignore[arg-type]


def sniff_lines(head: bytes) -> list[bytes]:
    """The first non-blank lines of `head` (stripped, BOM dropped), for classifying the input."""
    lines = head.split(b"\n")
    if len(head) == SNIFF_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last piece may be cut at the sniff boundary
    lines = [ln.strip() for ln in lines]
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:].strip()
    return [ln for ln in lines if ln][:SNIFF_LINES]


def refuse_binary(head: bytes, compression: str, label: str) -> None:
    """InputRefused for a binary file people mistake for a log (`label`: "the input ", "x.gz ")."""
    where = "" if compression == "none" else f" (after {compression} decompression)"
    for magic, what in _BINARY_MAGIC:
        if head.startswith(magic):
            fix = (" Give the Parquet file itself, uncompressed (Parquet compresses inside)."
                   if magic == b"PAR1" else f" {_JSONL_HINT}")
            raise InputRefused(f"{label}is {what}{where}, not a log pc-advise reads.{fix}")
    if compression == "none" and (head.startswith(GZIP_MAGIC) or head.startswith(ZSTD_MAGIC)):
        raise InputRefused(f"{label}is compressed twice; decompress it once first.")


def refuse_json_document(lines: list[bytes], compression: str, label: str) -> bool:
    """InputRefused for one JSON array/object spread over the file; False when the first
    lines are JSON Lines (some line starts with `{`)."""
    where = "" if compression == "none" else f" (after {compression} decompression)"
    first = lines[0]
    if first.startswith(b"["):
        if not _is_json(first) or not any(ln.startswith(b"{") for ln in lines[1:]):
            raise InputRefused(f"{label}is one JSON array document{where}, not JSON Lines. {_JSONL_HINT}")
        return True  # JSONL whose first line happens to be an array: rejected per line
    if first == b"{" or (first.startswith(b"{") and not _is_json(first) and _pretty(lines)):
        raise InputRefused(f"{label}is one JSON document spread over several lines{where}, not JSON Lines. "
                           f"{_JSONL_HINT}")
    return any(ln.startswith(b"{") for ln in lines)


def refuse_text(head: bytes, lines: list[bytes], compression: str, label: str) -> None:
    where = "" if compression == "none" else f" (after {compression} decompression)"
    what = _describe(head, lines).removeprefix("the input ")
    raise InputRefused(f"{label}{what}{where}, not a log pc-advise reads. {_JSONL_HINT}")


def table_kind(lines: list[bytes]) -> str | None:
    """"CSV", "TSV" or "semicolon-separated" when the first lines split evenly on it."""
    for sep, name in ((b",", "CSV"), (b"\t", "TSV"), (b";", "semicolon-separated")):
        counts = [ln.count(sep) for ln in lines[:10]]
        if counts and counts[0] > 0 and len(set(counts)) == 1:
            return name
    return None


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _pretty(lines: list[bytes]) -> bool:
    """Lines that look like the inside of an indented JSON object ("key": value,)."""
    inner = lines[1:6]
    return bool(inner) and all(ln.startswith(b'"') or ln in (b"}", b"},", b"]") for ln in inner)


def _describe(head: bytes, lines: list[bytes]) -> str:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "the input is UTF-16 text (re-encode it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8)"
    if b"\x00" in head[:4096]:
        return "the input is binary data (it contains NUL bytes)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the sniff boundary
            return "the input is binary data (not UTF-8 text)"
    table = table_kind(lines)
    if table is not None:
        return (f"the input looks like {table} (first line: {_preview(lines[0])}; a .csv or .tsv file "
                "is read as a table)")
    return f"the input is text but no line starts with '{{' (first line: {_preview(lines[0])})"


def _preview(line: bytes, n: int = 80) -> str:
    text = line[:n].decode("utf-8", errors="replace")
    return repr(text + ("..." if len(line) > n else ""))


def iter_lines(
    stream: BinaryIO, max_line_bytes: int
) -> Iterator[tuple[int, bytes | Oversize | CorruptStream]]:
    """Yield (1-based line number, line bytes without newline / Oversize / CorruptStream).

    `readline(limit)` never returns more than `limit` bytes, so an oversized line is
    consumed in READ_CHUNK pieces without being joined. A trailing '\\r' (CRLF files) is
    dropped. A final line without a newline counts; the empty string after a final
    newline does not. A damaged compressed stream ends the input with one CorruptStream
    item carrying whatever partial line preceded the damage.
    """
    line_no = 0
    readline = stream.readline
    while True:
        try:
            data = readline(max_line_bytes + 1)
        except CorruptStream as e:
            yield line_no + 1, e
            return
        if not data:
            return
        line_no += 1
        if data.endswith(b"\n"):
            data = data[:-1]
            yield line_no, data[:-1] if data.endswith(b"\r") else data
            continue
        if len(data) <= max_line_bytes:  # the last line, without a newline
            yield line_no, data[:-1] if data.endswith(b"\r") else data
            return
        head, total = data[:RAW_KEEP], len(data)
        try:
            while True:
                more = readline(READ_CHUNK)
                total += len(more)
                if not more or more.endswith(b"\n"):
                    if more:
                        total -= 1
                    break
        except CorruptStream as e:
            yield line_no, e
            return
        yield line_no, Oversize(total, head)
        if not more:
            return
