"""Typed reading of one log line: bytes -> JSON object, and field readers that name the fix.

Input: a line's bytes, or a decoded field value and its path ("messages[2].content").
Output: the JSON object / the value in the type requests.parquet stores, or a `LineError`
whose reason says what is wrong and what would fix it. Used by advisor.ingest.formats, which
knows the request shapes; nothing here knows a format.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from typing import Any

from advisor.jsonio import dumps_compact, fast_loads, finite_or_marked

# Reject causes (counted in the ingest summary).
EMPTY = "empty"
TOO_LONG = "too_long"
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_OBJECT = "not_object"
UNKNOWN_SHAPE = "unknown_shape"
WRONG_FIELD = "wrong_field"
DAMAGED_STREAM = "damaged_stream"

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


class LineError(Exception):
    """A line that cannot become a request: `reason` is for the person reading rejects."""

    def __init__(self, reason: str, cause: str = WRONG_FIELD) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


class NotARequest(LineError):
    """A well-formed record of a known format that is no model request at all (a tracing
    span around a tool call, an embedding call): counted as skipped, by `reason`, not rejected."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, "skipped")


def type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def is_int(v: Any) -> bool:
    return type(v) is int


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decode_json = json.JSONDecoder(parse_constant=_no_constants, parse_float=finite_or_marked).decode
_BOM = "\ufeff".encode()
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def decode_line(data: bytes, first_line: bool = False) -> dict[str, Any]:
    """The JSON object on one line (LineError for empty, non-UTF-8, invalid JSON, non-object)."""
    if not data.strip():
        raise LineError("empty line (or only whitespace); remove it", EMPTY)
    obj = fast_loads(data[len(_BOM):] if first_line and data.startswith(_BOM) else data)
    if isinstance(obj, dict):
        return obj  # anything else (MISS, a non-object) is read below, which names the problem
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineError(
            f"not valid UTF-8: byte 0x{data[e.start]:02x} at byte {e.start + 1}; "
            "re-encode the log as UTF-8", INVALID_UTF8,
        ) from None
    if first_line and text.startswith("\ufeff"):
        text = text[1:]
    try:
        obj = _decode_json(text)
    except json.JSONDecodeError as e:
        end = len(text.rstrip())
        if e.msg.startswith("Unterminated string") or e.pos >= end:
            what = "a string opened" if e.msg.startswith("Unterminated string") else "a value at"
            raise LineError(
                f"truncated JSON: the line ends inside {what} column {e.colno}; "
                "was the log cut off while it was written?", INVALID_JSON,
            ) from None
        if e.msg == "Extra data":
            raise LineError(
                f"more than one JSON value on the line (extra data at column {e.colno}); "
                "put one request object per line", INVALID_JSON,
            ) from None
        raise LineError(f"invalid JSON at column {e.colno}: {e.msg}", INVALID_JSON) from None
    except ValueError as e:
        raise LineError(f"invalid JSON: {e}", INVALID_JSON) from None
    except RecursionError:
        raise LineError("invalid JSON: nested too deeply to read", INVALID_JSON) from None
    if not isinstance(obj, dict):
        raise LineError(
            f"the line is {type_name(obj).replace('a list', 'a JSON array')}, not a JSON object; "
            "each line must be one request object", NOT_OBJECT,
        )
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise LineError(
                "a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its "
                "pair), which is not valid Unicode; fix the program that wrote the log",
                INVALID_UTF8,
            ) from None
    return obj


# --- small typed readers: each names the field's path in its error ---
def as_str(v: Any, path: str) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise LineError(f"{path} is {type_name(v)}; expected a string")


def as_id(v: Any) -> str | None:
    """An identifier given as a string or an integer; anything else is not an id."""
    if isinstance(v, str) and v:
        return v
    if is_int(v):
        return str(v)
    return None


def as_count(v: Any, path: str, minimum: int = 0) -> int | None:
    if v is None:
        return None
    if not is_int(v):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise LineError(f"{path} is {type_name(v)}; expected an integer")
    if v < minimum:
        raise LineError(f"{path} is {v}; expected an integer >= {minimum}")
    if v > INT64_MAX:
        raise LineError(f"{path} is {v}; expected an integer below 2**63")
    return v


