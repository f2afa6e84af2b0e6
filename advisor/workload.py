"""The workload, read once from the run folder: the one reader of requests + tokens.

Inputs: requests.parquet (arrival times, output lengths, logged latencies, model,
session, LoRA name, cache_salt, hash-trace ids) and tokens.parquet (token ids,
prompt lengths, reply lengths counted from text), same rows in the same order.
Output: a `Workload` holding columns as numpy arrays (token ids flattened into one
int32 array plus offsets, never a Python list per token). Analyze
(`advisor.analyze.prefixes.from_workload`), replay (`advisor.replay.plan.from_workload`) and
recommend's fixes build their views from its ids. The simulator reads it lean
(`load_workload(..., ids=False)`: the per-request columns, no ids) and takes its blocks from
advisor.sim.blockstreams, which streams the ids itself; so token ids are never all held there.
Also `warm_mask`, the requests a warm (steady-state) window counts, and `cache_namespaces`,
the cache salt each request is simulated and replayed with.

Two per-request facts change how vLLM serves a line, decided here once
(`skips_prefix_cache`, `fan_out`; docs/simulate.md, "Requests vLLM treats apart"): a
request that asks for prompt logprobs never reads the prefix cache, and a request for
`n` completions becomes n scheduler requests with the same prompt.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from advisor import schema
from advisor.errors import AdvisorError


@dataclass(frozen=True, eq=False)
class Workload:
    """Requests in log order. Unknown output lengths are 0, unknown times NaN.

    `cache_salt` is the salt the request is simulated with (`cache_namespaces`: its own,
    plus its model when the log names several); `models` the distinct model names.

    Ids (`token_values`, or a hash trace's `hash_values`) are there unless read lean
    (`has_ids` False): who needs them is the analysis (prefixes and clusters of ids), replay
    (it sends them to vLLM), recommend's fixes (they rewrite prompts), `with_token_lists`,
    and `configuration.block_trace`/`block_traces` when no block trace is passed in. The
    simulator's engines, fast and reference alike (lru, fifo, belady; the hybrid groups;
    replicas; the offload tier), work on block traces only, which the simulate stage reads
    from advisor.sim.blockstreams.
    """

    request_ids: pa.Array  # string
    n_tokens: np.ndarray  # int64 prompt tokens (0: refused at tokenization, never run)
    output_tokens: np.ndarray  # int64
    timestamps: np.ndarray  # float64 seconds
    latency_s: np.ndarray  # float64
    ttft_s: np.ndarray  # float64
    lora: list[str | None]
    cache_salt: list[str | None]
    token_values: np.ndarray | None  # int32, all requests' token ids back to back
    token_offsets: np.ndarray | None  # int64, request i is values[off[i]:off[i+1]]
    hash_values: np.ndarray | None  # int64, hash traces: all requests' ids (one per trace block) back to back
    hash_offsets: np.ndarray | None  # int64, request i is hash_values[off[i]:off[i+1]]
    trace_block_size: int | None
    models: tuple[str, ...] = ()  # distinct model names in the log (None shown as "")
    request_models: list[str | None] = field(default_factory=list)  # per request, when read from a run
    sessions: list[str | None] = field(default_factory=list)  # session ids, per request, when read
    # Per request: completions asked for (vLLM's `n`, >= 1) and whether vLLM skips its
    # prefix-cache lookup (`skips_prefix_cache`). None: 1 and False for every request.
    n: np.ndarray = None  # type: ignore[assignment]  # int64
    skip_prefix_cache: np.ndarray = None  # type: ignore[assignment]  # bool

    def __post_init__(self) -> None:
        count = len(self.n_tokens)
        n = np.ones(count, np.int64) if self.n is None else np.asarray(self.n, np.int64)
        skip = np.zeros(count, bool) if self.skip_prefix_cache is None else np.asarray(self.skip_prefix_cache, bool)
        assert n.shape == skip.shape == (count,) and (n >= 1).all()
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "skip_prefix_cache", skip)

    @property
    def num_requests(self) -> int:
        return len(self.n_tokens)

    @property
    def fans_out(self) -> bool:
        """Whether some request asks for n > 1 completions."""
        return bool((self.n > 1).any())

    @functools.cached_property
    def fan_out(self) -> np.ndarray:
        """The requests vLLM's scheduler sees, as the index of the logged request each one is.

        vLLM's front end turns a request for `n` completions into n child requests with the
        same prompt and sampling parameters (n = 1 each), added to the engine one after
        another (vllm/v1/engine/async_llm.py `add_request`, parallel_sampling.py
        `ParentRequest`): here they are adjacent in log order and arrive together. int64,
        `sum(n)` long; `arange(num_requests)` when nobody fans out.
        """
        return np.repeat(np.arange(self.num_requests, dtype=np.int64), self.n)

    @property
    def is_hash_trace(self) -> bool:
        return self.trace_block_size is not None

    @property
    def has_ids(self) -> bool:
        """Whether the token ids (a hash trace: its hash ids) were read (class docstring)."""
        return (self.hash_values if self.is_hash_trace else self.token_values) is not None

    @property
    def input_kind(self) -> str:
        """"hash_trace" (hash ids, no tokens) or "tokens": what every stage reports."""
        return schema.KIND_HASH_TRACE if self.is_hash_trace else "tokens"

    @functools.cached_property
    def namespaces(self) -> list[str | None]:
        """Per request, the key of the cache it can share blocks in (None: the common one).

        vLLM never shares a block across LoRA adapters or cache salts, and one engine serves
        one model (`cache_namespaces` folds the model into the salt when the log names
        several). Simulation and analysis partition requests by this one key.
        """
        return [None if lo is None and s is None else f"lora={lo or ''}|salt={s or ''}"
                for lo, s in zip(self.lora, self.cache_salt, strict=True)]

    def with_token_lists(self, token_lists: Sequence[Sequence[int]]) -> Workload:
        """The same requests (times, lengths of output, salts) with other prompts: what the
        log would be after a rewrite (advisor.analyze.rewrite)."""
        assert not self.is_hash_trace and len(token_lists) == self.num_requests
        offsets = np.zeros(len(token_lists) + 1, np.int64)
        np.cumsum([len(t) for t in token_lists], out=offsets[1:])
        values = (np.concatenate([np.asarray(t, np.int32) for t in token_lists]) if token_lists
                  else np.zeros(0, np.int32))
        return replace(self, n_tokens=np.diff(offsets), token_values=values, token_offsets=offsets)

    def with_own_salts(self) -> Workload:
        """Every request with a cache salt of its own: the same log with no reuse across
        requests (lengths and arrivals unchanged)."""
        return replace(self, cache_salt=[f"{s or ''}#pc-advise-unshared-{i}" for i, s in enumerate(self.cache_salt)])

    def hash_ids(self, i: int) -> np.ndarray:
        assert self.hash_values is not None and self.hash_offsets is not None, "read with load_workload(ids=True)"
        return self.hash_values[self.hash_offsets[i] : self.hash_offsets[i + 1]]

    def tokens(self, i: int) -> np.ndarray:
        assert self.token_values is not None and self.token_offsets is not None, "read with load_workload(ids=True)"
        return self.token_values[self.token_offsets[i] : self.token_offsets[i + 1]]

    def arrivals(self, speedup: float = 1.0) -> np.ndarray:
        """Arrival times in seconds from the first request, divided by `speedup`.

        Missing timestamps take the previous request's (the first ones the first
        known); a log with none arrives at one request per second.
        """
        t = self.timestamps.astype(np.float64, copy=True)
        if not np.isfinite(t).any():
            t = np.arange(len(t), dtype=np.float64)
        else:
            idx = np.where(np.isfinite(t), np.arange(len(t)), 0)
            np.maximum.accumulate(idx, out=idx)
            first = t[np.isfinite(t)][0]
            t = np.where(np.isfinite(t[idx]), t[idx], first)
        return (t - t.min()) / speedup

    @classmethod
    def from_token_lists(
        cls,
        token_lists: Sequence[Sequence[int]],
        request_ids: Sequence[str] | None = None,
        timestamps: Sequence[float] | None = None,
        output_tokens: Sequence[int] | None = None,
        lora: Sequence[str | None] | None = None,
        cache_salt: Sequence[str | None] | None = None,
        models: Sequence[str | None] | None = None,
        sessions: Sequence[str | None] | None = None,
        n: Sequence[int] | None = None,
        skip_prefix_cache: Sequence[bool] | None = None,
    ) -> Workload:
        """A workload from in-memory token lists (tests, replay); `models` and `sessions` per
        request, as a run folder's (the cache salt then carries the model as load_workload's);
        `n` and `skip_prefix_cache` per request as `load_workload` decides them."""
        n_children, n = n, len(token_lists)
        lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = (np.concatenate([np.asarray(t, dtype=np.int32) for t in token_lists])
                  if n and offsets[-1] else np.zeros(0, dtype=np.int32))
        nan = np.full(n, np.nan)
        ms = list(models) if models is not None else [None] * n
        return cls(
            request_ids=pa.array(list(request_ids) if request_ids is not None else [f"r{i}" for i in range(n)],
                                 type=pa.string()),
            n_tokens=lengths,
            output_tokens=np.asarray(output_tokens if output_tokens is not None else np.zeros(n), dtype=np.int64),
            timestamps=np.asarray(timestamps, dtype=np.float64) if timestamps is not None else nan,
            latency_s=nan, ttft_s=nan,
            lora=list(lora) if lora is not None else [None] * n,
            cache_salt=cache_namespaces(ms, list(cache_salt) if cache_salt is not None else [None] * n),
            token_values=values, token_offsets=offsets, hash_values=None, hash_offsets=None,
            trace_block_size=None,
            models=tuple(sorted({m or "" for m in ms})) if models is not None else (),
            request_models=ms, sessions=list(sessions) if sessions is not None else [None] * n,
            n=None if n_children is None else np.asarray(n_children, np.int64),
            skip_prefix_cache=None if skip_prefix_cache is None else np.asarray(skip_prefix_cache, bool),
        )

    @classmethod
    def from_hash_trace(
        cls,
        hash_ids: Sequence[Sequence[int]],
        input_lengths: Sequence[int],
        trace_block_size: int,
        timestamps: Sequence[float] | None = None,
        output_tokens: Sequence[int] | None = None,
    ) -> Workload:
        """A workload from in-memory block-hash trace rows (tests)."""
        n = len(hash_ids)
        nan = np.full(n, np.nan)
        return cls(
            request_ids=pa.array([f"r{i}" for i in range(n)], type=pa.string()),
            n_tokens=np.asarray(input_lengths, dtype=np.int64),
            output_tokens=np.asarray(output_tokens if output_tokens is not None else np.zeros(n), dtype=np.int64),
            timestamps=np.asarray(timestamps, dtype=np.float64) if timestamps is not None else nan,
            latency_s=nan, ttft_s=nan, lora=[None] * n, cache_salt=[None] * n,
            token_values=None, token_offsets=None,
            hash_values=np.concatenate([np.asarray(h, dtype=np.int64) for h in hash_ids]) if n else np.zeros(0, np.int64),
            hash_offsets=np.concatenate([[0], np.cumsum([len(h) for h in hash_ids])]).astype(np.int64),
            trace_block_size=int(trace_block_size),
        )


def cache_namespaces(models: Sequence[str | None], cache_salts: Sequence[str | None]) -> list[str | None]:
    """The cache salt each request is simulated and replayed with.

    Its own `cache_salt`; and when the log names more than one model, its model too: one
    vLLM engine serves one model, so requests for different models never share a cached
    block even when their prompts are the same tokens. A single-model log is unchanged.
    """
    if len({m or "" for m in models}) <= 1:
        return list(cache_salts)
    return [f"model={m or ''}" + ("" if s is None else f"|salt={s}") for m, s in zip(models, cache_salts, strict=True)]


def reply_lengths(requests: pa.Table, tokens: pa.Table) -> np.ndarray:
    """Each reply's length in tokens: the logged count, else the count of its logged text
    (tokens.parquet's `output_tokens_from_text`), else 0 (unknown: prefill only)."""
    n = requests.num_rows
    logged = (requests["output_tokens"].combine_chunks().cast(pa.int64()) if "output_tokens" in requests.column_names
              else pa.nulls(n, pa.int64()))
    if "output_tokens_from_text" in tokens.column_names:
        logged = pc.coalesce(logged, tokens["output_tokens_from_text"].combine_chunks())
    return np.maximum(logged.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64), 0)


