"""Anthropic Messages requests (`/v1/messages`) -> the chat request vLLM turns them into.

Input: a decoded Anthropic body {"model", "system"?, "messages", "max_tokens", "tools"?, ...},
bare, wrapped ({"request": body, "response": message, "timestamp", ...}) or as a Message
Batches line ({"custom_id", "params": body}). Output: a requests row of kind "chat" whose
messages and tools are what vLLM's Anthropic endpoint hands its chat path, so the tokenize
stage renders them like any chat request.

The conversion follows vLLM 0.32's `AnthropicServingMessages.to_chat_completion_request`
(vllm/entrypoints/anthropic/serving.py), tested against it where vLLM imports:
- `system` (a string, or text blocks without the `x-anthropic-billing-header` block) becomes
  one leading system message, its parts joined with nothing between them;
- a message with a string content keeps it; blocks become content parts: text (empty text
  dropped), image (an `image_url` part: base64 sources as a data URL), thinking (the
  assistant's `reasoning`), tool_use (an assistant tool call whose arguments are the input
  as JSON), tool_result (in a user turn: a `tool` message before the turn, its text parts
  joined by newlines, images as a user turn after it; in an assistant turn: a text part
  "Tool result: <content>"); one text part becomes a plain string; a user turn left without
  content is dropped;
- inline `system` messages stay where they are (`merge_inline_system` is the server's choice,
  made from the chat template: the tokenize stage applies it, advisor.tokens.chatprompt);
- tools become functions (name, description, input_schema as parameters with "type":
  "object" added when missing, strict, defer_loading); tool_addition / tool_removal blocks
  change the tool list first.
`cache_control` markers change nothing in vLLM (its prefix caching needs none); where they
were is kept in the `cache_control` column. `metadata.user_id` is the session.
Not modelled: `thinking` / `output_config.effort` (vLLM passes them as reasoning_effort, which
pc-advise does not hand to the template); vLLM 0.34 puts a tool_result's tool references and
text in one tool message where 0.32 writes two.
"""

from __future__ import annotations

import json
from typing import Any

from advisor import schema
from advisor.ingest.fields import (
    LineError,
    as_count,
    as_id,
    as_str,
    dump_json,
    type_name,
)
from advisor.ingest.openai_body import vllm_extras

_BILLING = "x-anthropic-billing-header"
BLOCK_TYPES = ("text", "image", "tool_use", "tool_result", "tool_reference", "thinking", "redacted_thinking",
               "tool_addition", "tool_removal")
# Keys only an Anthropic body has (an OpenAI chat body has none of them).
_ANTHROPIC_KEYS = ("system", "stop_sequences", "anthropic_version", "thinking", "output_config")
_ANTHROPIC_ONLY_BLOCKS = ("tool_use", "tool_result", "thinking", "redacted_thinking", "tool_reference",
                          "tool_addition", "tool_removal", "document")
KEYS = ("system", "stop_sequences", "anthropic_version", "params")


def is_anthropic(body: dict[str, Any]) -> bool:
    """Whether a body with "messages" is an Anthropic Messages request, not an OpenAI one."""
    if any(k in body for k in _ANTHROPIC_KEYS):
        return True
    tools = body.get("tools")
    if isinstance(tools, list) and any(isinstance(t, dict) and "input_schema" in t for t in tools):
        return True
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for b in content:
                if isinstance(b, dict) and (b.get("type") in _ANTHROPIC_ONLY_BLOCKS or "cache_control" in b
                                            or (b.get("type") == "image" and "source" in b)):
                    return True
    return False


def _image_url(source: Any) -> str:
    if not isinstance(source, dict):
        return ""
    if source.get("type") == "url":
        return source.get("url", "")
    return f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"


def _blocks(content: Any, path: str) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        raise LineError(f"{path} is {type_name(content)}; expected a string or a list of content blocks")
    for i, b in enumerate(content):
        if not isinstance(b, dict):
            raise LineError(f"{path}[{i}] is {type_name(b)}; expected a content block object")
        if b.get("type") not in BLOCK_TYPES:
            raise LineError(f"{path}[{i}].type is {str(b.get('type'))[:30]!r}; vLLM's Anthropic endpoint takes "
                            f"{', '.join(BLOCK_TYPES)}")
        for key in ("text", "thinking", "id", "name", "tool_use_id"):
            as_str(b.get(key), f"{path}[{i}].{key}")
    return content


