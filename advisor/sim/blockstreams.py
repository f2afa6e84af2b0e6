"""Block streams: every request's full blocks as dense ids, per block size, hashed while
streaming tokens.parquet and kept in the run folder so a rerun does not hash again.

Inputs: tokens.parquet's token ids, read row group by row group (a hash trace: requests.parquet's
`hash_ids`), one salt per request (`request_salts`, from its cache namespace), the block sizes,
and where the hashing runs (`advisor.executor.ExecutorOptions`). Output: a `BlockTrace` per block
size over the logged requests (before `Workload.fan_out`), its ids memory-mapped from the run
folder, and `StreamCounts` (which sizes were hashed, which read back).

How: the token file is cut into shards of whole row groups (`plan_shards`, about `SHARD_TOKENS`
tokens each). `hash_shard` turns one shard into the 64-bit chained keys of its full blocks at
every block size (advisor.sim.fast.trace's `prefix_keys`, or `hash_trace_keys`); a key depends on
its own request's tokens and salt only, so shards need nothing from each other. The executor maps
the shards in order and the parent interns each shard's keys into dense ids (`Interner`: first
appearance, so the ids are exactly those of hashing the whole log at once) and appends them to
the stream file. Memory grows with the distinct blocks (the intern table) and the shards in
flight, never with the tokens.

Persisted under `blocks/` (`BLOCKS`): per block size, `b{bs}.npy` (int64 dense ids, all logged
requests' full blocks back to back; request r owns the next n_tokens[r] // bs of them) and
`b{bs}.json` (its key, `num_ids`, the counts). The key hashes what decides the ids: the
checksum of tokens.parquet (and of requests.parquet for a hash trace), the salts, the block
size, the stream format and the source of the hashing code. So a rerun with other budgets,
policies, replicas or offload sizes reads the streams back; a new block size hashes that size
only; an edited tokens.parquet, or other salts, hashes again. Each file is written under a
temporary name and renamed; the .json goes first (removed) and last (written), so a stream
without its .json is never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow.parquet as pq

from advisor import blockhash
from advisor.errors import AdvisorError
from advisor.executor import (
    ExecutorOptions,
    InlineExecutor,
    ThreadExecutor,
    open_executor,
)
from advisor.runfolder import atomic_path, file_checksum, write_json
from advisor.sim.fast import trace as fasttrace
from advisor.sim.fast.trace import BlockTrace, Interner
from advisor.workload import Workload

BLOCKS = "blocks"  # the run folder's stream folder
FORMAT = 1  # bump when the files' layout changes
SHARD_TOKENS = 1 << 23  # tokens per shard (32 MiB of int32 ids, ~0.4 GiB at the peak of hashing it)
# Below this many tokens the default executor hashes here: starting worker processes costs
# more than the hashing they would share (a few seconds for ~1e8 tokens on one core).
PARALLEL_TOKENS = 1 << 27
_NPY_HEADER = 128  # bytes: numpy pads a 1-d int64 header to this whatever the length


def request_salts(workload: Workload) -> np.ndarray | None:
    """A 64-bit salt per request from its cache namespace (None: all in the common one)."""
    if all(ns is None for ns in workload.namespaces):
        return None
    memo: dict[str | None, int] = {None: 0}
    out = np.zeros(workload.num_requests, np.uint64)
    for i, ns in enumerate(workload.namespaces):
        if ns not in memo:
            memo[ns] = int.from_bytes(hashlib.blake2b(ns.encode(), digest_size=8).digest(), "little") | 1
        out[i] = memo[ns]
    return out


@dataclass(frozen=True)
class StreamInputs:
    """What decides one workload's block streams (`of` builds it from a lean `Workload`)."""

    tokens_path: Path
    requests_path: Path
    n_tokens: np.ndarray  # int64 per request: tokens.parquet's n_tokens (a hash trace: input_length)
    salts: np.ndarray | None  # uint64 per request, None: no namespaces (`request_salts`)
    trace_block_size: int | None = None  # a hash trace: its ids are chained at this size only

    @classmethod
    def of(cls, workload: Workload, requests_path: Path, tokens_path: Path) -> StreamInputs:
        if workload.is_hash_trace:  # traces chain their ids unsalted (fasttrace.trace_from_hash_ids)
            return cls(Path(tokens_path), Path(requests_path), workload.n_tokens, None, workload.trace_block_size)
        return cls(Path(tokens_path), Path(requests_path), workload.n_tokens, request_salts(workload))

    @property
    def source(self) -> tuple[Path, str]:
        """The file and list column the ids are hashed from."""
        return (self.requests_path, "hash_ids") if self.trace_block_size else (self.tokens_path, "token_ids")


@dataclass(frozen=True)
class Shard:
    """One piece of hashing work: whole row groups of one file (picklable; `hash_shard`)."""

    path: str
    column: str  # "token_ids" or "hash_ids"
    row_groups: tuple[int, ...]
    n_tokens: np.ndarray  # int64, the shard's requests' prompt lengths
    block_sizes: tuple[int, ...]
    salts: np.ndarray | None = None  # uint64, the shard's requests'
    trace_block_size: int | None = None


