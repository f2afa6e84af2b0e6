"""JSON text <-> Python values through orjson, only where that gives what the standard library gives.

Input: a JSON text (bytes or str), or a value to write. Output: the same Python value
`json.loads` would give, or the compact JSON text of a value (`json.dumps(v,
ensure_ascii=False, separators=(",", ":"))` up to how a float is spelled: `1e-05` is written
`0.00001`; both read back as the same float).

Ingest reads every log line and writes each request's messages and tools back as text;
tokenize reads those texts again. The standard library spends most of ingest's time there;
orjson does the same work several times faster. Where the two would not agree, the caller's
standard-library path decides:
- `fast_loads` gives `MISS` for any text orjson refuses (invalid JSON, invalid UTF-8, a lone
  surrogate, NaN, a number beyond a double such as 1e400, nesting past 1024), so the
  caller's own decoder reads it and names the problem in its own words; and for a text with
  a run of 20 digits (or a minus and 19), where orjson would read an integer beyond 64 bits as
  a float and the standard library keeps it exact.
- `dumps_compact` writes with the standard library any value orjson refuses: an integer
  beyond 64 bits, or a float subclass such as `NonFinite` (a number a standard decoder read
  as infinity), which orjson would otherwise write as null.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

MISS = object()  # `fast_loads`: read this text the standard way
# orjson keeps an integer exact from -2**63 to 2**64 - 1; one with 20 digits, or 19 and a minus
# sign, may lie beyond (a text holding such a run anywhere is read the standard way). Found by
# turning every digit into NUL (which a JSON text orjson read holds nowhere else) and searching
# for the runs: about 1 GB/s, where a regular expression reads 70-110 MB/s.
_DIGITS_TO_NUL = bytes(0 if 0x30 <= b <= 0x39 else b for b in range(256))
_RUN, _NEGATIVE_RUN = b"\0" * 20, b"-" + b"\0" * 19


class NonFinite(float):
    """A number literal too large for a double, read as +-inf by the standard library (e.g.
    `1e400`): a float still, and marked, so that `dumps_compact` writes it as the standard
    library does (`Infinity`) rather than as orjson would (null)."""


def finite_or_marked(literal: str) -> float:
    """A `parse_float` for `json.JSONDecoder`: the float, marked `NonFinite` where it overflows."""
    value = float(literal)
    return value if value - value == 0.0 else NonFinite(value)


def fast_loads(text: bytes | bytearray | memoryview | str) -> Any:
    """The value of `text` as `json.loads` reads it, or MISS (module docstring)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return MISS
    digits = (text.encode("utf-8") if isinstance(text, str) else bytes(text)).translate(_DIGITS_TO_NUL)
    return MISS if _RUN in digits or _NEGATIVE_RUN in digits else value


def loads(text: bytes | str) -> Any:
    """`json.loads(text)`'s value, through orjson where it agrees."""
    value = fast_loads(text)
    return json.loads(text) if value is MISS else value


def dumps_compact(value: Any) -> str:
    """The compact JSON text of `value`, non-ASCII kept as it is (module docstring)."""
    try:
        return orjson.dumps(value).decode("utf-8")
    except TypeError:  # orjson.JSONEncodeError is one
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
