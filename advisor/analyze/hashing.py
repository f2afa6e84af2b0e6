"""Hash primitives of the analysis: 64-bit chained block hashes and content-defined chunks.

Inputs are numpy arrays of units (token ids, or a hash trace's hash ids); outputs are uint64 /
int64 arrays. No I/O and no state but a cache of powers. These hashes are the analysis' own
(fast, vectorised, collision-resistant enough for statistics), built on `mix64`; the exact vLLM
block hashes, and `mix64` itself (shared with the fast path), live in advisor/blockhash.py.
"""

from __future__ import annotations

import numpy as np

from advisor.blockhash import (
    mix64 as mix64,  # re-exported: clusters and breakers import it here
)
from advisor.compiled import compiled

_K_POS = np.uint64(0x9E3779B97F4A7C15)
_K_DEPTH = np.uint64(0xD6E8FEB86659FD93)
_P = 0xA0761D6478BD642F  # odd, so it has an inverse mod 2**64
_P_INV = pow(_P, -1, 1 << 64)
_MASK = (1 << 64) - 1


class _Powers:
    """P**i and P**-i mod 2**64, grown on demand (the chained hash is a polynomial in P)."""

    def __init__(self) -> None:
        self.fwd = np.ones(1, dtype=np.uint64)
        self.inv = np.ones(1, dtype=np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n > len(self.fwd):
            size = max(n, 2 * len(self.fwd))
            fwd = np.empty(size, dtype=np.uint64)
            inv = np.empty(size, dtype=np.uint64)
            f = i = 1
            for k in range(size):
                fwd[k], inv[k] = f, i
                f, i = (f * _P) & _MASK, (i * _P_INV) & _MASK
            self.fwd, self.inv = fwd, inv
        return self.fwd[:n], self.inv[:n]


_POWERS = _Powers()


def block_content_hashes(units: np.ndarray, block: int) -> np.ndarray:
    """One uint64 per full block of `units`, a hash of the block's content alone."""
    n = len(units) // block
    x = units[: n * block].astype(np.uint64).reshape(n, block)
    pos = np.arange(block, dtype=np.uint64) * _K_POS
    return mix64(mix64(x ^ pos).sum(axis=1, dtype=np.uint64))


def chained_hashes(units: np.ndarray, block: int, namespace: int = 0) -> np.ndarray:
    """Chained 64-bit hashes (int64) of the full blocks: hash d covers units[: (d+1)*block].

    h_d = mix(sum_{i<=d} c_i * P**(d-i), d, namespace), with c_i the content hash of block i,
    computed for all d at once as P**d * cumsum(c_i * P**-i) (all mod 2**64).
    """
    c = block_content_hashes(units, block)
    n = len(c)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    fwd, inv = _POWERS.get(n)
    poly = np.cumsum(c * inv, dtype=np.uint64) * fwd
    depth = (np.arange(1, n + 1, dtype=np.uint64) * _K_DEPTH) ^ np.uint64(namespace & _MASK)
    return mix64(poly ^ depth).view(np.int64)


def all_chained_hashes(values: np.ndarray, offsets: np.ndarray, block: int,
                       namespaces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`chained_hashes` of every request at once: (flat int64 hashes, offsets into them), request
    r's units `values[offsets[r]:offsets[r+1]]` hashed under `namespaces[r]` (uint64). One
    compiled pass in place of a numpy pass per request; equal to `chained_hashes` (a test
    checks): the polynomial is run as its recurrence h_d = h_(d-1) * P + c_d (mod 2**64)."""
    offsets = np.asarray(offsets, np.int64)
    full = (offsets[1:] - offsets[:-1]) // block
    hoff = np.zeros(len(full) + 1, np.int64)
    np.cumsum(full, out=hoff[1:])
    out = np.empty(int(hoff[-1]), np.uint64)
    _chain_all(values, offsets, hoff, block, np.asarray(namespaces, np.uint64), out)
    return out.view(np.int64), hoff


@compiled
def _mix1(x):  # type: ignore[no-untyped-def]
    """`mix64` on one uint64."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@compiled
def _chain_all(values, offsets, hoff, block, namespaces, out):  # type: ignore[no-untyped-def]
    k_pos, k_depth, p = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD6E8FEB86659FD93), np.uint64(_P)
    for r in range(len(hoff) - 1):
        start, poly = offsets[r], np.uint64(0)
        for d in range(hoff[r + 1] - hoff[r]):
            acc = np.uint64(0)
            base = start + d * block
            for j in range(block):
                acc += _mix1(np.uint64(values[base + j]) ^ (np.uint64(j) * k_pos))
            poly = poly * p + _mix1(acc)
            out[hoff[r] + d] = _mix1(poly ^ ((np.uint64(d + 1) * k_depth) ^ namespaces[r]))


_SHORT = 32  # at most this many elements are compared as Python lists: cheaper than numpy calls


def common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    """Number of leading equal elements of two 1-d arrays, in time proportional to the answer
    (compared in growing slices), not to the arrays' length."""
    k = min(len(a), len(b))
    if k <= _SHORT:
        n = 0
        for x, y in zip(a[:k].tolist(), b[:k].tolist()):
            if x != y:
                break
            n += 1
        return n
    i, step = 0, 32
    while i < k:
        j = min(k, i + step)
        neq = np.flatnonzero(a[i:j] != b[i:j])
        if len(neq):
            return i + int(neq[0])
        i, step = j, step * 4
    return k


_KGRAM_K = tuple(np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                                        0x27D4EB2F165667C5, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53,
                                        0x2545F4914F6CDD1D, 0x9FB21C651E98DF25))


