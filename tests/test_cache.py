"""Stories for advisor.sim.cache: exact hits, evictions and free-queue order (B = 4)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from advisor.blockhash import chain_trace_hash_ids, request_block_hashes
from advisor.sim.cache import (
    Block,
    FreeBlockQueue,
    FutureUses,
    PrefixCache,
    drops_last_hit_block,
    sequential_hits,
    sequential_hits_from_hashes,
)

B = 4


def make_request(cache: PrefixCache, rid: str, tokens: Sequence[int], **keys: str) -> int | None:
    return cache.admit(rid, request_block_hashes(list(tokens), B, **keys), len(tokens))


def run_and_free(cache: PrefixCache, rid: str, tokens: Sequence[int]) -> int | None:
    hit = make_request(cache, rid, tokens)
    cache.free(rid)
    return hit


def test_free_queue_starts_in_id_order_and_frees_tail_first():
    cache = PrefixCache(10, B)
    assert cache.free_block_ids() == list(range(10))
    make_request(cache, "a", range(10))  # blocks 0, 1 full; block 2 partial
    assert cache.free_block_ids() == list(range(3, 10))
    cache.free("a")
    # The partial (unhashed) block goes to the head, full blocks tail-first to the tail.
    assert cache.free_block_ids() == [2, 3, 4, 5, 6, 7, 8, 9, 1, 0]


def test_hit_pulls_blocks_off_the_free_queue_and_pins_them():
    cache = PrefixCache(10, B)
    run_and_free(cache, "a", range(10))
    assert make_request(cache, "b", range(9)) == 8
    assert 0 not in cache.free_block_ids() and 1 not in cache.free_block_ids()
    assert cache.blocks_in_use == 3


@pytest.mark.parametrize(("length", "hit"), [(4, 0), (5, 4), (8, 4), (9, 8), (12, 8), (13, 12)])
def test_the_last_prompt_token_is_always_recomputed(length, hit):
    cache = PrefixCache(10, B)
    run_and_free(cache, "warm", range(16))
    assert cache.lookup(request_block_hashes(list(range(length)), B), length) == hit
    assert make_request(cache, "probe", range(length)) == hit


def test_lookup_changes_nothing():
    cache = PrefixCache(4, B)
    run_and_free(cache, "a", range(8))
    before = cache.free_block_ids()
    assert cache.lookup(request_block_hashes(list(range(9)), B), 9) == 8
    assert cache.free_block_ids() == before and cache.queries == 8


def test_same_prompt_twice_leaves_two_copies_of_one_hash():
    cache = PrefixCache(3, B)
    run_and_free(cache, "a", range(8))
    assert run_and_free(cache, "b", range(8)) == 4
    assert cache.free_block_ids() == [1, 2, 0]  # vLLM's [2, 3, 1], shifted by its null block
    assert len(cache.pool.cached[request_block_hashes(list(range(8)), B)[1]]) == 2


def test_lazy_eviction_takes_the_least_recently_used_tail_block_first():
    cache = PrefixCache(4, B)
    run_and_free(cache, "a", range(8))  # queue [2, 3, 1, 0]
    run_and_free(cache, "b", range(100, 108))  # pops 2, 3 (unhashed); queue [1, 0, 3, 2]
    assert cache.evictions == 0
    assert run_and_free(cache, "c", range(200, 204)) == 0  # pops 1: a's tail block
    assert cache.evictions == 1
    assert make_request(cache, "d", range(9)) == 4  # a's block 0 survived, block 1 did not


def test_admission_refused_changes_nothing_and_counts_nothing():
    cache = PrefixCache(4, B)
    make_request(cache, "a", range(12))
    assert make_request(cache, "b", range(50, 58)) is None
    assert (cache.queries, cache.blocks_in_use) == (12, 3)
    cache.free("a")
    assert make_request(cache, "b", range(50, 58)) == 0


def test_decode_blocks_are_cached_once_full_and_others_hit_them():
    cache = PrefixCache(10, B)
    tokens = list(range(6))
    make_request(cache, "a", tokens)
    tokens += [6, 7, 8]
    assert cache.grow("a", 8, request_block_hashes(tokens, B))  # KV for tokens 0..7
    assert cache.lookup(request_block_hashes(tokens, B), 9) == 8
    assert not cache.grow("a", 100)  # 25 blocks do not fit: nothing changes
    assert cache.blocks_in_use == 2


def test_unique_decode_blocks_are_hashed_so_they_free_to_the_tail():
    cache = PrefixCache(6, B)
    make_request(cache, "a", range(4))
    assert cache.grow("a", 9)  # no hashes given: two unique output blocks
    cache.free("a")
    assert cache.free_block_ids() == [2, 3, 4, 5, 1, 0]


def test_lora_on_every_block_and_cache_salt_on_block_zero_separate_requests():
    plain = request_block_hashes(list(range(8)), B)
    assert set(plain).isdisjoint(request_block_hashes(list(range(8)), B, lora="x"))
    assert set(plain).isdisjoint(request_block_hashes(list(range(8)), B, cache_salt="s"))
    assert request_block_hashes(list(range(8)), B, cache_salt="s") == request_block_hashes(list(range(8)), B, cache_salt="s")


def test_infinite_cache_never_evicts():
    reqs = [list(range(k, k + 9)) for k in range(0, 400, 4)] + [list(range(9))]
    assert sequential_hits(reqs, B, None)[-1] == 8
    assert sequential_hits(reqs, B, 8)[-1] == 0


def test_hash_trace_partial_last_block_is_never_hit():
    lists, lengths = [[1, 2, 3], [1, 2, 3], [1, 2, 4]], [10, 12, 12]
    hashes = [chain_trace_hash_ids(ids, n, B) for ids, n in zip(lists, lengths, strict=True)]
    assert [len(h) for h in hashes] == [2, 3, 3]
    # Request 1 hits the two full blocks of request 0 (its own third block is capped by L-1).
    assert sequential_hits_from_hashes(hashes, lengths, B, None) == [0, 8, 8]


# --- requests vLLM treats apart: prompt logprobs, speculative decoding --------------------
def test_a_request_that_skips_the_cache_read_hits_nothing_counts_nothing_and_still_caches():
    cache = PrefixCache(10, B)
    run_and_free(cache, "a", range(9))
    hashes = request_block_hashes(list(range(9)), B)
    assert cache.admit("skip", hashes, 9, skip_prefix_cache=True) == 0  # would hit 8
    assert (cache.queries, cache.hits, cache.blocks_in_use) == (9, 0, 3)  # 3 new blocks, a's stay free
    cache.free("skip")
    assert len(cache.pool.cached[hashes[1]]) == 2  # its blocks were cached: a second copy of each
    new = request_block_hashes(list(range(50, 59)), B)
    assert cache.admit("skip2", new, 9, skip_prefix_cache=True) == 0
    cache.free("skip2")
    assert make_request(cache, "b", range(50, 59)) == 8  # a later request hits what it cached
    assert (cache.queries, cache.hits) == (18, 8)


def test_a_preempted_request_that_skips_the_cache_read_counts_nothing_either():
    cache = PrefixCache(10, B)
    run_and_free(cache, "a", range(9))
    assert cache.admit("p", request_block_hashes(list(range(9)), B), 9, preempted=True, skip_prefix_cache=True) == 0
    assert (cache.preempted_queries, cache.preempted_hits, cache.queries) == (0, 0, 9)


@pytest.mark.parametrize(("length", "hit", "eagle_hit"), [(5, 4, 0), (8, 4, 0), (9, 8, 4), (13, 12, 8), (17, 16, 12)])
def test_eagle_drops_the_last_matched_block_after_the_last_token_cap(length, hit, eagle_hit):
    for speculative, expected in ((None, hit), ("ngram", hit), ("eagle", eagle_hit), ("mtp", eagle_hit)):
        cache = PrefixCache(10, B, speculative=speculative)
        run_and_free(cache, "warm", range(16))  # 4 cached blocks; a probe of 17 tokens matches all 4
        assert cache.lookup(request_block_hashes(list(range(length)), B), length) == expected, speculative
        assert make_request(cache, "probe", range(length)) == expected


def test_eagle_leaves_the_dropped_block_free_and_computes_a_copy_of_it():
    cache = PrefixCache(10, B, speculative="eagle")
    run_and_free(cache, "a", range(9))  # blocks 0, 1 cached; 2 partial
    assert make_request(cache, "b", range(9)) == 4  # block 0 hit; block 1 dropped, recomputed
    assert 1 in cache.free_block_ids() and 0 not in cache.free_block_ids()
    assert len(cache.pool.cached[request_block_hashes(list(range(9)), B)[1]]) == 2


def test_which_speculative_methods_drop_the_last_hit_block():
    assert [drops_last_hit_block(m) for m in ("eagle", "eagle3", "mtp", "dflash", "dspark")] == [True] * 5
    assert [drops_last_hit_block(m) for m in (None, "ngram", "draft_model", "suffix", "medusa")] == [False] * 5
    with pytest.raises(ValueError, match="unknown speculative method 'eagle4'"):
        drops_last_hit_block("eagle4")
    # 0.33 and 0.34 hash each block with the token after it instead, and drop nothing
    assert not any(drops_last_hit_block(m, v) for m in ("eagle", "mtp", "dflash") for v in ("0.33", "0.34"))
    assert PrefixCache(4, B, speculative="eagle", vllm_version="0.34").drop_last_hit_block is False


def test_belady_future_ignores_requests_that_skip_the_cache_read():
    hashes = [request_block_hashes(list(range(9)), B)] * 3
    future = FutureUses(hashes, [9, 9, 9], B, skip=[False, True, False])
    assert [future.next_use(hashes[0][0], p) for p in (0, 1, 3)] == [0.0, 2.0, float("inf")]


# --- reference policies ----------------------------------------------------------------

A, Bp, C = list(range(5)), list(range(10, 15)), list(range(20, 25))  # one full block + 1 token


def test_lru_refreshes_on_hit_fifo_does_not():
    reqs = [A, Bp, A, C, A]  # 3 blocks: two hashed blocks survive between requests
    assert sequential_hits(reqs, B, 3, "lru") == [0, 0, 4, 0, 4]
    assert sequential_hits(reqs, B, 3, "fifo") == [0, 0, 4, 0, 0]


def test_belady_keeps_the_block_wanted_soonest():
    reqs = [A, Bp, C, A]
    assert sequential_hits(reqs, B, 3, "lru") == [0, 0, 0, 0]
    assert sequential_hits(reqs, B, 3, "belady") == [0, 0, 0, 4]


def test_belady_needs_the_future():
    with pytest.raises(ValueError, match="future"):
        PrefixCache(4, B, "belady")


def test_belady_evicts_a_child_before_its_parent_when_both_are_wanted_next():
    # Both blocks of A are wanted next by the same request (equal next use). Evicting the
    # parent (block id 0, the old tie-break) strands the child: A then hits nothing.
    parent, child = [1] * 4, [2] * 4
    a, x = parent + child + [9], [5] * 5
    assert sequential_hits([a, x, a], B, 3, "lru") == [0, 0, 4]
    assert sequential_hits([a, x, a], B, 3, "belady") == [0, 0, 4]


def test_belady_counts_extra_copies_of_a_hash_as_never_used():
    # A prompt of exactly one block never looks its block up (L-1 cap), so `p` computes a
    # second copy of P. Only the oldest copy is ever hit; keeping the extra one (it shares
    # P's next use) instead of Q loses the last request's hit.
    p, q = [1] * 4, [2] * 4
    reqs = [p + [9], p, q, p + q, q + [9]]
    assert sequential_hits(reqs, B, 3, "lru") == [0, 0, 0, 4, 4]
    assert sequential_hits(reqs, B, 3, "belady") == [0, 0, 0, 4, 4]


# Prompts built from a few whole blocks (much sharing, lengths often a multiple of B).
chunked_prompts = st.lists(
    st.tuples(st.lists(st.sampled_from([(1,) * B, (2,) * B, (3,) * B, (1, 2, 3, 1)]), min_size=1, max_size=4),
              st.lists(st.integers(0, 3), max_size=3)).map(lambda t: [x for c in t[0] for x in c] + t[1]),
    min_size=1, max_size=25)


@settings(max_examples=400, deadline=None)
@given(st.one_of(chunked_prompts, st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=14), min_size=1, max_size=25)),
       st.integers(0, 8))
def test_belady_never_loses_to_lru_or_fifo_and_nobody_beats_the_ceiling(reqs, extra_blocks):
    # Every prompt fits the pool (a refused one would still be in Belady's future), with
    # eviction pressure from 0 to 8 blocks above the largest prompt. Farthest-next-use is
    # not a proven optimum for chained multi-block requests; with its two refinements
    # (the stories above) it never lost on thousands of random workloads, checked here.
    num_blocks = max(-(-len(r) // B) for r in reqs) + extra_blocks
    ceiling = sum(sequential_hits(reqs, B, None))
    belady = sum(sequential_hits(reqs, B, num_blocks, "belady"))
    assert belady <= ceiling
    assert belady >= max(sum(sequential_hits(reqs, B, num_blocks, "lru")), sum(sequential_hits(reqs, B, num_blocks, "fifo")))


def test_free_block_queue_append_prepend_remove():
    blocks = [Block(i) for i in range(4)]
    q = FreeBlockQueue(blocks[:2])
    q.append_n([blocks[2]])
    q.prepend_n([blocks[3]])
    q.remove(blocks[0])
    assert q.block_ids() == [3, 1, 2] and q.num_free_blocks == 3
    assert q.popleft() is blocks[3]
