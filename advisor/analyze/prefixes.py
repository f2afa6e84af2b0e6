"""The analysis view of a workload and the streaming prefix pass.

Input: a `workload.Workload`. `from_workload` takes its view: per request a run of units,
token ids for token logs or hash ids for hash traces. `prefix_pass` finds, for each request,
the longest prefix it shares with ANY earlier request (exact at full blocks; the partial block
is compared against a few candidates, see advisor/analyze/stage.py's docstring). Breakers,
clusters and the stage build on its `PrefixPass`.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from advisor import workload
from advisor.analyze.hashing import all_chained_hashes, common_prefix_len

Decode = Callable[[Sequence[int]], str]

_MASK = (1 << 64) - 1
_MAX_CANDIDATES = 4  # earlier requests compared token by token per (parent block, first token)


# --- the workload as read from the run folder ---
@dataclass
class AnalysisView:
    """Requests in arrival order. `values[offsets[i]:offsets[i+1]]` are request i's units:
    token ids (int32) for token logs, hash ids (int64) for hash traces (`unit_tokens` tokens
    each, the last one possibly partial)."""

    request_ids: list[str]
    n_tokens: np.ndarray  # int64, prompt tokens per request
    values: np.ndarray
    offsets: np.ndarray  # int64, len N+1
    models: list[str | None]
    sessions: list[str | None]
    namespaces: list[str | None]  # workload.Workload.namespaces: requests in different ones never share
    hash_trace: bool = False
    unit_tokens: int = 1  # tokens per unit: 1, or the trace block size

    def __len__(self) -> int:
        return len(self.request_ids)

    def units(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]


def workload_from_lists(
    token_lists: Sequence[Sequence[int]],
    request_ids: Sequence[str] | None = None,
    models: Sequence[str | None] | None = None,
    sessions: Sequence[str | None] | None = None,
) -> AnalysisView:
    """A token AnalysisView from Python lists (tests, small inputs)."""
    return from_workload(workload.Workload.from_token_lists(
        token_lists, request_ids=request_ids, models=models, sessions=sessions))


def from_workload(w: workload.Workload) -> AnalysisView:
    """Units are token ids, or a hash trace's hash ids (`unit_tokens` tokens each)."""
    n = w.num_requests
    if w.is_hash_trace:
        assert w.hash_values is not None and w.hash_offsets is not None
        values, offsets = w.hash_values, w.hash_offsets
    else:
        assert w.token_values is not None and w.token_offsets is not None
        values, offsets = w.token_values, w.token_offsets
    models = list(w.request_models) or [None] * n
    return AnalysisView(
        request_ids=w.request_ids.to_pylist(),
        n_tokens=w.n_tokens,
        values=values, offsets=offsets, models=models, sessions=list(w.sessions) or [None] * n,
        namespaces=w.namespaces,  # never share a block across these (the simulator's partition)
        hash_trace=w.is_hash_trace, unit_tokens=w.trace_block_size or 1,
    )


@dataclass
class PrefixPass:
    """Per-request results of the streaming pass (arrays of length N)."""

    shared_tokens: np.ndarray  # int64, longest prefix shared with any earlier request
    shared_blocks: np.ndarray  # int64, full analysis blocks of it
    best_match: np.ndarray  # int64, index of that earlier request, -1 when none
    same_session_tokens: np.ndarray  # int64, of shared_tokens, from blocks first seen in-session
    hashes: np.ndarray  # int64, every request's chained block hashes, concatenated
    hash_offsets: np.ndarray  # int64, len N+1
    block_tokens: int  # tokens per hashed block


def _namespace_key(ns: str | None) -> int:
    if ns is None:
        return 0
    return int.from_bytes(hashlib.blake2b(ns.encode(), digest_size=8).digest(), "little")


def prefix_pass(w: AnalysisView, block_size: int) -> PrefixPass:
    """Longest earlier prefix per request (see the module docstring for the method)."""
    n = len(w)
    unit_block = 1 if w.hash_trace else block_size
    block_tokens = w.unit_tokens if w.hash_trace else block_size
    shared = np.zeros(n, dtype=np.int64)
    best = np.full(n, -1, dtype=np.int64)
    same = np.zeros(n, dtype=np.int64)
    sess_code = _codes(w.sessions)
    first: dict[int, int] = {}  # chained hash -> first request that had it
    cands: dict[int, list[int]] = {}  # (parent hash, first unit of next block) -> requests
    ns_cache: dict[str | None, int] = {}
    ns_keys = [ns_cache.setdefault(v, _namespace_key(v)) for v in w.namespaces]
    hashes, hash_offsets = all_chained_hashes(w.values, w.offsets, unit_block, np.array(ns_keys, dtype=np.uint64))
    for r in range(n):
        units = w.units(r)
        ns = ns_keys[r]
        hl = hashes[hash_offsets[r] : hash_offsets[r + 1]].tolist()
        lo, hi = 0, len(hl)
        while lo < hi:  # chained hashes: known blocks form a prefix of hl
            mid = (lo + hi) // 2
            if hl[mid] in first:
                lo = mid + 1
            else:
                hi = mid
        m = lo
        parent = hl[m - 1] if m else ns
        b = first[hl[m - 1]] if m else -1
        ext = 0
        tail = units[m * unit_block : (m + 1) * unit_block]
        if len(tail) and not w.hash_trace:
            key = parent ^ (int(tail[0]) * 0x9E3779B97F4A7C15 & _MASK)
            pool = cands.setdefault(key, [])
            for c in ([b] if b >= 0 else []) + pool:
                e = common_prefix_len(tail, w.units(c)[m * unit_block : (m + 1) * unit_block])
                if e > ext:
                    ext, b = e, c
            if len(pool) < _MAX_CANDIDATES:
                pool.append(r)
        if m < len(hl):
            first.update(zip(hl[m:], itertools.repeat(r)))
        if w.hash_trace:
            shared[r] = min(m * block_tokens, int(w.n_tokens[r]))
        else:
            shared[r] = m * block_size + ext
        best[r] = b
        if sess_code[r] >= 0 and shared[r]:
            owners = np.fromiter((first[h] for h in hl[:m]), dtype=np.int64, count=m)
            same_blocks = int(np.count_nonzero(sess_code[owners] == sess_code[r]))
            same[r] = min(same_blocks * block_tokens, int(shared[r]))
            if ext and b >= 0 and sess_code[b] == sess_code[r]:
                same[r] += ext
    blocks = np.minimum(shared // block_tokens, hash_offsets[1:] - hash_offsets[:-1])
    return PrefixPass(shared, blocks, best, same, hashes, hash_offsets, block_tokens)


def _codes(values: Sequence[str | None]) -> np.ndarray:
    """Integer codes of string values; -1 for None."""
    table: dict[str, int] = {}
    return np.array([-1 if v is None else table.setdefault(v, len(table)) for v in values],
                    dtype=np.int64).reshape(-1)


def ceiling_per_request(w: AnalysisView, p: PrefixPass) -> np.ndarray:
    """Tokens an infinite token-granular cache serves: shared tokens, last token recomputed."""
    return np.minimum(p.shared_tokens, np.maximum(w.n_tokens - 1, 0))
