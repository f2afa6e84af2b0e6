"""Chat request -> prompt text, the way vLLM's OpenAI-compatible server renders it.

Input: a logged chat request's `messages` and `tools` (parsed JSON) and a
transformers tokenizer with a chat template. Output: the prompt text vLLM would
tokenize (with add_special_tokens=False), or a RenderError saying why vLLM
would refuse the request before scheduling it.

What vLLM (0.32, vllm/renderers/) does before the template sees a request, and
this module reproduces for the text of a request:
- content: text parts (`text`, `input_text`, `output_text`, `refusal`,
  `thinking`) are read; media parts (images, audio, video: schema.MEDIA_PARTS) are
  left out of the text (a multimodal model's processor would add its own tokens for
  them, which pc-advise does not count; `media_parts` says how many); other part
  types are refused, as vLLM refuses them; a system part starting with
  the `x-anthropic-billing-header` line loses that line. Templates that loop
  over a message's content ("openai" content format, detected from the
  template's syntax tree) get a list of {"type": "text", "text"} parts; others
  ("string") get the non-empty texts joined by newlines. Tool results are
  always one string.
- assistant tool calls: an empty list is dropped; `arguments` strings are parsed
  into objects (unparseable or non-object arguments become {}).
- developer turns, when the template does not mention that role, become system
  turns, and all system turns merge into one at the front.
- tools: dumped with vLLM's field set (name, description, parameters; strict and
  defer_loading when set); an empty tools array is refused.
- chat_template_kwargs (e.g. Qwen3's `enable_thinking`): passed to the template when
  it reads the name or apply_chat_template takes it, else dropped; `chat_template` and
  `tokenize` make vLLM refuse the request. The request-level add_generation_prompt
  (True) wins over one given there, as vLLM 0.32 merges them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from advisor.schema import MEDIA_PARTS

STRING, OPENAI = "string", "openai"  # vLLM's two chat-template content formats


class RenderError(ValueError):
    """A request vLLM would refuse before tokenizing it (recorded, not raised further)."""


_BILLING_HEADER = "x-anthropic-billing-header"
_TEXT_KEYS = {"text": "text", "input_text": "text", "output_text": "text",
              "refusal": "refusal", "thinking": "thinking"}


# --- the template's content format ---
@lru_cache(maxsize=16)
def content_format(template: str) -> str:
    """OPENAI when the template iterates over a message's content, else STRING."""
    import jinja2
    from jinja2 import nodes

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        ast = _compile_jinja_template(template).environment.parse(template)
    except Exception:  # transformers' private helper moved, or the template does not parse
        try:
            ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
        except jinja2.TemplateError:
            return STRING

    def unwrap(node: Any) -> Any:
        while isinstance(node, (nodes.Filter, nodes.Test)) or (
            isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)
        ):
            node = node.node
        return node

    def names_in(node: Any, names: set[str]) -> bool:
        node = unwrap(node)
        return isinstance(node, nodes.Name) and node.name in names

    def content_of(node: Any, names: set[str]) -> bool:
        node = unwrap(node)
        if isinstance(node, nodes.Getitem):
            key_ok = isinstance(node.arg, nodes.Const) and node.arg.value == "content"
        elif isinstance(node, nodes.Getattr):
            key_ok = node.attr == "content"
        else:
            return False
        return key_ok and isinstance(node.node, nodes.Name) and node.node.name in names

    # Variables that hold the message list: `messages` and whatever is assigned from it.
    lists = {"messages"}
    grew = True
    while grew:
        grew = False
        for assign in ast.find_all(nodes.Assign):
            if isinstance(assign.target, nodes.Name) and assign.target.name not in lists \
                    and names_in(assign.node, lists):
                lists.add(assign.target.name)
                grew = True
    items = {loop.target.name for loop in ast.find_all(nodes.For)
             if isinstance(loop.target, nodes.Name) and names_in(loop.iter, lists)}
    in_macros = {id(loop) for macro in ast.find_all(nodes.Macro)
                 for loop in macro.find_all(nodes.For)}
    for loop in ast.find_all(nodes.For):
        if content_of(loop.iter, items):
            return OPENAI
        if id(loop) not in in_macros and isinstance(loop.iter, nodes.Name) \
                and loop.iter.name == "content":
            return OPENAI
    return STRING


# --- messages ---
def _part_text(part: Any) -> str | None:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise RenderError(f"a content part is a {type(part).__name__}; expected an object")
    ptype = part.get("type")
    if ptype in MEDIA_PARTS:
        return None  # rendered without it: its tokens are the model's processor's (media_parts counts it)
    key = _TEXT_KEYS.get(ptype)  # type: ignore[arg-type]
    if key is None:
        raise RenderError(
            f"content part of type {ptype!r} is neither text nor media; vLLM refuses it"
        )
    text = part.get(key)
    if text is not None and not isinstance(text, str):
        raise RenderError(f"content part {key!r} is a {type(text).__name__}; expected string")
    return text


