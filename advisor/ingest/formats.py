"""Line level of ingest: one decoded log record -> one requests.parquet row, or a reason.

Input: one decoded line (or table row). Output: a `dict` of schema.REQUESTS columns (without
`request_id`, `line`, and a synthesized `timestamp`, which depend on the whole file), or
a `LineError` whose reason says what is wrong with the line and what would fix it,
e.g. "messages[2].content is a number; expected a string or a list of content parts".

Formats (docs/design.md §3, docs/formats.md), detected per line unless one is forced:
  openai-chat   bare chat body {"model","messages","tools"?,...}, or a wrapper
                {"timestamp"|"created", "request": {...}, "response": {...}} whose
                response gives usage.completion_tokens / the reply text
  openai-batch  {"custom_id","method","url","body": {...}}
  completion    {"prompt": "..."} or {"prompt_token_ids": [...]}, bare or wrapped
  hash-trace    {"timestamp","input_length","output_length","hash_ids"} (Mooncake: ms from
                the trace start; Alibaba Bailian, recognised by "chat_id": seconds)
  anthropic     a /v1/messages body (bare, wrapped, or {"custom_id","params"}): anthropic.py
  litellm       a LiteLLM StandardLoggingPayload or spend-log row: gateways.py
  langfuse      a Langfuse observation: gateways.py
  otel-genai    an OTLP JSON line of spans, one request per model-call span: otel.py
                (parse_otlp; the readers call it, since one line gives many requests)
(vLLM server logs and tables are files of their own kind: vllm_log.py, tables.py.) A record
that is no model call at all raises NotARequest and is counted as skipped, not rejected.

The OpenAI body itself (messages, tools, prompt, sampling fields, the reply) is read in
openai_body.py. Fields read besides the request itself (first one present wins, wrapper
before body):
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
  sampling     the body's "prompt_logprobs", "echo", "logprobs" (chat: "logprobs" true
               with "top_logprobs"), "n": what makes vLLM skip the prefix-cache lookup or
               fan one line out into n requests (docs/simulate.md)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from advisor import schema
from advisor.ingest import anthropic, gateways, otel
from advisor.ingest.fields import (
    INT64_MAX,
    UNKNOWN_SHAPE,
    LineError,
    as_count,
    as_id,
    as_str,
    check_ids,
    first_seconds,
    first_time,
    json_object,
    parse_time,
    type_name,
)
from advisor.ingest.openai_body import (
    body_fields,
    chat_response,
    check_messages,
    check_tools,
    completion_prompt,
    media_count,
)

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


def _lora(sources: list[dict[str, Any]]) -> str | None:
    for src in sources:
        for key in _LORA_KEYS:
            if src.get(key) is not None:
                return as_str(src[key], key)
        req = src.get("lora_request")
        if isinstance(req, dict) and req.get("lora_name") is not None:
            return as_str(req["lora_name"], "lora_request.lora_name")
    return None


def _session(wrapper: dict[str, Any], body: dict[str, Any]) -> str | None:
    for src in (wrapper, wrapper.get("metadata"), body.get("metadata")):
        if isinstance(src, dict):
            for key in _SESSION_KEYS:
                sid = as_id(src.get(key))
                if sid is not None:
                    return sid
    return as_id(body.get("user"))


def _new_row(fmt: str) -> dict[str, Any]:
    return {"format": fmt}


def _wrapped(obj: dict[str, Any], fmt: str | None, label: str, bare: bool = False) -> dict[str, Any]:
    """A chat/completion body, bare or wrapped with metadata and a response."""
    body = obj if bare or "request" not in obj else json_object(obj["request"], "request")
    if body is None:
        raise LineError("request is null; expected the request body object")
    if "messages" in body and fmt != schema.FORMAT_COMPLETION:
        row = _new_row(schema.FORMAT_CHAT)
        row["kind"], row["messages"] = schema.KIND_CHAT, check_messages(body["messages"])
        row["tools"] = check_tools(body.get("tools"))
        row["_media"] = media_count(body["messages"])
    elif ("prompt" in body or "prompt_token_ids" in body) and fmt != schema.FORMAT_CHAT:
        row = _new_row(schema.FORMAT_COMPLETION)
        completion_prompt(body, row)
    else:
        want = {schema.FORMAT_CHAT: '"messages"', schema.FORMAT_COMPLETION: '"prompt" or "prompt_token_ids"'}
        where = "the request object" if body is not obj else "the line"
        if fmt is None:
            raise LineError(f"no known request shape in {where} (keys: {_keys(body)}); {_TRIED}",
                            UNKNOWN_SHAPE)
        raise LineError(f"{label}{where} has no {want[fmt]} field (keys: {_keys(body)})",
                        UNKNOWN_SHAPE)
    body_fields(body, row)
    _metadata(obj, body, row, chat_response)
    return row


def _metadata(obj: dict[str, Any], body: dict[str, Any], row: dict[str, Any], read_response: Any) -> None:
    """What a wrapper (or the body) says besides the request: id, reply, time, session, timing."""
    sources = [obj, body] if body is not obj else [obj]
    row["logged_id"] = _first_id(sources, ("request_id", "id"))
    resp: Any = obj.get("response") if body is not obj else None
    if not (isinstance(resp, str) and not resp.lstrip().startswith("{")):
        resp = json_object(resp, "response")  # an object, or one logged as a JSON string
    if resp is not None:
        read_response(resp, row)
        if row["logged_id"] is None and isinstance(resp, dict):
            row["logged_id"] = as_id(resp.get("id"))
    if row.get("output_tokens") is None:
        for key in _OUTPUT_KEYS:
            if obj.get(key) is not None:
                row["output_tokens"] = as_count(obj[key], key)
                break
    row["timestamp"] = first_time(sources, _TIME_KEYS)
    if row["timestamp"] is None and isinstance(resp, dict):
        row["timestamp"] = first_time([resp], _TIME_KEYS)
    row["lora"] = _lora(sources)
    if row["cache_salt"] is None and body is not obj:
        row["cache_salt"] = as_str(obj.get("cache_salt"), "cache_salt")
    row["session_id"] = _session(obj, body) or row.get("session_id")
    row["latency_s"] = first_seconds(obj, _LATENCY_KEYS)
    row["ttft_s"] = first_seconds(obj, _TTFT_KEYS)


def _anthropic(obj: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages body: bare, wrapped, or a Message Batches line {custom_id, params}."""
    if "params" in obj and "custom_id" in obj:
        body = json_object(obj["params"], "params")
        if body is None:
            raise LineError("params is null; expected the Messages request body")
        row = anthropic.parse(body)
        row["logged_id"] = as_id(obj.get("custom_id"))
        row["timestamp"] = first_time([obj], _TIME_KEYS)
        return row
    body = json_object(obj["request"], "request") if "request" in obj else obj
    if body is None:
        raise LineError("request is null; expected the request body object")
    row = anthropic.parse(body)
    _metadata(obj, body, row, _anthropic_response)
    return row


