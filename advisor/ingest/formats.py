"""Line level of ingest: one log line's bytes -> one requests.parquet row, or a reason.

Input: the bytes of one line. Output: a `dict` of schema.REQUESTS columns (without
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
  sampling     the body's "prompt_logprobs", "echo", "logprobs" (chat: "logprobs" true
               with "top_logprobs"), "n": what makes vLLM skip the prefix-cache lookup or
               fan one line out into n requests (docs/simulate.md)
"""

from __future__ import annotations

from typing import Any

from advisor import schema
from advisor.ingest.fields import (
    INT32_MAX,
    INT64_MAX,
    UNKNOWN_SHAPE,
    LineError,
    as_count,
    as_flag,
    as_id,
    as_logprob_count,
    as_str,
    check_ids,
    dump_json,
    first_seconds,
    first_time,
    json_object,
    parse_time,
    type_name,
)

ROLES = ("system", "developer", "user", "assistant", "tool", "function")

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
# vLLM's VLLM_MAX_N_SEQUENCES default: it refuses a larger n (sampling_params._verify_num_sequences).
MAX_N = 16_384

_TRIED = (
    'tried openai-chat ("messages", or "request" holding a body), openai-batch '
    '("custom_id" + "body"), completion ("prompt" or "prompt_token_ids") and hash-trace '
    '("hash_ids" + "input_length")'
)


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
        as_str(m.get("name"), f"{p}.name")
    return dump_json(v)


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
    return dump_json(v)


def _completion_prompt(body: dict[str, Any], row: dict[str, Any]) -> None:
    ids, ids_path = body.get("prompt_token_ids"), "prompt_token_ids"
    prompt = body.get("prompt")
    if isinstance(prompt, list):  # the completions API also takes token ids, or a batch of one
        if not prompt or all(type(t) is int for t in prompt):
            ids, ids_path, prompt = (prompt, "prompt", None) if ids is None else (ids, ids_path, None)
        elif len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
            if isinstance(prompt, list):
                ids, ids_path, prompt = (prompt, "prompt[0]", None) if ids is None else (ids, ids_path, None)
        else:
            raise LineError(f"prompt is a list of {len(prompt)} prompts; put one prompt per line")
    if ids is not None:
        ids = check_ids(ids, ids_path, INT32_MAX, "token id")
        if not ids:
            raise LineError(f"{ids_path} is an empty list; a request needs at least one token")
        row["kind"], row["prompt_token_ids"] = schema.KIND_TOKENS, ids
        row["prompt"] = as_str(prompt, "prompt")
        return
    if not isinstance(prompt, str):
        raise LineError(f"prompt is {type_name(prompt)}; expected a string or a list of token ids")
    if not prompt:
        raise LineError("prompt is an empty string; a request needs a prompt")
    row["kind"], row["prompt"] = schema.KIND_COMPLETION, prompt


def _body_fields(body: dict[str, Any], row: dict[str, Any]) -> None:
    """Fields every request body may carry: model, sampling bound, LoRA, salt, user."""
    row["model"] = as_str(body.get("model"), "model")
    mt = body.get("max_completion_tokens")
    row["max_tokens"] = as_count(mt if mt is not None else body.get("max_tokens"),
                               "max_completion_tokens" if mt is not None else "max_tokens")
    row["cache_salt"] = as_str(body.get("cache_salt"), "cache_salt")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise LineError(f"chat_template_kwargs is {type_name(kwargs)}; expected an object")
        row["chat_template_kwargs"] = dump_json(kwargs)
    _sampling_fields(body, row)


def _sampling_fields(body: dict[str, Any], row: dict[str, Any]) -> None:
    """The body fields that change how vLLM schedules and caches the request.

    Kept as logged; advisor.workload decides from them which requests skip the cache
    lookup. Chat asks for logprobs with `logprobs: true` and counts them in
    `top_logprobs`; completions give the count in `logprobs`.
    """
    row["prompt_logprobs"] = as_logprob_count(body.get("prompt_logprobs"), "prompt_logprobs")
    row["echo"] = as_flag(body.get("echo"), "echo")
    if row["kind"] == schema.KIND_CHAT:
        asked = body.get("logprobs")
        if asked is not None and not isinstance(asked, bool):
            raise LineError(f"logprobs is {type_name(asked)}; a chat request takes true or false "
                            "(and the count in top_logprobs)")
        top = as_logprob_count(body.get("top_logprobs"), "top_logprobs")
        row["logprobs"] = (top or 0) if asked else None
    else:
        row["logprobs"] = as_logprob_count(body.get("logprobs"), "logprobs")
    n = body.get("n")
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if n is None:
        n = 1
    elif type(n) is not int:
        raise LineError(f"n is {type_name(n)}; expected an integer >= 1 (the completions asked for)")
    elif not 1 <= n <= MAX_N:
        raise LineError(f"n is {n}; vLLM serves 1 to {MAX_N:,} completions per request "
                        "(VLLM_MAX_N_SEQUENCES); fix the count or drop the line")
    row["n"] = n


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


def _response(resp: dict[str, Any] | str, row: dict[str, Any]) -> None:
    """Output length and text from a logged response (a plain string is the reply text).

    The reply text is auxiliary: a shape we do not know leaves output_text null rather
    than rejecting the request; usage counts, which set the output length, are checked.
    """
    if isinstance(resp, str):
        row["output_text"] = resp
        return
    usage = resp.get("usage")
    if usage is not None:
        if not isinstance(usage, dict):
            raise LineError(f"response.usage is {type_name(usage)}; expected an object")
        row["output_tokens"] = as_count(usage.get("completion_tokens"), "response.usage.completion_tokens")
        row["prompt_tokens_logged"] = as_count(usage.get("prompt_tokens"), "response.usage.prompt_tokens")
    choices = resp.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        c0 = choices[0]
        msg = c0.get("message")
        text: Any = c0.get("text")
        if isinstance(msg, dict):
            text = msg.get("content")
            if text is None and msg.get("tool_calls") is not None:
                text = dump_json(msg["tool_calls"])
        if isinstance(text, list):  # content parts
            text = "".join(p["text"] for p in text if isinstance(p, dict) and isinstance(p.get("text"), str))
        row["output_text"] = text if isinstance(text, str) else None


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
    resp: Any = obj.get("response") if body is not obj else None
    if not (isinstance(resp, str) and not resp.lstrip().startswith("{")):
        resp = json_object(resp, "response")  # an object, or one logged as a JSON string
    if resp is not None:
        _response(resp, row)
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
    row["session_id"] = _session(obj, body)
    row["latency_s"] = first_seconds(obj, _LATENCY_KEYS)
    row["ttft_s"] = first_seconds(obj, _TTFT_KEYS)
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
