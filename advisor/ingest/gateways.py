"""Gateway and tracing records -> the generic logged line advisor.ingest.formats reads.

Input: one decoded record of LiteLLM or Langfuse. Output: a line of the wrapped shape
{"request": body, "response": ..., "timestamp", "request_id", "session_id", "latency_s",
"ttft_s", "output_tokens", "prompt_tokens"} that formats.py parses like any wrapped
OpenAI (or Anthropic) line, or NotARequest for a record that is no model call.

LiteLLM (docs.litellm.ai "StandardLoggingPayload Specification"; litellm/types/utils.py
`StandardLoggingPayload`, and the proxy's `LiteLLM_SpendLogs` table in schema.prisma):
  request   `proxy_server_request` (the body the client sent; spend logs) when it holds
            one, else `messages` with `model_parameters` (payload): a chat list, or a
            prompt string for text completions
  time      `startTime` (epoch seconds in the payload, a date-time in spend logs);
            latency `endTime - startTime`; time to first token `completionStartTime -
            startTime` when it is before `endTime` (streamed)
  output    `completion_tokens` (and `prompt_tokens`); the reply in `response`
  id        `id` (payload) or `request_id` (spend logs)
  session   `session_id`, then metadata's session id, then `end_user`, then `user`
  skipped   calls that are no generation (`call_type` embedding, image, audio,
            moderation, ...), and calls LiteLLM answered from its own response cache
            (`cache_hit` true: they never reached the model server)
  rejected  `status` "failure" (never answered)
Langfuse (public API `Observation`, camelCase; the blob-storage export's snake_case names
are read too):
  request   `input`: a list of chat messages, an object with "messages" (and tools),
            or a prompt string; `model`; `modelParameters` (max_tokens, n, ...)
  time      `startTime`; latency `endTime - startTime`; ttft `completionStartTime - startTime`
  output    `usageDetails.output` (or `usage.output`); reply text from `output`
  session   `sessionId`, then `userId`, then `traceId` (one trace: one user interaction)
  skipped   observations whose `type` is not GENERATION (spans, events, tools, agents)
  rejected  `level` ERROR
"""

from __future__ import annotations

from typing import Any

from advisor.ingest.fields import (
    LineError,
    NotARequest,
    json_object,
    parse_time,
    type_name,
)


def reply(text: str) -> dict[str, Any]:
    """Reply text as a chat response (a bare string that starts with "{" would read as JSON)."""
    return {"choices": [{"message": {"content": text}}]}


# --- LiteLLM ----------------------------------------------------------------------------
LITELLM_KEYS = ("call_type", "startTime", "endTime", "completionStartTime", "model_parameters",
                "proxy_server_request", "end_user", "completion_tokens", "prompt_tokens", "cache_hit", "status")
_CHAT_CALLS = ("completion", "acompletion")
_TEXT_CALLS = ("text_completion", "atext_completion")
_ANTHROPIC_CALLS = ("anthropic_messages", "aanthropic_messages")


def is_litellm(obj: dict[str, Any]) -> bool:
    return "call_type" in obj and ("startTime" in obj or "model_parameters" in obj or "proxy_server_request" in obj)


def _seconds(v: Any, path: str) -> float | None:
    return None if v is None or v == "" else parse_time(v, path, 1.0)


def _timing(start: Any, end: Any, first: Any, names: tuple[str, str, str]) -> dict[str, Any]:
    t0, t1, tf = (_seconds(v, n) for v, n in zip((start, end, first), names, strict=True))
    out: dict[str, Any] = {"timestamp": t0}
    if t0 is not None and t1 is not None and t1 >= t0:
        out["latency_s"] = t1 - t0
        if tf is not None and t0 <= tf < t1:
            out["ttft_s"] = tf - t0
    return out