def hash_shard(shard: Shard) -> dict[int, np.ndarray]:
    """The chained 64-bit keys of a shard's full blocks, per block size (requests in order)."""
    col = pq.ParquetFile(shard.path).read_row_groups(list(shard.row_groups), columns=[shard.column])[0]
    lists = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    lengths = lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    assert len(lengths) == len(shard.n_tokens), "a shard's rows and its prompt lengths disagree"
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = lists.flatten().to_numpy(zero_copy_only=False)  # a null row (refused, no trace ids) holds none
    if shard.trace_block_size is not None:
        keys = fasttrace.hash_trace_keys(values, offsets, shard.n_tokens, shard.trace_block_size)
        return {shard.trace_block_size: keys}
    if not np.array_equal(lengths, shard.n_tokens):
        raise AdvisorError("tokens.parquet's n_tokens do not match its token_ids: rerun "
                           "`pc-advise tokenize RUN_DIR --force`.")
    return fasttrace.prefix_keys(values.astype(np.int32, copy=False), offsets, shard.block_sizes, shard.salts)


def plan_shards(inputs: StreamInputs, block_sizes: Sequence[int], shard_tokens: int = SHARD_TOKENS) -> list[Shard]:
    """Consecutive runs of whole row groups of about `shard_tokens` tokens each."""
    path, column = inputs.source
    meta = pq.ParquetFile(path).metadata
    rows = np.array([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], np.int64)
    ends = np.cumsum(rows)
    assert (ends[-1] if len(ends) else 0) == len(inputs.n_tokens), "the source file and the workload disagree"
    starts = ends - rows
    before = np.concatenate([[0], np.cumsum(inputs.n_tokens)])  # tokens before each row
    tokens = before[ends] - before[starts]
    shards: list[Shard] = []
    group: list[int] = []
    held = 0
    for g in range(len(rows)):
        group.append(g)
        held += int(tokens[g])
        if held >= shard_tokens or g == len(rows) - 1:
            lo, hi = int(starts[group[0]]), int(ends[group[-1]])
            shards.append(Shard(str(path), column, tuple(group), inputs.n_tokens[lo:hi], tuple(block_sizes),
                                None if inputs.salts is None else inputs.salts[lo:hi], inputs.trace_block_size))
            group, held = [], 0
    return shards


@dataclass(frozen=True)
class StreamCounts:
    """What `open_streams` did: block sizes hashed and read back, shards hashed."""

    hashed: tuple[int, ...] = ()
    reused: tuple[int, ...] = ()
    shards: int = 0
    distinct_blocks: Mapping[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"hashed": list(self.hashed), "reused": list(self.reused), "shards": self.shards,
                "distinct_blocks": {str(k): v for k, v in self.distinct_blocks.items()}}


