"""OTLP JSON trace exports -> one generic wrapped line per OpenTelemetry GenAI model-call span.

Input: one decoded line of an OTLP JSON file (`{"resourceSpans": [...]}`, what the
collector's file exporter and OTLP/HTTP JSON carry; protobuf JSON mapping: AnyValue objects,
uint64 times as strings). Output: per span, a line of the wrapped shape formats.py reads,
or NotARequest (a span that is no model call: HTTP, tool, agent, embeddings spans) or
LineError.

The GenAI semantic conventions have written prompts in three ways over their versions; each
is read (first found wins):
1. `gen_ai.input.messages` / `gen_ai.system_instructions` / `gen_ai.output.messages`
   (semconv 1.37 and later; a JSON string or a structured value, on the span or on its
   `gen_ai.client.inference.operation.details` event): messages of typed parts (text,
   tool_call, tool_call_response, reasoning, blob/file/uri), per gen-ai-input-messages.json;
2. span events: `gen_ai.content.prompt` / `gen_ai.content.completion` with `gen_ai.prompt` /
   `gen_ai.completion` JSON (1.27), and the per-message events `gen_ai.system.message`,
   `gen_ai.user.message`, `gen_ai.assistant.message`, `gen_ai.tool.message`, `gen_ai.choice`
   (1.28-1.36) with their body fields as event attributes (`content`, `tool_calls`, `id`,
   or one JSON `gen_ai.event.content` attribute);
3. indexed attributes `gen_ai.prompt.<i>.role|content|tool_call_id`,
   `gen_ai.prompt.<i>.tool_calls.<j>.id|name|arguments`, `gen_ai.completion.<i>.content`
   (the older attribute form OpenLLMetry writes).
Besides: `gen_ai.request.model`, `gen_ai.request.max_tokens`, `gen_ai.request.choice.count`
(n), `gen_ai.usage.output_tokens` (or `completion_tokens`), `gen_ai.tool.definitions` or
`llm.request.functions.<i>.*` (tools), `gen_ai.response.id` (else the span id),
`gen_ai.conversation.id` / `session.id` (else `user.id` / `enduser.id`) as the session, the
span's start as the arrival and its length as the latency. A span whose status is ERROR is
rejected. Not read: GenAI events exported as OTLP *logs* (`resourceLogs`), joined to their
spans by span id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from advisor.ingest.fields import LineError, NotARequest, type_name

_MODEL_CALLS = ("chat", "text_completion", "generate_content", "completion")
_INDEXED = re.compile(r"^gen_ai\.(prompt|completion)\.(\d+)\.(.+)$")
_FUNCTIONS = re.compile(r"^llm\.request\.functions\.(\d+)\.(name|description|parameters)$")
_MESSAGE_EVENTS = {"gen_ai.system.message": "system", "gen_ai.user.message": "user",
                   "gen_ai.assistant.message": "assistant", "gen_ai.tool.message": "tool"}


def is_otlp(obj: dict[str, Any]) -> bool:
    return "resourceSpans" in obj


def value(v: Any) -> Any:
    """An OTLP JSON AnyValue as a plain value."""
    if not isinstance(v, dict):
        return v
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "arrayValue" in v:
        return [value(x) for x in (v["arrayValue"] or {}).get("values", [])]
    if "kvlistValue" in v:
        return {kv.get("key"): value(kv.get("value")) for kv in (v["kvlistValue"] or {}).get("values", [])}
    if "bytesValue" in v:
        return v["bytesValue"]
    return None


def attributes(items: Any) -> dict[str, Any]:
    if not isinstance(items, list):
        return {}
    return {a["key"]: value(a.get("value")) for a in items if isinstance(a, dict) and isinstance(a.get("key"), str)}


def _items(obj: Any, key: str, path: str) -> list[Any]:
    v = obj.get(key) if isinstance(obj, dict) else None
    if v is None:
        return []
    if not isinstance(v, list):
        raise LineError(f"{path}.{key} is {type_name(v)}; expected a list (an OTLP JSON export)")
    return v


def spans(obj: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(span, its resource's attributes) for every span of one OTLP line."""
    for i, rs in enumerate(_items(obj, "resourceSpans", "the line")):
        where = f"resourceSpans[{i}]"
        resource = rs.get("resource") if isinstance(rs, dict) else None
        resource_attrs = attributes(resource.get("attributes")) if isinstance(resource, dict) else {}
        scopes = _items(rs, "scopeSpans", where) or _items(rs, "instrumentationLibrarySpans", where)
        for j, ss in enumerate(scopes):
            for span in _items(ss, "spans", f"{where}.scopeSpans[{j}]"):
                if not isinstance(span, dict):
                    raise LineError(f"a span of {where} is {type_name(span)}; expected an object")
                yield span, resource_attrs


def _json(v: Any) -> Any:
    if isinstance(v, str) and v.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(v)
        except ValueError:
            raise LineError("a GenAI attribute holds text that is not the JSON it should be") from None
    return v


