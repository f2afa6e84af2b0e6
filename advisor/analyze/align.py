"""Aligning two near-identical prompts over their whole length.

Input: two unit arrays (token ids), an earlier prompt `a` and a later one `b`. Output: `align`
gives the common prefix and the chain of `Run`s (stretches of b found again in a) from there
to the end of b; `regions` cuts the chain into `Region`s, each a place where b differs from a
followed by content they share again. A region is a changed value (a's span and b's span
differ: a date, an id, a profile, a document) or a reordering (the two spans hold the same
units in another order: tools, schema keys, few-shot examples).

Cost: O(len(b) + window of a) numpy work per pair (k-gram hashes, one sort) plus a bounded
number of token comparisons per run, each in time proportional to the run it confirms; there
is no leading window, so a difference is found at any depth. The part of `a` searched is
capped at `a_window(len(b) - p)` units past the common prefix: content that b shares with a
cannot lie further into a than b's own length plus the spans that differ, so the cap follows
the prompts, not a setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from advisor.analyze.hashing import common_prefix_len, kgram_hashes, multiset_sums

KGRAM = 8
MIN_RUN = 2 * KGRAM  # common content must resume for this many units to count
_MAX_RUNS = 256  # runs followed per pair (a dozen reordered tools take ~2 each)
_NEAR = 64  # a run this close to where b would continue in step with a (a changed value's resume)
_FAR_RUN = 2 * MIN_RUN  # a run further away (a moved block) must be this long: JSON boilerplate repeats
_MAX_TRIES = 64  # plausible start points tried for one run before the chain ends
_MAX_SAME = 8  # positions in a tried each side of the in-step one, for a k-gram a repeats often
_REGION_RUNS = 96  # runs one reordering may span
_LOOKUP_BLOCK = 256  # positions of b looked up at a time
_POS_BITS = 24  # a's window positions packed under 40 bits of k-gram hash
_POS_MASK = (1 << _POS_BITS) - 1
_WRAP = 1 << 64


def a_window(b_rest: int) -> int:
    """Units of `a` searched past the common prefix for content of b's remaining `b_rest`."""
    return 2 * b_rest + 1024


@dataclass(frozen=True)
class Run:
    a: int  # start in a
    b: int  # start in b
    n: int  # length: a[a : a+n] == b[b : b+n]


@dataclass(frozen=True)
class Region:
    """b[b0:b1] differs from a[a0:a1]; from b1 (a1) on they agree again up to `shared_end`
    in b. `order`: the two spans hold the same units in another order."""

    a0: int
    a1: int
    b0: int
    b1: int
    order: bool
    shared_end: int


