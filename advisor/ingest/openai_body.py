"""OpenAI request bodies: chat messages, tools, completion prompts, sampling fields, replies.

Input: a decoded chat or completion body (or its logged response). Output: the requests
row's fields it gives, checked the way vLLM's OpenAI server would take them, or a LineError
naming the field ("messages[2].content is a number; ..."). advisor.ingest.formats reads the
shapes around a body (wrappers, batches, gateways) and calls these.
"""

from __future__ import annotations

from typing import Any

from advisor import schema
from advisor.ingest.fields import (
    INT32_MAX,
    LineError,
    as_count,
    as_flag,
    as_logprob_count,
    as_str,
    check_ids,
    dump_json,
    type_name,
)

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# vLLM's VLLM_MAX_N_SEQUENCES default: it refuses a larger n (sampling_params._verify_num_sequences).
MAX_N = 16_384


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


def media_count(messages: list[Any]) -> int:
    """Media content parts (schema.MEDIA_PARTS) in validated chat messages."""
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for p in m["content"] if p.get("type") in schema.MEDIA_PARTS)


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


def completion_prompt(body: dict[str, Any], row: dict[str, Any]) -> None:
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


def body_fields(body: dict[str, Any], row: dict[str, Any]) -> None:
    """Fields every request body may carry: model, sampling bound, LoRA, salt, user."""
    row["model"] = as_str(body.get("model"), "model")
    mt = body.get("max_completion_tokens")
    row["max_tokens"] = as_count(mt if mt is not None else body.get("max_tokens"),
                               "max_completion_tokens" if mt is not None else "max_tokens")
    vllm_extras(body, row)
    sampling_fields(body, row)


def vllm_extras(body: dict[str, Any], row: dict[str, Any]) -> None:
    """vLLM's own request extensions that change the prompt or its cache: `cache_salt` and
    `chat_template_kwargs` (the same fields in OpenAI- and Anthropic-shaped bodies)."""
    row["cache_salt"] = as_str(body.get("cache_salt"), "cache_salt")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise LineError(f"chat_template_kwargs is {type_name(kwargs)}; expected an object")
        row["chat_template_kwargs"] = dump_json(kwargs)


def sampling_fields(body: dict[str, Any], row: dict[str, Any]) -> None:
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


def chat_response(resp: dict[str, Any] | str, row: dict[str, Any]) -> None:
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