def skips_prefix_cache(requests: pa.Table) -> np.ndarray:
    """Per request (bool), whether vLLM serves it without reading the prefix cache.

    vLLM 0.32 skips the lookup of a request whose sampling parameters ask for prompt
    logprobs (sampling_params.py: `skip_reading_prefix_cache` defaults to `prompt_logprobs
    is not None`; kv_cache_manager.py `get_computed_blocks` then returns no hit). Its
    OpenAI server also asks for them on `echo` (chat_completion/ and completion/protocol.py
    `to_sampling_params`): a chat request's `top_logprobs`, which is never null (0 by
    default), so every chat request with echo; a completion's `logprobs`, so a completion
    with echo and logprobs. 0.34 reads the same fields into its `prefix_cache_hit_limit`.
    """
    n = requests.num_rows

    def col(name: str, typ: pa.DataType) -> pa.Array:
        return requests[name].combine_chunks() if name in requests.column_names else pa.nulls(n, typ)

    chat = pc.equal(col("kind", pa.string()), schema.KIND_CHAT).fill_null(False)
    echoed = pc.and_(col("echo", pa.bool_()).fill_null(False), pc.or_(chat, pc.is_valid(col("logprobs", pa.int64()))))
    skip = pc.or_(pc.is_valid(col("prompt_logprobs", pa.int64())), echoed)
    return np.asarray(skip.to_numpy(zero_copy_only=False), dtype=bool)