def parse_otlp(obj: dict[str, Any]) -> Iterator[tuple[dict[str, Any] | LineError, dict[str, Any]]]:
    """Each span of one OTLP JSON line: (its row, or the LineError / NotARequest it gives, the span)."""
    for span, resource in otel.spans(obj):
        try:
            row = _wrapped(otel.span_line(span, resource), None, "")
        except LineError as e:
            yield e, span
            continue
        row["format"] = schema.FORMAT_OTEL
        yield row, span


def _gateway(obj: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A LiteLLM or Langfuse record, read through the generic line it maps to (gateways.py)."""
    line = gateways.litellm_line(obj) if fmt == schema.FORMAT_LITELLM else gateways.langfuse_line(obj)
    row = _anthropic(line) if detect(line) == schema.FORMAT_ANTHROPIC else _wrapped(line, None, "")
    row["format"] = fmt
    return row


def _anthropic_response(resp: dict[str, Any] | str, row: dict[str, Any]) -> None:
    if isinstance(resp, str):
        row["output_text"] = resp
    elif resp.get("type") == "message" or "stop_reason" in resp:
        anthropic.response_fields(resp, row)
    else:  # a gateway that answered in OpenAI's shape
        chat_response(resp, row)


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
    row["logged_id"] = as_id(obj.get("custom_id"))
    if obj.get("custom_id") is not None and row["logged_id"] is None:
        raise LineError(f"custom_id is {type_name(obj['custom_id'])}; expected a string")
    ts = first_time([obj], _TIME_KEYS)
    if ts is not None:
        row["timestamp"] = ts
    return row


def _hash_trace(obj: dict[str, Any], trace_block_size: int) -> dict[str, Any]:
    row = _new_row(schema.FORMAT_HASH_TRACE)
    row["kind"] = schema.KIND_HASH_TRACE
    if obj.get("input_length") is None:
        raise LineError('hash-trace line has no "input_length" (prompt tokens)', UNKNOWN_SHAPE)
    length = as_count(obj["input_length"], "input_length", minimum=1)
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
    row["output_tokens"] = as_count(obj.get("output_length"), "output_length")
    bailian = "chat_id" in obj
    # Mooncake: "timestamp" is ms from the trace start; Bailian: seconds (by format, not size).
    ts = obj.get("timestamp")
    row["timestamp"] = (
        parse_time(ts, "timestamp", 1.0 if bailian else 1e-3) if ts is not None
        else first_time([obj], _TIME_KEYS[1:])
    )
    row["logged_id"] = _first_id([obj], ("request_id", "id")) or as_id(obj.get("chat_id"))
    row["session_id"] = _first_id([obj], _SESSION_KEYS)
    if bailian:
        row["_chat"] = (as_id(obj.get("chat_id")), as_id(obj.get("parent_chat_id")))
    row["model"] = as_str(obj.get("model"), "model")
    row["lora"] = _lora([obj])
    return row


def _first_id(sources: list[dict[str, Any]], keys: tuple[str, ...]) -> str | None:
    for src in sources:
        for key in keys:
            v = as_id(src.get(key))
            if v is not None:
                return v
    return None


def _keys(obj: dict[str, Any]) -> str:
    names = [repr(k[:30]) for k in list(obj)[:8]]
    return "{" + ", ".join(names) + (", ..." if len(obj) > 8 else "") + "}"


# Every top-level key some format reads: the columns a table is read for (advisor.ingest.tables).
KNOWN_KEYS = frozenset(
    ["messages", "tools", "prompt", "prompt_token_ids", "model", "max_tokens", "max_completion_tokens",
     "cache_salt", "chat_template_kwargs", "prompt_logprobs", "echo", "logprobs", "top_logprobs", "n",
     "user", "metadata", "request", "response", "request_id", "id", "custom_id", "method", "url",
     "hash_ids", "input_length", "output_length", "chat_id", "parent_chat_id", "lora_request"]
    + list(anthropic.KEYS) + list(gateways.LITELLM_KEYS) + list(gateways.LANGFUSE_KEYS)
    + [k for k, _ in _TIME_KEYS] + list(_SESSION_KEYS) + list(_LORA_KEYS) + [k for k, _ in _LATENCY_KEYS]
    + [k for k, _ in _TTFT_KEYS] + list(_OUTPUT_KEYS)
)


def detect(obj: dict[str, Any]) -> str | None:
    """The format of one decoded line, or None when no known shape fits."""
    if gateways.is_litellm(obj):
        return schema.FORMAT_LITELLM
    if gateways.is_langfuse(obj):
        return schema.FORMAT_LANGFUSE
    if "custom_id" in obj and "body" in obj:
        return schema.FORMAT_BATCH
    if "custom_id" in obj and "params" in obj:
        return schema.FORMAT_ANTHROPIC  # Anthropic's Message Batches
    if "hash_ids" in obj:
        return schema.FORMAT_HASH_TRACE
    body = obj.get("request") if "request" in obj else obj
    if isinstance(body, str) and body.lstrip().startswith("{"):
        try:
            body = json.loads(body)  # a JSON-encoded body (decoded again where it is read)
        except ValueError:
            return schema.FORMAT_CHAT  # _wrapped names the problem
    if isinstance(body, dict):
        if "messages" in body:
            return schema.FORMAT_ANTHROPIC if anthropic.is_anthropic(body) else schema.FORMAT_CHAT
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
    if fmt == schema.FORMAT_ANTHROPIC:
        body = obj.get("params") if "params" in obj else obj.get("request", obj)
        if forced and not (isinstance(body, str) or (isinstance(body, dict) and "messages" in body)):
            raise LineError(f'--format anthropic: the line has no "messages" (keys: {_keys(obj)})', UNKNOWN_SHAPE)
        return _anthropic(obj)
    if fmt == schema.FORMAT_LITELLM and "call_type" not in obj:
        raise LineError(f'--format litellm: the line has no "call_type" (keys: {_keys(obj)})', UNKNOWN_SHAPE)
    if fmt == schema.FORMAT_LANGFUSE and not isinstance(obj.get("type"), str):
        raise LineError(f'--format langfuse: the line has no observation "type" such as GENERATION (keys: '
                        f'{_keys(obj)})', UNKNOWN_SHAPE)
    if fmt in (schema.FORMAT_LITELLM, schema.FORMAT_LANGFUSE):
        return _gateway(obj, fmt)
    if fmt == schema.FORMAT_OTEL:  # OTLP lines hold many spans: read with parse_otlp
        raise LineError(f'--format otel-genai: the line has no "resourceSpans" (keys: {_keys(obj)})', UNKNOWN_SHAPE)
    if fmt == schema.FORMAT_HASH_TRACE:
        if "hash_ids" not in obj:
            raise LineError(f'--format hash-trace: the line has no "hash_ids" (keys: {_keys(obj)})',
                            UNKNOWN_SHAPE)
        return _hash_trace(obj, trace_block_size)
    return _wrapped(obj, forced, f"--format {forced}: " if forced else "")
