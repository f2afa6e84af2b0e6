"""Tokenize stage: requests.parquet -> tokens.parquet, as a vLLM server would tokenize.

Input: requests.parquet (schema.REQUESTS) and a Hugging Face fast tokenizer.
Output: tokens.parquet (schema.TOKENS), one row per request in the same order,
with the tokenizer's spec in the Parquet metadata key `pc_advise.tokenizer`.

How each kind of request becomes token ids (DESIGN §4), matching vLLM's
OpenAI-compatible server:
- chat: the messages are normalised the way vLLM parses them (text parts joined
  with newlines, tool-call arguments parsed into objects, tools dumped with
  vLLM's field set), rendered with the tokenizer's chat template
  (`apply_chat_template(..., tools=..., add_generation_prompt=True,
  tokenize=False)`), then encoded without adding special tokens again;
- completion: the prompt encoded with special tokens added (the /v1/completions
  default; Qwen adds none);
- tokens: prompt_token_ids passed through;
- hash_trace: no ids (null), n_tokens = input_length.

A request that vLLM would refuse before scheduling (its template fails to
render, an image part for a text-only tokenizer, an empty prompt) is kept:
its row has token_ids = [] , n_tokens = 0 and the reason in `tokenize_error`.
It contributes nothing to prefix-cache queries or hits, as in vLLM, where a
refused request never reaches the cache. Counts report how many and which.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from advisor import schema
from advisor.default_tokenizer import EMBEDDED_SPEC, embedded_dirname, ensure_embedded
from advisor.errors import AdvisorError
from advisor.runfolder import atomic_path

METADATA_KEY = b"pc_advise.tokenizer"
ROWS_PER_WORKER = 256  # rows per batch = workers x this: enough texts to keep every thread busy
FIRST_ERRORS = 20


class RenderError(ValueError):
    """A request vLLM would refuse before tokenizing it (recorded, not raised further)."""


@dataclass(frozen=True)
class TokenizeOptions:
    tokenizer: str | None  # local folder, HF-cache model name, or None for the embedded default
    workers: int  # tokenizer threads (the CLI sets RAYON_NUM_THREADS); sizes the batches
    batch_rows: int | None = None  # rows per batch; None = workers x ROWS_PER_WORKER

    def as_dict(self) -> dict[str, Any]:
        """What decides the output (the stage fingerprint): the tokenizer, not the threads."""
        spec = resolve_spec(self.tokenizer)
        out: dict[str, Any] = {"tokenizer": spec}
        if spec == EMBEDDED_SPEC:
            out["embedded_build"] = embedded_dirname()
        elif Path(spec).is_dir():
            out["tokenizer_files"] = _folder_digest(Path(spec))
        return out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                    "chat_template.json", "special_tokens_map.json", "added_tokens.json")


def _folder_digest(folder: Path) -> str:
    """Content hash of a tokenizer folder, so editing its files reruns the stage."""
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        f = folder / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TokenizeResult:
    rows: int
    tokens: int
    tokenizer: str
    by_kind: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    first_errors: list[list[Any]] = field(default_factory=list)  # [request_id, line, reason]

    def as_counts(self) -> dict[str, Any]:
        return asdict(self)


# --- loading ---
def resolve_spec(spec: str | None) -> str:
    """The spec as recorded: the embedded name, an absolute folder path, or a model name."""
    if spec is None or spec == EMBEDDED_SPEC:
        return EMBEDDED_SPEC
    p = Path(spec).expanduser()
    if p.exists():
        return str(p.resolve())
    return spec


def load_tokenizer(spec: str | None, cache_dir: Path):  # -> transformers fast tokenizer
    """A transformers fast tokenizer for `spec`, never touching the network.

    None (or "embedded:qwen2.5") is the embedded Qwen2.5 tokenizer, built into
    cache_dir on first use; otherwise a local tokenizer folder or the name of a
    model already in the Hugging Face cache.
    """
    from transformers import AutoTokenizer

    resolved = resolve_spec(spec)
    if resolved == EMBEDDED_SPEC:
        source = str(ensure_embedded(cache_dir))
    else:
        p = Path(resolved)
        if Path(spec or "").expanduser().exists() and not p.is_dir():
            raise AdvisorError(
                f"--tokenizer {spec}: is a file; pass the folder that holds tokenizer.json "
                "and tokenizer_config.json."
            )
        source = resolved
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise AdvisorError(
            f"--tokenizer {spec}: no tokenizer found there ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Pass a local folder with "
            "tokenizer.json/tokenizer_config.json, or download the model first "
            f"(`huggingface-cli download {spec}`) so it is in the HF cache; "
            "omit --tokenizer to use the embedded Qwen2.5 tokenizer."
        ) from e
    if not getattr(tok, "is_fast", False):
        raise AdvisorError(
            f"--tokenizer {spec}: loads as a slow (pure Python) tokenizer; pc-advise needs a "
            "fast one. Provide a folder with tokenizer.json."
        )
    return tok


def tokenizer_spec_of(tokens_path: Path) -> str | None:
    """The tokenizer spec tokens.parquet was made with (pass it to load_tokenizer to decode)."""
    meta = pq.read_schema(tokens_path).metadata or {}
    raw = meta.get(METADATA_KEY)
    return raw.decode() if raw is not None else None


def request_count(requests_path: Path) -> int:
    return pq.ParquetFile(requests_path).metadata.num_rows


# --- rendering, the way vLLM's OpenAI server prepares a chat request ---
_BILLING_HEADER = "x-anthropic-billing-header"
_TEXT_KEYS = {"text": "text", "input_text": "text", "output_text": "text",
              "refusal": "refusal", "thinking": "thinking"}


def _part_text(part: Any) -> str | None:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise RenderError(f"a content part is a {type(part).__name__}; expected an object")
    ptype = part.get("type")
    key = _TEXT_KEYS.get(ptype)  # type: ignore[arg-type]
    if key is None:
        raise RenderError(
            f"content part of type {ptype!r} is not text; a text-only model refuses it"
        )
    text = part.get(key)
    if text is not None and not isinstance(text, str):
        raise RenderError(f"content part {key!r} is a {type(text).__name__}; expected string")
    return text


def _message_text(role: str, content: Any) -> str:
    if content is None:
        parts: list[Any] = []
    elif isinstance(content, str):
        parts = [content]
    elif isinstance(content, list):
        parts = content
    else:
        raise RenderError(f"content is a {type(content).__name__}; expected string or list")
    texts = [t for t in map(_part_text, parts) if t]  # vLLM drops empty parts
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
    return "\n".join(texts)


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


def vllm_conversation(messages: Any) -> list[dict[str, Any]]:
    """Chat messages as vLLM hands them to the chat template (text-only models)."""
    if not isinstance(messages, list) or not messages:
        raise RenderError("messages is empty or not a list")
    out: list[dict[str, Any]] = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RenderError("a message is not an object with a string role")
        role = m["role"]
        msg: dict[str, Any] = {"role": role, "content": _message_text(role, m.get("content"))}
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
    merged = {"role": "system",
              "content": "\n\n".join(converted[i]["content"] for i in systems
                                      if converted[i]["content"])}
    return [merged, *(m for m in converted if m["role"] != "system")]


def _template_text(tokenizer: Any, tools: Any) -> str:
    try:
        return str(tokenizer.get_chat_template(None, tools=tools))
    except (ValueError, AttributeError):
        return str(getattr(tokenizer, "chat_template", "") or "")


def render_chat(tokenizer: Any, messages: Any, tools: Any) -> str:
    """The prompt text vLLM would tokenize for this chat request."""
    conversation = vllm_conversation(messages)
    tool_dicts = vllm_tools(tools)
    if any(m["role"] == "developer" for m in conversation):
        template = _template_text(tokenizer, tool_dicts)
        if '"developer"' not in template and "'developer'" not in template:
            conversation = developer_as_system(conversation)
    try:
        text = tokenizer.apply_chat_template(
            conversation, tools=tool_dicts, add_generation_prompt=True, tokenize=False
        )
    except RenderError:
        raise
    except Exception as e:  # a template's raise_exception, a missing key, a type error
        raise RenderError(f"chat template failed: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):
        raise RenderError("chat template did not return text")
    return text


# --- the stage ---
def _require_chat_template(tokenizer: Any, spec: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise AdvisorError(
            f"tokenizer {spec} has no chat template, and the log has chat requests. Pass "
            "--tokenizer a folder whose tokenizer_config.json or chat_template.jinja has the "
            "model's template (the one your vLLM server uses), or omit --tokenizer for the "
            "embedded Qwen2.5 tokenizer."
        )


def _encode(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    """The Rust batch path: all threads, no offsets, GIL released while it runs."""
    if not texts:
        return []
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(list(texts), add_special_tokens=add_special_tokens)]


_COLUMNS = ["request_id", "line", "kind", "messages", "tools", "prompt", "prompt_token_ids",
            "input_length"]


@dataclass
class _Pending:
    """One batch between rendering (Python) and encoding (Rust threads)."""

    request_id: list[str]
    line: list[int]
    ids: list[list[int] | None]
    lengths: list[int]
    errors: list[str | None]
    chat_rows: list[int] = field(default_factory=list)
    chat_texts: list[str] = field(default_factory=list)
    comp_rows: list[int] = field(default_factory=list)
    comp_texts: list[str] = field(default_factory=list)


def _prepare(batch: pa.RecordBatch | pa.Table, tokenizer: Any, spec: str) -> _Pending:
    cols = {c: batch.column(c).to_pylist() for c in _COLUMNS}
    n = len(cols["request_id"])
    p = _Pending(cols["request_id"], cols["line"], [None] * n, [0] * n, [None] * n)
    for i, kind in enumerate(cols["kind"]):
        try:
            if kind == schema.KIND_CHAT:
                _require_chat_template(tokenizer, spec)
                msgs = json.loads(cols["messages"][i]) if cols["messages"][i] else None
                tools = json.loads(cols["tools"][i]) if cols["tools"][i] else None
                p.chat_texts.append(render_chat(tokenizer, msgs, tools))
                p.chat_rows.append(i)
            elif kind == schema.KIND_COMPLETION:
                if not cols["prompt"][i]:
                    raise RenderError("empty prompt; vLLM refuses it")
                p.comp_texts.append(cols["prompt"][i])
                p.comp_rows.append(i)
            elif kind == schema.KIND_TOKENS:
                if not cols["prompt_token_ids"][i]:
                    raise RenderError("empty prompt_token_ids; vLLM refuses it")
                p.ids[i] = cols["prompt_token_ids"][i]
            elif kind == schema.KIND_HASH_TRACE:
                p.lengths[i] = int(cols["input_length"][i] or 0)
            else:
                raise RenderError(f"unknown request kind {kind!r}")
        except (RenderError, json.JSONDecodeError) as e:
            p.errors[i] = str(e)
            p.ids[i] = []
    return p


def _encode_pending(p: _Pending, tokenizer: Any) -> _Pending:
    # Chat prompts already carry the template's special tokens; completions get the
    # tokenizer's own (vLLM: add_special_tokens False for chat, True for completions).
    for rows, texts, special in ((p.chat_rows, p.chat_texts, False),
                                 (p.comp_rows, p.comp_texts, True)):
        for i, row_ids in zip(rows, _encode(tokenizer, texts, special)):
            p.ids[i] = row_ids
    return p


def _finish(p: _Pending) -> tuple[pa.Table, list[list[Any]]]:
    for i, row_ids in enumerate(p.ids):
        if row_ids is not None:
            p.lengths[i] = len(row_ids)
    table = pa.table(
        {
            "request_id": pa.array(p.request_id, pa.string()),
            "token_ids": pa.array(p.ids, pa.list_(pa.int32())),
            "n_tokens": pa.array(p.lengths, pa.int64()),
            "tokenize_error": pa.array(p.errors, pa.string()),
        },
        schema=schema.TOKENS,
    )
    failed = [[p.request_id[i], p.line[i], e] for i, e in enumerate(p.errors) if e]
    return table, failed


def tokenize_batch(
    batch: pa.RecordBatch | pa.Table, tokenizer: Any, spec: str
) -> tuple[pa.Table, list[list[Any]]]:
    """One batch of request rows -> (tokens rows, [[request_id, line, reason], ...] refusals)."""
    return _finish(_encode_pending(_prepare(batch, tokenizer, spec), tokenizer))


def tokenize_file(
    requests_path: Path,
    tokens_path: Path,
    tokenizer: Any,
    options: TokenizeOptions,
    progress: Callable[[int], None] | None = None,
) -> TokenizeResult:
    """Stream requests.parquet by row batches into tokens.parquet (written atomically).

    Batch k is encoded on a helper thread (the Rust encoder releases the GIL and
    fans out over its own threads) while batch k+1 is read and rendered here, so
    the Python-side work hides behind the encoder. `progress(n)` is called with
    the number of rows finished after each batch.
    """
    spec = resolve_spec(options.tokenizer)
    out_schema = schema.TOKENS.with_metadata({METADATA_KEY: spec.encode()})
    src = pq.ParquetFile(requests_path)
    batch_rows = options.batch_rows or ROWS_PER_WORKER * max(1, options.workers)
    rows = tokens = n_errors = 0
    by_kind: dict[str, int] = {}
    first_errors: list[list[Any]] = []

    def write(writer: pq.ParquetWriter, encoded: _Pending) -> None:
        nonlocal rows, tokens, n_errors
        table, failed = _finish(encoded)
        writer.write_table(table.replace_schema_metadata(out_schema.metadata))
        rows += table.num_rows
        tokens += pc.sum(table.column("n_tokens")).as_py() or 0
        n_errors += len(failed)
        first_errors.extend(failed[: max(0, FIRST_ERRORS - len(first_errors))])
        if progress is not None:
            progress(table.num_rows)

    with atomic_path(tokens_path) as tmp, ThreadPoolExecutor(max_workers=1) as pool:
        with pq.ParquetWriter(tmp, out_schema, compression="zstd") as writer:
            in_flight: Future[_Pending] | None = None
            for batch in src.iter_batches(batch_size=batch_rows, columns=_COLUMNS):
                for k in batch.column("kind").to_pylist():
                    by_kind[k] = by_kind.get(k, 0) + 1
                pending = _prepare(batch, tokenizer, spec)
                if in_flight is not None:
                    write(writer, in_flight.result())
                in_flight = pool.submit(_encode_pending, pending, tokenizer)
            if in_flight is not None:
                write(writer, in_flight.result())
    return TokenizeResult(rows, tokens, spec, by_kind, n_errors, first_errors)
