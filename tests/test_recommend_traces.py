"""Recommend's block-trace memo (advisor.recommend.traces): each trace it hands out is the one
`simulate_one` would hash for itself, and it is made once."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from advisor.recommend.traces import Traces
from advisor.sim.configuration import block_trace, scheduler_requests
from advisor.sim.fast.events import request_hashes
from advisor.workload import Workload


def _same(a, b) -> None:  # two BlockTraces, id for id
    assert a.block_size == b.block_size and a.num_ids == b.num_ids
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.ids, b.ids)


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    """Prompts that share heads (and repeat whole), some salted, some fanned out (n > 1)."""
    heads = draw(st.lists(st.lists(st.integers(1, 50), min_size=0, max_size=40), min_size=1, max_size=3))
    rows = draw(st.lists(st.tuples(st.integers(0, len(heads) - 1), st.lists(st.integers(1, 50), max_size=30),
                                   st.sampled_from([None, "a", "b"]), st.integers(1, 3)),
                         min_size=1, max_size=12))
    tokens = [heads[h] + tail or [7] for h, tail, _, _ in rows]
    return Workload.from_token_lists(tokens, cache_salt=[s for _, _, s, _ in rows], n=[k for *_, k in rows])


@settings(max_examples=60, deadline=None)
@given(workloads(), st.sampled_from([1, 2, 4, 16]))
def test_the_unshared_trace_is_what_hashing_the_salted_log_gives(w: Workload, bs: int) -> None:
    traces = Traces(w)
    unshared = traces.unshared(w)
    _same(traces.trace(unshared, bs), block_trace(w.with_own_salts(), bs))


@settings(max_examples=40, deadline=None)
@given(workloads(), st.sampled_from([2, 16]))
def test_each_trace_and_its_block_lists_equal_a_fresh_hash(w: Workload, bs: int) -> None:
    traces = Traces(w)
    first = traces.trace(w, bs)
    assert traces.trace(w, bs) is first  # made once
    _same(first, block_trace(w, bs))
    reqs = scheduler_requests(w)
    for got, want in zip(traces.prepared(w, bs), request_hashes(first, reqs.n_tokens, reqs.output_tokens,
                                                                 first.num_ids), strict=True):
        np.testing.assert_array_equal(got, want)
    other = Workload.from_token_lists([[9] * 5] * w.num_requests)  # another workload: its own trace
    _same(traces.trace(other, bs), block_trace(other, bs))


def test_the_logged_workload_takes_the_stored_stream_and_others_do_not() -> None:
    w = Workload.from_token_lists([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9]], n=[2, 1])
    stored = block_trace(Workload.from_token_lists([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9]]), 2)
    asked: list[int] = []
    traces = Traces(w, lambda bs: asked.append(bs) or stored)
    # the stored stream is per logged request; the memo repeats the fanned-out one
    _same(traces.trace(w, 2), block_trace(w, 2))
    assert asked == [2]
    copy = Workload.from_token_lists([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9]])
    traces.trace(copy, 2)
    assert asked == [2]  # a rewrite of the log is hashed, never given the log's stream