def completions_asked(requests: pa.Table) -> np.ndarray:
    """Per request (int64 >= 1), vLLM's `n`: the completions asked for (null, absent: 1)."""
    if "n" not in requests.column_names:
        return np.ones(requests.num_rows, np.int64)
    counts = requests["n"].combine_chunks().cast(pa.int64()).fill_null(1).to_numpy(zero_copy_only=False)
    return np.maximum(counts.astype(np.int64), 1)


def _floats(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return table[name].to_numpy(zero_copy_only=False).astype(np.float64)


_REQUEST_COLUMNS = ("request_id", "timestamp", "kind", "model", "session_id", "output_tokens", "hash_ids",
                    "input_length", "trace_block_size", "lora", "cache_salt", "latency_s", "ttft_s",
                    "prompt_logprobs", "echo", "logprobs", "n")
_TOKEN_COLUMNS = ("request_id", "n_tokens", "output_tokens_from_text")


def load_workload(requests_path: Path, tokens_path: Path, *, ids: bool = True) -> Workload:
    """Read the two run-folder inputs into a `Workload` (rows must line up). Only the columns
    the stages use are read, never the request text; token ids one row group at a time.
    `ids=False`: the lean workload, every per-request column and no ids (`Workload.has_ids`);
    prompt lengths are tokens.parquet's `n_tokens`."""
    have = set(pq.read_schema(requests_path).names)
    tok_have = set(pq.read_schema(tokens_path).names)
    columns = [c for c in _REQUEST_COLUMNS if c in have and (ids or c != "hash_ids")]
    req = pq.read_table(requests_path, columns=columns)
    tok = pq.read_table(tokens_path, columns=[c for c in _TOKEN_COLUMNS if c in tok_have])
    _check_rows(req, tok)
    is_trace = _is_hash_trace(req)
    token_ids = None if is_trace or not ids else _read_token_ids(tokens_path, tok["n_tokens"].to_numpy().astype(np.int64))
    return _build(req, tok, token_ids, ids)


def from_tables(req: pa.Table, tok: pa.Table) -> Workload:
    """A `Workload` from requests and tokens tables held in memory (missing optional
    columns count as unknown)."""
    _check_rows(req, tok)
    if _is_hash_trace(req):
        return _build(req, tok, None)
    col = tok["token_ids"].combine_chunks()
    start = int(col.offsets[0].as_py())
    offs = col.offsets.to_numpy().astype(np.int64) - start
    if col.null_count:  # a null list (refused at tokenization) spans nothing: 0 tokens
        lengths = np.where(col.is_null().to_numpy(zero_copy_only=False), 0, np.diff(offs))
        offs = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offs[1:])
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return _build(req, tok, (values, offs))


