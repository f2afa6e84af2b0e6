"""advisor.sim.fast.sequential against the exact reference advisor.sim.cache, under eviction pressure."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, target
from hypothesis import strategies as st

from advisor import blockhash
from advisor.sim import cache
from advisor.sim.fast import policies as fastpolicy
from advisor.sim.fast import sequential as fastsim
from advisor.sim.fast import trace as fasttrace

SYSTEMS = [list(range(100 * k, 100 * k + n)) for k, n in enumerate((3, 8, 13, 16))]


def flat(reqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(reqs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(r) for r in reqs])
    tokens = np.asarray([t for r in reqs for t in r], np.int32)
    return tokens, offsets


@st.composite
def workloads(draw: st.DrawFn, max_len: int = 40) -> list[list[int]]:
    """Requests sharing prefixes: system prompts, earlier prompts cut at a multiple of
    4 or 8 tokens (repeated prompts whose length is a multiple of B), short tails."""
    reqs: list[list[int]] = []
    for _ in range(draw(st.integers(1, 40))):
        heads = [[], *SYSTEMS] + [r[: len(r) // 8 * 8] for r in reqs[-5:]] + [r[: len(r) // 4 * 4] for r in reqs[-5:]]
        head = draw(st.sampled_from(heads))
        tail = draw(st.lists(st.integers(0, 2), max_size=12))
        reqs.append((head + tail)[:max_len] or [7])
    return reqs


def reference(reqs: Sequence[Sequence[int]], block_size: int, num_blocks: int | None) -> cache.PrefixCache:
    c = cache.PrefixCache(num_blocks, block_size)
    for i, r in enumerate(reqs):
        if c.fits(len(r)):
            assert c.admit(str(i), blockhash.request_block_hashes(r, block_size), len(r)) is not None
            c.free(str(i))
    return c


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(reqs=workloads(), block_size=st.sampled_from([4, 8]), num_blocks=st.integers(1, 24))
def test_sequential_lru_equals_the_reference(reqs, block_size, num_blocks):
    tokens, offsets = flat(reqs)
    trace = fasttrace.trace_from_tokens(tokens, offsets, block_size)
    got = fastsim.simulate_sequential(trace, num_blocks)
    ref = reference(reqs, block_size, num_blocks)
    target(float(ref.evictions))
    assume(ref.evictions > 0)
    assert got.hit_tokens.tolist() == cache.sequential_hits(reqs, block_size, num_blocks)
    assert (got.evictions, got.peak_blocks_in_use) == (ref.evictions, ref.peak_blocks_in_use)
    assert got.hits == ref.hits


@settings(max_examples=60, deadline=None)
@given(reqs=workloads(), block_size=st.sampled_from([4, 8]))
def test_ceiling_equals_an_infinite_reference_cache(reqs, block_size):
    trace = fasttrace.trace_from_tokens(*flat(reqs), block_size)
    assert fastsim.ceiling_hits(trace).tolist() == cache.sequential_hits(reqs, block_size, None)
    assert fastsim.simulate_sequential(trace, None).hits == reference(reqs, block_size, None).hits


@settings(max_examples=80, deadline=None)
@given(reqs=workloads(), block_size=st.sampled_from([1, 4, 8]))
def test_block_keys_are_equal_exactly_when_chained_hashes_are(reqs, block_size):
    keys = fasttrace.prefix_keys(*flat(reqs), (block_size,))[block_size].tolist()
    hashes = [h for r in reqs for h in blockhash.request_block_hashes(r, block_size)]
    assert len(keys) == len(hashes)
    pairs = set(zip(keys, hashes, strict=True))
    assert len({k for k, _ in pairs}) == len({h for _, h in pairs}) == len(pairs)


@settings(max_examples=30, deadline=None)
@given(reqs=workloads())
def test_numpy_keys_equal_compiled_keys_for_several_block_sizes_at_once(reqs):
    tokens, offsets = flat(reqs)
    salts = np.arange(len(reqs), dtype=np.uint64) % 3
    both = fasttrace.prefix_keys(tokens, offsets, (1, 4, 8), salts)
    numpy_only = fasttrace._prefix_keys_numpy(tokens, offsets, (1, 4, 8), salts)
    for bs in (1, 4, 8):
        assert both[bs].tolist() == numpy_only[bs].tolist()
        assert both[bs].tolist() == fasttrace.prefix_keys(tokens, offsets, (bs,), salts)[bs].tolist()


def test_salts_separate_identical_prompts_like_extra_keys():
    reqs = [list(range(12))] * 3
    salts = np.asarray([0, 5, 5], np.uint64)
    keys = fasttrace.prefix_keys(*flat(reqs), (4,), salts)[4].reshape(3, 3)
    assert set(keys[0]).isdisjoint(keys[1])
    assert keys[1].tolist() == keys[2].tolist()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data(), num_blocks=st.integers(2, 12))
def test_hash_traces_match_the_reference_with_partial_last_blocks(data, num_blocks):
    tbs = 4
    lists = data.draw(st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=num_blocks), min_size=2, max_size=30))
    # input_length: each id a full block, except that the last may be partial.
    lengths = [len(ids) * tbs - data.draw(st.integers(0, tbs - 1)) for ids in lists]
    flat_ids = np.asarray([i for ids in lists for i in ids], np.int64)
    offsets = np.zeros(len(lists) + 1, np.int64)
    offsets[1:] = np.cumsum([len(ids) for ids in lists])
    trace = fasttrace.trace_from_hash_ids(flat_ids, offsets, np.asarray(lengths), tbs)
    chained = [blockhash.chain_trace_hash_ids(ids, n, tbs) for ids, n in zip(lists, lengths, strict=True)]
    ref = cache.sequential_hits_from_hashes(chained, lengths, tbs, num_blocks)
    got = fastsim.simulate_sequential(trace, num_blocks)
    assume(got.evictions > 0)
    assert got.hit_tokens.tolist() == ref


def test_a_repeated_multiple_of_b_prompt_duplicates_its_last_block():
    # 8 tokens twice at B=4 with 3 blocks: the second run recomputes block 1 into a
    # second copy; a request of new content evicts one copy, and the prompt extended
    # still hits both blocks (a one-block-per-hash simulator would hit only 4 tokens).
    reqs = [list(range(8)), list(range(8)), [50, 51, 52, 53], list(range(9))]
    trace = fasttrace.trace_from_tokens(*flat(reqs), 4)
    got = fastsim.simulate_sequential(trace, 3)
    assert got.hit_tokens.tolist() == cache.sequential_hits(reqs, 4, 3) == [0, 4, 0, 8]
    assert got.evictions == 2  # a copy of hash 1, then the new content's block


def test_a_prompt_too_long_for_the_pool_gets_no_hit_and_changes_nothing():
    reqs = [list(range(8)), list(range(40)), list(range(9))]
    got = fastsim.simulate_sequential(fasttrace.trace_from_tokens(*flat(reqs), 4), 4)
    assert got.hit_tokens.tolist() == [0, 0, 8]
    assert got.fits.tolist() == [True, False, True]


@pytest.mark.skipif(not fasttrace.HAVE_NUMBA, reason="numba is not installed: only the Python loop exists")
def test_the_python_loop_and_the_compiled_loop_agree():
    reqs = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6, 7, 8, 9], [1, 2, 3, 4, 5], [9] * 13, [1, 2, 3, 4, 6, 7, 8, 9, 1]]
    trace = fasttrace.trace_from_tokens(*flat(reqs), 4)
    hits = np.zeros(len(reqs), np.int64)
    loop = getattr(fastsim._sequential_lru, "py_func", fastsim._sequential_lru)
    counters = loop(trace.ids, trace.offsets, trace.num_tokens, 4, 4, trace.num_ids, np.zeros(len(reqs), bool), False,
                    hits)
    got = fastsim.simulate_sequential(trace, 4)
    assert hits.tolist() == got.hit_tokens.tolist()
    assert counters == (got.evictions, got.peak_blocks_in_use)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(reqs=workloads(), num_blocks=st.integers(1, 16), policy=st.sampled_from(["fifo", "belady"]))
def test_fifo_and_belady_equal_the_reference(reqs, num_blocks, policy):
    hashes = [blockhash.request_block_hashes(r, 4) for r in reqs]
    lengths = [len(r) for r in reqs]
    future = cache.FutureUses(hashes, lengths, 4) if policy == "belady" else None
    ref = cache.PrefixCache(num_blocks, 4, policy, future)
    expected = []
    for i, (h, n) in enumerate(zip(hashes, lengths, strict=True)):
        hit = ref.admit(str(i), h, n, position=i)
        expected.append(hit or 0)
        if hit is not None:
            ref.free(str(i))
    target(float(ref.evictions))
    assume(ref.evictions > 0)
    got = fastpolicy.simulate_sequential_policy(fasttrace.trace_from_tokens(*flat(reqs), 4), num_blocks, policy)
    assert got.hit_tokens.tolist() == expected == cache.sequential_hits(reqs, 4, num_blocks, policy)
    assert (got.evictions, got.peak_blocks_in_use) == (ref.evictions, ref.peak_blocks_in_use)


def seeded_workload(seed: int, n: int) -> list[list[int]]:
    """Long workloads (hypothesis keeps its examples short): system prompts, earlier
    prompts cut at block boundaries, tails from a 3-token alphabet."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, 50, rng.integers(3, 20)).tolist() for _ in range(4)]
    reqs: list[list[int]] = []
    for _ in range(n):
        heads = systems + [r[: len(r) // 4 * 4] for r in reqs[-5:]] + [[]]
        head = heads[int(rng.integers(len(heads)))]
        reqs.append((head + rng.integers(0, 3, rng.integers(0, 10)).tolist()) or [1])
    return reqs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("policy", ["lru", "fifo", "belady"])
def test_long_seeded_workloads_equal_the_reference(seed, policy):
    reqs = seeded_workload(seed, 150)
    trace = fasttrace.trace_from_tokens(*flat(reqs), 4)
    for num_blocks in (3, 5, 8, 13):
        got = fastpolicy.simulate_sequential_policy(trace, num_blocks, policy)
        assert got.evictions > 0
        assert got.hit_tokens.tolist() == cache.sequential_hits(reqs, 4, num_blocks, policy)


@pytest.mark.parametrize("policy", ["fifo", "belady"])
def test_a_hot_prefix_under_a_tight_pool_keeps_the_free_pool_bookkeeping_bounded(policy):
    """Every request shares a 70-token prompt (2 full blocks at B=32) and the pool holds
    barely more than one request: the same blocks are touched and freed hundreds of times,
    which once overflowed FIFO's revisit heap with duplicate entries (out-of-bounds writes
    in compiled code). Results still equal the reference."""
    rng = np.random.default_rng(1)
    shared = rng.integers(1, 500, 70).tolist()
    reqs = [shared + rng.integers(1, 500, int(rng.integers(1, 30))).tolist() for _ in range(300)]
    trace = fasttrace.trace_from_tokens(*flat(reqs), 32)
    for num_blocks in (4, 5, 6, 8):
        got = fastpolicy.simulate_sequential_policy(trace, num_blocks, policy)
        assert got.evictions > 0
        assert got.hit_tokens.tolist() == cache.sequential_hits(reqs, 32, num_blocks, policy)


# --- requests vLLM treats apart: the compiled replays equal the reference ----------------
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data(), reqs=workloads(), num_blocks=st.one_of(st.none(), st.integers(1, 16)),
       policy=st.sampled_from(["lru", "fifo", "belady"]),
       speculative=st.sampled_from([None, "eagle", "mtp", "ngram"]))
def test_skipped_reads_and_speculative_drops_equal_the_reference(data, reqs, num_blocks, policy, speculative):
    """Requests that skip the cache read (prompt logprobs) and an EAGLE-style drafter's dropped
    last block, mixed into workloads under eviction pressure: hits, evictions and peak equal."""
    assume(num_blocks is not None or policy == "lru")
    skip = data.draw(st.lists(st.booleans(), min_size=len(reqs), max_size=len(reqs)))
    drop_last = cache.drops_last_hit_block(speculative)
    hashes = [blockhash.request_block_hashes(r, 4) for r in reqs]
    lengths = [len(r) for r in reqs]
    future = cache.FutureUses(hashes, lengths, 4, skip) if policy == "belady" else None
    ref = cache.PrefixCache(num_blocks, 4, policy, future, speculative)
    expected, queried = [], 0
    for i, (h, n) in enumerate(zip(hashes, lengths, strict=True)):
        hit = ref.admit(str(i), h, n, position=i, skip_prefix_cache=skip[i])
        expected.append(hit or 0)
        if hit is not None:
            ref.free(str(i))
            queried += 0 if skip[i] else n
            assert hit == 0 or not skip[i]
    if num_blocks is not None:
        target(float(ref.evictions))
        assume(ref.evictions > 0)
    trace = fasttrace.trace_from_tokens(*flat(reqs), 4)
    got = (fastsim.simulate_sequential(trace, None, np.asarray(skip), drop_last) if num_blocks is None else
           fastpolicy.simulate_sequential_policy(trace, num_blocks, policy, None, np.asarray(skip), drop_last))
    assert got.hit_tokens.tolist() == expected
    assert expected == cache.sequential_hits(reqs, 4, num_blocks, policy, skip=skip, speculative=speculative)
    if num_blocks is not None:
        assert (got.evictions, got.peak_blocks_in_use) == (ref.evictions, ref.peak_blocks_in_use)
    assert (ref.queries, ref.hits) == (queried, sum(expected))


@settings(max_examples=40, deadline=None)
@given(reqs=workloads(), counts=st.lists(st.integers(1, 4), min_size=40, max_size=40))
def test_repeating_requests_equals_tracing_the_repeated_token_lists(reqs, counts):
    counts = counts[: len(reqs)]
    trace = fasttrace.repeat_requests(fasttrace.trace_from_tokens(*flat(reqs), 4), np.asarray(counts))
    repeated = [r for r, c in zip(reqs, counts, strict=True) for _ in range(c)]
    again = fasttrace.trace_from_tokens(*flat(repeated), 4)
    assert trace.offsets.tolist() == again.offsets.tolist() and trace.num_tokens.tolist() == again.num_tokens.tolist()
    # the same equality pattern (dense ids are numbered in order of first appearance in both)
    assert trace.ids.tolist() == again.ids.tolist()