def _nanos(v: Any, what: str) -> float | None:
    if v is None or v == "":
        return None
    try:
        return int(v) / 1e9
    except (TypeError, ValueError):
        raise LineError(f"the span's {what} is {str(v)[:30]!r}; expected nanoseconds since the epoch") from None


# --- messages from parts (semconv 1.37+) ---
def _arguments(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args if args is not None else {})


def _part_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise LineError("gen_ai.input.messages is not a list of messages")
    out: list[dict[str, Any]] = []
    for m in messages:
        if not isinstance(m, dict):
            raise LineError("a gen_ai.input.messages entry is not an object")
        role, parts = m.get("role"), m.get("parts") or []
        content: list[dict[str, Any]] = []
        calls, reasoning = [], []
        for p in parts if isinstance(parts, list) else []:
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text":
                content.append({"type": "text", "text": str(p.get("content", ""))})
            elif kind == "tool_call":
                calls.append({"id": p.get("id") or "", "type": "function",
                              "function": {"name": p.get("name") or "", "arguments": _arguments(p.get("arguments"))}})
            elif kind == "tool_call_response":
                resp = p.get("response", p.get("result"))
                out.append({"role": "tool", "tool_call_id": p.get("id") or "",
                            "content": resp if isinstance(resp, str) else json.dumps(resp)})
            elif kind == "reasoning":
                reasoning.append(str(p.get("content", "")))
            elif kind in ("blob", "file_data", "file", "uri"):
                modality = p.get("modality") or "media"
                content.append({"type": "image_url" if modality == "image" else f"input_{modality}",
                                "image_url": {"url": p.get("uri") or f"{kind}:{p.get('mime_type') or ''}"}})
        if not content and not calls and not reasoning:
            continue  # a tool turn made of responses only (written above), or an empty one
        msg: dict[str, Any] = {"role": role}
        if content:
            msg["content"] = content[0]["text"] if len(content) == 1 and content[0]["type"] == "text" else content
        elif role != "assistant":
            msg["content"] = ""
        if calls:
            msg["tool_calls"] = calls
        if reasoning:
            msg["reasoning"] = "".join(reasoning)
        out.append(msg)
    return out


def _system(instructions: Any) -> list[dict[str, Any]]:
    instructions = _json(instructions)
    if instructions is None:
        return []
    if isinstance(instructions, str):
        return [{"role": "system", "content": instructions}]
    texts = [str(p.get("content", "")) for p in instructions if isinstance(p, dict) and p.get("type") == "text"]
    return [{"role": "system", "content": "\n".join(texts)}] if texts else []


def _parts_text(messages: Any) -> str | None:
    messages = _json(messages)
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        parts = messages[0].get("parts") or []
        texts = [str(p.get("content", "")) for p in parts if isinstance(p, dict) and p.get("type") == "text"]
        return "".join(texts) if texts else None
    return None


# --- messages from events (semconv 1.27-1.36) ---
def _event_body(attrs: dict[str, Any]) -> dict[str, Any]:
    body = _json(attrs.get("gen_ai.event.content"))
    return body if isinstance(body, dict) else attrs


def _event_messages(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]] | None, str | None]:
    prompt, messages, reply = None, [], None
    for ev in events:
        name, attrs = ev.get("name"), attributes(ev.get("attributes"))
        if name == "gen_ai.content.prompt" and "gen_ai.prompt" in attrs:
            prompt = _json(attrs["gen_ai.prompt"])
        elif name == "gen_ai.content.completion" and "gen_ai.completion" in attrs:
            done = _json(attrs["gen_ai.completion"])
            if isinstance(done, list) and done and isinstance(done[0], dict):
                reply = done[0].get("content")
        elif name in _MESSAGE_EVENTS:
            body = _event_body(attrs)
            msg: dict[str, Any] = {"role": body.get("role") or _MESSAGE_EVENTS[name],
                                   "content": body.get("content")}
            if msg["content"] is None and msg["role"] != "assistant":
                msg["content"] = ""
            calls = _json(body.get("tool_calls"))
            if isinstance(calls, list) and calls:
                msg["tool_calls"] = calls
            if msg["role"] == "tool" and body.get("id") is not None:
                msg["tool_call_id"] = body["id"]
            messages.append(msg)
        elif name == "gen_ai.choice" and reply is None:
            body = _event_body(attrs)
            message = _json(body.get("message"))
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                reply = message["content"]
    if isinstance(prompt, list):
        return prompt, reply
    return (messages or None), reply