def _check_rows(req: pa.Table, tok: pa.Table) -> None:
    if req.num_rows != tok.num_rows or not req["request_id"].equals(tok["request_id"]):
        raise AdvisorError(
            "tokens.parquet does not line up with requests.parquet (different rows): rerun "
            "`pc-advise tokenize RUN_DIR --force`."
        )


def _is_hash_trace(req: pa.Table) -> bool:
    kinds = set(req["kind"].unique().to_pylist()) if req.num_rows else set()
    if schema.KIND_HASH_TRACE in kinds and len(kinds) > 1:
        raise AdvisorError(
            "this log mixes block-hash trace lines with text/token requests, which cannot share one "
            "cache simulation: split the log and ingest each part into its own run folder."
        )
    return schema.KIND_HASH_TRACE in kinds


def _build(req: pa.Table, tok: pa.Table, token_ids: tuple[np.ndarray, np.ndarray] | None,
           ids: bool = True) -> Workload:
    """The Workload of aligned tables; `token_ids` (flat values, offsets) unless a hash trace
    or lean (`ids` False: no ids of either kind)."""
    have = set(req.column_names)
    n = req.num_rows

    def col(name: str) -> list[Any]:
        return req[name].to_pylist() if name in have else [None] * n

    models, salts = col("model"), col("cache_salt")
    common: dict[str, Any] = dict(
        request_ids=req["request_id"].combine_chunks(),
        n_tokens=tok["n_tokens"].to_numpy().astype(np.int64),
        output_tokens=reply_lengths(req, tok),
        timestamps=_floats(req, "timestamp"),
        latency_s=_floats(req, "latency_s"),
        ttft_s=_floats(req, "ttft_s"),
        lora=col("lora"),
        cache_salt=cache_namespaces(models, salts),
        models=tuple(sorted({m or "" for m in models})),
        request_models=models,
        sessions=col("session_id"),
        n=completions_asked(req),
        skip_prefix_cache=skips_prefix_cache(req),
    )
    no_ids: dict[str, Any] = dict(token_values=None, token_offsets=None, hash_values=None, hash_offsets=None)
    if _is_hash_trace(req):
        sizes = set(req["trace_block_size"].unique().to_pylist())
        if len(sizes) != 1 or None in sizes:
            raise AdvisorError(
                f"hash-trace lines with block sizes {sorted(map(str, sizes))}: re-ingest the trace with "
                "one --trace-block-size."
            )
        if not ids:
            return Workload(**common, **no_ids, trace_block_size=int(sizes.pop()))
        lists = req["hash_ids"].combine_chunks()
        values = lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        lens = lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        offs = np.zeros(n + 1, np.int64)
        np.cumsum(lens, out=offs[1:])
        return Workload(**common, token_values=None, token_offsets=None, hash_values=values, hash_offsets=offs,
                        trace_block_size=int(sizes.pop()))
    if token_ids is None:
        assert not ids
        return Workload(**common, **no_ids, trace_block_size=None)
    values, offs = token_ids
    common["n_tokens"] = np.diff(offs).astype(np.int64)  # 0 where refused at tokenization
    return Workload(**common, token_values=values, token_offsets=offs, hash_values=None, hash_offsets=None,
                    trace_block_size=None)


