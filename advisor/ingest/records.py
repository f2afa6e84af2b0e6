"""What a source reader hands the ingest sink: accepted rows, rejected units, and a tally.

A *unit* is what one reject or one accepted row stands for: a line of JSON Lines, a row of
a Parquet/CSV table, a span of an OTLP export, a request id of a vLLM server log (whose
lines are joined first). Every unit a reader meets becomes exactly one `Accepted` or one
`Rejected`, so `units read == accepted + rejected` holds for every format. Lines that are
no unit at all (a server log's start-up and metrics lines, a span that is no model call)
are counted in `FileTally.skipped` by why, never silently dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from advisor.ingest.fields import LineError


@dataclass(frozen=True, slots=True)
class Accepted:
    """One request: `row` holds schema.REQUESTS columns (less request_id and line)."""

    line: int  # 1-based line (or table row) of the file where the request is logged
    row: dict[str, Any]
    n_bytes: int  # source bytes it came from (row groups close on them)


@dataclass(frozen=True, slots=True)
class Rejected:
    """One unit that is not a request, with the reason and the bytes to show for it."""

    line: int
    error: LineError
    raw: bytes
    n_bytes: int


Record = Accepted | Rejected


@dataclass
class FileTally:
    """Per input file: what it was read as, its physical lines, and what was skipped."""

    name: str | None  # as shown in rejects and notes (None: standard input)
    kind: str = "jsonl"  # jsonl | vllm-log | parquet | csv
    compression: str = "none"
    lines: int = 0  # physical lines (table rows) read
    units: int = 0  # accepted + rejected
    accepted: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # lines/spans that are no request, by why
    notes: list[str] = field(default_factory=list)  # what was approximated or assumed, once each

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.name, "kind": self.kind, "compression": self.compression, "lines": self.lines,
                "read": self.units, "accepted": self.accepted, "rejected": self.units - self.accepted,
                "skipped_lines": dict(self.skipped)}