def kgram_hashes(units: np.ndarray, k: int = 8) -> np.ndarray:
    """uint64 hash of every window units[i : i+k] (len(units) - k + 1 of them; none if shorter).
    Equal windows hash equal wherever they sit; callers confirm a match token by token."""
    n = len(units) - k + 1
    if n <= 0:
        return np.empty(0, dtype=np.uint64)
    assert k <= len(_KGRAM_K)
    x = mix64(units.astype(np.uint64))
    g = x[:n] * _KGRAM_K[0]
    for lag in range(1, k):
        g += x[lag : lag + n] * _KGRAM_K[lag]
    return mix64(g)


def multiset_sums(units: np.ndarray) -> np.ndarray:
    """Prefix sums of a per-unit hash (len + 1 entries): two spans hold the same units in any
    order exactly when their lengths and sums agree (up to a 2**-64 collision)."""
    out = np.zeros(len(units) + 1, dtype=np.uint64)
    np.cumsum(mix64(units.astype(np.uint64) ^ _KGRAM_K[1]), dtype=np.uint64, out=out[1:])
    return out


_ANCHOR_K = (np.uint64(0x2545F4914F6CDD1D), np.uint64(0x9FB21C651E98DF25),
             np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9))


def content_chunks(units: np.ndarray, avg: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Content-defined chunks of a unit sequence: (chunk hashes uint64, chunk start offsets).

    Each position t gets the hash g_t of its 4-token window units[t-3 : t+1]; a chunk ends
    after a position whose g_t is 0 mod `avg`, so boundaries depend on the text around them,
    not on absolute positions; a chunk's hash is the mixed sum of the g_t inside it (order
    enters through the windows). Two prompts that differ only in an inserted or changed span
    share every chunk that starts 3+ tokens past it, whatever the shift. Unchained, so equal
    content anywhere in two prompts gives equal chunk hashes.
    """
    n = len(units)
    if n == 0:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    x = units.astype(np.uint64)
    g = x * _ANCHOR_K[0]
    for lag in (1, 2, 3):
        g[lag:] += x[:-lag] * _ANCHOR_K[lag]
    h = mix64(g)
    cut = np.flatnonzero((h % np.uint64(avg)) == 0) + 1
    starts = np.concatenate(([0], cut[cut < n])).astype(np.int64)
    return mix64(np.add.reduceat(h, starts, dtype=np.uint64)), starts


def all_content_chunks(values: np.ndarray, offsets: np.ndarray, starts: np.ndarray,
                       avg: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`content_chunks` of `values[starts[r]:offsets[r+1]]` for every request r (a start of -1:
    none), in one compiled pass: (chunk hashes uint64, chunk starts relative to starts[r] int64,
    offsets into both per request). Equal to `content_chunks` request by request (a test checks)."""
    offsets, starts = np.asarray(offsets, np.int64), np.asarray(starts, np.int64)
    counts = np.zeros(len(starts), np.int64)
    _count_chunks(values, offsets, starts, np.uint64(avg), counts)
    coff = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(counts, out=coff[1:])
    hashes = np.empty(int(coff[-1]), np.uint64)
    chunk_starts = np.empty(int(coff[-1]), np.int64)
    _fill_chunks(values, offsets, starts, np.uint64(avg), coff, hashes, chunk_starts)
    return hashes, chunk_starts, coff


@compiled
def _window_hash(values, lo, t):  # type: ignore[no-untyped-def]
    """`content_chunks`' h_t: the mixed hash of the 4-unit window ending at t (from `lo` on)."""
    g = np.uint64(values[lo + t]) * np.uint64(0x2545F4914F6CDD1D)
    if t >= 1:
        g += np.uint64(values[lo + t - 1]) * np.uint64(0x9FB21C651E98DF25)
    if t >= 2:
        g += np.uint64(values[lo + t - 2]) * np.uint64(0xC2B2AE3D27D4EB4F)
    if t >= 3:
        g += np.uint64(values[lo + t - 3]) * np.uint64(0x165667B19E3779F9)
    return _mix1(g)


@compiled
def _count_chunks(values, offsets, starts, avg, counts):  # type: ignore[no-untyped-def]
    for r in range(len(starts)):
        lo = starts[r]
        if lo < 0:
            continue
        n = offsets[r + 1] - lo
        c = 1 if n > 0 else 0
        for t in range(n - 1):  # a cut after the last unit starts no chunk
            if _window_hash(values, lo, t) % avg == 0:
                c += 1
        counts[r] = c


@compiled
def _fill_chunks(values, offsets, starts, avg, coff, hashes, chunk_starts):  # type: ignore[no-untyped-def]
    for r in range(len(starts)):
        lo = starts[r]
        if lo < 0:
            continue
        n = offsets[r + 1] - lo
        k, begin, acc = coff[r], 0, np.uint64(0)
        for t in range(n):
            h = _window_hash(values, lo, t)
            acc += h
            if (h % avg == 0 and t + 1 < n) or t == n - 1:
                hashes[k], chunk_starts[k] = _mix1(acc), begin
                k += 1
                begin, acc = t + 1, np.uint64(0)

