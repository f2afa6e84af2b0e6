"""One batch of request rows -> token rows, as vLLM's server would tokenize them.

Input: a record batch of requests.parquet's columns (`COLUMNS`, and `OPTIONAL_COLUMNS` when
present), a loaded tokenizer and a `SegmentEncoder` (advisor/tokens/segments.py) that keeps its
segment cache across batches. Output: a schema.TOKENS table and the refused requests. What
each kind of request becomes is in advisor/tokens/stage.py's docstring; this module renders
chat prompts (advisor/tokens/chatprompt.py), encodes the texts and builds the Arrow rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from advisor import schema
from advisor.errors import AdvisorError
from advisor.jsonio import loads
from advisor.tokens.chatprompt import RenderError, media_parts, render_chat
from advisor.tokens.segments import (
    DEFAULT_CACHE_BYTES,
    ID_BYTES,
    SegmentCache,
    SegmentEncoder,
    check_tokenizer,
)


def _require_chat_template(tokenizer: Any, spec: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise AdvisorError(
            f"tokenizer {spec} has no chat template, and the log has chat requests. Pass "
            "--tokenizer a folder whose tokenizer_config.json or chat_template.jinja has the "
            "model's template (the one your vLLM server uses), or omit --tokenizer for the "
            "embedded Qwen2.5 tokenizer."
        )


COLUMNS = ["request_id", "line", "kind", "messages", "tools", "prompt", "prompt_token_ids",
            "input_length"]
OPTIONAL_COLUMNS = ["output_tokens", "output_text", "chat_template_kwargs", "format"]  # read when present


@dataclass
class _Pending:
    """One batch between rendering (Python) and encoding (Rust). Ids are int32 bytes."""

    request_id: list[str]
    line: list[int]
    ids: list[bytes | None]
    errors: list[str | None]
    chat_rows: list[int] = field(default_factory=list)
    chat_texts: list[str] = field(default_factory=list)
    comp_rows: list[int] = field(default_factory=list)
    comp_texts: list[str] = field(default_factory=list)
    out_rows: list[int] = field(default_factory=list)  # replies logged as text without a count
    out_texts: list[str] = field(default_factory=list)
    out_counts: list[int | None] = field(default_factory=list)
    media: list[int | None] = field(default_factory=list)  # media parts left out, per row (None: none)
    trace_lengths: dict[int, int] = field(default_factory=dict)  # hash-trace rows: input_length


_JSON_COLUMNS = ("messages", "tools", "chat_template_kwargs")  # JSON texts: read as their UTF-8 bytes


def _column(batch: pa.RecordBatch | pa.Table, name: str) -> list[Any]:
    """A column's values; a JSON text's as the bytes Arrow holds, which the JSON reader takes
    as they are (as a str, each would be decoded here and encoded again there)."""
    col = batch.column(name)
    if name in _JSON_COLUMNS and pa.types.is_string(col.type):
        col = col.cast(pa.binary())
    return col.to_pylist()


def _prepare(batch: pa.RecordBatch | pa.Table, tokenizer: Any, spec: str | None) -> _Pending:
    n = batch.num_rows
    # optional columns (absent from older or partial tables) read as all-null
    cols = {c: _column(batch, c) if c in batch.schema.names else [None] * n for c in COLUMNS + OPTIONAL_COLUMNS}
    p = _Pending(cols["request_id"], cols["line"], [None] * n, [None] * n)
    p.out_counts = [None] * n
    p.media = [None] * n
    for i, (count, text) in enumerate(zip(cols["output_tokens"], cols["output_text"], strict=True)):
        if count is None and isinstance(text, str) and tokenizer is not None:
            p.out_rows.append(i)
            p.out_texts.append(text)
    for i, kind in enumerate(cols["kind"]):
        assert tokenizer is not None or kind not in (schema.KIND_CHAT, schema.KIND_COMPLETION)
        try:
            if kind == schema.KIND_CHAT:
                _require_chat_template(tokenizer, spec or "")
                msgs = loads(cols["messages"][i]) if cols["messages"][i] else None
                tools = loads(cols["tools"][i]) if cols["tools"][i] else None
                p.media[i] = media_parts(msgs) or None
                extra = cols["chat_template_kwargs"][i]
                p.chat_texts.append(render_chat(tokenizer, msgs, tools, loads(extra) if extra else None,
                                                from_anthropic=cols["format"][i] == schema.FORMAT_ANTHROPIC))
                p.chat_rows.append(i)
            elif kind == schema.KIND_COMPLETION:
                if not cols["prompt"][i]:
                    raise RenderError("empty prompt; vLLM refuses it")
                p.comp_texts.append(cols["prompt"][i])
                p.comp_rows.append(i)
            elif kind == schema.KIND_TOKENS:
                if not cols["prompt_token_ids"][i]:
                    raise RenderError("empty prompt_token_ids; vLLM refuses it")
                p.ids[i] = np.asarray(cols["prompt_token_ids"][i], dtype=np.int32).tobytes()
            elif kind == schema.KIND_HASH_TRACE:
                p.trace_lengths[i] = int(cols["input_length"][i] or 0)
            else:
                raise RenderError(f"unknown request kind {kind!r}")
        except (RenderError, json.JSONDecodeError) as e:
            p.errors[i] = str(e)
            p.ids[i] = b""
    return p


def _encode_pending(p: _Pending, encoder: SegmentEncoder) -> _Pending:
    # Chat prompts already carry the template's special tokens; completions get the
    # tokenizer's own (vLLM: add_special_tokens False for chat, True for completions).
    for rows, texts, special in ((p.chat_rows, p.chat_texts, False),
                                 (p.comp_rows, p.comp_texts, True)):
        for i, row_ids in zip(rows, encoder.encode(texts, special)):
            p.ids[i] = row_ids
    # A reply's tokens as the model produced them (no special tokens added), plus the stop
    # token it ended with, which vLLM's usage.completion_tokens counts too.
    for i, row_ids in zip(p.out_rows, encoder.encode(p.out_texts, False)):
        p.out_counts[i] = len(row_ids) // ID_BYTES + 1
    return p


def _finish(p: _Pending) -> tuple[pa.Table, list[list[Any]]]:
    """The rows as a schema.TOKENS table: the ids spliced into one int32 buffer, no per-id Python."""
    lengths = np.array([len(b) // ID_BYTES if b is not None else 0 for b in p.ids], dtype=np.int64)
    offsets = np.zeros(len(p.ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.frombuffer(b"".join(b for b in p.ids if b is not None), dtype=np.int32)
    nulls = pa.array([b is None for b in p.ids], pa.bool_())
    token_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=pa.list_(pa.int32()),
                                         mask=nulls if nulls.true_count else None)
    for i, n in p.trace_lengths.items():
        lengths[i] = n
    table = pa.table(
        {
            "request_id": pa.array(p.request_id, pa.string()),
            "token_ids": token_ids,
            "n_tokens": pa.array(lengths, pa.int64()),
            "tokenize_error": pa.array(p.errors, pa.string()),
            "output_tokens_from_text": pa.array(p.out_counts, pa.int64()),
            "media_parts": pa.array(p.media, pa.int64()),
        },
        schema=schema.TOKENS,
    )
    failed = [[p.request_id[i], p.line[i], e] for i, e in enumerate(p.errors) if e]
    return table, failed


def segment_encoder(tokenizer: Any, cache_bytes: int = DEFAULT_CACHE_BYTES) -> SegmentEncoder:
    """The encoder the stage uses for this tokenizer: the segment path where its rule holds."""
    return SegmentEncoder(tokenizer.backend_tokenizer, check_tokenizer(tokenizer), SegmentCache(cache_bytes))


def tokenize_batch(
    batch: pa.RecordBatch | pa.Table, tokenizer: Any, spec: str | None,
    encoder: SegmentEncoder | None = None,
) -> tuple[pa.Table, list[list[Any]]]:
    """One batch of request rows -> (tokens rows, [[request_id, line, reason], ...] refusals).

    `encoder` (from `segment_encoder(tokenizer)`) carries the segment cache across batches."""
    pending = _prepare(batch, tokenizer, spec)
    if tokenizer is not None:
        _encode_pending(pending, encoder or segment_encoder(tokenizer))
    return _finish(pending)
