"""tests/array_cache.py's ArrayPrefixCache against advisor.sim.cache.PrefixCache, step by step."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from array_cache import ArrayPrefixCache
from hypothesis import HealthCheck, assume, given, settings, target
from hypothesis import strategies as st

from advisor.blockhash import request_block_hashes
from advisor.sim.cache import PrefixCache

B = 4
SYSTEMS = [list(range(100 * k, 100 * k + n)) for k, n in enumerate((5, 8, 13))]


class Pair:
    """The reference and the array cache fed the same requests; every step must agree."""

    def __init__(self, num_blocks: int, speculative: str | None = None) -> None:
        self.ref = PrefixCache(num_blocks, B, speculative=speculative)
        self.fast = ArrayPrefixCache(num_blocks, B, num_ids=10_000, speculative=speculative)
        self.ids: dict[bytes, int] = {}
        self.tokens: dict[str, list[int]] = {}
        self.kv: dict[str, int] = {}

    def dense(self, tokens: Sequence[int]) -> tuple[list[bytes], list[int]]:
        hashes = request_block_hashes(tokens, B)
        return hashes, [self.ids.setdefault(h, len(self.ids)) for h in hashes]

    def admit(self, rid: str, tokens: Sequence[int], preempted: bool = False, skip: bool = False) -> int | None:
        hashes, ids = self.dense(tokens)
        got = self.fast.admit(rid, ids, len(tokens), preempted=preempted, skip_prefix_cache=skip)
        expected = self.ref.admit(rid, hashes, len(tokens), preempted=preempted, skip_prefix_cache=skip)
        assert got == expected
        if got is not None:
            self.tokens[rid], self.kv[rid] = list(tokens), len(tokens)
        self.check()
        return got

    def grow(self, rid: str, new_tokens: Sequence[int], known: bool) -> bool:
        """Decode `new_tokens`; `known`: their tokens (and hashes) are known, else unique."""
        self.tokens[rid] += list(new_tokens)
        total = self.kv[rid] + len(new_tokens)
        hashes, ids = self.dense(self.tokens[rid]) if known else ([], [])
        got, expected = self.fast.grow(rid, total, ids), self.ref.grow(rid, total, hashes)
        assert got == expected
        if got:
            self.kv[rid] = total
        self.check()
        return got

    def free(self, rid: str) -> None:
        self.fast.free(rid)
        self.ref.free(rid)
        del self.tokens[rid], self.kv[rid]
        self.check()

    def check(self) -> None:
        assert self.fast.free_block_ids() == self.ref.free_block_ids()
        for name in ("queries", "hits", "preempted_queries", "preempted_hits", "evictions", "blocks_in_use", "peak_blocks_in_use"):
            assert getattr(self.fast, name) == getattr(self.ref, name), name


def test_same_prompt_twice_keeps_two_copies():
    pair = Pair(3)
    for rid in ("a", "b"):
        pair.admit(rid, range(8))
        pair.free(rid)
    assert pair.fast.free_block_ids() == [1, 2, 0]


def test_running_requests_pin_blocks_and_unique_decode_blocks_free_to_the_tail():
    pair = Pair(6)
    pair.admit("a", range(6))
    assert pair.admit("b", range(6)) == 4
    assert pair.grow("a", [9, 9, 9, 9, 9], known=False)
    assert pair.admit("c", range(40)) is None
    pair.free("a")
    pair.free("b")
    assert pair.admit("c", range(16)) == 4


def test_an_infinite_pool_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="cache.PrefixCache"):
        ArrayPrefixCache(0, B, 10)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data(), num_blocks=st.integers(3, 14))
def test_generated_programs_agree_at_every_step(data, num_blocks):
    run_program(data, Pair(num_blocks))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data(), num_blocks=st.integers(3, 14), speculative=st.sampled_from([None, "eagle"]))
def test_programs_with_skipped_reads_and_eagle_agree_at_every_step(data, num_blocks, speculative):
    """`_admit_flagged`, the primitive concurrent mode will call for prompt-logprob requests and
    EAGLE-style drafters, equals PrefixCache's `skip_prefix_cache` / `speculative`."""
    run_program(data, Pair(num_blocks, speculative), skips=True)


def run_program(data: st.DataObject, pair: Pair, skips: bool = False) -> None:
    """A generated program of admissions (some skipping the cache read when `skips`), decode
    steps, preemptions and frees; every step must agree."""
    num_blocks = pair.ref.num_blocks
    assert num_blocks is not None
    earlier: list[list[int]] = []
    for n in range(data.draw(st.integers(5, 45))):
        running = sorted(pair.tokens)
        op = data.draw(st.sampled_from(["admit", "admit", "grow", "grow", "free"] if running else ["admit"]))
        if op == "admit":
            heads = [[], *SYSTEMS] + [p[: len(p) // B * B] for p in earlier[-5:]]
            prompt = (data.draw(st.sampled_from(heads)) + data.draw(st.lists(st.integers(0, 2), max_size=10)))[: num_blocks * B]
            earlier.append(prompt or [0])
            pair.admit(f"r{n}", earlier[-1], skip=skips and data.draw(st.booleans()))
        elif op == "grow":
            rid = data.draw(st.sampled_from(running))
            new = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=6))
            tokens = pair.tokens[rid] + new
            if not pair.grow(rid, new, known=data.draw(st.booleans())):
                pair.free(rid)  # what a scheduler would do: preempt it, resume it later
                pair.admit(rid, tokens, preempted=True)
        else:
            pair.free(data.draw(st.sampled_from(running)))
    for rid in sorted(pair.tokens):
        pair.free(rid)
    target(float(pair.ref.evictions))
    assume(pair.ref.evictions > 0)
