"""Block traces: a workload's full blocks at one block size as dense integer ids.

Inputs: token ids (flat int32 array + offsets, with a per-request salt for LoRA name and
cache_salt) or a block-hash trace's ids. Output: a `BlockTrace`, the input of every
compiled simulator in this package (`sequential`, `policies`, `events`).

A block's key hashes the whole prefix it ends: the sum of a 64-bit mix of each
(position, token) up to the block's end, mixed again with the length and the request's
salt, so equal ids mean equal chained prefixes, as vLLM's chained block hashes. One pass
over the tokens serves every block size (a compiled loop, or numpy without numba). Two
different prefixes get the same key with probability about 2^-64 per pair, so about
n^2 / 2^65 for n distinct blocks (3e-6 for 10M blocks); a collision could only add a
spurious hit. Keys are interned into dense ids (`Interner`: numbered in order of first
appearance, so a workload fed in consecutive pieces gets the ids it gets fed at once).
A request's keys depend on its own tokens and salt only: hashing can run over shards of
whole requests (advisor.sim.blockstreams).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from advisor.blockhash import mix64
from advisor.compiled import HAVE_NUMBA, compiled

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TOKEN_CHUNK = 1 << 23  # tokens hashed per numpy pass (bounds temporary memory)



@dataclass(frozen=True)
class BlockTrace:
    """A workload at one block size: each request's full blocks as dense ids."""

    block_size: int
    ids: np.ndarray  # int64, the full blocks of all requests, concatenated
    offsets: np.ndarray  # int64, len(requests) + 1: request r owns ids[offsets[r]:offsets[r+1]]
    num_tokens: np.ndarray  # int64, prompt tokens per request
    num_ids: int  # distinct block ids (ids < num_ids)

    @property
    def num_requests(self) -> int:
        return len(self.num_tokens)

    def working_set_blocks(self) -> int:
        """Distinct full blocks of the whole workload."""
        return self.num_ids


def _dense(keys: np.ndarray, num_tokens: np.ndarray, block_size: int) -> BlockTrace:
    full = num_tokens // block_size
    offsets = np.zeros(len(num_tokens) + 1, np.int64)
    np.cumsum(full, out=offsets[1:])
    interner = Interner()
    ids = interner.add(keys)
    return BlockTrace(block_size, ids, offsets, num_tokens.astype(np.int64), interner.num_ids)