def stream_key(inputs: StreamInputs, block_size: int, checksums: Mapping[str, str]) -> str:
    """What decides a block size's stream, hashed (module docstring)."""
    code = hashlib.sha256()
    for module in (fasttrace, blockhash):
        code.update(Path(module.__file__).read_bytes())
    code.update(Path(__file__).read_bytes())
    salts = hashlib.sha256(b"" if inputs.salts is None else inputs.salts.tobytes()).hexdigest()
    blob = json.dumps({"format": FORMAT, "code": code.hexdigest(), "inputs": dict(checksums), "salts": salts,
                       "block_size": block_size, "trace_block_size": inputs.trace_block_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def open_streams(
    inputs: StreamInputs,
    block_sizes: Sequence[int],
    blocks_dir: Path | None = None,
    executor: ExecutorOptions | None = None,
    shard_tokens: int = SHARD_TOKENS,
) -> tuple[dict[int, BlockTrace], StreamCounts]:
    """A `BlockTrace` per block size over the logged requests, read back from `blocks_dir` when
    its stream is there and current, else hashed (all missing sizes in one pass over the
    tokens) and stored there. `blocks_dir` None: hashed and held in memory, nothing stored.
    `executor`: where the shards are hashed (None: this machine's cores from `PARALLEL_TOKENS`
    tokens on, else here; one shard: always here)."""
    sizes = tuple(dict.fromkeys(int(b) for b in block_sizes))
    keys: dict[int, str] = {}
    traces: dict[int, BlockTrace] = {}
    if blocks_dir is not None:
        keys = _keys(inputs, sizes)
        traces = _stored(blocks_dir, keys, inputs.n_tokens)
    todo = tuple(bs for bs in sizes if bs not in traces)
    reused = tuple(bs for bs in sizes if bs in traces)
    shards = plan_shards(inputs, todo, shard_tokens) if todo else []
    if todo:
        traces.update(_hash(inputs, todo, shards, blocks_dir, keys, executor))
    counts = StreamCounts(todo, reused, len(shards), {bs: traces[bs].num_ids for bs in sizes})
    return {bs: traces[bs] for bs in sizes}, counts


def stored_streams(inputs: StreamInputs, block_sizes: Sequence[int], blocks_dir: Path) -> dict[int, BlockTrace]:
    """The block sizes whose stream `blocks_dir` holds and is current, read back memory-mapped;
    nothing is hashed or written (a size that is missing or stale is left out)."""
    sizes = tuple(dict.fromkeys(int(b) for b in block_sizes))
    return _stored(blocks_dir, _keys(inputs, sizes), inputs.n_tokens) if Path(blocks_dir).is_dir() else {}


def _keys(inputs: StreamInputs, sizes: tuple[int, ...]) -> dict[int, str]:
    sums = {p.name: file_checksum(p) for p in _key_files(inputs)}
    return {bs: stream_key(inputs, bs, sums) for bs in sizes}


def _stored(blocks_dir: Path, keys: Mapping[int, str], n_tokens: np.ndarray) -> dict[int, BlockTrace]:
    found = {bs: _read_stream(blocks_dir, bs, key, n_tokens) for bs, key in keys.items()}
    return {bs: t for bs, t in found.items() if t is not None}


def _key_files(inputs: StreamInputs) -> list[Path]:
    return [inputs.tokens_path, inputs.requests_path] if inputs.trace_block_size else [inputs.tokens_path]


def _hash(inputs: StreamInputs, sizes: tuple[int, ...], shards: list[Shard], blocks_dir: Path | None,
          keys: Mapping[int, str], executor: ExecutorOptions | None) -> dict[int, BlockTrace]:
    interners = {bs: Interner() for bs in sizes}
    with contextlib.ExitStack() as stack:
        sinks = {bs: stack.enter_context(_sink(blocks_dir, bs)) for bs in sizes}
        parallel = len(shards) > 1 and (executor is not None or int(inputs.n_tokens.sum()) >= PARALLEL_TOKENS)
        # below PARALLEL_TOKENS, worker processes cost more to start than they save; threads do
        # not (the reads and the compiled hashing release the GIL)
        threads = min(len(shards), os.cpu_count() or 1)
        runner = stack.enter_context(open_executor(executor or ExecutorOptions()) if parallel
                                     else ThreadExecutor(threads) if threads > 1 else InlineExecutor())
        for shard_keys in runner.map(hash_shard, shards):
            for bs in sizes:
                sinks[bs].append(interners[bs].add(shard_keys[bs]))
    out = {}
    for bs in sizes:
        ids = sinks[bs].result()
        if blocks_dir is not None:
            write_json(_meta_path(blocks_dir, bs), {"format": FORMAT, "key": keys[bs], "block_size": bs,
                                                    "num_ids": interners[bs].num_ids, "num_blocks": len(ids),
                                                    "requests": len(inputs.n_tokens)})
        out[bs] = fasttrace.trace_from_ids(ids, inputs.n_tokens, bs, interners[bs].num_ids)
    return out


def _meta_path(blocks_dir: Path, bs: int) -> Path:
    return Path(blocks_dir) / f"b{bs}.json"


def _ids_path(blocks_dir: Path, bs: int) -> Path:
    return Path(blocks_dir) / f"b{bs}.npy"


def _read_stream(blocks_dir: Path, bs: int, key: str, n_tokens: np.ndarray) -> BlockTrace | None:
    """The stored stream of `bs` when its key is `key` and its length is right; else None."""
    meta_path, ids_path = _meta_path(blocks_dir, bs), _ids_path(blocks_dir, bs)
    if not (meta_path.exists() and ids_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        ids = np.load(ids_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or ids.dtype != np.int64 or ids.shape != (int((n_tokens // bs).sum()),):
        return None
    return fasttrace.trace_from_ids(np.asarray(ids), n_tokens, bs, int(meta["num_ids"]))


class _Sink:
    """Where one block size's ids go as they are interned: a list (nothing stored), or a .npy
    file written front to back whose header is filled in at the end."""

    def __init__(self, f: BinaryIO | None, path: Path | None) -> None:
        self.f, self.path = f, path
        self.parts: list[np.ndarray] = []
        self.count = 0
        if f is not None:
            _write_header(f, 0)

    def append(self, ids: np.ndarray) -> None:
        self.count += len(ids)
        if self.f is None:
            self.parts.append(ids)
        else:
            self.f.write(np.ascontiguousarray(ids, "<i8").tobytes())

    def close(self) -> None:
        if self.f is not None:
            self.f.seek(0)
            _write_header(self.f, self.count)
            self.f.close()

    def result(self) -> np.ndarray:
        if self.path is None:
            return np.concatenate(self.parts) if self.parts else np.zeros(0, np.int64)
        return np.asarray(np.load(self.path, mmap_mode="r"))


@contextlib.contextmanager
def _sink(blocks_dir: Path | None, bs: int) -> Iterator[_Sink]:
    if blocks_dir is None:
        yield _Sink(None, None)
        return
    _meta_path(blocks_dir, bs).unlink(missing_ok=True)  # the old stream is untrusted from here
    final = _ids_path(blocks_dir, bs)
    with atomic_path(final) as tmp:
        sink = _Sink(open(tmp, "wb"), final)
        try:
            yield sink
        finally:
            sink.close()


def _write_header(f: BinaryIO, count: int) -> None:
    start = f.tell()
    np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (count,)})
    assert f.tell() - start == _NPY_HEADER, "numpy's .npy header size changed"