def litellm_line(obj: dict[str, Any]) -> dict[str, Any]:
    """A LiteLLM StandardLoggingPayload or spend-log row -> a generic wrapped line."""
    call = str(obj.get("call_type") or "")
    if obj.get("cache_hit") in (True, "True", "true"):
        raise NotARequest("answered from LiteLLM's response cache (never reached the model server)")
    if call not in _CHAT_CALLS + _TEXT_CALLS + _ANTHROPIC_CALLS:
        raise NotARequest(f"LiteLLM call_type {call[:30]!r} (not a chat or text generation)")
    if obj.get("status") == "failure":
        raise LineError("LiteLLM logged this call as failed (status failure): the model never answered it")
    body = json_object(obj.get("proxy_server_request") or None, "proxy_server_request")
    if not body or not any(k in body for k in ("messages", "prompt")):
        messages = obj.get("messages")
        params = obj.get("model_parameters") or {}
        if not isinstance(params, dict):
            raise LineError(f"model_parameters is {type_name(params)}; expected an object")
        if isinstance(messages, str) and call in _TEXT_CALLS:
            body = {**params, "prompt": messages}
        elif isinstance(messages, list) and messages:
            body = {**params, "messages": messages}
        elif isinstance(messages, dict) and "messages" in messages:
            body = {**params, **messages}
        else:
            raise LineError("the record holds no request: messages is empty and proxy_server_request has no "
                            "body (LiteLLM keeps prompts only with store_prompts_in_spend_logs / message "
                            "logging on)")
    body = dict(body)
    body.setdefault("model", obj.get("model"))
    line: dict[str, Any] = {"request": body,
                            **_timing(obj.get("startTime"), obj.get("endTime"), obj.get("completionStartTime"),
                                      ("startTime", "endTime", "completionStartTime"))}
    response = obj.get("response")
    if isinstance(response, dict) and response:
        line["response"] = response
    elif isinstance(response, str) and response:
        line["response"] = reply(response)
    line["request_id"] = obj.get("id") or obj.get("request_id")
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    line["session_id"] = (obj.get("session_id") or meta.get("session_id") or meta.get("litellm_session_id")
                          or obj.get("end_user") or obj.get("user") or None)
    if obj.get("completion_tokens") is not None:
        line["output_tokens"] = obj["completion_tokens"]
    return line


# --- Langfuse ---------------------------------------------------------------------------
LANGFUSE_KEYS = ("traceId", "trace_id", "startTime", "start_time", "completionStartTime", "completion_start_time",
                 "modelParameters", "model_parameters", "usageDetails", "usage_details", "input", "output", "level",
                 "sessionId", "userId", "type")


def _get(obj: dict[str, Any], camel: str) -> Any:
    """A field by its API (camelCase) name, or by the blob export's snake_case one."""
    if camel in obj:
        return obj[camel]
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
    return obj.get(snake)


def is_langfuse(obj: dict[str, Any]) -> bool:
    return isinstance(obj.get("type"), str) and obj["type"].isupper() and _get(obj, "startTime") is not None \
        and (_get(obj, "traceId") is not None or "input" in obj)


def _text(output: Any) -> str | None:
    if isinstance(output, str):
        return output
    if isinstance(output, dict):
        if isinstance(output.get("content"), str):
            return output["content"]
        if isinstance(output.get("text"), str):
            return output["text"]
        choices = output.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            msg = choices[0].get("message") or {}
            return msg.get("content") if isinstance(msg.get("content"), str) else choices[0].get("text")
    return None


def langfuse_line(obj: dict[str, Any]) -> dict[str, Any]:
    """A Langfuse observation -> a generic wrapped line."""
    if obj.get("type") != "GENERATION":
        raise NotARequest(f"a Langfuse {str(obj.get('type'))[:20]} observation (no model call)")
    if obj.get("level") == "ERROR":
        raise LineError(f"the generation ended in an error (level ERROR: {str(obj.get('statusMessage'))[:80]})")
    inp = json_object(obj.get("input"), "input") if isinstance(obj.get("input"), str) and \
        obj["input"].lstrip().startswith("{") else obj.get("input")
    params = _get(obj, "modelParameters") or {}
    if not isinstance(params, dict):
        raise LineError(f"modelParameters is {type_name(params)}; expected an object")
    params = {k: _number(v) for k, v in params.items() if k in ("max_tokens", "max_completion_tokens", "n")}
    if isinstance(inp, list):
        body: dict[str, Any] = {**params, "messages": inp}
    elif isinstance(inp, dict) and ("messages" in inp or "prompt" in inp):
        body = {**params, **inp}
    elif isinstance(inp, str) and inp:
        body = {**params, "prompt": inp}
    else:
        raise LineError(f"input is {type_name(inp)} of no known shape; expected chat messages, an object with "
                        "messages, or a prompt string (Langfuse keeps what the SDK was given)")
    body.setdefault("model", obj.get("model") or _get(obj, "providedModelName"))
    line: dict[str, Any] = {"request": body, **_timing(
        _get(obj, "startTime"), _get(obj, "endTime"), _get(obj, "completionStartTime"),
        ("startTime", "endTime", "completionStartTime"))}
    text = _text(obj.get("output"))
    if text is not None:
        line["response"] = reply(text)
    usage = _get(obj, "usageDetails") or obj.get("usage") or {}
    if isinstance(usage, dict) and usage.get("output") is not None:
        line["output_tokens"] = _number(usage["output"])
    line["request_id"] = obj.get("id")
    line["session_id"] = _get(obj, "sessionId") or _get(obj, "userId") or _get(obj, "traceId")
    return line


def _number(v: Any) -> Any:
    """Langfuse keeps model parameters as strings or numbers ("256" or 256)."""
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return v
