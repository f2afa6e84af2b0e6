"""Requests with images (or audio, video) are kept: their text is tokenized, their media parts
are counted and said to be uncounted, in ingest's notes, tokens.parquet and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from advisor.ingest import stage as ing
from advisor.report import facts
from advisor.tokens import stage as tk

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
LINES = [
    {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "What is in it?"}, IMAGE, IMAGE]}]},
    {"model": "m", "max_tokens": 9, "system": "Describe images.", "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
        {"type": "text", "text": "and this?"}]}]},
    {"model": "m", "messages": [{"role": "user", "content": "text only"}]},
]


class _Encoding:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


class _Backend:
    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[_Encoding]:
        return [_Encoding([ord(c) for c in t]) for t in texts]


class _Tokenizer:
    """One token per character, a template that writes role and content."""

    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    backend_tokenizer = _Backend()

    def get_chat_template(self, name: Any, tools: Any = None) -> str:
        return self.chat_template

    def apply_chat_template(self, conversation: list[dict], tools: Any = None, tokenize: bool = False, **kw: Any) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in conversation)


def test_media_requests_are_kept_counted_and_said(tmp_path: Path) -> None:
    src = tmp_path / "log.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    out = tmp_path / "out"
    res = ing.ingest_source(str(src), out / "requests.parquet", out / "rejects.jsonl", ing.IngestOptions())
    assert (res.accepted, res.rejected, res.media_requests, res.media_parts) == (3, 0, 2, 3)
    note = next(n for n in res.notes if "image, audio or video" in n)
    assert note.startswith("2 requests carry 3 image, audio or video parts")
    assert any("2 requests carry 3" in line for line in facts.input_formats(res.as_counts()))

    table = pq.read_table(out / "requests.parquet")
    tokens, refused = tk.tokenize_batch(table, _Tokenizer(), "test")
    rows = tokens.to_pylist()
    assert refused == [] and [r["media_parts"] for r in rows] == [2, 1, None]
    assert rows[0]["token_ids"] == [ord(c) for c in "<user>What is in it?"]  # the text, no image
    assert rows[1]["token_ids"] == [ord(c) for c in "<system>Describe images.<user>and this?"]
