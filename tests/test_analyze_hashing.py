"""analyze's compiled all-requests block hashing equals its per-request numpy reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from advisor.analyze.hashing import all_chained_hashes, chained_hashes


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(st.tuples(st.lists(st.integers(-2**40, 2**40), max_size=70), st.integers(0, 2**64 - 1)),
                     max_size=8),
       block=st.sampled_from([1, 2, 3, 16]))
def test_every_request_hashes_as_it_does_alone(rows, block) -> None:
    lengths = [len(u) for u, _ in rows]
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.array([x for u, _ in rows for x in u], dtype=np.int64)
    namespaces = np.array([ns for _, ns in rows], dtype=np.uint64)
    flat, hoff = all_chained_hashes(values, offsets, block, namespaces)
    assert flat.dtype == np.int64 and len(hoff) == len(rows) + 1
    for r, (units, ns) in enumerate(rows):
        want = chained_hashes(np.array(units, dtype=np.int64), block, ns)
        np.testing.assert_array_equal(flat[hoff[r] : hoff[r + 1]], want)


def test_token_ids_as_int32_hash_like_int64() -> None:
    ids = np.arange(100, dtype=np.int32)
    a, _ = all_chained_hashes(ids, np.array([0, 100]), 16, np.zeros(1, np.uint64))
    b, _ = all_chained_hashes(ids.astype(np.int64), np.array([0, 100]), 16, np.zeros(1, np.uint64))
    np.testing.assert_array_equal(a, b)
    assert len(a) == 6 and len(set(a.tolist())) == 6


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(st.tuples(st.lists(st.integers(-2**40, 2**40) | st.integers(0, 6), max_size=90),
                               st.integers(-1, 90)), max_size=8),
       avg=st.sampled_from([2, 4, 16]))
def test_every_request_chunks_as_it_does_alone(rows, avg) -> None:
    """analyze's content chunks of all requests at once, each from its own start (-1: none)."""
    from advisor.analyze.hashing import all_content_chunks, content_chunks

    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(u) for u, _ in rows], out=offsets[1:])
    values = np.array([x for u, _ in rows for x in u], dtype=np.int64)
    starts = np.array([-1 if k < 0 else offsets[r] + min(k, len(u)) for r, (u, k) in enumerate(rows)], np.int64)
    hashes, chunk_starts, coff = all_content_chunks(values, offsets, starts, avg)
    for r, (units, k) in enumerate(rows):
        if k < 0:
            assert coff[r + 1] == coff[r]
            continue
        want_h, want_s = content_chunks(np.array(units[min(k, len(units)):], dtype=np.int64), avg)
        np.testing.assert_array_equal(hashes[coff[r] : coff[r + 1]], want_h)
        np.testing.assert_array_equal(chunk_starts[coff[r] : coff[r + 1]], want_s)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=120), st.lists(st.integers(0, 3), max_size=120))
def test_common_prefix_len_equals_counting_one_by_one(a, b) -> None:
    """Short arrays (compared as lists) and long ones (in growing numpy slices) alike."""
    from advisor.analyze.hashing import common_prefix_len

    want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert common_prefix_len(np.array(a, np.int32), np.array(b, np.int32)) == want
    shared = list(range(200)) + a  # a long common part first: the slice path
    assert common_prefix_len(np.array(shared, np.int32), np.array(list(range(200)) + b, np.int32)) == 200 + want