def _read_token_ids(tokens_path: Path, n_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """token_ids as one flat int32 array + offsets, read one row group at a time (the file is
    never held whole next to the array)."""
    bound = int(n_tokens.sum())  # a token row has n_tokens ids; a null row has none
    values = np.empty(bound, dtype=np.int32)
    offsets = np.zeros(len(n_tokens) + 1, dtype=np.int64)
    row = pos = 0
    src = pq.ParquetFile(tokens_path)
    # a row group at a time (tokenize writes them a batch of requests each): re-slicing them into
    # fixed-size record batches costs more than the decoding itself
    chunks = (c for g in range(src.metadata.num_row_groups)
              for c in src.read_row_group(g, columns=["token_ids"]).column(0).chunks)
    for arr in chunks:
        lens = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = arr.flatten().to_numpy(zero_copy_only=False)
        if pos + len(flat) > len(values):  # n_tokens disagrees with token_ids: grow
            values = np.concatenate([values[:pos], np.empty(len(flat) + pos, dtype=np.int32)])
        values[pos : pos + len(flat)] = flat
        np.cumsum(lens, out=offsets[row + 1 : row + 1 + len(lens)])
        offsets[row + 1 : row + 1 + len(lens)] += pos
        pos += len(flat)
        row += len(lens)
    return values[:pos], offsets



_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_SECONDS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*s\s*$")
_COUNT = re.compile(r"^\s*(\d+)\s*$")


def warm_mask(workload: Workload, warmup: str) -> np.ndarray:
    """Requests the warm window counts: after the warm-up (`"50%"`, `"N"` requests, `"Ns"` seconds).

    Warm-up requests are simulated (they fill the cache) but not counted.
    """
    n = workload.num_requests
    pos = np.arange(n)
    if m := _PERCENT.match(warmup):
        frac = float(m.group(1)) / 100
        if frac >= 1:
            raise AdvisorError(f"--warmup {warmup} leaves nothing to count: give a share below 100%.")
        return pos >= int(n * frac)
    if m := _COUNT.match(warmup):
        return pos >= int(m.group(1))
    if m := _SECONDS.match(warmup):
        t = workload.timestamps
        if not np.isfinite(t).any():
            raise AdvisorError(
                f"--warmup {warmup} needs timestamps and this log has none: give the warm-up in "
                "requests (e.g. --warmup 500) or as a share (--warmup 50%)."
            )
        start = np.nanmin(t) + float(m.group(1))
        return np.isfinite(t) & (t >= start)
    raise AdvisorError(
        f"--warmup {warmup!r} not understood: give a share (50%), a request count (500) or seconds (30s)."
    )