def media_parts(messages: Any) -> int:
    """How many media content parts (schema.MEDIA_PARTS) the chat messages hold."""
    if not isinstance(messages, list):
        return 0
    return sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") in MEDIA_PARTS)


def _texts(role: str, content: Any) -> list[str]:
    """The text of each content part vLLM reads, in order (parts without text skipped)."""
    if content is None:
        parts: list[Any] = []
    elif isinstance(content, str):
        parts = [content]
    elif isinstance(content, list):
        parts = content
    else:
        raise RenderError(f"content is a {type(content).__name__}; expected string or list")
    texts = [t for t in map(_part_text, parts) if t is not None]
    if role == "system":
        # vLLM drops this per-request header line (it would break every prefix).
        kept = []
        for t in texts:
            if t.startswith(_BILLING_HEADER):
                t = t.partition("\n")[2]
                if not t:
                    continue
            kept.append(t)
        texts = kept
    return texts


def _content(role: str, content: Any, fmt: str) -> Any:
    texts = _texts(role, content)
    if fmt == OPENAI:
        if role == "tool":  # vLLM flattens text-only tool results for every template
            return "\n".join(texts)
        return [{"type": "text", "text": t} for t in texts]
    return "\n".join(t for t in texts if t)  # empty parts are dropped before joining


def _tool_call(call: Any) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise RenderError("assistant tool_calls entries must be objects")
    fn = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(fn, dict):
        raise RenderError("assistant tool_calls must be of type 'function' with a function")
    args = fn.get("arguments")
    if not args:
        parsed: Any = {}
    elif isinstance(args, dict):
        parsed = args
    elif isinstance(args, str):
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError:
            parsed = {}  # vLLM coerces unparseable arguments to {} so the chat can continue
    else:
        parsed = args
    if not isinstance(parsed, dict):
        parsed = {}
    return {**call, "function": {**fn, "arguments": parsed}}


def vllm_conversation(messages: Any, fmt: str = STRING) -> list[dict[str, Any]]:
    """Chat messages as vLLM hands them to a chat template of content format `fmt`."""
    if not isinstance(messages, list) or not messages:
        raise RenderError("messages is empty or not a list")
    out: list[dict[str, Any]] = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RenderError("a message is not an object with a string role")
        role = m["role"]
        msg: dict[str, Any] = {"role": role, "content": _content(role, m.get("content"), fmt)}
        if role == "assistant" and m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise RenderError("assistant tool_calls is not a list")
            if calls:  # an empty list is dropped: the template takes the plain path
                msg["tool_calls"] = [_tool_call(c) for c in calls]
        if role == "tool" and "tool_call_id" in m:
            msg["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if role == "assistant" and m.get("reasoning") is not None:
            msg["reasoning"] = msg["reasoning_content"] = m["reasoning"]
        out.append(msg)
    return out


def developer_as_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's fallback for templates without a developer role: developer turns become
    system turns, and several system turns (or one not first) merge into one at the
    front, their non-empty texts joined by a blank line."""
    converted = []
    for m in conversation:
        if m["role"] == "developer":
            m = {k: v for k, v in m.items() if k != "tools"}
            m["role"] = "system"
        converted.append(m)
    systems = [i for i, m in enumerate(converted) if m["role"] == "system"]
    if not systems or systems == [0]:
        return converted

    def text(content: Any) -> str:
        if isinstance(content, list):
            return "\n".join(p["text"] for p in content if isinstance(p, dict) and "text" in p)
        return content or ""

    merged = {"role": "system",
              "content": "\n\n".join(t for i in systems if (t := text(converted[i]["content"])))}
    return [merged, *(m for m in converted if m["role"] != "system")]


@lru_cache(maxsize=16)
def requires_system_first(template: str) -> bool:
    """vLLM's Anthropic endpoint's test (`_detect_merge_inline_system`): a template that
    fails to render [system, user, system, user] in a bare sandbox (no raise_exception
    helper, so a template calling it fails too) gets inline system turns merged."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    if not template:
        return True
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    probe = [{"role": r, "content": "t"} for r in ("system", "user", "system", "user")]
    try:
        env.from_string(template).render(messages=probe, add_generation_prompt=False)
    except jinja2.TemplateError:
        return True
    return False


def merge_inline_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What vLLM's Anthropic conversion makes of `messages` (converted with inline system turns
    kept) when the template requires system first: every system turn's text, in order and
    joined with nothing between, in one leading system turn (vLLM 0.32 and 0.34)."""
    systems = [m for m in messages if m.get("role") == "system"]
    if not systems or (len(systems) == 1 and messages[0] is systems[0]):
        return messages
    merged = {"role": "system", "content": "".join(m.get("content") or "" for m in systems)}
    return [merged, *(m for m in messages if m.get("role") != "system")]


# --- tools ---
def vllm_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Tools as vLLM dumps them for the template: known fields only, unset optionals as null."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RenderError("tools is not a list")
    if not tools:
        raise RenderError("tools is an empty array; vLLM (like OpenAI) refuses the request")
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RenderError("a tool has no function object with a string name")
        defer = t.get("defer_loading")
        f: dict[str, Any] = {
            "name": fn["name"],
            "description": fn.get("description"),
            "parameters": fn.get("parameters"),
        }
        if fn.get("strict") is not None:
            f["strict"] = fn["strict"]
        f_defer = fn.get("defer_loading") if fn.get("defer_loading") is not None else defer
        if f_defer is not None:
            f["defer_loading"] = f_defer
        tool: dict[str, Any] = {"type": t.get("type", "function"), "function": f}
        if defer is not None:
            tool["defer_loading"] = defer
        out.append(tool)
    return out


# --- rendering ---
def template_text(tokenizer: Any, tools: Any) -> str:
    """The template apply_chat_template will use (a tokenizer may hold several)."""
    try:
        return str(tokenizer.get_chat_template(None, tools=tools))
    except (ValueError, AttributeError):
        return str(getattr(tokenizer, "chat_template", "") or "")


_REFUSED_KWARGS = frozenset({"chat_template", "tokenize"})  # vLLM answers 400 to these


@lru_cache(maxsize=64)
def template_variables(template: str) -> frozenset[str]:
    """Names a chat template reads without defining them (jinja2's undeclared variables)."""
    import jinja2
    import jinja2.ext
    import jinja2.meta
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(env.parse(template)))
    except jinja2.TemplateError:  # e.g. HF's {% generation %} tag: no template variables known
        return frozenset()


