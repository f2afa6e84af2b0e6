"""Line level of ingest: one log line's bytes -> one requests.parquet row, or a reason.

Input: the bytes of one line. Output: a `dict` of schema.REQUESTS columns (without
`request_id`, `line`, and a synthesized `timestamp`, which depend on the whole file), or
a `LineError` whose reason says what is wrong with the line and what would fix it,
e.g. "messages[2].content is a number; expected a string or a list of content parts".

Formats (DESIGN §3, docs/formats.md), detected per line unless one is forced:
  openai-chat   bare chat body {"model","messages","tools"?,...}, or a wrapper
                {"timestamp"|"created", "request": {...}, "response": {...}} whose
                response gives usage.completion_tokens / the reply text
  openai-batch  {"custom_id","method","url","body": {...}}
  completion    {"prompt": "..."} or {"prompt_token_ids": [...]}, bare or wrapped
  hash-trace    {"timestamp","input_length","output_length","hash_ids"} (Mooncake: ms from
                the trace start; Alibaba Bailian, recognised by "chat_id": seconds)

Fields read besides the request itself (first one present wins, wrapper before body):
  request id   wrapper/body "request_id", "id"; batch "custom_id"; response "id";
               Bailian "chat_id"
  timestamp    "timestamp", "created", "created_at", "time", "ts", "start_time",
               "arrival_time", "request_time" in seconds; the same names ending in "_ms"
               in milliseconds ("_us", "_ns" likewise); ISO-8601 strings (no zone = UTC).
               The unit comes from the format and the field name, never the magnitude.
  session_id   "session_id", "conversation_id", "session", "conversation", "thread_id"
               (wrapper, then wrapper/body "metadata"), then the body's "user"
  lora         "lora", "lora_name", "adapter", "lora_request.lora_name"
  cache_salt   "cache_salt"
  latency_s    "latency_s", "latency", "e2e_latency", "duration" (s); "..._ms" (ms)
  ttft_s       "ttft_s", "ttft", "time_to_first_token" (s); "..._ms" (ms)
  output       response usage.completion_tokens, else wrapper "output_tokens",
               "completion_tokens", "output_length"; max_tokens is kept apart (an upper
               bound, never an output length)
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from typing import Any

from advisor import schema

# Reject causes (counted in the ingest summary).
EMPTY = "empty"
TOO_LONG = "too_long"
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_OBJECT = "not_object"
UNKNOWN_SHAPE = "unknown_shape"
WRONG_FIELD = "wrong_field"
DAMAGED_STREAM = "damaged_stream"

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

_SECONDS_KEYS = ("timestamp", "created", "created_at", "time", "ts", "start_time",
                 "arrival_time", "request_time")
_TIME_KEYS = tuple(
    (k + suffix, scale)
    for k in _SECONDS_KEYS
    for suffix, scale in (("", 1.0), ("_s", 1.0), ("_ms", 1e-3), ("_us", 1e-6), ("_ns", 1e-9))
)
_SESSION_KEYS = ("session_id", "conversation_id", "session", "conversation", "thread_id")
_LORA_KEYS = ("lora", "lora_name", "adapter")
_LATENCY_KEYS = (("latency_s", 1.0), ("latency", 1.0), ("e2e_latency", 1.0), ("duration", 1.0),
                 ("latency_ms", 1e-3), ("e2e_latency_ms", 1e-3), ("duration_ms", 1e-3))
_TTFT_KEYS = (("ttft_s", 1.0), ("ttft", 1.0), ("time_to_first_token", 1.0),
              ("ttft_ms", 1e-3), ("time_to_first_token_ms", 1e-3))
_OUTPUT_KEYS = ("output_tokens", "completion_tokens", "output_length")

_TRIED = (
    'tried openai-chat ("messages", or "request" holding a body), openai-batch '
    '("custom_id" + "body"), completion ("prompt" or "prompt_token_ids") and hash-trace '
    '("hash_ids" + "input_length")'
)


class LineError(Exception):
    """A line that cannot become a request: `reason` is for the person reading rejects."""

    def __init__(self, reason: str, cause: str = WRONG_FIELD) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


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


def _is_int(v: Any) -> bool:
    return type(v) is int


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decode_json = json.JSONDecoder(parse_constant=_no_constants).decode
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def decode_line(data: bytes, first_line: bool = False) -> dict[str, Any]:
    """The JSON object on one line (LineError for empty, non-UTF-8, invalid JSON, non-object)."""
    if not data.strip():
        raise LineError("empty line (or only whitespace); remove it", EMPTY)
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
def _str(v: Any, path: str) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise LineError(f"{path} is {type_name(v)}; expected a string")


def _id(v: Any) -> str | None:
    """An identifier given as a string or an integer; anything else is not an id."""
    if isinstance(v, str) and v:
        return v
    if _is_int(v):
        return str(v)
    return None


def _count(v: Any, path: str, minimum: int = 0) -> int | None:
    if v is None:
        return None
    if not _is_int(v):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise LineError(f"{path} is {type_name(v)}; expected an integer")
    if v < minimum:
        raise LineError(f"{path} is {v}; expected an integer >= {minimum}")
    if v > INT64_MAX:
        raise LineError(f"{path} is {v}; expected an integer below 2**63")
    return v


def _finite(v: int | float, path: str) -> float:
    try:
        f = float(v)
    except OverflowError:
        raise LineError(f"{path} is a number too large for a float") from None
    if not math.isfinite(f):
        raise LineError(f"{path} is {f}; expected a finite number")
    return f


def _seconds(v: Any, path: str, scale: float) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise LineError(f"{path} is {type_name(v)}; expected a number")
    f = _finite(v, path)
    if f < 0:
        raise LineError(f"{path} is {v}; expected a non-negative number")
    return f * scale


def parse_time(v: Any, path: str, scale: float) -> float:
    """A timestamp in float seconds: a number in the unit `scale` says, or an ISO-8601 string."""
    if isinstance(v, str):
        s = v.strip()
        try:
            return _finite(float(s), path) * scale
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
    return _finite(v, path) * scale


def _first_time(sources: list[dict[str, Any]], keys: tuple[tuple[str, float], ...]) -> float | None:
    for src in sources:
        for key, scale in keys:
            v = src.get(key)
            if v is not None:
                return parse_time(v, key, scale)
    return None


def _first_seconds(src: dict[str, Any], keys: tuple[tuple[str, float], ...]) -> float | None:
    for key, scale in keys:
        if src.get(key) is not None:
            return _seconds(src[key], key, scale)
    return None


def _maybe_json_object(v: Any, path: str) -> dict[str, Any] | None:
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


def _dump(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


# --- request bodies ---
def check_messages(v: Any, path: str = "messages") -> str:
    """Validate chat messages; return them as JSON text."""
    if not isinstance(v, list):
        raise LineError(f"{path} is {type_name(v)}; expected a list of message objects")
    if not v:
        raise LineError(f"{path} is an empty list; a chat request needs at least one message")
    for i, m in enumerate(v):
        p = f"{path}[{i}]"
        if not isinstance(m, dict):
            raise LineError(f"{p} is {type_name(m)}; expected a message object with role and content")
        role = m.get("role")
        if role is None:
            raise LineError(f"{p} has no role; expected one of {', '.join(ROLES)}")
        if not isinstance(role, str):
            raise LineError(f"{p}.role is {type_name(role)}; expected a string")
        if role not in ROLES:
            raise LineError(f"{p}.role is {role[:40]!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None:
            if role != "assistant":
                what = "has no content" if "content" not in m else "content is null"
                raise LineError(f"{p} ({role}) {what}; expected a string or a list of content parts")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                pp = f"{p}.content[{j}]"
                if not isinstance(part, dict):
                    raise LineError(f"{pp} is {type_name(part)}; expected a content part object "
                                    'like {"type": "text", "text": "..."}')
                if not isinstance(part.get("type"), str):
                    raise LineError(f"{pp}.type is {type_name(part.get('type'))}; expected a string")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise LineError(f"{pp}.text is {type_name(part.get('text'))}; expected a string")
        elif not isinstance(content, str):
            raise LineError(
                f"{p}.content is {type_name(content)}; expected a string or a list of content parts"
            )
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
            raise LineError(f"{p}.tool_calls is {type_name(calls)}; expected a list of tool-call objects")
        _str(m.get("name"), f"{p}.name")
    return _dump(v)


def check_tools(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, list):
        raise LineError(f"tools is {type_name(v)}; expected a list of tool objects")
    for i, t in enumerate(v):
        if not isinstance(t, dict):
            raise LineError(f"tools[{i}] is {type_name(t)}; expected a tool object")
        fn = t.get("function")
        if fn is not None:
            if not isinstance(fn, dict):
                raise LineError(f"tools[{i}].function is {type_name(fn)}; expected an object")
            if not isinstance(fn.get("name"), str):
                raise LineError(f"tools[{i}].function.name is {type_name(fn.get('name'))}; expected a string")
    return _dump(v)


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


def _completion_prompt(body: dict[str, Any], row: dict[str, Any]) -> None:
    ids = body.get("prompt_token_ids")
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if prompt and all(type(t) is int for t in prompt) or not prompt:
            ids, prompt = prompt if ids is None else ids, None
        elif len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
            if isinstance(prompt, list):
                ids, prompt = prompt if ids is None else ids, None
        else:
            raise LineError(f"prompt is a list of {len(prompt)} prompts; put one prompt per line")
    if ids is not None:
        ids = check_ids(ids, "prompt_token_ids", INT32_MAX, "token id")
        if not ids:
            raise LineError("prompt_token_ids is an empty list; a request needs at least one token")
        row["kind"], row["prompt_token_ids"] = schema.KIND_TOKENS, ids
        row["prompt"] = _str(prompt, "prompt")
        return
    if not isinstance(prompt, str):
        raise LineError(f"prompt is {type_name(prompt)}; expected a string or a list of token ids")
    if not prompt:
        raise LineError("prompt is an empty string; a request needs a prompt")
    row["kind"], row["prompt"] = schema.KIND_COMPLETION, prompt


def _body_fields(body: dict[str, Any], row: dict[str, Any]) -> None:
    """Fields every request body may carry: model, sampling bound, LoRA, salt, user."""
    row["model"] = _str(body.get("model"), "model")
    mt = body.get("max_completion_tokens")
    row["max_tokens"] = _count(mt if mt is not None else body.get("max_tokens"),
                               "max_completion_tokens" if mt is not None else "max_tokens")
    row["cache_salt"] = _str(body.get("cache_salt"), "cache_salt")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise LineError(f"chat_template_kwargs is {type_name(kwargs)}; expected an object")
        row["chat_template_kwargs"] = _dump(kwargs)


def _lora(sources: list[dict[str, Any]]) -> str | None:
    for src in sources:
        for key in _LORA_KEYS:
            if src.get(key) is not None:
                return _str(src[key], key)
        req = src.get("lora_request")
        if isinstance(req, dict) and req.get("lora_name") is not None:
            return _str(req["lora_name"], "lora_request.lora_name")
    return None


def _session(wrapper: dict[str, Any], body: dict[str, Any]) -> str | None:
    for src in (wrapper, wrapper.get("metadata"), body.get("metadata")):
        if isinstance(src, dict):
            for key in _SESSION_KEYS:
                sid = _id(src.get(key))
                if sid is not None:
                    return sid
    return _id(body.get("user"))


def _response(resp: dict[str, Any], row: dict[str, Any]) -> None:
    usage = resp.get("usage")
    if usage is not None:
        if not isinstance(usage, dict):
            raise LineError(f"response.usage is {type_name(usage)}; expected an object")
        row["output_tokens"] = _count(usage.get("completion_tokens"), "response.usage.completion_tokens")
        row["prompt_tokens_logged"] = _count(usage.get("prompt_tokens"), "response.usage.prompt_tokens")
    choices = resp.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        c0 = choices[0]
        msg = c0.get("message")
        text: Any = c0.get("text")
        if isinstance(msg, dict):
            text = msg.get("content")
            if text is None and msg.get("tool_calls") is not None:
                text = _dump(msg["tool_calls"])
        row["output_text"] = _str(text, "response.choices[0] text")


def _new_row(fmt: str) -> dict[str, Any]:
    return {"format": fmt}


def _wrapped(obj: dict[str, Any], fmt: str | None, label: str, bare: bool = False) -> dict[str, Any]:
    """A chat/completion body, bare or wrapped with metadata and a response."""
    body = obj if bare or "request" not in obj else _maybe_json_object(obj["request"], "request")
    if body is None:
        raise LineError("request is null; expected the request body object")
    if "messages" in body and fmt != schema.FORMAT_COMPLETION:
        row = _new_row(schema.FORMAT_CHAT)
        row["kind"], row["messages"] = schema.KIND_CHAT, check_messages(body["messages"])
        row["tools"] = check_tools(body.get("tools"))
    elif ("prompt" in body or "prompt_token_ids" in body) and fmt != schema.FORMAT_CHAT:
        row = _new_row(schema.FORMAT_COMPLETION)
        _completion_prompt(body, row)
    else:
        want = {schema.FORMAT_CHAT: '"messages"', schema.FORMAT_COMPLETION: '"prompt" or "prompt_token_ids"'}
        where = "the request object" if body is not obj else "the line"
        if fmt is None:
            raise LineError(f"no known request shape in {where} (keys: {_keys(body)}); {_TRIED}",
                            UNKNOWN_SHAPE)
        raise LineError(f"{label}{where} has no {want[fmt]} field (keys: {_keys(body)})",
                        UNKNOWN_SHAPE)
    _body_fields(body, row)
    sources = [obj, body] if body is not obj else [obj]
    row["logged_id"] = _first_id(sources, ("request_id", "id"))
    resp = _maybe_json_object(obj.get("response"), "response") if body is not obj else None
    if resp is not None:
        _response(resp, row)
        if row["logged_id"] is None:
            row["logged_id"] = _id(resp.get("id"))
    if row.get("output_tokens") is None:
        for key in _OUTPUT_KEYS:
            if obj.get(key) is not None:
                row["output_tokens"] = _count(obj[key], key)
                break
    row["timestamp"] = _first_time(sources, _TIME_KEYS)
    if row["timestamp"] is None and resp is not None:
        row["timestamp"] = _first_time([resp], _TIME_KEYS)
    row["lora"] = _lora(sources)
    if row["cache_salt"] is None and body is not obj:
        row["cache_salt"] = _str(obj.get("cache_salt"), "cache_salt")
    row["session_id"] = _session(obj, body)
    row["latency_s"] = _first_seconds(obj, _LATENCY_KEYS)
    row["ttft_s"] = _first_seconds(obj, _TTFT_KEYS)
    return row


def _batch(obj: dict[str, Any]) -> dict[str, Any]:
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError(f"body is {type_name(body)}; expected the request body object")
    url = obj.get("url")
    if url is not None and not isinstance(url, str):
        raise LineError(f"url is {type_name(url)}; expected a string like /v1/chat/completions")
    if url is not None and not url.rstrip("/").endswith(("/chat/completions", "/completions")):
        raise LineError(
            f"url is {url[:60]!r}; only /v1/chat/completions and /v1/completions requests "
            "are prefix-cached generations this tool models"
        )
    want = None
    if url is not None:
        want = schema.FORMAT_CHAT if url.rstrip("/").endswith("/chat/completions") else schema.FORMAT_COMPLETION
    row = _wrapped(body, want, f"url {url}: " if url else "", bare=True)
    row["format"] = schema.FORMAT_BATCH
    row["logged_id"] = _id(obj.get("custom_id"))
    if obj.get("custom_id") is not None and row["logged_id"] is None:
        raise LineError(f"custom_id is {type_name(obj['custom_id'])}; expected a string")
    ts = _first_time([obj], _TIME_KEYS)
    if ts is not None:
        row["timestamp"] = ts
    return row


def _hash_trace(obj: dict[str, Any], trace_block_size: int) -> dict[str, Any]:
    row = _new_row(schema.FORMAT_HASH_TRACE)
    row["kind"] = schema.KIND_HASH_TRACE
    if obj.get("input_length") is None:
        raise LineError('hash-trace line has no "input_length" (prompt tokens)', UNKNOWN_SHAPE)
    length = _count(obj["input_length"], "input_length", minimum=1)
    assert length is not None
    ids = check_ids(obj.get("hash_ids"), "hash_ids", INT64_MAX, "hash id")
    need = -(-length // trace_block_size)
    if len(ids) != need:
        raise LineError(
            f"hash_ids has {len(ids)} ids but input_length {length} at --trace-block-size "
            f"{trace_block_size} needs {need}; pass the trace's block size with --trace-block-size"
        )
    row["hash_ids"], row["input_length"] = ids, length
    row["trace_block_size"] = trace_block_size
    row["output_tokens"] = _count(obj.get("output_length"), "output_length")
    bailian = "chat_id" in obj
    # Mooncake: "timestamp" is ms from the trace start; Bailian: seconds (by format, not size).
    ts = obj.get("timestamp")
    row["timestamp"] = (
        parse_time(ts, "timestamp", 1.0 if bailian else 1e-3) if ts is not None
        else _first_time([obj], _TIME_KEYS[1:])
    )
    row["logged_id"] = _first_id([obj], ("request_id", "id")) or _id(obj.get("chat_id"))
    row["session_id"] = _first_id([obj], _SESSION_KEYS)
    if bailian:
        row["_chat"] = (_id(obj.get("chat_id")), _id(obj.get("parent_chat_id")))
    row["model"] = _str(obj.get("model"), "model")
    row["lora"] = _lora([obj])
    return row


def _first_id(sources: list[dict[str, Any]], keys: tuple[str, ...]) -> str | None:
    for src in sources:
        for key in keys:
            v = _id(src.get(key))
            if v is not None:
                return v
    return None


def _keys(obj: dict[str, Any]) -> str:
    names = [repr(k[:30]) for k in list(obj)[:8]]
    return "{" + ", ".join(names) + (", ..." if len(obj) > 8 else "") + "}"


def detect(obj: dict[str, Any]) -> str | None:
    """The format of one decoded line, or None when no known shape fits."""
    if "custom_id" in obj and "body" in obj:
        return schema.FORMAT_BATCH
    if "hash_ids" in obj:
        return schema.FORMAT_HASH_TRACE
    body = obj.get("request") if "request" in obj else obj
    if isinstance(body, str):
        return schema.FORMAT_CHAT  # a JSON-encoded body; _wrapped decodes it
    if isinstance(body, dict):
        if "messages" in body:
            return schema.FORMAT_CHAT
        if "prompt" in body or "prompt_token_ids" in body:
            return schema.FORMAT_COMPLETION
    return None


def parse_request(obj: dict[str, Any], forced: str | None, trace_block_size: int) -> dict[str, Any]:
    """One decoded line -> a row of schema.REQUESTS columns (LineError when it is not a request)."""
    fmt = forced or detect(obj)
    if fmt is None:
        raise LineError(f"no known request shape (keys: {_keys(obj)}); {_TRIED}", UNKNOWN_SHAPE)
    if fmt == schema.FORMAT_BATCH:
        if "body" not in obj:
            raise LineError(f'--format openai-batch: the line has no "body" (keys: {_keys(obj)})',
                            UNKNOWN_SHAPE)
        return _batch(obj)
    if fmt == schema.FORMAT_HASH_TRACE:
        if "hash_ids" not in obj:
            raise LineError(f'--format hash-trace: the line has no "hash_ids" (keys: {_keys(obj)})',
                            UNKNOWN_SHAPE)
        return _hash_trace(obj, trace_block_size)
    return _wrapped(obj, forced, f"--format {forced}: " if forced else "")