def as_logprob_count(v: Any, path: str) -> int | None:
    """A logprobs count as vLLM's OpenAI server takes it: an integer >= 0, or -1 for the
    whole vocabulary; null when not asked."""
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not is_int(v) or not -1 <= v <= INT64_MAX:
        shown = type_name(v) if not is_int(v) else str(v)
        raise LineError(f"{path} is {shown}; expected an integer >= 0 (or -1 for every token), as vLLM "
                        "accepts it; fix or drop the field")
    return v


def as_flag(v: Any, path: str) -> bool:
    """A JSON boolean (null or absent: false)."""
    if v is None:
        return False
    if not isinstance(v, bool):
        raise LineError(f"{path} is {type_name(v)}; expected true or false")
    return v


def as_finite(v: int | float, path: str) -> float:
    try:
        f = float(v)
    except OverflowError:
        raise LineError(f"{path} is a number too large for a float") from None
    if not math.isfinite(f):
        raise LineError(f"{path} is {f}; expected a finite number")
    return f


def as_seconds(v: Any, path: str, scale: float) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise LineError(f"{path} is {type_name(v)}; expected a number")
    f = as_finite(v, path)
    if f < 0:
        raise LineError(f"{path} is {v}; expected a non-negative number")
    return f * scale


def parse_time(v: Any, path: str, scale: float) -> float:
    """A timestamp in float seconds: a number in the unit `scale` says, or an ISO-8601 string."""
    if isinstance(v, str):
        s = v.strip()
        try:
            return as_finite(float(s), path) * scale
        except ValueError:
            pass
        try:
            dt = datetime.fromisoformat(s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s)
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
            return dt.timestamp()
        except (ValueError, OverflowError):
            raise LineError(
                f"{path} is {v[:40]!r}; expected seconds since the epoch or an ISO-8601 time "
                "like 2026-11-03T10:00:05Z"
            ) from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise LineError(f"{path} is {type_name(v)}; expected a number or an ISO-8601 string")
    return as_finite(v, path) * scale


def first_time(sources: list[dict[str, Any]], keys: tuple[tuple[str, float], ...]) -> float | None:
    for src in sources:
        for key, scale in keys:
            v = src.get(key)
            if v is not None:
                return parse_time(v, key, scale)
    return None


def first_seconds(src: dict[str, Any], keys: tuple[tuple[str, float], ...]) -> float | None:
    for key, scale in keys:
        if src.get(key) is not None:
            return as_seconds(src[key], key, scale)
    return None


def json_object(v: Any, path: str) -> dict[str, Any] | None:
    """Gateways sometimes log the request/response as a JSON string: accept both."""
    if v is None or isinstance(v, dict):
        return v
    if isinstance(v, str) and v.lstrip().startswith("{"):
        try:
            obj = json.loads(v)
        except ValueError:
            raise LineError(f"{path} is a string that is not valid JSON; expected an object") from None
        if isinstance(obj, dict):
            return obj
    raise LineError(f"{path} is {type_name(v)}; expected an object")


def dump_json(v: Any) -> str:
    return dumps_compact(v)


# --- request bodies ---
def check_ids(v: Any, path: str, upper: int, what: str) -> list[int]:
    """A list of non-negative integer ids below `upper` (token ids or hash ids)."""
    if not isinstance(v, list):
        raise LineError(f"{path} is {type_name(v)}; expected a list of {what}s")
    if all(type(t) is int for t in v) and (not v or (min(v) >= 0 and max(v) <= upper)):
        return v
    for i, t in enumerate(v):
        if type(t) is not int:
            raise LineError(f"{path}[{i}] is {type_name(t)}; expected a non-negative integer {what}")
        if t < 0 or t > upper:
            raise LineError(f"{path}[{i}] is {t}; expected a non-negative integer {what} below {upper + 1}")
    raise AssertionError("unreachable")
