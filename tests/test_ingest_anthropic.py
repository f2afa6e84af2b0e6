"""Anthropic Messages requests: converted to the chat request vLLM's Anthropic endpoint makes.

Stories with hand-written expected conversions, and an oracle property against vLLM's own
`AnthropicServingMessages.to_chat_completion_request` where vLLM imports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor import schema
from advisor.ingest import anthropic
from advisor.ingest import stage as ing
from advisor.ingest.fields import LineError
from advisor.tokens.chatprompt import merge_inline_system, requires_system_first

TOOLS = [{"name": "read_file", "description": "Read a file", "input_schema": {"type": "object", "properties": {
    "path": {"type": "string"}}, "required": ["path"]}, "cache_control": {"type": "ephemeral"}},
    {"name": "ls", "input_schema": {"properties": {}}}]
AGENT = {
    "model": "claude-sonnet-4-5", "max_tokens": 1024, "metadata": {"user_id": "user-7"},
    "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1.0.3; cch=ab12"},
               {"type": "text", "text": "You are a coding agent. "},
               {"type": "text", "text": "Be careful.", "cache_control": {"type": "ephemeral"}}],
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "List the files."},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call ls.", "signature": "sig"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "ls", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a.py"},
                                                                          {"type": "text", "text": "b.py"}]},
            {"type": "text", "text": "Now read a.py", "cache_control": {"type": "ephemeral"}}]},
        {"role": "system", "content": "Reminder: stay in the repo."},
        {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "xx"}]},
    ],
}
# What vLLM 0.32 makes of AGENT (read off serving.py's conversion by hand).
AGENT_MESSAGES = [
    {"role": "system", "content": "You are a coding agent. Be careful."},
    {"role": "user", "content": "List the files."},
    {"role": "assistant", "reasoning": "I should call ls.", "content": "Let me look.",
     "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "toolu_1", "content": "a.py\nb.py"},
    {"role": "user", "content": "Now read a.py"},
    {"role": "system", "content": "Reminder: stay in the repo."},
    {"role": "assistant"},
]


def ingest_lines(tmp: Path, objs: list[Any], **opts: Any) -> tuple[ing.IngestResult, list[dict], list[dict]]:
    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / "log.jsonl"
    src.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    out = tmp / "out"
    res = ing.ingest_source(str(src), out / "requests.parquet", out / "rejects.jsonl", ing.IngestOptions(**opts))
    rows = pq.read_table(out / "requests.parquet").to_pylist()
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    return res, rows, rejects


def test_an_agent_request_converts_as_vllm_converts_it(tmp_path: Path) -> None:
    _, rows, rejects = ingest_lines(tmp_path, [AGENT])
    assert rejects == []
    row = rows[0]
    assert (row["format"], row["kind"], row["model"], row["max_tokens"]) == ("anthropic", "chat", "claude-sonnet-4-5", 1024)
    assert json.loads(row["messages"]) == AGENT_MESSAGES
    tools = json.loads(row["tools"])
    assert tools[0]["function"] == {"name": "read_file", "description": "Read a file", "strict": None,
                                    "defer_loading": None, "parameters": TOOLS[0]["input_schema"]}
    assert tools[1]["function"]["parameters"] == {"properties": {}, "type": "object"}  # vLLM adds the type
    assert row["session_id"] == "user-7"
    assert json.loads(row["cache_control"]) == ["system[2]", "messages[2].content[1]", "tools[0]"]


def test_wrapped_batched_and_string_forms(tmp_path: Path) -> None:
    body = {"model": "m", "max_tokens": 10, "system": "sys", "messages": [{"role": "user", "content": "hi"}]}
    wrapped = {"timestamp": "2026-11-03T10:00:05Z", "request_id": "req-1", "request": json.dumps(body),
               "response": {"id": "msg_1", "type": "message", "content": [{"type": "text", "text": "hello"}],
                            "usage": {"input_tokens": 3, "cache_read_input_tokens": 8, "output_tokens": 4}}}
    batch = {"custom_id": "b-1", "params": body}
    _, rows, rejects = ingest_lines(tmp_path, [wrapped, batch, {"request": body, "response": {"choices": [
        {"message": {"content": "x"}}], "usage": {"completion_tokens": 2}}}])
    assert rejects == [] and [r["format"] for r in rows] == ["anthropic"] * 3
    w, b, openai_reply = rows
    assert (w["logged_id"], w["timestamp"], w["output_tokens"], w["output_text"]) == ("req-1", 1793700005.0, 4, "hello")
    assert w["prompt_tokens_logged"] == 11  # input_tokens + cache reads: Anthropic counts them apart
    assert (b["logged_id"], b["timestamp_logged"]) == ("b-1", False)
    assert openai_reply["output_tokens"] == 2
    assert json.loads(w["messages"]) == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]


def test_openai_bodies_stay_openai_and_the_format_can_be_forced(tmp_path: Path) -> None:
    plain = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    _, rows, _ = ingest_lines(tmp_path, [plain])
    assert rows[0]["format"] == "openai-chat"
    _, rows, _ = ingest_lines(tmp_path / "f", [plain], format="anthropic")
    assert rows[0]["format"] == "anthropic" and json.loads(rows[0]["messages"]) == [{"role": "user", "content": "hi"}]


BAD = [
    ({"system": "s", "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type"),
    ({"system": "s", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"system": "s", "messages": [{"role": "user", "content": 5}]}, "messages[0].content is a number"),
    ({"system": "s", "messages": []}, "empty list"),
    ({"system": "s", "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f"}]}, "tools[0].input_schema"),
    ({"system": "s", "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                                     "input": [1]}]}]}, "input is a list"),
    ({"system": "s", "messages": [{"role": "user", "content": [{"type": "tool_addition", "tool": {
        "type": "tool_reference", "name": "f"}}]}]}, "only allowed in system turns"),
    ({"system": "s", "max_tokens": "ten", "messages": [{"role": "user", "content": "x"}]}, "max_tokens is a string"),
]


@pytest.mark.parametrize("body,words", BAD, ids=[w[:30] for _, w in BAD])
def test_bodies_vllm_would_refuse_are_rejected_naming_the_field(tmp_path: Path, body: dict, words: str) -> None:
    res, rows, rejects = ingest_lines(tmp_path, [{"model": "m", **body}])
    assert rows == [] and words in rejects[0]["reason"] and res.lines_read == 1


def test_tool_additions_and_removals_change_the_tool_list() -> None:
    body = {"model": "m", "max_tokens": 5, "tools": TOOLS, "messages": [
        {"role": "system", "content": [{"type": "tool_removal", "tool": {"type": "tool_reference", "name": "ls"}},
                                       {"type": "tool_addition", "tool": {"type": "tool_definition", "definition": {
                                           "name": "grep", "input_schema": {"type": "object"}}}}]},
        {"role": "user", "content": "go"}]}
    _, tools = anthropic.convert(body)
    assert [t["function"]["name"] for t in tools] == ["read_file", "grep"]
    body["messages"][0]["content"][0]["tool"]["name"] = "nope"
    with pytest.raises(LineError, match="not declared in tools"):
        anthropic.convert(body)


# --- the template decides whether inline system turns merge ------------------------------------
STRICT = ("{% for m in messages %}{% if m.role == 'system' and not loop.first %}{{ raise_exception('system "
          "first') }}{% endif %}<{{ m.role }}>{{ m.content }}{% endfor %}")
LOOSE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


def test_inline_system_turns_merge_only_for_templates_that_need_it() -> None:
    assert requires_system_first(STRICT) and not requires_system_first(LOOSE) and requires_system_first("")
    merged = merge_inline_system(AGENT_MESSAGES)
    assert merged[0] == {"role": "system", "content": "You are a coding agent. Be careful.Reminder: stay in the repo."}
    assert [m["role"] for m in merged] == ["system", "user", "assistant", "tool", "user", "assistant"]
    only_first = AGENT_MESSAGES[:2]
    assert merge_inline_system(only_first) is only_first


def test_the_tokenize_stage_merges_for_a_strict_template(tmp_path: Path) -> None:

    class Tok:  # only what render_chat and _encode read
        def __init__(self, template: str) -> None:
            self.chat_template = template

        def get_chat_template(self, name: Any, tools: Any = None) -> str:
            return self.chat_template

        def apply_chat_template(self, conversation: list[dict], tools: Any = None, tokenize: bool = False,
                                **kw: Any) -> str:
            return "".join(f"<{m['role']}>{m.get('content') or ''}" for m in conversation)

    _, rows, _ = ingest_lines(tmp_path, [AGENT])
    table = pq.read_table(tmp_path / "out" / "requests.parquet")
    for template, first in ((STRICT, "<system>You are a coding agent. Be careful.Reminder: stay in the repo.<user>"),
                            (LOOSE, "<system>You are a coding agent. Be careful.<user>")):
        from advisor.tokens import batch as tk

        pending = tk._prepare(table, Tok(template), "test")
        assert pending.errors == [None] and pending.chat_texts[0].startswith(first)


# --- the oracle: vLLM's own conversion -----------------------------------------------------------
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
name = st.sampled_from(["ls", "grep", "read_file"])
user_block = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, text),
    st.builds(lambda t: {"type": "text", "text": t, "cache_control": {"type": "ephemeral"}}, text),
    st.builds(lambda d: {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": d}}, text),
    st.builds(lambda i, c: {"type": "tool_result", "tool_use_id": i, "content": c}, name, st.one_of(
        text, st.lists(st.one_of(st.builds(lambda t: {"type": "text", "text": t}, text),
                                 st.just({"type": "image", "source": {"type": "url", "url": "https://x/y.png"}})),
                       max_size=3))),
)
assistant_block = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, text),
    st.builds(lambda t: {"type": "thinking", "thinking": t, "signature": "s"}, text),
    st.just({"type": "redacted_thinking", "data": "opaque"}),
    st.builds(lambda i, n, a: {"type": "tool_use", "id": f"toolu_{i}", "name": n, "input": {"arg": a}},
              st.integers(0, 9), name, text),
    st.builds(lambda c: {"type": "tool_result", "tool_use_id": "t", "content": c}, st.one_of(text, st.just(None))),
)
message = st.one_of(
    st.builds(lambda c: {"role": "user", "content": c}, st.one_of(text, st.lists(user_block, max_size=4))),
    st.builds(lambda c: {"role": "assistant", "content": c}, st.one_of(text, st.lists(assistant_block, max_size=4))),
    st.builds(lambda c: {"role": "system", "content": c}, st.one_of(
        text, st.just("x-anthropic-billing-header: a=1"), st.lists(st.builds(lambda t: {"type": "text", "text": t},
                                                                                  text), max_size=2))),
)
system = st.one_of(st.none(), text, st.lists(st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, text),
    st.just({"type": "text", "text": "x-anthropic-billing-header: cch=1"})), max_size=3))
tool = st.builds(lambda n, d, s, strict: {"name": n, "description": d, "input_schema": s, "strict": strict},
                 name, st.one_of(st.none(), text), st.sampled_from([{"type": "object"}, {"properties": {}}]),
                 st.one_of(st.none(), st.booleans()))
body = st.builds(lambda s, ms, ts: {"model": "m", "max_tokens": 64, "messages": ms,
                                    **({"system": s} if s is not None else {}), **({"tools": ts} if ts else {})},
                 system, st.lists(message, min_size=1, max_size=5), st.lists(tool, max_size=2, unique_by=lambda t: t["name"]))


@pytest.mark.oracle
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=body)
def test_conversion_equals_vllms(b: dict[str, Any]) -> None:
    serving = pytest.importorskip("vllm.entrypoints.anthropic.serving",
                                  reason="this vLLM's Anthropic endpoint does not import here")
    AnthropicServingMessages = serving.AnthropicServingMessages
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest

    from advisor.tokens.chatprompt import vllm_tools

    request = AnthropicMessagesRequest(**json.loads(json.dumps(b)))
    messages, tools = anthropic.convert(b)
    for merge in (False, True):
        theirs = AnthropicServingMessages.to_chat_completion_request(request, merge_inline_system=merge)
        mine = merge_inline_system(messages) if merge else messages
        assert json.loads(json.dumps(mine)) == json.loads(json.dumps(theirs.messages))
    their_tools = [t.model_dump() for t in theirs.tools] if theirs.tools is not None else None
    assert (vllm_tools(tools) if tools is not None else None) == (
        vllm_tools(their_tools) if their_tools is not None else None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=body)
def test_every_body_converts_to_messages_the_chat_path_accepts(b: dict[str, Any]) -> None:
    from advisor.ingest.openai_body import check_messages

    try:
        row = anthropic.parse(b)
    except LineError as e:  # only system turns, all of them empty or billing headers
        assert "no message is left" in e.reason
        return
    assert row["format"] == schema.FORMAT_ANTHROPIC
    check_messages(json.loads(row["messages"]))


def test_a_cut_line_and_a_null_request_are_rejected_and_counted(tmp_path: Path) -> None:
    whole = json.dumps(AGENT)
    res, rows, rejects = ingest_lines(tmp_path, [AGENT, whole[: len(whole) // 2], {"request": None, "system": "s"},
                                                 {"custom_id": "b", "params": None}])
    assert [r["format"] for r in rows] == ["anthropic"] and res.lines_read == 4
    assert [r["cause"] for r in rejects] == ["invalid_json", "unknown_shape", "wrong_field"]
    assert "no known request shape" in rejects[1]["reason"] and "params is null" in rejects[2]["reason"]