class Interner:
    """Dense ids of 64-bit block keys, numbered in order of first appearance, fed in pieces.

    `add(keys)` returns the ids of one piece; a key seen in an earlier piece keeps its id, so
    feeding a workload's keys in consecutive pieces gives exactly the ids of feeding them at
    once (what lets block hashing run over shards: advisor.sim.blockstreams). The table grows
    with the distinct keys, never with the keys fed: an open-addressing table at most half
    full (compiled), or sorted arrays where numba is missing (`compiled=False`).
    """

    def __init__(self, compiled: bool = HAVE_NUMBA) -> None:
        self.compiled = compiled
        self.num_ids = 0
        self._keys = np.zeros(1024 if compiled else 0, np.uint64)  # table slots, or the sorted keys
        self._ids = np.full(len(self._keys), -1, np.int64)  # each slot's id (-1: empty), or each key's

    def add(self, keys: np.ndarray) -> np.ndarray:
        keys = np.ascontiguousarray(keys, np.uint64).reshape(-1)
        if not self.compiled:
            return self._add_sorted(keys)
        ids = np.empty(len(keys), np.int64)
        done = 0
        while True:
            done, self.num_ids = _intern(keys, done, ids, self._keys, self._ids, self.num_ids, len(self._keys) // 2)
            if done == len(keys):
                return ids
            table_key, table_id = np.zeros(2 * len(self._keys), np.uint64), np.full(2 * len(self._keys), -1, np.int64)
            _rehash(self._keys, self._ids, table_key, table_id)
            self._keys, self._ids = table_key, table_id

    def _add_sorted(self, keys: np.ndarray) -> np.ndarray:
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        pos = np.searchsorted(self._keys, uniq)
        uniq_ids = np.full(len(uniq), -1, np.int64)
        if len(self._keys):
            at = np.minimum(pos, len(self._keys) - 1)
            seen = self._keys[at] == uniq
            uniq_ids[seen] = self._ids[at[seen]]
        new = np.flatnonzero(uniq_ids < 0)
        uniq_ids[new[np.argsort(first[new], kind="stable")]] = self.num_ids + np.arange(len(new), dtype=np.int64)
        self.num_ids += len(new)
        self._keys = np.insert(self._keys, pos[new], uniq[new])  # uniq is sorted: its search positions hold
        self._ids = np.insert(self._ids, pos[new], uniq_ids[new])
        return uniq_ids[inverse.reshape(-1)]


@compiled
def _slot(k, mask):  # type: ignore[no-untyped-def]
    return (k ^ (k >> np.uint64(29))) & mask


@compiled
def _intern(keys, start, ids, table_key, table_id, n, limit):  # type: ignore[no-untyped-def]
    """Write the ids of keys[start:] into `ids`, numbering unseen keys from `n`, until the
    table would hold more than `limit`; return (keys done, ids numbered)."""
    mask = np.uint64(len(table_key) - 1)
    for i in range(start, len(keys)):
        k = keys[i]
        slot = _slot(k, mask)
        while table_id[slot] >= 0 and table_key[slot] != k:
            slot = (slot + np.uint64(1)) & mask
        if table_id[slot] < 0:
            if n >= limit:
                return i, n
            table_key[slot] = k
            table_id[slot] = n
            n += 1
        ids[i] = table_id[slot]
    return len(keys), n


@compiled
def _rehash(old_key, old_id, table_key, table_id):  # type: ignore[no-untyped-def]
    mask = np.uint64(len(table_key) - 1)
    for j in range(len(old_key)):
        if old_id[j] >= 0:
            slot = _slot(old_key[j], mask)
            while table_id[slot] >= 0:
                slot = (slot + np.uint64(1)) & mask
            table_key[slot] = old_key[j]
            table_id[slot] = old_id[j]


def _chain(block_values: np.ndarray, full: np.ndarray, salts: np.ndarray) -> np.ndarray:
    """Chained 64-bit keys of blocks given each block's content value (vectorized)."""
    n = len(block_values)
    starts = np.zeros(len(full), np.int64)
    np.cumsum(full[:-1], out=starts[1:])
    req = np.repeat(np.arange(len(full)), full)
    index = np.arange(n, dtype=np.int64) - starts[req]
    d = mix64(block_values ^ mix64(index.astype(np.uint64) * _GOLDEN + salts[req]))
    prefix = np.cumsum(d, dtype=np.uint64)
    before = np.zeros(len(full), np.uint64)
    nonempty = full > 0
    before[nonempty] = prefix[starts[nonempty]] - d[starts[nonempty]]
    return mix64(prefix - before[req] + index.astype(np.uint64))


def _token_values(tokens: np.ndarray, local: np.ndarray) -> np.ndarray:
    """A 64-bit value per (position in its request, token id)."""
    return mix64(tokens.astype(np.uint64) * _GOLDEN + local.astype(np.uint64) * _M1 + np.uint64(1))


def _salt_values(salts: np.ndarray) -> np.ndarray:
    return mix64(salts.astype(np.uint64) + _M2)


def _prefix_keys_numpy(tokens: np.ndarray, offsets: np.ndarray, block_sizes: Sequence[int], salts: np.ndarray) -> dict[int, np.ndarray]:
    num_tokens = np.diff(offsets)
    out: dict[int, list[np.ndarray]] = {bs: [] for bs in block_sizes}
    r = 0
    while r < len(num_tokens):  # chunks of whole requests bound the temporaries
        r_end = int(np.searchsorted(offsets, offsets[r] + _TOKEN_CHUNK, side="right"))
        r_end = min(max(r_end - 1, r + 1), len(num_tokens))
        t0, t1 = int(offsets[r]), int(offsets[r_end])
        lens = num_tokens[r:r_end]
        local = np.arange(t1 - t0, dtype=np.int64) - np.repeat(offsets[r:r_end] - t0, lens)
        csum = np.zeros(t1 - t0 + 1, np.uint64)
        np.cumsum(_token_values(np.asarray(tokens[t0:t1]), local), out=csum[1:])
        salt = _salt_values(salts[r:r_end])
        for bs in block_sizes:
            full = lens // bs
            req = np.repeat(np.arange(r_end - r), full)
            first = np.zeros(r_end - r, np.int64)
            np.cumsum(full[:-1], out=first[1:])
            end = (np.arange(int(full.sum()), dtype=np.int64) - first[req] + 1) * bs
            start = offsets[r:r_end][req] - t0
            out[bs].append(mix64(csum[start + end] - csum[start] + salt[req] + end.astype(np.uint64)))
        r = r_end
    return {bs: np.concatenate(v) if v else np.zeros(0, np.uint64) for bs, v in out.items()}


@compiled
def _prefix_keys_loop(tokens, offsets, block_sizes, salt, out_offsets, out):  # type: ignore[no-untyped-def]
    g = np.uint64(0x9E3779B97F4A7C15)
    m1 = np.uint64(0xBF58476D1CE4E5B9)
    m2 = np.uint64(0x94D049BB133111EB)
    for r in range(len(offsets) - 1):
        base = offsets[r]
        length = offsets[r + 1] - base
        acc = np.uint64(0)
        for i in range(length):
            x = np.uint64(tokens[base + i]) * g + np.uint64(i) * m1 + np.uint64(1)
            x = (x ^ (x >> np.uint64(30))) * m1
            x = (x ^ (x >> np.uint64(27))) * m2
            acc += x ^ (x >> np.uint64(31))
            n = i + 1
            for k in range(len(block_sizes)):
                bs = block_sizes[k]
                if n % bs == 0:
                    y = acc + salt[r] + np.uint64(n)
                    y = (y ^ (y >> np.uint64(30))) * m1
                    y = (y ^ (y >> np.uint64(27))) * m2
                    out[k, out_offsets[k, r] + n // bs - 1] = y ^ (y >> np.uint64(31))


def prefix_keys(
    tokens: np.ndarray, offsets: np.ndarray, block_sizes: Sequence[int], salts: np.ndarray | None = None
) -> dict[int, np.ndarray]:
    """64-bit chained keys of every full block, for several block sizes in one pass.

    `tokens`: flat token ids; request r is tokens[offsets[r]:offsets[r+1]]. The key of
    a block is a hash of the whole prefix it ends, so equal keys mean equal prefixes
    (the chain of vLLM's block hashes). `salts`: optional uint64 per request (e.g. a
    hash of LoRA name and cache_salt; 0 = none): different salts never share a block,
    like vLLM's extra keys. Returns {block_size: keys of all requests' full blocks,
    requests concatenated in order}.
    """
    offsets = np.asarray(offsets, np.int64)
    num_tokens = np.diff(offsets)
    salts = np.zeros(len(num_tokens), np.uint64) if salts is None else np.asarray(salts, np.uint64)
    if not HAVE_NUMBA:
        return _prefix_keys_numpy(tokens, offsets, block_sizes, salts)
    sizes = np.asarray(block_sizes, np.int64)
    out_offsets = np.zeros((len(sizes), len(num_tokens) + 1), np.int64)
    for k, bs in enumerate(sizes):
        np.cumsum(num_tokens // bs, out=out_offsets[k, 1:])
    out = np.zeros((len(sizes), int(out_offsets[:, -1].max(initial=0))), np.uint64)
    _prefix_keys_loop(np.asarray(tokens), offsets, sizes, _salt_values(salts), out_offsets, out)
    return {int(bs): out[k, : out_offsets[k, -1]].copy() for k, bs in enumerate(sizes)}


def trace_from_tokens(tokens: np.ndarray, offsets: np.ndarray, block_size: int, salts: np.ndarray | None = None) -> BlockTrace:
    """A `BlockTrace` of token-id requests (see `prefix_keys` for the arguments)."""
    return traces_from_tokens(tokens, offsets, (block_size,), salts)[block_size]


def traces_from_tokens(
    tokens: np.ndarray, offsets: np.ndarray, block_sizes: Sequence[int], salts: np.ndarray | None = None
) -> dict[int, BlockTrace]:
    """`BlockTrace`s of token-id requests for several block sizes, hashing tokens once."""
    offsets = np.asarray(offsets, np.int64)
    keys = prefix_keys(tokens, offsets, block_sizes, salts)
    return {bs: _dense(k, np.diff(offsets), bs) for bs, k in keys.items()}


def trace_from_ids(ids: np.ndarray, num_tokens: np.ndarray, block_size: int, num_ids: int) -> BlockTrace:
    """A `BlockTrace` of dense ids made elsewhere (a stored block stream, advisor.sim.blockstreams):
    request r owns the next num_tokens[r] // block_size of them."""
    num_tokens = np.asarray(num_tokens, np.int64)
    offsets = np.zeros(len(num_tokens) + 1, np.int64)
    np.cumsum(num_tokens // block_size, out=offsets[1:])
    assert len(ids) == offsets[-1], "block stream and prompt lengths disagree"
    return BlockTrace(block_size, ids, offsets, num_tokens, int(num_ids))


def trace_from_hash_ids(hash_ids: np.ndarray, offsets: np.ndarray, num_tokens: np.ndarray, trace_block_size: int) -> BlockTrace:
    """A `BlockTrace` of a block-hash trace (Mooncake style), chained like tokens
    (`hash_trace_keys` for the arguments)."""
    keys = hash_trace_keys(hash_ids, offsets, num_tokens, trace_block_size)
    return _dense(keys, np.asarray(num_tokens, np.int64), trace_block_size)


def hash_trace_keys(hash_ids: np.ndarray, offsets: np.ndarray, num_tokens: np.ndarray, trace_block_size: int) -> np.ndarray:
    """64-bit chained keys of a block-hash trace's full blocks, requests concatenated in order.

    Request r's ids are hash_ids[offsets[r]:offsets[r+1]], one per trace block; the
    last covers a partial block when num_tokens[r] % trace_block_size and is dropped
    (vLLM never caches a partial block). A request's keys depend on its own ids only.
    """
    offsets = np.asarray(offsets, np.int64)
    num_tokens = np.asarray(num_tokens, np.int64)
    full = num_tokens // trace_block_size
    have = np.diff(offsets)
    if np.any(have < full):
        raise ValueError("a hash-trace request has fewer hash ids than input_length // trace_block_size")
    req = np.repeat(np.arange(len(full)), full)
    first = np.zeros(len(full), np.int64)
    np.cumsum(full[:-1], out=first[1:])
    j = np.arange(int(full.sum()), dtype=np.int64) - first[req]
    values = mix64(np.asarray(hash_ids, np.int64)[offsets[:-1][req] + j].astype(np.uint64) + _GOLDEN)
    return _chain(values, full, np.zeros(len(full), np.uint64))


def repeat_requests(trace: BlockTrace, counts: np.ndarray) -> BlockTrace:
    """`trace` with request r repeated `counts[r]` times in its place (the copies adjacent;
    ids, and so hit patterns, unchanged): the requests vLLM's scheduler sees when a logged
    request asks for n completions (`Workload.fan_out`)."""
    counts = np.asarray(counts, np.int64)
    assert counts.shape == (trace.num_requests,) and (counts >= 1).all()
    if (counts == 1).all():
        return trace
    full = np.diff(trace.offsets)
    child_full = np.repeat(full, counts)
    offsets = np.zeros(len(child_full) + 1, np.int64)
    np.cumsum(child_full, out=offsets[1:])
    # Each child's j-th block is its parent's j-th block.
    src_start = np.repeat(np.repeat(trace.offsets[:-1], counts) - offsets[:-1], child_full)
    ids = trace.ids[src_start + np.arange(int(offsets[-1]), dtype=np.int64)]
    return BlockTrace(trace.block_size, ids, offsets, np.repeat(trace.num_tokens, counts), trace.num_ids)