# --- messages from indexed attributes (the older attribute form) ---
def _indexed(attrs: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str | None]:
    prompts: dict[int, dict[str, Any]] = {}
    completions: dict[int, dict[str, Any]] = {}
    for key, v in attrs.items():
        m = _INDEXED.match(key)
        if m:
            (prompts if m.group(1) == "prompt" else completions).setdefault(int(m.group(2)), {})[m.group(3)] = v
    if not prompts:
        return None, None
    messages = []
    for i in sorted(prompts):
        fields = prompts[i]
        msg: dict[str, Any] = {"role": fields.get("role") or "user", "content": fields.get("content")}
        if msg["content"] is None and msg["role"] != "assistant":
            msg["content"] = ""
        calls = {}
        for k, v in fields.items():
            cm = re.match(r"^tool_calls\.(\d+)\.(id|name|arguments)$", k)
            if cm:
                calls.setdefault(int(cm.group(1)), {})[cm.group(2)] = v
        if calls:
            msg["tool_calls"] = [{"id": c.get("id") or "", "type": "function", "function": {
                "name": c.get("name") or "", "arguments": _arguments(c.get("arguments"))}} for _, c in sorted(calls.items())]
        if fields.get("tool_call_id") is not None:
            msg["tool_call_id"] = fields["tool_call_id"]
        messages.append(msg)
    first = completions.get(min(completions)) if completions else None
    return messages, (first or {}).get("content")


def _tools(attrs: dict[str, Any]) -> list[dict[str, Any]] | None:
    defs = _json(attrs.get("gen_ai.tool.definitions"))
    if isinstance(defs, list) and defs:
        return [d if "function" in d else {"type": d.get("type", "function"), "function": {
            k: d[k] for k in ("name", "description", "parameters") if k in d}} for d in defs if isinstance(d, dict)]
    functions: dict[int, dict[str, Any]] = {}
    for key, v in attrs.items():
        m = _FUNCTIONS.match(key)
        if m:
            functions.setdefault(int(m.group(1)), {})[m.group(2)] = _json(v) if m.group(2) == "parameters" else v
    return [{"type": "function", "function": f} for _, f in sorted(functions.items())] or None


def span_line(span: dict[str, Any], resource: dict[str, Any]) -> dict[str, Any]:
    """One span -> a generic wrapped line (NotARequest when it is no model call)."""
    attrs = attributes(span.get("attributes"))
    events = [e for e in span.get("events") or [] if isinstance(e, dict)]
    op = attrs.get("gen_ai.operation.name") or attrs.get("llm.request.type")
    details = next((attributes(e.get("attributes")) for e in events
                    if e.get("name") == "gen_ai.client.inference.operation.details"), {})
    source = attrs if "gen_ai.input.messages" in attrs else details
    has_prompt = ("gen_ai.input.messages" in source or any(k.startswith("gen_ai.prompt.") for k in attrs)
                  or any(e.get("name") in _MESSAGE_EVENTS or e.get("name") == "gen_ai.content.prompt" for e in events))
    if op not in _MODEL_CALLS and not (op is None and has_prompt):
        raise NotARequest("a span without GenAI attributes (HTTP, database, ...)" if op is None
                          else f"a GenAI {str(op)[:30]} span (no model call)")
    status = span.get("status") if isinstance(span.get("status"), dict) else {}
    if status.get("code") in (2, "STATUS_CODE_ERROR"):
        raise LineError(f"the span ended in an error ({str(status.get('message') or 'status ERROR')[:80]})")
    reply = None
    if "gen_ai.input.messages" in source:
        messages = _system(source.get("gen_ai.system_instructions")) + _part_messages(_json(source["gen_ai.input.messages"]))
        reply = _parts_text(source.get("gen_ai.output.messages"))
    else:
        messages, reply = _event_messages(events)
        if messages is None:
            messages, reply = _indexed(attrs)
    if not messages:
        raise LineError("a model-call span without its prompt: the instrumentation did not record message "
                        "content (turn on content capture, e.g. OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true)")
    if op in ("text_completion", "completion") and len(messages) == 1 and isinstance(messages[0].get("content"), str):
        body: dict[str, Any] = {"prompt": messages[0]["content"]}
    else:
        body = {"messages": messages}
        tools = _tools(attrs)
        if tools:
            body["tools"] = tools
    body["model"] = attrs.get("gen_ai.request.model") or attrs.get("gen_ai.response.model")
    for key, name in (("gen_ai.request.max_tokens", "max_tokens"), ("gen_ai.request.choice.count", "n")):
        if attrs.get(key) is not None:
            body[name] = attrs[key]
    start, end = _nanos(span.get("startTimeUnixNano"), "start"), _nanos(span.get("endTimeUnixNano"), "end")
    line: dict[str, Any] = {"request": body, "timestamp": start,
                            "request_id": attrs.get("gen_ai.response.id") or span.get("spanId")}
    if start is not None and end is not None and end >= start:
        line["latency_s"] = end - start
    if reply is not None:
        line["response"] = {"choices": [{"message": {"content": reply if isinstance(reply, str) else json.dumps(reply)}}]}
    for key in ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens", "llm.usage.completion_tokens"):
        if attrs.get(key) is not None:
            line["output_tokens"] = attrs[key]
            break
    for src in (attrs, resource):
        sid = next((src[k] for k in ("gen_ai.conversation.id", "session.id", "user.id", "enduser.id") if src.get(k)), None)
        if sid is not None:
            line["session_id"] = str(sid)
            break
    return line