def _system_text(content: Any, path: str) -> str | None:
    if isinstance(content, str):
        return None if content.startswith(_BILLING) else content
    parts = [b["text"] for b in _blocks(content, path)
             if b["type"] == "text" and b.get("text") and not b["text"].startswith(_BILLING)]
    return "".join(parts) if parts else None


def _tool_call(block: dict[str, Any]) -> dict[str, Any]:
    inp = block.get("input")
    if inp is not None and not isinstance(inp, dict):
        raise LineError(f"a tool_use block's input is {type_name(inp)}; expected an object")
    # vLLM names a call without an id call_<the time it converts it>; the API requires ids
    return {"id": block.get("id") or "call_0", "type": "function",
            "function": {"name": block.get("name") or "", "arguments": json.dumps(inp or {})}}


def _user_tool_result(block: dict[str, Any], out: list[dict[str, Any]]) -> None:
    content = block.get("content")
    text, images, refs = "", [], []
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for item in content:
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            if kind == "text":
                texts.append(item.get("text", ""))
            elif kind == "image":
                url = _image_url(item.get("source", {}))
                if url:
                    images.append(url)
            elif kind == "tool_reference" and (name := item.get("tool_name") or item.get("name")):
                refs.append({"type": "tool_reference", "name": name})
        text = "\n".join(texts)
    tool_id = block.get("tool_use_id") or ""
    out.append({"role": "tool", "tool_call_id": tool_id, "content": text or ""})
    if images:
        out.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in images]})
    if refs:
        out.append({"role": "tool", "tool_call_id": tool_id, "content": refs})


def _message(m: Any, i: int, out: list[dict[str, Any]]) -> None:
    path = f"messages[{i}]"
    if not isinstance(m, dict):
        raise LineError(f"{path} is {type_name(m)}; expected a message object with role and content")
    role = m.get("role")
    if role not in ("user", "assistant", "system"):
        raise LineError(f"{path}.role is {str(role)[:30]!r}; vLLM's Anthropic endpoint takes user, assistant, system")
    content = m.get("content")
    if role == "system":
        text = _system_text(content, f"{path}.content")
        if text:
            out.append({"role": "system", "content": text})
        return
    msg: dict[str, Any] = {"role": role}
    if isinstance(content, str):
        msg["content"] = content
    else:
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        reasoning: list[str] = []
        for j, b in enumerate(_blocks(content, f"{path}.content")):
            kind = b["type"]
            if kind in ("tool_addition", "tool_removal"):
                raise LineError(f"{path}.content[{j}] is a {kind} block; those are only allowed in system turns")
            if kind == "text" and b.get("text"):
                parts.append({"type": "text", "text": b["text"]})
            elif kind == "image" and b.get("source"):
                parts.append({"type": "image_url", "image_url": {"url": _image_url(b["source"])}})
            elif kind == "thinking" and b.get("thinking") is not None:
                reasoning.append(b["thinking"])
            elif kind == "tool_use":
                calls.append(_tool_call(b))
            elif kind == "tool_result":
                if role == "user":
                    _user_tool_result(b, out)
                else:
                    parts.append({"type": "text", "text": f"Tool result: {str(b['content']) if b.get('content') else ''}"})
        if reasoning:
            msg["reasoning"] = "".join(reasoning)
        if calls:
            msg["tool_calls"] = calls
        if parts:
            msg["content"] = parts[0]["text"] if len(parts) == 1 and parts[0]["type"] == "text" else parts
    if not (role == "user" and "content" not in msg):
        out.append(msg)


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise LineError(f"tools is {type_name(tools)}; expected a list of tool objects")
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise LineError(f"tools[{i}] has no string name")
        if not isinstance(t.get("input_schema"), dict):
            raise LineError(f"tools[{i}].input_schema is {type_name(t.get('input_schema'))}; expected an object")
    changes = [b for m in body.get("messages") or [] if isinstance(m, dict) and isinstance(m.get("content"), list)
               for b in m["content"] if isinstance(b, dict) and b.get("type") in ("tool_addition", "tool_removal")]
    if changes:
        by_name = {t["name"]: t for t in tools or []}
        removed: set[str] = set()
        for b in changes:
            change = b.get("tool")
            if not isinstance(change, dict):
                raise LineError(f"a {b['type']} block has no tool object")
            if change.get("type") == "tool_definition":
                definition = change.get("definition")
                if not isinstance(definition, dict) or not isinstance(definition.get("name"), str):
                    raise LineError("a tool_definition has no definition with a name")
                name = definition["name"]
                by_name[name] = definition
            else:
                name = change.get("name")
                if name not in by_name:
                    raise LineError(f"{b['type']} references tool {str(name)[:40]!r}, which is not declared in tools")
                if b["type"] == "tool_addition":
                    by_name[name] = {**by_name[name], "defer_loading": None}
            if b["type"] == "tool_removal":
                removed.add(name)
            else:
                removed.discard(name)
        tools = [t for n, t in by_name.items() if n not in removed]
    if tools is None:
        return None
    out = []
    for t in tools:
        schema_ = dict(t["input_schema"])
        schema_.setdefault("type", "object")
        out.append({"type": "function", "function": {
            "name": t["name"], "description": t.get("description"), "parameters": schema_,
            "strict": t.get("strict"), "defer_loading": t.get("defer_loading")}})
    return out


