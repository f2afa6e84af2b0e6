"""Pre-tokenized JSON lines, fast: a line's `"prompt_token_ids": [...]` list read from its bytes.

Input: one JSON line's bytes. Output (`split_ids`): the line with that list replaced by the
one-id list `[PLACEHOLDER]`, and the ids as an int32 array; None when the line is not of the
plain shape below, and then the caller reads it as it is (advisor.ingest.sources). Also
`token_id_column`: the `prompt_token_ids` column of a row group, from rows holding arrays,
lists or None.

Why: on a pre-tokenized log, decoding millions of ids into Python ints, checking each one's
type and range in Python and converting them back for Arrow is most of ingest's time. Here
the list's bytes are checked and parsed by numpy, and JSON decodes the rest of the line.

What is read this way, so that it equals `json` + `fields.check_ids` exactly:
- the key `"prompt_token_ids"` occurs once in the line, followed by `:` and `[` (JSON
  whitespace around `:`);
- the list's bytes are digits, commas and spaces only, all of it parsed by numpy (which
  stops at two ids with no comma between them) into one id per element between commas, each
  element's digits exactly the canonical digits of the id read from it (so no element is
  empty, which numpy may read as 0, and none has a leading zero), each id at most INT32_MAX
  (numpy reads a longer one as int64's maximum, which fails that too).
Anything else (an empty list or element, a leading zero, a negative or fractional id, `true`,
an id past the range, a tab in the list, a second such key) goes the ordinary way, so every error message is
the one it always was. The caller then checks that the row it parsed took its ids from the
placeholder (module `sources`, `_fast_row`): the placeholder's digits appear nowhere else in
the line, so a row whose ids are `[PLACEHOLDER]` got them from the very list that was cut out.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa

KEY = b'"prompt_token_ids"'
PLACEHOLDER = 1234567890  # below INT32_MAX: the id check passes it
_PLACEHOLDER_BYTES = str(PLACEHOLDER).encode()
_INT32_MAX = 2**31 - 1
_WS = b" \t\r\n"
# the ids written with w digits: _LOW[w] <= id < _HIGH[w] (none with 0 digits, nor with 11 or more)
_LOW = np.array([1, 0] + [10**(w - 1) for w in range(2, 12)], np.int64)
_HIGH = np.array([0] + [10**w for w in range(1, 11)] + [0], np.int64)
_COMMA = ord(",")
_SPACE_OR_COMMA = max(ord(" "), ord(","))  # below every digit


def split_ids(data: bytes) -> tuple[bytes, np.ndarray] | None:
    """(the line with its id list replaced by `[PLACEHOLDER]`, the ids) or None (module docstring)."""
    i = data.find(KEY)
    if i < 0 or data.find(KEY, i + 1) >= 0:
        return None
    j = _skip(data, i + len(KEY))
    if data[j:j + 1] != b":":
        return None
    j = _skip(data, j + 1)
    if data[j:j + 1] != b"[":
        return None
    k = data.find(b"]", j)
    if k < 0:
        return None
    span = data[j + 1:k]
    if not span or span.translate(None, b"0123456789, "):
        return None
    ids = _parse(span)
    if ids is None:
        return None
    head, tail = data[:j], data[k + 1:]
    if _PLACEHOLDER_BYTES in head or _PLACEHOLDER_BYTES in tail:
        return None
    return head + b"[" + _PLACEHOLDER_BYTES + b"]" + tail, ids


def _skip(data: bytes, j: int) -> int:
    while j < len(data) and data[j] in _WS:
        j += 1
    return j


def _parse(span: bytes) -> np.ndarray | None:
    """The ids of `span` (digits, commas and spaces), or None unless every element between
    commas is one id written as JSON writes it: its digits are exactly the canonical digits of
    the value numpy read (no empty element, which numpy may read as 0; no leading zero), and it
    is at most INT32_MAX."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # older numpy warns, and stops, where the text does not parse to its end
        try:
            ids = np.fromstring(span, dtype=np.int64, sep=",")  # spaces around a comma are skipped
        except (ValueError, DeprecationWarning):
            return None
    raw = np.frombuffer(span, np.uint8)
    commas = np.flatnonzero(raw == _COMMA)
    if len(ids) != len(commas) + 1 or ids.max() > _INT32_MAX:  # past int64, numpy gives its max
        return None
    digits = np.zeros(len(raw) + 1, np.int64)
    np.cumsum(raw > _SPACE_OR_COMMA, out=digits[1:])  # digits before each position
    written = np.diff(digits[np.concatenate(([0], commas, [len(raw)]))])  # each element's digits
    width = np.minimum(written, len(_LOW) - 1)  # past 10 digits no id fits: the bounds there fail
    if not ((ids >= _LOW[width]) & (ids < _HIGH[width])).all():
        return None
    return ids.astype(np.int32)


def token_id_column(values: list[object]) -> pa.Array:
    """The `prompt_token_ids` column (list<int32>) of rows holding int32 arrays, lists of ints
    or None, built from one flat array (Arrow converts an array inside a list id by id)."""
    lengths = np.fromiter((0 if v is None else len(v) for v in values), np.int64, len(values))  # type: ignore[arg-type]
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    assert offsets[-1] < 2**31, "a row group of ingest holds far fewer ids"
    offsets = offsets.astype(np.int32)
    parts = [np.asarray(v, np.int32) for v in values if v is not None]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    mask = pa.array([v is None for v in values], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=mask)