@lru_cache(maxsize=1)
def _hf_chat_params() -> frozenset[str]:
    """The named parameters of transformers' own apply_chat_template."""
    import inspect

    try:
        from transformers import PythonBackend
    except ImportError:  # older transformers
        from transformers import PreTrainedTokenizerBase as PythonBackend
    return frozenset(p.name for p in inspect.signature(PythonBackend.apply_chat_template).parameters.values()
                     if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL))


def template_kwargs(template: str, given: dict[str, Any] | None) -> dict[str, Any]:
    """The request's `chat_template_kwargs` that reach the template, as vLLM resolves them:
    names the template reads or apply_chat_template takes; others are dropped silently.
    `chat_template` and `tokenize` are refused, as vLLM refuses the request."""
    if not given:
        return {}
    if refused := sorted(_REFUSED_KWARGS & given.keys()):
        raise RenderError(f"chat_template_kwargs sets {', '.join(refused)}, which vLLM refuses (HTTP 400)")
    accept = (template_variables(template) | _hf_chat_params()) - _REFUSED_KWARGS
    return {k: v for k, v in given.items() if k in accept}


def render_chat(tokenizer: Any, messages: Any, tools: Any, chat_template_kwargs: dict[str, Any] | None = None,
                from_anthropic: bool = False) -> str:
    """The prompt text vLLM would tokenize for this chat request (with its
    `chat_template_kwargs`, e.g. Qwen3's enable_thinking, resolved as vLLM does).
    `from_anthropic`: the messages are an Anthropic request as advisor.ingest.anthropic
    converted it; the server merges its inline system turns when the template needs that."""
    tool_dicts = vllm_tools(tools)
    template = template_text(tokenizer, tool_dicts)
    if from_anthropic and isinstance(messages, list) and any(
            requires_system_first(template_text(tokenizer, t)) for t in (None, [])):
        messages = merge_inline_system(messages)
    conversation = vllm_conversation(messages, content_format(template))
    if any(m["role"] == "developer" for m in conversation) \
            and '"developer"' not in template and "'developer'" not in template:
        conversation = developer_as_system(conversation)
    # The request's own add_generation_prompt (True unless it says otherwise, which ingest
    # does not keep) wins over one in chat_template_kwargs, as vLLM merges them.
    kwargs = {**template_kwargs(template, chat_template_kwargs), "add_generation_prompt": True}
    try:
        text = tokenizer.apply_chat_template(conversation, tools=tool_dicts, tokenize=False, **kwargs)
    except Exception as e:  # a template's raise_exception, a missing key, a type error
        raise RenderError(f"chat template failed: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):
        raise RenderError("chat template did not return text")
    return text