def cache_control_paths(body: dict[str, Any]) -> list[str]:
    """Where the body asks for a cache breakpoint (Anthropic's `cache_control`)."""
    paths = []
    system = body.get("system")
    if isinstance(system, list):
        paths += [f"system[{i}]" for i, b in enumerate(system) if isinstance(b, dict) and "cache_control" in b]
    for i, m in enumerate(body.get("messages") or []):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            paths += [f"messages[{i}].content[{j}]" for j, b in enumerate(content)
                      if isinstance(b, dict) and "cache_control" in b]
    paths += [f"tools[{i}]" for i, t in enumerate(body.get("tools") or []) if isinstance(t, dict) and "cache_control" in t]
    return paths


def convert(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) of the chat request vLLM 0.32 makes of an Anthropic body
    (merge_inline_system off; see the module docstring)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise LineError(f"messages is {type_name(messages)}; expected a list of message objects")
    if not messages:
        raise LineError("messages is an empty list; a request needs at least one message")
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        parts = [system] if isinstance(system, str) else [
            b["text"] for b in _blocks(system, "system")
            if b["type"] == "text" and b.get("text") and not b["text"].startswith(_BILLING)]
        if isinstance(system, list) and any(b["type"] in ("tool_addition", "tool_removal") for b in system):
            raise LineError("system has a tool_addition/tool_removal block; those belong in system messages")
        if parts:
            out.append({"role": "system", "content": "".join(parts)})
    for i, m in enumerate(messages):
        _message(m, i, out)
    return out, _tools(body)


def parse(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic body -> a requests row (kind chat, format anthropic)."""
    messages, tools = convert(body)
    if not messages:
        raise LineError("no message is left once converted (only empty or billing-header system text)")
    row: dict[str, Any] = {"format": schema.FORMAT_ANTHROPIC, "kind": schema.KIND_CHAT,
                           "messages": dump_json(messages), "tools": dump_json(tools) if tools is not None else None}
    row["_media"] = sum(1 for m in messages if isinstance(m.get("content"), list)
                        for p in m["content"] if p.get("type") in schema.MEDIA_PARTS)
    row["model"] = as_str(body.get("model"), "model")
    row["max_tokens"] = as_count(body.get("max_tokens"), "max_tokens")
    vllm_extras(body, row)
    meta = body.get("metadata")
    row["session_id"] = as_id(meta.get("user_id")) if isinstance(meta, dict) else None
    marks = cache_control_paths(body)
    row["cache_control"] = dump_json(marks) if marks else None
    row.update(n=1, echo=False, logprobs=None, prompt_logprobs=None)
    return row


def response_fields(resp: dict[str, Any], row: dict[str, Any]) -> None:
    """Output length (usage.output_tokens) and reply text of a logged Anthropic message."""
    usage = resp.get("usage")
    if isinstance(usage, dict):
        row["output_tokens"] = as_count(usage.get("output_tokens"), "response.usage.output_tokens")
        inp = usage.get("input_tokens")
        if inp is not None:  # Anthropic counts cached tokens apart from input_tokens
            row["prompt_tokens_logged"] = as_count(inp, "response.usage.input_tokens") + sum(
                as_count(usage.get(k), f"response.usage.{k}") or 0
                for k in ("cache_read_input_tokens", "cache_creation_input_tokens"))
    content = resp.get("content")
    if isinstance(content, list):
        texts = [b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)]
        row["output_text"] = "".join(texts) if texts else None