def align(a: np.ndarray, b: np.ndarray) -> tuple[int, list[Run]]:
    """(common prefix length p, the runs of b[p:] found in a, in b order).

    Each run starts at the first position of b, from where the previous run ended, whose
    next MIN_RUN units occur in a (two adjacent k-grams present is the cheap filter, the
    token comparison the proof). Of the positions in a with that k-gram, one within _NEAR of
    where b would continue in step wins (a changed value's resume); else the longest run of at
    least _FAR_RUN (a moved block: tools, examples), so that repeated boilerplate (a schema's
    `{"type": "string", "description": ...`) does not pull the chain away. Runs may point
    anywhere in a's window, forward or back. a's k-grams are sorted once (hash and position
    packed in one word); b's are looked up a block at a time from where the chain stands, so
    the stretches a run covers are never looked up.
    """
    p = common_prefix_len(a, b)
    A, B = a[p : p + min(a_window(len(b) - p), _POS_MASK)], b[p:]
    ha = kgram_hashes(A, KGRAM)
    last_start = len(B) - 2 * KGRAM + 1  # a plausible start needs the k-gram KGRAM further on too
    if len(ha) == 0 or last_start <= 0:
        return p, []
    packed = np.sort((ha >> _POS_BITS) << _POS_BITS | np.arange(len(ha), dtype=np.uint64))
    hs, at = packed >> _POS_BITS, (packed & _POS_MASK).astype(np.int64)
    runs: list[Run] = []
    pb = reach = shift = 0  # where the next run may start in B; how far into A runs went; A - B offset
    while len(runs) < _MAX_RUNS and pb < last_start:
        best: tuple[bool, int, bool, int, int] | None = None
        tried, lo_b = 0, pb
        while best is None and tried < _MAX_TRIES and lo_b < last_start:
            hi_b = min(last_start, lo_b + _LOOKUP_BLOCK)
            keys = kgram_hashes(B[lo_b : hi_b + 2 * KGRAM - 1], KGRAM) >> _POS_BITS
            lo = np.searchsorted(hs, keys)
            present = hs[np.minimum(lo, len(hs) - 1)] == keys
            for c in np.flatnonzero(present[: hi_b - lo_b] & present[KGRAM:])[: _MAX_TRIES - tried].tolist():
                tried += 1
                i = lo_b + c
                same = at[int(lo[c]) : int(np.searchsorted(hs, keys[c], side="right"))]
                if len(same) > 2 * _MAX_SAME:  # repeated boilerplate: the positions nearest in step
                    k = int(np.searchsorted(same, i + shift))
                    same = same[max(0, k - _MAX_SAME) : k + _MAX_SAME]
                for j in same.tolist():
                    n = common_prefix_len(A[j:], B[i:])
                    near = abs(j - i - shift) <= _NEAR
                    key = (near, n, j >= reach, -abs(j - i - shift), j)  # near in step first, then longest
                    if n >= (MIN_RUN if near else _FAR_RUN) and (best is None or key > best):
                        best = key
                if best is not None:
                    break
            lo_b = hi_b
        if best is None:
            break
        n, j = best[1], best[4]
        runs.append(Run(p + j, p + i, n))
        pb, reach, shift = i + n, max(reach, j + n), j - i
    return p, runs


def regions(a: np.ndarray, b: np.ndarray, p: int, runs: list[Run]) -> list[Region]:
    """The chain of runs cut into regions, in b order (see the module docstring).

    From each difference (da in a, db in b) a reordering closes at the first point where both
    prompts have advanced equally and the two spans hold the same units: the start of a run,
    or, after at least two runs, the end of the last one (a's side then past everything its
    runs used). Otherwise the next run closes a changed value (it must move forward in a:
    a run that jumps back is not b resuming a's content, and the chain stops there).
    """
    if not runs:
        return []
    sums: list[np.ndarray] = []  # multiset prefix sums of a and b from p, made on first use

    def same_units(xa: int, xb: int) -> bool:
        if xa - da != xb - db or xa <= da:
            return False
        if not sums:
            sums.extend((multiset_sums(a[p : max(r.a + r.n for r in runs)]), multiset_sums(b[p : runs[-1].b + runs[-1].n])))
        sa, sb = sums
        return (int(sa[xa - p]) - int(sa[da - p]) - int(sb[xb - p]) + int(sb[db - p])) % _WRAP == 0

    out: list[Region] = []
    da = db = p
    i = 0
    while i < len(runs):
        close: tuple[int, int, int, int] | None = None  # (a end, b end, shared end, next run)
        reach = da
        for k in range(i, min(len(runs), i + _REGION_RUNS)):
            r = runs[k]
            if same_units(r.a, r.b):  # b resumes in step with a at run k
                close = (r.a, r.b, r.b + r.n, k + 1)
                break
            reach = max(reach, r.a + r.n)
            end_b = r.b + r.n
            nxt = runs[k + 1] if k + 1 < len(runs) else None
            if k > i and same_units(reach, end_b) and (nxt is None or (nxt.a, nxt.b) != (reach, end_b)):
                close = (reach, end_b, end_b, k + 1)  # the reordering runs to the end of the chain
                break
        if close is None:
            r = runs[i]
            if r.a < da:
                break
            out.append(Region(da, r.a, db, r.b, False, r.b + r.n))
            i = i + 1
            da, db = r.a + r.n, r.b + r.n
            continue
        xa, xb, shared_end, i = close
        out.append(Region(da, xa, db, xb, True, shared_end))
        da, db = xa + (shared_end - xb), shared_end
    return out
